//! The members of a mirror or parity node: which have failed, and the write-intent bitmap
//! that records it, so a member that comes back is resynced from what it missed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::future::BoxFuture;
use strata_block::{BlockIo, IoError, IoOp};

use super::bitmap::Bitmap;
use crate::tree::NodeHealth;

pub(crate) struct Members {
    io: Vec<Arc<dyn BlockIo>>,
    failed: Vec<AtomicBool>,
    /// The node's write-intent bitmap.
    pub bitmap: Bitmap,
    /// Members that may fail without losing data.
    tolerance: usize,
}

impl Members {
    pub(crate) fn new(io: Vec<Arc<dyn BlockIo>>, bitmap: Bitmap, tolerance: usize) -> Self {
        let failed = io.iter().map(|_| AtomicBool::new(false)).collect();
        Self { io, failed, bitmap, tolerance }
    }

    /// Member `i`.
    pub(crate) fn get(&self, i: usize) -> &Arc<dyn BlockIo> {
        &self.io[i]
    }

    pub(crate) fn len(&self) -> usize {
        self.io.len()
    }

    pub(crate) fn is_failed(&self, i: usize) -> bool {
        self.failed[i].load(Ordering::Relaxed)
    }

    pub(crate) fn failed_count(&self) -> usize {
        (0..self.len()).filter(|&i| self.is_failed(i)).count()
    }

    /// Members still in service.
    pub(crate) fn live(&self) -> Vec<usize> {
        (0..self.len()).filter(|&i| !self.is_failed(i)).collect()
    }

    /// The error for a request that more failed members than the node covers made fail.
    pub(crate) fn too_many(&self, op: IoOp, offset: u64) -> IoError {
        IoError::TooManyFailures { op, offset, failed: self.failed_count(), children: self.len() }
    }

    /// Takes member `i` out of service after a device error. The failure is recorded in
    /// the bitmap *before* the member is skipped by other requests, so no write that skips
    /// it is acknowledged while a crash could still forget that it missed writes. If the
    /// record cannot be written the member stays in service (every request that meets its
    /// error tries again) and this errs: the request at hand must fail. Boxed: a rare path
    /// that would otherwise make every request's future as large as a bitmap update.
    pub(crate) fn fail<'a>(&'a self, i: usize, error: &'a IoError) -> BoxFuture<'a, Result<(), IoError>> {
        Box::pin(async move {
            if let Err(e) = self.bitmap.mark_failed(1 << i).await {
                tracing::error!(member = i, error = %e, "cannot record the failed member");
                return Err(e);
            }
            if !self.failed[i].swap(true, Ordering::SeqCst) {
                tracing::warn!(member = i, %error, "member failed; continuing degraded");
            }
            Ok(())
        })
    }

    /// Members out of service, as a mask.
    pub(crate) fn failed_mask(&self) -> u64 {
        (0..self.len()).filter(|&i| self.is_failed(i)).fold(0, |mask, i| mask | 1 << i)
    }

    /// After a device error on member `i`: passes a request error or a lack of space
    /// through (neither is the device's fault), otherwise fails the member, and errs once
    /// more members have failed than the node covers.
    pub(crate) async fn absorb(&self, i: usize, error: IoError) -> Result<(), IoError> {
        if error.is_request_error() || error.is_no_space() {
            return Err(error);
        }
        self.fail(i, &error).await?;
        if self.failed_count() > self.tolerance { Err(self.too_many(IoOp::Write, 0)) } else { Ok(()) }
    }

    /// At open: finds the members whose device is missing (a read of their first block
    /// fails), takes them out of service and returns them as a mask.
    pub(crate) async fn probe(&self, block_size: u64) -> u64 {
        let mut missing = 0;
        for (i, member) in self.io.iter().enumerate() {
            if member.read(0, block_size).await.is_err() {
                self.failed[i].store(true, Ordering::SeqCst);
                missing |= 1 << i;
            }
        }
        missing
    }

    pub(crate) fn health(&self) -> NodeHealth {
        NodeHealth {
            members: self.len(),
            failed: (0..self.len()).filter(|&i| self.is_failed(i)).collect(),
            tolerance: self.tolerance,
            dirty_regions: self.bitmap.dirty_regions(),
        }
    }
}
