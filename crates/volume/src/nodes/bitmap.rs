//! The write-intent bitmap of a mirror or parity node.
//!
//! One bit per region of the node's address space. A bit is on stable storage (FUA, on
//! every copy) before any write to its region is issued, and is cleared only after a
//! flush has made every write to the region durable on every member. So after a crash the
//! set bits name every region whose members may disagree, and only those are resynced.
//!
//! ```text
//!   write(r):  inflight[r] += 1 ─▶ bit r durable? ──no──▶ (io lock) persist bits | r (FUA)
//!                                        │yes                      │
//!                                        ▼                         ▼
//!                                   write members ◀────────────────┘ ─▶ inflight[r] -= 1
//!   flush:     mark = seq ─▶ flush members ─▶ (io lock) clear r if inflight[r] == 0,
//!                                              the last write to r completed before this
//!                                              flush and the previous one were issued, and
//!                                              no member has failed ─▶ persist
//! ```
//!
//! Clearing lingers one flush so a hot region is not set and cleared on every flush.
//! While a member is failed no bit is cleared, and the failed members are recorded in the
//! bitmap: when a member comes back, the set bits are exactly what it missed. A region
//! whose members disagree because one ran out of space is *pinned*: its bit is not
//! cleared until the node has made them agree, so a crash meanwhile resyncs it.
//! A copy that has no space for an update stays in use (the next update may find space).
//! A member that missed writes and that the resync at open could not bring up to date for
//! want of space is *behind*: it stays in service, but it is recorded in the bitmap as a
//! failed member would be (so a restart never resyncs from it) until the node reports
//! that it has caught up ([`Bitmap::caught_up`]).
//!
//! Encoded copy (little-endian), padded to a multiple of 4 KiB (whatever the devices' block
//! sizes, so the length does not change when a device is missing):
//! `magic "STRATAWB" | version u32 | 0 u32 | generation u64 | region_size u64 |
//!  regions u64 | failed_mask u64 | crc32c u32 | 0 [12] | bits`, the CRC covering the
//! whole encoding with the CRC field zeroed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;
use strata_block::{BlockIo, Durability, IoError, IoOp};

use crate::layout::{BITMAP_HEADER, bitmap_bytes};

const MAGIC: &[u8; 8] = b"STRATAWB";
const VERSION: u32 = 1;
const CRC_AT: usize = 48;

/// What [`Bitmap::load`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Loaded {
    /// Regions that may be inconsistent.
    pub dirty: Vec<usize>,
    /// Members recorded as failed.
    pub failed_mask: u64,
    /// False when no copy could be read: every region counts as dirty.
    pub readable: bool,
}

impl Loaded {
    /// Nothing to resync and nothing failed: the node was shut down cleanly.
    pub(crate) fn is_clean(&self) -> bool {
        self.readable && self.dirty.is_empty() && self.failed_mask == 0
    }
}

pub(crate) struct Bitmap {
    region_size: u64,
    regions: usize,
    copies: Vec<Arc<dyn BlockIo>>,
    encoded_len: u64,
    seq: AtomicU64,
    state: Mutex<State>,
    io: tokio::sync::Mutex<IoState>,
}

struct State {
    /// Bits known to be on stable storage. Only changed while holding the io lock.
    durable: Vec<u64>,
    inflight: Vec<u32>,
    /// Sequence number at which the last write to each region completed.
    last_end: Vec<u64>,
    /// Members known to have failed: no bit is cleared while there is one.
    failed_mask: u64,
    /// Regions whose members disagree after a no-space error: their bits stay set.
    pinned: Vec<u64>,
    /// The part of `failed_mask` that is on stable storage.
    recorded_mask: u64,
    /// Members in service that still miss writes (see the module doc): recorded on stable
    /// storage with the failed ones, and no bit is cleared while there is one.
    behind: u64,
    /// Mark of the newest flush whose members have been flushed.
    previous_flush: u64,
}

struct IoState {
    generation: u64,
    copy_ok: Vec<bool>,
}

/// Keeps a write's regions marked in flight; dropping it ends the write.
pub(crate) struct WriteGuard<'a> {
    bitmap: &'a Bitmap,
    first: usize,
    last: usize,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        let end = self.bitmap.seq.fetch_add(1, Ordering::SeqCst);
        let mut state = self.bitmap.state.lock();
        for r in self.first..=self.last {
            state.inflight[r] -= 1;
            state.last_end[r] = end;
        }
    }
}

fn bit(bits: &[u64], r: usize) -> bool {
    bits[r / 64] & (1 << (r % 64)) != 0
}

fn set(bits: &mut [u64], r: usize, on: bool) {
    if on {
        bits[r / 64] |= 1 << (r % 64);
    } else {
        bits[r / 64] &= !(1 << (r % 64));
    }
}

impl Bitmap {
    pub(crate) fn new(node_size: u64, region_size: u64, copies: Vec<Arc<dyn BlockIo>>) -> Self {
        let regions = usize::try_from(node_size.div_ceil(region_size)).expect("region count fits usize");
        let encoded_len = bitmap_bytes(node_size, region_size);
        let copy_ok = vec![true; copies.len()];
        Self {
            region_size,
            regions,
            copies,
            encoded_len,
            seq: AtomicU64::new(1),
            state: Mutex::new(State {
                durable: vec![0; regions.div_ceil(64)],
                inflight: vec![0; regions],
                last_end: vec![0; regions],
                failed_mask: 0,
                recorded_mask: 0,
                behind: 0,
                pinned: vec![0; regions.div_ceil(64)],
                previous_flush: 0,
            }),
            io: tokio::sync::Mutex::new(IoState { generation: 0, copy_ok }),
        }
    }

    pub(crate) fn region_size(&self) -> u64 {
        self.region_size
    }

    /// Bytes an encoded copy takes; every copy extent must hold at least this much.
    pub(crate) fn encoded_len(&self) -> u64 {
        self.encoded_len
    }

    fn encode(&self, generation: u64, bits: &[u64], failed_mask: u64) -> Bytes {
        let mut buf = vec![0u8; usize::try_from(self.encoded_len).expect("small")];
        buf[0..8].copy_from_slice(MAGIC);
        buf[8..12].copy_from_slice(&VERSION.to_le_bytes());
        buf[16..24].copy_from_slice(&generation.to_le_bytes());
        buf[24..32].copy_from_slice(&self.region_size.to_le_bytes());
        buf[32..40].copy_from_slice(&(self.regions as u64).to_le_bytes());
        buf[40..48].copy_from_slice(&failed_mask.to_le_bytes());
        let header = BITMAP_HEADER;
        for r in 0..self.regions {
            if bit(bits, r) {
                buf[header + r / 8] |= 1 << (r % 8);
            }
        }
        let crc = crc32c::crc32c(&buf);
        buf[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        Bytes::from(buf)
    }

    /// Decodes a copy: `(generation, bits, failed_mask)`, or `None` if it is not valid.
    fn decode(&self, raw: &[u8]) -> Option<(u64, Vec<u64>, u64)> {
        let u64_at = |at: usize| u64::from_le_bytes(raw[at..at + 8].try_into().expect("8 bytes"));
        if raw.len() as u64 != self.encoded_len || &raw[0..8] != MAGIC {
            return None;
        }
        let stored = u32::from_le_bytes(raw[CRC_AT..CRC_AT + 4].try_into().expect("4 bytes"));
        let mut copy = raw.to_vec();
        copy[CRC_AT..CRC_AT + 4].fill(0);
        let version = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
        if crc32c::crc32c(&copy) != stored
            || version != VERSION
            || u64_at(24) != self.region_size
            || u64_at(32) != self.regions as u64
        {
            return None;
        }
        let header = BITMAP_HEADER;
        let mut bits = vec![0u64; self.regions.div_ceil(64)];
        for r in 0..self.regions {
            set(&mut bits, r, raw[header + r / 8] & (1 << (r % 8)) != 0);
        }
        Some((u64_at(16), bits, u64_at(40)))
    }

    /// Writes a clean bitmap with no failed members: for a node that has just been made.
    pub(crate) async fn initialize(&self) -> Result<(), IoError> {
        let mut io = self.io.lock().await;
        let bits = vec![0; self.regions.div_ceil(64)];
        self.persist(&mut io, &bits, 0).await?;
        let mut state = self.state.lock();
        state.durable = bits;
        state.failed_mask = 0;
        state.recorded_mask = 0;
        state.behind = 0;
        Ok(())
    }

    /// Reads every copy and adopts the newest valid one.
    pub(crate) async fn load(&self) -> Loaded {
        let mut io = self.io.lock().await;
        let reads = futures::future::join_all(self.copies.iter().map(|c| c.read(0, self.encoded_len))).await;
        let mut best: Option<(u64, Vec<u64>, u64)> = None;
        for (i, read) in reads.into_iter().enumerate() {
            let Ok(raw) = read else {
                tracing::warn!(copy = i, "write-intent bitmap copy cannot be read");
                io.copy_ok[i] = false;
                continue;
            };
            match self.decode(&raw) {
                Some(found) if best.as_ref().is_none_or(|b| found.0 > b.0) => best = Some(found),
                Some(_) => {}
                // A torn copy is rewritten by the next update.
                None => tracing::warn!(copy = i, "write-intent bitmap copy is invalid"),
            }
        }
        let mut state = self.state.lock();
        match best {
            Some((generation, bits, failed_mask)) => {
                io.generation = generation;
                let dirty = (0..self.regions).filter(|&r| bit(&bits, r)).collect();
                state.durable = bits;
                state.failed_mask = failed_mask;
                state.recorded_mask = failed_mask;
                Loaded { dirty, failed_mask, readable: true }
            }
            None => {
                state.durable = vec![u64::MAX; self.regions.div_ceil(64)];
                Loaded { dirty: (0..self.regions).collect(), failed_mask: 0, readable: false }
            }
        }
    }

    /// Writes an encoding of `bits` to every working copy; succeeds if one copy took it.
    async fn persist(&self, io: &mut IoState, bits: &[u64], failed_mask: u64) -> Result<(), IoError> {
        io.generation = io.generation.wrapping_add(1);
        let encoded = self.encode(io.generation, bits, failed_mask);
        let writes =
            self.copies.iter().zip(&io.copy_ok).map(|(copy, ok)| {
                let encoded = encoded.clone();
                async move {
                    if *ok { copy.write(0, encoded, Durability::Fua).await } else { Err(IoError::Closed) }
                }
            });
        let results = futures::future::join_all(writes).await;
        let copies = results.len();
        let (mut written, mut no_space) = (false, None);
        for (ok, result) in io.copy_ok.iter_mut().zip(results) {
            match result {
                Ok(()) => written = true,
                // Full, not broken: the copy is tried again next time.
                Err(e) if e.is_no_space() => no_space = Some(e),
                Err(_) => *ok = false,
            }
        }
        match no_space {
            _ if written => Ok(()),
            Some(e) => Err(e),
            None => {
                Err(IoError::TooManyFailures { op: IoOp::Write, offset: 0, failed: copies, children: copies })
            }
        }
    }

    fn region_span(&self, offset: u64, len: u64) -> (usize, usize) {
        let first = usize::try_from(offset / self.region_size).expect("fits usize");
        let last = usize::try_from((offset + len.max(1) - 1) / self.region_size).expect("fits usize");
        (first, last.min(self.regions - 1))
    }

    /// Marks `[offset, offset + len)` as being written; the bits are durable on return.
    pub(crate) async fn start_write(&self, offset: u64, len: u64) -> Result<WriteGuard<'_>, IoError> {
        let (first, last) = self.region_span(offset, len);
        let covered = {
            let mut state = self.state.lock();
            for r in first..=last {
                state.inflight[r] += 1;
            }
            (first..=last).all(|r| bit(&state.durable, r))
        };
        let guard = WriteGuard { bitmap: self, first, last };
        if !covered {
            let mut io = self.io.lock().await;
            let (bits, failed) = {
                let state = self.state.lock();
                let mut bits = state.durable.clone();
                (first..=last).for_each(|r| set(&mut bits, r, true));
                (bits, state.failed_mask | state.behind)
            };
            if bits != self.state.lock().durable {
                self.persist(&mut io, &bits, failed).await?;
                self.state.lock().durable = bits;
            }
        }
        Ok(guard)
    }

    /// Call before flushing the members; pass the result to [`Bitmap::after_flush`].
    pub(crate) fn flush_mark(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst)
    }

    /// After the members were flushed: clears the regions whose writes all completed before
    /// this flush was issued (so it made them durable) and before the previous one (so a
    /// busy region is not set and cleared on every flush), unless a member has failed.
    pub(crate) async fn after_flush(&self, mark: u64) -> Result<(), IoError> {
        let mut io = self.io.lock().await;
        let (bits, failed) = {
            let mut state = self.state.lock();
            let bound = mark.min(state.previous_flush);
            state.previous_flush = state.previous_flush.max(mark);
            if state.failed_mask | state.behind != 0 {
                return Ok(());
            }
            let mut bits = state.durable.clone();
            for r in 0..self.regions {
                if bit(&bits, r)
                    && !bit(&state.pinned, r)
                    && state.inflight[r] == 0
                    && state.last_end[r] < bound
                {
                    set(&mut bits, r, false);
                }
            }
            if bits == state.durable {
                return Ok(());
            }
            // Drop the bits from `durable` before the write, so a writer arriving now takes
            // the slow path and waits for the io lock.
            state.durable = bits.clone();
            (bits, state.failed_mask | state.behind)
        };
        self.persist(&mut io, &bits, failed).await
    }

    /// Records on stable storage that `members` have failed; their regions stay dirty
    /// until they are back. Returns once the record is durable (at once if it already is).
    pub(crate) async fn mark_failed(&self, members: u64) -> Result<(), IoError> {
        let mut io = self.io.lock().await;
        let (bits, failed, behind) = {
            let mut state = self.state.lock();
            // From now on no bit is cleared, whether or not the record below succeeds.
            state.failed_mask |= members;
            if state.recorded_mask & members == members {
                return Ok(());
            }
            (state.durable.clone(), state.failed_mask, state.behind)
        };
        self.persist(&mut io, &bits, failed | behind).await?;
        self.state.lock().recorded_mask |= failed;
        Ok(())
    }

    /// After the resync at open: `failed_mask` as given (members absent or failed), and
    /// `behind` the members still missing writes the resync could not copy to them. Clean
    /// bits if both are empty; otherwise the bits stay set, and both masks are recorded.
    pub(crate) async fn resynced(&self, failed_mask: u64, behind: u64) -> Result<(), IoError> {
        let mut io = self.io.lock().await;
        let bits = {
            let mut state = self.state.lock();
            state.failed_mask = failed_mask;
            state.recorded_mask = failed_mask;
            state.behind = behind;
            if failed_mask | behind == 0 {
                // Pinned regions still disagree (see `pin`): they stay set.
                state.durable = state.pinned.clone();
            }
            state.durable.clone()
        };
        self.persist(&mut io, &bits, failed_mask | behind).await
    }

    /// Members that are behind (see [`Bitmap::resynced`]).
    pub(crate) fn behind(&self) -> u64 {
        self.state.lock().behind
    }

    /// `members` were behind and now hold every write: they are no longer recorded as
    /// stale (unless they have failed since, which `failed_mask` keeps recorded).
    pub(crate) async fn caught_up(&self, members: u64) -> Result<(), IoError> {
        let mut io = self.io.lock().await;
        let (bits, mask) = {
            let state = self.state.lock();
            if state.behind & members == 0 {
                return Ok(());
            }
            (state.durable.clone(), state.failed_mask | (state.behind & !members))
        };
        self.persist(&mut io, &bits, mask).await?;
        self.state.lock().behind &= !members;
        Ok(())
    }

    /// Pins or unpins the regions of `[offset, offset + len)`: while pinned, a region's bit
    /// is not cleared, because its members disagree after a no-space error. `pinned(start,
    /// end)` says whether a region (as a byte range) is to be pinned. Pin a region only
    /// while its bit is durable (a write to it in flight, or resync at open).
    pub(crate) fn pin(&self, offset: u64, len: u64, pinned: impl Fn(u64, u64) -> bool) {
        let (first, last) = self.region_span(offset, len);
        let mut state = self.state.lock();
        for r in first..=last {
            let start = r as u64 * self.region_size;
            set(&mut state.pinned, r, pinned(start, start + self.region_size));
        }
    }

    /// Number of set bits (for health reports and tests).
    pub(crate) fn dirty_regions(&self) -> usize {
        let state = self.state.lock();
        (0..self.regions).filter(|&r| bit(&state.durable, r)).count()
    }
}
