//! A controller killed with SIGKILL comes back from its devices with every flushed write.

mod common;

use common::{Server, data_dir, qemu_io};

#[test]
fn kill_9_then_restart_keeps_every_volume_and_flushed_write() {
    let (_tmp, dir) = data_dir();
    let server = Server::start(&dir);
    server.add_devices(4, "256M");
    let layouts = ["linear", "mirror", "raid10", "raid5", "raid6"];
    for (i, layout) in layouts.iter().enumerate() {
        let uri = server.volume(layout, "32M", layout);
        let pattern = format!("write -P {} 0 6M", 0x10 + i);
        qemu_io(&uri, &[&pattern, "write -P 0xee 20M 1M", "flush"]);
        // A FUA write needs no flush to be durable.
        qemu_io(&uri, &["write -f -P 0xfa 30M 64k"]);
    }
    let before = server.json(&["volume", "list"]);
    server.kill9();

    let server = Server::start(&dir);
    let after = server.json(&["volume", "list"]);
    assert_eq!(before, after, "volumes differ after the restart");
    for v in after.as_array().unwrap() {
        assert_eq!(v["state"], "healthy", "{v}");
    }
    let exports = server.json(&["export", "list"]);
    assert_eq!(exports.as_array().unwrap().len(), layouts.len(), "exports come back: {exports}");
    for (i, layout) in layouts.iter().enumerate() {
        let check = format!("read -P {} 0 6M", 0x10 + i);
        qemu_io(
            &server.uri(layout),
            &[&check, "read -P 0xee 20M 1M", "read -P 0xfa 30M 64k", "read -P 0 6M 14M"],
        );
    }
}

#[test]
fn sigterm_stops_cleanly_and_everything_is_found_again() {
    let (_tmp, dir) = data_dir();
    let server = Server::start(&dir);
    server.add_devices(2, "256M");
    let uri = server.volume("m", "16M", "mirror");
    qemu_io(&uri, &["write -P 0x3c 0 4M"]);
    // A client idling in negotiation does not hold the shutdown up.
    let idle = std::net::TcpStream::connect(&server.nbd).unwrap();
    let status = server.terminate();
    drop(idle);
    assert!(status.success(), "exit status {status}");
    let server = Server::start(&dir);
    assert!(server.log().contains("pool found"), "{}", server.log());
    qemu_io(&server.uri("m"), &["read -P 0x3c 0 4M"]);
}

#[test]
fn sigterm_under_load_drains_and_leaves_nothing_to_resync() {
    let (_tmp, dir) = data_dir();
    let server = Server::start(&dir);
    server.add_devices(2, "256M");
    let uri = server.volume("busy", "64M", "mirror");
    let mut fio = std::process::Command::new("fio")
        .args(["--name=load", "--ioengine=nbd", &format!("--uri={uri}"), "--rw=randwrite", "--bs=64k"])
        .args(["--iodepth=16", "--time_based", "--runtime=20", "--verify_state_save=0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let status = server.terminate();
    let _ = fio.kill();
    let _ = fio.wait();
    assert!(status.success(), "exit status {status}");
    let server = Server::start(&dir);
    let log = server.log();
    assert!(!log.contains("resynced dirty regions"), "a clean shutdown left dirty regions:\n{log}");
    assert_eq!(server.json(&["volume", "show", "busy"])["state"], "healthy");
}

#[test]
fn demo_makes_a_raid10_volume_and_reuses_it() {
    let (_tmp, dir) = data_dir();
    let server = Server::start_with(&dir, &["--demo"]);
    let demo = server.json(&["volume", "show", "demo"]);
    assert_eq!((demo["layout"].as_str(), demo["size_bytes"].as_u64()), (Some("raid10"), Some(1 << 30)));
    assert_eq!(server.json(&["device", "list"]).as_array().unwrap().len(), 4);
    qemu_io(&server.uri("demo"), &["write -P 0x2d 0 1M"]);
    let info = common::run("qemu-img", &["info", &server.uri("demo")]);
    assert!(info.contains("1 GiB"), "{info}");
    drop(server);
    let server = Server::start_with(&dir, &["--demo"]);
    assert_eq!(server.json(&["volume", "show", "demo"])["id"], demo["id"], "the demo volume is reused");
    assert_eq!(server.json(&["device", "list"]).as_array().unwrap().len(), 4);
    qemu_io(&server.uri("demo"), &["read -P 0x2d 0 1M"]);
}

#[test]
fn a_missing_device_is_reported_and_its_mirror_still_serves() {
    let (_tmp, dir) = data_dir();
    let server = Server::start(&dir);
    let (a, b) = (dir.join("devices/a.img"), dir.join("devices/b.img"));
    for path in [&a, &b] {
        server.ok(&["device", "add", path.to_str().unwrap(), "--create", "128M"]);
    }
    let uri = server.volume("m", "16M", "mirror");
    qemu_io(&uri, &["write -P 0x71 0 2M", "flush"]);
    server.volume("s", "16M", "stripe");
    server.kill9();
    std::fs::remove_file(&b).unwrap();

    let server = Server::start(&dir);
    let status = server.json(&["status"]);
    assert_eq!(status["startup"]["missing_devices"].as_array().unwrap().len(), 1, "{status}");
    assert_eq!(status["volumes"]["degraded"], 1, "{status}");
    assert_eq!(status["devices"]["missing"], 1, "{status}");
    let text = server.ok(&["status"]);
    assert!(text.contains("is missing") && text.contains("b.img"), "{text}");
    qemu_io(&server.uri("m"), &["read -P 0x71 0 2M", "write -P 0x72 4M 1M", "read -P 0x72 4M 1M"]);
    // The stripe needs both devices: it is failed, and IO to it is refused.
    assert_eq!(server.json(&["volume", "show", "s"])["state"], "failed");
    let read = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 1M", &server.uri("s")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&read.stdout).to_string() + &String::from_utf8_lossy(&read.stderr);
    assert!(text.contains("Input/output error"), "{text}");
    server.kill9();

    // An export recorded for a volume that is not there is listed as not served.
    let state = dir.join("controller.json");
    let mut saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    let mut ghost = saved["exports"][0].clone();
    ghost["volume"] = "ghost".into();
    ghost["name"] = "ghost".into();
    saved["exports"].as_array_mut().unwrap().push(ghost);
    std::fs::write(&state, serde_json::to_vec(&saved).unwrap()).unwrap();
    let server = Server::start(&dir);
    let exports = server.json(&["export", "list"]);
    let ghost = exports.as_array().unwrap().iter().find(|e| e["volume"] == "ghost").expect("listed").clone();
    assert_eq!((ghost["served"].as_bool(), ghost["uri"].is_null()), (Some(false), true), "{ghost}");
    assert!(ghost["problem"].as_str().is_some_and(|p| p.contains("No volume named 'ghost'")), "{ghost}");
    server.ok(&["export", "remove", "ghost"]);
    assert_eq!(server.json(&["export", "list"]).as_array().unwrap().len(), 2, "m and s stay");
}
