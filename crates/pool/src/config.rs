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

/// Most extents a device may have (256 TiB at 4 MiB extents): bounds what an untrusted
/// configuration can make a controller allocate.
const MAX_EXTENTS_PER_DEVICE: u64 = 1 << 26;

impl PoolConfig {
    /// Checks what a configuration read from a device claims before anything is built from
    /// it; a corrupt or hostile copy is refused with a reason, never trusted.
    pub fn validate(&self) -> Result<(), String> {
        if !self.extent_size.is_power_of_two() || !(64 << 10..=1 << 30).contains(&self.extent_size) {
            return Err(format!(
                "extent size {} is not a power of two between 64 KiB and 1 GiB",
                self.extent_size
            ));
        }
        for d in &self.devices {
            if d.data_offset.checked_add(d.data_size).is_none_or(|end| end > d.size_bytes)
                || d.data_size / self.extent_size > MAX_EXTENTS_PER_DEVICE
            {
                return Err(format!("device {} has an impossible data area", d.id));
            }
        }
        let mut names: Vec<&str> = self.volumes.iter().map(|v| v.name.as_str()).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err("two volumes share a name".into());
        }
        if let Some(v) = self.volumes.iter().find(|v| v.size_bytes == 0 || v.size_bytes > v.tree.size()) {
            return Err(format!("volume {} is larger than its tree", v.name));
        }
        Ok(())
    }
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
    /// Persistent reservations of the volume's SCSI logical unit, kept with the volume on
    /// every device so they survive a restart (SPC-4 APTPL); opaque to the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservations: Option<String>,
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
