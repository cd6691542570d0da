//! Stripe (RAID 0): chunk `c` of the node lives on child `c % n` at chunk `c / n`.
//!
//! ```text
//!   node:    | c0 | c1 | c2 | c3 | c4 | c5 | ...
//!   child 0: | c0 | c3 | ...
//!   child 1: | c1 | c4 | ...
//!   child 2: | c2 | c5 | ...
//! ```

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::future::try_join_all;
use strata_block::{BlockIo, Durability, Geometry, IoError, IoOp};

use super::{Piece, pieces, read_parts, to_usize};

pub(crate) struct Stripe {
    children: Vec<Arc<dyn BlockIo>>,
    chunk: u64,
    geometry: Geometry,
}

impl Stripe {
    /// `children` are of equal size, a multiple of `chunk`.
    pub(crate) fn new(chunk: u64, children: Vec<Arc<dyn BlockIo>>) -> Self {
        let child_size = children.iter().map(|c| c.geometry().size_bytes).min().unwrap_or(0);
        let block_size = children.iter().map(|c| c.geometry().block_size).max().unwrap_or(512);
        let size_bytes = child_size / chunk * chunk * children.len() as u64;
        Self { children, chunk, geometry: Geometry { block_size, size_bytes } }
    }

    /// The range each child holds of `[offset, offset + len)`: `(child, offset, length)`.
    /// It is one contiguous range per child, since a child's chunks are consecutive rows.
    fn child_ranges(&self, offset: u64, len: u64) -> Vec<(usize, u64, u64)> {
        let mut ranges: Vec<Option<(u64, u64)>> = vec![None; self.children.len()];
        for p in pieces(offset, len, self.chunk) {
            let (child, at) = self.locate(&p);
            let range = ranges[child].get_or_insert((at, at));
            range.1 = at + p.len;
        }
        ranges.into_iter().enumerate().filter_map(|(c, r)| r.map(|(s, e)| (c, s, e - s))).collect()
    }

    /// (child, offset in the child) of a piece.
    fn locate(&self, p: &Piece) -> (usize, u64) {
        let n = self.children.len() as u64;
        (to_usize(p.unit % n), (p.unit / n) * self.chunk + p.offset_in_unit)
    }
}

#[async_trait]
impl BlockIo for Stripe {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, IoError> {
        self.geometry.check(IoOp::Read, offset, len)?;
        if offset % self.chunk + len <= self.chunk {
            let (child, at) = self.locate(&pieces(offset, len, self.chunk).next().expect("one piece"));
            return self.children[child].read(at, len).await;
        }
        Ok(self.read_into(offset, BytesMut::zeroed(to_usize(len))).await?.freeze())
    }

    async fn read_into(&self, offset: u64, buf: BytesMut) -> Result<BytesMut, IoError> {
        self.geometry.check(IoOp::Read, offset, buf.len() as u64)?;
        let parts: Vec<Piece> = pieces(offset, buf.len() as u64, self.chunk).collect();
        if let [piece] = parts[..] {
            let (child, at) = self.locate(&piece);
            return self.children[child].read_into(at, buf).await;
        }
        read_parts(buf, parts.iter().map(|p| p.len), |i, part| {
            let (child, at) = self.locate(&parts[i]);
            self.children[child].read_into(at, part)
        })
        .await
    }

    async fn write(&self, offset: u64, data: Bytes, durability: Durability) -> Result<(), IoError> {
        self.geometry.check(IoOp::Write, offset, data.len() as u64)?;
        try_join_all(pieces(offset, data.len() as u64, self.chunk).map(|p| {
            let (child, at) = self.locate(&p);
            let part = data.slice(to_usize(p.offset_in_request)..to_usize(p.offset_in_request + p.len));
            self.children[child].write(at, part, durability)
        }))
        .await?;
        Ok(())
    }

    async fn flush(&self) -> Result<(), IoError> {
        try_join_all(self.children.iter().map(|c| c.flush())).await?;
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.geometry.check(IoOp::Discard, offset, len)?;
        try_join_all(
            self.child_ranges(offset, len).into_iter().map(|(c, at, n)| self.children[c].discard(at, n)),
        )
        .await?;
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.geometry.check(IoOp::WriteZeroes, offset, len)?;
        try_join_all(
            self.child_ranges(offset, len).into_iter().map(|(c, at, n)| self.children[c].write_zeroes(at, n)),
        )
        .await?;
        Ok(())
    }
}
