//! Concat: children back to back, so a volume grows by appending.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::future::try_join_all;
use strata_block::{BlockIo, Durability, Geometry, IoError, IoOp};

use super::{read_parts, to_usize};

pub(crate) struct Concat {
    children: Vec<Arc<dyn BlockIo>>,
    /// `starts[i]` is where child `i` begins; one more entry holds the end.
    starts: Vec<u64>,
    geometry: Geometry,
}

/// One child's share of a request: (child, offset in child, length, offset in request).
type Share = (usize, u64, u64, u64);

impl Concat {
    pub(crate) fn new(children: Vec<Arc<dyn BlockIo>>) -> Self {
        let mut starts = vec![0];
        for c in &children {
            starts.push(starts.last().expect("non-empty") + c.geometry().size_bytes);
        }
        let block_size = children.iter().map(|c| c.geometry().block_size).max().unwrap_or(512);
        let size_bytes = *starts.last().expect("non-empty");
        Self { children, starts, geometry: Geometry { block_size, size_bytes } }
    }

    fn shares(&self, op: IoOp, offset: u64, len: u64) -> Result<Vec<Share>, IoError> {
        self.geometry.check(op, offset, len)?;
        let mut out = Vec::new();
        let end = offset + len;
        let mut i = self.starts.partition_point(|&s| s <= offset) - 1;
        let mut at = offset;
        while at < end {
            let child_end = self.starts[i + 1];
            let n = child_end.min(end) - at;
            if n > 0 {
                out.push((i, at - self.starts[i], n, at - offset));
            }
            at += n;
            i += 1;
        }
        Ok(out)
    }
}

#[async_trait]
impl BlockIo for Concat {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, IoError> {
        let shares = self.shares(IoOp::Read, offset, len)?;
        if let [(i, o, n, _)] = shares[..] {
            return self.children[i].read(o, n).await;
        }
        Ok(self.read_into(offset, BytesMut::zeroed(to_usize(len))).await?.freeze())
    }

    async fn read_into(&self, offset: u64, buf: BytesMut) -> Result<BytesMut, IoError> {
        let shares = self.shares(IoOp::Read, offset, buf.len() as u64)?;
        if let [(i, o, _, _)] = shares[..] {
            return self.children[i].read_into(o, buf).await;
        }
        read_parts(buf, shares.iter().map(|s| s.2), |i, part| {
            let (child, at, _, _) = shares[i];
            self.children[child].read_into(at, part)
        })
        .await
    }

    async fn write(&self, offset: u64, data: Bytes, durability: Durability) -> Result<(), IoError> {
        let shares = self.shares(IoOp::Write, offset, data.len() as u64)?;
        try_join_all(shares.iter().map(|&(i, o, n, at)| {
            let part = data.slice(to_usize(at)..to_usize(at + n));
            self.children[i].write(o, part, durability)
        }))
        .await?;
        Ok(())
    }

    async fn flush(&self) -> Result<(), IoError> {
        try_join_all(self.children.iter().map(|c| c.flush())).await?;
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let shares = self.shares(IoOp::Discard, offset, len)?;
        try_join_all(shares.iter().map(|&(i, o, n, _)| self.children[i].discard(o, n))).await?;
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let shares = self.shares(IoOp::WriteZeroes, offset, len)?;
        try_join_all(shares.iter().map(|&(i, o, n, _)| self.children[i].write_zeroes(o, n))).await?;
        Ok(())
    }
}
