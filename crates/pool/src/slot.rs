//! The metadata area: two slots written alternately, so a torn write of one never loses
//! the other.
//!
//! A new generation goes to the slot that does not hold the device's newest valid one, so
//! the last good copy is never overwritten; generations are never reused. A reader takes
//! the valid slot with the highest generation; if the newest write was torn, that is the
//! previous generation. Each slot:
//!
//! ```text
//!   0  magic "STRATAMD"    8  format version u32   12 reserved u32 (0)
//!  16  generation u64     24  payload length u64
//!  32  payload crc32c u32 36  reserved, zero [24]
//!  60  header crc32c u32 (of bytes 0..60)
//!  64  payload: the device's metadata as JSON (see `config::DeviceMetadata`)
//! ```

/// Bytes before the payload.
pub const SLOT_HEADER: usize = 64;
const MAGIC: &[u8; 8] = b"STRATAMD";
const VERSION: u32 = 1;

/// Why a slot is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    /// Never written (or not ours).
    #[error("Empty metadata slot")]
    Empty,
    /// Header checksum wrong: torn or corrupt.
    #[error("Metadata slot header is corrupt")]
    Header,
    /// Unknown format.
    #[error("Metadata slot format version {0} is not supported")]
    Version(u32),
    /// The payload does not fit the slot.
    #[error("Metadata slot claims a payload of {0} bytes, more than the slot holds")]
    Length(u64),
    /// Payload checksum wrong: torn write.
    #[error("Metadata slot payload is torn or corrupt")]
    Payload,
}

/// Encodes a slot, padded to `block_size`; `None` if it would not fit in `slot_size`.
pub fn encode(generation: u64, payload: &[u8], block_size: u64, slot_size: u64) -> Option<Vec<u8>> {
    let len = (SLOT_HEADER + payload.len()) as u64;
    if len > slot_size {
        return None;
    }
    let mut b = vec![0u8; usize::try_from(len.div_ceil(block_size) * block_size).ok()?];
    b[0..8].copy_from_slice(MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[16..24].copy_from_slice(&generation.to_le_bytes());
    b[24..32].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    b[32..36].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let header_crc = crc32c::crc32c(&b[0..60]);
    b[60..64].copy_from_slice(&header_crc.to_le_bytes());
    b[SLOT_HEADER..SLOT_HEADER + payload.len()].copy_from_slice(payload);
    Some(b)
}

/// Reads the header of a slot: `(generation, payload length)`. The caller then reads the
/// payload and checks it with [`decode`].
pub fn decode_header(raw: &[u8]) -> Result<(u64, u64), SlotError> {
    if raw.len() < SLOT_HEADER || &raw[0..8] != MAGIC {
        return Err(SlotError::Empty);
    }
    let stored = u32::from_le_bytes(raw[60..64].try_into().expect("4 bytes"));
    if crc32c::crc32c(&raw[0..60]) != stored {
        return Err(SlotError::Header);
    }
    let version = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(SlotError::Version(version));
    }
    let generation = u64::from_le_bytes(raw[16..24].try_into().expect("8 bytes"));
    let len = u64::from_le_bytes(raw[24..32].try_into().expect("8 bytes"));
    Ok((generation, len))
}

/// Decodes a whole slot read from the device: `(generation, payload)`.
pub fn decode(raw: &[u8]) -> Result<(u64, &[u8]), SlotError> {
    let (generation, len) = decode_header(raw)?;
    let end = usize::try_from(len)
        .ok()
        .and_then(|l| l.checked_add(SLOT_HEADER))
        .filter(|&end| end <= raw.len())
        .ok_or(SlotError::Length(len))?;
    let payload = &raw[SLOT_HEADER..end];
    let stored = u32::from_le_bytes(raw[32..36].try_into().expect("4 bytes"));
    if crc32c::crc32c(payload) != stored {
        return Err(SlotError::Payload);
    }
    Ok((generation, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let raw = encode(7, b"{\"hello\":1}", 512, 4096).unwrap();
        assert_eq!(raw.len(), 512);
        assert_eq!(decode(&raw).unwrap(), (7, &b"{\"hello\":1}"[..]));
    }

    #[test]
    fn a_payload_too_large_for_the_slot_is_refused() {
        assert!(encode(1, &[0u8; 5000], 512, 4096).is_none());
    }

    #[test]
    fn every_single_byte_corruption_is_detected() {
        let raw = encode(7, b"payload bytes", 512, 4096).unwrap();
        for at in 0..SLOT_HEADER + 13 {
            let mut bad = raw.clone();
            bad[at] ^= 0x5a;
            assert!(decode(&bad).is_err(), "byte {at} went unnoticed");
        }
    }

    #[test]
    fn a_torn_payload_is_detected() {
        let payload = vec![0xabu8; 3000];
        let raw = encode(2, &payload, 512, 8192).unwrap();
        let mut torn = raw.clone();
        torn[1024..].fill(0); // only the first two blocks landed
        assert_eq!(decode(&torn), Err(SlotError::Payload));
    }
}
