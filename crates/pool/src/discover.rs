//! Rediscovery: a controller that starts with nothing but device paths rebuilds the pool
//! and every volume from what is written on the devices.
//!
//! ```text
//!   candidates ─▶ read both label copies ─┬─ no magic in either ─▶ unclaimed (never written)
//!                                         ├─ all copies corrupt ─▶ damaged (left untouched)
//!                                         ├─ other pool ─────────▶ foreign (left untouched)
//!                                         └─ member ─▶ read both metadata slots
//!   newest valid configuration among the config replicas ─▶ open every volume tree
//!   (resync dirty regions) ─▶ repair bad label copies, rewrite lagging or torn slots
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use strata_block::{BlockIo, Durability, FileDevice, FileOptions, IoError};
use strata_volume::{Tree, VolumeState};
use uuid::Uuid;

use crate::config::{DeviceMetadata, PoolConfig};
use crate::error::PoolError;
use crate::label::{LABEL_SIZE, Label, LabelError, back_offset};
use crate::pool::{DeviceInfo, Member, Pool, State};
use crate::slot::{self, SLOT_HEADER, SlotError};

/// What a scan of the candidate devices found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Discovery {
    /// Member devices in use, by name.
    pub members: Vec<String>,
    /// Devices without a Strata label: free to claim, never written until claimed.
    pub unclaimed: Vec<String>,
    /// Devices with a Strata label that cannot be read, and why; left untouched.
    pub damaged: Vec<(String, String)>,
    /// Devices of another pool (or not in this pool's configuration); left untouched.
    pub foreign: Vec<(String, Uuid)>,
    /// Repairs made: a label copy rewritten, a torn metadata slot rewritten.
    pub repaired: Vec<String>,
    /// Configured devices that were not found.
    pub missing: Vec<Uuid>,
    /// Volumes that could not be opened, and why.
    pub failed_volumes: Vec<(String, String)>,
}

/// What a device is, read from its labels without writing anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inspection {
    /// No Strata label: free to claim.
    Unclaimed,
    /// Labelled as device `device_id` of pool `pool_id`.
    Labelled {
        /// Its pool.
        pool_id: Uuid,
        /// Its identity.
        device_id: Uuid,
    },
    /// Carries a Strata label that cannot be read, and why.
    Damaged(String),
}

/// Reads what `io` is; never writes.
pub async fn inspect(io: &dyn BlockIo) -> Inspection {
    match read_labels(io).await {
        LabelScan::Blank => Inspection::Unclaimed,
        LabelScan::Valid { label, .. } => {
            Inspection::Labelled { pool_id: label.pool_id, device_id: label.device_id }
        }
        LabelScan::Damaged(why) => Inspection::Damaged(why),
    }
}

/// What the two label copies of a device say.
pub(crate) enum LabelScan {
    /// Neither copy has the Strata magic.
    Blank,
    /// At least one copy is valid; `repair` names the copy to rewrite.
    Valid { label: Label, repair: Option<(u32, String)> },
    /// Copies carry the magic but none is valid.
    Damaged(String),
}

async fn read_copy(io: &dyn BlockIo, offset: u64) -> Result<Label, String> {
    match io.read(offset, LABEL_SIZE).await {
        Ok(raw) => Label::decode(&raw).map_err(|e| match e {
            LabelError::NoMagic => "no magic".to_string(),
            other => other.to_string(),
        }),
        Err(e) => Err(format!("cannot be read: {e}")),
    }
}

/// Reads and judges both label copies.
pub(crate) async fn read_labels(io: &dyn BlockIo) -> LabelScan {
    let size = io.geometry().size_bytes;
    if size < 2 * LABEL_SIZE {
        return LabelScan::Blank;
    }
    let front = read_copy(io, 0).await;
    let back_at = match &front {
        Ok(label) if label.back_offset() + LABEL_SIZE <= size => label.back_offset(),
        _ => back_offset(size),
    };
    let back = read_copy(io, back_at).await;
    match (front, back) {
        (Ok(f), Ok(b)) if f == b => LabelScan::Valid { label: f, repair: None },
        (Ok(f), Ok(b)) => {
            let (label, stale) = if b.generation > f.generation { (b, 0) } else { (f, 1) };
            LabelScan::Valid { label, repair: Some((stale, "label copies disagree".into())) }
        }
        (Ok(label), Err(why)) => {
            LabelScan::Valid { label, repair: Some((1, format!("back label copy: {why}"))) }
        }
        (Err(why), Ok(label)) => {
            LabelScan::Valid { label, repair: Some((0, format!("front label copy: {why}"))) }
        }
        (Err(f), Err(b)) if f == "no magic" && b == "no magic" => LabelScan::Blank,
        (Err(f), Err(b)) => LabelScan::Damaged(format!("front copy: {f}; back copy: {b}")),
    }
}

/// Writes label copy `copy` (0 front, 1 back).
async fn write_copy(io: &dyn BlockIo, label: &Label, copy: u32) -> Result<(), IoError> {
    let at = if copy == 0 { 0 } else { label.back_offset() };
    io.write(at, Bytes::from(label.encode(copy)), Durability::Fua).await
}

/// Writes both label copies.
pub(crate) async fn write_labels(io: &dyn BlockIo, label: &Label) -> Result<(), IoError> {
    write_copy(io, label, 0).await?;
    write_copy(io, label, 1).await
}

/// Erases the labels and metadata area so the device reads as unclaimed.
pub(crate) async fn wipe(io: &dyn BlockIo, label: &Label) -> Result<(), IoError> {
    io.write_zeroes(label.metadata_offset, 2 * label.slot_size).await?;
    let zero = strata_block::zeroes(LABEL_SIZE);
    io.write(label.back_offset(), zero.clone(), Durability::Fua).await?;
    io.write(0, zero, Durability::Fua).await
}

/// One metadata slot as found.
enum SlotRead {
    Valid(u64, DeviceMetadata),
    Empty,
    Bad(String),
}

async fn read_slot(io: &dyn BlockIo, label: &Label, index: u64) -> SlotRead {
    let bs = u64::from(io.geometry().block_size);
    let at = label.metadata_offset + index * label.slot_size;
    let header = match io.read(at, bs.max(SLOT_HEADER as u64)).await {
        Ok(raw) => raw,
        Err(e) => return SlotRead::Bad(format!("cannot be read: {e}")),
    };
    let len = match slot::decode_header(&header) {
        Ok((_, len)) => len,
        Err(SlotError::Empty) => return SlotRead::Empty,
        Err(e) => return SlotRead::Bad(e.to_string()),
    };
    let total = (SLOT_HEADER as u64).saturating_add(len).div_ceil(bs).saturating_mul(bs);
    if total > label.slot_size {
        return SlotRead::Bad(SlotError::Length(len).to_string());
    }
    let raw = match io.read(at, total).await {
        Ok(raw) => raw,
        Err(e) => return SlotRead::Bad(format!("cannot be read: {e}")),
    };
    match slot::decode(&raw) {
        Ok((generation, payload)) => match serde_json::from_slice::<DeviceMetadata>(payload) {
            Ok(m)
                if m.device_id == label.device_id
                    && m.pool_id == label.pool_id
                    && m.generation == generation =>
            {
                match m.config.as_ref().map(PoolConfig::validate) {
                    Some(Err(why)) => SlotRead::Bad(format!("configuration is invalid: {why}")),
                    _ => SlotRead::Valid(generation, m),
                }
            }
            Ok(_) => SlotRead::Bad("records belong to another device".into()),
            Err(e) => SlotRead::Bad(format!("records do not parse: {e}")),
        },
        Err(e) => SlotRead::Bad(e.to_string()),
    }
}

/// Both metadata slots of a member: the newest valid records, the slot holding them, and
/// what is wrong with the others.
async fn read_slots(io: &dyn BlockIo, label: &Label) -> (Option<(u64, DeviceMetadata)>, u64, Vec<String>) {
    let mut newest: Option<(u64, DeviceMetadata)> = None;
    let mut newest_slot = 1;
    let mut bad_slots = Vec::new();
    for index in 0..2 {
        match read_slot(io, label, index).await {
            SlotRead::Valid(g, m) => {
                if newest.as_ref().is_none_or(|(n, _)| g > *n) {
                    newest = Some((g, m));
                    newest_slot = index;
                }
            }
            SlotRead::Empty => {}
            SlotRead::Bad(why) => bad_slots.push(format!("metadata slot {index}: {why}")),
        }
    }
    (newest, newest_slot, bad_slots)
}

struct Found {
    name: String,
    io: Arc<dyn BlockIo>,
    label: Label,
    label_repair: Option<(u32, String)>,
    newest: Option<(u64, DeviceMetadata)>,
    /// Which slot holds `newest`.
    newest_slot: u64,
    bad_slots: Vec<String>,
}

impl Pool {
    /// Rebuilds the pool from candidate devices. Returns no pool if none of them is a
    /// member of one; the report says what every candidate turned out to be.
    pub async fn open(
        candidates: Vec<(String, Arc<dyn BlockIo>)>,
    ) -> Result<(Option<Pool>, Discovery), PoolError> {
        let mut report = Discovery::default();
        let mut found: Vec<Found> = Vec::new();
        for (name, io) in candidates {
            match read_labels(io.as_ref()).await {
                LabelScan::Blank => report.unclaimed.push(name),
                LabelScan::Damaged(why) => {
                    tracing::error!(device = %name, reason = %why, "every label copy is bad; device left untouched");
                    report.damaged.push((name, why));
                }
                LabelScan::Valid { label, repair } => {
                    let (newest, newest_slot, bad_slots) = read_slots(io.as_ref(), &label).await;
                    found.push(Found {
                        name,
                        io,
                        label,
                        label_repair: repair,
                        newest,
                        newest_slot,
                        bad_slots,
                    });
                }
            }
        }
        // One pool per controller: the one with the most devices here.
        let mut counts: BTreeMap<Uuid, usize> = BTreeMap::new();
        found.iter().for_each(|f| *counts.entry(f.label.pool_id).or_default() += 1);
        let Some(pool_id) = counts.iter().max_by_key(|(_, n)| **n).map(|(id, _)| *id) else {
            return Ok((None, report));
        };
        let (ours, others): (Vec<Found>, Vec<Found>) =
            found.into_iter().partition(|f| f.label.pool_id == pool_id);
        report.foreign.extend(others.into_iter().map(|f| (f.name, f.label.pool_id)));
        let attempted = ours.iter().filter_map(|f| f.newest.as_ref().map(|(g, _)| *g)).max().unwrap_or(0);
        // The newest generation wins; should a generation ever carry two different
        // configurations (a refused change on a device that was away when it was
        // superseded), the one more devices carry wins, then a fixed order.
        let candidates: Vec<PoolConfig> =
            ours.iter().filter_map(|f| f.newest.as_ref().and_then(|(_, m)| m.config.clone())).collect();
        let copies = |c: &PoolConfig| candidates.iter().filter(|other| *other == c).count();
        let Some(config) = candidates
            .iter()
            .max_by(|a, b| {
                (a.generation, copies(a))
                    .cmp(&(b.generation, copies(b)))
                    .then_with(|| serde_json::to_vec(a).ok().cmp(&serde_json::to_vec(b).ok()))
            })
            .cloned()
        else {
            // Labelled, but no configuration anywhere: a claim into a new pool that was
            // interrupted, or every replica lost. Nothing to build; say so and touch nothing.
            let why = format!(
                "labelled for pool {pool_id}, but none of its {} devices here carries its configuration; \
                 wipe the first and last 4 KiB to reuse it",
                ours.len()
            );
            report.damaged.extend(ours.into_iter().map(|f| (f.name, why.clone())));
            return Ok((None, report));
        };

        let mut members = BTreeMap::new();
        let mut rewrite = false;
        for f in ours {
            if !config.devices.iter().any(|d| d.id == f.label.device_id) {
                tracing::warn!(device = %f.name, "labelled for this pool but not in its configuration; left untouched");
                report.foreign.push((f.name, pool_id));
                continue;
            }
            if let Some((copy, why)) = &f.label_repair {
                match write_copy(f.io.as_ref(), &f.label, *copy).await {
                    Ok(()) => report.repaired.push(format!("{}: rewrote {why}", f.name)),
                    Err(e) => {
                        tracing::error!(device = %f.name, error = %e, "cannot repair a label copy");
                        report.repaired.push(format!("{}: {why}; the repair failed: {e}", f.name));
                    }
                }
            }
            for why in &f.bad_slots {
                report.repaired.push(format!("{}: {why}; rewritten from the current configuration", f.name));
            }
            rewrite |=
                !f.bad_slots.is_empty() || f.newest.as_ref().is_none_or(|(g, _)| *g != config.generation);
            report.members.push(f.name.clone());
            let member = Member { name: f.name, io: f.io, label: f.label, slot: f.newest_slot };
            members.insert(member.label.device_id, member);
        }
        report.missing = config.devices.iter().map(|d| d.id).filter(|id| !members.contains_key(id)).collect();
        let slot_size = members.values().map(|m| m.label.slot_size).next().unwrap_or(1 << 20);
        let mut state =
            State { config: config.clone(), members, cursor: config.volumes.len(), slot_size, attempted };
        if rewrite && let Err(e) = state.commit(config.clone()).await {
            // The configuration read is still the newest valid one: carry on with it.
            tracing::error!(error = %e, "cannot rewrite lagging or torn metadata");
            report.repaired.push(format!("rewriting lagging or torn metadata failed: {e}"));
        }

        let mut volumes = Vec::new();
        for record in &config.volumes {
            let lookup = |id: Uuid| state.members.get(&id).map(|m| m.io.clone());
            match Tree::open(record.tree.clone(), record.size_bytes, &lookup).await {
                Ok(tree) => volumes.push((record.clone(), tree)),
                Err(e) => {
                    tracing::error!(volume = %record.name, error = %e, "volume cannot be opened");
                    let mut why = e.to_string();
                    let mut source = std::error::Error::source(&e);
                    while let Some(s) = source {
                        why.push_str(&format!(": {s}"));
                        source = s.source();
                    }
                    report.failed_volumes.push((record.name.clone(), why));
                }
            }
        }
        Ok((Some(Pool::from_state(state, volumes)), report))
    }

    /// Opens the files or block devices at `paths` and rebuilds the pool from them. A path
    /// that cannot be opened is reported as damaged.
    pub async fn open_paths(
        paths: &[PathBuf],
        options: &FileOptions,
    ) -> Result<(Option<Pool>, Discovery), PoolError> {
        let mut candidates: Vec<(String, Arc<dyn BlockIo>)> = Vec::new();
        let mut unopened = Vec::new();
        for path in paths {
            let name = path.display().to_string();
            match FileDevice::open(path, options) {
                Ok(dev) => candidates.push((name, dev)),
                Err(e) => unopened.push((name, format!("cannot be opened: {e}"))),
            }
        }
        let (pool, mut report) = Pool::open(candidates).await?;
        report.damaged.extend(unopened);
        Ok((pool, report))
    }
}

impl Pool {
    /// Takes back a configured member that was missing (moved, renamed, or found under
    /// another path than the scan looked at): `label` is its valid label, read under the
    /// state lock. The member comes back under `name`, its records are brought up to date
    /// by a commit of the configuration (which now names it `name`), and volumes that could
    /// not open, or opened failed, without it are opened again (a caller holding the failed
    /// volume's block device must fetch the new one). Volumes still serving without it (a
    /// degraded mirror) take it back at the next start, where it is resynced.
    pub(crate) async fn readmit(
        &self,
        state: &mut State,
        name: &str,
        io: Arc<dyn BlockIo>,
        label: Label,
        repair: Option<(u32, String)>,
    ) -> Result<DeviceInfo, PoolError> {
        if let Some((copy, why)) = repair {
            write_copy(io.as_ref(), &label, copy)
                .await
                .map_err(|source| PoolError::Io { device: name.to_string(), source })?;
            tracing::warn!(device = %name, %why, "label copy rewritten on re-admission");
        }
        let (_, slot, _) = read_slots(io.as_ref(), &label).await;
        let id = label.device_id;
        let mut config = state.config.clone();
        for record in config.devices.iter_mut().filter(|d| d.id == id) {
            record.name = name.to_string();
        }
        state.members.insert(id, Member { name: name.to_string(), io, label, slot });
        if let Err(e) = state.commit(config).await {
            state.members.remove(&id);
            return Err(e);
        }
        tracing::info!(device = %name, %id, "missing device found again and re-admitted");
        // Volumes that could not open, or opened failed, without it: built again.
        let waiting: Vec<_> = state
            .config
            .volumes
            .iter()
            .filter(|v| match self.volume(&v.name) {
                None => true,
                Some(open) => open.info().state == VolumeState::Failed && v.tree.devices().contains(&id),
            })
            .cloned()
            .collect();
        for record in waiting {
            let lookup = |id: Uuid| state.members.get(&id).map(|m| m.io.clone());
            match Tree::open(record.tree.clone(), record.size_bytes, &lookup).await {
                Ok(tree) if tree.state() != VolumeState::Failed => {
                    tracing::info!(volume = %record.name, "volume opened now that its device is back");
                    self.insert_volume(record, tree);
                }
                Ok(_) => tracing::warn!(volume = %record.name, "volume still lacks devices"),
                Err(e) => tracing::warn!(volume = %record.name, error = %e, "volume still cannot be opened"),
            }
        }
        Ok(crate::pool::device_infos(state)
            .into_iter()
            .find(|d| d.id == id)
            .expect("the device was just added"))
    }
}

/// How deep the scan goes into subfolders of the devices folder.
const SCAN_DEPTH: usize = 8;

/// The devices the scan finds in `dir`: regular files and block devices in it and in its
/// subfolders, and what symbolic links there point to when that is a file or a block
/// device (an administrator's `ln -s /dev/disk/by-id/… devices/`). Links to folders are not
/// followed, so a link to `/dev` does not make every disk a candidate. Each device is
/// given once, by its canonical path (no links, no `..`), in sorted order. Only `dir`
/// itself must be readable: an entry the scan cannot read (a subfolder it may not list,
/// such as a root-owned `lost+found` when `dir` is a mount point, a link loop, a file
/// removed meanwhile) is skipped with a warning, so one of them cannot stop a start.
pub fn scan_dir(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    scan_into(std::fs::read_dir(dir)?, SCAN_DEPTH, &mut out);
    out.sort();
    out.dedup();
    Ok(out)
}

/// Adds the devices among `entries` (and, `depth` folders deep, in their subfolders) to
/// `out`, skipping with a warning each entry that cannot be read.
fn scan_into(entries: std::fs::ReadDir, depth: usize, out: &mut Vec<PathBuf>) {
    use std::os::unix::fs::FileTypeExt;
    let skip = |path: &Path, e: &std::io::Error| {
        tracing::warn!(path = %path.display(), error = %e, "cannot read this entry of the devices folder; skipped");
    };
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list an entry of the devices folder; skipped");
                continue;
            }
        };
        let path = entry.path();
        let kind = match entry.file_type() {
            Ok(kind) => kind,
            Err(e) => {
                skip(&path, &e);
                continue;
            }
        };
        if kind.is_dir() {
            if depth > 0 {
                match std::fs::read_dir(&path) {
                    Ok(entries) => scan_into(entries, depth - 1, out),
                    Err(e) => skip(&path, &e),
                }
            }
            continue;
        }
        let target = if kind.is_symlink() {
            match std::fs::metadata(&path) {
                Ok(meta) => meta.file_type(),
                Err(e) => {
                    tracing::warn!(link = %path.display(), error = %e, "link in the devices folder leads nowhere");
                    continue;
                }
            }
        } else {
            kind
        };
        if target.is_file() || target.is_block_device() {
            match std::fs::canonicalize(&path) {
                Ok(canonical) => out.push(canonical),
                Err(e) => skip(&path, &e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scan_finds_subfolders_and_links_to_devices_but_not_links_to_folders() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("devices");
        let elsewhere = root.path().join("elsewhere");
        std::fs::create_dir_all(dir.join("sub/deeper")).unwrap();
        std::fs::create_dir_all(&elsewhere).unwrap();
        for file in [dir.join("a"), dir.join("sub/c"), dir.join("sub/deeper/d"), elsewhere.join("b")] {
            std::fs::write(file, b"").unwrap();
        }
        std::os::unix::fs::symlink(elsewhere.join("b"), dir.join("link-to-b")).unwrap();
        std::os::unix::fs::symlink(dir.join("a"), dir.join("link-to-a")).unwrap();
        std::os::unix::fs::symlink(root.path().join("nothing"), dir.join("dangling")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.join("link-to-folder")).unwrap();
        let found = scan_dir(&dir).unwrap();
        let canonical = |p: PathBuf| std::fs::canonicalize(p).unwrap();
        let mut expected =
            vec![canonical(dir.join("a")), canonical(dir.join("sub/c")), canonical(dir.join("sub/deeper/d"))];
        expected.push(canonical(elsewhere.join("b")));
        expected.sort();
        assert_eq!(found, expected);
    }

    #[test]
    fn an_entry_the_scan_cannot_read_is_skipped_not_fatal() {
        // Folders the scan cannot list even as root: one whose path is longer than
        // PATH_MAX (the kernel refuses to open it by that path: ENAMETOOLONG), and a
        // loop of links.
        let root = tempfile::tempdir().unwrap();
        let mut dir = root.path().to_path_buf();
        let long = "x".repeat(250);
        while dir.as_os_str().len() < 3850 {
            dir.push(&long);
        }
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a"), b"").unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/b"), b"").unwrap();
        let fd = rustix::fs::open(&dir, rustix::fs::OFlags::DIRECTORY, rustix::fs::Mode::empty()).unwrap();
        // Made relative to its parent: by its whole path the kernel would refuse it.
        rustix::fs::mkdirat(&fd, long.as_str(), rustix::fs::Mode::from_raw_mode(0o700)).unwrap();
        assert!(std::fs::read_dir(dir.join(&long)).is_err(), "the test needs a folder that cannot be listed");
        std::os::unix::fs::symlink("loop-b", dir.join("loop-a")).unwrap();
        std::os::unix::fs::symlink("loop-a", dir.join("loop-b")).unwrap();
        let found = scan_dir(&dir).unwrap();
        let canonical = |p: PathBuf| std::fs::canonicalize(p).unwrap();
        assert_eq!(found, vec![canonical(dir.join("a")), canonical(dir.join("sub/b"))]);
        assert!(
            scan_dir(&root.path().join("missing")).is_err(),
            "the devices folder itself must be readable"
        );
    }
}
