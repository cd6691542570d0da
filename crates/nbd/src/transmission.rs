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
//!
//! Memory is bounded by a byte budget (`strata_net::budget`): each request is charged
//! its payload or read buffer from its start until its reply is on the socket, and the
//! connection reads no new request while the charge would not fit. A request the export
//! refuses (a read past its end or above `MAX_PAYLOAD`) holds no buffer and is charged
//! nothing. A client that takes no byte of its replies for `SEND_TIMEOUT`, or does not
//! take replies written together within `send_allowance` of their size (or within
//! `SHUTDOWN_GRACE` once the server shuts down) is treated as gone: what it asked is
//! finished, its replies dropped. So is one that does not send a write's payload, charged
//! from its first byte, within `send_allowance` of its size.

use std::future::Future;

use bytes::{BufMut, Bytes, BytesMut};
use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use strata_block::{Durability, IoError, Span};
use strata_net::budget::{Account, Full, SEND_TIMEOUT, SHUTDOWN_GRACE, send_allowance};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::Export;
use crate::handshake::Negotiated;
use crate::proto::{self, Request, cflag, chunk, cmd, errno};

/// Requests in flight per connection; beyond it the connection stops reading.
const MAX_IN_FLIGHT: usize = 128;
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

/// Serves requests until the client leaves or `shutdown` turns true. Every request is
/// charged to `account` from its start until its reply has gone out.
pub(crate) async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    session: Negotiated,
    mut shutdown: watch::Receiver<bool>,
    mut account: Account,
) {
    let mut input = BytesMut::with_capacity(READ_ROOM);
    let mut output = BytesMut::with_capacity(64 << 10);
    let mut in_flight = FuturesUnordered::new();
    let mut reading = !*shutdown.borrow();
    let mut sender = Sender::new(shutdown.clone());
    let mut writable = true;
    let mut requests = 0usize;
    // Charges of the replies in `output` (or written straight from their buffers),
    // released once they are on the socket.
    let mut unsent = 0u64;
    // A request decoded but not started: its charge does not fit yet.
    let mut waiting: Option<(Request, Full)> = None;
    // The charge of a write whose payload is still arriving (taken before reading it).
    let mut prepaid = 0u64;
    // When that payload must have arrived.
    let mut payload_by: Option<Instant> = None;
    // Which budget keeps that payload from being read.
    let mut stalled: Option<Full> = None;
    let export = &session.export;
    loop {
        while let Some(Some((request, weight, outcome))) = in_flight.next().now_or_never() {
            requests -= 1;
            if writable {
                unsent += weight;
                writable = reply(&mut stream, &mut output, &mut sender, &session, request, outcome).await;
            } else {
                account.release(weight);
            }
        }
        if writable && !output.is_empty() {
            writable = sender.send(&mut stream, &output).await.is_ok();
            output.clear();
        }
        account.release(unsent);
        unsent = 0;
        while reading && requests < MAX_IN_FLIGHT {
            let request = match waiting.take() {
                Some((request, _)) => request,
                None => match proto::decode_request(&mut input) {
                    Ok(Some(request)) if request.kind == cmd::DISC => {
                        reading = false;
                        break;
                    }
                    Ok(Some(request)) => request,
                    Ok(None) => {
                        stalled = None;
                        if prepaid == 0
                            && let Some(length) = proto::incoming_payload(&input)
                        {
                            match account.try_charge(u64::from(length)) {
                                Ok(()) => {
                                    prepaid = u64::from(length);
                                    payload_by = Some(Instant::now() + send_allowance(length as usize));
                                }
                                Err(full) => stalled = Some(full),
                            }
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(export = %export.name, error = %e, "client broke framing; disconnecting");
                        reading = false;
                        break;
                    }
                },
            };
            let checked = check(export, &session, &request);
            let weight = weight(&request, checked.is_ok());
            let charged = if prepaid > 0 {
                // The write whose payload was charged as it arrived.
                debug_assert_eq!(prepaid, weight);
                prepaid = 0;
                payload_by = None;
                Ok(())
            } else if weight == 0 {
                Ok(())
            } else {
                account.try_charge(weight)
            };
            match charged {
                Ok(()) => {
                    requests += 1;
                    in_flight.push(start(export, request, checked, weight));
                }
                Err(full) => {
                    // Over budget: read nothing new until replies have gone out.
                    waiting = Some((request, full));
                    break;
                }
            }
        }
        if input.capacity() - input.len() < READ_ROOM / 4 {
            // Room for a whole batch of requests per read() (the payloads split off
            // earlier keep the old space until their writes finish).
            input.reserve(READ_ROOM);
        }
        if !reading && in_flight.is_empty() {
            break;
        }
        let room = waiting.is_none() && stalled.is_none() && requests < MAX_IN_FLIGHT;
        let shared_full = matches!(waiting, Some((_, Full::Controller))) || stalled == Some(Full::Controller);
        tokio::select! {
            biased;
            Some((request, weight, outcome)) = in_flight.next(), if !in_flight.is_empty() => {
                requests -= 1;
                if writable {
                    unsent += weight;
                    writable = reply(&mut stream, &mut output, &mut sender, &session, request, outcome).await;
                } else {
                    account.release(weight);
                }
            }
            read = stream.read_buf(&mut input), if reading && room => {
                if !matches!(read, Ok(n) if n > 0) {
                    reading = false;
                }
            }
            () = account.controller().changed(), if reading && shared_full => {}
            () = until(payload_by), if reading && prepaid > 0 => {
                tracing::warn!(export = %export.name, "client does not send the payload of its write; disconnecting");
                reading = false;
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

/// Returns at `deadline`; never without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Bytes a request holds while in flight and until its reply is sent: a write's payload
/// (in memory once decoded, whether or not the export takes it) or the read buffer of a
/// read the export takes. A refused read holds nothing: charging what it asked for would
/// let one request of 4 GiB take the whole shared budget. Never more than a request can
/// hold ([`proto::MAX_PAYLOAD`]).
fn weight(request: &Request, accepted: bool) -> u64 {
    let holds = match request.kind {
        cmd::WRITE => true,
        cmd::READ => accepted,
        _ => false,
    };
    if holds { u64::from(request.length.min(proto::MAX_PAYLOAD)) } else { 0 }
}

/// Writes replies within [`SEND_TIMEOUT`] of the client last taking a byte, each buffer
/// within [`send_allowance`] of its size from when the socket first made it wait, and
/// within [`SHUTDOWN_GRACE`] once the server shuts down, so a client that does not read,
/// or reads a byte now and then, can hold neither memory nor shutdown for long.
struct Sender {
    shutdown: watch::Receiver<bool>,
    /// When replies must have gone out: set once the server shuts down.
    stop_by: Option<Instant>,
}

impl Sender {
    fn new(shutdown: watch::Receiver<bool>) -> Self {
        Self { shutdown, stop_by: None }
    }

    /// Writes all of `buf`; an error (a timeout among them) means the client is gone.
    async fn send<W: AsyncWrite + Unpin>(&mut self, stream: &mut W, mut buf: &[u8]) -> std::io::Result<()> {
        // When all of `buf` must have gone: set when the socket first makes it wait.
        let mut give_up_by = None;
        while !buf.is_empty() {
            // Most writes complete at once: no timer for them.
            let written = match stream.write(buf).now_or_never() {
                Some(written) => written?,
                None => {
                    let give_up_by =
                        *give_up_by.get_or_insert_with(|| Instant::now() + send_allowance(buf.len()));
                    self.write_within(stream, buf, give_up_by).await?
                }
            };
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            buf = &buf[written..];
        }
        Ok(())
    }

    /// One write that waits for the socket: at most [`SEND_TIMEOUT`], and not past
    /// `give_up_by` nor the shutdown's deadline.
    async fn write_within<W: AsyncWrite + Unpin>(
        &mut self,
        stream: &mut W,
        buf: &[u8],
        give_up_by: Instant,
    ) -> std::io::Result<usize> {
        loop {
            if self.stop_by.is_none() && *self.shutdown.borrow() {
                self.stop_by = Some(Instant::now() + SHUTDOWN_GRACE);
            }
            let mut deadline = (Instant::now() + SEND_TIMEOUT).min(give_up_by);
            if let Some(stop_by) = self.stop_by {
                deadline = deadline.min(stop_by);
            }
            let stopping = self.stop_by.is_some();
            tokio::select! {
                written = stream.write(buf) => return written,
                () = tokio::time::sleep_until(deadline) => {
                    return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the client does not read its replies"));
                }
                // The server shuts down: look again with the shorter deadline.
                _ = self.shutdown.wait_for(|stop| *stop), if !stopping => {
                    self.stop_by.get_or_insert_with(|| Instant::now() + SHUTDOWN_GRACE);
                }
            }
        }
    }
}

/// Starts `request` as `check` found it; a refused request completes at once with its
/// errno. The future gives back the request's charge with its outcome.
fn start(
    export: &Export,
    request: Request,
    check: Result<(), (u32, String)>,
    weight: u64,
) -> impl Future<Output = (Request, u64, Outcome)> + Send + use<> {
    let device = export.device.clone();
    async move {
        if let Err((code, message)) = check {
            return (request, weight, Outcome::Failed(code, message));
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
        (request, weight, outcome)
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
    sender: &mut Sender,
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
            } else if code == errno::ENOSPC {
                tracing::warn!(export = %session.export.name, kind = request.kind, offset = request.offset, %message, "no space left for the request");
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
                let sent =
                    sender.send(writer, output).await.is_ok() && sender.send(writer, &data).await.is_ok();
                output.clear();
                return sent;
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use strata_block::MemDevice;
    use strata_net::budget::{Budget, CONTROLLER_BUDGET};
    use tokio::io::DuplexStream;
    use tokio::task::JoinHandle;

    use super::*;

    const MIB: u64 = 1 << 20;

    /// A connection served over an in-memory pipe of `pipe` bytes, so replies wait for
    /// the client as they would for a full socket.
    fn connect(pipe: usize, controller: &std::sync::Arc<Budget>) -> (DuplexStream, JoinHandle<()>) {
        let device = MemDevice::new("m", 64 * MIB, 512);
        let export = Export { name: "e".into(), description: String::new(), device, read_only: false };
        let session = Negotiated { export, structured: false, block_status: false };
        let (client, server) = tokio::io::duplex(pipe);
        let (stop, shutdown) = watch::channel(false);
        let account = Account::connection(controller);
        let task = tokio::spawn(async move {
            serve(server, session, shutdown, account).await;
            drop(stop);
        });
        (client, task)
    }

    fn read_request(cookie: u64, offset: u64, length: u32) -> Vec<u8> {
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&cmd::READ.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&length.to_be_bytes());
        b
    }

    /// Lets every task run until all wait (paused time moves on only then).
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_refused_read_takes_nothing_from_the_shared_budget() {
        let controller = Budget::new(CONTROLLER_BUDGET);
        // Room for half a reply: the error reply waits for the client, who does not read.
        let (mut client, task) = connect(8, &controller);
        client.write_all(&read_request(7, 0, u32::MAX)).await.unwrap();
        settle().await;
        assert_eq!(controller.used(), 0, "a refused read holds no buffer");
        let mut other = Account::connection(&controller);
        assert_eq!(other.try_charge(16 * MIB), Ok(()), "the budget is left to others");
        drop(other);
        let mut reply = [0u8; 16];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply[4..8], errno::EOVERFLOW.to_be_bytes());
        assert_eq!(reply[8..], 7u64.to_be_bytes());
        drop(client);
        task.await.unwrap();
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_large_read_waits_its_turn_and_is_not_overtaken() {
        let controller = Budget::new(CONTROLLER_BUDGET);
        // Seven busy connections hold 16 MiB each (105 MiB of the shared 128).
        let mut busy: Vec<Account> = (0..7).map(|_| Account::connection(&controller)).collect();
        for account in &mut busy {
            account.try_charge(16 * MIB).unwrap();
        }
        let (mut client, task) = connect(64 << 10, &controller);
        client.write_all(&read_request(1, 0, 32 << 20)).await.unwrap();
        settle().await;
        assert_eq!(controller.waiters(), 1, "the 32 MiB read waits for 31 MiB of the shared budget");
        // The busy connections turn their replies over, each taking its next 16 MiB as
        // soon as the last went out, as a client with a deep queue does.
        let mut served = false;
        for round in 0..20 {
            let account = &mut busy[round % 7];
            account.release(16 * MIB);
            let _ = account.try_charge(16 * MIB);
            settle().await;
            // The read holds 31 MiB beside six busy connections' 15.
            if controller.used() >= 31 * MIB + 6 * 15 * MIB {
                served = true;
                break;
            }
        }
        assert!(served, "the large read was overtaken by newer charges every time");
        let mut reply = vec![0u8; 16 + (32 << 20)];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply[4..8], [0; 4], "no error");
        drop(busy);
        drop(client);
        task.await.unwrap();
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_client_that_stops_mid_payload_is_dropped_within_its_allowance() {
        let controller = Budget::new(CONTROLLER_BUDGET);
        let (mut client, task) = connect(64 << 10, &controller);
        let mut write = read_request(1, 0, 32 << 20);
        write[6..8].copy_from_slice(&cmd::WRITE.to_be_bytes());
        write.extend_from_slice(&[0xa5; 4096]);
        client.write_all(&write).await.unwrap();
        settle().await;
        assert_eq!(controller.used(), 31 * MIB, "the payload is charged as it arrives");
        let started = Instant::now();
        tokio::time::sleep(send_allowance(32 << 20) + Duration::from_secs(1)).await;
        assert!(task.is_finished(), "a stalled payload held 31 MiB for {:?}", started.elapsed());
        assert_eq!(controller.used(), 0);
        task.await.unwrap();
        drop(client);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_client_reading_a_trickle_is_dropped_within_its_allowance() {
        let controller = Budget::new(CONTROLLER_BUDGET);
        let (mut client, task) = connect(64 << 10, &controller);
        client.write_all(&read_request(1, 0, 1 << 20)).await.unwrap();
        settle().await;
        assert_eq!(controller.used(), 0, "1 MiB is within the connection's floor");
        let started = Instant::now();
        // One byte every 29 s: never idle for SEND_TIMEOUT, but 1 MiB would take a year.
        let mut byte = [0u8; 1];
        for _ in 0..10 {
            if task.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(29)).await;
            client.read_exact(&mut byte).await.unwrap();
        }
        assert!(task.is_finished(), "the trickle kept its reply for {:?}", started.elapsed());
        let allowance = send_allowance(1 << 20);
        assert!(
            started.elapsed() <= allowance + Duration::from_secs(29),
            "dropped after {:?}",
            started.elapsed()
        );
        task.await.unwrap();
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_slow_client_above_the_minimum_rate_gets_its_whole_reply() {
        let controller = Budget::new(CONTROLLER_BUDGET);
        let (mut client, task) = connect(64 << 10, &controller);
        client.write_all(&read_request(1, 0, 16 << 20)).await.unwrap();
        settle().await;
        assert_eq!(controller.used(), 15 * MIB, "held beyond the floor while it goes out");
        // 64 KiB every 200 ms: 320 KiB/s, above the minimum rate; 51 s in all, longer
        // than SEND_TIMEOUT.
        let mut reply = vec![0u8; 16 + (16 << 20)];
        for piece in reply.chunks_mut(64 << 10) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            client.read_exact(piece).await.unwrap();
        }
        assert_eq!(reply[..4], proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(reply[4..8], [0; 4], "no error");
        settle().await;
        assert_eq!(controller.used(), 0);
        drop(client);
        task.await.unwrap();
    }
}
