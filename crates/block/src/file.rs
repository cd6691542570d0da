//! Plain files and Linux block devices, through positional IO on tokio's blocking pool.
//!
//! Requests that cannot wait for a device run on the calling thread, with no hand-off to
//! another thread (which costs tens of microseconds on a small VM): every request on a
//! memory-backed file system (tmpfs, ramfs), and elsewhere reads, or cached writes, that
//! `RWF_NOWAIT` lets through because the data is in the page cache. Anything that may
//! block runs `pread`/`pwritev2` on tokio's blocking pool; a per-device semaphore bounds how
//! many are in flight there so one busy device cannot take the whole pool. FUA is
//! `RWF_DSYNC` (with an `fdatasync` fallback where the kernel refuses the flag), flush is
//! `fdatasync`, discard punches a hole and write-zeroes uses `FALLOC_FL_ZERO_RANGE`, falling
//! back to a hole and then to written zeroes where the file system lacks them (both modes
//! also work on block devices, where the kernel turns them into discard and write-zeroes
//! commands). With `direct` the file is opened `O_DIRECT` and buffers are
//! bounced through block-aligned memory.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use rustix::fs::{FallocateFlags, fallocate, fdatasync};
use rustix::io::{Errno, ReadWriteFlags, preadv2, pwritev2};
use tokio::sync::Semaphore;

use crate::{BlockIo, Durability, Geometry, IoError, IoOp, Span};

/// Bytes of zeroes written at a time where the file system cannot zero a range itself.
const ZERO_CHUNK: usize = 1 << 20;

/// How to open a file device.
#[derive(Clone, Debug)]
pub struct FileOptions {
    /// Open with `O_DIRECT`, bypassing the page cache.
    pub direct: bool,
    /// Block size for plain files (block devices report their own).
    pub file_block_size: u32,
    /// Most requests in flight on the blocking pool at once.
    pub max_in_flight: usize,
    /// Run requests that cannot block on the calling thread (see the module docs); when
    /// false every request goes to the blocking pool.
    pub inline: bool,
}

impl Default for FileOptions {
    fn default() -> Self {
        Self { direct: false, file_block_size: 4096, max_in_flight: 64, inline: true }
    }
}

/// A device backed by a file or a block device node.
pub struct FileDevice {
    path: PathBuf,
    file: Arc<File>,
    geometry: Geometry,
    /// Bytes in the file or device, before rounding down to whole blocks.
    len_bytes: u64,
    direct: bool,
    slots: Semaphore,
    /// On tmpfs or ramfs: no request ever waits for a device.
    memory_backed: bool,
    /// A block device: holes are not tracked, everything is data.
    block_device: bool,
    /// Cleared when the file system refuses `RWF_NOWAIT` reads or writes.
    nowait_reads: AtomicBool,
    nowait_writes: AtomicBool,
}

/// Largest read run on the calling thread even when it cannot block: a bigger copy goes to
/// the blocking pool, so the caller (an NBD connection, say) goes on sending earlier replies
/// meanwhile and the copy can use another core. Writes stay inline at any size: their data
/// was just received on the calling thread, and copying it costs less than a hand-off.
const INLINE_LIMIT: u64 = 128 << 10;

/// `statfs` magic numbers of file systems that keep their data in memory.
const TMPFS_MAGIC: u64 = 0x0102_1994;
const RAMFS_MAGIC: u64 = 0x8584_58f6;

impl FileDevice {
    /// Opens an existing file or block device for reading and writing, through links. A
    /// block device is opened `O_EXCL`, so one that is mounted or held by another program
    /// (or by another `FileDevice`) is refused with [`io::ErrorKind::ResourceBusy`] and a
    /// message saying it is in use, and none can mount it while Strata holds it. Anything
    /// else (a folder, FIFO, character device or socket) is refused, judged on what was
    /// opened, not on a look taken before.
    pub fn open(path: impl AsRef<Path>, options: &FileOptions) -> io::Result<Arc<Self>> {
        Self::open_with(path.as_ref(), options, rustix::fs::OFlags::empty())
    }

    /// Opens an existing file or block device as [`FileDevice::open`] does, but refuses a
    /// path with a symbolic link in it (the error is `ELOOP`): the last component is opened
    /// `O_NOFOLLOW`, and the file opened must be the one the kernel names by `path`
    /// (`/proc/self/fd`, where it is mounted), so a folder on the way swapped for a link
    /// is caught too. For a path already made canonical and checked, so a link swapped in
    /// between cannot make it open something else.
    pub fn open_no_follow(path: impl AsRef<Path>, options: &FileOptions) -> io::Result<Arc<Self>> {
        let path = path.as_ref();
        let device = Self::open_with(path, options, rustix::fs::OFlags::NOFOLLOW)?;
        let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&*device.file));
        match std::fs::read_link(proc_path) {
            Ok(opened) if opened != path => Err(io::Error::from_raw_os_error(Errno::LOOP.raw_os_error())),
            // Without /proc, the last component's check is all there is.
            _ => Ok(device),
        }
    }

    fn open_with(path: &Path, options: &FileOptions, extra: rustix::fs::OFlags) -> io::Result<Arc<Self>> {
        use rustix::fs::OFlags;
        let mut flags = extra | OFlags::CLOEXEC;
        if options.direct {
            flags |= OFlags::DIRECT;
        }
        // Without O_CREAT, Linux ignores O_EXCL for regular files and opens a block device
        // exclusively: always passing it leaves no gap between a look at the path and the
        // open in which a file could become a block device.
        if cfg!(target_os = "linux") {
            flags |= OFlags::EXCL;
        }
        let file = OpenOptions::new().read(true).write(true).custom_flags(flags.bits() as i32).open(path);
        let file = file.map_err(|e| match e.raw_os_error() {
            Some(code) if code == Errno::BUSY.raw_os_error() => io::Error::new(
                io::ErrorKind::ResourceBusy,
                "it is in use: mounted, part of another storage stack, or held open exclusively by another program",
            ),
            _ => e,
        })?;
        Self::from_file(path.to_path_buf(), file, options)
    }

    /// Creates a new sparse file of `size_bytes` named `name` in the directory `dir`, with
    /// mode 0600, and opens it. Never follows a symbolic link and never opens an existing
    /// file (`O_CREAT | O_EXCL | O_NOFOLLOW`), so a link planted at `name` cannot make it
    /// write elsewhere; `name` must be one path component.
    pub fn create_new(
        dir: impl AsRef<Path>,
        name: &std::ffi::OsStr,
        size_bytes: u64,
        options: &FileOptions,
    ) -> io::Result<Arc<Self>> {
        use rustix::fs::{Mode, OFlags};
        let dir = dir.as_ref();
        if name.is_empty() || name == "." || name == ".." || name.as_encoded_bytes().contains(&b'/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a device file name is one path component",
            ));
        }
        let dir_fd =
            rustix::fs::open(dir, OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
        let mut flags = OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::RDWR | OFlags::CLOEXEC;
        if options.direct {
            flags |= OFlags::DIRECT;
        }
        let fd = rustix::fs::openat(&dir_fd, name, flags, Mode::from_raw_mode(0o600))?;
        let file = File::from(fd);
        let created = file.set_len(size_bytes).and_then(|()| Self::from_file(dir.join(name), file, options));
        if created.is_err() {
            let _ = rustix::fs::unlinkat(&dir_fd, name, rustix::fs::AtFlags::empty());
        }
        created
    }

    /// Creates a new sparse file of `size_bytes` at `path` and opens it: the same as
    /// [`FileDevice::create_new`] with the path's folder and last component (mode 0600,
    /// never through a link, never an existing file, which is refused with
    /// [`io::ErrorKind::AlreadyExists`] and left as it was).
    pub fn create(path: impl AsRef<Path>, size_bytes: u64, options: &FileOptions) -> io::Result<Arc<Self>> {
        let path = path.as_ref();
        let name = path.file_name().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{} names no file", path.display()))
        })?;
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        Self::create_new(dir, name, size_bytes, options)
    }

    /// A device over an open file or block device.
    fn from_file(path: PathBuf, file: File, options: &FileOptions) -> io::Result<Arc<Self>> {
        let meta = file.metadata()?;
        if !meta.file_type().is_file() && !meta.file_type().is_block_device() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is neither a regular file nor a block device", path.display()),
            ));
        }
        let (block_size, size) = if meta.file_type().is_block_device() {
            let bs = rustix::fs::ioctl_blksszget(&file)?;
            let size = io::Seek::seek(&mut &file, io::SeekFrom::End(0))?;
            (bs, size)
        } else {
            (options.file_block_size, meta.len())
        };
        if !block_size.is_power_of_two() || block_size < 512 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} reports block size {block_size}, not a power of two ≥ 512", path.display()),
            ));
        }
        let size_bytes = size - size % u64::from(block_size);
        let memory_backed = !meta.file_type().is_block_device()
            && rustix::fs::fstatfs(&file)
                .is_ok_and(|fs| matches!(fs.f_type as u64, TMPFS_MAGIC | RAMFS_MAGIC));
        Ok(Arc::new(Self {
            path,
            file: Arc::new(file),
            geometry: Geometry { block_size, size_bytes },
            len_bytes: size,
            direct: options.direct,
            slots: Semaphore::new(options.max_in_flight.max(1)),
            memory_backed: options.inline && memory_backed,
            block_device: meta.file_type().is_block_device(),
            nowait_reads: AtomicBool::new(options.inline && !options.direct),
            nowait_writes: AtomicBool::new(options.inline && !options.direct),
        }))
    }

    /// The size of the file or device as found, before it is cut to whole blocks: what to
    /// tell an operator whose file is too small (a 1 KiB file has no 4 KiB block at all).
    pub fn len_bytes(&self) -> u64 {
        self.len_bytes
    }

    /// True for a block device node, false for a regular file.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// True when every request runs on the calling thread because the file lives in memory
    /// (tmpfs, ramfs); worth showing to an operator who benchmarks on tmpfs.
    pub fn is_memory_backed(&self) -> bool {
        self.memory_backed
    }

    /// The path the device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The error for what the OS said: a full file system or quota (`ENOSPC`, `EDQUOT`) is
    /// [`IoError::NoSpace`], anything else a device error.
    fn os_error(&self, op: IoOp, offset: u64, len: u64, source: io::Error) -> IoError {
        let device = self.path.display().to_string();
        match source.raw_os_error().map(Errno::from_raw_os_error) {
            Some(Errno::NOSPC | Errno::DQUOT) => IoError::NoSpace { op, device, offset, len },
            _ => IoError::Os { op, device, offset, len, source },
        }
    }

    /// Runs `f` on the blocking pool under the in-flight bound, or right here when the file
    /// is memory-backed.
    async fn run<T: Send + 'static>(
        &self,
        op: IoOp,
        offset: u64,
        len: u64,
        f: impl FnOnce(&File) -> io::Result<T> + Send + 'static,
    ) -> Result<T, IoError> {
        if self.memory_backed && (op != IoOp::Read || len <= INLINE_LIMIT) {
            return f(&self.file).map_err(|e| self.os_error(op, offset, len, e));
        }
        let _slot = self.slots.acquire().await.expect("semaphore is never closed");
        let file = Arc::clone(&self.file);
        match tokio::task::spawn_blocking(move || f(&file)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.os_error(op, offset, len, e)),
            Err(join) => Err(self.os_error(op, offset, len, io::Error::other(join.to_string()))),
        }
    }

    /// Reads all of `buf` on this thread if that needs no waiting. `Some(Ok)` when done,
    /// `None` when the blocking pool must do it (nothing cached, short read, unsupported).
    fn read_nowait(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        if !self.nowait_reads.load(Ordering::Relaxed) || buf.len() as u64 > INLINE_LIMIT {
            return None;
        }
        match preadv2(&*self.file, &mut [io::IoSliceMut::new(buf)], offset, ReadWriteFlags::NOWAIT) {
            Ok(n) if n == buf.len() => Some(Ok(())),
            Ok(_) | Err(Errno::AGAIN | Errno::INTR) => None,
            Err(Errno::OPNOTSUPP | Errno::INVAL) => {
                self.nowait_reads.store(false, Ordering::Relaxed);
                None
            }
            Err(e) => Some(Err(e.into())),
        }
    }

    /// Writes as much of `data` as can be taken on this thread without waiting; returns how
    /// many bytes were written (the rest goes to the blocking pool).
    fn write_nowait(&self, data: &[u8], offset: u64) -> io::Result<usize> {
        if !self.nowait_writes.load(Ordering::Relaxed) {
            return Ok(0);
        }
        match pwritev2(&*self.file, &[io::IoSlice::new(data)], offset, ReadWriteFlags::NOWAIT) {
            Ok(n) => Ok(n),
            Err(Errno::AGAIN | Errno::INTR) => Ok(0),
            Err(Errno::OPNOTSUPP | Errno::INVAL) => {
                self.nowait_writes.store(false, Ordering::Relaxed);
                Ok(0)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Memory alignment of buffers for this device: the block size.
    fn alignment(&self) -> usize {
        usize::try_from(self.geometry.block_size).expect("fits usize")
    }

    /// A zeroed buffer of `len` bytes whose start is aligned to the block size (for `O_DIRECT`).
    fn aligned_buffer(&self, len: usize) -> BytesMut {
        aligned_zeroes(len, self.alignment())
    }
}

/// A zeroed buffer of `len` bytes starting at a multiple of `align`.
fn aligned_zeroes(len: usize, align: usize) -> BytesMut {
    let mut buf = BytesMut::zeroed(len + align);
    let skip = buf.as_ptr().align_offset(align);
    let mut aligned = buf.split_off(skip);
    aligned.truncate(len);
    aligned
}

fn write_all_at(file: &File, mut data: &[u8], mut offset: u64, durability: Durability) -> io::Result<()> {
    while !data.is_empty() {
        let n = if durability.is_fua() {
            match pwritev2(file, &[io::IoSlice::new(data)], offset, ReadWriteFlags::DSYNC) {
                Ok(n) => n,
                Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::INVAL) => {
                    file.write_all_at(data, offset)?;
                    fdatasync(file)?;
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            file.write_at(data, offset)?
        };
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "device accepted no bytes"));
        }
        data = &data[n..];
        offset += n as u64;
    }
    Ok(())
}

/// Zeroes a range with the first of `modes` the file system supports, or by writing zeroes
/// (from a buffer aligned to `align`, for `O_DIRECT`) when it supports none (tmpfs, for one,
/// cannot `ZERO_RANGE` but can punch holes).
fn zero_range(file: &File, modes: &[FallocateFlags], offset: u64, len: u64, align: usize) -> io::Result<()> {
    for &mode in modes {
        match fallocate(file, mode | FallocateFlags::KEEP_SIZE, offset, len) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let zeroes = aligned_zeroes(ZERO_CHUNK, align);
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zeroes.len() as u64);
        file.write_all_at(&zeroes[..usize::try_from(n).expect("≤ buffer length")], at)?;
        at += n;
    }
    Ok(())
}

#[async_trait]
impl BlockIo for FileDevice {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, IoError> {
        self.geometry.check(IoOp::Read, offset, len)?;
        let n = usize::try_from(len).expect("request fits in memory");
        let buf = if self.direct { self.aligned_buffer(n) } else { BytesMut::zeroed(n) };
        Ok(self.read_into(offset, buf).await?.freeze())
    }

    async fn read_into(&self, offset: u64, buf: BytesMut) -> Result<BytesMut, IoError> {
        let len = buf.len() as u64;
        self.geometry.check(IoOp::Read, offset, len)?;
        if self.direct && buf.as_ptr().align_offset(self.alignment()) != 0 {
            // O_DIRECT needs an aligned buffer: read into one and copy.
            let mut out = buf;
            let bounce = self.read_into(offset, self.aligned_buffer(out.len())).await?;
            out.copy_from_slice(&bounce);
            return Ok(out);
        }
        let mut buf = buf;
        match self.read_nowait(&mut buf, offset) {
            Some(Ok(())) => return Ok(buf),
            Some(Err(e)) => return Err(self.os_error(IoOp::Read, offset, len, e)),
            None => {}
        }
        self.run(IoOp::Read, offset, len, move |file| {
            file.read_exact_at(&mut buf, offset)?;
            Ok(buf)
        })
        .await
    }

    async fn write(&self, offset: u64, data: Bytes, durability: Durability) -> Result<(), IoError> {
        let len = data.len() as u64;
        self.geometry.check(IoOp::Write, offset, len)?;
        let data = if self.direct && data.as_ptr().align_offset(self.alignment()) != 0 {
            let mut bounce = self.aligned_buffer(data.len());
            bounce.copy_from_slice(&data);
            bounce.freeze()
        } else {
            data
        };
        let done = if durability.is_fua() {
            0
        } else {
            self.write_nowait(&data, offset).map_err(|e| self.os_error(IoOp::Write, offset, len, e))?
        };
        if done == data.len() {
            return Ok(());
        }
        let (rest, at) = (data.slice(done..), offset + done as u64);
        self.run(IoOp::Write, offset, len, move |file| write_all_at(file, &rest, at, durability)).await
    }

    async fn flush(&self) -> Result<(), IoError> {
        self.run(IoOp::Flush, 0, 0, |file| Ok(fdatasync(file)?)).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.geometry.check(IoOp::Discard, offset, len)?;
        let align = self.alignment();
        self.run(IoOp::Discard, offset, len, move |file| {
            zero_range(file, &[FallocateFlags::PUNCH_HOLE], offset, len, align)
        })
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.geometry.check(IoOp::WriteZeroes, offset, len)?;
        let align = self.alignment();
        self.run(IoOp::WriteZeroes, offset, len, move |file| {
            zero_range(file, &[FallocateFlags::ZERO_RANGE, FallocateFlags::PUNCH_HOLE], offset, len, align)
        })
        .await
    }

    async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Span>, IoError> {
        self.geometry.check(IoOp::Read, offset, len)?;
        if self.block_device {
            return Ok(vec![Span { len, hole: false }]);
        }
        // SEEK_DATA / SEEK_HOLE touch only file-system metadata: cheap enough to run here.
        file_allocation(&self.file, offset, len, u64::from(self.geometry.block_size))
            .map_err(|e| self.os_error(IoOp::Read, offset, len, e))
    }
}

/// Most spans one allocation query returns; the caller asks again for the rest.
const MAX_SPANS: usize = 256;

/// The holes and data of `[offset, offset + len)` of a regular file, with boundaries
/// rounded to `block` (a boundary inside a block counts that block as data).
fn file_allocation(file: &File, offset: u64, len: u64, block: u64) -> io::Result<Vec<Span>> {
    use rustix::fs::{SeekFrom, seek};
    let end = offset + len;
    let mut spans: Vec<Span> = Vec::new();
    let mut at = offset;
    while at < end && spans.len() < MAX_SPANS {
        let data = match seek(file, SeekFrom::Data(at)) {
            Ok(p) => (p / block * block).clamp(at, end),
            Err(Errno::NXIO) => end,
            Err(e) => return Err(e.into()),
        };
        if data > at {
            spans.push(Span { len: data - at, hole: true });
            at = data;
            continue;
        }
        let hole = match seek(file, SeekFrom::Hole(at)) {
            Ok(p) => p.div_ceil(block) * block,
            Err(Errno::NXIO) => end,
            Err(e) => return Err(e.into()),
        };
        let hole = hole.clamp(at + block, end);
        spans.push(Span { len: hole - at, hole: false });
        at = hole;
    }
    Ok(spans)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_new_makes_a_private_file_and_never_follows_a_link() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let options = FileOptions::default();
        let dev = FileDevice::create_new(dir.path(), "d".as_ref(), 1 << 20, &options).unwrap();
        assert_eq!(dev.geometry().size_bytes, 1 << 20);
        let mode = std::fs::metadata(dir.path().join("d")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let e = FileDevice::create_new(dir.path(), "d".as_ref(), 1 << 20, &options).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        // A dangling link: nothing is made where it points.
        let target = dir.path().join("target");
        std::os::unix::fs::symlink(&target, dir.path().join("link")).unwrap();
        assert!(FileDevice::create_new(dir.path(), "link".as_ref(), 1 << 20, &options).is_err());
        assert!(!target.exists());
        for bad in ["..", ".", "a/b", ""] {
            assert!(FileDevice::create_new(dir.path(), bad.as_ref(), 4096, &options).is_err(), "{bad}");
        }
    }

    #[test]
    fn create_makes_a_new_private_file_and_leaves_existing_ones_and_links_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let options = FileOptions::default();
        let path = dir.path().join("d");
        FileDevice::create(&path, 1 << 20, &options).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // An existing file is neither opened nor extended.
        let existing = dir.path().join("existing");
        std::fs::write(&existing, b"someone's data").unwrap();
        let e = FileDevice::create(&existing, 1 << 20, &options).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&existing).unwrap(), b"someone's data");
        // A link, dangling or not, is not followed.
        let target = dir.path().join("target");
        std::os::unix::fs::symlink(&target, dir.path().join("dangling")).unwrap();
        assert!(FileDevice::create(dir.path().join("dangling"), 1 << 20, &options).is_err());
        assert!(!target.exists());
        std::os::unix::fs::symlink(&existing, dir.path().join("link")).unwrap();
        assert!(FileDevice::create(dir.path().join("link"), 1 << 20, &options).is_err());
        assert_eq!(std::fs::metadata(&existing).unwrap().len(), 14);
    }

    #[test]
    fn open_refuses_what_is_neither_a_file_nor_a_block_device() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        for path in [fifo.as_path(), Path::new("/dev/null")] {
            let e = FileDevice::open(path, &FileOptions::default()).err().unwrap();
            assert!(e.to_string().contains("neither a regular file nor a block device"), "{e}");
        }
    }

    #[test]
    fn open_no_follow_refuses_a_link_that_open_follows() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("d");
        std::fs::write(&file, [0u8; 8192]).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let options = FileOptions::default();
        assert!(FileDevice::open(&link, &options).is_ok());
        let e = FileDevice::open_no_follow(&link, &options).err().unwrap();
        assert_eq!(e.raw_os_error(), Some(Errno::LOOP.raw_os_error()), "{e}");
        assert!(FileDevice::open_no_follow(&file, &options).is_ok());
        // A link to a folder on the way is refused too.
        let folder_link = dir.path().join("folder-link");
        std::os::unix::fs::symlink(dir.path(), &folder_link).unwrap();
        assert!(FileDevice::open(folder_link.join("d"), &options).is_ok());
        let e = FileDevice::open_no_follow(folder_link.join("d"), &options).err().unwrap();
        assert_eq!(e.raw_os_error(), Some(Errno::LOOP.raw_os_error()), "{e}");
    }

    #[test]
    fn len_bytes_is_the_size_before_rounding_to_blocks() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("small"), [7u8; 1024]).unwrap();
        let dev = FileDevice::open(dir.path().join("small"), &FileOptions::default()).unwrap();
        assert_eq!((dev.geometry().size_bytes, dev.len_bytes()), (0, 1024));
    }

    #[tokio::test]
    async fn file_round_trip_fua_discard_and_zeroes() {
        // On disk (through the blocking pool and RWF_NOWAIT) and on tmpfs (inline).
        for (dir, in_memory) in
            [(tempfile::tempdir().unwrap(), false), (tempfile::tempdir_in("/dev/shm").unwrap(), true)]
        {
            let dev = FileDevice::create(dir.path().join("d"), 1 << 20, &FileOptions::default()).unwrap();
            assert_eq!(dev.is_memory_backed(), in_memory);
            round_trip(&dev).await;
        }
    }

    #[tokio::test]
    async fn allocation_reports_holes_after_discard() {
        for dir in [tempfile::tempdir().unwrap(), tempfile::tempdir_in("/dev/shm").unwrap()] {
            let dev = FileDevice::create(dir.path().join("d"), 4 << 20, &FileOptions::default()).unwrap();
            let mib = 1 << 20;
            dev.write(mib, Bytes::from(vec![7u8; 2 << 20]), Durability::Cached).await.unwrap();
            let spans = dev.allocation(0, 4 * mib).await.unwrap();
            assert_eq!(
                spans,
                vec![
                    Span { len: mib, hole: true },
                    Span { len: 2 * mib, hole: false },
                    Span { len: mib, hole: true }
                ]
            );
            dev.discard(mib, mib).await.unwrap();
            let spans = dev.allocation(mib, 2 * mib).await.unwrap();
            assert_eq!(spans, vec![Span { len: mib, hole: true }, Span { len: mib, hole: false }]);
            assert!(dev.allocation(3 * mib, 2 * mib).await.is_err(), "past the end is refused");
        }
    }

    async fn round_trip(dev: &FileDevice) {
        assert_eq!(dev.geometry(), Geometry { block_size: 4096, size_bytes: 1 << 20 });
        let data = Bytes::from(vec![7u8; 8192]);
        dev.write(4096, data.clone(), Durability::Fua).await.unwrap();
        dev.write(16384, data.clone(), Durability::Cached).await.unwrap();
        dev.flush().await.unwrap();
        assert_eq!(dev.read(4096, 8192).await.unwrap(), data);
        dev.discard(4096, 4096).await.unwrap();
        dev.write_zeroes(16384, 4096).await.unwrap();
        let back = dev.read(4096, 16384).await.unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0));
        assert!(back[4096..8192].iter().all(|&b| b == 7));
        assert!(back[12288..].iter().all(|&b| b == 0));
        assert!(dev.read(1 << 20, 4096).await.unwrap_err().is_request_error());
        assert!(dev.read(100, 4096).await.unwrap_err().is_request_error());
    }

    #[test]
    fn a_full_file_system_is_no_space_not_a_device_error() {
        let dir = tempfile::tempdir().unwrap();
        let dev = FileDevice::create(dir.path().join("d"), 1 << 20, &FileOptions::default()).unwrap();
        for errno in [Errno::NOSPC, Errno::DQUOT] {
            let e = dev.os_error(IoOp::Write, 4096, 8192, io::Error::from_raw_os_error(errno.raw_os_error()));
            assert!(e.is_no_space(), "{e}");
            assert!(!e.is_request_error());
        }
        let e = dev.os_error(IoOp::Write, 0, 4096, io::Error::from_raw_os_error(Errno::IO.raw_os_error()));
        assert!(matches!(e, IoError::Os { .. }), "{e}");
    }

    #[tokio::test]
    async fn direct_io_bounces_unaligned_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        let options = FileOptions { direct: true, ..FileOptions::default() };
        let dev = FileDevice::create(&path, 1 << 20, &options).unwrap();
        let data = Bytes::from(vec![3u8; 4097]).slice(1..);
        dev.write(0, data.clone(), Durability::Fua).await.unwrap();
        assert_eq!(dev.read(0, 4096).await.unwrap(), data);
    }
}
