//! The NBD wire format: magic numbers, option and command codes, and the request and
//! reply layouts of the transmission phase. Everything big-endian.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// "NBDMAGIC": first word the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation, and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags the server sends.
pub mod handshake_flags {
    /// Fixed newstyle negotiation.
    pub const FIXED_NEWSTYLE: u16 = 1;
    /// The 124 zero bytes after NBD_OPT_EXPORT_NAME may be left out.
    pub const NO_ZEROES: u16 = 2;
}

/// Option codes (client to server).
pub mod opt {
    /// Old way to choose an export and end negotiation.
    pub const EXPORT_NAME: u32 = 1;
    /// End negotiation without an export.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission with it.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts for BLOCK_STATUS.
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types.
pub mod rep {
    /// Done.
    pub const ACK: u32 = 1;
    /// One export of a LIST.
    pub const SERVER: u32 = 2;
    /// One piece of export information.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    /// Option not supported.
    pub const ERR_UNSUP: u32 = ERR | 1;
    /// Refused by policy.
    pub const ERR_POLICY: u32 = ERR | 2;
    /// Malformed option.
    pub const ERR_INVALID: u32 = ERR | 3;
    /// Not possible on this platform.
    pub const ERR_PLATFORM: u32 = ERR | 4;
    /// TLS required first.
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    /// Server shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    /// Option data too large.
    pub const ERR_TOO_BIG: u32 = ERR | 9;
}

/// Information types of NBD_OPT_INFO and NBD_OPT_GO.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical name.
    pub const NAME: u16 = 1;
    /// Description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (per export).
pub mod tflag {
    /// Flags are present.
    pub const HAS_FLAGS: u16 = 1;
    /// Writes are refused.
    pub const READ_ONLY: u16 = 1 << 1;
    /// FLUSH is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// FUA is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// TRIM is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// WRITE_ZEROES is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// The DF flag is supported (reads come back in one chunk anyway).
    pub const SEND_DF: u16 = 1 << 7;
    /// Flush and FUA on one connection cover writes completed on every connection.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// FAST_ZERO is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command types.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim (discard).
    pub const TRIM: u16 = 4;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflag {
    /// Force unit access.
    pub const FUA: u16 = 1;
    /// WRITE_ZEROES must leave the range allocated.
    pub const NO_HOLE: u16 = 1 << 1;
    /// READ must come back in one chunk.
    pub const DF: u16 = 1 << 2;
    /// BLOCK_STATUS wants one descriptor.
    pub const REQ_ONE: u16 = 1 << 3;
    /// WRITE_ZEROES must fail rather than be slow.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Every flag this server understands.
    pub const KNOWN: u16 = FUA | NO_HOLE | DF | REQ_ONE | FAST_ZERO;
}

/// Error numbers sent in replies (the protocol's, which match Linux errno).
pub mod errno {
    /// Operation not permitted (write to a read-only export).
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space: a write past the end.
    pub const ENOSPC: u32 = 28;
    /// Request too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// Structured reply chunk types.
pub mod chunk {
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// Block status descriptors.
    pub const BLOCK_STATUS: u16 = 5;
    /// An error with a message.
    pub const ERROR: u16 = (1 << 15) + 1;
    /// Last chunk of a reply.
    pub const FLAG_DONE: u16 = 1;
}

/// Block status flags of the `base:allocation` context.
pub mod state {
    /// Not allocated.
    pub const HOLE: u32 = 1;
    /// Reads as zeroes.
    pub const ZERO: u32 = 2;
}

/// The one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its context id.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Size of a request header.
pub const REQUEST_HEADER: usize = 28;
/// Largest read or write payload; larger writes end the connection, larger reads get EINVAL.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// One transmission request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// The client's handle, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
    /// Write data.
    pub data: Bytes,
}

/// Input the server cannot go on from: the connection ends.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FramingError {
    /// The stream lost its framing.
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
    /// A write payload above [`MAX_PAYLOAD`]; reading it would let a client pin memory.
    #[error("write payload of {0} bytes is larger than {MAX_PAYLOAD}")]
    TooLarge(u32),
}

/// Takes one whole request off the front of `buf`, or none if more bytes are needed.
pub fn decode_request(buf: &mut BytesMut) -> Result<Option<Request>, FramingError> {
    if buf.len() < REQUEST_HEADER {
        return Ok(None);
    }
    let mut header = &buf[..REQUEST_HEADER];
    let magic = header.get_u32();
    if magic != REQUEST_MAGIC {
        return Err(FramingError::BadMagic(magic));
    }
    let flags = header.get_u16();
    let kind = header.get_u16();
    let cookie = header.get_u64();
    let offset = header.get_u64();
    let length = header.get_u32();
    let payload = if kind == cmd::WRITE { length } else { 0 };
    if payload > MAX_PAYLOAD {
        return Err(FramingError::TooLarge(payload));
    }
    let total = REQUEST_HEADER + payload as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    buf.advance(REQUEST_HEADER);
    let data = buf.split_to(payload as usize).freeze();
    Ok(Some(Request { flags, kind, cookie, offset, length, data }))
}

/// The payload length of a write whose header is at the front of `buf` but whose payload
/// has not all arrived, so the server can charge it before reading the rest.
pub fn incoming_payload(buf: &[u8]) -> Option<u32> {
    if buf.len() < REQUEST_HEADER {
        return None;
    }
    let kind = u16::from_be_bytes([buf[6], buf[7]]);
    let length = u32::from_be_bytes([buf[24], buf[25], buf[26], buf[27]]);
    (kind == cmd::WRITE && buf.len() < REQUEST_HEADER + length as usize).then_some(length)
}

/// Appends a simple reply header (the data of a read follows it).
pub fn simple_reply(out: &mut BytesMut, cookie: u64, error: u32) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

/// Appends a structured chunk header for a payload of `length` bytes.
pub fn chunk_header(out: &mut BytesMut, flags: u16, kind: u16, cookie: u64, length: u32) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(kind);
    out.put_u64(cookie);
    out.put_u32(length);
}

/// Appends a final structured error chunk with a message for the client's log.
pub fn error_chunk(out: &mut BytesMut, cookie: u64, error: u32, message: &str) {
    let message = &message.as_bytes()[..message.len().min(4096)];
    let length = 6 + message.len();
    chunk_header(out, chunk::FLAG_DONE, chunk::ERROR, cookie, u32::try_from(length).expect("short message"));
    out.put_u32(error);
    out.put_u16(u16::try_from(message.len()).expect("short message"));
    out.put_slice(message);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn header(kind: u16, length: u32) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u32(REQUEST_MAGIC);
        b.put_u16(cflag::FUA);
        b.put_u16(kind);
        b.put_u64(7);
        b.put_u64(4096);
        b.put_u32(length);
        b
    }

    #[test]
    fn write_waits_for_its_payload_then_takes_exactly_it() {
        let mut b = header(cmd::WRITE, 4);
        assert_eq!(decode_request(&mut b), Ok(None));
        b.put_slice(&[1, 2, 3, 4, 9]);
        let r = decode_request(&mut b).unwrap().unwrap();
        assert_eq!((r.kind, r.flags, r.cookie, r.offset, r.length), (cmd::WRITE, cflag::FUA, 7, 4096, 4));
        assert_eq!(&r.data[..], &[1, 2, 3, 4]);
        assert_eq!(&b[..], &[9], "the next request's bytes stay");
    }

    #[test]
    fn reads_carry_no_payload_and_bad_framing_is_refused() {
        let mut b = header(cmd::READ, MAX_PAYLOAD + 1);
        assert_eq!(decode_request(&mut b).unwrap().unwrap().data.len(), 0);
        assert_eq!(
            decode_request(&mut header(cmd::WRITE, MAX_PAYLOAD + 1)),
            Err(FramingError::TooLarge(MAX_PAYLOAD + 1))
        );
        let mut bad = header(cmd::READ, 0);
        bad[0] = 0;
        assert!(matches!(decode_request(&mut bad), Err(FramingError::BadMagic(_))));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut b = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode_request(&mut b) {}
        }
    }
}
