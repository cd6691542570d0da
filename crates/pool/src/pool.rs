//! The pool: member devices, the configuration they carry, and the volumes built on them.
//!
//! Every change (claim a device, create or delete a volume) is planned on a copy of the
//! configuration, written to every member's metadata area, and only then adopted and
//! acknowledged. Management operations are serialized by one async lock; IO does not take
//! it: a volume is an `Arc` handed out from a read-mostly map.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use strata_block::{BlockIo, Durability};
use strata_volume::{Layout, Location, NodeSpec, Tree, VolumeRequest, VolumeState};
use uuid::Uuid;

use crate::alloc::{DeviceSpace, Planner};
use crate::config::{DeviceMetadata, DeviceRecord, ExtentRecord, PoolConfig, VolumeRecord};
use crate::error::PoolError;
use crate::label::{LABEL_SIZE, Label};
use crate::slot;

/// How long deleting a volume waits for its requests in flight.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How many devices carry the full configuration.
pub const CONFIG_REPLICAS: usize = 6;

/// Settings fixed when a pool is made.
#[derive(Clone, Debug)]
pub struct PoolOptions {
    /// Pool name.
    pub name: String,
    /// Allocation unit (default 4 MiB).
    pub extent_size: u64,
    /// Size of each metadata slot (default 1 MiB).
    pub slot_size: u64,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self { name: "strata".into(), extent_size: 4 << 20, slot_size: 1 << 20 }
    }
}

/// A live member device.
pub(crate) struct Member {
    pub name: String,
    pub io: Arc<dyn BlockIo>,
    pub label: Label,
    /// The metadata slot holding the newest valid generation; the next write goes to the
    /// other one, so a torn or failed write never touches the last good copy.
    pub slot: u64,
}

pub(crate) struct State {
    pub config: PoolConfig,
    pub members: BTreeMap<Uuid, Member>,
    pub cursor: usize,
    pub slot_size: u64,
    /// Highest generation ever attempted: a generation is never reused, so two copies with
    /// the same generation always hold the same configuration.
    pub attempted: u64,
}

/// A volume being served.
pub struct Volume {
    record: VolumeRecord,
    tree: Arc<Tree>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume").field("name", &self.record.name).field("id", &self.record.id).finish()
    }
}

impl Volume {
    /// The volume's configuration record.
    pub fn record(&self) -> &VolumeRecord {
        &self.record
    }

    /// Name.
    pub fn name(&self) -> &str {
        &self.record.name
    }

    /// The block device hosts see.
    pub fn io(&self) -> Arc<Tree> {
        self.tree.clone()
    }

    /// A summary for listings.
    pub fn info(&self) -> VolumeInfo {
        VolumeInfo {
            id: self.record.id,
            name: self.record.name.clone(),
            size_bytes: self.record.size_bytes,
            layout: self.record.layout(),
            state: self.tree.state(),
            devices: self.record.tree.devices(),
        }
    }
}

/// What listings show of a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VolumeInfo {
    /// Identity.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// Size hosts see.
    pub size_bytes: u64,
    /// Layout.
    pub layout: Layout,
    /// Healthy, degraded or failed.
    pub state: VolumeState,
    /// Devices it uses.
    pub devices: Vec<Uuid>,
}

/// Whether a member device is here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Present and labelled.
    Online,
    /// In the configuration but not found.
    Missing,
}

/// What listings show of a device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceInfo {
    /// Identity.
    pub id: Uuid,
    /// Path or name.
    pub name: String,
    /// Failure domain.
    pub fault_domain: Option<String>,
    /// Size at claim time.
    pub size_bytes: u64,
    /// Allocatable bytes.
    pub data_bytes: u64,
    /// Unallocated bytes.
    pub free_bytes: u64,
    /// Online or missing.
    pub state: DeviceState,
    /// Carries a full copy of the configuration.
    pub config_replica: bool,
}

/// A pool of devices and the volumes on them.
pub struct Pool {
    id: Uuid,
    pub(crate) state: tokio::sync::Mutex<State>,
    volumes: parking_lot::RwLock<BTreeMap<String, Arc<Volume>>>,
}

fn check_name(name: &str) -> Result<(), PoolError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok { Ok(()) } else { Err(PoolError::BadName(name.to_string())) }
}

impl State {
    /// Free space of every configured device, rebuilt from the volume trees.
    pub(crate) fn planner(&self) -> Planner {
        let extent = self.config.extent_size;
        let mut devices: Vec<DeviceSpace> = self
            .config
            .devices
            .iter()
            .map(|d| {
                DeviceSpace::new(
                    d.id,
                    d.fault_domain.clone(),
                    d.data_offset,
                    d.data_size,
                    extent,
                    self.members.contains_key(&d.id),
                )
            })
            .collect();
        for volume in &self.config.volumes {
            for (device, offset, length) in volume.tree.extents() {
                if let Some(space) = devices.iter_mut().find(|d| d.id == device)
                    && !space.mark(offset, length, extent)
                {
                    tracing::error!(volume = %volume.name, %device, offset, length, "extent overlaps another or lies outside the data area");
                }
            }
        }
        let block_size = self.members.values().map(|m| m.io.geometry().block_size).max().unwrap_or(4096);
        Planner { devices, extent, block_size, cursor: self.cursor }
    }

    /// Devices that carry the full configuration: up to [`CONFIG_REPLICAS`] present
    /// members, taking one per fault domain in turn so the copies spread.
    pub(crate) fn replicas(&self) -> Vec<Uuid> {
        let mut by_domain: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
        for d in self.config.devices.iter().filter(|d| self.members.contains_key(&d.id)) {
            let domain = d.fault_domain.clone().unwrap_or_else(|| d.id.to_string());
            by_domain.entry(domain).or_default().push(d.id);
        }
        let mut out = Vec::new();
        let mut round = 0;
        while out.len() < CONFIG_REPLICAS && by_domain.values().any(|v| v.len() > round) {
            out.extend(by_domain.values().filter_map(|v| v.get(round)).take(CONFIG_REPLICAS - out.len()));
            round += 1;
        }
        out
    }

    fn lookup(&self) -> impl Fn(Uuid) -> Option<Arc<dyn BlockIo>> + '_ {
        |id| self.members.get(&id).map(|m| m.io.clone())
    }

    /// Writes `config` under a new generation to every present member and adopts it once a
    /// majority of the config replicas took it. Otherwise the change is not made: the
    /// previous configuration is written again under a newer generation, so the refused
    /// one does not come back at the next start from a device that did take it.
    pub(crate) async fn commit(&mut self, config: PoolConfig) -> Result<(), PoolError> {
        if self.members.is_empty() {
            return Err(PoolError::NoDevices);
        }
        let previous = self.config.clone();
        let (took, replicas) = self.write_generation(config).await?;
        if took * 2 <= replicas {
            if let Err(e) = self.write_generation(previous.clone()).await {
                tracing::error!(error = %e, "cannot write the previous configuration back");
            }
            self.config = previous;
            return Err(PoolError::CommitFailed { took, replicas });
        }
        Ok(())
    }

    /// Writes `config` under a new generation to every present member and adopts it in
    /// memory; returns how many config replicas took it, of how many.
    async fn write_generation(&mut self, mut config: PoolConfig) -> Result<(usize, usize), PoolError> {
        self.attempted = self.attempted.max(self.config.generation).max(config.generation) + 1;
        config.generation = self.attempted;
        let previous = std::mem::replace(&mut self.config, config);
        let replicas = self.replicas();
        let generation = self.config.generation;
        let mut writes = Vec::new();
        for (id, member) in &self.members {
            let extents = self
                .config
                .volumes
                .iter()
                .flat_map(|v| v.tree.extents().into_iter().map(move |e| (v.id, e)))
                .filter(|(_, (device, _, _))| device == id)
                .map(|(volume, (_, offset, length))| ExtentRecord { volume, offset, length })
                .collect();
            let metadata = DeviceMetadata {
                device_id: *id,
                pool_id: self.config.pool_id,
                generation,
                extents,
                config: replicas.contains(id).then(|| self.config.clone()),
            };
            let payload = serde_json::to_vec(&metadata).expect("metadata serializes");
            let bs = u64::from(member.io.geometry().block_size);
            let Some(encoded) = slot::encode(generation, &payload, bs, self.slot_size) else {
                self.config = previous;
                return Err(PoolError::ConfigTooLarge { bytes: payload.len(), slot: self.slot_size });
            };
            let at = member.label.metadata_offset + (1 - member.slot) * member.label.slot_size;
            let io = member.io.clone();
            let name = member.name.clone();
            writes
                .push(async move { (*id, name, io.write(at, Bytes::from(encoded), Durability::Fua).await) });
        }
        let results = futures::future::join_all(writes).await;
        let mut replica_ok = 0;
        for (id, name, result) in results {
            match result {
                Ok(()) => {
                    let member = self.members.get_mut(&id).expect("written member");
                    member.slot = 1 - member.slot;
                    replica_ok += usize::from(replicas.contains(&id));
                }
                Err(error) => tracing::error!(device = %name, %error, "metadata update failed on a device"),
            }
        }
        Ok((replica_ok, replicas.len()))
    }
}

impl Pool {
    /// A new, empty pool. It exists on disk once a device is claimed.
    pub fn create(options: PoolOptions) -> Result<Self, PoolError> {
        if !options.extent_size.is_power_of_two() || options.extent_size < 64 * 1024 {
            return Err(PoolError::Option(format!(
                "extent size {} must be a power of two of at least 64 KiB",
                options.extent_size
            )));
        }
        if options.slot_size < 64 * 1024 || !options.slot_size.is_multiple_of(LABEL_SIZE) {
            return Err(PoolError::Option(format!(
                "slot size {} must be a multiple of 4 KiB, at least 64 KiB",
                options.slot_size
            )));
        }
        let config = PoolConfig {
            pool_id: Uuid::new_v4(),
            name: options.name,
            extent_size: options.extent_size,
            generation: 0,
            devices: Vec::new(),
            volumes: Vec::new(),
        };
        Ok(Self::from_state(
            State { config, members: BTreeMap::new(), cursor: 0, slot_size: options.slot_size, attempted: 0 },
            Vec::new(),
        ))
    }

    pub(crate) fn from_state(state: State, volumes: Vec<(VolumeRecord, Tree)>) -> Self {
        let id = state.config.pool_id;
        let volumes = volumes
            .into_iter()
            .map(|(record, tree)| (record.name.clone(), Arc::new(Volume { record, tree: Arc::new(tree) })))
            .collect();
        Self { id, state: tokio::sync::Mutex::new(state), volumes: parking_lot::RwLock::new(volumes) }
    }

    /// Serves a volume opened after the pool was (its device came back).
    pub(crate) fn insert_volume(&self, record: VolumeRecord, tree: Tree) {
        self.volumes.write().insert(record.name.clone(), Arc::new(Volume { record, tree: Arc::new(tree) }));
    }

    /// The byte ranges a claim of a device of `size_bytes` writes: its front label and
    /// metadata slots (up to the first extent), and its back label. Worth checking for
    /// data before a claim overwrites it.
    pub async fn claim_ranges(&self, size_bytes: u64) -> [std::ops::Range<u64>; 2] {
        let state = self.state.lock().await;
        let extent = state.config.extent_size;
        let data_offset = (LABEL_SIZE + 2 * state.slot_size).div_ceil(extent) * extent;
        let back = crate::label::back_offset(size_bytes);
        [0..data_offset.min(size_bytes), back..size_bytes]
    }

    /// The pool's identity.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The current configuration.
    pub async fn config(&self) -> PoolConfig {
        self.state.lock().await.config.clone()
    }

    /// Claims a device: writes its labels and adds it to the configuration. A device that
    /// already carries a Strata label (valid or damaged) is refused and left untouched,
    /// except a member of this pool that was missing: that one is taken back.
    pub async fn claim(
        &self,
        name: &str,
        io: Arc<dyn BlockIo>,
        fault_domain: Option<String>,
    ) -> Result<DeviceInfo, PoolError> {
        let mut state = self.state.lock().await;
        let found = crate::discover::read_labels(io.as_ref()).await;
        match found {
            crate::discover::LabelScan::Blank => {}
            // Labelled for this pool by a claim that never reached the configuration.
            crate::discover::LabelScan::Valid { label, .. }
                if label.pool_id == state.config.pool_id
                    && !state.config.devices.iter().any(|d| d.id == label.device_id) => {}
            // A member that was missing, found again (under this path or another one).
            crate::discover::LabelScan::Valid { label, repair }
                if label.pool_id == state.config.pool_id && !state.members.contains_key(&label.device_id) =>
            {
                return self.readmit(&mut state, name, io, label, repair).await;
            }
            crate::discover::LabelScan::Valid { label, .. } if label.pool_id == state.config.pool_id => {
                let member = state.members.get(&label.device_id).map(|m| m.name.clone()).unwrap_or_default();
                return Err(PoolError::AlreadyMember {
                    device: name.to_string(),
                    pool: label.pool_id,
                    member,
                });
            }
            crate::discover::LabelScan::Valid { label, .. } => {
                return Err(PoolError::AlreadyClaimed { device: name.to_string(), pool: label.pool_id });
            }
            crate::discover::LabelScan::Damaged(reason) => {
                return Err(PoolError::DamagedLabel { device: name.to_string(), reason });
            }
        }
        let g = io.geometry();
        let extent = state.config.extent_size;
        let slot_size = state.slot_size;
        let data_offset = (LABEL_SIZE + 2 * slot_size).div_ceil(extent) * extent;
        let back = crate::label::back_offset(g.size_bytes);
        let data_size = back.saturating_sub(data_offset) / extent * extent;
        if data_size == 0 || g.block_size > crate::label::MAX_BLOCK_SIZE {
            return Err(PoolError::TooSmall {
                device: name.to_string(),
                size: g.size_bytes,
                needed: data_offset + extent + LABEL_SIZE,
            });
        }
        let label = Label {
            device_id: Uuid::new_v4(),
            pool_id: state.config.pool_id,
            fencing_epoch: 1,
            generation: 1,
            device_size: g.size_bytes,
            block_size: g.block_size,
            metadata_offset: LABEL_SIZE,
            slot_size,
            data_offset,
            data_size,
        };
        crate::discover::write_labels(io.as_ref(), &label)
            .await
            .map_err(|source| PoolError::Io { device: name.to_string(), source })?;
        let record = DeviceRecord {
            id: label.device_id,
            name: name.to_string(),
            fault_domain,
            size_bytes: g.size_bytes,
            data_offset,
            data_size,
        };
        let mut config = state.config.clone();
        config.devices.push(record);
        let member = Member { name: name.to_string(), io, label: label.clone(), slot: 1 };
        state.members.insert(label.device_id, member);
        if let Err(e) = state.commit(config).await {
            state.members.remove(&label.device_id);
            return Err(e);
        }
        let info = device_infos(&state).into_iter().find(|d| d.id == label.device_id);
        Ok(info.expect("the device was just added"))
    }

    /// Takes a device out of the pool and wipes its labels, so it reads as unclaimed.
    pub async fn release(&self, id: Uuid) -> Result<(), PoolError> {
        let mut state = self.state.lock().await;
        let Some(record) = state.config.devices.iter().find(|d| d.id == id).cloned() else {
            return Err(PoolError::NoSuchDevice(id.to_string()));
        };
        let volumes: Vec<String> = state
            .config
            .volumes
            .iter()
            .filter(|v| v.tree.devices().contains(&id))
            .map(|v| v.name.clone())
            .collect();
        if !volumes.is_empty() {
            return Err(PoolError::DeviceInUse { device: record.name, volumes });
        }
        let mut config = state.config.clone();
        config.devices.retain(|d| d.id != id);
        let member = state.members.remove(&id);
        if let Err(e) = state.commit(config).await {
            if let Some(member) = member {
                state.members.insert(id, member);
            }
            return Err(e);
        }
        // The release is recorded; a device whose labels cannot be wiped is merely reported
        // as foreign by later scans.
        if let Some(member) = member
            && let Err(error) = crate::discover::wipe(member.io.as_ref(), &member.label).await
        {
            tracing::warn!(device = %member.name, %error, "released, but its labels could not be wiped");
        }
        Ok(())
    }

    /// Creates a volume: plans it, prepares its bitmaps, records it on the devices, and
    /// returns it ready for IO.
    pub async fn create_volume(&self, name: &str, request: VolumeRequest) -> Result<Arc<Volume>, PoolError> {
        check_name(name)?;
        let mut state = self.state.lock().await;
        if state.config.volumes.iter().any(|v| v.name == name) {
            return Err(PoolError::VolumeExists(name.to_string()));
        }
        let mut planner = state.planner();
        let spec = request.plan(&mut planner)?;
        state.cursor = planner.cursor;
        let volume_error = |source| PoolError::Volume { name: name.to_string(), source };
        let tree = Tree::create(spec.clone(), request.size, &state.lookup()).await.map_err(volume_error)?;
        let record = VolumeRecord {
            id: Uuid::new_v4(),
            name: name.to_string(),
            size_bytes: request.size,
            request,
            tree: spec,
            reservations: None,
        };
        let mut config = state.config.clone();
        config.volumes.push(record.clone());
        state.commit(config).await?;
        let volume = Arc::new(Volume { record, tree: Arc::new(tree) });
        self.volumes.write().insert(name.to_string(), volume.clone());
        Ok(volume)
    }

    /// Deletes a volume once the deletion is recorded, then releases its space.
    pub async fn delete_volume(&self, name: &str) -> Result<(), PoolError> {
        let mut state = self.state.lock().await;
        let Some(record) = state.config.volumes.iter().find(|v| v.name == name).cloned() else {
            return Err(PoolError::NoSuchVolume(name.to_string()));
        };
        let mut config = state.config.clone();
        config.volumes.retain(|v| v.name != name);
        state.commit(config).await?;
        // Anyone still holding the volume is refused from now on, and what is in flight
        // finishes before the space is released.
        let volume = self.volumes.write().remove(name);
        if let Some(volume) = volume
            && tokio::time::timeout(CLOSE_TIMEOUT, volume.tree.close()).await.is_err()
        {
            // Keep the space as it is rather than wait on a stuck device with the pool
            // locked; a new volume on it is zeroed when it is made.
            tracing::warn!(volume = %name, "requests in flight did not finish; space not released");
            return Ok(());
        }
        for (device, offset, length) in record.tree.extents() {
            if let Some(member) = state.members.get(&device)
                && let Err(error) = member.io.discard(offset, length).await
            {
                tracing::warn!(device = %member.name, %error, "could not release the space of a deleted volume");
            }
        }
        Ok(())
    }

    /// A volume by name.
    pub fn volume(&self, name: &str) -> Option<Arc<Volume>> {
        self.volumes.read().get(name).cloned()
    }

    /// Every volume being served, by name.
    pub fn volumes(&self) -> Vec<Arc<Volume>> {
        self.volumes.read().values().cloned().collect()
    }

    /// Every configured device.
    pub async fn devices(&self) -> Vec<DeviceInfo> {
        let state = self.state.lock().await;
        device_infos(&state)
    }

    /// Where byte `offset` of a volume lives, on every copy.
    pub async fn map(&self, name: &str, offset: u64) -> Result<Option<Vec<Location>>, PoolError> {
        let state = self.state.lock().await;
        let record = state
            .config
            .volumes
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| PoolError::NoSuchVolume(name.to_string()))?;
        Ok(if offset < record.size_bytes { strata_volume::map(&record.tree, offset) } else { None })
    }

    /// Records the persistent reservations of a volume's logical unit (None clears them).
    pub async fn set_reservations(&self, name: &str, reservations: Option<String>) -> Result<(), PoolError> {
        let mut state = self.state.lock().await;
        let mut config = state.config.clone();
        let record = config
            .volumes
            .iter_mut()
            .find(|v| v.name == name)
            .ok_or_else(|| PoolError::NoSuchVolume(name.to_string()))?;
        if record.reservations == reservations {
            return Ok(());
        }
        record.reservations = reservations;
        state.commit(config).await
    }

    /// The persistent reservations last recorded for a volume.
    pub async fn reservations(&self, name: &str) -> Option<String> {
        let state = self.state.lock().await;
        state.config.volumes.iter().find(|v| v.name == name).and_then(|v| v.reservations.clone())
    }

    /// The tree of a volume as recorded.
    pub async fn volume_spec(&self, name: &str) -> Option<NodeSpec> {
        let state = self.state.lock().await;
        state.config.volumes.iter().find(|v| v.name == name).map(|v| v.tree.clone())
    }
}

/// What listings show of every configured device, from one pass over the free space.
pub(crate) fn device_infos(state: &State) -> Vec<DeviceInfo> {
    let planner = state.planner();
    let replicas = state.replicas();
    state
        .config
        .devices
        .iter()
        .map(|record| {
            let id = record.id;
            let free = planner
                .devices
                .iter()
                .find(|d| d.id == id)
                .map_or(0, |d| d.free_extents() as u64 * state.config.extent_size);
            DeviceInfo {
                id,
                name: state.members.get(&id).map_or_else(|| record.name.clone(), |m| m.name.clone()),
                fault_domain: record.fault_domain.clone(),
                size_bytes: record.size_bytes,
                data_bytes: record.data_size,
                free_bytes: free,
                state: if state.members.contains_key(&id) {
                    DeviceState::Online
                } else {
                    DeviceState::Missing
                },
                config_replica: replicas.contains(&id),
            }
        })
        .collect()
}
