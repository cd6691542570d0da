//! EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 §6.4, §6.21): block-to-block copies
//! between logical units this controller serves, found by their NAA designator.
//!
//! ```text
//!   parameter list ─▶ header ─▶ target descriptors (0xE4, NAA) ─▶ Directory ─▶ LUs
//!                            └▶ segment descriptors (0x02, block → block)
//!   every segment is checked before the first block moves; the copy then runs in
//!   chunks, each chunk written under the destination's write lock (shared, or exclusive
//!   for a chunk that does not cover whole device blocks of a 512e destination)
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use parking_lot::RwLock;

use crate::Nexus;
use crate::lu::LogicalUnit;
use crate::sense::{Failure, Reply, Sense};

/// Most target descriptors one EXTENDED COPY may carry.
pub(crate) const MAX_TARGET_DESCRIPTORS: u16 = 8;
/// Most segment descriptors one EXTENDED COPY may carry.
pub(crate) const MAX_SEGMENT_DESCRIPTORS: u16 = 64;
/// Most bytes of target and segment descriptors together.
pub(crate) const MAX_DESCRIPTOR_LIST: u32 = 4096;
/// Most bytes one segment may copy.
pub(crate) const MAX_SEGMENT_BYTES: u32 = 64 << 20;
/// Bytes moved per read/write while copying.
const CHUNK: u64 = 1 << 20;
/// Copy results kept per nexus for RECEIVE COPY RESULTS.
const HELD_RESULTS: usize = 16;

/// The live logical units of a controller by NAA designator, so EXTENDED COPY can reach
/// the LU a target descriptor names. Holds weak references: a LU that is gone is simply
/// not found.
#[derive(Default)]
pub struct Directory {
    lus: RwLock<HashMap<[u8; 16], Weak<LogicalUnit>>>,
}

impl Directory {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `lu` reachable under its NAA designator (replacing any older entry).
    pub fn insert(&self, lu: &Arc<LogicalUnit>) {
        self.lus.write().insert(lu.identity().naa, Arc::downgrade(lu));
    }

    /// Forgets the LU with designator `naa`.
    pub fn remove(&self, naa: &[u8; 16]) {
        self.lus.write().remove(naa);
    }

    /// The live LU with designator `naa`.
    pub fn get(&self, naa: &[u8; 16]) -> Option<Arc<LogicalUnit>> {
        self.lus.read().get(naa).and_then(Weak::upgrade)
    }
}

/// The status of one finished EXTENDED COPY, kept for RECEIVE COPY RESULTS.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CopyRecord {
    list_id: u8,
    ok: bool,
    segments: u16,
    /// Bytes copied, in KiB (transfer count units F1h).
    kib: u32,
}

/// A LU a target descriptor resolved to: this one or another from the directory.
enum Target {
    This,
    Other(Arc<LogicalUnit>),
}

#[derive(Debug)]
struct Segment {
    src: usize,
    dst: usize,
    /// Counted in the destination's blocks (DC=1) rather than the source's.
    dc: bool,
    blocks: u16,
    src_lba: u64,
    dst_lba: u64,
}

fn be16(p: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([p[i], p[i + 1]])
}

fn be32(p: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]])
}

fn be64(p: &[u8], i: usize) -> u64 {
    (u64::from(be32(p, i)) << 32) | u64::from(be32(p, i + 4))
}

impl LogicalUnit {
    fn resolve<'a>(&'a self, targets: &'a [Target], i: usize) -> Result<&'a LogicalUnit, Sense> {
        match targets.get(i) {
            Some(Target::This) => Ok(self),
            Some(Target::Other(lu)) => Ok(lu),
            None => Err(Sense::copy_aborted(0x0D, 0x02)),
        }
    }

    /// EXTENDED COPY(LID1) with `params` (the parameter list the CDB announced).
    pub(crate) async fn extended_copy(&self, nexus: &Nexus, length: u32, data: &Bytes) -> Reply {
        let length = usize::try_from(length).unwrap_or(usize::MAX);
        if length == 0 {
            return Ok(Bytes::new());
        }
        if data.len() < length || length < 16 {
            return Err(Sense::param_list_length().into());
        }
        let p = &data[..length];
        let list_id = p[0];
        let usage = (p[1] >> 3) & 0x03;
        let tgt_len = usize::from(be16(p, 2));
        let seg_len = usize::try_from(be32(p, 8)).unwrap_or(usize::MAX);
        let inline_len = be32(p, 12);
        if tgt_len.saturating_add(seg_len) > MAX_DESCRIPTOR_LIST as usize {
            return Err(Sense::param_list_length().into());
        }
        if 16 + tgt_len + seg_len > length {
            return Err(Sense::param_list_length().into());
        }
        if inline_len != 0 {
            return Err(Sense::invalid_param(12, None).into());
        }
        if usage == 0x01 {
            return Err(Sense::invalid_param(1, Some(4)).into());
        }
        let targets = self.target_descriptors(&p[16..16 + tgt_len])?;
        let segments = segment_descriptors(&p[16 + tgt_len..16 + tgt_len + seg_len], 16 + tgt_len)?;
        // Check every segment before any block moves.
        let mut plan = Vec::with_capacity(segments.len());
        for s in &segments {
            let (src, dst) = (self.resolve(&targets, s.src)?, self.resolve(&targets, s.dst)?);
            if !src.accessible() || !dst.accessible() {
                return Err(Sense::copy_aborted(0x0D, 0x02).into());
            }
            let unit = if s.dc { dst.block_size } else { src.block_size };
            let bytes = u64::from(s.blocks) * u64::from(unit);
            if bytes > u64::from(MAX_SEGMENT_BYTES) {
                return Err(Sense::invalid_param(16, None).into());
            }
            if !bytes.is_multiple_of(u64::from(src.block_size))
                || !bytes.is_multiple_of(u64::from(dst.block_size))
            {
                return Err(Sense::copy_aborted(0x00, 0x00).into());
            }
            let (Ok((src_off, _)), Ok((dst_off, _))) = (
                src.extent(s.src_lba, bytes / u64::from(src.block_size)),
                dst.extent(s.dst_lba, bytes / u64::from(dst.block_size)),
            ) else {
                return Err(Sense::copy_aborted(0x00, 0x00).into());
            };
            dst.writable()?;
            if !dst.reservations.may_write(nexus) {
                return Err(Failure::Conflict);
            }
            plan.push((src, dst, src_off, dst_off, bytes));
        }
        let mut copied = 0u64;
        let mut done = 0u16;
        let mut result = Ok(Bytes::new());
        for (src, dst, src_off, dst_off, bytes) in plan {
            if let Err(e) = copy_range(src, dst, src_off, dst_off, bytes).await {
                result = Err(Failure::Check(e));
                break;
            }
            copied += bytes;
            done += 1;
        }
        if usage != 0x03 {
            let record = CopyRecord {
                list_id,
                ok: result.is_ok(),
                segments: done,
                kib: u32::try_from(copied >> 10).unwrap_or(u32::MAX),
            };
            self.nexuses.with(nexus, |state| {
                let mut held = state.copies.lock();
                held.retain(|r| r.list_id != list_id);
                if held.len() == HELD_RESULTS {
                    held.pop_front();
                }
                held.push_back(record);
            });
        }
        result
    }

    /// Resolves the target descriptors: identification descriptors (E4h) naming a block
    /// device by NAA designator.
    fn target_descriptors(&self, list: &[u8]) -> Result<Vec<Target>, Sense> {
        let mut targets = Vec::new();
        let mut at = 0;
        while at < list.len() {
            let d = &list[at..];
            match d[0] {
                0xE4 if d.len() >= 32 => {}
                0xE4 => return Err(Sense::param_list_length()),
                _ => return Err(Sense::new(crate::sense::key::ILLEGAL_REQUEST, 0x26, 0x07)),
            }
            if targets.len() == usize::from(MAX_TARGET_DESCRIPTORS) {
                return Err(Sense::new(crate::sense::key::ILLEGAL_REQUEST, 0x26, 0x06));
            }
            // The LU ID TYPE (byte 1, bits 7-6) is ignored (SPC-4); NUL is obsolete.
            if d[1] & 0x1F != 0 {
                // Only direct-access block devices.
                return Err(Sense::invalid_param(16 + at + 1, Some(4)));
            }
            let (code_set, designator_type, len) = (d[4] & 0x0F, d[5] & 0x0F, usize::from(d[7]));
            if code_set != 1 || designator_type != 3 || len != 16 {
                return Err(Sense::copy_aborted(0x08, 0x04));
            }
            let mut naa = [0u8; 16];
            naa.copy_from_slice(&d[8..24]);
            let target = if naa == self.identity.naa {
                Target::This
            } else {
                Target::Other(self.directory.get(&naa).ok_or(Sense::copy_aborted(0x0D, 0x02))?)
            };
            let block_len = u32::from_be_bytes([0, d[29], d[30], d[31]]);
            let actual = match &target {
                Target::This => self.block_size,
                Target::Other(lu) => lu.block_size,
            };
            if block_len != actual {
                return Err(Sense::invalid_param(16 + at + 29, None));
            }
            targets.push(target);
            at += 32;
        }
        Ok(targets)
    }

    /// RECEIVE COPY RESULTS: COPY STATUS (00h) or OPERATING PARAMETERS (03h).
    pub(crate) fn receive_copy_results(&self, nexus: &Nexus, sa: u8, list_id: u8) -> Reply {
        if sa == 0x03 {
            let mut out = vec![0u8; 44];
            out[0..4].copy_from_slice(&(44u32 + 2 - 4).to_be_bytes());
            out[4] = 0x01; // SNLID: list identifiers may be reused once results are read.
            out[8..10].copy_from_slice(&MAX_TARGET_DESCRIPTORS.to_be_bytes());
            out[10..12].copy_from_slice(&MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
            out[12..16].copy_from_slice(&MAX_DESCRIPTOR_LIST.to_be_bytes());
            out[16..20].copy_from_slice(&MAX_SEGMENT_BYTES.to_be_bytes());
            // No inline or held data, no stream devices; one copy at a time per command.
            out[34..36].copy_from_slice(&1u16.to_be_bytes());
            out[36] = 1;
            out[37] = 9; // Data segment granularity: 512 bytes (2^9).
            out[43] = 2;
            out.extend_from_slice(&[0x02, 0xE4]);
            return Ok(Bytes::from(out));
        }
        let record = self
            .nexuses
            .with(nexus, |state| state.copies.lock().iter().rev().find(|r| r.list_id == list_id).copied());
        let Some(r) = record else { return Err(Sense::invalid_cdb(2, None).into()) };
        let mut out = vec![0u8; 12];
        out[0..4].copy_from_slice(&8u32.to_be_bytes());
        out[4] = if r.ok { 0x01 } else { 0x02 };
        out[5..7].copy_from_slice(&r.segments.to_be_bytes());
        out[7] = 0xF1;
        out[8..12].copy_from_slice(&r.kib.to_be_bytes());
        Ok(Bytes::from(out))
    }
}

/// Decodes the segment descriptors; `base` is their offset in the parameter list.
fn segment_descriptors(list: &[u8], base: usize) -> Result<Vec<Segment>, Sense> {
    let mut segments = Vec::new();
    let mut at = 0;
    while at < list.len() {
        let d = &list[at..];
        if d.len() < 4 {
            return Err(Sense::param_list_length());
        }
        if d[0] != 0x02 {
            return Err(Sense::new(crate::sense::key::ILLEGAL_REQUEST, 0x26, 0x09));
        }
        if be16(d, 2) != 0x18 {
            return Err(Sense::invalid_param(base + at + 2, None));
        }
        if d.len() < 28 {
            return Err(Sense::param_list_length());
        }
        if segments.len() == usize::from(MAX_SEGMENT_DESCRIPTORS) {
            return Err(Sense::new(crate::sense::key::ILLEGAL_REQUEST, 0x26, 0x08));
        }
        segments.push(Segment {
            src: usize::from(be16(d, 4)),
            dst: usize::from(be16(d, 6)),
            dc: d[1] & 0x02 != 0,
            blocks: be16(d, 10),
            src_lba: be64(d, 12),
            dst_lba: be64(d, 20),
        });
        at += 28;
    }
    Ok(segments)
}

/// Copies `bytes` from `src` at `src_off` to `dst` at `dst_off`, a chunk at a time.
async fn copy_range(
    src: &LogicalUnit,
    dst: &LogicalUnit,
    src_off: u64,
    dst_off: u64,
    bytes: u64,
) -> Result<(), Sense> {
    let mut done = 0;
    while done < bytes {
        let n = CHUNK.min(bytes - done);
        let data = src
            .read_range(src_off + done, n)
            .await
            .map_err(|e| crate::block::io_sense(&e, strata_block::IoOp::Read))?;
        let _guard = dst.write_guard(dst_off + done, n).await;
        dst.write_range(dst_off + done, data, dst.durability(false))
            .await
            .map_err(|e| crate::block::io_sense(&e, strata_block::IoOp::Write))?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_descriptor_types_and_lengths_are_checked() {
        let mut d = [0u8; 28];
        d[0] = 0x02;
        d[2..4].copy_from_slice(&0x18u16.to_be_bytes());
        d[10..12].copy_from_slice(&5u16.to_be_bytes());
        d[27] = 9;
        let s = segment_descriptors(&d, 48).unwrap();
        assert_eq!((s[0].blocks, s[0].dst_lba), (5, 9));
        d[0] = 0x03;
        assert_eq!(segment_descriptors(&d, 48).unwrap_err().ascq(), 0x09);
        assert_eq!(segment_descriptors(&d[..3], 48).unwrap_err().asc(), 0x1A);
    }
}
