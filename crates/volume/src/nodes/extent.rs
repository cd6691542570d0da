//! An extent: a window `[offset, offset + length)` of a device, and the stand-in for a
//! device that is not present.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use strata_block::{BlockIo, Durability, Geometry, IoError, IoOp, Span};

/// A range of a device, addressed from zero.
pub(crate) struct Extent {
    device: Arc<dyn BlockIo>,
    offset: u64,
    geometry: Geometry,
}

impl Extent {
    pub(crate) fn new(device: Arc<dyn BlockIo>, offset: u64, length: u64) -> Self {
        let block_size = device.geometry().block_size;
        Self { device, offset, geometry: Geometry { block_size, size_bytes: length } }
    }
}

#[async_trait]
impl BlockIo for Extent {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, IoError> {
        self.geometry.check(IoOp::Read, offset, len)?;
        self.device.read(self.offset + offset, len).await
    }

    async fn read_into(&self, offset: u64, buf: BytesMut) -> Result<BytesMut, IoError> {
        self.geometry.check(IoOp::Read, offset, buf.len() as u64)?;
        self.device.read_into(self.offset + offset, buf).await
    }

    async fn write(&self, offset: u64, data: Bytes, durability: Durability) -> Result<(), IoError> {
        self.geometry.check(IoOp::Write, offset, data.len() as u64)?;
        self.device.write(self.offset + offset, data, durability).await
    }

    async fn flush(&self) -> Result<(), IoError> {
        self.device.flush().await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.geometry.check(IoOp::Discard, offset, len)?;
        self.device.discard(self.offset + offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.geometry.check(IoOp::WriteZeroes, offset, len)?;
        self.device.write_zeroes(self.offset + offset, len).await
    }

    async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Span>, IoError> {
        self.geometry.check(IoOp::Read, offset, len)?;
        self.device.allocation(self.offset + offset, len).await
    }
}

/// An extent whose device is missing: every request fails with [`IoError::Gone`], so the
/// redundant node above treats it as a failed member.
pub(crate) struct Missing {
    device: String,
    geometry: Geometry,
}

impl Missing {
    pub(crate) fn new(device: String, length: u64) -> Self {
        Self { device, geometry: Geometry { block_size: 512, size_bytes: length } }
    }

    fn gone(&self) -> IoError {
        IoError::Gone { device: self.device.clone() }
    }
}

#[async_trait]
impl BlockIo for Missing {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    async fn read(&self, _: u64, _: u64) -> Result<Bytes, IoError> {
        Err(self.gone())
    }

    async fn write(&self, _: u64, _: Bytes, _: Durability) -> Result<(), IoError> {
        Err(self.gone())
    }

    async fn flush(&self) -> Result<(), IoError> {
        Err(self.gone())
    }

    async fn discard(&self, _: u64, _: u64) -> Result<(), IoError> {
        Err(self.gone())
    }

    async fn write_zeroes(&self, _: u64, _: u64) -> Result<(), IoError> {
        Err(self.gone())
    }
}
