//! Parity (RAID 5 and RAID 6): rotating parity over `n` members, `d = n - level` data
//! chunks per row.
//!
//! ```text
//!   row 0:  D0  D1  D2  Q   P        P sits on member n-1-(row % n),
//!   row 1:  D1  D2  Q   P   D0       Q (RAID 6) on the member after P,
//!   row 2:  D2  Q   P   D0  D1       data chunks follow round the ring.
//! ```
//!
//! Writes take the row's lock (parity is shared by the whole row). A small write reads the
//! old data and parity and applies the difference (read-modify-write); a write covering
//! most of a row reads the rest of the row and computes parity afresh; a full row is
//! written without reading. A member that fails is read around: its chunks are rebuilt
//! from the rest of the row. The write-intent bitmap makes a crash cost a resync of the
//! dirty rows only, which closes the RAID 5 write hole.
//!
//! A member whose device has no space left is not failed: the write fails with no space,
//! and since some members of the row may have taken it and others not, the row's parity no
//! longer matches its data. The row is recorded as stale (its write-intent regions stay
//! set) and its parity is computed afresh from its data at the next flush that finds
//! space, or at open after a crash. Reads of data go to the data's own member and are not
//! affected. While the controller runs, nothing is ever rebuilt from a stale row: with a
//! member failed (before or after the write that ran out of space) its chunk would come
//! from parity that does not match, and a stale row cannot be repaired while degraded, so
//! reads of that chunk and writes that would need it fail with [`IoError::NoCurrentCopy`]
//! until a write covers the whole row (or its failed chunks) and makes it whole again.
//! Stale rows are kept in memory only. Across a restart their regions stay set in the
//! bitmap, so with every member present the resync at open recomputes their parity; but a
//! restart while a member is missing cannot, and forgets which rows were stale: a degraded
//! read may then rebuild a chunk from parity that does not match, the same write hole as
//! after any crash while degraded, and the open logs the write-hole warning for the dirty
//! regions.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, join_all};
use strata_block::{BlockIo, Durability, Geometry, IoError, IoOp};
use tokio::sync::Mutex;

use super::bitmap::Bitmap;
use super::divergence::RangeSet;
use super::members::Members;
use super::{Piece, gf, pieces, read_parts, to_usize};
use crate::spec::ParityLevel;
use crate::tree::{NodeHealth, Redundant};

const ROW_LOCKS: usize = 1024;

pub(crate) struct Parity {
    members: Members,
    parity: usize,
    data_width: usize,
    chunk: u64,
    row_locks: Vec<Mutex<()>>,
    /// Rows whose parity may not match their data after a no-space error.
    stale_rows: parking_lot::Mutex<RangeSet>,
    geometry: Geometry,
}

/// New data for part of one chunk of a row.
struct Part {
    /// Data chunk index in the row.
    k: usize,
    /// Offset inside the chunk.
    at: u64,
    data: Bytes,
}

/// The buffers of one row over a byte range, indexed by member; `None` is unknown.
type RowBuffers = Vec<Option<Vec<u8>>>;

impl Parity {
    pub(crate) fn new(
        level: ParityLevel,
        chunk: u64,
        members: Vec<Arc<dyn BlockIo>>,
        bitmap_region: u64,
        bitmap_copies: Vec<Arc<dyn BlockIo>>,
    ) -> Self {
        let parity = level.parity_members();
        let data_width = members.len() - parity;
        let member_size = members.iter().map(|m| m.geometry().size_bytes).min().unwrap_or(0) / chunk * chunk;
        let block_size = members.iter().map(|m| m.geometry().block_size).max().unwrap_or(512);
        let size_bytes = member_size.saturating_mul(data_width as u64);
        Self {
            members: Members::new(members, Bitmap::new(size_bytes, bitmap_region, bitmap_copies), parity),
            parity,
            data_width,
            chunk,
            row_locks: (0..ROW_LOCKS).map(|_| Mutex::new(())).collect(),
            stale_rows: parking_lot::Mutex::new(RangeSet::default()),
            geometry: Geometry { block_size, size_bytes },
        }
    }

    fn n(&self) -> usize {
        self.members.len()
    }

    fn p_member(&self, row: u64) -> usize {
        self.n() - 1 - to_usize(row % self.n() as u64)
    }

    fn q_member(&self, row: u64) -> Option<usize> {
        (self.parity == 2).then(|| (self.p_member(row) + 1) % self.n())
    }

    fn data_member(&self, row: u64, k: usize) -> usize {
        (self.p_member(row) + self.parity + k) % self.n()
    }

    fn lock(&self, row: u64) -> &Mutex<()> {
        &self.row_locks[to_usize(row % ROW_LOCKS as u64)]
    }

    /// Reads `[lo, lo + len)` of the row from every healthy member not in `skip`.
    async fn read_row(&self, row: u64, lo: u64, len: u64, skip: &[bool]) -> Result<RowBuffers, IoError> {
        let base = row * self.chunk + lo;
        let wanted: Vec<usize> = (0..self.n()).filter(|&m| !skip[m] && !self.members.is_failed(m)).collect();
        let reads = join_all(wanted.iter().map(|&m| self.members.get(m).read(base, len))).await;
        let mut bufs: RowBuffers = vec![None; self.n()];
        for (&m, read) in wanted.iter().zip(reads) {
            match read {
                Ok(data) => bufs[m] = Some(data.to_vec()),
                Err(e) => self.members.absorb(m, e).await?,
            }
        }
        Ok(bufs)
    }

    /// Fills every `None` in `bufs` from the rest of the row; false if too many are unknown.
    fn solve(&self, row: u64, bufs: &mut RowBuffers, len: u64) -> bool {
        let mut data: Vec<Option<Vec<u8>>> =
            (0..self.data_width).map(|k| bufs[self.data_member(row, k)].take()).collect();
        let mut p = bufs[self.p_member(row)].take();
        let mut q = self.q_member(row).and_then(|m| bufs[m].take());
        let solved = gf::reconstruct(&mut data, &mut p, &mut q, self.parity == 2, to_usize(len));
        for (k, d) in data.into_iter().enumerate() {
            bufs[self.data_member(row, k)] = d;
        }
        bufs[self.p_member(row)] = p;
        if let Some(qm) = self.q_member(row) {
            bufs[qm] = q;
        }
        solved
    }

    /// Reads one piece of data chunk `k` into `buf`, rebuilding it from the row if its
    /// member failed.
    async fn read_piece(&self, row: u64, k: usize, at: u64, buf: BytesMut) -> Result<BytesMut, IoError> {
        let len = buf.len() as u64;
        let m = self.data_member(row, k);
        if !self.members.is_failed(m) {
            match self.members.get(m).read_into(row * self.chunk + at, buf).await {
                Ok(data) => return Ok(data),
                Err(e) => self.members.absorb(m, e).await?,
            }
        }
        self.rebuild_piece(row, m, at, len).await
    }

    /// Rebuilds `len` bytes at `at` of member `m`'s chunk in `row` from the rest of the row;
    /// refuses a stale row, whose parity would rebuild wrong data.
    fn rebuild_piece(
        &self,
        row: u64,
        m: usize,
        at: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<BytesMut, IoError>> {
        Box::pin(async move {
            let _row = self.lock(row).lock().await;
            if self.is_stale(row) {
                return Err(self.no_current_copy(IoOp::Read, row));
            }
            let mut bufs = self.read_row(row, at, len, &vec![false; self.n()]).await?;
            if !self.solve(row, &mut bufs, len) {
                return Err(self.members.too_many(IoOp::Read, row));
            }
            Ok(BytesMut::from(&bufs[m].take().expect("solved")[..]))
        })
    }

    /// True if the parity of `row` may not match its data (see [`Parity::mark_stale`]).
    fn is_stale(&self, row: u64) -> bool {
        self.stale_rows.lock().overlaps(&(row..row + 1))
    }

    /// The error for a request that would need a failed member's chunk of a stale row.
    fn no_current_copy(&self, op: IoOp, row: u64) -> IoError {
        IoError::NoCurrentCopy { op, offset: row * self.chunk * self.data_width as u64 }
    }

    /// Row and data chunk index of a piece.
    fn place(&self, p: &Piece) -> (u64, usize) {
        let d = self.data_width as u64;
        (p.unit / d, to_usize(p.unit % d))
    }

    /// Writes parts of one row, keeping its parity right.
    async fn write_row(&self, row: u64, parts: Vec<Part>, durability: Durability) -> Result<(), IoError> {
        let _row = self.lock(row).lock().await;
        let lo = parts.iter().map(|p| p.at).min().expect("at least one part");
        let hi = parts.iter().map(|p| p.at + p.data.len() as u64).max().expect("at least one part");
        let len = hi - lo;
        let full: Vec<bool> = (0..self.data_width)
            .map(|k| parts.iter().any(|p| p.k == k && p.at == lo && p.data.len() as u64 == len))
            .collect();
        let healthy = self.members.failed_count() == 0;
        let rmw_reads = parts.len() + self.parity;
        let rcw_reads = full.iter().filter(|f| !**f).count();
        if healthy
            && rmw_reads < rcw_reads
            && let Some((p, q)) = self.read_modify_write(row, &parts, lo, len).await?
        {
            return self.write_members(row, self.row_writes(row, &parts, lo, p, q), durability).await;
        }
        // Reconstruct-write: know the whole row over [lo, hi), overlay, recompute parity.
        let mut skip = vec![false; self.n()];
        if healthy {
            // Parity will be recomputed and fully covered chunks overwritten: skip reading them.
            skip[self.p_member(row)] = true;
            if let Some(q) = self.q_member(row) {
                skip[q] = true;
            }
            (0..self.data_width).filter(|&k| full[k]).for_each(|k| skip[self.data_member(row, k)] = true);
        }
        let mut bufs = self.read_row(row, lo, len, &skip).await?;
        if (0..self.n()).any(|m| bufs[m].is_none() && !skip[m]) {
            // A member is missing: read everything and rebuild the unknown chunks.
            if healthy {
                bufs = self.read_row(row, lo, len, &vec![false; self.n()]).await?;
            }
            // A stale row's parity cannot stand in for a failed data chunk this write does
            // not wholly replace: the wrong data would be written into the new parity.
            let unknown_kept =
                (0..self.data_width).any(|k| bufs[self.data_member(row, k)].is_none() && !full[k]);
            if unknown_kept && self.is_stale(row) {
                return Err(self.no_current_copy(IoOp::Write, row));
            }
            if !self.solve(row, &mut bufs, len) {
                return Err(self.members.too_many(IoOp::Write, row * self.chunk));
            }
        }
        let mut data: Vec<Vec<u8>> = (0..self.data_width)
            .map(|k| bufs[self.data_member(row, k)].take().unwrap_or_else(|| vec![0; to_usize(len)]))
            .collect();
        for part in &parts {
            let at = to_usize(part.at - lo);
            data[part.k][at..at + part.data.len()].copy_from_slice(&part.data);
        }
        let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        let (p, q) = gf::compute(&refs, self.parity == 2);
        self.write_members(row, self.row_writes(row, &parts, lo, p, q), durability).await?;
        if lo == 0 && len == self.chunk && self.is_stale(row) {
            // Every chunk was known or replaced and parity computed from them: whole again.
            self.mark_whole(row..row + 1);
        }
        Ok(())
    }

    /// The member writes of a row update: the new data, then P (and Q) over `[lo, ..)`.
    fn row_writes(
        &self,
        row: u64,
        parts: &[Part],
        lo: u64,
        p: Vec<u8>,
        q: Option<Vec<u8>>,
    ) -> Vec<(usize, u64, Bytes)> {
        let mut writes: Vec<(usize, u64, Bytes)> =
            parts.iter().map(|part| (self.data_member(row, part.k), part.at, part.data.clone())).collect();
        writes.push((self.p_member(row), lo, Bytes::from(p)));
        if let (Some(qm), Some(q)) = (self.q_member(row), q) {
            writes.push((qm, lo, Bytes::from(q)));
        }
        writes
    }

    /// Reads old data and parity and computes the new parity, `(P, Q)` over `[lo, lo + len)`,
    /// from the difference. Returns `None` if a member failed on the way (the caller falls
    /// back to reconstruct-write).
    async fn read_modify_write(
        &self,
        row: u64,
        parts: &[Part],
        lo: u64,
        len: u64,
    ) -> Result<Option<(Vec<u8>, Option<Vec<u8>>)>, IoError> {
        let base = row * self.chunk;
        let mut targets: Vec<(usize, u64, u64)> =
            parts.iter().map(|p| (self.data_member(row, p.k), p.at, p.data.len() as u64)).collect();
        targets.push((self.p_member(row), lo, len));
        if let Some(q) = self.q_member(row) {
            targets.push((q, lo, len));
        }
        let reads = join_all(targets.iter().map(|&(m, at, n)| self.members.get(m).read(base + at, n))).await;
        let mut old = Vec::with_capacity(reads.len());
        for (&(m, _, _), read) in targets.iter().zip(reads) {
            match read {
                Ok(data) => old.push(data),
                Err(e) => {
                    self.members.absorb(m, e).await?;
                    return Ok(None);
                }
            }
        }
        let mut p = old[parts.len()].to_vec();
        let mut q = (self.parity == 2).then(|| old[parts.len() + 1].to_vec());
        for (part, old) in parts.iter().zip(&old) {
            let mut delta = old.to_vec();
            gf::xor_into(&mut delta, &part.data);
            let at = to_usize(part.at - lo);
            gf::xor_into(&mut p[at..at + delta.len()], &delta);
            if let Some(q) = &mut q {
                gf::mul_xor_into(&mut q[at..at + delta.len()], &delta, gf::pow2(part.k));
            }
        }
        Ok(Some((p, q)))
    }

    /// Issues chunk writes `(member, offset in chunk, data)` to healthy members.
    async fn write_members(
        &self,
        row: u64,
        writes: Vec<(usize, u64, Bytes)>,
        durability: Durability,
    ) -> Result<(), IoError> {
        let base = row * self.chunk;
        let writes: Vec<_> = writes.into_iter().filter(|(m, _, _)| !self.members.is_failed(*m)).collect();
        let results = join_all(
            writes
                .iter()
                .map(|(m, at, data)| self.members.get(*m).write(base + at, data.clone(), durability)),
        )
        .await;
        let mut no_space = None;
        for ((m, _, _), result) in writes.iter().zip(results) {
            match result {
                Ok(()) => {}
                Err(e) if e.is_no_space() => no_space = Some(e),
                Err(e) => self.members.absorb(*m, e).await?,
            }
        }
        match no_space {
            Some(e) => {
                self.mark_stale(row..row + 1);
                Err(e)
            }
            None => Ok(()),
        }
    }

    /// Records that the parity of `rows` may not match their data (a member ran out of
    /// space mid-row), and pins their write-intent regions until it is recomputed.
    fn mark_stale(&self, rows: std::ops::Range<u64>) {
        self.stale_rows.lock().insert(rows.clone());
        self.repin(rows);
    }

    /// Records that `rows` hold parity computed from their data again.
    fn mark_whole(&self, rows: std::ops::Range<u64>) {
        self.stale_rows.lock().remove(rows.clone());
        self.repin(rows);
    }

    /// Pins the bitmap regions of `rows` that hold stale rows, unpins the others.
    fn repin(&self, rows: std::ops::Range<u64>) {
        let row_bytes = self.chunk * self.data_width as u64;
        let (offset, len) = (rows.start * row_bytes, (rows.end - rows.start) * row_bytes);
        let len = len.min(self.geometry.size_bytes.saturating_sub(offset));
        self.members.bitmap.pin(offset, len, |start, end| {
            self.stale_rows.lock().overlaps(&(start / row_bytes..end.div_ceil(row_bytes)))
        });
    }

    /// Computes afresh the parity of every stale row (at a flush, once space may have been
    /// freed). A row still out of space stays stale, and so does one with a failed data
    /// member (its data is not known: only a write can make it whole).
    async fn repair_stale_rows(&self) {
        let stale: Vec<std::ops::Range<u64>> = self.stale_rows.lock().ranges().collect();
        for rows in stale {
            for row in rows.clone() {
                match self.resync_row(row, &[]).await {
                    Ok(()) => self.stale_rows.lock().remove(row..row + 1),
                    Err(e) if e.is_no_space() => {
                        tracing::debug!(row, error = %e, "parity of a stale row not recomputed yet");
                        self.repin(rows);
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(row, error = %e, "a stale row cannot be recomputed while degraded")
                    }
                }
            }
            self.repin(rows);
        }
    }

    /// Splits a request into rows: `(row, parts)`.
    fn rows(&self, offset: u64, data: &Bytes) -> Vec<(u64, Vec<Part>)> {
        let mut rows: Vec<(u64, Vec<Part>)> = Vec::new();
        for piece in pieces(offset, data.len() as u64, self.chunk) {
            let row = piece.unit / self.data_width as u64;
            let k = to_usize(piece.unit % self.data_width as u64);
            let start = to_usize(piece.offset_in_request);
            let part =
                Part { k, at: piece.offset_in_unit, data: data.slice(start..start + to_usize(piece.len)) };
            match rows.last_mut() {
                Some((r, parts)) if *r == row => parts.push(part),
                _ => rows.push((row, vec![part])),
            }
        }
        rows
    }

    /// Discard or write-zeroes: whole rows go to every member at once (zero data has zero
    /// parity, and a run of rows is one contiguous range on each member); the partial rows
    /// at either end are written as zeroes through the parity path.
    async fn zero_range(&self, op: IoOp, offset: u64, len: u64) -> Result<(), IoError> {
        self.geometry.check(op, offset, len)?;
        let _guard = self.members.bitmap.start_write(offset, len).await?;
        let row_bytes = self.chunk * self.data_width as u64;
        let end = offset + len;
        let first_full = offset.div_ceil(row_bytes);
        let end_full = (end / row_bytes).max(first_full);
        let mut partial = Vec::new();
        if first_full == end_full {
            partial.push((offset, end));
        } else {
            partial.push((offset, first_full * row_bytes));
            partial.push((end_full * row_bytes, end));
        }
        for (from, to) in partial.into_iter().filter(|(from, to)| from < to) {
            let zeroes = strata_block::zeroes(to - from);
            for (row, parts) in self.rows(from, &zeroes) {
                self.write_row(row, parts, Durability::Cached).await?;
            }
        }
        if first_full < end_full {
            let _rows = self.lock_rows(first_full, end_full).await;
            let (base, n) = (first_full * self.chunk, (end_full - first_full) * self.chunk);
            let live = self.members.live();
            let results = join_all(live.iter().map(|&m| match op {
                IoOp::Discard => self.members.get(m).discard(base, n),
                _ => self.members.get(m).write_zeroes(base, n),
            }))
            .await;
            let mut no_space = None;
            for (&m, result) in live.iter().zip(results) {
                match result {
                    Ok(()) => {}
                    Err(e) if e.is_no_space() => no_space = Some(e),
                    Err(e) => self.members.absorb(m, e).await?,
                }
            }
            if let Some(e) = no_space {
                self.mark_stale(first_full..end_full);
                return Err(e);
            }
            if self.stale_rows.lock().overlaps(&(first_full..end_full)) {
                // Zero data with zero parity on every member in service.
                self.mark_whole(first_full..end_full);
            }
        }
        Ok(())
    }

    /// Locks every row in `[first, end)`, in lock order so two callers cannot deadlock.
    async fn lock_rows(&self, first: u64, end: u64) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        let mut indexes: Vec<usize> = if end - first >= ROW_LOCKS as u64 {
            (0..ROW_LOCKS).collect()
        } else {
            (first..end).map(|r| to_usize(r % ROW_LOCKS as u64)).collect()
        };
        indexes.sort_unstable();
        indexes.dedup();
        let mut guards = Vec::with_capacity(indexes.len());
        for i in indexes {
            guards.push(self.row_locks[i].lock().await);
        }
        guards
    }

    /// Makes one row consistent again: rebuilds `stale` members, or recomputes parity when
    /// none is stale.
    async fn resync_row(&self, row: u64, stale: &[usize]) -> Result<(), IoError> {
        let _row = self.lock(row).lock().await;
        let mut skip = vec![false; self.n()];
        let rebuild: Vec<usize> = if stale.is_empty() {
            std::iter::once(self.p_member(row)).chain(self.q_member(row)).collect()
        } else {
            stale.to_vec()
        };
        rebuild.iter().for_each(|&m| skip[m] = true);
        let mut bufs = self.read_row(row, 0, self.chunk, &skip).await?;
        if !self.solve(row, &mut bufs, self.chunk) {
            return Err(self.members.too_many(IoOp::Read, row * self.chunk));
        }
        let writes = rebuild
            .iter()
            .filter(|&&m| !self.members.is_failed(m))
            .map(|&m| (m, 0, Bytes::from(bufs[m].take().expect("solved"))))
            .collect();
        self.write_members(row, writes, Durability::Cached).await
    }
}

#[async_trait]
impl BlockIo for Parity {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, IoError> {
        Ok(self.read_into(offset, BytesMut::zeroed(to_usize(len))).await?.freeze())
    }

    async fn read_into(&self, offset: u64, buf: BytesMut) -> Result<BytesMut, IoError> {
        self.geometry.check(IoOp::Read, offset, buf.len() as u64)?;
        let parts: Vec<Piece> = pieces(offset, buf.len() as u64, self.chunk).collect();
        if let [piece] = parts[..] {
            let (row, k) = self.place(&piece);
            return self.read_piece(row, k, piece.offset_in_unit, buf).await;
        }
        read_parts(buf, parts.iter().map(|p| p.len), |i, part| {
            let (row, k) = self.place(&parts[i]);
            self.read_piece(row, k, parts[i].offset_in_unit, part)
        })
        .await
    }

    async fn write(&self, offset: u64, data: Bytes, durability: Durability) -> Result<(), IoError> {
        self.geometry.check(IoOp::Write, offset, data.len() as u64)?;
        let _guard = self.members.bitmap.start_write(offset, data.len() as u64).await?;
        // Every row runs to completion even if another fails (see `Split::write`).
        let rows = self.rows(offset, &data);
        join_all(rows.into_iter().map(|(row, parts)| self.write_row(row, parts, durability)))
            .await
            .into_iter()
            .collect()
    }

    async fn flush(&self) -> Result<(), IoError> {
        if !self.stale_rows.lock().is_empty() {
            self.repair_stale_rows().await;
        }
        let mark = self.members.bitmap.flush_mark();
        let live = self.members.live();
        let results = join_all(live.iter().map(|&m| self.members.get(m).flush())).await;
        for (&m, result) in live.iter().zip(results) {
            if let Err(e) = result {
                self.members.absorb(m, e).await?;
            }
        }
        self.members.bitmap.after_flush(mark).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.zero_range(IoOp::Discard, offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.zero_range(IoOp::WriteZeroes, offset, len).await
    }
}

#[async_trait]
impl Redundant for Parity {
    async fn initialize(&self) -> Result<(), IoError> {
        self.members.bitmap.initialize().await
    }

    async fn recover(&self) -> Result<usize, IoError> {
        let loaded = self.members.bitmap.load().await;
        let missing = self.members.probe(u64::from(self.geometry.block_size)).await;
        if loaded.is_clean() && missing == 0 {
            return Ok(0);
        }
        let stale: Vec<usize> = (0..self.n())
            .filter(|&m| loaded.failed_mask & (1 << m) != 0 && missing & (1 << m) == 0)
            .collect();
        if missing != 0 && stale.is_empty() {
            // Degraded: parity cannot be checked without the missing member. The bits stay
            // set until it returns.
            if !loaded.dirty.is_empty() {
                tracing::error!(
                    dirty = loaded.dirty.len(),
                    "parity set was not shut down cleanly and a member is missing: rows written \
                     at the crash may rebuild the missing member's data wrongly (write hole)"
                );
            }
            self.members.bitmap.resynced(missing, 0).await?;
            return Ok(0);
        }
        let row_bytes = self.chunk * self.data_width as u64;
        let region = self.members.bitmap.region_size();
        // Dirty regions come in ascending order; a row spanning two regions is done once.
        let mut next_row = 0;
        for r in &loaded.dirty {
            let start = *r as u64 * region;
            let end = (start + region).min(self.geometry.size_bytes);
            for row in (start / row_bytes).max(next_row)..end.div_ceil(row_bytes) {
                match self.resync_row(row, &stale).await {
                    // Parity only: the row stays stale (marked by the write) until a flush
                    // finds space. A member being rebuilt has no such fallback.
                    Err(e) if e.is_no_space() && stale.is_empty() => {
                        tracing::warn!(row, error = %e, "resync found no space; parity is recomputed once space is freed");
                    }
                    result => result?,
                }
                next_row = row + 1;
            }
        }
        for m in (0..self.n()).filter(|m| missing & (1 << m) == 0) {
            self.members.get(m).flush().await?;
        }
        // Members that failed during the resync stay recorded as failed.
        self.members.bitmap.resynced(missing | self.members.failed_mask(), 0).await?;
        Ok(loaded.dirty.len())
    }

    fn health(&self) -> NodeHealth {
        self.members.health()
    }
}
