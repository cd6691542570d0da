//! Mirror (RAID 1): every leg holds the whole node. Reads are spread over the healthy legs
//! by address and fall over to the next leg on error; writes go to every healthy leg and
//! succeed while one leg takes them. A leg that fails is recorded in the write-intent
//! bitmap, so when it comes back only the regions written meanwhile are copied to it.
//!
//! Writes, discards and write-zeroes hold their range in a [`RangeLock`] while the legs
//! are written, so overlapping ones reach every leg in the same order and the copies never
//! disagree; those that share no block do not wait for each other.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::future::join_all;
use strata_block::{BlockIo, Durability, Geometry, IoError, IoOp, Span};

use super::bitmap::Bitmap;
use super::members::Members;
use super::range_lock::RangeLock;
use crate::tree::{NodeHealth, Redundant};

pub(crate) struct Mirror {
    legs: Members,
    /// Orders overlapping changes of data: each leg takes them in the order they came.
    changes: RangeLock,
    geometry: Geometry,
}

/// Reads of one span of this many bytes go to the same leg first.
const READ_SPAN_SHIFT: u32 = 20;

/// Largest piece copied at once during a resync.
const RESYNC_PIECE: u64 = 1 << 20;

impl Mirror {
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

    /// Runs `op` on every healthy leg; fails legs that error; succeeds if one leg did.
    async fn on_all_legs<'a, F, Fut>(&'a self, op: IoOp, offset: u64, f: F) -> Result<(), IoError>
    where
        F: Fn(&'a Arc<dyn BlockIo>) -> Fut,
        Fut: std::future::Future<Output = Result<(), IoError>>,
    {
        let healthy = self.legs.live();
        let results = join_all(healthy.iter().map(|&i| f(self.legs.get(i)))).await;
        let mut ok = 0;
        for (&leg, result) in healthy.iter().zip(results) {
            match result {
                Ok(()) => ok += 1,
                Err(e) if e.is_request_error() => return Err(e),
                Err(e) => self.legs.fail(leg, &e).await?,
            }
        }
        if ok == 0 { Err(self.legs.too_many(op, offset)) } else { Ok(()) }
    }

    /// Reads from the preferred healthy leg of `offset`, falling over to the next on a
    /// device error (failing the leg that erred).
    async fn read_any<'a, T, F, Fut>(&'a self, offset: u64, mut read: F) -> Result<T, IoError>
    where
        F: FnMut(&'a Arc<dyn BlockIo>) -> Fut,
        Fut: std::future::Future<Output = Result<T, IoError>>,
    {
        let n = self.legs.len();
        let start = self.preferred_leg(offset);
        for leg in (0..n).map(|k| (start + k) % n).filter(|&leg| !self.legs.is_failed(leg)) {
            match read(self.legs.get(leg)).await {
                Ok(data) => return Ok(data),
                Err(e) if e.is_request_error() => return Err(e),
                // A read can go on to the next leg even if the failure was not recorded.
                Err(e) => drop(self.legs.fail(leg, &e).await),
            }
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
        self.read_any(offset, |leg| leg.read(offset, len)).await
    }

    async fn read_into(&self, offset: u64, buf: BytesMut) -> Result<BytesMut, IoError> {
        let len = buf.len();
        self.geometry.check(IoOp::Read, offset, len as u64)?;
        let mut buf = Some(buf);
        // A failed read consumed the buffer: a retry reads into a fresh one.
        self.read_any(offset, |leg| {
            leg.read_into(offset, buf.take().unwrap_or_else(|| BytesMut::zeroed(len)))
        })
        .await
    }

    async fn write(&self, offset: u64, data: Bytes, durability: Durability) -> Result<(), IoError> {
        self.geometry.check(IoOp::Write, offset, data.len() as u64)?;
        let _order = self.changes.lock(offset..offset + data.len() as u64).await;
        let _guard = self.legs.bitmap.start_write(offset, data.len() as u64).await?;
        self.on_all_legs(IoOp::Write, offset, |leg| leg.write(offset, data.clone(), durability)).await
    }

    async fn flush(&self) -> Result<(), IoError> {
        let mark = self.legs.bitmap.flush_mark();
        self.on_all_legs(IoOp::Flush, 0, |leg| leg.flush()).await?;
        self.legs.bitmap.after_flush(mark).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.geometry.check(IoOp::Discard, offset, len)?;
        let _order = self.changes.lock(offset..offset + len).await;
        let _guard = self.legs.bitmap.start_write(offset, len).await?;
        self.on_all_legs(IoOp::Discard, offset, |leg| leg.discard(offset, len)).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.geometry.check(IoOp::WriteZeroes, offset, len)?;
        let _order = self.changes.lock(offset..offset + len).await;
        let _guard = self.legs.bitmap.start_write(offset, len).await?;
        self.on_all_legs(IoOp::WriteZeroes, offset, |leg| leg.write_zeroes(offset, len)).await
    }

    /// Every leg was discarded alike, so one healthy leg answers for all.
    async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Span>, IoError> {
        self.geometry.check(IoOp::Read, offset, len)?;
        self.read_any(offset, |leg| leg.allocation(offset, len)).await
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
            self.copy_region(source, &targets, start, end).await?;
        }
        for &t in targets.iter().chain([&source]) {
            self.legs.get(t).flush().await?;
        }
        // Legs that failed during the resync stay recorded as failed.
        self.legs.bitmap.resynced(missing | self.legs.failed_mask()).await?;
        Ok(loaded.dirty.len())
    }

    fn health(&self) -> NodeHealth {
        self.legs.health()
    }
}
