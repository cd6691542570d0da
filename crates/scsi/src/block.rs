//! Block commands (SBC-3): READ, WRITE, VERIFY, WRITE AND VERIFY, ORWRITE, WRITE ATOMIC,
//! COMPARE AND WRITE, WRITE SAME, UNMAP, PRE-FETCH, SYNCHRONIZE CACHE, GET LBA STATUS and
//! READ CAPACITY.
//!
//! READ and WRITE are the hot path: a read hands the device's buffer straight back, a
//! write passes a slice of the data-out, and the only shared state touched is the LU's
//! write lock (an uncontended atomic when no COMPARE AND WRITE, ORWRITE or WRITE ATOMIC
//! is running). Those three take the lock exclusively, so they are atomic against every
//! other writer of the LU.
//!
//! "Atomic" is against other writers of this LU, not against power loss: the device below
//! keeps each block whole, nothing more.
//!
//! A write whose data-out is shorter than its transfer length writes the whole blocks it
//! got (iSCSI expected data transfer length below the CDB's); extra data-out is ignored.
//!
//! Everything here is in logical blocks and goes to the device through `granularity.rs`
//! (`read_range`, `write_range`, `zero_range`), which turns ranges that do not cover whole
//! device blocks (a 512e LU) into reads of the covering blocks and read-modify-writes.

use bytes::{Bytes, BytesMut};
use strata_block::{Durability, IoError, IoOp};
use tokio::sync::{RwLockReadGuard, RwLockWriteGuard};

use crate::cdb::Io;
use crate::lu::LogicalUnit;
use crate::sense::{Reply, Sense, key};

/// Largest READ/WRITE, in bytes (BLOCK LIMITS: MAXIMUM TRANSFER LENGTH).
pub(crate) const MAX_TRANSFER_BYTES: u64 = 8 << 20;
/// Largest WRITE SAME, in bytes (BLOCK LIMITS: MAXIMUM WRITE SAME LENGTH).
pub(crate) const MAX_WRITE_SAME_BYTES: u64 = 32 << 20;
/// Most blocks one UNMAP may release.
pub(crate) const MAX_UNMAP_BLOCKS: u32 = 1 << 20;
/// Most block descriptors in one UNMAP.
pub(crate) const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// Most blocks one COMPARE AND WRITE may cover.
pub(crate) const MAX_COMPARE_AND_WRITE: u8 = 255;
/// Bytes read or written per device call by commands that walk large ranges.
const CHUNK: u64 = 1 << 20;

/// The sense data for a failed device request.
pub(crate) fn io_sense(error: &IoError, op: IoOp) -> Sense {
    tracing::warn!(%error, "Device request failed");
    match error {
        IoError::OutOfRange { .. } => Sense::lba_out_of_range(),
        IoError::Misaligned { .. } => Sense::internal_failure(),
        IoError::Closed => Sense::new(key::NOT_READY, 0x04, 0x00),
        IoError::NoSpace { .. } => Sense::space_allocation_failed(),
        _ if op == IoOp::Read => Sense::new(key::MEDIUM_ERROR, 0x11, 0x00),
        _ => Sense::new(key::MEDIUM_ERROR, 0x0C, 0x00),
    }
}

fn read_error(error: IoError) -> Sense {
    io_sense(&error, IoOp::Read)
}

fn write_error(error: IoError) -> Sense {
    io_sense(&error, IoOp::Write)
}

/// Refuses a non-zero RDPROTECT/WRPROTECT/VRPROTECT: there is no protection information.
fn no_protection(io: &Io) -> Result<(), Sense> {
    if io.protect != 0 { Err(Sense::invalid_cdb(1, Some(7))) } else { Ok(()) }
}

/// Offset of the first byte where `a` and `b` differ.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

impl LogicalUnit {
    /// Byte offset and length of `blocks` blocks at `lba`, or LBA OUT OF RANGE.
    pub(crate) fn extent(&self, lba: u64, blocks: u64) -> Result<(u64, u64), Sense> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.blocks => {
                let bs = u64::from(self.block_size);
                Ok((lba * bs, blocks * bs))
            }
            _ => Err(Sense::lba_out_of_range()),
        }
    }

    /// DATA PROTECT when the controller or the SWP bit made the LU read-only.
    pub(crate) fn writable(&self) -> Result<(), Sense> {
        if self.identity.read_only {
            Err(Sense::write_protected())
        } else if self.mode.swp() {
            Err(Sense::software_write_protected())
        } else {
            Ok(())
        }
    }

    /// FUA writes, and every write while the write cache is disabled (WCE=0), are durable
    /// on completion.
    pub(crate) fn durability(&self, fua: bool) -> Durability {
        if fua || !self.mode.wce() { Durability::Fua } else { Durability::Cached }
    }

    /// The write lock, shared: ordinary writes run together, but not during an atomic
    /// command. Tries the lock without awaiting first.
    pub(crate) async fn write_lock(&self) -> RwLockReadGuard<'_, ()> {
        match self.writes.try_read() {
            Ok(guard) => guard,
            Err(_) => self.writes.read().await,
        }
    }

    /// The write lock, exclusive: nothing else writes until the guard is dropped.
    pub(crate) async fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.writes.write().await
    }

    pub(crate) fn max_transfer_blocks(&self) -> u32 {
        u32::try_from(MAX_TRANSFER_BYTES / u64::from(self.block_size)).unwrap_or(u32::MAX)
    }

    fn check_transfer(&self, blocks: u32) -> Result<(), Sense> {
        if blocks > self.max_transfer_blocks() {
            Err(Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00))
        } else {
            Ok(())
        }
    }

    /// The whole blocks of `data` that fit in `len` bytes.
    fn whole_blocks(&self, data: &Bytes, len: u64) -> Bytes {
        let bs = u64::from(self.block_size);
        let have = (data.len() as u64 / bs) * bs;
        data.slice(..usize::try_from(have.min(len)).unwrap_or(0))
    }

    /// Checks a write-type command (no protection information, in range, within the
    /// transfer limit, unit writable) and returns where it goes with the whole blocks of
    /// its data-out, or None when there is nothing to write (a short data-out is written
    /// as far as it goes; the transport reports the residual).
    fn write_target(&self, io: &Io, data: &Bytes) -> Result<Option<(u64, Bytes)>, Sense> {
        no_protection(io)?;
        let (offset, len) = self.extent(io.lba, u64::from(io.blocks))?;
        self.check_transfer(io.blocks)?;
        self.writable()?;
        let data = self.whole_blocks(data, len);
        Ok((!data.is_empty()).then_some((offset, data)))
    }

    /// READ(6/10/12/16).
    pub(crate) async fn read(&self, io: Io) -> Reply {
        no_protection(&io)?;
        let (offset, len) = self.extent(io.lba, u64::from(io.blocks))?;
        self.check_transfer(io.blocks)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        Ok(self.read_range(offset, len).await.map_err(read_error)?)
    }

    /// WRITE(6/10/12/16).
    pub(crate) async fn write(&self, io: Io, data: &Bytes) -> Reply {
        let Some((offset, data)) = self.write_target(&io, data)? else { return Ok(Bytes::new()) };
        let _guard = self.write_guard(offset, data.len() as u64).await;
        self.write_range(offset, data, self.durability(io.fua)).await.map_err(write_error)?;
        Ok(Bytes::new())
    }

    /// WRITE AND VERIFY(10/12/16): a durable write, read back (and compared, BYTCHK=1).
    pub(crate) async fn write_verify(&self, io: Io, bytchk: u8, data: &Bytes) -> Reply {
        let Some((offset, data)) = self.write_target(&io, data)? else { return Ok(Bytes::new()) };
        {
            let _guard = self.write_guard(offset, data.len() as u64).await;
            self.write_range(offset, data.clone(), Durability::Fua).await.map_err(write_error)?;
        }
        let back = self.read_range(offset, data.len() as u64).await.map_err(read_error)?;
        if bytchk == 1
            && let Some(at) = first_difference(&data, &back)
        {
            return Err(Sense::miscompare(at as u64).into());
        }
        Ok(Bytes::new())
    }

    /// VERIFY(10/12/16): BYTCHK=0 reads the medium, 1 compares it with the data-out, 3
    /// compares every block with the one block of data-out.
    pub(crate) async fn verify(&self, io: Io, bytchk: u8, data: &Bytes) -> Reply {
        no_protection(&io)?;
        let (offset, len) = self.extent(io.lba, u64::from(io.blocks))?;
        let bs = u64::from(self.block_size);
        let expect = match bytchk {
            0 => None,
            1 => Some(self.whole_blocks(data, len)),
            _ if data.len() as u64 >= bs => Some(data.slice(..usize::try_from(bs).unwrap_or(0))),
            _ => Some(Bytes::new()),
        };
        let len = match (&expect, bytchk) {
            (Some(d), 1) => d.len() as u64,
            (Some(d), _) if d.is_empty() => 0,
            _ => len,
        };
        let chunk = (CHUNK / bs).max(1) * bs;
        let mut done = 0;
        while done < len {
            let n = chunk.min(len - done);
            let got = self.read_range(offset + done, n).await.map_err(read_error)?;
            let at = match (&expect, bytchk) {
                (Some(d), 1) => first_difference(&got, &d[usize::try_from(done).unwrap_or(0)..]),
                (Some(d), 3) => got
                    .chunks(d.len())
                    .enumerate()
                    .find_map(|(i, blk)| first_difference(blk, d).map(|at| i * d.len() + at)),
                _ => None,
            };
            if let Some(at) = at {
                return Err(Sense::miscompare(done + at as u64).into());
            }
            done += n;
        }
        Ok(Bytes::new())
    }

    /// ORWRITE(16): ORs the data-out into the blocks, atomically against other writers.
    pub(crate) async fn or_write(&self, io: Io, data: &Bytes) -> Reply {
        let Some((offset, data)) = self.write_target(&io, data)? else { return Ok(Bytes::new()) };
        let _exclusive = self.exclusive().await;
        let old = self.read_range(offset, data.len() as u64).await.map_err(read_error)?;
        let mut new = BytesMut::from(&old[..]);
        for (n, d) in new.iter_mut().zip(data.iter()) {
            *n |= d;
        }
        self.write_range(offset, new.freeze(), self.durability(io.fua)).await.map_err(write_error)?;
        Ok(Bytes::new())
    }

    /// Most blocks one WRITE ATOMIC(16) may write.
    pub(crate) fn max_atomic_blocks(&self) -> u32 {
        self.max_transfer_blocks()
    }

    /// WRITE ATOMIC(16): no other write, COMPARE AND WRITE or ORWRITE interleaves with it.
    /// Reads take no lock (they are the hot path), so a concurrent READ of the same blocks
    /// may see part of it, and a crash may tear it as it may any write (`BlockIo`).
    pub(crate) async fn write_atomic(&self, io: Io, boundary: u16, data: &Bytes) -> Reply {
        no_protection(&io)?;
        if boundary != 0 {
            return Err(Sense::invalid_cdb(10, None).into());
        }
        let (offset, len) = self.extent(io.lba, u64::from(io.blocks))?;
        if io.blocks > self.max_atomic_blocks() {
            return Err(Sense::invalid_cdb(12, None).into());
        }
        self.writable()?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        if (data.len() as u64) < len {
            return Err(Sense::invalid_cdb(12, None).into());
        }
        let data = data.slice(..usize::try_from(len).unwrap_or(0));
        let _exclusive = self.exclusive().await;
        self.write_range(offset, data, self.durability(io.fua)).await.map_err(write_error)?;
        Ok(Bytes::new())
    }

    /// COMPARE AND WRITE: the data-out is the compare data followed by the write data.
    pub(crate) async fn compare_and_write(&self, io: Io, data: &Bytes) -> Reply {
        no_protection(&io)?;
        let (offset, len) = self.extent(io.lba, u64::from(io.blocks))?;
        self.writable()?;
        if data.len() as u64 != 2 * len {
            return Err(Sense::invalid_cdb(13, None).into());
        }
        if len == 0 {
            return Ok(Bytes::new());
        }
        let half = usize::try_from(len).unwrap_or(0);
        let _exclusive = self.exclusive().await;
        let current = self.read_range(offset, len).await.map_err(read_error)?;
        if let Some(at) = first_difference(&data[..half], &current) {
            return Err(Sense::miscompare(at as u64).into());
        }
        self.write_range(offset, data.slice(half..), self.durability(io.fua)).await.map_err(write_error)?;
        Ok(Bytes::new())
    }

    /// Most blocks one WRITE SAME may cover: [`MAX_WRITE_SAME_BYTES`], and fewer than
    /// 65536 blocks (a whole number of physical blocks). libiscsi's WriteSame16.Unmap,
    /// given a limit of 65536 blocks or more, first writes that many with one WRITE(16),
    /// past MAXIMUM TRANSFER LENGTH; only 512-byte logical blocks reach that limit.
    pub(crate) fn max_write_same_blocks(&self) -> u64 {
        let below = (1 << 16) - self.blocks_per_physical();
        (MAX_WRITE_SAME_BYTES / u64::from(self.block_size)).min(below)
    }

    /// WRITE SAME(10/16). UNMAP=1 releases the blocks (they read back as zeroes, LBPRZ=1;
    /// on a 512e LU only whole device blocks are released and the partial ones at the edges
    /// are written with zeroes); zeroes are written as zeroes; any other pattern is written
    /// a chunk at a time.
    pub(crate) async fn write_same(
        &self,
        io: Io,
        unmap: bool,
        anchor: bool,
        ndob: bool,
        data: &Bytes,
    ) -> Reply {
        no_protection(&io)?;
        if anchor {
            // ANCHOR needs ANC_SUP, which is not offered.
            return Err(Sense::invalid_cdb(1, Some(4)).into());
        }
        let blocks = match io.blocks {
            0 if io.lba > self.blocks => return Err(Sense::lba_out_of_range().into()),
            0 => self.blocks - io.lba,
            n => u64::from(n),
        };
        let (offset, len) = self.extent(io.lba, blocks)?;
        if blocks > self.max_write_same_blocks() {
            return Err(Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00).into());
        }
        self.writable()?;
        let bs = usize::try_from(self.block_size).unwrap_or(0);
        if !ndob && data.len() != bs {
            return Err(Sense::invalid_cdb(1, None).into());
        }
        if len == 0 {
            return Ok(Bytes::new());
        }
        let _guard = self.write_guard(offset, len).await;
        if unmap || ndob || data.iter().all(|&b| b == 0) {
            self.zero_range(offset, len, unmap).await.map_err(write_error)?;
        } else {
            self.write_pattern(offset, len, &data[..bs]).await?;
        }
        Ok(Bytes::new())
    }

    /// Writes `pattern` (one logical block) over `len` bytes at `offset`, under the
    /// caller's [`LogicalUnit::write_guard`]: the partial device blocks at the edges by
    /// read-modify-write, the whole ones between them a chunk at a time.
    pub(crate) async fn write_pattern(&self, offset: u64, len: u64, pattern: &[u8]) -> Result<(), Sense> {
        let dbs = u64::from(self.device_block_size);
        let chunk_len = ((CHUNK / dbs).max(1) * dbs).min(len);
        let mut chunk = BytesMut::with_capacity(usize::try_from(chunk_len).unwrap_or(0));
        while (chunk.len() as u64) < chunk_len {
            let room = usize::try_from(chunk_len).unwrap_or(0) - chunk.len();
            chunk.extend_from_slice(&pattern[..pattern.len().min(room)]);
        }
        let chunk = chunk.freeze();
        // Every piece starts on a logical block, so the chunk's start fits each of them.
        let piece = |n: u64| chunk.slice(..usize::try_from(n).unwrap_or(0));
        let pieces = self.pieces(offset, len);
        if let Some((at, n)) = pieces.head {
            self.write_range(at, piece(n), self.durability(false)).await.map_err(write_error)?;
        }
        if let Some((at, len)) = pieces.middle {
            let mut done = 0;
            while done < len {
                let n = chunk_len.min(len - done);
                self.device.write(at + done, piece(n), self.durability(false)).await.map_err(write_error)?;
                done += n;
            }
        }
        if let Some((at, n)) = pieces.tail {
            self.write_range(at, piece(n), self.durability(false)).await.map_err(write_error)?;
        }
        Ok(())
    }

    /// UNMAP with its parameter list (SBC-3 §5.28). On a 512e LU the partial device blocks at
    /// the edges of a range are written with zeroes instead of released.
    pub(crate) async fn unmap(&self, anchor: bool, length: u32, data: &Bytes) -> Reply {
        if anchor {
            return Err(Sense::invalid_cdb(1, Some(0)).into());
        }
        self.writable()?;
        let length = usize::try_from(length).unwrap_or(usize::MAX);
        if length == 0 {
            return Ok(Bytes::new());
        }
        if length < 8 || data.len() < 8 {
            return Err(Sense::param_list_length().into());
        }
        let p = &data[..length.min(data.len())];
        let described = usize::from(u16::from_be_bytes([p[2], p[3]]));
        let count = described.min(p.len() - 8) / 16;
        if count > MAX_UNMAP_DESCRIPTORS as usize {
            return Err(Sense::invalid_param(2, None).into());
        }
        let mut ranges = Vec::with_capacity(count);
        let mut total = 0u64;
        for i in 0..count {
            let d = &p[8 + 16 * i..24 + 16 * i];
            let lba = u64::from_be_bytes(d[0..8].try_into().unwrap_or_default());
            let blocks = u32::from_be_bytes(d[8..12].try_into().unwrap_or_default());
            total += u64::from(blocks);
            if total > u64::from(MAX_UNMAP_BLOCKS) {
                return Err(Sense::invalid_param(8 + 16 * i + 8, None).into());
            }
            let (offset, len) = self.extent(lba, u64::from(blocks))?;
            if len > 0 {
                ranges.push((offset, len));
            }
        }
        let aligned = ranges.iter().all(|&(offset, len)| self.device_aligned(offset, len));
        let _guard = self.guard(aligned).await;
        for (offset, len) in ranges {
            self.zero_range(offset, len, true).await.map_err(write_error)?;
        }
        Ok(Bytes::new())
    }

    /// PRE-FETCH(10/16): GOOD without promising the blocks are cached.
    pub(crate) fn pre_fetch(&self, lba: u64, blocks: u32) -> Reply {
        self.extent(lba, u64::from(blocks))?;
        Ok(Bytes::new())
    }

    /// SYNCHRONIZE CACHE(10/16): a flush of the whole device (it has one cache).
    pub(crate) async fn sync_cache(&self, lba: u64, blocks: u32) -> Reply {
        if blocks != 0 {
            self.extent(lba, u64::from(blocks))?;
        } else if lba > self.blocks {
            return Err(Sense::lba_out_of_range().into());
        }
        self.device.flush().await.map_err(write_error)?;
        Ok(Bytes::new())
    }

    /// GET LBA STATUS: mapped and deallocated runs from `lba`, from the device's holes.
    ///
    /// The device maps and releases whole device blocks, so on a 512e LU every descriptor
    /// covers whole physical blocks. A `lba` inside a physical block is answered from the
    /// next physical block (libiscsi's GetLBAStatus.UnmapSingle expects exactly that:
    /// asked about LBA 9 with 8 logical blocks per physical block, the first descriptor
    /// starts at 16), except in the last physical block, which is described from `lba`.
    pub(crate) async fn get_lba_status(&self, lba: u64, allocation: u32) -> Reply {
        if lba >= self.blocks {
            return Err(Sense::lba_out_of_range().into());
        }
        let max = usize::try_from((allocation.saturating_sub(8) / 16).clamp(1, 128)).unwrap_or(1);
        let bs = u64::from(self.block_size);
        let per = self.blocks_per_physical();
        let physical = lba - lba % per;
        let (mut next, report_from) = match physical + per {
            _ if physical == lba => (lba, lba),
            up if up < self.blocks => (up, up),
            _ => (physical, lba),
        };
        // (first LBA, blocks, deallocated), adjacent runs of one kind merged. A device may
        // describe only a prefix of what it was asked about: ask again from where it
        // stopped until the descriptors are full or the LU is covered. `next` is always on
        // a device block; nothing before `report_from` is reported.
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        'ask: while next < self.blocks {
            let (offset, len) = self.extent(next, self.blocks - next)?;
            let spans = self.device.allocation(offset, len).await.map_err(read_error)?;
            let before = next;
            for span in spans {
                let blocks = (span.len / bs).min(self.blocks - next);
                if blocks == 0 {
                    break;
                }
                let first = next.max(report_from);
                next += blocks;
                if first >= next {
                    continue;
                }
                let count = runs.len();
                match runs.last_mut() {
                    Some(last) if last.2 == span.hole => last.1 += next - first,
                    _ if count == max => break 'ask,
                    _ => runs.push((first, next - first, span.hole)),
                }
            }
            if next == before {
                break;
            }
        }
        if runs.is_empty() {
            runs.push((report_from, 1, false));
        }
        let mut out = Vec::with_capacity(8 + 16 * runs.len());
        out.extend_from_slice(&[0; 8]);
        for (first, mut blocks, hole) in runs {
            let mut first = first;
            while blocks > 0 && out.len() < 8 + 16 * max {
                let n = blocks.min(u64::from(u32::MAX));
                out.extend_from_slice(&first.to_be_bytes());
                out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
                out.extend_from_slice(&[u8::from(hole), 0, 0, 0]);
                first += n;
                blocks -= n;
            }
        }
        let data_len = u32::try_from(out.len() - 4).unwrap_or(u32::MAX);
        out[0..4].copy_from_slice(&data_len.to_be_bytes());
        Ok(Bytes::from(out))
    }

    /// READ CAPACITY(10).
    pub(crate) fn read_capacity_10(&self) -> Reply {
        let last = u32::try_from(self.blocks.saturating_sub(1)).unwrap_or(u32::MAX);
        let mut out = Vec::with_capacity(8);
        out.extend_from_slice(&last.to_be_bytes());
        out.extend_from_slice(&self.block_size.to_be_bytes());
        Ok(Bytes::from(out))
    }

    /// READ CAPACITY(16): thin provisioned (LBPME), unmapped blocks read as zeroes
    /// (LBPRZ), no protection information; LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT is 0
    /// on a native LU and 3 on a 512e one (eight 512-byte blocks per 4 KiB device block),
    /// LBA 0 starting a physical block (LOWEST ALIGNED LOGICAL BLOCK ADDRESS 0).
    pub(crate) fn read_capacity_16(&self) -> Reply {
        let mut out = vec![0u8; 32];
        out[0..8].copy_from_slice(&self.blocks.saturating_sub(1).to_be_bytes());
        out[8..12].copy_from_slice(&self.block_size.to_be_bytes());
        out[13] = u8::try_from(self.blocks_per_physical().trailing_zeros()).unwrap_or(0) & 0x0F;
        out[14] = 0x80 | 0x40;
        Ok(Bytes::from(out))
    }
}
