//! What the metadata slots hold: each device's own records, and on config replicas the
//! whole pool configuration. JSON, so a damaged device can still be read by a person with
//! `dd` and `jq`, and so the tagged volume-tree enums round-trip unchanged.

use serde::{Deserialize, Serialize};
use strata_volume::{Layout, NodeSpec, VolumeRequest};
use uuid::Uuid;

/// The whole configuration of a pool: devices and volumes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolConfig {
    /// Pool identity, also in every label.
    pub pool_id: Uuid,
    /// Name chosen by the operator.
    pub name: String,
    /// Allocation unit in bytes.
    pub extent_size: u64,
    /// Bumped on every change; the newest valid copy wins at start-up.
    pub generation: u64,
    /// Member devices in claim order.
    pub devices: Vec<DeviceRecord>,
    /// Volumes in creation order.
    pub volumes: Vec<VolumeRecord>,
}

/// A member device as the configuration knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Identity, as in the device's label.
    pub id: Uuid,
    /// Path or name it was claimed under (informational: devices are found by label).
    pub name: String,
    /// Failure domain (enclosure, host, rack), if tagged.
    pub fault_domain: Option<String>,
    /// Device size at claim time.
    pub size_bytes: u64,
    /// Start of the allocatable area.
    pub data_offset: u64,
    /// Bytes of allocatable area.
    pub data_size: u64,
}

/// A volume: its identity, what was asked for, and the tree that was built.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Identity (also the basis of the WWN and serial hosts see).
    pub id: Uuid,
    /// Name chosen by the operator.
    pub name: String,
    /// Size hosts see.
    pub size_bytes: u64,
    /// The request it was built from.
    pub request: VolumeRequest,
    /// The tree.
    pub tree: NodeSpec,
}

impl VolumeRecord {
    /// The layout asked for.
    pub fn layout(&self) -> Layout {
        self.request.layout
    }
}

/// An extent as recorded on the device that holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtentRecord {
    /// The volume it belongs to.
    pub volume: Uuid,
    /// Byte offset on the device.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

/// The payload of one device's metadata slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceMetadata {
    /// The device.
    pub device_id: Uuid,
    /// Its pool.
    pub pool_id: Uuid,
    /// Pool configuration generation this record belongs to.
    pub generation: u64,
    /// The device-side nodes that live here.
    pub extents: Vec<ExtentRecord>,
    /// The full configuration, on config replicas only.
    pub config: Option<PoolConfig>,
}
