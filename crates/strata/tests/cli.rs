//! The CLI and the REST API: output for people and scripts, and clear errors for bad input.

mod common;

use std::process::Command;

use common::{STRATA, Server, data_dir, qemu_io, run};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn bad_input_gets_one_line_and_a_non_zero_exit() {
    let (_tmp, dir) = data_dir();
    let server = Server::start(&dir);
    server.add_devices(1, "128M");

    let out = server.cli(&["volume", "show", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out).trim(), "error: No volume named 'nope'; `strata volume list` shows the volumes");

    let out = server.cli(&["volume", "create", "x", "--size", "12X"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("'12X' is not a size"), "{}", stderr(&out));

    let out = server.cli(&["volume", "create", "big", "--size", "1T"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).starts_with("error: ") && stderr(&out).lines().count() == 1, "{}", stderr(&out));

    let out = server.cli(&["volume", "create", "bad name", "--size", "4M"]);
    assert!(stderr(&out).contains("not valid"), "{}", stderr(&out));

    let out = server.cli(&["volume", "create", "r", "--size", "4M", "--layout", "raid7"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("raid7"), "{}", stderr(&out));

    let out = server.cli(&["device", "add", "/nonexistent/dev"]);
    assert!(stderr(&out).contains("cannot open /nonexistent/dev"), "{}", stderr(&out));

    // Missing token: no --token, no STRATA_TOKEN, no --data-dir.
    let out = Command::new(STRATA)
        .args(["--api", &server.api, "status"])
        .env_remove("STRATA_TOKEN")
        .env_remove("STRATA_DATA_DIR")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no API token"), "{}", stderr(&out));

    let out =
        Command::new(STRATA).args(["--api", &server.api, "--token", "wrong", "status"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("token is wrong"), "{}", stderr(&out));

    // Server down.
    let out = Command::new(STRATA)
        .args(["--api", "http://127.0.0.1:1", "--token", "t", "volume", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cannot reach the Strata API"), "{}", stderr(&out));

    for out in [&server.cli(&["volume", "show", "nope"]), &server.cli(&["device", "remove", "zzzz"])] {
        assert!(!stderr(out).contains("panicked") && !stderr(out).contains("RUST_BACKTRACE"));
    }
}

#[test]
fn malformed_config_file_names_the_line_and_key() {
    let (tmp, dir) = data_dir();
    let config = tmp.path().join("strata.toml");
    std::fs::write(&config, "api = \"127.0.0.1:0\"\nnbd = \"127.0.0.1:0\"\nlisten_port = 9\n").unwrap();
    let out = Command::new(STRATA)
        .args(["serve", "--data-dir", dir.to_str().unwrap(), "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(e.contains("line 3") && e.contains("listen_port"), "{e}");
}

#[test]
fn json_output_has_stable_field_names_and_tables_are_for_people() {
    let (_tmp, dir) = data_dir();
    let server = Server::start(&dir);
    server.add_devices(2, "128M");
    server.ok(&["volume", "create", "m", "--size", "8M", "--layout", "mirror"]);
    let volumes = server.json(&["volume", "list"]);
    let v = &volumes[0];
    for field in ["name", "id", "size_bytes", "layout", "state", "devices"] {
        assert!(!v[field].is_null(), "volume field {field} missing: {v}");
    }
    assert_eq!(
        (v["name"].as_str(), v["size_bytes"].as_u64(), v["layout"].as_str()),
        (Some("m"), Some(8 << 20), Some("mirror"))
    );
    let devices = server.json(&["device", "list"]);
    for field in ["id", "name", "size_bytes", "free_bytes", "state"] {
        assert!(!devices[0][field].is_null(), "device field {field} missing");
    }
    let table = server.ok(&["volume", "list"]);
    assert!(table.starts_with("NAME") && table.contains("8.0 MiB") && table.contains("mirror"), "{table}");
    let map = server.json(&["volume", "map", "m", "4K"]);
    assert_eq!(map["locations"].as_array().unwrap().len(), 2, "two copies: {map}");
    let status = server.json(&["status"]);
    assert_eq!(status["volumes"]["total"], 1);
    assert!(server.ok(&["status"]).contains("Volumes  1 (1 healthy"));
    // Deleting an exported volume is refused until the export goes.
    server.ok(&["export", "add", "m", "--nbd"]);
    let out = server.cli(&["export", "add", "m", "--nbd"]);
    assert!(stderr(&out).contains("already exported as 'm'"), "{}", stderr(&out));
    server.ok(&["volume", "create", "m2", "--size", "4M"]);
    let out = server.cli(&["export", "add", "m2", "--nbd", "--name", "m"]);
    assert!(stderr(&out).contains("taken by volume 'm'"), "{}", stderr(&out));
    let out = server.cli(&["export", "add", "m2"]);
    assert!(stderr(&out).contains("--nbd"), "{}", stderr(&out));
    let out = server.cli(&["volume", "delete", "m"]);
    assert!(stderr(&out).contains("remove the export first"), "{}", stderr(&out));
    server.ok(&["export", "remove", "m"]);
    server.ok(&["volume", "delete", "m"]);
    server.ok(&["volume", "delete", "m2"]);
    assert_eq!(server.json(&["volume", "list"]), serde_json::json!([]));
}

#[test]
fn an_added_device_is_usable_at_once_and_foreign_files_are_never_written() {
    let (tmp, dir) = data_dir();
    // A file that is not a Strata device, where the controller looks for devices.
    let devices = dir.join("devices");
    std::fs::create_dir_all(&devices).unwrap();
    let foreign = devices.join("not-mine.img");
    let content: Vec<u8> = (0..(64u32 << 20)).map(|i| (i % 253) as u8).collect();
    std::fs::write(&foreign, &content).unwrap();
    let config = tmp.path().join("serve.toml");
    std::fs::write(&config, format!("device_dirs = [{:?}]\n", tmp.path().to_str().unwrap())).unwrap();
    let server = Server::start_with(&dir, &["--config", config.to_str().unwrap()]);
    let scan = server.json(&["device", "scan"]);
    assert_eq!(scan[0]["state"], "unclaimed", "{scan}");
    assert!(std::fs::read(&foreign).unwrap() == content, "an unclaimed file was written");
    assert_eq!(server.json(&["device", "list"]), serde_json::json!([]));

    // Added from elsewhere, it is usable at once and found again after a restart.
    let outside = tmp.path().join("outside.img");
    server.ok(&["device", "add", outside.to_str().unwrap(), "--create", "128M"]);
    let uri = server.volume("now", "16M", "linear");
    qemu_io(&uri, &["write -P 0x61 0 1M"]);
    assert!(std::fs::read(&foreign).unwrap() == content, "an unclaimed file was written");
    let out = server.cli(&["device", "add", outside.to_str().unwrap()]);
    assert!(stderr(&out).contains("already belongs to pool"), "{}", stderr(&out));
    drop(server);
    let server = Server::start_with(&dir, &["--config", config.to_str().unwrap()]);
    qemu_io(&server.uri("now"), &["read -P 0x61 0 1M"]);
    let shown = server.json(&["device", "show", outside.to_str().unwrap()]);
    assert_eq!(shown["state"], "online");
}

#[test]
fn rest_api_authenticates_validates_and_documents_itself() {
    let (_tmp, dir) = data_dir();
    let server = Server::start(&dir);
    let token = server.token();
    let curl = |args: &[&str]| -> (String, String) {
        let mut all = vec!["-s", "-o", "/dev/stderr", "-w", "%{http_code}"];
        all.extend_from_slice(args);
        let out = Command::new("curl").args(&all).output().unwrap();
        (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let auth = format!("Authorization: Bearer {token}");
    let url = |p: &str| format!("{}{p}", server.api);

    assert_eq!(curl(&[&url("/health")]).0, "200");
    let (code, body) = curl(&[&url("/v1/volumes")]);
    assert_eq!(code, "401");
    assert!(body.contains("\"error\""), "{body}");
    assert_eq!(curl(&["-H", "Authorization: Bearer nope", &url("/metrics")]).0, "401");

    let post = |path: &str, body: &str| {
        curl(&["-H", &auth, "-H", "Content-Type: application/json", "-d", body, &url(path)])
    };
    for (path, body, expect) in [
        ("/v1/volumes", "{not json", "400"),
        ("/v1/volumes", "{\"name\":\"a\"}", "400"),
        ("/v1/volumes", "{\"name\":\"a\",\"size_bytes\":-4}", "400"),
        ("/v1/volumes", "{\"name\":\"a\",\"size_bytes\":4096,\"colour\":\"red\"}", "400"),
        ("/v1/volumes", "{\"name\":\"a\",\"size_bytes\":4194304}", "409"),
        ("/v1/devices", "{\"path\":\"relative/path\"}", "400"),
        ("/v1/devices", "[]", "400"),
        ("/v1/exports", "{\"volume\":\"nope\"}", "404"),
        ("/v1/exports", "{\"volume\":\"x\",\"allow\":[\"300.1.1.1\"]}", "400"),
    ] {
        let (code, answer) = post(path, body);
        assert_eq!(code, expect, "{path} {body}: {answer}");
        let v: serde_json::Value =
            serde_json::from_str(&answer).unwrap_or_else(|_| panic!("not JSON: {answer}"));
        assert!(v["error"].as_str().is_some_and(|m| !m.is_empty()), "{answer}");
    }
    let (code, answer) = curl(&["-H", &auth, &url("/v1/volumes/x/map?offset=abc")]);
    assert_eq!(code, "400", "{answer}");

    // The served document is the committed one, and every path in it is routed.
    let (code, doc) = curl(&["-H", &auth, &url("/openapi.json")]);
    assert_eq!(code, "200");
    let committed = include_str!("../../controller/openapi.json");
    assert_eq!(doc, committed);
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    for (path, methods) in doc["paths"].as_object().unwrap() {
        let concrete = path.replace("{id}", "zzzz").replace("{name}", "zzzz").replace("{volume}", "zzzz");
        for method in methods.as_object().unwrap().keys() {
            let (code, _) = curl(&["-X", &method.to_uppercase(), "-H", &auth, &url(&concrete)]);
            assert!(
                code != "405" && (code != "404" || path.contains('{')),
                "{method} {path} is not routed: {code}"
            );
        }
    }
}

#[test]
fn metrics_count_io_per_volume_device_and_frontend() {
    let (_tmp, dir) = data_dir();
    let server = Server::start(&dir);
    server.add_devices(2, "128M");
    let uri = server.volume("mx", "16M", "mirror");
    qemu_io(&uri, &["write -P 1 0 1M", "read -P 1 0 1M"]);
    let token = server.token();
    let metrics = run(
        "curl",
        &["-s", "-H", &format!("Authorization: Bearer {token}"), &format!("{}/metrics", server.api)],
    );
    let value = |needle: &str| -> f64 {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("no {needle} in\n{metrics}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(value("strata_io_bytes_total{scope=\"volume\",name=\"mx\",op=\"write\"}") >= f64::from(1 << 20));
    assert!(value("strata_io_bytes_total{scope=\"nbd\",name=\"mx\",op=\"read\"}") >= f64::from(1 << 20));
    let device = format!(
        "strata_io_bytes_total{{scope=\"device\",name=\"{}\",op=\"write\"}}",
        dir.join("devices/dev0").display()
    );
    assert!(value(&device) >= f64::from(1 << 20), "each mirror leg took the write");
    assert!(metrics.contains("strata_io_latency_seconds_bucket{"), "{metrics}");
    assert_eq!(value("strata_volume_state{name=\"mx\"}"), 0.0);
}
