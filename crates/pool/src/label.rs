//! The device label: who a device belongs to and where its metadata area is.
//!
//! Two copies, one in the first 4 KiB of the device and one in the last 4 KiB (of the size
//! recorded at claim time), so that neither a stray write at the start of a disk nor a
//! truncated copy of it loses both. Each copy is a fixed little-endian record:
//!
//! ```text
//!   0  magic "STRATALB"       8  format version u32    12 header length u32 (128)
//!  16  device uuid [16]      32  pool uuid [16]
//!  48  fencing epoch u64     56  label generation u64
//!  64  device size u64       72  block size u32        76  copy index u32 (0 front, 1 back)
//!  80  metadata offset u64   88  metadata slot size u64
//!  96  data offset u64      104  data size u64        112 reserved, zero [12]
//! 124  crc32c of the whole 4 KiB block with this field zeroed
//! ```
//! The rest of the block is zero, and covered by the checksum too: any damaged byte of a
//! copy makes it invalid.

use uuid::Uuid;

/// Bytes a label copy occupies on the device.
pub const LABEL_SIZE: u64 = LABEL_BYTES as u64;
const LABEL_BYTES: usize = 4096;
/// The format this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"STRATALB";
const HEADER_LEN: usize = 128;
const HEADER_LEN_FIELD: u32 = 128;
/// Largest metadata slot: bounds what a corrupt label can make a reader allocate.
pub const MAX_SLOT_SIZE: u64 = 256 << 20;
/// Largest block size a label supports (the label must fill whole blocks).
pub const MAX_BLOCK_SIZE: u32 = 4096;
const CRC_AT: usize = 124;

/// One decoded label copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    /// The device's identity.
    pub device_id: Uuid,
    /// The pool the device belongs to.
    pub pool_id: Uuid,
    /// Fencing epoch of the controller that owns the device.
    pub fencing_epoch: u64,
    /// Bumped each time the label is rewritten.
    pub generation: u64,
    /// Device size when the label was written.
    pub device_size: u64,
    /// Device block size.
    pub block_size: u32,
    /// Where the metadata area starts.
    pub metadata_offset: u64,
    /// Size of each of the two metadata slots.
    pub slot_size: u64,
    /// Where allocatable space starts.
    pub data_offset: u64,
    /// Bytes of allocatable space.
    pub data_size: u64,
}

/// Why a label copy is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// No Strata magic: the device is blank or belongs to something else.
    #[error("No Strata label")]
    NoMagic,
    /// The checksum does not match: the copy is corrupt or torn.
    #[error("Label checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// CRC in the copy.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
    /// Written by a format this code does not know.
    #[error("Label format version {0} is not supported (this build reads version {FORMAT_VERSION})")]
    Version(u32),
    /// Fields contradict each other.
    #[error("Label is inconsistent: {0}")]
    Inconsistent(String),
}

impl Label {
    /// Where the back copy lives.
    pub fn back_offset(&self) -> u64 {
        back_offset(self.device_size)
    }

    /// Encodes copy `copy` (0 front, 1 back) as a full 4 KiB block.
    pub fn encode(&self, copy: u32) -> Vec<u8> {
        let mut b = vec![0u8; LABEL_BYTES];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&HEADER_LEN_FIELD.to_le_bytes());
        b[16..32].copy_from_slice(self.device_id.as_bytes());
        b[32..48].copy_from_slice(self.pool_id.as_bytes());
        b[48..56].copy_from_slice(&self.fencing_epoch.to_le_bytes());
        b[56..64].copy_from_slice(&self.generation.to_le_bytes());
        b[64..72].copy_from_slice(&self.device_size.to_le_bytes());
        b[72..76].copy_from_slice(&self.block_size.to_le_bytes());
        b[76..80].copy_from_slice(&copy.to_le_bytes());
        b[80..88].copy_from_slice(&self.metadata_offset.to_le_bytes());
        b[88..96].copy_from_slice(&self.slot_size.to_le_bytes());
        b[96..104].copy_from_slice(&self.data_offset.to_le_bytes());
        b[104..112].copy_from_slice(&self.data_size.to_le_bytes());
        let crc = checksum(&b);
        b[CRC_AT..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a copy; any byte slice is accepted and judged.
    pub fn decode(raw: &[u8]) -> Result<Label, LabelError> {
        if raw.len() != LABEL_BYTES || &raw[0..8] != MAGIC {
            return Err(LabelError::NoMagic);
        }
        let u32_at = |at: usize| u32::from_le_bytes(raw[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(raw[at..at + 8].try_into().expect("8 bytes"));
        let uuid_at = |at: usize| Uuid::from_bytes(raw[at..at + 16].try_into().expect("16 bytes"));
        let stored = u32_at(CRC_AT);
        let computed = checksum(raw);
        if stored != computed {
            return Err(LabelError::Checksum { stored, computed });
        }
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(LabelError::Version(version));
        }
        let label = Label {
            device_id: uuid_at(16),
            pool_id: uuid_at(32),
            fencing_epoch: u64_at(48),
            generation: u64_at(56),
            device_size: u64_at(64),
            block_size: u32_at(72),
            metadata_offset: u64_at(80),
            slot_size: u64_at(88),
            data_offset: u64_at(96),
            data_size: u64_at(104),
        };
        label.check()?;
        Ok(label)
    }

    /// Checks that the areas the label names fit together and inside the device.
    fn check(&self) -> Result<(), LabelError> {
        let bad = |why: &str| Err(LabelError::Inconsistent(why.to_string()));
        let bs = u64::from(self.block_size);
        if !self.block_size.is_power_of_two() || !(512..=MAX_BLOCK_SIZE).contains(&self.block_size) {
            return bad("block size is not a power of two between 512 and 4096");
        }
        if self.metadata_offset < LABEL_SIZE
            || self.slot_size == 0
            || self.slot_size > MAX_SLOT_SIZE
            || !self.slot_size.is_multiple_of(bs)
        {
            return bad("metadata area overlaps the label or is not block-aligned");
        }
        let metadata_end = self.slot_size.checked_mul(2).and_then(|s| s.checked_add(self.metadata_offset));
        let data_end = self.data_offset.checked_add(self.data_size);
        match (metadata_end, data_end) {
            (Some(m), Some(d)) if m <= self.data_offset && d <= back_offset(self.device_size) => Ok(()),
            _ => bad("metadata or data area reaches past the back label"),
        }
    }
}

/// CRC32C of a label block with its CRC field taken as zero.
fn checksum(block: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&block[..CRC_AT]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &block[HEADER_LEN..])
}

/// Offset of the back copy on a device of `device_size` bytes.
pub fn back_offset(device_size: u64) -> u64 {
    (device_size / LABEL_SIZE).saturating_sub(1) * LABEL_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Label {
        Label {
            device_id: Uuid::from_u128(0x1111),
            pool_id: Uuid::from_u128(0x2222),
            fencing_epoch: 3,
            generation: 4,
            device_size: 64 << 20,
            block_size: 4096,
            metadata_offset: 4096,
            slot_size: 1 << 20,
            data_offset: 4 << 20,
            data_size: 56 << 20,
        }
    }

    #[test]
    fn round_trip() {
        let label = sample();
        for copy in [0, 1] {
            assert_eq!(Label::decode(&label.encode(copy)).unwrap(), label);
        }
    }

    #[test]
    fn every_single_byte_corruption_is_detected() {
        let raw = sample().encode(0);
        for at in 0..LABEL_BYTES {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = raw.clone();
                bad[at] ^= flip;
                assert!(Label::decode(&bad).is_err(), "byte {at} ^ {flip:#x} went unnoticed");
            }
        }
    }

    #[test]
    fn blank_and_foreign_blocks_have_no_label() {
        assert_eq!(Label::decode(&[0u8; 4096]), Err(LabelError::NoMagic));
        assert_eq!(Label::decode(b"short"), Err(LabelError::NoMagic));
    }

    #[test]
    fn a_label_pointing_outside_the_device_is_refused() {
        let mut label = sample();
        label.data_size = 1 << 40;
        assert!(matches!(Label::decode(&label.encode(0)), Err(LabelError::Inconsistent(_))));
    }
}
