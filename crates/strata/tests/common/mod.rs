//! Shared by the end-to-end tests: a real `strata serve` process on loopback ports chosen
//! by the kernel, the CLI pointed at it, and the Debian NBD clients run as commands.
#![allow(dead_code)]

pub mod initiator;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The strata binary under test.
pub const STRATA: &str = env!("CARGO_BIN_EXE_strata");

/// A controller process; killed when dropped.
pub struct Server {
    pub dir: PathBuf,
    pub child: Child,
    pub api: String,
    pub nbd: String,
    pub iscsi: String,
}

impl Server {
    /// Starts a controller on `dir` and waits until it listens.
    pub fn start(dir: &Path) -> Server {
        Self::start_with(dir, &[])
    }

    /// Starts a controller with extra `serve` arguments (`--iscsi ADDR` replaces the
    /// loopback portal).
    pub fn start_with(dir: &Path, extra: &[&str]) -> Server {
        Self::start_adjusted(dir, extra, |_| {})
    }

    /// Starts a controller with extra `serve` arguments, its command changed by `adjust`
    /// first (limits, environment).
    pub fn start_adjusted(dir: &Path, extra: &[&str], adjust: impl FnOnce(&mut Command)) -> Server {
        let endpoints = dir.join("endpoints.json");
        let _ = std::fs::remove_file(&endpoints);
        let log = std::fs::File::create(dir.with_extension("log")).expect("log file");
        let mut command = Command::new(STRATA);
        command
            .args(["serve", "--data-dir"])
            .arg(dir)
            .args(["--api", "127.0.0.1:0", "--nbd", "127.0.0.1:0"])
            .args(if extra.contains(&"--iscsi") { &[][..] } else { &["--iscsi", "127.0.0.1:0"][..] })
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        adjust(&mut command);
        let child = command.spawn().expect("strata starts");
        let mut server = Server {
            dir: dir.to_path_buf(),
            child,
            api: String::new(),
            nbd: String::new(),
            iscsi: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&endpoints)
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            {
                server.api = v["api"].as_str().unwrap().to_string();
                server.nbd = v["nbd"].as_str().unwrap().to_string();
                server.iscsi = v["iscsi"].as_str().unwrap().to_string();
                return server;
            }
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("strata serve exited with {status}; log:\n{}", server.log());
            }
            assert!(Instant::now() < deadline, "strata serve did not start; log:\n{}", server.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the controller logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }

    /// The API token.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.dir.join("token")).unwrap().trim().to_string()
    }

    /// Runs the CLI against this controller.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(STRATA).arg("--data-dir").arg(&self.dir).args(args).output().expect("strata runs")
    }

    /// Runs the CLI and returns its stdout; panics with its stderr on failure.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "strata {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs the CLI with `--json` and parses the answer.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).expect("JSON output")
    }

    /// Adds `n` sparse file devices of `size` in separate fault domains.
    pub fn add_devices(&self, n: usize, size: &str) {
        for i in 0..n {
            let path = self.dir.join("devices").join(format!("dev{i}"));
            let domain = format!("shelf{i}");
            self.ok(&["device", "add", path.to_str().unwrap(), "--create", size, "--fault-domain", &domain]);
        }
    }

    /// Creates and exports a volume; returns its NBD URI.
    pub fn volume(&self, name: &str, size: &str, layout: &str) -> String {
        self.ok(&["volume", "create", name, "--size", size, "--layout", layout]);
        self.ok(&["export", "add", name, "--nbd"]);
        self.uri(name)
    }

    /// The NBD URI of export `name`.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd://{}/{name}", self.nbd)
    }

    /// SIGKILL, as a crash.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM; returns the exit status after a clean shutdown.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "strata did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh controller data directory (and its log file beside it) under /tmp.
pub fn data_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ctl");
    std::fs::create_dir_all(&dir).unwrap();
    (tmp, dir)
}

/// Runs a command; panics with its output unless it succeeds.
pub fn run(program: &str, args: &[&str]) -> String {
    let out =
        Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program} cannot run: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// qemu-io commands against an NBD URI; panics on failure or a pattern mismatch.
pub fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let out = run("qemu-io", &args);
    assert!(!out.contains("verification failed") && !out.contains("failed:"), "qemu-io {commands:?}:\n{out}");
    out
}

/// Runs `strata serve` on `dir` with `extra` arguments; it must refuse to start. Returns
/// what it printed.
pub fn refused_serve(dir: &Path, extra: &[&str]) -> String {
    let mut child = Command::new(STRATA)
        .args(["serve", "--data-dir"])
        .arg(dir)
        .args(["--api", "127.0.0.1:0", "--nbd", "127.0.0.1:0", "--iscsi", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("strata serve started on {} although it must refuse it", dir.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "serve must fail: {err}");
    err
}
