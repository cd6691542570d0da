//! Nodes that only route: each request is cut into shares, one per child range it
//! touches, and the shares run at once. Concat and stripe differ only in their address map.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::future::join_all;
use strata_block::{BlockIo, Durability, Geometry, IoError, IoOp, Span};

use super::{read_parts, to_usize};

/// One child's part of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Share {
    /// Which child.
    pub child: usize,
    /// Offset in the child.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// Offset of the share inside the request.
    pub at: u64,
}

/// How a routing node lays its address space over its children.
pub(crate) trait AddressMap: Send + Sync + 'static {
    /// The shares of `[offset, offset + len)`, in request order; `len` is not zero and the
    /// range is inside the node.
    fn shares(&self, offset: u64, len: u64) -> Vec<Share>;

    /// Shares for discard and write-zeroes, which carry no data: a map may merge each
    /// child's shares into one range when they are adjacent on the child.
    fn zero_shares(&self, offset: u64, len: u64) -> Vec<Share> {
        self.shares(offset, len)
    }
}

/// A routing node over `children` laid out by `map`.
pub(crate) struct Split<M> {
    map: M,
    children: Vec<Arc<dyn BlockIo>>,
    geometry: Geometry,
}

impl<M: AddressMap> Split<M> {
    /// A node of `size_bytes` over `children`.
    pub(crate) fn new(map: M, children: Vec<Arc<dyn BlockIo>>, size_bytes: u64) -> Self {
        let block_size = children.iter().map(|c| c.geometry().block_size).max().unwrap_or(512);
        Self { map, children, geometry: Geometry { block_size, size_bytes } }
    }

    fn shares(&self, op: IoOp, offset: u64, len: u64) -> Result<Vec<Share>, IoError> {
        self.geometry.check(op, offset, len)?;
        Ok(if len == 0 { Vec::new() } else { self.map.shares(offset, len) })
    }

    async fn zero(&self, op: IoOp, offset: u64, len: u64) -> Result<(), IoError> {
        self.geometry.check(op, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let results = join_all(self.map.zero_shares(offset, len).into_iter().map(|s| match op {
            IoOp::Discard => self.children[s.child].discard(s.offset, s.len),
            _ => self.children[s.child].write_zeroes(s.offset, s.len),
        }))
        .await;
        results.into_iter().collect()
    }
}

#[async_trait]
impl<M: AddressMap> BlockIo for Split<M> {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, IoError> {
        let shares = self.shares(IoOp::Read, offset, len)?;
        if let [s] = shares[..] {
            return self.children[s.child].read(s.offset, s.len).await;
        }
        Ok(self.read_into(offset, BytesMut::zeroed(to_usize(len))).await?.freeze())
    }

    async fn read_into(&self, offset: u64, buf: BytesMut) -> Result<BytesMut, IoError> {
        let shares = self.shares(IoOp::Read, offset, buf.len() as u64)?;
        if let [s] = shares[..] {
            return self.children[s.child].read_into(s.offset, buf).await;
        }
        read_parts(buf, shares.iter().map(|s| s.len), |i, part| {
            self.children[shares[i].child].read_into(shares[i].offset, part)
        })
        .await
    }

    async fn write(&self, offset: u64, data: Bytes, durability: Durability) -> Result<(), IoError> {
        let shares = self.shares(IoOp::Write, offset, data.len() as u64)?;
        // Every share runs to completion even if another fails: a write abandoned half-way
        // would release its bitmap region while its IO still lands.
        let results = join_all(shares.iter().map(|s| {
            let part = data.slice(to_usize(s.at)..to_usize(s.at + s.len));
            self.children[s.child].write(s.offset, part, durability)
        }))
        .await;
        results.into_iter().collect()
    }

    async fn flush(&self) -> Result<(), IoError> {
        join_all(self.children.iter().map(|c| c.flush())).await.into_iter().collect()
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.zero(IoOp::Discard, offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.zero(IoOp::WriteZeroes, offset, len).await
    }

    /// Asks the children share by share, up to [`MAX_SHARES`] of them, and stops at the
    /// first share a child answers only in part: the answer is a prefix, as allowed.
    async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Span>, IoError> {
        let shares = self.shares(IoOp::Read, offset, len)?;
        let mut spans: Vec<Span> = Vec::new();
        for s in shares.iter().take(MAX_SHARES) {
            let part = self.children[s.child].allocation(s.offset, s.len).await?;
            let covered: u64 = part.iter().map(|p| p.len).sum();
            for p in part {
                match spans.last_mut() {
                    Some(last) if last.hole == p.hole => last.len += p.len,
                    _ => spans.push(p),
                }
            }
            if covered < s.len {
                break;
            }
        }
        Ok(spans)
    }
}

/// Most shares one allocation query visits.
const MAX_SHARES: usize = 64;
