//! Who may read and write the data directory. It holds the API token, CHAP secrets
//! (`controller.json`) and the demo's device files, so it is the controller user's alone:
//! the directory is 0700, files with secrets are 0600 from the moment they exist (written
//! beside their place and renamed, never created 0644 and narrowed later), and `serve`
//! refuses a directory or secret file that another user owns or may write, since whoever
//! can write the token can log in as the administrator (rtslib-fb's CVE-2020-14019 was
//! the same mistake with its saved configuration).
//!
//! ```text
//!  owned by another user          ─▶ refused: "run `chown -R UID DIR`"
//!  writable by group or others    ─▶ refused: "run `chmod 700 DIR`" (600 for files)
//!  readable by group or others    ─▶ narrowed to 0700 / 0600, with a warning
//!  missing                        ─▶ created 0700 (files: 0600)
//! ```

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::controller::TOKEN_FILE;

/// The mode of the data directory and the folders in it: the controller's user only.
pub const DIR_MODE: u32 = 0o700;
/// The mode of files that hold secrets (the token, `controller.json`).
pub const SECRET_MODE: u32 = 0o600;

/// Why the data directory or one of its files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// Another user owns it: that user could replace the token or the exports.
    #[error(
        "{} is owned by user {owner}, not by this controller's user {us}; if it is this controller's, run `chown -R {us} {}`, otherwise choose another data directory",
        path.display(), quote(path)
    )]
    Owner {
        /// The directory or file.
        path: PathBuf,
        /// Its owner's uid.
        owner: u32,
        /// The controller's effective uid.
        us: u32,
    },
    /// Group or others may write it, so they could replace the token or the exports.
    #[error(
        "{} is writable by group or others (mode {mode:04o}); run `chmod {wanted:o} {}`",
        path.display(), quote(path)
    )]
    Writable {
        /// The directory or file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// The mode it should have.
        wanted: u32,
    },
    /// A file system call failed.
    #[error("Cannot {what} {}: {source}", path.display())]
    Io {
        /// What was being done ("create", "read", "change the mode of").
        what: &'static str,
        /// The directory or file.
        path: PathBuf,
        /// The system's error.
        source: std::io::Error,
    },
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DataDirError + 'a {
    move |source| DataDirError::Io { what, path: path.to_path_buf(), source }
}

/// The effective user the controller runs as.
fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Makes `dir` (and missing parents) with mode 0700 if it does not exist, then checks it
/// as [`check`] does. The data directory is made this way, and so is each folder in it.
pub fn create_private_dir(dir: &Path) -> Result<(), DataDirError> {
    if !dir.exists() {
        DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir).map_err(io_error("create", dir))?;
    }
    check(dir, DIR_MODE)
}

/// Refuses `path` if another user owns it or group or others may write it; takes away
/// group and other permissions if they may read it (with a warning: what it held may have
/// been seen). A missing path passes: it will be made private.
pub fn check(path: &Path, wanted: u32) -> Result<(), DataDirError> {
    let Some(mode) = readable_by_others(path, wanted)? else { return Ok(()) };
    let narrowed = mode & !0o077;
    std::fs::set_permissions(path, Permissions::from_mode(narrowed))
        .map_err(io_error("change the mode of", path))?;
    tracing::warn!(
        path = %path.display(),
        was = format!("{mode:04o}"),
        now = format!("{narrowed:04o}"),
        "group or others could read this; narrowed its mode (a secret it held may have been seen)"
    );
    Ok(())
}

/// What [`check`] judges, changing nothing: an error if another user owns `path` or group
/// or others may write it (`wanted` is the mode the message tells to set), else its mode
/// when group or others may read it, else `None` (a missing path too). For what is not
/// ours to narrow: a folder of `device_dirs`, the serve config file.
pub fn readable_by_others(path: &Path, wanted: u32) -> Result<Option<u32>, DataDirError> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("read the owner and mode of", path)(e)),
    };
    let (owner, us, mode) = (meta.uid(), effective_uid(), meta.mode() & 0o7777);
    if owner != us {
        return Err(DataDirError::Owner { path: path.to_path_buf(), owner, us });
    }
    if mode & 0o022 != 0 {
        return Err(DataDirError::Writable { path: path.to_path_buf(), mode, wanted });
    }
    Ok((mode & 0o077 != 0).then_some(mode))
}

/// Writes `bytes` to `path` atomically with mode 0600 from the start: into a new file
/// beside it (created exclusively, so never through a symlink planted there), synced, then
/// renamed over `path`, and the directory synced.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    // A temporary file left by a crash is ours to replace (the directory is private).
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = OpenOptions::new().write(true).create_new(true).mode(SECRET_MODE).open(&tmp)?;
    // The umask can only take bits away; this makes the mode exact.
    file.set_permissions(Permissions::from_mode(SECRET_MODE))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Reads the API token of `data_dir`, or makes one (mode 0600) if there is none. A token
/// file that another user owns or may write is refused: anyone who can write it can
/// choose the administrator's password.
pub fn load_or_create_token(data_dir: &Path) -> Result<String, DataDirError> {
    let path = data_dir.join(TOKEN_FILE);
    check(&path, SECRET_MODE)?;
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("read", &path)(e)),
    }
    let token: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    write_private(&path, format!("{token}\n").as_bytes()).map_err(io_error("write", &path))?;
    Ok(token)
}

/// `path` as a shell word: bare when it is only safe characters, else single-quoted.
fn quote(path: &Path) -> String {
    let text = path.display().to_string();
    let safe = |c: char| c.is_ascii_alphanumeric() || "/._-+,:@%=".contains(c);
    if !text.is_empty() && text.chars().all(safe) {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn directories_are_made_private_and_readable_ones_narrowed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        create_private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        std::fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700, "a readable directory is narrowed");
        std::fs::set_permissions(&dir, Permissions::from_mode(0o777)).unwrap();
        let e = create_private_dir(&dir).unwrap_err().to_string();
        assert!(
            e.contains("writable by group or others") && e.contains(&format!("chmod 700 {}", dir.display())),
            "{e}"
        );
    }

    #[test]
    fn secrets_are_written_0600_and_atomically() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("controller.json");
        std::fs::write(tmp.path().join("controller.json.tmp"), b"left by a crash").unwrap();
        write_private(&path, b"{}").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"{}");
        assert!(!tmp.path().join("controller.json.tmp").exists());

        let token = load_or_create_token(tmp.path()).unwrap();
        assert_eq!(token.len(), 64);
        assert_eq!(mode(&tmp.path().join(TOKEN_FILE)), 0o600);
        assert_eq!(load_or_create_token(tmp.path()).unwrap(), token, "the token is kept");
        std::fs::set_permissions(tmp.path().join(TOKEN_FILE), Permissions::from_mode(0o666)).unwrap();
        let e = load_or_create_token(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn paths_are_quoted_for_the_shell() {
        assert_eq!(quote(Path::new("/var/lib/strata")), "/var/lib/strata");
        assert_eq!(quote(Path::new("/tmp/a b")), "'/tmp/a b'");
        assert_eq!(quote(Path::new("/tmp/it's")), r"'/tmp/it'\''s'");
    }
}
