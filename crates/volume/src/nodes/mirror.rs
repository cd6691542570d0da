//! Mirror (RAID 1): every leg holds the whole node. Reads are spread over the healthy legs
//! by address and fall over to the next leg on error; writes go to every healthy leg and
//! succeed while one leg takes them. A leg that fails is recorded in the write-intent
//! bitmap, so when it comes back only the regions written meanwhile are copied to it.
//!
//! A leg whose device has no space left is not failed: the write fails with no space, and
//! the legs that did not take it lag over its range (`divergence.rs`) until a later write
//! reaches every leg or a flush copies the range over; meanwhile reads of it go to a leg
//! that has it, and its write-intent regions stay set. If every leg that has it fails, the
//! reads fail ([`IoError::NoCurrentCopy`]) rather than return the older data a host may
//! already have seen replaced, until a write of the range reaches every leg in service.
//!
//! Which leg a restart resyncs from. A write is acknowledged only once every leg in
//! service took it (a leg out of space fails the write), and a leg is taken out of service
//! only after the bitmap records it as failed. So a leg the bitmap does not record as
//! failed holds every acknowledged write, and the resync at open copies the dirty regions
//! from the first such leg. Where legs lag at run time they differ only by writes that
//! were not acknowledged (the one that ran out of space; a later write over the range is
//! acknowledged only if it reached every leg, and then nothing lags there), so after a
//! crash either version is a valid outcome of a write that failed. A leg that the bitmap
//! records as failed missed acknowledged writes; if the resync at open cannot copy them to
//! it for want of space, it is *behind*: it lags over those regions and stays recorded as
//! failed in the bitmap (see `bitmap.rs`) until it lags nowhere, so a second restart still
//! resyncs from the leg that has the acknowledged writes, never from it.
//!
//! Writes, discards and write-zeroes hold their range in a [`RangeLock`] while the legs
//! are written, so overlapping ones reach every leg in the same order and the copies never
//! disagree; those that share no block do not wait for each other.

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::future::join_all;
use strata_block::{BlockIo, Durability, Geometry, IoError, IoOp, Span};

use super::bitmap::Bitmap;
use super::divergence::Divergence;
use super::members::Members;
use super::range_lock::RangeLock;
use super::{read_parts, to_usize};
use crate::tree::{NodeHealth, Redundant};

pub(crate) struct Mirror {
    legs: Members,
    /// Orders overlapping changes of data: each leg takes them in the order they came.
    changes: RangeLock,
    /// Where legs lag after running out of space.
    divergence: Divergence,
    geometry: Geometry,
}

/// Reads of one span of this many bytes go to the same leg first.
const READ_SPAN_SHIFT: u32 = 20;

/// Largest piece copied at once during a resync.
const RESYNC_PIECE: u64 = 1 << 20;

impl Mirror {
    /// Reads into `buf` at `offset` from one leg, as [`Mirror::read_any`] picks it.
    async fn read_leg_into(&self, offset: u64, buf: BytesMut) -> Result<BytesMut, IoError> {
        let len = buf.len();
        let mut buf = Some(buf);
        // A failed read consumed the buffer: a retry reads into a fresh one.
        self.read_any(offset..offset + len as u64, |leg| {
            leg.read_into(offset, buf.take().unwrap_or_else(|| BytesMut::zeroed(len)))
        })
        .await
    }

    pub(crate) fn new(
        legs: Vec<Arc<dyn BlockIo>>,
        bitmap_region: u64,
        bitmap_copies: Vec<Arc<dyn BlockIo>>,
    ) -> Self {
        let size_bytes = legs.iter().map(|l| l.geometry().size_bytes).min().unwrap_or(0);
        let block_size = legs.iter().map(|l| l.geometry().block_size).max().unwrap_or(512);
        let bitmap = Bitmap::new(size_bytes, bitmap_region, bitmap_copies);
        let tolerance = legs.len() - 1;
        Self {
            divergence: Divergence::new(legs.len()),
            legs: Members::new(legs, bitmap, tolerance),
            changes: RangeLock::new(),
            geometry: Geometry { block_size, size_bytes },
        }
    }

    /// The leg that serves reads of `offset` while it is healthy: spans of 1 MiB take turns
    /// round the legs, so random reads spread evenly and each leg's cache holds different
    /// data, instead of every leg caching everything.
    fn preferred_leg(&self, offset: u64) -> usize {
        usize::try_from((offset >> READ_SPAN_SHIFT) % self.legs.len() as u64).expect("leg index")
    }

    /// Runs `op` over `range` (empty for a flush) on every healthy leg. Fails legs with a
    /// device error; a leg out of space stays in service, the request fails with no space,
    /// and the legs that did not take it lag over `range`. Succeeds if every leg that did
    /// not fail took it, and one did.
    async fn on_all_legs<'a, F, Fut>(&'a self, op: IoOp, range: Range<u64>, f: F) -> Result<(), IoError>
    where
        F: Fn(&'a Arc<dyn BlockIo>) -> Fut,
        Fut: std::future::Future<Output = Result<(), IoError>>,
    {
        let healthy = self.legs.live();
        let results = join_all(healthy.iter().map(|&i| f(self.legs.get(i)))).await;
        let (mut took, mut short, mut no_space, mut failed) = (0u64, 0u64, None, Vec::new());
        for (&leg, result) in healthy.iter().zip(results) {
            match result {
                Ok(()) => took |= 1 << leg,
                Err(e) if e.is_request_error() => return Err(e),
                Err(e) if e.is_no_space() => {
                    short |= 1 << leg;
                    no_space.get_or_insert(e);
                }
                Err(e) => failed.push((leg, e)),
            }
        }
        if self.divergence.after_change(range.clone(), took, short) {
            self.repin(&range);
        }
        for (leg, e) in failed {
            self.legs.fail(leg, &e).await?;
        }
        match no_space {
            Some(e) => Err(e),
            None if took == 0 => Err(self.legs.too_many(op, range.start)),
            None => Ok(()),
        }
    }

    /// Pins the bitmap regions of `range` that hold lagging ranges, unpins the others.
    fn repin(&self, range: &Range<u64>) {
        let len = range.end - range.start;
        self.legs.bitmap.pin(range.start, len, |start, end| self.divergence.overlaps(&(start..end)));
    }

    /// Copies what lags from a leg that has it (at a flush, once space may have been
    /// freed), holding each range against writes. A leg still out of space keeps lagging;
    /// one with a device error is failed.
    async fn catch_up(&self) {
        self.copy_lagging().await;
        // Legs behind since the open that now lag nowhere hold every acknowledged write.
        let behind = self.legs.bitmap.behind();
        let current = (0..self.legs.len())
            .filter(|&l| behind & 1 << l != 0 && !self.divergence.lags(l))
            .fold(0, |m, l| m | 1 << l);
        if current != 0 {
            match self.legs.bitmap.caught_up(current).await {
                Ok(()) => tracing::info!(legs = current, "mirror legs caught up after running out of space"),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot record that mirror legs caught up; retried at the next flush")
                }
            }
        }
    }

    /// Copies each lagging range from a leg that has it.
    async fn copy_lagging(&self) {
        for (leg, range) in self.divergence.snapshot() {
            let _order = self.changes.lock(range.clone()).await;
            for (piece, lagging) in self.divergence.pieces(&range) {
                let source = self.legs.live().into_iter().find(|&l| lagging & 1 << l == 0);
                if lagging & 1 << leg == 0 || self.legs.is_failed(leg) {
                    continue;
                }
                let Some(source) = source else { continue };
                match self.copy_region(source, &[leg], piece.start, piece.end).await {
                    Ok(()) => self.divergence.caught_up(leg, piece),
                    Err(e) if e.is_no_space() => {
                        tracing::debug!(leg, error = %e, "lagging mirror leg still has no space");
                        self.repin(&range);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(leg, error = %e, "copying a lagging range failed");
                        break;
                    }
                }
            }
            self.repin(&range);
        }
    }

    /// Reads `range` from the preferred healthy leg of its start, falling over to the next
    /// on a device error (failing the leg that erred). Legs that lag somewhere in `range`
    /// never answer: once no leg that has the data is left, the read fails.
    async fn read_any<'a, T, F, Fut>(&'a self, range: Range<u64>, mut read: F) -> Result<T, IoError>
    where
        F: FnMut(&'a Arc<dyn BlockIo>) -> Fut,
        Fut: std::future::Future<Output = Result<T, IoError>>,
    {
        let (n, offset) = (self.legs.len(), range.start);
        let start = self.preferred_leg(offset);
        let lagging = self.divergence.lagging_in(&range);
        let order = (0..n).map(|k| (start + k) % n).filter(|&leg| lagging & 1 << leg == 0);
        for leg in order.filter(|&leg| !self.legs.is_failed(leg)) {
            match read(self.legs.get(leg)).await {
                Ok(data) => return Ok(data),
                Err(e) if e.is_request_error() => return Err(e),
                // A read can go on to the next leg even if the failure was not recorded.
                Err(e) => drop(self.legs.fail(leg, &e).await),
            }
        }
        if self.legs.live().iter().any(|&l| lagging & 1 << l != 0) {
            return Err(IoError::NoCurrentCopy { op: IoOp::Read, offset });
        }
        Err(self.legs.too_many(IoOp::Read, offset))
    }

    async fn copy_region(
        &self,
        source: usize,
        targets: &[usize],
        start: u64,
        end: u64,
    ) -> Result<(), IoError> {
        let mut at = start;
        while at < end {
            let n = RESYNC_PIECE.min(end - at);
            let data = self.legs.get(source).read(at, n).await?;
            for &t in targets {
                self.legs.get(t).write(at, data.clone(), Durability::Cached).await?;
            }
            at += n;
        }
        Ok(())
    }
}

#[async_trait]
impl BlockIo for Mirror {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, IoError> {
        self.geometry.check(IoOp::Read, offset, len)?;
        if self.divergence.any() {
            return Ok(self.read_into(offset, BytesMut::zeroed(to_usize(len))).await?.freeze());
        }
        self.read_any(offset..offset + len, |leg| leg.read(offset, len)).await
    }

    async fn read_into(&self, offset: u64, buf: BytesMut) -> Result<BytesMut, IoError> {
        let len = buf.len() as u64;
        self.geometry.check(IoOp::Read, offset, len)?;
        let range = offset..offset + len;
        let lagging = self.divergence.lagging_in(&range);
        if lagging != 0 && self.legs.live().iter().all(|&l| lagging & 1 << l != 0) {
            // No leg has all of it: read each piece from a leg that has that piece.
            let pieces = self.divergence.pieces(&range);
            let lens = pieces.iter().map(|(p, _)| p.end - p.start);
            return read_parts(buf, lens, |i, part| self.read_leg_into(pieces[i].0.start, part)).await;
        }
        self.read_leg_into(offset, buf).await
    }

    async fn write(&self, offset: u64, data: Bytes, durability: Durability) -> Result<(), IoError> {
        self.geometry.check(IoOp::Write, offset, data.len() as u64)?;
        let _order = self.changes.lock(offset..offset + data.len() as u64).await;
        let _guard = self.legs.bitmap.start_write(offset, data.len() as u64).await?;
        let range = offset..offset + data.len() as u64;
        self.on_all_legs(IoOp::Write, range, |leg| leg.write(offset, data.clone(), durability)).await
    }

    async fn flush(&self) -> Result<(), IoError> {
        if self.divergence.any() || self.legs.bitmap.behind() != 0 {
            self.catch_up().await;
        }
        let mark = self.legs.bitmap.flush_mark();
        self.on_all_legs(IoOp::Flush, 0..0, |leg| leg.flush()).await?;
        self.legs.bitmap.after_flush(mark).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.geometry.check(IoOp::Discard, offset, len)?;
        let _order = self.changes.lock(offset..offset + len).await;
        let _guard = self.legs.bitmap.start_write(offset, len).await?;
        self.on_all_legs(IoOp::Discard, offset..offset + len, |leg| leg.discard(offset, len)).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.geometry.check(IoOp::WriteZeroes, offset, len)?;
        let _order = self.changes.lock(offset..offset + len).await;
        let _guard = self.legs.bitmap.start_write(offset, len).await?;
        self.on_all_legs(IoOp::WriteZeroes, offset..offset + len, |leg| leg.write_zeroes(offset, len)).await
    }

    /// Every leg was discarded alike, so one healthy leg answers for all.
    async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Span>, IoError> {
        self.geometry.check(IoOp::Read, offset, len)?;
        self.read_any(offset..offset + len, |leg| leg.allocation(offset, len)).await
    }
}

#[async_trait]
impl Redundant for Mirror {
    async fn initialize(&self) -> Result<(), IoError> {
        self.legs.bitmap.initialize().await
    }

    async fn recover(&self) -> Result<usize, IoError> {
        let loaded = self.legs.bitmap.load().await;
        let missing = self.legs.probe(u64::from(self.geometry.block_size)).await;
        if loaded.is_clean() && missing == 0 {
            return Ok(0);
        }
        let present = |i: usize| missing & (1 << i) == 0;
        let stale = |i: usize| loaded.failed_mask & (1 << i) != 0;
        let legs = 0..self.legs.len();
        // Never a leg recorded as failed (or behind), unless every present one is: see the
        // module doc.
        let source = match legs.clone().find(|&i| present(i) && !stale(i)) {
            Some(leg) => leg,
            None => {
                // Every present leg missed writes: the best left is any of them.
                tracing::error!("no mirror leg is known to be current; resyncing from the first present leg");
                legs.clone().find(|&i| present(i)).ok_or_else(|| self.legs.too_many(IoOp::Read, 0))?
            }
        };
        let targets: Vec<usize> = legs.filter(|&i| present(i) && i != source).collect();
        let region = self.legs.bitmap.region_size();
        for r in &loaded.dirty {
            let start = *r as u64 * region;
            let end = (start + region).min(self.geometry.size_bytes);
            for &t in &targets {
                match self.copy_region(source, &[t], start, end).await {
                    Ok(()) => {}
                    // Out of space: the leg lags over the region until a flush catches it up.
                    Err(e) if e.is_no_space() => {
                        tracing::warn!(leg = t, error = %e, "resync found no space; the leg lags until space is freed");
                        self.divergence.lag(t, start..end);
                        self.repin(&(start..end));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        for &t in targets.iter().chain([&source]) {
            self.legs.get(t).flush().await?;
        }
        // Legs that failed during the resync stay recorded as failed, and so do the legs
        // that had missed writes and could not take them all (behind): a restart must not
        // resync from them.
        let behind = targets
            .iter()
            .filter(|&&t| stale(t) && self.divergence.lags(t))
            .fold(0, |mask, &t| mask | 1 << t);
        self.legs.bitmap.resynced(missing | self.legs.failed_mask(), behind).await?;
        Ok(loaded.dirty.len())
    }

    fn health(&self) -> NodeHealth {
        self.legs.health()
    }
}
