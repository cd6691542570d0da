//! INQUIRY: standard data and the vital product data pages (SPC-4 §6.6, §7.8; SBC-3 §6.5).
//!
//! | page | what                                                                        |
//! |------|-----------------------------------------------------------------------------|
//! | 00h  | supported pages                                                             |
//! | 80h  | unit serial number                                                          |
//! | 83h  | NAA 6 designator, relative target port, target port group, target port name |
//! | B0h  | block limits (transfer, UNMAP, WRITE SAME, atomic and COMPARE AND WRITE)    |
//! | B1h  | block device characteristics (non-rotating; sanitize leaves blocks readable)|
//! | B2h  | logical block provisioning (thin, UNMAP and WRITE SAME unmap, LBPRZ)        |

use bytes::Bytes;

use crate::Nexus;
use crate::block::{MAX_COMPARE_AND_WRITE, MAX_UNMAP_BLOCKS, MAX_UNMAP_DESCRIPTORS};
use crate::lu::LogicalUnit;
use crate::sense::{Reply, Sense};

/// VPD pages, in the order page 00h lists them.
const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2];

/// Version descriptors: SAM-5, SPC-4, SBC-3.
const VERSIONS: [u16; 3] = [0x00A0, 0x0460, 0x04C0];

/// `text` as a T10 ASCII field of `len` bytes: printable characters, space padded.
fn ascii_field(text: &str, len: usize) -> Vec<u8> {
    let mut out: Vec<u8> =
        text.bytes().map(|b| if (0x20..0x7F).contains(&b) { b } else { b' ' }).take(len).collect();
    out.resize(len, b' ');
    out
}

/// Standard INQUIRY data for a LUN with no logical unit behind it (peripheral qualifier
/// 011b, device type 1Fh), or the header of a VPD page for it.
pub(crate) fn absent_lun(evpd: bool, page: u8) -> Bytes {
    if evpd {
        return Bytes::copy_from_slice(&[0x7F, page, 0, 0]);
    }
    let mut out = vec![0u8; 36];
    out[0] = 0x7F;
    out[2] = 0x06;
    out[3] = 0x02;
    out[4] = 31;
    Bytes::from(out)
}

/// Appends `value` big-endian.
fn put32(out: &mut [u8], at: usize, value: u32) {
    out[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

impl LogicalUnit {
    /// INQUIRY: standard data (EVPD=0) or VPD page `page`.
    pub(crate) fn inquiry(&self, nexus: &Nexus, evpd: bool, page: u8) -> Reply {
        if !evpd {
            return Ok(self.standard_inquiry());
        }
        let body = match page {
            0x00 => VPD_PAGES.to_vec(),
            0x80 => self.serial_number(),
            0x83 => self.device_identification(nexus),
            0xB0 => self.block_limits(),
            0xB1 => {
                let mut p = vec![0u8; 60];
                // Medium rotation rate 1: non-rotating (solid state).
                p[0..2].copy_from_slice(&1u16.to_be_bytes());
                // WABEREQ=01b, WACEREQ=01b: blocks read back after BLOCK or CRYPTO ERASE.
                p[3] = 0x50;
                p
            }
            // LBPU, LBPWS, LBPWS10; LBPRZ=001b (discarded blocks read as zeroes, the
            // BlockIo contract); provisioning type thin.
            0xB2 => vec![0x00, 0xE4, 0x02, 0x00],
            _ => return Err(Sense::invalid_cdb(2, None).into()),
        };
        let mut out = Vec::with_capacity(4 + body.len());
        out.extend_from_slice(&[0x00, page]);
        out.extend_from_slice(&u16::try_from(body.len()).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(&body);
        Ok(Bytes::from(out))
    }

    fn standard_inquiry(&self) -> Bytes {
        let id = &self.identity;
        let mut out = vec![0u8; 74];
        out[1] = if self.removable { 0x80 } else { 0 };
        // SPC-4; HISUP, response data format 2.
        out[2] = 0x06;
        out[3] = 0x12;
        out[4] = u8::try_from(out.len() - 5).unwrap_or(0);
        // TPGS=01b (implicit ALUA), 3PC (EXTENDED COPY).
        out[5] = 0x18;
        // MULTIP: reachable through more than one port.
        out[6] = 0x10;
        // CMDQUE.
        out[7] = 0x02;
        out[8..16].copy_from_slice(&ascii_field(&id.vendor, 8));
        out[16..32].copy_from_slice(&ascii_field(&id.product, 16));
        out[32..36].copy_from_slice(&ascii_field(&id.revision, 4));
        for (i, v) in VERSIONS.iter().enumerate() {
            out[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
        }
        Bytes::from(out)
    }

    fn serial_number(&self) -> Vec<u8> {
        let serial = self.identity.serial.trim();
        ascii_field(serial, serial.len().min(251))
    }

    fn device_identification(&self, nexus: &Nexus) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        // NAA (binary, logical unit).
        out.extend_from_slice(&[0x01, 0x03, 0x00, 0x10]);
        out.extend_from_slice(&self.identity.naa);
        // Relative target port (binary, target port).
        out.extend_from_slice(&[0x01, 0x14, 0x00, 0x04, 0x00, 0x00]);
        out.extend_from_slice(&nexus.relative_port.to_be_bytes());
        // Target port group (binary, target port).
        out.extend_from_slice(&[0x01, 0x15, 0x00, 0x04, 0x00, 0x00]);
        out.extend_from_slice(&self.identity.target_port_group.to_be_bytes());
        // SCSI name string of the target port (UTF-8, NUL terminated, padded to 4).
        let name = nexus.target_port.as_bytes();
        let padded = (name.len() + 1).div_ceil(4) * 4;
        if !name.is_empty() && padded <= 252 {
            out.extend_from_slice(&[0x03, 0x18, 0x00, u8::try_from(padded).unwrap_or(0)]);
            out.extend_from_slice(name);
            out.resize(out.len() + padded - name.len(), 0);
        }
        out
    }

    fn block_limits(&self) -> Vec<u8> {
        let mut p = vec![0u8; 60];
        // Transfers and unmaps go best in whole physical blocks, and in 4 KiB at least: 8
        // logical blocks on a 512e LU (or on a native 512-byte one), 1 on a 4Kn one.
        let granularity = u64::from(4096 / self.block_size).max(self.blocks_per_physical()).max(1);
        let per_4k = u16::try_from(granularity).unwrap_or(1);
        // WSNZ=0: WRITE SAME with zero blocks means "to the end of the LU".
        p[1] = MAX_COMPARE_AND_WRITE;
        p[2..4].copy_from_slice(&per_4k.to_be_bytes());
        put32(&mut p, 4, self.max_transfer_blocks());
        put32(&mut p, 12, self.max_transfer_blocks());
        put32(&mut p, 16, MAX_UNMAP_BLOCKS);
        put32(&mut p, 20, MAX_UNMAP_DESCRIPTORS);
        put32(&mut p, 24, u32::from(per_4k));
        // UGAVALID with UNMAP GRANULARITY ALIGNMENT 0: LBA 0 starts a granule.
        put32(&mut p, 28, 0x8000_0000);
        p[32..40].copy_from_slice(&self.max_write_same_blocks().to_be_bytes());
        put32(&mut p, 40, self.max_atomic_blocks());
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_fields_are_padded_and_cleaned() {
        assert_eq!(ascii_field("STRATA", 8), b"STRATA  ");
        assert_eq!(ascii_field("a\u{e9}b", 4), b"a  b");
        assert_eq!(ascii_field("0123456789", 4), b"0123");
    }

    #[test]
    fn absent_lun_says_no_device() {
        assert_eq!(absent_lun(false, 0)[0], 0x7F);
        assert_eq!(&absent_lun(true, 0x83)[..], &[0x7F, 0x83, 0, 0]);
    }
}
