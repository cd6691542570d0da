//! The controller: one pool found on (or added to) this machine's devices, its volumes,
//! and the exports that serve them. Management requests arrive here from the REST API;
//! IO never passes through: frontends hold the volumes' block devices directly.
//!
//! What is not on the devices lives in the data directory: the API token, the paths of
//! devices added from outside it, and the exports (`controller.json`, replaced atomically).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use strata_block::{BlockIo, FileDevice, FileOptions};
use strata_pool::{DeviceInfo, Inspection, Pool, PoolError, PoolOptions, VolumeInfo, inspect};
use strata_volume::{Layout, Location, NodeSpec, VolumeRequest};

use crate::devices::{DevicePaths, check_foreign};
use crate::exports::{
    ChapRecord, ExportRecord, ExportView, Frontend, ISCSI, LiveExport, NBD, Network, export_key, iscsi_name,
    open_to_all,
};
use crate::failure::{Failure, FailureKind};
use crate::metrics::{Metered, Metrics, Scope};

/// The file in the data directory with what is not kept on the devices (CHAP secrets
/// among it: mode 0600).
pub(crate) const STATE_FILE: &str = "controller.json";
/// The API token file in the data directory.
pub const TOKEN_FILE: &str = "token";
/// The folder of device files made by the controller.
pub const DEVICES_DIR: &str = "devices";

/// What `controller.json` keeps.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    /// Devices the scan of the devices folder does not find (added from elsewhere, or
    /// through a path the scan does not take): canonical paths of files, block devices
    /// as they were named (a `/dev/disk/by-id/…` name outlives `/dev/sdb`).
    #[serde(default)]
    device_paths: Vec<PathBuf>,
    #[serde(default)]
    exports: Vec<ExportRecord>,
}

/// The controller's state.
pub struct Controller {
    data_dir: PathBuf,
    /// Where device files may be, and what the scan reads.
    device_paths: DevicePaths,
    file_options: FileOptions,
    pool_name: String,
    pool: parking_lot::RwLock<Option<Arc<Pool>>>,
    /// Serializes management changes and guards what `controller.json` holds.
    saved: tokio::sync::Mutex<Saved>,
    /// Exports served now, by protocol, name and LUN.
    pub(crate) exports: parking_lot::RwLock<BTreeMap<String, LiveExport>>,
    /// Changes whenever the exports do, so iSCSI sessions refresh their LUNs.
    pub(crate) export_generation: AtomicU64,
    /// Logical units by designator, for EXTENDED COPY between them.
    lu_directory: Arc<strata_scsi::Directory>,
    /// Recorded exports that could not be served at start-up, and why (their volume did
    /// not open, say); kept so they come back once the cause is mended.
    unserved: parking_lot::Mutex<Vec<(ExportRecord, String)>>,
    /// Each volume's block device with its metrics, shared by every export of it.
    metered_volumes: parking_lot::Mutex<BTreeMap<String, Arc<Metered>>>,
    /// Metrics of every level.
    pub metrics: Metrics,
    /// Where the NBD server listens, once it does.
    pub nbd_addr: OnceLock<SocketAddr>,
    /// Where the iSCSI target listens, once it does.
    pub iscsi_addr: OnceLock<SocketAddr>,
    /// The CHAP credentials discovery sessions must prove, if the configuration sets them.
    pub discovery_chap: OnceLock<ChapRecord>,
    /// What the scan of the devices found at start-up, for status.
    discovery: strata_pool::Discovery,
}

impl Controller {
    /// Opens the controller of `data_dir`: reads its state and rebuilds the pool and
    /// volumes from the devices it knows (its devices folder and the recorded paths).
    /// Nothing that is not already a member is written. Device files may be added from
    /// the devices folder and from `device_dirs`.
    pub async fn open(
        data_dir: &Path,
        file_options: FileOptions,
        pool_name: String,
        device_dirs: &[PathBuf],
    ) -> Result<Arc<Self>, String> {
        let devices_dir = data_dir.join(DEVICES_DIR);
        crate::data_dir::create_private_dir(&devices_dir).map_err(|e| e.to_string())?;
        let state_path = data_dir.join(STATE_FILE);
        crate::data_dir::check(&state_path, crate::data_dir::SECRET_MODE).map_err(|e| e.to_string())?;
        let saved: Saved = match std::fs::read(&state_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("{} is not valid: {e}; fix or remove it", state_path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Saved::default(),
            Err(e) => return Err(format!("cannot read {}: {e}", state_path.display())),
        };
        let metrics = Metrics::default();
        let device_paths = DevicePaths::new(&devices_dir, device_dirs)?;
        let paths = known_paths(&device_paths, &saved)
            .map_err(|e| format!("cannot list {}: {e}", devices_dir.display()))?;
        let mut candidates: Vec<(String, Arc<dyn BlockIo>)> = Vec::new();
        let mut unopened = Vec::new();
        for path in &paths {
            let name = path.display().to_string();
            // Paths are canonical: a link found in their place now is not followed.
            match FileDevice::open_no_follow(path, &file_options) {
                Ok(device) => candidates.push((name.clone(), metrics.meter(Scope::device, &name, device))),
                Err(e) => unopened.push((name, format!("cannot be opened: {e}"))),
            }
        }
        let (pool, mut report) = Pool::open(candidates).await.map_err(|e| Failure::from(e).message)?;
        report.damaged.extend(unopened);
        for (device, why) in &report.damaged {
            tracing::error!(%device, %why, "device not usable");
        }
        for (volume, why) in &report.failed_volumes {
            tracing::error!(%volume, %why, "volume not served");
        }
        for repair in &report.repaired {
            tracing::warn!(%repair, "repaired on start-up");
        }
        if let Some(pool) = &pool {
            tracing::info!(
                pool = %pool.id(),
                devices = report.members.len(),
                missing = report.missing.len(),
                volumes = pool.volumes().len(),
                "pool found"
            );
        }
        let controller = Arc::new(Self {
            data_dir: data_dir.to_path_buf(),
            device_paths,
            file_options,
            pool_name,
            pool: parking_lot::RwLock::new(pool.map(Arc::new)),
            saved: tokio::sync::Mutex::new(saved.clone()),
            exports: parking_lot::RwLock::new(BTreeMap::new()),
            export_generation: AtomicU64::new(0),
            lu_directory: Arc::default(),
            unserved: parking_lot::Mutex::new(Vec::new()),
            metered_volumes: parking_lot::Mutex::new(BTreeMap::new()),
            metrics,
            nbd_addr: OnceLock::new(),
            iscsi_addr: OnceLock::new(),
            discovery_chap: OnceLock::new(),
            discovery: report,
        });
        for record in saved.exports {
            if let Err(e) = controller.start_export(record.clone()).await {
                tracing::error!(volume = %record.volume, error = %e.message, "export not served");
                controller.unserved.lock().push((record, e.message));
            }
        }
        Ok(controller)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// What the scan of the devices found at start-up: devices left untouched (damaged,
    /// foreign), configured devices not found, volumes not served, repairs made.
    pub fn discovery(&self) -> &strata_pool::Discovery {
        &self.discovery
    }

    /// The pool, if one exists.
    pub fn pool(&self) -> Option<Arc<Pool>> {
        self.pool.read().clone()
    }

    fn require_pool(&self) -> Result<Arc<Pool>, Failure> {
        self.pool().ok_or_else(|| {
            Failure::new(
                FailureKind::Conflict,
                "The controller has no devices yet; add one with `strata device add PATH`",
            )
        })
    }

    /// The pool, for a request about volume `name`: without a pool there is no such volume.
    fn pool_with(&self, name: &str) -> Result<Arc<Pool>, Failure> {
        self.pool().ok_or_else(|| PoolError::NoSuchVolume(name.into()).into())
    }

    async fn save(&self, saved: &Saved) -> Result<(), Failure> {
        let path = self.data_dir.join(STATE_FILE);
        let bytes = serde_json::to_vec_pretty(saved).expect("state serializes");
        // It holds CHAP secrets: 0600 from the start, replaced atomically.
        crate::data_dir::write_private(&path, &bytes)
            .map_err(|e| Failure::new(FailureKind::Internal, format!("cannot write {}: {e}", path.display())))
    }

    // ----- devices -----

    /// Every device of the pool.
    pub async fn devices(&self) -> Vec<DeviceInfo> {
        match self.pool() {
            Some(pool) => pool.devices().await,
            None => Vec::new(),
        }
    }

    /// A device by id, unique id prefix, or path.
    pub async fn device(&self, key: &str) -> Result<DeviceInfo, Failure> {
        let devices = self.devices().await;
        let exact: Vec<&DeviceInfo> =
            devices.iter().filter(|d| d.id.to_string() == key || d.name == key).collect();
        let found: Vec<&DeviceInfo> = if exact.is_empty() && key.len() >= 4 {
            devices.iter().filter(|d| d.id.to_string().starts_with(key)).collect()
        } else {
            exact
        };
        match found[..] {
            [one] => Ok(one.clone()),
            [] => Err(Failure::from(PoolError::NoSuchDevice(key.to_string()))),
            _ => Err(Failure::new(
                FailureKind::BadRequest,
                format!("'{key}' matches several devices; give more of the id"),
            )),
        }
    }

    /// Adds the file or block device at `path` to the pool (making the pool on the first
    /// one), creating a new sparse file of `create` bytes first if asked. Paths are checked
    /// by [`DevicePaths`]; a device holding a foreign signature or data where the labels go
    /// is refused unless `force`; a device that carries a Strata label is refused and left
    /// untouched, except a member of this pool found again (under this path or another),
    /// which is taken back.
    pub async fn add_device(
        &self,
        path: &Path,
        create: Option<u64>,
        fault_domain: Option<String>,
        force: bool,
    ) -> Result<DeviceInfo, Failure> {
        let mut saved = self.saved.lock().await;
        let device = match create {
            Some(size) => self.device_paths.create(path, size, &self.file_options)?,
            None => self.device_paths.open(path, &self.file_options)?,
        };
        let volumes_before = self.pool().map(|p| p.volumes()).unwrap_or_default();
        let (info, earlier) = match self.admit(&device, fault_domain, force).await {
            Ok(admitted) => admitted,
            Err(e) => {
                if create.is_some() {
                    let _ = std::fs::remove_file(device.path());
                }
                return Err(e);
            }
        };
        self.record_path(&mut saved, path, &device, earlier.as_deref()).await?;
        match earlier {
            Some(earlier) => {
                tracing::info!(device = %info.name, %earlier, id = %info.id, "device found again")
            }
            None => tracing::info!(device = %info.name, id = %info.id, "device added"),
        }
        drop(saved);
        self.serve_reopened_volumes(&volumes_before).await;
        Ok(info)
    }

    /// Claims `device` into the pool (making the pool on the first device), or takes back a
    /// member found again; with it, the name that member had if it differs.
    async fn admit(
        &self,
        device: &Arc<FileDevice>,
        fault_domain: Option<String>,
        force: bool,
    ) -> Result<(DeviceInfo, Option<String>), Failure> {
        let name = device.path().display().to_string();
        let found = inspect(device.as_ref()).await;
        let io: Arc<dyn BlockIo> = self.metrics.meter(Scope::device, &name, device.clone());
        let pool = match self.pool() {
            Some(pool) => pool,
            None if matches!(found, Inspection::Labelled { .. }) => return self.adopt_pool(name, io).await,
            // The first device makes the pool; it is kept only if the claim succeeds.
            None => Arc::new(Pool::create(PoolOptions {
                name: self.pool_name.clone(),
                ..PoolOptions::default()
            })?),
        };
        let earlier = match found {
            Inspection::Unclaimed if !force => {
                let claimed = pool.claim_ranges(device.geometry().size_bytes).await;
                check_foreign(device.path(), device.as_ref(), &claimed).await?;
                None
            }
            Inspection::Labelled { device_id, .. } => {
                pool.devices().await.into_iter().find(|d| d.id == device_id).map(|d| d.name)
            }
            _ => None,
        };
        let info = pool.claim(&name, io, fault_domain).await.map_err(|e| match e {
            // A file shorter than a block reads as 0 bytes: say how long it really is.
            PoolError::TooSmall { device: d, needed, .. } => {
                PoolError::TooSmall { device: d, size: device.len_bytes(), needed }
            }
            other => other,
        })?;
        if self.pool.read().is_none() {
            *self.pool.write() = Some(pool);
        }
        Ok((info, earlier.filter(|earlier| *earlier != name)))
    }

    /// With no pool yet, a device labelled for one (the only device found missing at the
    /// start, then added under its new path): rebuilds that pool from it, as a start-up
    /// scan would; its other members stay missing until they are added or found.
    async fn adopt_pool(
        &self,
        name: String,
        io: Arc<dyn BlockIo>,
    ) -> Result<(DeviceInfo, Option<String>), Failure> {
        let (pool, report) = Pool::open(vec![(name.clone(), io)]).await?;
        let Some(pool) = pool.filter(|_| report.members.contains(&name)) else {
            let why = report.damaged.first().map(|(_, why)| why.clone());
            let why = why.unwrap_or_else(|| "it is not in the configuration of the pool it names".into());
            return Err(Failure::new(
                FailureKind::Conflict,
                format!(
                    "Device {name} carries a Strata label, but its pool cannot be rebuilt from it: {why}"
                ),
            ));
        };
        for (volume, why) in &report.failed_volumes {
            tracing::warn!(%volume, %why, "volume not served yet");
        }
        let info = pool.devices().await.into_iter().find(|d| d.name == name);
        let info = info
            .ok_or_else(|| Failure::new(FailureKind::Internal, format!("{name} vanished from its pool")))?;
        tracing::info!(pool = %pool.id(), device = %name, "pool found again on an added device");
        *self.pool.write() = Some(Arc::new(pool));
        Ok((info, None))
    }

    /// Records in `controller.json` the path of a device the scan will not find (and forgets
    /// `earlier`, the path a member found again had), so it comes back after a restart.
    async fn record_path(
        &self,
        saved: &mut Saved,
        given: &Path,
        device: &FileDevice,
        earlier: Option<&str>,
    ) -> Result<(), Failure> {
        let before = saved.device_paths.clone();
        if let Some(earlier) = earlier {
            saved.device_paths.retain(|p| p.display().to_string() != earlier);
        }
        let canonical = device.path();
        if !self.device_paths.found_by_scan(canonical) {
            // Block devices by the name the operator chose (a by-id name outlives sdb).
            let record = if device.is_block_device() { given } else { canonical };
            let known = saved
                .device_paths
                .iter()
                .any(|p| p == record || std::fs::canonicalize(p).is_ok_and(|c| c == canonical));
            if !known {
                saved.device_paths.push(record.to_path_buf());
            }
        }
        if saved.device_paths != before {
            self.save(saved).await?;
        }
        Ok(())
    }

    /// Serves the volumes a member found again brought back: each one not in `before`, or
    /// opened anew, is exported again from its new tree (clients still connected to the
    /// failed one keep getting errors until they reconnect), and recorded exports whose
    /// volume was not there at the start are served.
    async fn serve_reopened_volumes(&self, before: &[Arc<strata_pool::Volume>]) {
        let Some(pool) = self.pool() else { return };
        let renewed: Vec<String> = pool
            .volumes()
            .iter()
            .filter(|v| !before.iter().any(|old| Arc::ptr_eq(old, v)))
            .map(|v| v.name().to_string())
            .collect();
        for volume in &renewed {
            self.metered_volumes.lock().remove(volume);
            let live: Vec<(String, ExportRecord)> = self
                .exports
                .read()
                .iter()
                .filter(|(_, e)| e.record.volume == *volume)
                .map(|(k, e)| (k.clone(), e.record.clone()))
                .collect();
            for (key, record) in live {
                self.stop_export(&key);
                self.unserved.lock().push((record, "its volume is being opened again".into()));
            }
        }
        self.serve_waiting_exports().await;
    }

    /// Serves recorded exports whose volume was not there at the start and now is.
    async fn serve_waiting_exports(&self) {
        let pool = self.pool();
        let ready: Vec<ExportRecord> = {
            let mut unserved = self.unserved.lock();
            let (ready, waiting) = std::mem::take(&mut *unserved)
                .into_iter()
                .partition(|(r, _)| pool.as_ref().is_some_and(|p| p.volume(&r.volume).is_some()));
            *unserved = waiting;
            ready.into_iter().map(|(r, _)| r).collect()
        };
        for record in ready {
            if let Err(e) = self.start_export(record.clone()).await {
                tracing::error!(volume = %record.volume, error = %e.message, "export not served");
                self.unserved.lock().push((record, e.message));
            }
        }
    }

    /// Takes a device out of the pool and wipes its labels; refused while volumes use it.
    pub async fn remove_device(&self, key: &str) -> Result<(), Failure> {
        let info = self.device(key).await?;
        let mut saved = self.saved.lock().await;
        self.require_pool()?.release(info.id).await?;
        let before = saved.device_paths.len();
        let named = |p: &PathBuf| {
            p.display().to_string() == info.name
                || std::fs::canonicalize(p).is_ok_and(|c| c.display().to_string() == info.name)
        };
        saved.device_paths.retain(|p| !named(p));
        if saved.device_paths.len() != before {
            self.save(&saved).await?;
        }
        tracing::info!(device = %info.name, id = %info.id, "device removed");
        Ok(())
    }

    /// What every device the scan finds and every recorded path is, read without writing:
    /// members, free devices (with any foreign signature they hold), devices in use by
    /// something else, other pools' devices, damaged labels.
    pub async fn scan(&self) -> Vec<ScanEntry> {
        let saved = self.saved.lock().await.clone();
        let paths = known_paths(&self.device_paths, &saved).unwrap_or_default();
        let pool_id = self.pool().map(|p| p.id());
        // Members are held open (block devices exclusively): report them without opening.
        let online: Vec<(String, String)> = self
            .devices()
            .await
            .into_iter()
            .filter(|d| d.state == strata_pool::DeviceState::Online)
            .map(|d| (d.name, d.id.to_string()))
            .collect();
        let mut out = Vec::new();
        for path in paths {
            let name = path.display().to_string();
            if let Some((_, id)) = online.iter().find(|(member, _)| *member == name) {
                out.push(ScanEntry { path: name, state: "member".into(), detail: id.clone() });
                continue;
            }
            let (state, detail) = match FileDevice::open_no_follow(&path, &self.file_options) {
                Err(e) if e.kind() == std::io::ErrorKind::ResourceBusy => ("in use", e.to_string()),
                Err(e) => ("unreadable", e.to_string()),
                Ok(device) => match inspect(device.as_ref()).await {
                    Inspection::Unclaimed => match strata_block::signature::probe(device.as_ref()).await {
                        Ok(found) if !found.is_empty() => (
                            "unclaimed",
                            format!(
                                "no Strata label; holds {}: `strata device add --force` overwrites it",
                                found[0]
                            ),
                        ),
                        _ => ("unclaimed", "no Strata label; `strata device add` claims it".into()),
                    },
                    Inspection::Labelled { pool_id: p, device_id } if Some(p) == pool_id => {
                        ("member", device_id.to_string())
                    }
                    Inspection::Labelled { pool_id: p, .. } => ("foreign", format!("belongs to pool {p}")),
                    Inspection::Damaged(why) => ("damaged", why),
                },
            };
            out.push(ScanEntry { path: name, state: state.into(), detail });
        }
        out
    }

    // ----- volumes -----

    /// Every volume.
    pub fn volumes(&self) -> Vec<VolumeInfo> {
        self.pool().map(|p| p.volumes().iter().map(|v| v.info()).collect()).unwrap_or_default()
    }

    /// One volume with its tree.
    pub async fn volume(&self, name: &str) -> Result<(VolumeInfo, NodeSpec), Failure> {
        let pool = self.pool_with(name)?;
        let volume = pool.volume(name).ok_or_else(|| PoolError::NoSuchVolume(name.into()))?;
        let spec = pool.volume_spec(name).await.ok_or_else(|| PoolError::NoSuchVolume(name.into()))?;
        Ok((volume.info(), spec))
    }

    /// Makes a volume.
    pub async fn create_volume(&self, name: &str, request: VolumeRequest) -> Result<VolumeInfo, Failure> {
        let _guard = self.saved.lock().await;
        let pool = self.require_pool()?;
        let volume = pool.create_volume(name, request).await?;
        tracing::info!(volume = %name, size = volume.info().size_bytes, layout = %volume.info().layout, "volume created");
        Ok(volume.info())
    }

    /// Deletes a volume; refused while it is exported.
    pub async fn delete_volume(&self, name: &str) -> Result<(), Failure> {
        let _guard = self.saved.lock().await;
        if let Some(export) = self.exports.read().values().find(|e| e.record.volume == name) {
            return Err(Failure::new(
                FailureKind::Conflict,
                format!(
                    "Volume '{name}' is exported as '{}'; remove the export first (`strata export remove {name}`)",
                    export.record.name
                ),
            ));
        }
        let pool = self.pool_with(name)?;
        pool.delete_volume(name).await?;
        self.metered_volumes.lock().remove(name);
        tracing::info!(volume = %name, "volume deleted");
        Ok(())
    }

    /// Where byte `offset` of a volume is stored.
    pub async fn map(&self, name: &str, offset: u64) -> Result<Vec<Location>, Failure> {
        let pool = self.pool_with(name)?;
        pool.map(name, offset).await?.ok_or_else(|| {
            let size = pool.volume(name).map(|v| v.info().size_bytes).unwrap_or(0);
            Failure::new(
                FailureKind::BadRequest,
                format!("offset {offset} is beyond the volume's {size} bytes"),
            )
        })
    }

    fn volume_io(&self, name: &str) -> Result<Arc<Metered>, Failure> {
        let pool = self.pool_with(name)?;
        let volume = pool.volume(name).ok_or_else(|| PoolError::NoSuchVolume(name.into()))?;
        let mut metered = self.metered_volumes.lock();
        Ok(metered
            .entry(name.to_string())
            .or_insert_with(|| self.metrics.meter(Scope::volume, name, volume.io()))
            .clone())
    }

    // ----- exports -----

    /// Every export (without CHAP secrets).
    pub fn exports(&self) -> Vec<ExportView> {
        let exports = self.exports.read();
        let live = exports.values().map(|e| self.view(e.record.clone(), None));
        let unserved =
            self.unserved.lock().clone().into_iter().map(|(record, why)| self.view(record, Some(why)));
        live.chain(unserved).collect()
    }

    fn view(&self, mut record: ExportRecord, problem: Option<String>) -> ExportView {
        for chap in [&mut record.chap, &mut record.mutual_chap].into_iter().flatten() {
            chap.secret.clear();
        }
        let served = problem.is_none();
        let (uri, portal) = match record.protocol.as_str() {
            ISCSI => {
                let portal = self.iscsi_addr.get().map(|a| a.to_string());
                let uri = portal
                    .as_ref()
                    .filter(|_| served)
                    .map(|p| format!("iscsi://{p}/{}/{}", record.name, record.lun.unwrap_or(0)));
                (uri, portal)
            }
            _ => (self.nbd_addr.get().filter(|_| served).map(|a| format!("nbd://{a}/{}", record.name)), None),
        };
        ExportView { record, uri, portal, served, problem }
    }

    /// The target name a volume gets when none is given: stable, from the pool's and the
    /// volume's identity.
    pub fn default_target_name(&self, volume: &str) -> Result<String, Failure> {
        let pool = self.pool_with(volume)?;
        let id = pool
            .volume(volume)
            .map(|v| v.record().id)
            .ok_or_else(|| PoolError::NoSuchVolume(volume.into()))?;
        Ok(format!("iqn.2026-11.io.strata:{}.{}", pool.id().simple(), id.simple()))
    }

    /// Serves `record` from now on (without saving it); returns it as served (iSCSI names
    /// in normal form, the LUN filled in).
    async fn start_export(&self, mut record: ExportRecord) -> Result<ExportRecord, Failure> {
        let bad = |why: String| Failure::new(FailureKind::BadRequest, why);
        let frontend = match record.protocol.as_str() {
            NBD => {
                let allow = record
                    .allow
                    .iter()
                    .map(|a| Network::parse(a))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(bad)?;
                let check = |name: &str| {
                    !name.is_empty()
                        && name.len() <= 255
                        && name.chars().all(|c| c.is_ascii_graphic() && c != '/')
                };
                if !check(&record.name) {
                    return Err(bad(format!(
                        "export name '{}' must be 1 to 255 printable characters without '/' or spaces",
                        record.name
                    )));
                }
                if record.lun.is_some()
                    || record.chap.is_some()
                    || record.mutual_chap.is_some()
                    || record.block_size.is_some()
                    || record.removable
                    || record.allow_any
                {
                    return Err(bad(
                        "LUNs, CHAP, block sizes, removable media and --allow-any apply to iSCSI exports only"
                            .into(),
                    ));
                }
                self.check_export_conflicts(&record)?;
                let volume = self.volume_io(&record.volume)?;
                let export = strata_nbd::Export {
                    name: record.name.clone(),
                    description: format!("Strata volume {}", record.volume),
                    device: self.metrics.meter(Scope::nbd, &record.name, volume),
                    read_only: record.read_only,
                };
                Frontend::Nbd { allow, export }
            }
            ISCSI => {
                record.name = iscsi_name(&record.name).map_err(bad)?;
                for initiator in &mut record.allow {
                    *initiator = iscsi_name(initiator).map_err(|e| bad(format!("--allow: {e}")))?;
                }
                let lun = *record.lun.get_or_insert(0);
                if lun >= 16384 {
                    return Err(bad(format!("LUN {lun} is out of range: use 0 to 16383")));
                }
                for chap in [&record.chap, &record.mutual_chap].into_iter().flatten() {
                    chap.check().map_err(bad)?;
                }
                if record.mutual_chap.is_some() && record.chap.is_none() {
                    return Err(bad("mutual CHAP needs CHAP: give --chap-user and --chap-secret too".into()));
                }
                if record.allow_any && !record.allow.is_empty() {
                    return Err(bad(
                        "--allow-any opens the export to every initiator; give it or --allow, not both"
                            .into(),
                    ));
                }
                // At start-up the portal is not known yet: `withhold_open_exports` checks
                // the recorded exports once it is.
                if let Some(why) = self.iscsi_addr.get().and_then(|portal| open_to_all(&record, *portal)) {
                    return Err(bad(why));
                }
                if let Some(other) = self.exports.read().values().find(|e| {
                    e.record.protocol == ISCSI
                        && e.record.name == record.name
                        && (e.record.chap != record.chap || e.record.mutual_chap != record.mutual_chap)
                }) {
                    return Err(Failure::new(
                        FailureKind::Conflict,
                        format!(
                            "target '{}' already serves volume '{}' with other CHAP settings; LUNs of one target share its credentials",
                            record.name, other.record.volume
                        ),
                    ));
                }
                self.check_export_conflicts(&record)?;
                let lu = self.logical_unit(&record).await?;
                Frontend::Iscsi { lu }
            }
            other => return Err(bad(format!("protocol '{other}' is not served; use nbd or iscsi"))),
        };
        if let Frontend::Iscsi { lu } = &frontend {
            self.lu_directory.insert(lu);
        }
        self.exports.write().insert(export_key(&record), LiveExport { record: record.clone(), frontend });
        self.export_generation.fetch_add(1, Ordering::AcqRel);
        Ok(record)
    }

    /// Takes out of service every iSCSI export that would be open to every initiator on
    /// `portal` (no allow-list, no CHAP, no `allow_any`, a portal that is not loopback):
    /// such exports recorded before this rule, or served before on a loopback portal. They
    /// stay recorded and listed as not served, with the reason, until removed. Called once
    /// the portal is known, before the target accepts anyone.
    pub fn withhold_open_exports(&self, portal: SocketAddr) {
        let open: Vec<(String, ExportRecord, String)> = self
            .exports
            .read()
            .iter()
            .filter_map(|(key, e)| {
                open_to_all(&e.record, portal).map(|why| (key.clone(), e.record.clone(), why))
            })
            .collect();
        for (key, record, why) in open {
            tracing::error!(volume = %record.volume, target = %record.name, %why, "export not served");
            self.stop_export(&key);
            self.unserved.lock().push((record, format!("{why}; remove it and add it again so")));
        }
    }

    /// Refuses a second export of a volume over one protocol, and a name (and LUN) taken.
    fn check_export_conflicts(&self, record: &ExportRecord) -> Result<(), Failure> {
        let exports = self.exports.read();
        if let Some(existing) = exports
            .values()
            .find(|e| e.record.volume == record.volume && e.record.protocol == record.protocol)
        {
            return Err(Failure::new(
                FailureKind::Conflict,
                format!(
                    "volume '{}' is already exported as '{}' over {}; remove that export first",
                    existing.record.volume, existing.record.name, record.protocol
                ),
            ));
        }
        if let Some(existing) = exports.get(&export_key(record)) {
            let what = match record.lun {
                Some(lun) => format!("LUN {lun} of target '{}'", record.name),
                None => format!("export name '{}'", record.name),
            };
            return Err(Failure::new(
                FailureKind::Conflict,
                format!("{what} is taken by volume '{}'; choose another", existing.record.volume),
            ));
        }
        Ok(())
    }

    /// The SCSI logical unit of an iSCSI export, with the reservations kept on the devices.
    async fn logical_unit(&self, record: &ExportRecord) -> Result<Arc<strata_scsi::LogicalUnit>, Failure> {
        let pool = self.pool_with(&record.volume)?;
        let volume =
            pool.volume(&record.volume).ok_or_else(|| PoolError::NoSuchVolume(record.volume.clone()))?;
        let id = volume.record().id;
        let mut naa = [0u8; 16];
        // NAA 6 (IEEE registered extended) with a zero company id: the rest from the
        // volume's identity, so the WWN is stable and unique within the pool.
        naa[0] = 0x60;
        naa[3..].copy_from_slice(&id.as_bytes()[..13]);
        naa[3] &= 0x0f;
        let identity = strata_scsi::Identity {
            vendor: "STRATA".into(),
            product: "VOLUME".into(),
            revision: "0001".into(),
            serial: id.simple().to_string(),
            naa,
            target_port_group: 1,
            read_only: record.read_only,
        };
        let persisted = pool.reservations(&record.volume).await;
        let store = Arc::new(ReservationsOnDevices { pool, volume: record.volume.clone() });
        let device = self.metrics.meter(Scope::iscsi, &record.volume, self.volume_io(&record.volume)?);
        let lu = strata_scsi::LogicalUnit::new(
            device,
            identity,
            persisted.as_deref().map(str::as_bytes),
            store,
            self.lu_directory.clone(),
        )
        .map_err(|e| Failure::new(FailureKind::Internal, format!("volume '{}': {e}", record.volume)))?
        .with_removable_medium(record.removable);
        let lu = match record.block_size {
            Some(size) => lu.with_logical_block_size(size).map_err(|e| {
                Failure::new(
                    FailureKind::BadRequest,
                    format!("volume '{}': --block-size {size}: {e}", record.volume),
                )
            })?,
            None => lu,
        };
        Ok(Arc::new(lu))
    }

    /// Exports a volume and records it so it is served again after a restart.
    pub async fn add_export(&self, record: ExportRecord) -> Result<ExportView, Failure> {
        let mut saved = self.saved.lock().await;
        if let Some((_, why)) = self
            .unserved
            .lock()
            .iter()
            .find(|(r, _)| r.volume == record.volume && r.protocol == record.protocol)
        {
            return Err(Failure::new(
                FailureKind::Conflict,
                format!(
                    "volume '{}' already has an export over {} that is not served ({why}); remove it first (`strata export remove {} --{}`)",
                    record.volume, record.protocol, record.volume, record.protocol
                ),
            ));
        }
        let record = self.start_export(record).await?;
        saved.exports.push(record.clone());
        if let Err(e) = self.save(&saved).await {
            saved.exports.pop();
            self.stop_export(&export_key(&record));
            return Err(e);
        }
        tracing::info!(volume = %record.volume, protocol = %record.protocol, export = %record.name, "export added");
        Ok(self.view(record, None))
    }

    fn stop_export(&self, key: &str) {
        if let Some(export) = self.exports.write().remove(key)
            && let Frontend::Iscsi { lu } = &export.frontend
        {
            self.lu_directory.remove(&lu.identity().naa);
        }
        self.export_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Stops exporting a volume (over one protocol, or all). Clients already connected keep
    /// their connection until they leave (iSCSI sessions lose the LUN at their next
    /// command); new ones are refused.
    pub async fn remove_export(&self, volume: &str, protocol: Option<&str>) -> Result<(), Failure> {
        let mut saved = self.saved.lock().await;
        let matches = |r: &ExportRecord| r.volume == volume && protocol.is_none_or(|p| p == r.protocol);
        let keys: Vec<String> =
            self.exports.read().iter().filter(|(_, e)| matches(&e.record)).map(|(k, _)| k.clone()).collect();
        let unserved = self.unserved.lock().iter().any(|(r, _)| matches(r));
        if keys.is_empty() && !unserved {
            return Err(Failure::new(
                FailureKind::NotFound,
                format!(
                    "volume '{volume}' is not exported{}; `strata export list` shows the exports",
                    protocol.map(|p| format!(" over {p}")).unwrap_or_default()
                ),
            ));
        }
        saved.exports.retain(|e| !matches(e));
        self.save(&saved).await?;
        self.unserved.lock().retain(|(r, _)| !matches(r));
        for key in keys {
            self.stop_export(&key);
            tracing::info!(%volume, export = %key, "export removed");
        }
        Ok(())
    }

    // ----- lifecycle -----

    /// Makes what `serve --demo` shows, where missing: four sparse 1 GiB device files, a
    /// 1 GiB RAID 10 volume `demo` (linear if fewer than four devices), and its NBD export.
    pub async fn ensure_demo(&self) -> Result<(), Failure> {
        if self.pool().is_none() {
            for i in 0..4 {
                let path = std::path::absolute(self.data_dir.join(DEVICES_DIR).join(format!("device{i}")))
                    .map_err(|e| Failure::new(FailureKind::Internal, e.to_string()))?;
                self.add_device(&path, Some(1 << 30), Some(format!("shelf{i}")), false).await?;
            }
        }
        if self.pool().is_some_and(|p| p.volume("demo").is_none()) {
            let layout = if self.devices().await.len() >= 4 { Layout::Raid10 } else { Layout::Linear };
            self.create_volume("demo", VolumeRequest::new(1 << 30, layout)).await?;
        }
        let exported = |protocol: &str| {
            self.exports.read().values().any(|e| e.record.volume == "demo" && e.record.protocol == protocol)
        };
        if !exported(NBD) {
            self.add_export(ExportRecord {
                volume: "demo".into(),
                protocol: NBD.into(),
                name: "demo".into(),
                read_only: false,
                allow: Vec::new(),
                allow_any: false,
                lun: None,
                chap: None,
                mutual_chap: None,
                block_size: None,
                removable: false,
            })
            .await?;
        }
        if !exported(ISCSI) {
            self.add_export(ExportRecord {
                volume: "demo".into(),
                protocol: ISCSI.into(),
                name: self.default_target_name("demo")?,
                read_only: false,
                allow: Vec::new(),
                allow_any: false,
                lun: Some(0),
                chap: None,
                mutual_chap: None,
                block_size: None,
                removable: false,
            })
            .await?;
        }
        Ok(())
    }

    /// Shuts every volume down cleanly: after this no request reaches a device, all that
    /// was written is durable, and the next start resyncs nothing.
    pub async fn shut_down(&self) {
        let Some(pool) = self.pool() else { return };
        for volume in pool.volumes() {
            if let Err(e) = volume.io().shut_down().await {
                tracing::error!(volume = %volume.name(), error = %e, "final flush failed");
            }
        }
    }

    /// Refreshes the gauges that are read at scrape time.
    pub async fn update_gauges(&self, nbd_connections: usize, iscsi_sessions: usize) {
        use crate::metrics::NameLabel;
        for v in self.volumes() {
            let state = match v.state {
                strata_volume::VolumeState::Healthy => 0,
                strata_volume::VolumeState::Degraded => 1,
                strata_volume::VolumeState::Failed => 2,
            };
            self.metrics.volume_state.get_or_create(&NameLabel { name: v.name }).set(state);
        }
        for d in self.devices().await {
            let free = i64::try_from(d.free_bytes).unwrap_or(i64::MAX);
            self.metrics.device_free_bytes.get_or_create(&NameLabel { name: d.name }).set(free);
        }
        self.metrics.nbd_connections.set(i64::try_from(nbd_connections).unwrap_or(i64::MAX));
        self.metrics.iscsi_sessions.set(i64::try_from(iscsi_sessions).unwrap_or(i64::MAX));
    }
}

/// The devices a controller looks at: what the scan of the devices folder finds, then the
/// recorded paths it does not, each device once (canonical where it resolves; a recorded
/// path that does not resolve is kept, to be reported as not found).
fn known_paths(device_paths: &DevicePaths, saved: &Saved) -> std::io::Result<Vec<PathBuf>> {
    let mut paths = device_paths.scan()?;
    for recorded in &saved.device_paths {
        let path = std::fs::canonicalize(recorded).unwrap_or_else(|_| recorded.clone());
        if !paths.contains(&path) {
            paths.push(path);
        }
    }
    Ok(paths)
}

/// What a scan found at one path.
#[derive(Clone, Debug, Serialize)]
pub struct ScanEntry {
    /// The path.
    pub path: String,
    /// member, unclaimed, foreign, damaged or unreadable.
    pub state: String,
    /// Device id, owning pool, or what is wrong.
    pub detail: String,
}

/// Keeps a logical unit's persistent reservations in the pool configuration, which is
/// replicated on the devices, so they survive a restart and follow the volume.
struct ReservationsOnDevices {
    pool: Arc<Pool>,
    volume: String,
}

#[async_trait::async_trait]
impl strata_scsi::ReservationStore for ReservationsOnDevices {
    async fn save(&self, state: bytes::Bytes) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        // The logical unit's state is JSON text, kept as such in the pool configuration.
        let value = if state.is_empty() { None } else { Some(String::from_utf8(state.to_vec())?) };
        self.pool.set_reservations(&self.volume, value).await?;
        Ok(())
    }
}
