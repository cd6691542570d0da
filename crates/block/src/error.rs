//! The error every [`crate::BlockIo`] call returns: what failed, where, and why.

use std::io;

/// Which operation an error belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoOp {
    /// `read`
    Read,
    /// `write`
    Write,
    /// `flush`
    Flush,
    /// `discard`
    Discard,
    /// `write_zeroes`
    WriteZeroes,
}

impl std::fmt::Display for IoOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Flush => "flush",
            IoOp::Discard => "discard",
            IoOp::WriteZeroes => "write-zeroes",
        })
    }
}

/// A failed block-IO request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IoError {
    /// The request is not a multiple of the block size.
    #[error("{op} at offset {offset} of {len} bytes is not aligned to the {block_size}-byte block size")]
    Misaligned {
        /// The operation.
        op: IoOp,
        /// Byte offset requested.
        offset: u64,
        /// Byte length requested.
        len: u64,
        /// The device's block size.
        block_size: u32,
    },
    /// The request reaches past the end of the device.
    #[error("{op} at offset {offset} of {len} bytes is beyond the end of the {size}-byte device")]
    OutOfRange {
        /// The operation.
        op: IoOp,
        /// Byte offset requested.
        offset: u64,
        /// Byte length requested.
        len: u64,
        /// The device size.
        size: u64,
    },
    /// The operating system failed the request.
    #[error("{op} of {len} bytes at offset {offset} on {device} failed")]
    Os {
        /// The operation.
        op: IoOp,
        /// The device (path or name).
        device: String,
        /// Byte offset requested.
        offset: u64,
        /// Byte length requested.
        len: u64,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The device has no space left for the request: the file system under a sparse device
    /// file is full, or a thin device is out of space. Not a device failure: nothing is
    /// taken out of service, and the request can succeed once space is freed.
    #[error("No space left for {op} of {len} bytes at offset {offset} on {device}")]
    NoSpace {
        /// The operation.
        op: IoOp,
        /// The device (path or name).
        device: String,
        /// Byte offset requested.
        offset: u64,
        /// Byte length requested.
        len: u64,
    },
    /// A fault injector failed the request on purpose.
    #[error("Injected {op} error at offset {offset}")]
    Injected {
        /// The operation.
        op: IoOp,
        /// Byte offset requested.
        offset: u64,
    },
    /// The device is gone (unplugged, failed, or released).
    #[error("Device {device} is gone")]
    Gone {
        /// The device (path or name).
        device: String,
    },
    /// The volume was closed (deleted or shut down) and takes no more requests.
    #[error("The volume is closed")]
    Closed,
    /// A redundant node lost more children than its redundancy covers.
    #[error("{op} at offset {offset}: {failed} of {children} legs failed, more than the redundancy covers")]
    TooManyFailures {
        /// The operation.
        op: IoOp,
        /// Byte offset in the node.
        offset: u64,
        /// How many children have failed.
        failed: usize,
        /// How many children the node has.
        children: usize,
    },
    /// Every copy that holds the data failed, and what is left missed a write for want of
    /// space (a lagging mirror leg, or a parity row whose parity no longer matches its
    /// data): answering from it could return older or wrong data, so the request fails
    /// until a write of the range reaches every member in service.
    #[error(
        "{op} at offset {offset}: no current copy is left; the members in service missed a write for want of space"
    )]
    NoCurrentCopy {
        /// The operation.
        op: IoOp,
        /// Byte offset in the node.
        offset: u64,
    },
}

impl IoError {
    /// True for errors the caller caused (alignment, range): retrying elsewhere will not help
    /// and they must not mark a device as failed.
    pub fn is_request_error(&self) -> bool {
        matches!(self, IoError::Misaligned { .. } | IoError::OutOfRange { .. })
    }

    /// True when the device ran out of space ([`IoError::NoSpace`]): the request failed,
    /// the device did not, and a mirror or parity node keeps it in service.
    pub fn is_no_space(&self) -> bool {
        matches!(self, IoError::NoSpace { .. })
    }
}
