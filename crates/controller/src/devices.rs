//! Which paths a device may be added from, and what a device must not hold before Strata
//! claims it.
//!
//! `device add` runs as the controller (root, as a rule) on a path an API token holder
//! names, so a path must not reach what the operator did not mean to give:
//!
//! - **Files only in allowed folders.** A device file is created, or an existing one taken,
//!   only inside the data directory's `devices/` and the folders listed in `device_dirs`
//!   of the serve config, judged on the canonical path (links and `..` resolved).
//!   `--create` never follows a link and never opens an existing file
//!   (`O_CREAT | O_EXCL | O_NOFOLLOW`, mode 0600). An existing device is opened by its
//!   canonical path with no link on the way ([`FileDevice::open_no_follow`]), and what
//!   was opened must be the kind checked, so a file or folder swapped for a link (or a
//!   block device for a file) in between is refused. Block
//!   devices are allowed wherever their node is: they are opened `O_EXCL`, so a mounted or
//!   otherwise held one is refused.
//! - **Allowed folders are the controller user's.** Each folder of `device_dirs` must be
//!   owned by that user and not writable by group or others (the data directory's rule,
//!   [`crate::data_dir`]), or `serve` refuses to start: whoever may write there could swap
//!   a device file for a link to a disk.
//! - **Nothing foreign is overwritten.** A device with a known signature (filesystem,
//!   partition table, LVM, md, ZFS, LUKS, bcache, swap: [`strata_block::signature`]) or
//!   with any data where a claim writes (its first extent and last 4 KiB) is refused,
//!   naming what it holds, unless the request says `force`.
//!
//! What the scan finds ([`DevicePaths::scan`]) needs no record; any other device's path is
//! kept in `controller.json` so every added device comes back after a restart.

use std::ffi::OsStr;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use strata_block::signature::{self, Signature};
use strata_block::{BlockIo, FileDevice, FileOptions, IoError};

use crate::failure::{Failure, FailureKind};

/// Why a path cannot be added as a device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// Relative paths depend on the caller's working folder.
    #[error("Device path '{0}' must be absolute")]
    NotAbsolute(PathBuf),
    /// `--create` on a path that exists.
    #[error("{0} already exists; add it without --create, or choose another path")]
    Exists(PathBuf),
    /// `--create` on a symbolic link (dangling or not).
    #[error("{0} is a symbolic link; --create makes a new file and never follows links: choose another path")]
    Link(PathBuf),
    /// `--create` needs a folder to create in.
    #[error("Cannot create {path}: {why}")]
    NoFolder {
        /// The path asked for.
        path: PathBuf,
        /// What is wrong with its folder.
        why: String,
    },
    /// A file outside the folders allowed for device files.
    #[error(
        "{path} is not in a folder allowed for device files ({allowed}); add its folder to `device_dirs` in the serve config, or use a path in one of these"
    )]
    NotAllowed {
        /// The path asked for, resolved.
        path: PathBuf,
        /// The allowed folders.
        allowed: String,
    },
    /// A folder, character device, FIFO or socket.
    #[error("{0} is neither a regular file nor a block device")]
    NotADevice(PathBuf),
    /// It changed between the check of its path and its opening (a file became a link or
    /// a block device, or the other way round).
    #[error("{0} changed while it was being opened (it was replaced, perhaps by a link); it was not added")]
    Changed(PathBuf),
    /// The OS refused to open or create it (in use, missing, no permission).
    #[error("cannot open {path}: {source}")]
    Open {
        /// The path asked for.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// It holds a filesystem, partition table or another stack's member.
    #[error(
        "{path} holds {signature}; it was left untouched. Add it with --force to overwrite it (`wipefs -n {path}` lists what it holds)"
    )]
    Signature {
        /// The device.
        path: PathBuf,
        /// The first signature found.
        signature: Signature,
    },
    /// It holds data where a claim writes, with no signature Strata knows.
    #[error(
        "{path} holds data where Strata writes its labels and metadata (a byte that is not zero at offset {offset}), and no signature Strata knows; it was left untouched. Add it with --force if that data may be overwritten"
    )]
    Data {
        /// The device.
        path: PathBuf,
        /// Where the first byte that is not zero is.
        offset: u64,
    },
    /// Reading it to look for signatures failed.
    #[error("Cannot read {path} to see what it holds")]
    Probe {
        /// The device.
        path: PathBuf,
        /// Why.
        #[source]
        source: IoError,
    },
}

impl From<DeviceError> for Failure {
    fn from(e: DeviceError) -> Self {
        let kind = match &e {
            DeviceError::NotAbsolute(_)
            | DeviceError::NoFolder { .. }
            | DeviceError::NotAllowed { .. }
            | DeviceError::NotADevice(_)
            | DeviceError::Open { .. } => FailureKind::BadRequest,
            DeviceError::Exists(_) | DeviceError::Link(_) | DeviceError::Changed(_) => FailureKind::Conflict,
            DeviceError::Signature { .. } | DeviceError::Data { .. } => FailureKind::Conflict,
            DeviceError::Probe { .. } => FailureKind::Internal,
        };
        let mut message = e.to_string();
        if let DeviceError::Probe { source, .. } = &e {
            message.push_str(&format!(": {source}"));
        }
        Failure::new(kind, message)
    }
}

/// The folders device files may be in, and the one the scan reads.
#[derive(Clone, Debug)]
pub struct DevicePaths {
    /// The data directory's `devices/`, canonical.
    devices_dir: PathBuf,
    /// Canonical folders where device files may be created or taken, `devices_dir` first.
    allowed: Vec<PathBuf>,
}

impl DevicePaths {
    /// The devices folder `devices_dir` (which must exist) and the operator's `extra`
    /// folders (from `device_dirs`); each must exist, be owned by the controller's user and
    /// not be writable by group or others (the message says the `chown` or `chmod` to run).
    pub fn new(devices_dir: &Path, extra: &[PathBuf]) -> Result<Self, String> {
        let canonical = |dir: &Path| {
            std::fs::canonicalize(dir)
                .map_err(|e| format!("device folder {} cannot be used: {e}", dir.display()))
        };
        let devices_dir = canonical(devices_dir)?;
        let mut allowed = vec![devices_dir.clone()];
        for dir in extra {
            let dir = canonical(dir)?;
            crate::data_dir::readable_by_others(&dir, crate::data_dir::DIR_MODE)
                .map_err(|e| format!("device folder {} (device_dirs) cannot be used: {e}", dir.display()))?;
            if !allowed.contains(&dir) {
                allowed.push(dir);
            }
        }
        Ok(Self { devices_dir, allowed })
    }

    /// The devices the scan at start-up finds without a record, canonical.
    pub fn scan(&self) -> io::Result<Vec<PathBuf>> {
        strata_pool::scan_dir(&self.devices_dir)
    }

    /// Whether the scan finds the device whose canonical path is `canonical` (false when
    /// the devices folder cannot be listed: the path is then recorded, to be safe).
    pub fn found_by_scan(&self, canonical: &Path) -> bool {
        self.scan().is_ok_and(|found| found.iter().any(|p| p == canonical))
    }

    fn check_allowed(&self, canonical: &Path) -> Result<(), DeviceError> {
        if self.allowed.iter().any(|dir| canonical.starts_with(dir)) {
            return Ok(());
        }
        let allowed = self.allowed.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
        Err(DeviceError::NotAllowed { path: canonical.to_path_buf(), allowed })
    }

    /// Creates a new sparse device file of `size` bytes at `path` (mode 0600), in an
    /// allowed folder, never through a link.
    pub fn create(
        &self,
        path: &Path,
        size: u64,
        options: &FileOptions,
    ) -> Result<Arc<FileDevice>, DeviceError> {
        if !path.is_absolute() {
            return Err(DeviceError::NotAbsolute(path.to_path_buf()));
        }
        let no_folder = |why: String| DeviceError::NoFolder { path: path.to_path_buf(), why };
        let (Some(parent), Some(name)) = (path.parent(), path.file_name().filter(|n| *n != OsStr::new("..")))
        else {
            return Err(no_folder("it names no file".into()));
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_symlink() => return Err(DeviceError::Link(path.to_path_buf())),
            Ok(_) => return Err(DeviceError::Exists(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(DeviceError::Open { path: path.to_path_buf(), source: e }),
        }
        let folder = std::fs::canonicalize(parent)
            .map_err(|e| no_folder(format!("its folder {} cannot be used: {e}", parent.display())))?;
        self.check_allowed(&folder.join(name))?;
        FileDevice::create_new(&folder, name, size, options).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => DeviceError::Exists(path.to_path_buf()),
            // O_NOFOLLOW met a link that appeared after the check above.
            _ if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
                DeviceError::Link(path.to_path_buf())
            }
            _ => DeviceError::Open { path: path.to_path_buf(), source: e },
        })
    }

    /// Opens an existing file (in an allowed folder) or block device (anywhere, `O_EXCL`)
    /// at `path`, through links; the device is named by its canonical path, which is
    /// opened `O_NOFOLLOW` and must still be the kind of device checked.
    pub fn open(&self, path: &Path, options: &FileOptions) -> Result<Arc<FileDevice>, DeviceError> {
        if !path.is_absolute() {
            return Err(DeviceError::NotAbsolute(path.to_path_buf()));
        }
        let open_error = |source| DeviceError::Open { path: path.to_path_buf(), source };
        let canonical = std::fs::canonicalize(path).map_err(open_error)?;
        let kind = std::fs::metadata(&canonical).map_err(open_error)?.file_type();
        if kind.is_file() {
            self.check_allowed(&canonical)?;
        } else if !kind.is_block_device() {
            return Err(DeviceError::NotADevice(path.to_path_buf()));
        }
        let device = FileDevice::open_no_follow(&canonical, options).map_err(|e| {
            if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
                DeviceError::Changed(path.to_path_buf())
            } else {
                open_error(e)
            }
        })?;
        if device.is_block_device() != kind.is_block_device() {
            return Err(DeviceError::Changed(path.to_path_buf()));
        }
        Ok(device)
    }
}

/// Refuses a device that holds a known signature, or data in `claimed` (the ranges a
/// claim writes); reads, never writes.
pub async fn check_foreign(path: &Path, io: &dyn BlockIo, claimed: &[Range<u64>]) -> Result<(), DeviceError> {
    let probe_error = |source| DeviceError::Probe { path: path.to_path_buf(), source };
    if let Some(signature) = signature::probe(io).await.map_err(probe_error)?.into_iter().next() {
        return Err(DeviceError::Signature { path: path.to_path_buf(), signature });
    }
    if let Some(offset) = signature::first_data(io, claimed).await.map_err(probe_error)? {
        return Err(DeviceError::Data { path: path.to_path_buf(), offset });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_device_folder_others_may_write_or_own_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let devices = tmp.path().join("devices");
        let extra = tmp.path().join("disks");
        std::fs::create_dir_all(&devices).unwrap();
        std::fs::create_dir_all(&extra).unwrap();
        std::fs::set_permissions(&extra, std::fs::Permissions::from_mode(0o755)).unwrap();
        DevicePaths::new(&devices, std::slice::from_ref(&extra)).unwrap();
        std::fs::set_permissions(&extra, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = DevicePaths::new(&devices, std::slice::from_ref(&extra)).unwrap_err();
        assert!(e.contains("writable by group or others") && e.contains("run `chmod 700"), "{e}");
        std::fs::set_permissions(&extra, std::fs::Permissions::from_mode(0o755)).unwrap();
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&extra, Some(65534), None).unwrap();
            let e = DevicePaths::new(&devices, std::slice::from_ref(&extra)).unwrap_err();
            assert!(e.contains("owned by user 65534") && e.contains("run `chown -R 0"), "{e}");
        }
    }

    #[test]
    fn open_takes_files_in_allowed_folders_by_their_canonical_path() {
        let tmp = tempfile::tempdir().unwrap();
        let devices = tmp.path().join("devices");
        std::fs::create_dir_all(&devices).unwrap();
        std::fs::write(devices.join("a"), [0u8; 8192]).unwrap();
        std::os::unix::fs::symlink(devices.join("a"), devices.join("link")).unwrap();
        std::fs::write(tmp.path().join("outside"), [0u8; 8192]).unwrap();
        let paths = DevicePaths::new(&devices, &[]).unwrap();
        let options = FileOptions::default();
        let device = paths.open(&devices.join("link"), &options).unwrap();
        assert_eq!(device.path(), std::fs::canonicalize(devices.join("a")).unwrap());
        let e = paths.open(&tmp.path().join("outside"), &options).err().unwrap();
        assert!(matches!(e, DeviceError::NotAllowed { .. }), "{e}");
        let e = paths.open(Path::new("/dev/null"), &options).err().unwrap();
        assert!(matches!(e, DeviceError::NotADevice(_)), "{e}");
    }
}
