//! Block IO: the one contract every device backend and every volume-tree node keeps.
//!
//! ```text
//!   volume tree nodes (stripe, mirror, parity, ...)  ──┐
//!   device backends (file, block device, memory)     ──┼── impl BlockIo
//!   fault injector (wraps any of the above)          ──┘
//! ```
//!
//! A tree node is a block device built on other block devices, so the whole IO path from a
//! frontend down to a device sector is a chain of calls to [`BlockIo`]. Buffers travel as
//! [`bytes::Bytes`] so a layer that only splits or routes a request never copies it.

mod error;
mod fault;
mod file;
mod memory;
pub mod signature;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

pub use error::{IoError, IoOp};
pub use fault::{FaultAction, FaultPlan, FaultRule, FaultyDevice, OpFilter};
pub use file::{FileDevice, FileOptions};
pub use memory::{CrashPlan, MemDevice};

/// Whether a write must be durable when it completes (Force Unit Access).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Durability {
    /// The write may sit in a volatile cache until the next [`BlockIo::flush`].
    #[default]
    Cached,
    /// The write is on stable storage when it completes (FUA).
    Fua,
}

impl Durability {
    /// True for [`Durability::Fua`].
    pub fn is_fua(self) -> bool {
        self == Durability::Fua
    }
}

/// Size and granularity of a block device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Smallest unit of IO in bytes (a power of two, 512 or more). Offsets and lengths of
    /// every request are multiples of it.
    pub block_size: u32,
    /// Size of the device in bytes, a multiple of `block_size`.
    pub size_bytes: u64,
}

impl Geometry {
    /// Checks that `[offset, offset + len)` is block-aligned and inside the device.
    pub fn check(&self, op: IoOp, offset: u64, len: u64) -> Result<(), IoError> {
        let bs = u64::from(self.block_size);
        if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(IoError::Misaligned { op, offset, len, block_size: self.block_size });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size_bytes => Ok(()),
            _ => Err(IoError::OutOfRange { op, offset, len, size: self.size_bytes }),
        }
    }
}

/// The block-IO contract.
///
/// Offsets and lengths are in bytes and must be multiples of
/// [`Geometry::block_size`]; a request outside the device is refused with
/// [`IoError::OutOfRange`], never truncated.
///
/// # Ordering and durability
/// - **Visibility.** Once `write`, `discard` or `write_zeroes` has completed, every later
///   `read` of that range by any caller returns the new contents. Requests that are in
///   flight at the same time are not ordered with each other: if two overlapping writes
///   are in flight together the result is one of them per block (the same one for every
///   later read: mirror and parity nodes order them alike on every copy), and a caller
///   that needs an order waits for the first to complete.
/// - **Durability.** A completed write is durable (survives a crash or power loss) only
///   when it was issued with [`Durability::Fua`], or once a `flush` that was *issued after
///   the write completed* has completed. A crash may lose any other write, or tear it: a
///   torn write leaves each block either old or new, never a mix within a block.
/// - **Discard.** After `discard` completes the range reads as zeroes; a backend may free
///   the space behind it. `write_zeroes` also reads as zeroes and keeps the space allocated
///   where the backend can. Both are as durable as a cached write.
/// - **Errors.** A failed write leaves its range undefined (old, new or a mix per block);
///   a failed read returns no data. An error never means "partially done, go on".
/// - **Completion.** A caller drives every write, discard and write-zeroes future to
///   completion (a frontend spawns it rather than dropping it when a client goes away).
///   Dropping one early leaves its range undefined and, in a mirror or parity node, may
///   release its write-intent region while device IO is still landing.
#[async_trait]
pub trait BlockIo: Send + Sync + 'static {
    /// Size and block size. Constant for the life of the object.
    fn geometry(&self) -> Geometry;

    /// Reads `len` bytes at `offset`.
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, IoError>;

    /// Reads `buf.len()` bytes at `offset` into `buf` and hands it back filled. A node that
    /// splits a read gives each child its own part of one buffer this way, so the parts
    /// need no gathering copy. The default reads and copies; on error the buffer is gone.
    async fn read_into(&self, offset: u64, mut buf: BytesMut) -> Result<BytesMut, IoError> {
        let data = self.read(offset, buf.len() as u64).await?;
        buf.copy_from_slice(&data);
        Ok(buf)
    }

    /// Writes `data` at `offset`; durable on completion when `durability` is FUA.
    async fn write(&self, offset: u64, data: Bytes, durability: Durability) -> Result<(), IoError>;

    /// Makes every write completed before this call durable.
    async fn flush(&self) -> Result<(), IoError>;

    /// Releases `[offset, offset + len)`; the range reads as zeroes afterwards.
    async fn discard(&self, offset: u64, len: u64) -> Result<(), IoError>;

    /// Sets `[offset, offset + len)` to zeroes, keeping it allocated.
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), IoError>;

    /// Which parts of `[offset, offset + len)` are holes, for hosts that copy or back up a
    /// volume and skip what was never written or was discarded. The spans are in order
    /// and cover a non-empty prefix of the range (a backend may stop early to keep the
    /// answer short). Advisory: "data" is always a safe answer, and the default gives it.
    async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Span>, IoError> {
        self.geometry().check(IoOp::Read, offset, len)?;
        Ok(vec![Span { len, hole: false }])
    }
}

/// A run of blocks that are all holes or all data, as [`BlockIo::allocation`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// Bytes in the run.
    pub len: u64,
    /// Not allocated: reads as zeroes and takes no space.
    pub hole: bool,
}

/// Allocates a zeroed buffer of `len` bytes.
pub fn zeroes(len: u64) -> Bytes {
    Bytes::from(vec![0u8; usize::try_from(len).expect("buffer length fits in memory")])
}
