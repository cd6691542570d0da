//! Whether sparse device files promise more space than their file system has.
//!
//! A device added with `--create` is a sparse file: it takes space only as volumes write
//! to it. Several such files can together be larger than the file system under them, and
//! once it fills, writes fail with no space (ENOSPC over NBD, SPACE ALLOCATION FAILED over
//! iSCSI) although every device still has free extents. That is allowed (thin
//! provisioning), but the operator is told when a device is added:
//!
//! ```text
//!   over-committed  ⇔  Σ apparent size of the pool's device files on that file system
//!                       >  its free space + Σ space those files already take
//! ```

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::size::format_size;

/// How far the device files on one file system over-commit it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverCommit {
    /// The device files on that file system.
    pub files: usize,
    /// What they may grow to: the sum of their apparent sizes.
    pub promised: u64,
    /// What they can have: the file system's free space and what they already take.
    pub available: u64,
}

impl std::fmt::Display for OverCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "The {} device files on this file system may grow to {}, but it has only {} for them: \
             once it fills, writes fail with no space (ENOSPC over NBD, SPACE ALLOCATION FAILED \
             over iSCSI) until space is freed",
            self.files,
            format_size(self.promised),
            format_size(self.available),
        )
    }
}

/// Checks the file system under the device file `added` against every device file of the
/// pool on it (`devices`: their paths, `added` among them or not). `None` when `added` is
/// not a regular file, or the files fit.
pub fn over_commit<'a>(added: &Path, devices: impl IntoIterator<Item = &'a Path>) -> Option<OverCommit> {
    let meta = std::fs::metadata(added).ok().filter(|m| m.file_type().is_file())?;
    let fs = rustix::fs::statvfs(added).ok()?;
    let free = fs.f_bavail.saturating_mul(fs.f_frsize);
    let mut seen = vec![meta.ino()];
    let (mut files, mut promised, mut taken) = (1, meta.size(), meta.blocks() * 512);
    for path in devices {
        let Ok(other) = std::fs::metadata(path) else { continue };
        if other.file_type().is_file() && other.dev() == meta.dev() && !seen.contains(&other.ino()) {
            seen.push(other.ino());
            files += 1;
            promised += other.size();
            taken += other.blocks() * 512;
        }
    }
    let available = free.saturating_add(taken);
    (promised > available).then_some(OverCommit { files, promised, available })
}

/// Logs an over-commit of the file system under `added` (see [`over_commit`]) and returns
/// the warning for the answer to the operator.
pub fn warn_over_commit<'a>(added: &Path, devices: impl IntoIterator<Item = &'a Path>) -> Option<String> {
    let found = over_commit(added, devices)?;
    tracing::warn!(
        device = %added.display(),
        files = found.files,
        promised = found.promised,
        available = found.available,
        "device files over-commit their file system"
    );
    Some(found.to_string())
}

/// The answer to adding a device: the device, and what the operator should know about it.
#[derive(Debug, serde::Serialize)]
pub struct AddedDevice {
    /// The device as listed.
    #[serde(flatten)]
    pub device: strata_pool::DeviceInfo,
    /// Warnings, such as an over-committed file system; absent when there are none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl crate::Controller {
    /// `device` just added, with a warning (also logged) if the pool's device files on its
    /// file system over-commit it.
    pub async fn added(&self, device: strata_pool::DeviceInfo) -> AddedDevice {
        let names: Vec<String> = self.devices().await.into_iter().map(|d| d.name).collect();
        let paths = names.iter().map(Path::new);
        let warnings = warn_over_commit(Path::new(&device.name), paths).into_iter().collect();
        AddedDevice { device, warnings }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_files_larger_than_their_file_system_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let fs = rustix::fs::statvfs(dir.path()).unwrap();
        let free = fs.f_bavail * fs.f_frsize;
        let small = dir.path().join("small");
        std::fs::File::create(&small).unwrap().set_len(1 << 20).unwrap();
        assert_eq!(over_commit(&small, [small.as_path()]), None);
        let huge = dir.path().join("huge");
        std::fs::File::create(&huge).unwrap().set_len(free + (1 << 30)).unwrap();
        let found = over_commit(&huge, [small.as_path(), huge.as_path()]).expect("over-committed");
        assert_eq!((found.files, found.promised), (2, free + (1 << 30) + (1 << 20)));
        assert!(found.to_string().starts_with("The 2 device files on this file system may grow to"));
        assert_eq!(over_commit(Path::new("/dev/null"), []), None, "not a regular file");
    }
}
