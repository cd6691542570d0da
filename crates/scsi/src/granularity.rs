//! Logical blocks smaller than the device's ("512e"): every device request is made of whole
//! device blocks, whatever logical blocks a command addresses.
//!
//! ```text
//!   logical blocks (512)  | 0 | 1 | 2 | 3 | 4 | 5 | 6 | 7 | 8 | 9 | … |15 |16 |…
//!   device blocks (4096)  |               0               |       1       |…
//!   WRITE LBA 6, 4 blocks                         [ head  ][ tail  ]
//!                          read device blocks 0 and 1, patch 6..10, write both back
//!   READ LBA 6, 4 blocks   read device blocks 0 and 1, hand back a slice (no copy)
//! ```
//!
//! A read that is not aligned to the device block reads the covering blocks and returns a
//! `Bytes::slice` of them. A write that is not aligned reads the partial device blocks at
//! its edges, patches them and writes them back (with the aligned middle, a slice of the
//! data-out when the write is large). Two such read-modify-writes of one device block must
//! not interleave, or one would put back what the other had just replaced; nor may an
//! aligned write land between the read and the write-back. So a write that needs one takes
//! the LU's write lock exclusively ([`LogicalUnit::write_guard`]), while aligned writes keep
//! sharing it: on a 512e LU a host that aligns its IO (as READ CAPACITY(16) asks it to)
//! pays nothing, and one that does not is serialized.
//!
//! Only whole device blocks can be discarded. UNMAP and WRITE SAME with UNMAP discard the
//! aligned middle of their range and write zeroes over the edges, so every block of the
//! range reads back as zeroes (LBPRZ=1) while the space of the partial device blocks stays
//! allocated.

use bytes::{Bytes, BytesMut};
use strata_block::{Durability, IoError};
use tokio::sync::{RwLockReadGuard, RwLockWriteGuard};

use crate::lu::LogicalUnit;

/// Writes of at most this many bytes (rounded out to device blocks) that need a
/// read-modify-write go to the device as one buffer; larger ones as head, middle (a slice
/// of the data-out, no copy) and tail.
const MERGE_LIMIT: u64 = 64 << 10;

/// The LU's write lock as a write holds it: shared when the write covers whole device
/// blocks, exclusive when it must read-modify-write some.
pub(crate) struct WriteGuard<'a> {
    /// Held by an aligned write: ordinary writes run together.
    _shared: Option<RwLockReadGuard<'a, ()>>,
    /// Held by a read-modify-write: nothing else writes the LU meanwhile.
    _exclusive: Option<RwLockWriteGuard<'a, ()>>,
}

/// A byte range cut at device block boundaries: the partial device blocks at either end
/// and the whole ones between them. A range inside one device block is all `head`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Pieces {
    /// `(offset, len)` of the part in the first device block, when it does not fill it.
    pub head: Option<(u64, u64)>,
    /// `(offset, len)` of the whole device blocks.
    pub middle: Option<(u64, u64)>,
    /// `(offset, len)` of the part in the last device block, when it does not fill it.
    pub tail: Option<(u64, u64)>,
}

impl LogicalUnit {
    fn device_mask(&self) -> u64 {
        u64::from(self.device_block_size) - 1
    }

    /// Logical blocks per device (physical) block: 1 unless the LU emulates smaller blocks.
    pub(crate) fn blocks_per_physical(&self) -> u64 {
        u64::from(self.device_block_size / self.block_size)
    }

    /// Whether `[offset, offset + len)` is made of whole device blocks.
    pub(crate) fn device_aligned(&self, offset: u64, len: u64) -> bool {
        (offset | len) & self.device_mask() == 0
    }

    /// Cuts `[offset, offset + len)` at device block boundaries.
    pub(crate) fn pieces(&self, offset: u64, len: u64) -> Pieces {
        let mask = self.device_mask();
        let end = offset + len;
        let (up, down) = ((offset + mask) & !mask, end & !mask);
        if len == 0 {
            return Pieces::default();
        }
        if up > down {
            // Inside one device block, not filling it.
            return Pieces { head: Some((offset, len)), ..Pieces::default() };
        }
        Pieces {
            head: (offset < up).then_some((offset, up - offset)),
            middle: (up < down).then_some((up, down - up)),
            tail: (down < end).then_some((down, end - down)),
        }
    }

    /// The write lock as a write of `[offset, offset + len)` needs it: shared when the
    /// range is whole device blocks (the hot path, tried without awaiting), exclusive when
    /// it must read-modify-write.
    pub(crate) async fn write_guard(&self, offset: u64, len: u64) -> WriteGuard<'_> {
        self.guard(self.device_aligned(offset, len)).await
    }

    /// The write lock, shared for writes of whole device blocks (`aligned`), else
    /// exclusive.
    pub(crate) async fn guard(&self, aligned: bool) -> WriteGuard<'_> {
        if aligned {
            WriteGuard { _shared: Some(self.write_lock().await), _exclusive: None }
        } else {
            WriteGuard { _shared: None, _exclusive: Some(self.exclusive().await) }
        }
    }

    /// Reads `len` bytes at `offset` (logical block aligned). Aligned reads are the
    /// device's buffer as it comes; others a slice of the device blocks that cover them.
    pub(crate) async fn read_range(&self, offset: u64, len: u64) -> Result<Bytes, IoError> {
        if self.device_aligned(offset, len) {
            return self.device.read(offset, len).await;
        }
        let mask = self.device_mask();
        let start = offset & !mask;
        let stop = (offset + len + mask) & !mask;
        let covering = self.device.read(start, stop - start).await?;
        let from = usize::try_from(offset - start).unwrap_or(0);
        let to = usize::try_from(offset + len - start).unwrap_or(0);
        Ok(covering.slice(from..to))
    }

    /// Writes `data` at `offset` (logical block aligned). The caller holds
    /// [`LogicalUnit::write_guard`] for the range (or the lock exclusively): a write that
    /// is not aligned to the device block reads and rewrites the device blocks at its
    /// edges.
    pub(crate) async fn write_range(
        &self,
        offset: u64,
        data: Bytes,
        durability: Durability,
    ) -> Result<(), IoError> {
        let len = data.len() as u64;
        if self.device_aligned(offset, len) {
            return self.device.write(offset, data, durability).await;
        }
        debug_assert!(self.writes.try_read().is_err(), "read-modify-write without the exclusive lock");
        let dbs = u64::from(self.device_block_size);
        let mask = self.device_mask();
        let end = offset + len;
        let (start, stop) = (offset & !mask, (end + mask) & !mask);
        let head_block = (offset != start).then_some(start);
        let tail_block = (end != stop).then_some(stop - dbs);
        let head_old = match head_block {
            Some(at) => Some(self.device.read(at, dbs).await?),
            None => None,
        };
        let tail_old = match tail_block {
            Some(at) if Some(at) == head_block => head_old.clone(),
            Some(at) => Some(self.device.read(at, dbs).await?),
            None => None,
        };
        let cut = |at: u64| usize::try_from(at).unwrap_or(0);
        if stop - start <= MERGE_LIMIT || stop - start <= 2 * dbs {
            // One buffer, one device write.
            let mut buf = BytesMut::with_capacity(cut(stop - start));
            if let Some(old) = &head_old {
                buf.extend_from_slice(&old[..cut(offset - start)]);
            }
            buf.extend_from_slice(&data);
            if let Some(old) = &tail_old {
                let from = cut(end - (stop - dbs));
                buf.extend_from_slice(&old[from..]);
            }
            return self.device.write(start, buf.freeze(), durability).await;
        }
        // Large: the patched edge blocks and, between them, the data-out as it is.
        let middle_from = if head_block.is_some() { start + dbs } else { start };
        let middle_to = if tail_block.is_some() { stop - dbs } else { stop };
        if let (Some(old), Some(at)) = (&head_old, head_block) {
            let mut block = BytesMut::with_capacity(cut(dbs));
            block.extend_from_slice(&old[..cut(offset - at)]);
            block.extend_from_slice(&data[..cut(at + dbs - offset)]);
            self.device.write(at, block.freeze(), durability).await?;
        }
        if middle_from < middle_to {
            let piece = data.slice(cut(middle_from - offset)..cut(middle_to - offset));
            self.device.write(middle_from, piece, durability).await?;
        }
        if let (Some(old), Some(at)) = (&tail_old, tail_block) {
            let mut block = BytesMut::with_capacity(cut(dbs));
            block.extend_from_slice(&data[cut(at - offset)..]);
            block.extend_from_slice(&old[cut(end - at)..]);
            self.device.write(at, block.freeze(), durability).await?;
        }
        Ok(())
    }

    /// Sets `[offset, offset + len)` (logical block aligned) to zeroes: the whole device
    /// blocks are discarded (`release`) or zeroed in place, the partial ones at the edges
    /// rewritten with zeroes. The caller holds [`LogicalUnit::write_guard`] for the range.
    pub(crate) async fn zero_range(&self, offset: u64, len: u64, release: bool) -> Result<(), IoError> {
        let pieces = self.pieces(offset, len);
        if let Some((at, n)) = pieces.head {
            self.write_range(at, strata_block::zeroes(n), self.durability(false)).await?;
        }
        if let Some((at, n)) = pieces.middle {
            if release {
                self.device.discard(at, n).await?;
            } else {
                self.device.write_zeroes(at, n).await?;
            }
        }
        if let Some((at, n)) = pieces.tail {
            self.write_range(at, strata_block::zeroes(n), self.durability(false)).await?;
        }
        Ok(())
    }
}
