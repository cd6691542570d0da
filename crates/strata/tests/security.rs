//! Secrets at rest and iSCSI authentication: the data directory and the files holding
//! secrets are the controller user's alone, `serve` refuses ones that other users own or
//! may write, failed iSCSI logins are delayed, counted and logged, discovery can require
//! CHAP, and an iSCSI export open to every initiator needs a loopback portal or
//! `--allow-any`.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::initiator::Initiator;
use common::{STRATA, Server, data_dir, run};

const HOST1: &str = "iqn.2026-11.test:host1";
const HOST9: &str = "iqn.2026-11.test:host9";
const SECRET: &str = "alice-secret-123";

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).mode() & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs a libiscsi tool; returns (success, stdout + stderr).
fn tool(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// One metric's value from the controller's `/metrics` (0 when the series does not exist).
fn metric(server: &Server, series: &str) -> f64 {
    let auth = format!("Authorization: Bearer {}", server.token());
    let text = run("curl", &["-s", "-H", &auth, &format!("{}/metrics", server.api)]);
    text.lines()
        .find(|l| l.starts_with(series))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .unwrap_or(0.0)
}

/// Whether the controller's log shows `needle` within a few seconds.
fn logged(server: &Server, needle: &str) -> bool {
    (0..150).any(|_| {
        let found = server.log().contains(needle);
        if !found {
            std::thread::sleep(Duration::from_millis(20));
        }
        found
    })
}

/// A controller whose iSCSI portal is `iscsi` (the usual start uses 127.0.0.1:0).
fn start_with_portal(dir: &Path, iscsi: &str) -> Server {
    Server::start_with(dir, &["--iscsi", iscsi])
}

#[test]
fn the_data_directory_and_its_secrets_are_private() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let server = Server::start_with(&dir, &["--demo"]);
    assert_eq!(mode(&dir), 0o700, "the data directory is made 0700");
    assert_eq!(mode(&dir.join("devices")), 0o700);
    for file in ["token", "controller.json", "endpoints.json"] {
        assert_eq!(mode(&dir.join(file)), 0o600, "{file}");
    }
    // The demo's device files hold every volume's data (made by `device add --create`).
    for i in 0..4 {
        assert_eq!(mode(&dir.join(format!("devices/device{i}"))), 0o600, "the demo's device{i}");
    }
    // A CHAP secret is written into controller.json, which stays 0600 and is replaced whole.
    server.ok(&["volume", "create", "secret", "--size", "16M"]);
    server.ok(&["export", "add", "secret", "--iscsi", "--chap-user", "alice", "--chap-secret", SECRET]);
    let state = dir.join("controller.json");
    assert!(std::fs::read_to_string(&state).unwrap().contains(SECRET));
    assert_eq!(mode(&state), 0o600, "controller.json with a CHAP secret");
    assert!(!dir.join("controller.json.tmp").exists());
    assert!(server.terminate().success());

    // Left readable by others (by an older version, or by hand): narrowed, with a warning.
    chmod(&dir, 0o755);
    chmod(&dir.join("token"), 0o644);
    chmod(&state, 0o644);
    let server = Server::start(&dir);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("token")), 0o600);
    assert_eq!(mode(&state), 0o600);
    assert!(server.log().contains("narrowed its mode"), "{}", server.log());
    assert_eq!(server.json(&["volume", "list"]).as_array().unwrap().len(), 2, "the same controller");
}

#[test]
fn serve_refuses_a_data_directory_or_token_that_others_own_or_can_write() {
    let (_tmp, dir) = data_dir();
    let server = Server::start(&dir);
    assert!(server.terminate().success());

    chmod(&dir, 0o777);
    let err = common::refused_serve(&dir, &[]);
    assert!(err.contains(&format!("run `chmod 700 {}`", dir.display())), "{err}");
    chmod(&dir, 0o700);

    let token = dir.join("token");
    chmod(&token, 0o666);
    let err = common::refused_serve(&dir, &[]);
    assert!(err.contains(&format!("run `chmod 600 {}`", token.display())), "{err}");
    chmod(&token, 0o600);

    // Owned by another user (tests run as root; `nobody` is 65534).
    let us = std::fs::metadata(&dir).unwrap().uid();
    if us == 0 {
        std::os::unix::fs::chown(&token, Some(65534), None).unwrap();
        let err = common::refused_serve(&dir, &[]);
        assert!(err.contains(&format!("run `chown -R 0 {}`", token.display())), "{err}");
        std::os::unix::fs::chown(&token, Some(0), None).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        let err = common::refused_serve(&dir, &[]);
        assert!(
            err.contains("owned by user 65534")
                && err.contains(&format!("run `chown -R 0 {}`", dir.display())),
            "{err}"
        );
        std::os::unix::fs::chown(&dir, Some(0), Some(0)).unwrap();
    }
    // Mended as told, it serves again with the same token.
    let before = std::fs::read_to_string(&token).unwrap();
    let server = Server::start(&dir);
    assert_eq!(server.token(), before.trim());
}

#[test]
fn failed_logins_are_delayed_counted_and_logged_while_others_log_in() {
    let (_tmp, dir) = data_dir();
    let server = Server::start(&dir);
    server.add_devices(1, "256M");
    server.ok(&["volume", "create", "locked", "--size", "16M"]);
    server.ok(&["volume", "create", "open", "--size", "16M"]);
    let locked = "iqn.2026-11.io.strata:locked";
    let open = "iqn.2026-11.io.strata:open";
    server.ok(&[
        "export",
        "add",
        "locked",
        "--iscsi",
        "--iqn",
        locked,
        "--chap-user",
        "alice",
        "--chap-secret",
        SECRET,
    ]);
    server.ok(&["export", "add", "open", "--iscsi", "--iqn", open]);
    let portal = server.iscsi.clone();

    // Another initiator logs in over and over meanwhile; it must not wait for the guesser.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let other = {
        let (stop, portal) = (stop.clone(), portal.clone());
        std::thread::spawn(move || {
            let mut slowest = Duration::ZERO;
            let mut logins = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && logins < 1000 {
                let started = Instant::now();
                let session =
                    Initiator::login(&portal, open, HOST1, false).expect("the other initiator logs in");
                slowest = slowest.max(started.elapsed());
                logins += 1;
                drop(session);
                std::thread::sleep(Duration::from_millis(50));
            }
            (logins, slowest)
        })
    };
    let started = Instant::now();
    for _ in 0..10 {
        let (ok, _) =
            tool("iscsi-inq", &["-i", HOST9, &format!("iscsi://alice%wrong-secret-00@{portal}/{locked}/0")]);
        assert!(!ok, "a wrong CHAP secret logged in");
    }
    let guessing = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (logins, slowest) = other.join().unwrap();
    assert!(guessing >= Duration::from_millis(9500), "10 wrong secrets took only {guessing:?}");
    // Each refused login waits a second; the other initiator must not wait behind them
    // (its logins would then take about a second each, and there would be about ten).
    assert!(
        logins >= 20 && slowest < Duration::from_millis(950),
        "{logins} logins meanwhile, the slowest {slowest:?}"
    );
    assert_eq!(metric(&server, "strata_iscsi_login_failures_total{reason=\"authentication\"}"), 10.0);
    assert!(logged(&server, "iSCSI login refused"));
    let line = server.log().lines().find(|l| l.contains("iSCSI login refused")).unwrap().to_string();
    assert!(line.contains(HOST9) && line.contains("127.0.0.1:"), "initiator and address in the log: {line}");

    // An initiator not on the allow-list, and a target that does not exist, wait as well.
    server.ok(&["export", "remove", "open"]);
    server.ok(&["export", "add", "open", "--iscsi", "--iqn", open, "--allow", HOST1]);
    let started = Instant::now();
    assert!(Initiator::login(&portal, open, HOST9, false).is_err());
    assert!(Initiator::login(&portal, "iqn.2026-11.io.strata:none", HOST1, false).is_err());
    assert!(started.elapsed() >= Duration::from_millis(1900), "{:?}", started.elapsed());
    assert_eq!(metric(&server, "strata_iscsi_login_failures_total{reason=\"not_allowed\"}"), 1.0);
    assert_eq!(metric(&server, "strata_iscsi_login_failures_total{reason=\"no_such_target\"}"), 1.0);
}

#[test]
fn discovery_with_chap_answers_only_initiators_that_prove_it() {
    let (tmp, dir) = data_dir();
    let config = tmp.path().join("strata.toml");
    std::fs::write(&config, "iscsi_discovery_chap_user = \"finder\"\n").unwrap();
    let args = ["--data-dir", dir.to_str().unwrap(), "serve", "--config", config.to_str().unwrap()];
    let err = String::from_utf8(run_fail(&args)).unwrap();
    assert!(err.contains("set both or neither"), "{err}");
    std::fs::write(
        &config,
        format!("iscsi_discovery_chap_user = \"finder\"\niscsi_discovery_chap_secret = \"{SECRET}\"\n"),
    )
    .unwrap();
    let server = Server::start_with(&dir, &["--config", config.to_str().unwrap()]);
    server.add_devices(1, "256M");
    server.ok(&["volume", "create", "v", "--size", "16M"]);
    let iqn = "iqn.2026-11.io.strata:found";
    server.ok(&["export", "add", "v", "--iscsi", "--iqn", iqn, "--allow", HOST1]);
    let portal = &server.iscsi;
    assert!(
        server.log().contains("run `chmod 600` on it"),
        "a readable config file with a secret is warned of"
    );

    let (ok, listed) = tool("iscsi-ls", &["-i", HOST1, &format!("iscsi://{portal}")]);
    assert!(!ok && !listed.contains(iqn), "listed without discovery CHAP: {listed}");
    let (ok, listed) = tool("iscsi-ls", &["-i", HOST1, &format!("iscsi://finder%wrong-secret-00@{portal}")]);
    assert!(!ok && !listed.contains(iqn), "listed with a wrong secret: {listed}");
    let (ok, listed) = tool("iscsi-ls", &["-i", HOST1, &format!("iscsi://finder%{SECRET}@{portal}")]);
    assert!(ok && listed.contains(iqn), "{listed}");
    assert_eq!(metric(&server, "strata_iscsi_login_failures_total{reason=\"authentication\"}"), 2.0);
    // Normal sessions are the target's business: this one has no CHAP.
    let (ok, inq) = tool("iscsi-inq", &["-i", HOST1, &format!("iscsi://{portal}/{iqn}/0")]);
    assert!(ok && inq.contains("STRATA"), "{inq}");
}

/// Runs the CLI, which must fail; returns its stderr.
fn run_fail(args: &[&str]) -> Vec<u8> {
    let out = Command::new(STRATA).args(args).output().unwrap();
    assert!(!out.status.success(), "strata {args:?} succeeded");
    out.stderr
}

#[test]
fn exports_open_to_every_initiator_need_a_loopback_portal_or_allow_any() {
    let (_tmp, dir) = data_dir();
    // On loopback (the demo's case), an export without --allow or CHAP is fine.
    let server = Server::start(&dir);
    server.add_devices(1, "256M");
    server.ok(&["volume", "create", "old", "--size", "16M"]);
    server.ok(&["volume", "create", "new", "--size", "16M"]);
    let old = "iqn.2026-11.io.strata:old";
    server.ok(&["export", "add", "old", "--iscsi", "--iqn", old]);
    assert!(server.terminate().success());

    // On every address: refused without --allow, CHAP or --allow-any, saying what to add.
    let server = start_with_portal(&dir, "0.0.0.0:0");
    let portal = format!("127.0.0.1:{}", server.iscsi.rsplit(':').next().unwrap());
    let new = "iqn.2026-11.io.strata:new";
    let out = server.cli(&["export", "add", "new", "--iscsi", "--iqn", new]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an export open to all on 0.0.0.0 was accepted");
    assert!(
        err.contains("--allow IQN") && err.contains("--chap-user") && err.contains("--allow-any"),
        "{err}"
    );
    assert!(Initiator::login(&portal, new, HOST1, false).is_err());
    server.ok(&["export", "add", "new", "--iscsi", "--iqn", new, "--allow-any"]);
    Initiator::login(&portal, new, HOST1, false).expect("--allow-any serves it to everyone");
    let out = server.cli(&["export", "add", "new", "--iscsi", "--allow-any", "--allow", HOST1]);
    assert!(!out.status.success(), "--allow-any with --allow");

    // The export recorded on loopback is not served here, and the listing says why.
    let exports = server.json(&["export", "list"]);
    let recorded = exports.as_array().unwrap().iter().find(|e| e["name"] == old).unwrap().clone();
    assert_eq!(recorded["served"], false, "{recorded}");
    assert!(recorded["problem"].as_str().unwrap().contains("--allow-any"), "{recorded}");
    assert!(server.log().contains("export not served"), "{}", server.log());
    assert!(Initiator::login(&portal, old, HOST1, false).is_err(), "a withheld export let an initiator in");
    let out = server.cli(&["export", "add", "old", "--iscsi", "--iqn", old, "--allow", HOST1]);
    assert!(!out.status.success(), "a second iSCSI export of a volume whose first is withheld");
    server.ok(&["export", "remove", "old", "--iscsi"]);
    server.ok(&["export", "add", "old", "--iscsi", "--iqn", old, "--allow", HOST1]);
    Initiator::login(&portal, old, HOST1, false).expect("allowed now");
}
