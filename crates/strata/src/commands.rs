//! The client subcommands: one REST call each, printed as a table or as JSON.

use reqwest::Method;
use serde_json::{Value, json};
use strata_controller::size::format_size;

use crate::client::ApiClient;
use crate::{Cli, Command, DeviceCommand, ExportCommand, VolumeCommand};

/// Runs a client subcommand.
pub async fn run(cli: &Cli) -> Result<(), String> {
    let api = ApiClient::new(cli.api.as_deref(), cli.token.as_deref(), cli.data_dir.as_deref())?;
    let out = Output { json: cli.json };
    match &cli.command {
        Command::Serve(_) => unreachable!("serve is not a client command"),
        Command::Status => {
            let s = api.call(Method::GET, "/v1/status", None).await?;
            // Missing devices are reported by id; their paths tell an operator where to look.
            let devices = api.call(Method::GET, "/v1/devices", None).await.unwrap_or_default();
            out.object(&s, |s| {
                let pool = match &s["pool"] {
                    Value::Null => "none yet (add a device)".to_string(),
                    p => format!("{} ({}), generation {}", text(&p["name"]), text(&p["id"]), p["generation"]),
                };
                println!("Strata {}  up {}s", text(&s["version"]), s["uptime_seconds"]);
                println!("API      {}", text(&s["api"]));
                println!("NBD      {}  ({} connections)", text(&s["nbd"]), s["nbd_connections"]);
                println!("iSCSI    {}  ({} sessions)", text(&s["iscsi"]), s["iscsi_sessions"]);
                println!("Pool     {pool}");
                let d = &s["devices"];
                println!("Devices  {} ({} online, {} missing)", d["total"], d["online"], d["missing"]);
                let v = &s["volumes"];
                println!(
                    "Volumes  {} ({} healthy, {} degraded, {} failed)",
                    v["total"], v["healthy"], v["degraded"], v["failed"]
                );
                println!("Exports  {}", s["exports"]);
                let startup = &s["startup"];
                for (key, what) in [
                    ("damaged_devices", "damaged device, left untouched"),
                    ("foreign_devices", "device of another pool, left untouched"),
                    ("failed_volumes", "volume not served"),
                ] {
                    for item in startup[key].as_array().into_iter().flatten() {
                        let name = item["device"].as_str().or(item["volume"].as_str()).unwrap_or("?");
                        let why = match item["reason"].as_str() {
                            Some(reason) => reason.to_string(),
                            None => format!("pool {}", text(&item["pool"])),
                        };
                        println!("Warning  {what}: {name} ({why})");
                    }
                }
                for id in startup["missing_devices"].as_array().into_iter().flatten() {
                    match devices.as_array().into_iter().flatten().find(|d| d["id"] == *id) {
                        Some(d) => println!("Warning  device {} ({}) is missing", text(id), text(&d["name"])),
                        None => println!("Warning  device {} is missing", text(id)),
                    }
                }
            });
        }
        Command::Device(command) => device(&api, &out, command).await?,
        Command::Volume(command) => volume(&api, &out, command).await?,
        Command::Export(command) => export(&api, &out, command).await?,
    }
    Ok(())
}

async fn device(api: &ApiClient, out: &Output, command: &DeviceCommand) -> Result<(), String> {
    let columns: &[(&str, Field)] = &[
        ("ID", Field::Id("id")),
        ("PATH", Field::Text("name")),
        ("SIZE", Field::Size("size_bytes")),
        ("FREE", Field::Size("free_bytes")),
        ("DOMAIN", Field::Text("fault_domain")),
        ("STATE", Field::Text("state")),
    ];
    match command {
        DeviceCommand::List => out.table(&api.call(Method::GET, "/v1/devices", None).await?, columns),
        DeviceCommand::Show { id } => out.object(
            &api.call(Method::GET, &format!("/v1/devices/{}", segment(id)), None).await?,
            print_fields,
        ),
        DeviceCommand::Add { path, create, fault_domain, force } => {
            let path = std::path::absolute(path).map_err(|e| format!("bad path {}: {e}", path.display()))?;
            let body = json!({
                "path": path, "create_size_bytes": create, "fault_domain": fault_domain, "force": force,
            });
            let d = api.call(Method::POST, "/v1/devices", Some(body)).await?;
            out.object(&d, |d| {
                println!("Added {} as device {}", text(&d["name"]), text(&d["id"]));
                d["warnings"].as_array().into_iter().flatten().for_each(|w| println!("Warning  {}", text(w)));
            });
        }
        DeviceCommand::Remove { id } => {
            api.call(Method::DELETE, &format!("/v1/devices/{}", segment(id)), None).await?;
            out.done(json!({ "removed": id }), &format!("Removed device {id}"));
        }
        DeviceCommand::Scan => out.table(
            &api.call(Method::POST, "/v1/devices/scan", None).await?,
            &[
                ("PATH", Field::Text("path")),
                ("STATE", Field::Text("state")),
                ("DETAIL", Field::Text("detail")),
            ],
        ),
    }
    Ok(())
}

async fn volume(api: &ApiClient, out: &Output, command: &VolumeCommand) -> Result<(), String> {
    match command {
        VolumeCommand::Create { name, size, layout, copies, width, chunk } => {
            let body = json!({
                "name": name, "size_bytes": size, "layout": layout,
                "copies": copies, "width": width, "chunk_bytes": chunk,
            });
            let v = api.call(Method::POST, "/v1/volumes", Some(body)).await?;
            out.object(&v, |v| {
                println!(
                    "Created volume {} ({}, {})",
                    text(&v["name"]),
                    format_size(size_of(&v["size_bytes"])),
                    text(&v["layout"])
                )
            });
        }
        VolumeCommand::List => out.table(
            &api.call(Method::GET, "/v1/volumes", None).await?,
            &[
                ("NAME", Field::Text("name")),
                ("SIZE", Field::Size("size_bytes")),
                ("LAYOUT", Field::Text("layout")),
                ("STATE", Field::Text("state")),
                ("DEVICES", Field::Count("devices")),
                ("ID", Field::Id("id")),
            ],
        ),
        VolumeCommand::Show { name } => out.object(
            &api.call(Method::GET, &format!("/v1/volumes/{}", segment(name)), None).await?,
            print_fields,
        ),
        VolumeCommand::Delete { name } => {
            api.call(Method::DELETE, &format!("/v1/volumes/{}", segment(name)), None).await?;
            out.done(json!({ "deleted": name }), &format!("Deleted volume {name}"));
        }
        VolumeCommand::Map { name, offset } => {
            let m = api
                .call(Method::GET, &format!("/v1/volumes/{}/map?offset={offset}", segment(name)), None)
                .await?;
            out.object(&m, |m| {
                println!("Byte {offset} of volume {name} is stored at:");
                for l in m["locations"].as_array().into_iter().flatten() {
                    println!(
                        "  device {}  offset {}  ({})",
                        text(&l["device"]),
                        l["device_offset"],
                        role(&l["role"])
                    );
                }
            });
        }
    }
    Ok(())
}

async fn export(api: &ApiClient, out: &Output, command: &ExportCommand) -> Result<(), String> {
    match command {
        ExportCommand::Add {
            volume,
            nbd,
            iscsi,
            name,
            iqn,
            lun,
            read_only,
            allow,
            allow_any,
            chap_user,
            chap_secret,
            mutual_user,
            mutual_secret,
            block_size,
            removable,
        } => {
            let credentials = |user: &Option<String>, secret: &Option<String>| {
                user.as_ref().map(|u| json!({ "user": u, "secret": secret.clone().unwrap_or_default() }))
            };
            let body = match (nbd, iscsi) {
                (true, false) => {
                    json!({ "volume": volume, "protocol": "nbd", "name": name, "read_only": read_only, "allow": allow })
                }
                (false, true) => json!({
                    "volume": volume,
                    "protocol": "iscsi",
                    "name": iqn,
                    "lun": lun,
                    "read_only": read_only,
                    "allow": allow,
                    "allow_any": allow_any,
                    "chap": credentials(chap_user, chap_secret),
                    "mutual_chap": credentials(mutual_user, mutual_secret),
                    "block_size": block_size,
                    "removable": removable,
                }),
                _ => return Err("choose how to export the volume: --nbd or --iscsi".into()),
            };
            let e = api.call(Method::POST, "/v1/exports", Some(body)).await?;
            out.object(&e, |e| println!("Exported volume {} as {}", text(&e["volume"]), text(&e["uri"])));
        }
        ExportCommand::List => out.table(
            &api.call(Method::GET, "/v1/exports", None).await?,
            &[
                ("VOLUME", Field::Text("volume")),
                ("PROTOCOL", Field::Text("protocol")),
                ("NAME", Field::Text("name")),
                ("LUN", Field::Text("lun")),
                ("PORTAL", Field::Text("portal")),
                ("URI", Field::Text("uri")),
                ("SERVED", Field::Text("served")),
                ("READ-ONLY", Field::Text("read_only")),
                ("ALLOW", Field::List("allow")),
            ],
        ),
        ExportCommand::Remove { volume, nbd, iscsi } => {
            let only = if *nbd {
                "?protocol=nbd"
            } else if *iscsi {
                "?protocol=iscsi"
            } else {
                ""
            };
            api.call(Method::DELETE, &format!("/v1/exports/{}{only}", segment(volume)), None).await?;
            out.done(json!({ "removed": volume }), &format!("Stopped exporting volume {volume}"));
        }
    }
    Ok(())
}

/// A path segment with the characters URLs reserve escaped.
fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn size_of(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn role(v: &Value) -> String {
    match v {
        Value::Object(map) => map.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", "),
        other => text(other),
    }
}

/// How a table column shows a field.
enum Field {
    Text(&'static str),
    Id(&'static str),
    Size(&'static str),
    Count(&'static str),
    List(&'static str),
}

impl Field {
    fn show(&self, row: &Value) -> String {
        match *self {
            Field::Text(k) => text(&row[k]),
            Field::Id(k) => text(&row[k]).chars().take(8).collect(),
            Field::Size(k) => format_size(size_of(&row[k])),
            Field::Count(k) => row[k].as_array().map_or(0, Vec::len).to_string(),
            Field::List(k) => {
                let items: Vec<String> = row[k].as_array().into_iter().flatten().map(text).collect();
                if items.is_empty() { "any".into() } else { items.join(",") }
            }
        }
    }
}

fn print_fields(v: &Value) {
    if let Value::Object(map) = v {
        for (k, value) in map {
            let shown = match value {
                Value::Object(_) | Value::Array(_) => serde_json::to_string_pretty(value).unwrap_or_default(),
                other => text(other),
            };
            println!("{k:<16} {shown}");
        }
    }
}

struct Output {
    json: bool,
}

impl Output {
    fn object(&self, value: &Value, human: impl FnOnce(&Value)) {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
        } else {
            human(value);
        }
    }

    fn done(&self, value: Value, message: &str) {
        self.object(&value, |_| println!("{message}"));
    }

    fn table(&self, rows: &Value, columns: &[(&str, Field)]) {
        if self.json {
            println!("{}", serde_json::to_string_pretty(rows).unwrap_or_default());
            return;
        }
        let rows = rows.as_array().cloned().unwrap_or_default();
        let cells: Vec<Vec<String>> =
            rows.iter().map(|r| columns.iter().map(|(_, f)| f.show(r)).collect()).collect();
        let widths: Vec<usize> = columns
            .iter()
            .enumerate()
            .map(|(i, (h, _))| cells.iter().map(|c| c[i].chars().count()).chain([h.len()]).max().unwrap_or(0))
            .collect();
        let line = |items: Vec<String>| {
            let parts: Vec<String> = items.iter().zip(&widths).map(|(s, w)| format!("{s:<w$}")).collect();
            println!("{}", parts.join("  ").trim_end());
        };
        line(columns.iter().map(|(h, _)| h.to_string()).collect());
        for row in cells {
            line(row);
        }
    }
}
