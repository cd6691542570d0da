//! iSCSI PDUs on the wire (RFC 7143 §11): a 48-byte basic header segment, additional
//! header segments, an optional CRC32C header digest, a data segment padded to four bytes
//! and an optional CRC32C data digest.
//!
//! ```text
//!  0       1       2       3       4       5..7        8..15   16..19  20..47
//!  |I|op   |F|flags|       |       |AHSlen |DataSegLen |LUN    |ITT    |opcode-specific
//!  [AHS ...][HeaderDigest][data ... pad][DataDigest]
//! ```
//!
//! Decoding works on a read buffer and never panics on any bytes: a PDU is returned only
//! once all of it has arrived, and its lengths are checked against what was negotiated.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Length of the basic header segment.
pub const BHS_LEN: usize = 48;
/// The reserved tag: "no task" (ITT) or "no transfer" (TTT).
pub const NO_TAG: u32 = 0xffff_ffff;

/// Opcodes (RFC 7143 §11.1.1).
pub mod op {
    /// NOP-Out (initiator ping or answer to a target ping).
    pub const NOP_OUT: u8 = 0x00;
    /// SCSI Command.
    pub const SCSI_COMMAND: u8 = 0x01;
    /// Task Management Function request.
    pub const TASK_MANAGEMENT: u8 = 0x02;
    /// Login request.
    pub const LOGIN: u8 = 0x03;
    /// Text request.
    pub const TEXT: u8 = 0x04;
    /// SCSI Data-Out.
    pub const DATA_OUT: u8 = 0x05;
    /// Logout request.
    pub const LOGOUT: u8 = 0x06;
    /// SNACK request (needs ErrorRecoveryLevel > 0).
    pub const SNACK: u8 = 0x10;
    /// NOP-In.
    pub const NOP_IN: u8 = 0x20;
    /// SCSI Response.
    pub const SCSI_RESPONSE: u8 = 0x21;
    /// Task Management Function response.
    pub const TASK_MANAGEMENT_RESPONSE: u8 = 0x22;
    /// Login response.
    pub const LOGIN_RESPONSE: u8 = 0x23;
    /// Text response.
    pub const TEXT_RESPONSE: u8 = 0x24;
    /// SCSI Data-In.
    pub const DATA_IN: u8 = 0x25;
    /// Logout response.
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    /// Ready To Transfer.
    pub const R2T: u8 = 0x31;
    /// Asynchronous message.
    pub const ASYNC: u8 = 0x32;
    /// Reject.
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (RFC 7143 §11.17.1).
pub mod reject {
    /// The data digest did not match.
    pub const DATA_DIGEST: u8 = 0x02;
    /// A protocol rule was broken.
    pub const PROTOCOL_ERROR: u8 = 0x04;
    /// The opcode is not supported.
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    /// A field of the PDU is invalid.
    pub const INVALID_PDU_FIELD: u8 = 0x09;
}

/// Flag bits of byte 1 shared by several PDUs.
pub mod flag {
    /// Final PDU of a sequence.
    pub const FINAL: u8 = 0x80;
}

/// Which digests a connection negotiated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digests {
    /// CRC32C after the header segments.
    pub header: bool,
    /// CRC32C after the padded data segment.
    pub data: bool,
}

/// One PDU: its basic header, additional headers and data segment (without padding).
#[derive(Clone, PartialEq, Eq)]
pub struct Pdu {
    /// The basic header segment.
    pub header: [u8; BHS_LEN],
    /// Additional header segments (extended CDB, bidirectional read length).
    pub ahs: Bytes,
    /// The data segment.
    pub data: Bytes,
}

impl std::fmt::Debug for Pdu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pdu")
            .field("opcode", &format_args!("{:#04x}", self.opcode()))
            .field("itt", &format_args!("{:#x}", self.itt()))
            .field("data", &self.data.len())
            .finish()
    }
}

impl Pdu {
    /// An empty PDU with `opcode`.
    pub fn new(opcode: u8) -> Self {
        let mut header = [0; BHS_LEN];
        header[0] = opcode;
        Self { header, ahs: Bytes::new(), data: Bytes::new() }
    }

    /// The opcode (without the immediate bit).
    pub fn opcode(&self) -> u8 {
        self.header[0] & 0x3f
    }

    /// Whether the initiator marked it for immediate delivery (no CmdSN ordering).
    pub fn immediate(&self) -> bool {
        self.header[0] & 0x40 != 0
    }

    /// Byte 1: the F bit and opcode-specific flags.
    pub fn flags(&self) -> u8 {
        self.header[1]
    }

    /// Whether the F (final) bit is set.
    pub fn is_final(&self) -> bool {
        self.header[1] & flag::FINAL != 0
    }

    /// The big-endian word at byte `at`.
    pub fn u32_at(&self, at: usize) -> u32 {
        u32::from_be_bytes([self.header[at], self.header[at + 1], self.header[at + 2], self.header[at + 3]])
    }

    /// Sets the big-endian word at byte `at`.
    pub fn set_u32(&mut self, at: usize, value: u32) {
        self.header[at..at + 4].copy_from_slice(&value.to_be_bytes());
    }

    /// The initiator task tag.
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }

    /// The eight LUN bytes.
    pub fn lun(&self) -> [u8; 8] {
        let mut lun = [0; 8];
        lun.copy_from_slice(&self.header[8..16]);
        lun
    }

    /// Length of the data segment the header announces.
    pub fn data_segment_length(&self) -> u32 {
        u32::from_be_bytes([0, self.header[5], self.header[6], self.header[7]])
    }
}

/// Why bytes from the initiator are not a PDU the connection can take.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The header digest does not match: nothing in the header can be trusted.
    #[error("header digest mismatch (sent {sent:#010x}, computed {computed:#010x})")]
    HeaderDigest {
        /// Digest on the wire.
        sent: u32,
        /// Digest of the bytes received.
        computed: u32,
    },
    /// The data digest does not match.
    #[error("data digest mismatch on a PDU with opcode {opcode:#04x}")]
    DataDigest {
        /// Opcode of the damaged PDU.
        opcode: u8,
        /// Its header, for the Reject.
        header: Box<[u8; BHS_LEN]>,
    },
    /// The data segment is longer than this side declared it can receive.
    #[error("data segment of {len} bytes exceeds MaxRecvDataSegmentLength {max}")]
    TooLong {
        /// Announced length.
        len: u32,
        /// Negotiated limit.
        max: u32,
        /// Its header, for the Reject.
        header: Box<[u8; BHS_LEN]>,
    },
}

/// Bytes a PDU occupies on the wire, given its header.
fn wire_len(header: &[u8], digests: Digests) -> (usize, usize, usize) {
    let ahs = usize::from(header[4]) * 4;
    let data = (usize::from(header[5]) << 16) | (usize::from(header[6]) << 8) | usize::from(header[7]);
    let head = BHS_LEN + ahs + if digests.header { 4 } else { 0 };
    let body = padded(data) + if digests.data && data > 0 { 4 } else { 0 };
    (head, body, data)
}

/// `len` rounded up to a multiple of four.
pub fn padded(len: usize) -> usize {
    len.div_ceil(4) * 4
}

/// Takes one whole PDU off the front of `buf`, or returns `None` until it has all arrived.
/// `max_data` is the data segment length this side declared (MaxRecvDataSegmentLength).
pub fn decode(buf: &mut BytesMut, digests: Digests, max_data: u32) -> Result<Option<Pdu>, DecodeError> {
    if buf.len() < BHS_LEN {
        return Ok(None);
    }
    let (head, body, data_len) = wire_len(&buf[..BHS_LEN], digests);
    if head > buf.len() {
        return Ok(None);
    }
    if digests.header {
        let sent = u32::from_le_bytes([buf[head - 4], buf[head - 3], buf[head - 2], buf[head - 1]]);
        let computed = crc32c::crc32c(&buf[..head - 4]);
        if sent != computed {
            return Err(DecodeError::HeaderDigest { sent, computed });
        }
    }
    let mut header = [0; BHS_LEN];
    header.copy_from_slice(&buf[..BHS_LEN]);
    if data_len > max_data as usize {
        let len = u32::try_from(data_len).unwrap_or(u32::MAX);
        return Err(DecodeError::TooLong { len, max: max_data, header: Box::new(header) });
    }
    if head + body > buf.len() {
        buf.reserve(head + body - buf.len());
        return Ok(None);
    }
    let mut pdu = buf.split_to(head + body).freeze();
    let ahs = pdu.slice(BHS_LEN..BHS_LEN + usize::from(header[4]) * 4);
    pdu.advance(head);
    if digests.data && data_len > 0 {
        let padded = padded(data_len);
        let sent = u32::from_le_bytes([pdu[padded], pdu[padded + 1], pdu[padded + 2], pdu[padded + 3]]);
        if sent != crc32c::crc32c(&pdu[..padded]) {
            return Err(DecodeError::DataDigest { opcode: header[0] & 0x3f, header: Box::new(header) });
        }
    }
    pdu.truncate(data_len);
    Ok(Some(Pdu { header, ahs, data: pdu }))
}

/// Appends the header of `pdu` (with its data segment length set to `data_len`) and its
/// header digest to `out`; the caller sends the data with [`encode_data`].
pub fn encode_header(out: &mut BytesMut, pdu: &Pdu, data_len: usize, digests: Digests) {
    let mut header = pdu.header;
    header[4] = 0;
    let len = u32::try_from(data_len).unwrap_or(u32::MAX).min(0x00ff_ffff);
    header[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
    out.put_slice(&header);
    if digests.header {
        out.put_u32_le(crc32c::crc32c(&header));
    }
}

/// Padding and data digest that follow `data` on the wire.
pub fn data_trailer(data: &[u8], digests: Digests) -> ([u8; 8], usize) {
    let pad = padded(data.len()) - data.len();
    let mut trailer = [0; 8];
    let mut len = pad;
    if digests.data && !data.is_empty() {
        let crc = crc32c::crc32c_append(crc32c::crc32c(data), &trailer[..pad]);
        trailer[pad..pad + 4].copy_from_slice(&crc.to_le_bytes());
        len += 4;
    }
    (trailer, len)
}

/// Appends `data`, its padding and its digest to `out`.
pub fn encode_data(out: &mut BytesMut, data: &[u8], digests: Digests) {
    out.put_slice(data);
    let (trailer, len) = data_trailer(data, digests);
    out.put_slice(&trailer[..len]);
}

/// Appends a whole PDU to `out`.
pub fn encode(out: &mut BytesMut, pdu: &Pdu, digests: Digests) {
    encode_header(out, pdu, pdu.data.len(), digests);
    encode_data(out, &pdu.data, digests);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sample(data: &[u8]) -> Pdu {
        let mut pdu = Pdu::new(op::SCSI_COMMAND);
        pdu.header[1] = flag::FINAL;
        pdu.set_u32(16, 0x1234);
        pdu.data = Bytes::copy_from_slice(data);
        pdu
    }

    #[test]
    fn round_trips_with_and_without_digests() {
        for digests in [Digests::default(), Digests { header: true, data: true }] {
            for len in [0, 1, 3, 4, 5, 4096] {
                let pdu = sample(&vec![0xa5; len]);
                let mut wire = BytesMut::new();
                encode(&mut wire, &pdu, digests);
                assert_eq!(wire.len() % 4, 0);
                let mut partial = BytesMut::from(&wire[..wire.len() - 1]);
                assert_eq!(decode(&mut partial, digests, 8192).unwrap(), None, "incomplete PDU waits");
                let decoded = decode(&mut wire, digests, 8192).unwrap().unwrap();
                assert_eq!(decoded.data, pdu.data);
                assert_eq!(decoded.itt(), 0x1234);
                assert_eq!(decoded.data_segment_length() as usize, len);
                assert!(wire.is_empty());
            }
        }
    }

    #[test]
    fn digest_mismatches_and_long_segments_are_errors() {
        let digests = Digests { header: true, data: true };
        let mut wire = BytesMut::new();
        encode(&mut wire, &sample(b"hello"), digests);
        let mut bad_header = wire.clone();
        bad_header[20] ^= 1;
        assert!(matches!(decode(&mut bad_header, digests, 8192), Err(DecodeError::HeaderDigest { .. })));
        let mut bad_data = wire.clone();
        bad_data[BHS_LEN + 4] ^= 1;
        assert!(matches!(decode(&mut bad_data, digests, 8192), Err(DecodeError::DataDigest { .. })));
        assert!(matches!(decode(&mut wire, digests, 4), Err(DecodeError::TooLong { len: 5, max: 4, .. })));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400), h: bool, d: bool) {
            let mut buf = BytesMut::from(&bytes[..]);
            let digests = Digests { header: h, data: d };
            while let Ok(Some(_)) = decode(&mut buf, digests, 256) {}
        }
    }
}
