//! Fixed newstyle negotiation: the server greets, the client sends options until one of
//! them (GO or EXPORT_NAME) picks an export and starts transmission.
//!
//! Reads only the bytes each option declares, with no read-ahead, so a request the client
//! pipelines right after NBD_OPT_GO is left on the socket for the transmission phase.

use std::net::IpAddr;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::proto::{self, handshake_flags, info, opt, rep, tflag};
use crate::{Export, Exports};

/// Option data larger than this is refused with ERR_TOO_BIG.
const MAX_OPTION: u32 = 64 << 10;
/// Option data larger than this ends the connection instead of being read and dropped.
const MAX_DISCARD: u32 = 16 << 20;

/// What negotiation settled.
pub(crate) struct Negotiated {
    /// The export chosen.
    pub export: Export,
    /// Structured replies were agreed.
    pub structured: bool,
    /// `base:allocation` was selected for BLOCK_STATUS.
    pub block_status: bool,
}

/// Why negotiation ended without an export.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    /// Socket error or the client went away.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The client broke the protocol; the connection is dropped.
    #[error("{0}")]
    Protocol(String),
    /// The client ended negotiation (ABORT, or EXPORT_NAME of an unknown export).
    #[error("client ended negotiation")]
    Ended,
}

/// The transmission flags of `export`.
pub(crate) fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let mut flags = tflag::HAS_FLAGS
        | tflag::SEND_FLUSH
        | tflag::SEND_FUA
        | tflag::SEND_TRIM
        | tflag::SEND_WRITE_ZEROES
        | tflag::SEND_FAST_ZERO
        // Flush reaches every device of the volume, whichever connection wrote.
        | tflag::CAN_MULTI_CONN;
    if structured {
        // Reads always come back in one chunk.
        flags |= tflag::SEND_DF;
    }
    if export.read_only {
        flags |= tflag::READ_ONLY;
    }
    flags
}

/// Runs negotiation with a client at `client`.
pub(crate) async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    client: IpAddr,
    exports: &dyn Exports,
) -> Result<Negotiated, HandshakeError> {
    let mut greeting = BytesMut::with_capacity(18);
    greeting.put_u64(proto::NBDMAGIC);
    greeting.put_u64(proto::IHAVEOPT);
    greeting.put_u16(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES);
    stream.write_all(&greeting).await?;
    let client_flags = stream.read_u32().await?;
    let known = u32::from(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES);
    if client_flags & !known != 0 {
        return Err(HandshakeError::Protocol(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & u32::from(handshake_flags::NO_ZEROES) != 0;
    let mut session = Session { structured: false, block_status: false, client, exports };
    loop {
        let magic = stream.read_u64().await?;
        if magic != proto::IHAVEOPT {
            return Err(HandshakeError::Protocol(format!("bad option magic {magic:#x}")));
        }
        let option = stream.read_u32().await?;
        let length = stream.read_u32().await?;
        if length > MAX_OPTION {
            if length > MAX_DISCARD {
                return Err(HandshakeError::Protocol(format!("option of {length} bytes")));
            }
            tokio::io::copy(&mut (&mut *stream).take(u64::from(length)), &mut tokio::io::sink()).await?;
            reply_error(stream, option, rep::ERR_TOO_BIG, "option data too large").await?;
            continue;
        }
        let mut data = vec![0; length as usize];
        stream.read_exact(&mut data).await?;
        let data = Bytes::from(data);
        match option {
            opt::EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                let Some(export) = exports.lookup(&name, client) else {
                    // The old option has no way to say no but hanging up.
                    tracing::info!(%client, export = %name, "unknown export requested");
                    return Err(HandshakeError::Ended);
                };
                let mut out = BytesMut::new();
                out.put_u64(export.device.geometry().size_bytes);
                out.put_u16(transmission_flags(&export, session.structured));
                if !no_zeroes {
                    out.put_bytes(0, 124);
                }
                stream.write_all(&out).await?;
                return Ok(session.into_negotiated(export));
            }
            opt::ABORT => {
                // The client may hang up before reading this; that is fine.
                let _ = reply(stream, option, rep::ACK, &[]).await;
                return Err(HandshakeError::Ended);
            }
            opt::GO | opt::INFO => {
                if let Some(export) = session.info(stream, option, data).await?
                    && option == opt::GO
                {
                    return Ok(session.into_negotiated(export));
                }
            }
            opt::LIST => {
                if !data.is_empty() {
                    reply_error(stream, option, rep::ERR_INVALID, "LIST takes no data").await?;
                    continue;
                }
                for export in exports.list(client) {
                    let mut body = BytesMut::new();
                    body.put_u32(len32(export.name.len()));
                    body.put_slice(export.name.as_bytes());
                    body.put_slice(export.description.as_bytes());
                    reply(stream, option, rep::SERVER, &body).await?;
                }
                reply(stream, option, rep::ACK, &[]).await?;
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply_error(stream, option, rep::ERR_INVALID, "STRUCTURED_REPLY takes no data").await?;
                } else {
                    session.structured = true;
                    reply(stream, option, rep::ACK, &[]).await?;
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                session.meta_context(stream, option, data).await?
            }
            opt::STARTTLS => reply_error(stream, option, rep::ERR_UNSUP, "TLS is not offered").await?,
            _ => reply_error(stream, option, rep::ERR_UNSUP, "option not supported").await?,
        }
    }
}

struct Session<'a> {
    structured: bool,
    block_status: bool,
    client: IpAddr,
    exports: &'a dyn Exports,
}

impl Session<'_> {
    fn into_negotiated(self, export: Export) -> Negotiated {
        Negotiated { export, structured: self.structured, block_status: self.block_status && self.structured }
    }

    /// Answers INFO or GO; returns the export if it exists and the client may use it.
    async fn info<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        option: u32,
        mut data: Bytes,
    ) -> Result<Option<Export>, HandshakeError> {
        let Some((name, requests)) = parse_info(&mut data) else {
            reply_error(stream, option, rep::ERR_INVALID, "malformed INFO/GO request").await?;
            return Ok(None);
        };
        let Some(export) = self.exports.lookup(&name, self.client) else {
            reply_error(stream, option, rep::ERR_UNKNOWN, &format!("no export named '{name}'")).await?;
            return Ok(None);
        };
        let geometry = export.device.geometry();
        let mut body = BytesMut::new();
        body.put_u16(info::EXPORT);
        body.put_u64(geometry.size_bytes);
        body.put_u16(transmission_flags(&export, self.structured));
        reply(stream, option, rep::INFO, &body).await?;
        // Block sizes are always sent: requests must be aligned to the volume's block.
        body.clear();
        body.put_u16(info::BLOCK_SIZE);
        body.put_u32(geometry.block_size);
        body.put_u32(geometry.block_size.max(4096));
        body.put_u32(proto::MAX_PAYLOAD);
        reply(stream, option, rep::INFO, &body).await?;
        if requests.contains(&info::NAME) {
            body.clear();
            body.put_u16(info::NAME);
            body.put_slice(export.name.as_bytes());
            reply(stream, option, rep::INFO, &body).await?;
        }
        if requests.contains(&info::DESCRIPTION) && !export.description.is_empty() {
            body.clear();
            body.put_u16(info::DESCRIPTION);
            body.put_slice(export.description.as_bytes());
            reply(stream, option, rep::INFO, &body).await?;
        }
        reply(stream, option, rep::ACK, &[]).await?;
        Ok(Some(export))
    }

    /// Answers LIST_META_CONTEXT and SET_META_CONTEXT; only `base:allocation` exists.
    async fn meta_context<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        option: u32,
        mut data: Bytes,
    ) -> Result<(), HandshakeError> {
        let set = option == opt::SET_META_CONTEXT;
        if set && !self.structured {
            return reply_error(stream, option, rep::ERR_INVALID, "negotiate STRUCTURED_REPLY first").await;
        }
        let Some((name, queries)) = parse_meta(&mut data) else {
            return reply_error(stream, option, rep::ERR_INVALID, "malformed meta context request").await;
        };
        if self.exports.lookup(&name, self.client).is_none() {
            return reply_error(stream, option, rep::ERR_UNKNOWN, &format!("no export named '{name}'")).await;
        }
        let matches = |q: &str| q == proto::BASE_ALLOCATION || (!set && q == "base:");
        let chosen = if !set && queries.is_empty() { true } else { queries.iter().any(|q| matches(q)) };
        if set {
            self.block_status = chosen;
        }
        if chosen {
            let mut body = BytesMut::new();
            body.put_u32(proto::BASE_ALLOCATION_ID);
            body.put_slice(proto::BASE_ALLOCATION.as_bytes());
            reply(stream, option, rep::META_CONTEXT, &body).await?;
        }
        Ok(reply(stream, option, rep::ACK, &[]).await?)
    }
}

fn len32(n: usize) -> u32 {
    u32::try_from(n).expect("lengths here are bounded by MAX_OPTION")
}

/// Reads a u32-length-prefixed UTF-8 string.
fn take_string(data: &mut Bytes) -> Option<String> {
    if data.remaining() < 4 {
        return None;
    }
    let n = data.get_u32() as usize;
    if data.remaining() < n {
        return None;
    }
    String::from_utf8(data.split_to(n).to_vec()).ok()
}

/// Export name and requested information types of INFO/GO.
pub(crate) fn parse_info(data: &mut Bytes) -> Option<(String, Vec<u16>)> {
    let name = take_string(data)?;
    if data.remaining() < 2 {
        return None;
    }
    let n = usize::from(data.get_u16());
    if data.remaining() != 2 * n {
        return None;
    }
    Some((name, (0..n).map(|_| data.get_u16()).collect()))
}

/// Export name and queries of a meta context option.
pub(crate) fn parse_meta(data: &mut Bytes) -> Option<(String, Vec<String>)> {
    let name = take_string(data)?;
    if data.remaining() < 4 {
        return None;
    }
    let n = data.get_u32();
    let mut queries = Vec::new();
    for _ in 0..n {
        queries.push(take_string(data)?);
    }
    data.is_empty().then_some((name, queries))
}

async fn reply<S: AsyncWrite + Unpin>(
    stream: &mut S,
    option: u32,
    kind: u32,
    body: &[u8],
) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(20 + body.len());
    out.put_u64(proto::REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(kind);
    out.put_u32(len32(body.len()));
    out.put_slice(body);
    stream.write_all(&out).await
}

async fn reply_error<S: AsyncWrite + Unpin>(
    stream: &mut S,
    option: u32,
    kind: u32,
    message: &str,
) -> Result<(), HandshakeError> {
    Ok(reply(stream, option, kind, message.as_bytes()).await?)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn info_requests_must_match_their_declared_count() {
        let mut good = BytesMut::new();
        good.put_u32(4);
        good.put_slice(b"demo");
        good.put_u16(2);
        good.put_u16(info::NAME);
        good.put_u16(info::BLOCK_SIZE);
        assert_eq!(parse_info(&mut good.clone().freeze()), Some(("demo".into(), vec![1, 3])));
        good.put_u8(0);
        assert_eq!(parse_info(&mut good.freeze()), None);
    }

    proptest! {
        #[test]
        fn option_parsers_take_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_info(&mut Bytes::from(bytes.clone()));
            let _ = parse_meta(&mut Bytes::from(bytes));
        }
    }
}
