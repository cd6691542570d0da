//! `device add` on real files, images and loop devices: it refuses to overwrite what a
//! device holds (a filesystem, a partition table, a binary) unless forced, refuses a block
//! device that is mounted or held, creates files only where the operator allowed and never
//! through a link; and every device added comes back after a restart whatever the form of
//! its path, including one found again under another path.

mod common;

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Server, data_dir, qemu_io, run};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Starts a controller on `dir` that also allows device files in `allowed`.
fn start_allowing(dir: &Path, allowed: &Path) -> Server {
    let config = dir.with_extension("toml");
    std::fs::write(&config, format!("device_dirs = [{:?}]\n", allowed.to_str().unwrap())).unwrap();
    Server::start_with(dir, &["--config", config.to_str().unwrap()])
}

/// `device add` that must fail; returns its message.
fn refused(server: &Server, args: &[&str]) -> String {
    let mut all = vec!["device", "add"];
    all.extend_from_slice(args);
    let out = server.cli(&all);
    assert!(!out.status.success(), "strata {all:?} was accepted");
    stderr(&out)
}

/// A sparse file of `size` bytes.
fn sparse(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

/// An image of 64 MiB with an ext4 filesystem, made by mkfs.ext4.
fn ext4_image(path: &Path) {
    sparse(path, 64 << 20);
    run("mkfs.ext4", &["-q", "-F", path.to_str().unwrap()]);
}

/// A loop device over `backing`, unmounted and detached when dropped.
struct Loop {
    device: String,
    mounted: Option<PathBuf>,
}

impl Loop {
    fn new(backing: &Path) -> Loop {
        let device = run("losetup", &["--find", "--show", backing.to_str().unwrap()]).trim().to_string();
        Loop { device, mounted: None }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if let Some(at) = self.mounted.take() {
            let _ = Command::new("umount").arg(at).status();
        }
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

#[test]
fn a_device_holding_a_filesystem_a_partition_table_or_a_binary_is_refused_unless_forced() {
    let (tmp, dir) = data_dir();
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let server = start_allowing(&dir, &images);

    let ext4 = images.join("ext4.img");
    ext4_image(&ext4);
    // An MBR with one Linux partition, as fdisk writes it; wipefs agrees it is one.
    let mbr = images.join("mbr.img");
    sparse(&mbr, 64 << 20);
    let mut sector = vec![0u8; 512];
    sector[446..462].copy_from_slice(&[0x80, 0, 0x21, 0, 0x83, 0, 0, 0, 0, 8, 0, 0, 0, 0xf8, 1, 0]);
    sector[510..].copy_from_slice(&[0x55, 0xaa]);
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::File::options().write(true).open(&mbr).unwrap(),
        &sector,
        0,
    )
    .unwrap();
    assert!(run("wipefs", &["-n", mbr.to_str().unwrap()]).contains("dos"));
    // Swap space, as mkswap makes it.
    let swap = images.join("swap.img");
    sparse(&swap, 64 << 20);
    run("mkswap", &["-q", swap.to_str().unwrap()]);
    // A copy of a program, made long enough to hold a pool's labels.
    let elf = images.join("ls.copy");
    std::fs::copy("/bin/ls", &elf).unwrap();
    std::fs::File::options().write(true).open(&elf).unwrap().set_len(64 << 20).unwrap();
    // Data with no signature at all, where the labels would go.
    let data = images.join("data.img");
    sparse(&data, 64 << 20);
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::File::options().write(true).open(&data).unwrap(),
        b"notes",
        300 << 10,
    )
    .unwrap();

    let all = [&ext4, &mbr, &swap, &elf, &data];
    let before: Vec<Vec<u8>> = all.iter().map(|p| std::fs::read(p).unwrap()).collect();
    for (path, named) in [
        (&ext4, "holds an ext4 filesystem"),
        (&mbr, "holds an MBR partition table"),
        (&swap, "holds swap space"),
        (&elf, "holds an ELF executable"),
        (&data, "holds data where Strata writes its labels"),
    ] {
        let message = refused(&server, &[path.to_str().unwrap()]);
        assert!(message.contains(named) && message.contains("--force"), "{path:?}: {message}");
    }
    for (path, old) in all.iter().zip(&before) {
        assert!(std::fs::read(path).unwrap() == *old, "{path:?} was written");
    }
    run("e2fsck", &["-n", "-f", ext4.to_str().unwrap()]);
    assert_eq!(server.json(&["device", "list"]), serde_json::json!([]));
    // The scan says what they hold, too (a link in the devices folder makes it look).
    std::os::unix::fs::symlink(&ext4, dir.join("devices/ext4-link")).unwrap();
    let scan = server.json(&["device", "scan"]);
    assert_eq!(scan[0]["state"], "unclaimed", "{scan}");
    assert!(scan[0]["detail"].as_str().unwrap().contains("holds an ext4 filesystem"), "{scan}");

    for path in all {
        server.ok(&["device", "add", path.to_str().unwrap(), "--force"]);
    }
    assert_eq!(server.json(&["device", "list"]).as_array().unwrap().len(), all.len());
    let uri = server.volume("v", "16M", "linear");
    qemu_io(&uri, &["write -P 0x42 0 1M", "read -P 0x42 0 1M"]);
}

#[test]
fn a_mounted_or_held_block_device_is_refused_as_in_use_and_left_intact() {
    let (tmp, dir) = data_dir();
    let server = Server::start(&dir);
    let image = tmp.path().join("fs.img");
    ext4_image(&image);
    let mut lo = Loop::new(&image);
    let at = tmp.path().join("mnt");
    std::fs::create_dir_all(&at).unwrap();
    let mounted = Command::new("mount").args([&lo.device, at.to_str().unwrap()]).status().unwrap().success();
    if mounted {
        lo.mounted = Some(at.clone());
        std::fs::write(at.join("kept"), b"still here").unwrap();
        let message = refused(&server, &[&lo.device]);
        assert!(message.contains("in use"), "{message}");
        // Not even --force takes a mounted device.
        assert!(refused(&server, &[&lo.device, "--force"]).contains("in use"));
        assert_eq!(std::fs::read(at.join("kept")).unwrap(), b"still here");
        run("umount", &[at.to_str().unwrap()]);
        lo.mounted = None;
        run("e2fsck", &["-n", "-f", &lo.device]);
    } else {
        eprintln!("mount does not work here; the held device below stands for it");
    }

    // Held open exclusively by another program (what mount, md and LVM do).
    let blank = tmp.path().join("blank.img");
    sparse(&blank, 64 << 20);
    let held_lo = Loop::new(&blank);
    let held =
        std::fs::File::options().read(true).custom_flags(libc::O_EXCL).open(&held_lo.device).expect("held");
    let message = refused(&server, &[&held_lo.device]);
    assert!(message.contains("in use"), "{message}");
    drop(held);
    // Once free it is taken, and then held by the controller: nothing else can mount it.
    server.ok(&["device", "add", &held_lo.device]);
    let again = std::fs::File::options().read(true).custom_flags(libc::O_EXCL).open(&held_lo.device);
    assert_eq!(
        again.err().and_then(|e| e.raw_os_error()),
        Some(libc::EBUSY),
        "the pool's device is not held"
    );
    assert_eq!(server.json(&["device", "scan"])[0]["state"], "member");
    // And the ext4 one is refused for its filesystem once it is free.
    let message = refused(&server, &[&lo.device]);
    assert!(message.contains("holds an ext4 filesystem"), "{message}");
    drop(server);
}

#[test]
fn create_never_follows_a_link_and_makes_files_only_where_allowed() {
    let (tmp, dir) = data_dir();
    let server = Server::start(&dir);
    let devices = dir.join("devices");

    // A dangling link in the devices folder: nothing is made where it points.
    let target = tmp.path().join("target");
    std::os::unix::fs::symlink(&target, devices.join("link")).unwrap();
    let message = refused(&server, &[devices.join("link").to_str().unwrap(), "--create", "64M"]);
    assert!(message.contains("symbolic link"), "{message}");
    assert!(!target.exists(), "--create followed a link");

    // Outside the allowed folders: neither made nor taken.
    let outside = tmp.path().join("outside.img");
    let message = refused(&server, &[outside.to_str().unwrap(), "--create", "64M"]);
    assert!(message.contains("not in a folder allowed"), "{message}");
    assert!(!outside.exists());
    let escape = devices.join("../../escape.img");
    assert!(
        refused(&server, &[escape.to_str().unwrap(), "--create", "64M"]).contains("not in a folder allowed")
    );
    assert!(!tmp.path().join("escape.img").exists());
    sparse(&outside, 64 << 20);
    let message = refused(&server, &[outside.to_str().unwrap()]);
    assert!(message.contains("not in a folder allowed") && message.contains("device_dirs"), "{message}");
    // Nor through a link inside the devices folder.
    std::os::unix::fs::symlink(&outside, devices.join("to-outside")).unwrap();
    assert!(
        refused(&server, &[devices.join("to-outside").to_str().unwrap()]).contains("not in a folder allowed")
    );

    // A file too small says how small it really is.
    let small = devices.join("small");
    std::fs::write(&small, vec![0u8; 1024]).unwrap();
    let message = refused(&server, &[small.to_str().unwrap()]);
    assert!(message.contains("has 1024 bytes") && message.contains("at least"), "{message}");

    // Where allowed, the file is made private to the controller's user.
    let made = devices.join("made");
    server.ok(&["device", "add", made.to_str().unwrap(), "--create", "64M"]);
    assert_eq!(std::fs::metadata(&made).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(refused(&server, &[made.to_str().unwrap(), "--create", "64M"]).contains("already exists"));
}

/// Volumes `v0`.. written with their own pattern; checks they read back.
fn check_volumes(server: &Server, n: usize) {
    for i in 0..n {
        let v = server.json(&["volume", "show", &format!("v{i}")]);
        assert_eq!(v["state"], "healthy", "{v}");
        qemu_io(&server.uri(&format!("v{i}")), &[&format!("read -P {} 0 2M", 0x20 + i)]);
    }
    for d in server.json(&["device", "list"]).as_array().unwrap() {
        assert_eq!(d["state"], "online", "{d}");
    }
}

#[test]
fn every_form_of_device_path_comes_back_after_sigterm_and_sigkill() {
    let (tmp, dir) = data_dir();
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let devices = dir.join("devices");
    std::fs::create_dir_all(devices.join("sub")).unwrap();
    let server = start_allowing(&dir, &elsewhere);

    // A file in a subfolder, a path through `..` out of the devices folder, a link in the
    // devices folder to a file elsewhere, and one to a block device (`ln -s /dev/disk/by-id/…`).
    let linked_file = elsewhere.join("linked.img");
    sparse(&linked_file, 64 << 20);
    std::os::unix::fs::symlink(&linked_file, devices.join("file-link")).unwrap();
    let backing = tmp.path().join("loop.img");
    sparse(&backing, 64 << 20);
    let lo = Loop::new(&backing);
    std::os::unix::fs::symlink(&lo.device, devices.join("disk-link")).unwrap();
    let forms: Vec<(PathBuf, bool)> = vec![
        (devices.join("sub/c"), true),
        (devices.join("../../elsewhere/b"), true),
        (devices.join("file-link"), false),
        (devices.join("disk-link"), false),
    ];
    for (path, create) in &forms {
        let mut args = vec!["device", "add", path.to_str().unwrap()];
        if *create {
            args.extend(["--create", "64M"]);
        }
        server.ok(&args);
    }
    // One linear volume per device: placement goes round the pool.
    let mut used = std::collections::BTreeSet::new();
    for i in 0..forms.len() {
        let uri = server.volume(&format!("v{i}"), "8M", "linear");
        qemu_io(&uri, &[&format!("write -P {} 0 2M", 0x20 + i), "flush"]);
        let v = server.json(&["volume", "show", &format!("v{i}")]);
        used.extend(v["devices"].as_array().unwrap().iter().map(|d| d.to_string()));
    }
    assert_eq!(used.len(), forms.len(), "every device holds a volume");

    assert!(server.terminate().success());
    let server = start_allowing(&dir, &elsewhere);
    assert_eq!(server.json(&["status"])["startup"]["missing_devices"], serde_json::json!([]));
    check_volumes(&server, forms.len());
    server.kill9();
    let server = start_allowing(&dir, &elsewhere);
    check_volumes(&server, forms.len());
    drop(server);
}

#[test]
fn a_member_found_under_another_path_is_taken_back() {
    let (tmp, dir) = data_dir();
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let devices = dir.join("devices");
    let server = start_allowing(&dir, &elsewhere);
    for name in ["a", "b"] {
        server.ok(&["device", "add", devices.join(name).to_str().unwrap(), "--create", "64M"]);
    }
    for i in 0..2 {
        let uri = server.volume(&format!("v{i}"), "8M", "linear");
        qemu_io(&uri, &[&format!("write -P {} 0 2M", 0x20 + i), "flush"]);
    }
    assert!(server.terminate().success());

    // The administrator moves one device out of the devices folder.
    std::fs::rename(devices.join("b"), elsewhere.join("b")).unwrap();
    let server = start_allowing(&dir, &elsewhere);
    assert_eq!(
        server
            .json(&["device", "list"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["state"] == "missing")
            .count(),
        1
    );
    let out = server.ok(&["device", "add", elsewhere.join("b").to_str().unwrap()]);
    assert!(out.contains("Added"), "{out}");
    // At once, and after a crash, from the recorded path.
    check_volumes(&server, 2);
    server.kill9();
    let server = start_allowing(&dir, &elsewhere);
    check_volumes(&server, 2);
    assert!(refused(&server, &[elsewhere.join("b").to_str().unwrap()]).contains("already belongs to pool"));
    assert!(server.terminate().success());

    // Both moved where nothing looks: the controller starts with no pool, rebuilds it
    // from the first one added back, and takes the second back into it.
    std::fs::rename(devices.join("a"), elsewhere.join("a2")).unwrap();
    std::fs::rename(elsewhere.join("b"), elsewhere.join("b2")).unwrap();
    let server = start_allowing(&dir, &elsewhere);
    assert_eq!(server.json(&["device", "list"]), serde_json::json!([]));
    server.ok(&["device", "add", elsewhere.join("a2").to_str().unwrap()]);
    server.ok(&["device", "add", elsewhere.join("b2").to_str().unwrap()]);
    check_volumes(&server, 2);
    server.kill9();
    let server = start_allowing(&dir, &elsewhere);
    check_volumes(&server, 2);
    drop(server);
}

#[test]
fn serve_refuses_a_device_folder_that_others_may_write_or_own() {
    use std::os::unix::fs::MetadataExt;
    let (tmp, dir) = data_dir();
    let disks = tmp.path().join("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let config = dir.with_extension("toml");
    std::fs::write(&config, format!("device_dirs = [{:?}]\n", disks.to_str().unwrap())).unwrap();
    let args = ["--config", config.to_str().unwrap()];
    // Anyone could swap a device file there for a link to a disk between check and open.
    std::fs::set_permissions(&disks, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = common::refused_serve(&dir, &args);
    assert!(err.contains(&format!("run `chmod 700 {}`", disks.display())), "{err}");
    std::fs::set_permissions(&disks, std::fs::Permissions::from_mode(0o755)).unwrap();
    if std::fs::metadata(&dir).unwrap().uid() == 0 {
        std::os::unix::fs::chown(&disks, Some(65534), None).unwrap();
        let err = common::refused_serve(&dir, &args);
        assert!(err.contains("owned by user 65534") && err.contains("chown -R 0"), "{err}");
        std::os::unix::fs::chown(&disks, Some(0), None).unwrap();
    }
    // Mended as told, it serves and takes device files there.
    let server = Server::start_with(&dir, &args);
    server.ok(&["device", "add", disks.join("d0").to_str().unwrap(), "--create", "64M"]);
}

#[test]
fn a_devices_folder_entry_that_cannot_be_read_does_not_stop_serve() {
    use std::os::unix::process::CommandExt;
    let (tmp, dir) = data_dir();
    let devices = dir.join("devices");
    let lost = devices.join("lost+found");
    std::fs::create_dir_all(&lost).unwrap();
    std::os::unix::fs::symlink("loop-b", devices.join("loop-a")).unwrap();
    std::os::unix::fs::symlink("loop-a", devices.join("loop-b")).unwrap();
    // As when `devices/` is a mount point and `serve` runs as its own user: a root-owned
    // `lost+found` it may not list. Root may list anything, so root runs it as nobody.
    // SAFETY: geteuid has no preconditions and cannot fail.
    let as_root = unsafe { libc::geteuid() } == 0;
    std::fs::set_permissions(&lost, std::fs::Permissions::from_mode(0o700)).unwrap();
    if as_root {
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for path in [&dir, &devices] {
            std::os::unix::fs::chown(path, Some(65534), Some(65534)).unwrap();
        }
    } else {
        std::fs::set_permissions(&lost, std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    let start = || {
        Server::start_adjusted(&dir, &[], |command| {
            if as_root {
                command.uid(65534).gid(65534);
            }
        })
    };
    let server = start();
    assert!(server.log().contains("lost+found"), "the skipped folder is named: {}", server.log());
    server.ok(&["device", "add", devices.join("d0").to_str().unwrap(), "--create", "64M"]);
    assert!(server.terminate().success());
    let server = start();
    let list = server.json(&["device", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["state"], "online", "{list}");
    // It was found by the scan: no path needed recording.
    let state = std::fs::read_to_string(dir.join("controller.json")).unwrap_or_else(|_| "{}".into());
    let recorded = &serde_json::from_str::<serde_json::Value>(&state).unwrap()["device_paths"];
    assert!(recorded.as_array().is_none_or(|paths| paths.is_empty()), "{state}");
    drop(server);
    if !as_root {
        std::fs::set_permissions(&lost, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
}
