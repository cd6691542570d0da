//! The transmission phase of one connection.
//!
//! One task owns the socket. It decodes every whole request in its read buffer, runs them
//! together (a memory-backed device answers within the first poll), and writes the replies
//! of everything that finished with one system call, in completion order: clients match
//! replies by cookie. Requests never move to another thread.
//!
//! When the client hangs up, breaks framing, or the server shuts down, reading stops but
//! every request already accepted is driven to completion (the block-IO contract forbids
//! dropping a write half-way); replies are sent while the socket still takes them.

use std::future::Future;

use bytes::{BufMut, Bytes, BytesMut};
use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use strata_block::{Durability, IoError, Span};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::Export;
use crate::handshake::Negotiated;
use crate::proto::{self, Request, cflag, chunk, cmd, errno};

/// Requests in flight per connection; beyond it the connection stops reading.
const MAX_IN_FLIGHT: usize = 128;
/// Bytes of reads and writes in flight per connection; beyond it the connection stops
/// reading, so a client cannot make the server hold 128 requests of 32 MiB each.
const MAX_IN_FLIGHT_BYTES: u64 = 64 << 20;
/// Bytes the read buffer has free before each read from the socket.
const READ_ROOM: usize = 256 << 10;
/// Read replies larger than this are written straight from their buffer, not copied.
const COPY_LIMIT: usize = 64 << 10;
/// Most descriptors in one block-status reply.
const MAX_DESCRIPTORS: usize = 512;

/// What a finished request sends back.
enum Outcome {
    /// Success without data.
    Done,
    /// Read data.
    Data(Bytes),
    /// Block-status descriptors (length, flags).
    Status(Vec<(u32, u32)>),
    /// Failure: protocol errno and a message for structured replies.
    Failed(u32, String),
}

/// Serves requests until the client leaves or `shutdown` turns true.
pub(crate) async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    session: Negotiated,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut input = BytesMut::with_capacity(READ_ROOM);
    let mut output = BytesMut::with_capacity(64 << 10);
    let mut in_flight = FuturesUnordered::new();
    let mut reading = !*shutdown.borrow();
    let mut writable = true;
    let mut load = Load::default();
    let export = &session.export;
    loop {
        while reading && load.has_room() {
            match proto::decode_request(&mut input) {
                Ok(Some(request)) if request.kind == cmd::DISC => reading = false,
                Ok(Some(request)) => {
                    load.add(&request);
                    in_flight.push(start(export, &session, request));
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(export = %export.name, error = %e, "client broke framing; disconnecting");
                    reading = false;
                }
            }
        }
        while let Some(Some((request, outcome))) = in_flight.next().now_or_never() {
            load.remove(&request);
            if writable {
                writable = reply(&mut stream, &mut output, &session, request, outcome).await;
            }
        }
        if writable && !output.is_empty() {
            writable = stream.write_all(&output).await.is_ok();
            output.clear();
        }
        if input.capacity() - input.len() < READ_ROOM / 4 {
            // Room for a whole batch of requests per read() (the payloads split off
            // earlier keep the old space until their writes finish).
            input.reserve(READ_ROOM);
        }
        if !reading && in_flight.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            Some((request, outcome)) = in_flight.next(), if !in_flight.is_empty() => {
                load.remove(&request);
                if writable {
                    writable = reply(&mut stream, &mut output, &session, request, outcome).await;
                }
            }
            read = stream.read_buf(&mut input), if reading && load.has_room() => {
                if !matches!(read, Ok(n) if n > 0) {
                    reading = false;
                }
            }
            _ = shutdown.changed(), if reading => reading = false,
        }
        if !writable {
            // Nobody reads the replies: finish what was accepted, take nothing new.
            reading = false;
        }
    }
    if writable {
        let _ = stream.shutdown().await;
    }
}

/// What a connection has in flight.
#[derive(Default)]
struct Load {
    requests: usize,
    bytes: u64,
}

impl Load {
    /// Bytes a request holds while in flight: its payload or its read buffer.
    fn weight(request: &Request) -> u64 {
        match request.kind {
            cmd::READ | cmd::WRITE => u64::from(request.length),
            _ => 0,
        }
    }

    fn add(&mut self, request: &Request) {
        self.requests += 1;
        self.bytes += Self::weight(request);
    }

    fn remove(&mut self, request: &Request) {
        self.requests -= 1;
        self.bytes -= Self::weight(request);
    }

    /// Whether another request may start (one always may when none is in flight).
    fn has_room(&self) -> bool {
        self.requests == 0 || (self.requests < MAX_IN_FLIGHT && self.bytes < MAX_IN_FLIGHT_BYTES)
    }
}

/// Checks `request` and starts it; a refused request completes at once with its errno.
fn start(
    export: &Export,
    session: &Negotiated,
    request: Request,
) -> impl Future<Output = (Request, Outcome)> + Send + use<> {
    let check = check(export, session, &request);
    let device = export.device.clone();
    async move {
        if let Err((code, message)) = check {
            return (request, Outcome::Failed(code, message));
        }
        let (offset, len) = (request.offset, u64::from(request.length));
        let fua = request.flags & cflag::FUA != 0;
        let result = match request.kind {
            cmd::READ => device.read(offset, len).await.map(Outcome::Data),
            cmd::WRITE => {
                let durability = if fua { Durability::Fua } else { Durability::Cached };
                device.write(offset, request.data.clone(), durability).await.map(|()| Outcome::Done)
            }
            cmd::FLUSH => device.flush().await.map(|()| Outcome::Done),
            cmd::TRIM => then_flush(device.discard(offset, len).await, fua, &*device).await,
            cmd::WRITE_ZEROES => {
                let zeroed = if request.flags & cflag::NO_HOLE != 0 {
                    device.write_zeroes(offset, len).await
                } else {
                    device.discard(offset, len).await
                };
                then_flush(zeroed, fua, &*device).await
            }
            cmd::BLOCK_STATUS => device
                .allocation(offset, len)
                .await
                .map(|spans| Outcome::Status(descriptors(&spans, request.flags & cflag::REQ_ONE != 0))),
            _ => unreachable!("check() refuses other commands"),
        };
        let outcome = result.unwrap_or_else(|e| Outcome::Failed(io_errno(&e), e.to_string()));
        (request, outcome)
    }
}

async fn then_flush(
    result: Result<(), IoError>,
    fua: bool,
    device: &dyn strata_block::BlockIo,
) -> Result<Outcome, IoError> {
    result?;
    if fua {
        device.flush().await?;
    }
    Ok(Outcome::Done)
}

/// The protocol's answer to a request the export cannot take, if any.
fn check(export: &Export, session: &Negotiated, r: &Request) -> Result<(), (u32, String)> {
    let geometry = export.device.geometry();
    let invalid = |why: String| Err((errno::EINVAL, why));
    if r.flags & !cflag::KNOWN != 0 {
        return invalid(format!("unknown command flags {:#x}", r.flags & !cflag::KNOWN));
    }
    let writes = matches!(r.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    match r.kind {
        cmd::FLUSH => return Ok(()),
        cmd::READ | cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES | cmd::BLOCK_STATUS => {}
        other => return invalid(format!("unknown command {other}")),
    }
    if r.kind == cmd::BLOCK_STATUS && !session.block_status {
        return invalid("BLOCK_STATUS needs the base:allocation context".into());
    }
    if writes && export.read_only {
        return Err((errno::EPERM, format!("export '{}' is read-only", export.name)));
    }
    if r.kind == cmd::READ && r.length > proto::MAX_PAYLOAD {
        return Err((errno::EOVERFLOW, format!("read of {} bytes exceeds {}", r.length, proto::MAX_PAYLOAD)));
    }
    if r.length == 0 {
        return invalid("zero-length request".into());
    }
    let bs = u64::from(geometry.block_size);
    if !r.offset.is_multiple_of(bs) || !u64::from(r.length).is_multiple_of(bs) {
        return invalid(format!("offset {} and length {} must be multiples of {bs}", r.offset, r.length));
    }
    if r.offset.checked_add(u64::from(r.length)).is_none_or(|end| end > geometry.size_bytes) {
        let code = if writes { errno::ENOSPC } else { errno::EINVAL };
        return Err((code, format!("request ends past the export's {} bytes", geometry.size_bytes)));
    }
    Ok(())
}

/// `base:allocation` descriptors for `spans`, merged and capped.
fn descriptors(spans: &[Span], one: bool) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for span in spans {
        let flags = if span.hole { proto::state::HOLE | proto::state::ZERO } else { 0 };
        let len = u32::try_from(span.len).expect("spans lie inside a u32-length request");
        match out.last_mut() {
            Some((l, f)) if *f == flags => *l += len,
            _ => out.push((len, flags)),
        }
    }
    out.truncate(if one { 1 } else { MAX_DESCRIPTORS });
    out
}

fn io_errno(e: &IoError) -> u32 {
    match e {
        IoError::Misaligned { .. } => errno::EINVAL,
        IoError::OutOfRange { .. } => errno::EINVAL,
        IoError::Closed => errno::ESHUTDOWN,
        // Not a failure: the host may pause and retry (qemu's werror=enospc).
        IoError::NoSpace { .. } => errno::ENOSPC,
        _ => errno::EIO,
    }
}

/// Encodes the reply to `request` into `output`, or writes it directly when it carries
/// much data. Returns false once the socket refuses writes.
async fn reply<W: AsyncWrite + Unpin>(
    writer: &mut W,
    output: &mut BytesMut,
    session: &Negotiated,
    request: Request,
    outcome: Outcome,
) -> bool {
    let cookie = request.cookie;
    let structured = session.structured;
    match outcome {
        Outcome::Done => proto::simple_reply(output, cookie, 0),
        Outcome::Failed(code, message) => {
            if code == errno::EIO {
                tracing::error!(export = %session.export.name, kind = request.kind, offset = request.offset, %message, "request failed");
            }
            if structured {
                proto::error_chunk(output, cookie, code, &message);
            } else {
                proto::simple_reply(output, cookie, code);
            }
        }
        Outcome::Status(descriptors) => {
            let length = 4 + 8 * descriptors.len();
            let length = u32::try_from(length).expect("descriptors are capped");
            proto::chunk_header(output, chunk::FLAG_DONE, chunk::BLOCK_STATUS, cookie, length);
            output.put_u32(proto::BASE_ALLOCATION_ID);
            for (len, flags) in descriptors {
                output.put_u32(len);
                output.put_u32(flags);
            }
        }
        Outcome::Data(data) => {
            if structured {
                let length = u32::try_from(8 + data.len()).expect("reads are capped");
                proto::chunk_header(output, chunk::FLAG_DONE, chunk::OFFSET_DATA, cookie, length);
                output.put_u64(request.offset);
            } else {
                proto::simple_reply(output, cookie, 0);
            }
            if data.len() <= COPY_LIMIT {
                output.put_slice(&data);
            } else {
                let sent = writer.write_all(output).await.is_ok() && writer.write_all(&data).await.is_ok();
                output.clear();
                return sent;
            }
        }
    }
    true
}
