//! Errors of pool operations; each message says what to do next.

use strata_block::IoError;
use strata_volume::{LayoutError, TreeError};
use uuid::Uuid;

/// A failed pool operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// The volume request cannot be met.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// A device failed during a metadata update.
    #[error("IO error on device {device}")]
    Io {
        /// Device name.
        device: String,
        /// The error.
        #[source]
        source: IoError,
    },
    /// The device already carries a label.
    #[error("Device {device} already belongs to pool {pool}; remove it from that pool first")]
    AlreadyClaimed {
        /// Device name.
        device: String,
        /// Its pool.
        pool: Uuid,
    },
    /// The device is already a member of this pool, online.
    #[error("Device {device} already belongs to pool {pool}, as {member}; it is online and needs nothing")]
    AlreadyMember {
        /// Device name as given.
        device: String,
        /// This pool.
        pool: Uuid,
        /// The member's name in the pool.
        member: String,
    },
    /// The device carries a Strata label that cannot be read.
    #[error(
        "Device {device} carries a damaged Strata label ({reason}); it was left untouched. Wipe its first and last 4 KiB to reuse it"
    )]
    DamagedLabel {
        /// Device name.
        device: String,
        /// What is wrong.
        reason: String,
    },
    /// The device has no room for labels, metadata and one extent.
    #[error("Device {device} has {size} bytes; at least {needed} are needed")]
    TooSmall {
        /// Device name.
        device: String,
        /// Its size.
        size: u64,
        /// Smallest usable size.
        needed: u64,
    },
    /// Name in use.
    #[error("A volume named '{0}' already exists; choose another name or delete it first")]
    VolumeExists(String),
    /// Unknown volume.
    #[error("No volume named '{0}'; `strata volume list` shows the volumes")]
    NoSuchVolume(String),
    /// Bad volume name.
    #[error("Volume name '{0}' is not valid: use 1 to 64 letters, digits, '.', '_' or '-'")]
    BadName(String),
    /// Unknown device.
    #[error("No device '{0}' in the pool; `strata device list` shows the devices")]
    NoSuchDevice(String),
    /// Device still holds volumes.
    #[error("Device {device} holds extents of volumes {volumes:?}; delete or move them first")]
    DeviceInUse {
        /// Device name.
        device: String,
        /// Volumes using it.
        volumes: Vec<String>,
    },
    /// The configuration outgrew the metadata slots.
    #[error(
        "The configuration takes {bytes} bytes, more than the {slot}-byte metadata slot; delete volumes or recreate the pool with larger slots"
    )]
    ConfigTooLarge {
        /// Encoded size.
        bytes: usize,
        /// Slot size.
        slot: u64,
    },
    /// Too few config replicas took the update.
    #[error(
        "Only {took} of {replicas} configuration replicas accepted the change, not a majority; \
         the change was not made. Check device health"
    )]
    CommitFailed {
        /// Replicas that took it.
        took: usize,
        /// Replicas written.
        replicas: usize,
    },
    /// The pool has no devices.
    #[error("The pool has no devices; add one with `strata device add`")]
    NoDevices,
    /// A volume tree could not be built or recovered.
    #[error("Volume '{name}' cannot be opened")]
    Volume {
        /// Volume name.
        name: String,
        /// Why.
        #[source]
        source: TreeError,
    },
    /// A pool option is out of range.
    #[error("Invalid pool option: {0}")]
    Option(String),
}
