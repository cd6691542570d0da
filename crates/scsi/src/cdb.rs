//! CDB decoding: every supported command's fields, read with the length checked first.
//!
//! [`parse`] turns the bytes into a [`Action`] or the sense data that rejects them, and
//! never panics: a CDB shorter than its opcode needs is INVALID FIELD IN CDB, an unknown
//! opcode is INVALID COMMAND OPERATION CODE, a reserved value is INVALID FIELD IN CDB with a
//! field pointer. Execution then works on typed fields only.

use crate::sense::Sense;

/// Operation codes this crate knows.
pub(crate) mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0A;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1A;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const PREVENT_ALLOW: u8 = 0x1E;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const WRITE_VERIFY_10: u8 = 0x2E;
    pub const VERIFY_10: u8 = 0x2F;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const SYNC_CACHE_10: u8 = 0x35;
    pub const READ_DEFECT_DATA_10: u8 = 0x37;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const SANITIZE: u8 = 0x48;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const RESERVE_10: u8 = 0x56;
    pub const RELEASE_10: u8 = 0x57;
    pub const MODE_SENSE_10: u8 = 0x5A;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5E;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5F;
    pub const EXTENDED_COPY: u8 = 0x83;
    pub const RECEIVE_COPY_RESULTS: u8 = 0x84;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8A;
    pub const ORWRITE_16: u8 = 0x8B;
    pub const WRITE_VERIFY_16: u8 = 0x8E;
    pub const VERIFY_16: u8 = 0x8F;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNC_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const WRITE_ATOMIC_16: u8 = 0x9C;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    pub const REPORT_LUNS: u8 = 0xA0;
    pub const MAINTENANCE_IN: u8 = 0xA3;
    pub const READ_12: u8 = 0xA8;
    pub const WRITE_12: u8 = 0xAA;
    pub const WRITE_VERIFY_12: u8 = 0xAE;
    pub const VERIFY_12: u8 = 0xAF;
    pub const READ_DEFECT_DATA_12: u8 = 0xB7;
}

/// Service actions of SERVICE ACTION IN(16) and MAINTENANCE IN.
pub(crate) mod sa {
    pub const READ_CAPACITY_16: u8 = 0x10;
    pub const GET_LBA_STATUS: u8 = 0x12;
    pub const REPORT_TARGET_PORT_GROUPS: u8 = 0x0A;
    pub const REPORT_SUPPORTED_OPCODES: u8 = 0x0C;
}

/// The common fields of a command that moves logical blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Io {
    pub lba: u64,
    pub blocks: u32,
    pub fua: bool,
    /// RDPROTECT / WRPROTECT / VRPROTECT / ORPROTECT: protection information is not
    /// implemented, so anything but 0 is refused.
    pub protect: u8,
}

/// A decoded CDB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    TestUnitReady,
    RequestSense { descriptor: bool },
    Inquiry { evpd: bool, page: u8 },
    ModeSense { ten: bool, dbd: bool, llbaa: bool, pc: u8, page: u8, subpage: u8 },
    ModeSelect { ten: bool, sp: bool, length: u32 },
    ReadCapacity10,
    ReadCapacity16,
    Read(Io),
    Write(Io),
    WriteVerify { io: Io, bytchk: u8 },
    Verify { io: Io, bytchk: u8 },
    OrWrite(Io),
    WriteAtomic { io: Io, boundary: u16 },
    CompareAndWrite(Io),
    WriteSame { io: Io, unmap: bool, anchor: bool, ndob: bool, sixteen: bool },
    Unmap { anchor: bool, length: u32 },
    PreFetch { lba: u64, blocks: u32 },
    SyncCache { lba: u64, blocks: u32 },
    GetLbaStatus { lba: u64 },
    ReportLuns { select: u8 },
    ReportSupportedOpcodes { rctd: bool, options: u8, opcode: u8, sa: u16 },
    ReportTargetPortGroups { extended: bool },
    PrIn { sa: u8 },
    PrOut { sa: u8, scope: u8, kind: u8, length: u32 },
    Reserve,
    Release,
    StartStop { power: u8, no_flush: bool, loej: bool, start: bool },
    PreventAllow { prevent: bool },
    Sanitize { immed: bool, ause: bool, sa: u8, length: u16 },
    ExtendedCopy { length: u32 },
    ReceiveCopyResults { sa: u8, list_id: u8 },
    ReadDefectData { twelve: bool, flags: u8 },
}

/// A decoded CDB: what the command is and how much data it moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cdb {
    pub(crate) opcode: u8,
    pub(crate) request: Action,
    /// The CDB's ALLOCATION LENGTH: data-in is cut to it.
    pub(crate) allocation: Option<u32>,
}

impl Cdb {
    /// The operation code.
    pub fn opcode(&self) -> u8 {
        self.opcode
    }

    /// Bytes of data-out the CDB asks for on a LU with `block_size`-byte blocks, so the
    /// transport can report write residuals.
    pub fn data_out_length(&self, block_size: u32) -> u64 {
        let bs = u64::from(block_size);
        let blocks = |io: &Io| u64::from(io.blocks) * bs;
        match &self.request {
            Action::Write(io) | Action::OrWrite(io) | Action::WriteAtomic { io, .. } => blocks(io),
            Action::WriteVerify { io, .. } => blocks(io),
            Action::Verify { io, bytchk: 1 } => blocks(io),
            Action::Verify { io, bytchk: 3 } if io.blocks > 0 => bs,
            Action::CompareAndWrite(io) => 2 * blocks(io),
            Action::WriteSame { ndob: false, .. } => bs,
            Action::Unmap { length, .. } | Action::ExtendedCopy { length } => u64::from(*length),
            Action::ModeSelect { length, .. } | Action::PrOut { length, .. } => u64::from(*length),
            Action::Sanitize { length, .. } => u64::from(*length),
            _ => 0,
        }
    }

    /// Bytes of data-in the command produces at most on a LU with `block_size`-byte
    /// blocks (0 where it has none), so the transport can charge its buffer before it
    /// runs: a read's blocks (none past MAXIMUM TRANSFER LENGTH, which is refused), and
    /// parameter data up to its ALLOCATION LENGTH and at most 64 KiB.
    pub fn data_in_length(&self, block_size: u32) -> u64 {
        match &self.request {
            Action::Read(io) => {
                let len = u64::from(io.blocks) * u64::from(block_size);
                if len > crate::block::MAX_TRANSFER_BYTES { 0 } else { len }
            }
            _ => self.allocation.map_or(0, |a| u64::from(a).min(PARAMETER_DATA_LIMIT)),
        }
    }
}

/// Most data-in [`Cdb::data_in_length`] counts for a command that answers with parameter
/// data (INQUIRY, MODE SENSE, REPORT LUNS, ...): its ALLOCATION LENGTH may say 4 GiB, but
/// what it produces here is a few KiB (REPORT LUNS grows by 8 bytes a LUN).
pub(crate) const PARAMETER_DATA_LIMIT: u64 = 64 << 10;

/// Field access with the CDB length already checked.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn b(&self, i: usize) -> u8 {
        self.0[i]
    }
    fn be16(&self, i: usize) -> u16 {
        u16::from_be_bytes([self.0[i], self.0[i + 1]])
    }
    fn be32(&self, i: usize) -> u32 {
        u32::from_be_bytes([self.0[i], self.0[i + 1], self.0[i + 2], self.0[i + 3]])
    }
    fn be64(&self, i: usize) -> u64 {
        (u64::from(self.be32(i)) << 32) | u64::from(self.be32(i + 4))
    }
}

/// The CDB length each supported opcode needs (SPC-4 §4.2.5.1 groups, plus the 16-byte
/// opcodes of group 4 and the 12-byte ones of group 5).
pub(crate) fn cdb_length(opcode: u8) -> usize {
    match opcode >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 0,
    }
}

/// Decodes `cdb`. Bytes past the opcode's length are ignored.
pub fn parse(cdb: &[u8]) -> Result<Cdb, Sense> {
    let Some(&opcode) = cdb.first() else { return Err(Sense::invalid_cdb(0, None)) };
    let len = cdb_length(opcode);
    if len == 0 || !is_supported(opcode) {
        return Err(Sense::invalid_opcode());
    }
    if cdb.len() < len {
        return Err(Sense::invalid_cdb(cdb.len().saturating_sub(1), None));
    }
    let f = Fields(&cdb[..len]);
    // NACA: ACA is not supported.
    if f.b(len - 1) & 0x04 != 0 {
        return Err(Sense::invalid_cdb(len - 1, Some(2)));
    }
    let (request, allocation) = decode(opcode, &f)?;
    Ok(Cdb { opcode, request, allocation })
}

fn is_supported(opcode: u8) -> bool {
    use op::*;
    matches!(
        opcode,
        TEST_UNIT_READY
            | REQUEST_SENSE
            | READ_6
            | WRITE_6
            | INQUIRY
            | MODE_SELECT_6
            | RESERVE_6
            | RELEASE_6
            | MODE_SENSE_6
            | START_STOP_UNIT
            | PREVENT_ALLOW
            | READ_CAPACITY_10
            | READ_10
            | WRITE_10
            | WRITE_VERIFY_10
            | VERIFY_10
            | PRE_FETCH_10
            | SYNC_CACHE_10
            | READ_DEFECT_DATA_10
            | WRITE_SAME_10
            | UNMAP
            | SANITIZE
            | MODE_SELECT_10
            | RESERVE_10
            | RELEASE_10
            | MODE_SENSE_10
            | PERSISTENT_RESERVE_IN
            | PERSISTENT_RESERVE_OUT
            | EXTENDED_COPY
            | RECEIVE_COPY_RESULTS
            | READ_16
            | COMPARE_AND_WRITE
            | WRITE_16
            | ORWRITE_16
            | WRITE_VERIFY_16
            | VERIFY_16
            | PRE_FETCH_16
            | SYNC_CACHE_16
            | WRITE_SAME_16
            | WRITE_ATOMIC_16
            | SERVICE_ACTION_IN_16
            | REPORT_LUNS
            | MAINTENANCE_IN
            | READ_12
            | WRITE_12
            | WRITE_VERIFY_12
            | VERIFY_12
            | READ_DEFECT_DATA_12
    )
}

/// The block fields of a READ/WRITE-like CDB: byte 1 flags, LBA at `lba_at` (4 or 8
/// bytes), transfer length at `tl_at` (2 or 4 bytes).
fn io(f: &Fields, lba64: bool, lba_at: usize, tl_at: usize, tl32: bool) -> Io {
    Io {
        lba: if lba64 { f.be64(lba_at) } else { u64::from(f.be32(lba_at)) },
        blocks: if tl32 { f.be32(tl_at) } else { u32::from(f.be16(tl_at)) },
        fua: f.b(1) & 0x08 != 0,
        protect: f.b(1) >> 5,
    }
}

fn decode(opcode: u8, f: &Fields) -> Result<(Action, Option<u32>), Sense> {
    use op::*;
    let none = |r: Action| Ok((r, None));
    match opcode {
        TEST_UNIT_READY => none(Action::TestUnitReady),
        REQUEST_SENSE => Ok((Action::RequestSense { descriptor: f.b(1) & 1 != 0 }, Some(u32::from(f.b(4))))),
        INQUIRY => {
            let evpd = f.b(1) & 1 != 0;
            if f.b(1) & 0x02 != 0 {
                return Err(Sense::invalid_cdb(1, Some(1)));
            }
            if !evpd && f.b(2) != 0 {
                return Err(Sense::invalid_cdb(2, None));
            }
            Ok((Action::Inquiry { evpd, page: f.b(2) }, Some(u32::from(f.be16(3)))))
        }
        MODE_SENSE_6 | MODE_SENSE_10 => {
            let ten = opcode == MODE_SENSE_10;
            let request = Action::ModeSense {
                ten,
                dbd: f.b(1) & 0x08 != 0,
                llbaa: ten && f.b(1) & 0x10 != 0,
                pc: f.b(2) >> 6,
                page: f.b(2) & 0x3F,
                subpage: f.b(3),
            };
            Ok((request, Some(if ten { u32::from(f.be16(7)) } else { u32::from(f.b(4)) })))
        }
        MODE_SELECT_6 => {
            none(Action::ModeSelect { ten: false, sp: f.b(1) & 1 != 0, length: u32::from(f.b(4)) })
        }
        MODE_SELECT_10 => {
            none(Action::ModeSelect { ten: true, sp: f.b(1) & 1 != 0, length: u32::from(f.be16(7)) })
        }
        RESERVE_6 => none(Action::Reserve),
        RELEASE_6 => none(Action::Release),
        RESERVE_10 | RELEASE_10 => {
            // Third-party reservations are not supported.
            if f.b(1) & 0x10 != 0 {
                return Err(Sense::invalid_cdb(1, Some(4)));
            }
            none(if opcode == RESERVE_10 { Action::Reserve } else { Action::Release })
        }
        START_STOP_UNIT => none(Action::StartStop {
            power: f.b(4) >> 4,
            no_flush: f.b(4) & 0x04 != 0,
            loej: f.b(4) & 0x02 != 0,
            start: f.b(4) & 0x01 != 0,
        }),
        PREVENT_ALLOW => match f.b(4) & 0x03 {
            0 => none(Action::PreventAllow { prevent: false }),
            1 => none(Action::PreventAllow { prevent: true }),
            _ => Err(Sense::invalid_cdb(4, Some(1))),
        },
        READ_CAPACITY_10 => {
            if f.b(8) & 1 == 0 && f.be32(2) != 0 {
                return Err(Sense::invalid_cdb(2, None));
            }
            Ok((Action::ReadCapacity10, Some(8)))
        }
        READ_6 | WRITE_6 => {
            let lba = (u64::from(f.b(1) & 0x1F) << 16) | u64::from(f.be16(2));
            let blocks = if f.b(4) == 0 { 256 } else { u32::from(f.b(4)) };
            let io = Io { lba, blocks, fua: false, protect: 0 };
            none(if opcode == READ_6 { Action::Read(io) } else { Action::Write(io) })
        }
        READ_10 => none(Action::Read(io(f, false, 2, 7, false))),
        READ_12 => none(Action::Read(io(f, false, 2, 6, true))),
        READ_16 => none(Action::Read(io(f, true, 2, 10, true))),
        WRITE_10 => none(Action::Write(io(f, false, 2, 7, false))),
        WRITE_12 => none(Action::Write(io(f, false, 2, 6, true))),
        WRITE_16 => none(Action::Write(io(f, true, 2, 10, true))),
        WRITE_VERIFY_10 | WRITE_VERIFY_12 | WRITE_VERIFY_16 | VERIFY_10 | VERIFY_12 | VERIFY_16 => {
            let mut io = match opcode {
                WRITE_VERIFY_10 | VERIFY_10 => io(f, false, 2, 7, false),
                WRITE_VERIFY_12 | VERIFY_12 => io(f, false, 2, 6, true),
                _ => io(f, true, 2, 10, true),
            };
            io.fua = false;
            let bytchk = (f.b(1) >> 1) & 0x03;
            if matches!(opcode, VERIFY_10 | VERIFY_12 | VERIFY_16) {
                if bytchk == 2 {
                    return Err(Sense::invalid_cdb(1, Some(2)));
                }
                none(Action::Verify { io, bytchk })
            } else {
                if bytchk > 1 {
                    return Err(Sense::invalid_cdb(1, Some(2)));
                }
                none(Action::WriteVerify { io, bytchk })
            }
        }
        ORWRITE_16 => none(Action::OrWrite(io(f, true, 2, 10, true))),
        WRITE_ATOMIC_16 => {
            let mut io = io(f, true, 2, 12, false);
            io.blocks = u32::from(f.be16(12));
            none(Action::WriteAtomic { io, boundary: f.be16(10) })
        }
        COMPARE_AND_WRITE => {
            let mut io = io(f, true, 2, 10, true);
            io.blocks = u32::from(f.b(13));
            none(Action::CompareAndWrite(io))
        }
        WRITE_SAME_10 | WRITE_SAME_16 => {
            let sixteen = opcode == WRITE_SAME_16;
            let io = if sixteen { io(f, true, 2, 10, true) } else { io(f, false, 2, 7, false) };
            none(Action::WriteSame {
                io: Io { fua: false, ..io },
                unmap: f.b(1) & 0x08 != 0,
                anchor: f.b(1) & 0x10 != 0,
                ndob: sixteen && f.b(1) & 0x01 != 0,
                sixteen,
            })
        }
        UNMAP => none(Action::Unmap { anchor: f.b(1) & 1 != 0, length: u32::from(f.be16(7)) }),
        PRE_FETCH_10 => none(Action::PreFetch { lba: u64::from(f.be32(2)), blocks: u32::from(f.be16(7)) }),
        PRE_FETCH_16 => none(Action::PreFetch { lba: f.be64(2), blocks: f.be32(10) }),
        SYNC_CACHE_10 => none(Action::SyncCache { lba: u64::from(f.be32(2)), blocks: u32::from(f.be16(7)) }),
        SYNC_CACHE_16 => none(Action::SyncCache { lba: f.be64(2), blocks: f.be32(10) }),
        SERVICE_ACTION_IN_16 => match f.b(1) & 0x1F {
            sa::READ_CAPACITY_16 => {
                if f.b(14) & 1 == 0 && f.be64(2) != 0 {
                    return Err(Sense::invalid_cdb(2, None));
                }
                Ok((Action::ReadCapacity16, Some(f.be32(10))))
            }
            sa::GET_LBA_STATUS => Ok((Action::GetLbaStatus { lba: f.be64(2) }, Some(f.be32(10)))),
            _ => Err(Sense::invalid_cdb(1, Some(4))),
        },
        REPORT_LUNS => {
            let select = f.b(2);
            if !matches!(select, 0x00 | 0x01 | 0x02 | 0x10 | 0x11 | 0x12) {
                return Err(Sense::invalid_cdb(2, None));
            }
            if f.be32(6) < 16 {
                return Err(Sense::invalid_cdb(6, None));
            }
            Ok((Action::ReportLuns { select }, Some(f.be32(6))))
        }
        MAINTENANCE_IN => match f.b(1) & 0x1F {
            sa::REPORT_TARGET_PORT_GROUPS => match f.b(1) >> 5 {
                format @ (0 | 1) => {
                    Ok((Action::ReportTargetPortGroups { extended: format == 1 }, Some(f.be32(6))))
                }
                _ => Err(Sense::invalid_cdb(1, Some(7))),
            },
            sa::REPORT_SUPPORTED_OPCODES => {
                let options = f.b(2) & 0x07;
                if options > 3 {
                    return Err(Sense::invalid_cdb(2, Some(2)));
                }
                let request = Action::ReportSupportedOpcodes {
                    rctd: f.b(2) & 0x80 != 0,
                    options,
                    opcode: f.b(3),
                    sa: f.be16(4),
                };
                Ok((request, Some(f.be32(6))))
            }
            _ => Err(Sense::invalid_cdb(1, Some(4))),
        },
        PERSISTENT_RESERVE_IN => match f.b(1) & 0x1F {
            sa @ 0..=3 => Ok((Action::PrIn { sa }, Some(u32::from(f.be16(7))))),
            _ => Err(Sense::invalid_cdb(1, Some(4))),
        },
        PERSISTENT_RESERVE_OUT => match f.b(1) & 0x1F {
            sa @ 0..=7 => {
                none(Action::PrOut { sa, scope: f.b(2) >> 4, kind: f.b(2) & 0x0F, length: f.be32(5) })
            }
            _ => Err(Sense::invalid_cdb(1, Some(4))),
        },
        SANITIZE => {
            let b1 = f.b(1);
            if b1 & 0x40 != 0 {
                return Err(Sense::invalid_cdb(1, Some(6)));
            }
            if let Some(i) = (2..=6).find(|&i| f.b(i) != 0) {
                return Err(Sense::invalid_cdb(i, None));
            }
            let sa = b1 & 0x1F;
            if !matches!(sa, 0x01 | 0x02 | 0x03 | 0x1F) {
                return Err(Sense::invalid_cdb(1, Some(4)));
            }
            none(Action::Sanitize { immed: b1 & 0x80 != 0, ause: b1 & 0x20 != 0, sa, length: f.be16(7) })
        }
        EXTENDED_COPY => {
            // Only EXTENDED COPY(LID1), service action 00h.
            if f.b(1) & 0x1F != 0 {
                return Err(Sense::invalid_cdb(1, Some(4)));
            }
            none(Action::ExtendedCopy { length: f.be32(10) })
        }
        RECEIVE_COPY_RESULTS => match f.b(1) & 0x1F {
            sa @ (0x00 | 0x03) => Ok((Action::ReceiveCopyResults { sa, list_id: f.b(2) }, Some(f.be32(10)))),
            _ => Err(Sense::invalid_cdb(1, Some(4))),
        },
        READ_DEFECT_DATA_10 => {
            Ok((Action::ReadDefectData { twelve: false, flags: f.b(2) & 0x1F }, Some(u32::from(f.be16(7)))))
        }
        READ_DEFECT_DATA_12 => {
            Ok((Action::ReadDefectData { twelve: true, flags: f.b(1) & 0x1F }, Some(f.be32(6))))
        }
        _ => Err(Sense::invalid_opcode()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_unknown_cdbs_are_errors() {
        assert_eq!(parse(&[]).unwrap_err().asc(), 0x24);
        assert_eq!(parse(&[op::READ_10, 0, 0]).unwrap_err().asc(), 0x24);
        assert_eq!(parse(&[0xFF; 16]).unwrap_err().asc(), 0x20);
        assert_eq!(parse(&[0x04, 0, 0, 0, 0, 0]).unwrap_err().asc(), 0x20);
    }

    #[test]
    fn read16_fields_and_data_out_of_writes() {
        let mut cdb = [0u8; 16];
        cdb[0] = op::READ_16;
        cdb[1] = 0x08;
        cdb[2..10].copy_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
        cdb[10..14].copy_from_slice(&9u32.to_be_bytes());
        let c = parse(&cdb).unwrap();
        assert_eq!(
            c.request,
            Action::Read(Io { lba: 0x1122_3344_5566_7788, blocks: 9, fua: true, protect: 0 })
        );
        cdb[0] = op::WRITE_16;
        assert_eq!(parse(&cdb).unwrap().data_out_length(512), 9 * 512);
        cdb[0] = op::COMPARE_AND_WRITE;
        cdb[13] = 2;
        assert_eq!(parse(&cdb).unwrap().data_out_length(4096), 4 * 4096);
    }

    #[test]
    fn naca_and_reserved_sanitize_bytes_are_refused() {
        assert_eq!(parse(&[op::TEST_UNIT_READY, 0, 0, 0, 0, 0x04]).unwrap_err().asc(), 0x24);
        assert!(parse(&[op::SANITIZE, 0x02, 0, 0, 0, 0, 0, 0, 0, 0]).is_ok());
        assert!(parse(&[op::SANITIZE, 0x02, 0, 0, 5, 0, 0, 0, 0, 0]).is_err());
        assert!(parse(&[op::SANITIZE, 0x04, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }
}
