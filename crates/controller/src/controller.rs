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
use strata_pool::{DeviceInfo, Inspection, Pool, PoolError, PoolOptions, VolumeInfo, inspect, scan_dir};
use strata_volume::{Layout, Location, NodeSpec, VolumeRequest};

use crate::exports::{
    ExportRecord, ExportView, Frontend, ISCSI, LiveExport, NBD, Network, export_key, iscsi_name,
};
use crate::failure::{Failure, FailureKind};
use crate::metrics::{Metered, Metrics, Scope};

/// The file in the data directory with what is not kept on the devices.
const STATE_FILE: &str = "controller.json";
/// The API token file in the data directory.
pub const TOKEN_FILE: &str = "token";
/// The folder of device files made by the controller.
pub const DEVICES_DIR: &str = "devices";

/// What `controller.json` keeps.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    /// Devices added from outside the data directory's devices folder.
    #[serde(default)]
    device_paths: Vec<PathBuf>,
    #[serde(default)]
    exports: Vec<ExportRecord>,
}

/// The controller's state.
pub struct Controller {
    data_dir: PathBuf,
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
    /// What the scan of the devices found at start-up, for status.
    discovery: strata_pool::Discovery,
}

/// Reads or makes the API token of `data_dir` (mode 0600).
pub fn load_or_create_token(data_dir: &Path) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(TOKEN_FILE);
    if let Ok(text) = std::fs::read_to_string(&path) {
        let token = text.trim().to_string();
        if !token.is_empty() {
            return Ok(token);
        }
    }
    let token: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)?;
    file.write_all(format!("{token}\n").as_bytes())?;
    file.sync_all()?;
    Ok(token)
}

impl Controller {
    /// Opens the controller of `data_dir`: reads its state and rebuilds the pool and
    /// volumes from the devices it knows (its devices folder and the recorded paths).
    /// Nothing that is not already a member is written.
    pub async fn open(
        data_dir: &Path,
        file_options: FileOptions,
        pool_name: String,
    ) -> Result<Arc<Self>, String> {
        let devices_dir = data_dir.join(DEVICES_DIR);
        std::fs::create_dir_all(&devices_dir)
            .map_err(|e| format!("cannot create data directory {}: {e}", devices_dir.display()))?;
        let state_path = data_dir.join(STATE_FILE);
        let saved: Saved = match std::fs::read(&state_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("{} is not valid: {e}; fix or remove it", state_path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Saved::default(),
            Err(e) => return Err(format!("cannot read {}: {e}", state_path.display())),
        };
        let metrics = Metrics::default();
        let mut paths =
            scan_dir(&devices_dir).map_err(|e| format!("cannot list {}: {e}", devices_dir.display()))?;
        for p in &saved.device_paths {
            if !paths.contains(p) {
                paths.push(p.clone());
            }
        }
        let mut candidates: Vec<(String, Arc<dyn BlockIo>)> = Vec::new();
        let mut unopened = Vec::new();
        for path in &paths {
            let name = path.display().to_string();
            match FileDevice::open(path, &file_options) {
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
        let tmp = self.data_dir.join(format!("{STATE_FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(saved).expect("state serializes");
        let write = || -> std::io::Result<()> {
            let file = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut &file, &bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.data_dir)?.sync_all()
        };
        write()
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
    /// one), creating a sparse file of `create` bytes first if asked. A device that already
    /// carries a Strata label is refused and left untouched.
    pub async fn add_device(
        &self,
        path: &Path,
        create: Option<u64>,
        fault_domain: Option<String>,
    ) -> Result<DeviceInfo, Failure> {
        if !path.is_absolute() {
            return Err(Failure::new(
                FailureKind::BadRequest,
                format!("device path '{}' must be absolute", path.display()),
            ));
        }
        let mut saved = self.saved.lock().await;
        let device = match create {
            Some(size) => {
                if path.exists() {
                    return Err(Failure::new(
                        FailureKind::Conflict,
                        format!(
                            "{} already exists; add it without --create, or choose another path",
                            path.display()
                        ),
                    ));
                }
                FileDevice::create(path, size, &self.file_options)
            }
            None => FileDevice::open(path, &self.file_options),
        }
        .map_err(|e| Failure::new(FailureKind::BadRequest, format!("cannot open {}: {e}", path.display())))?;
        let name = path.display().to_string();
        let device: Arc<dyn BlockIo> = self.metrics.meter(Scope::device, &name, device);
        let pool = match self.pool() {
            Some(pool) => pool,
            // The first device makes the pool; it is kept only if the claim succeeds.
            None => Arc::new(Pool::create(PoolOptions {
                name: self.pool_name.clone(),
                ..PoolOptions::default()
            })?),
        };
        let claimed = pool.claim(&name, device, fault_domain).await;
        let info = match claimed {
            Ok(info) => info,
            Err(e) => {
                if create.is_some() {
                    let _ = std::fs::remove_file(path);
                }
                return Err(e.into());
            }
        };
        if self.pool.read().is_none() {
            *self.pool.write() = Some(pool);
        }
        if !path.starts_with(self.data_dir.join(DEVICES_DIR)) && !saved.device_paths.iter().any(|p| p == path)
        {
            saved.device_paths.push(path.to_path_buf());
            self.save(&saved).await?;
        }
        tracing::info!(device = %name, id = %info.id, "device added");
        Ok(info)
    }

    /// Takes a device out of the pool and wipes its labels; refused while volumes use it.
    pub async fn remove_device(&self, key: &str) -> Result<(), Failure> {
        let info = self.device(key).await?;
        let mut saved = self.saved.lock().await;
        self.require_pool()?.release(info.id).await?;
        let before = saved.device_paths.len();
        saved.device_paths.retain(|p| p.display().to_string() != info.name);
        if saved.device_paths.len() != before {
            self.save(&saved).await?;
        }
        tracing::info!(device = %info.name, id = %info.id, "device removed");
        Ok(())
    }

    /// What every file in the devices folder and every recorded path is, read without
    /// writing: members, free devices, other pools' devices, damaged labels.
    pub async fn scan(&self) -> Vec<ScanEntry> {
        let saved = self.saved.lock().await.clone();
        let mut paths = scan_dir(&self.data_dir.join(DEVICES_DIR)).unwrap_or_default();
        paths.extend(saved.device_paths.iter().filter(|p| !paths.contains(p)).cloned().collect::<Vec<_>>());
        let pool_id = self.pool().map(|p| p.id());
        let mut out = Vec::new();
        for path in paths {
            let name = path.display().to_string();
            let (state, detail) = match FileDevice::open(&path, &self.file_options) {
                Err(e) => ("unreadable", e.to_string()),
                Ok(device) => match inspect(device.as_ref()).await {
                    Inspection::Unclaimed => {
                        ("unclaimed", "no Strata label; `strata device add` claims it".into())
                    }
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
                {
                    return Err(bad(
                        "LUNs, CHAP, block sizes and removable media apply to iSCSI exports only".into(),
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
                    if chap.user.is_empty() || !(12..=255).contains(&chap.secret.len()) {
                        return Err(bad(format!(
                            "CHAP user '{}': the user must not be empty and the secret must be 12 to 255 characters",
                            chap.user
                        )));
                    }
                }
                if record.mutual_chap.is_some() && record.chap.is_none() {
                    return Err(bad("mutual CHAP needs CHAP: give --chap-user and --chap-secret too".into()));
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
                self.add_device(&path, Some(1 << 30), Some(format!("shelf{i}"))).await?;
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
