//! `strata serve`: opens the controller, listens for the REST API, NBD clients and iSCSI
//! initiators, and on
//! SIGTERM or SIGINT stops accepting, lets every connection finish what it accepted,
//! flushes and closes every volume, and releases the devices.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use strata_block::FileOptions;
use strata_iscsi::IscsiServer;
use strata_nbd::NbdServer;
use strata_net::budget::{Budget, CONTROLLER_BUDGET};
use strata_net::listener::Listener;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{ApiState, router};
use crate::config::{
    DEFAULT_API, DEFAULT_DATA_DIR, DEFAULT_DEMO_DIR, DEFAULT_ISCSI, DEFAULT_NBD, ServeConfig,
};
use crate::controller::{Controller, TOKEN_FILE};
use crate::data_dir::{create_private_dir, load_or_create_token, write_private};
use crate::metrics::{Frontends, Protocol};

/// The file where a running controller writes the addresses it listens on.
pub const ENDPOINTS_FILE: &str = "endpoints.json";

async fn listen(addr: SocketAddr, what: &str, flag: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen for {what} on {addr}: {e}; choose another address with {flag}"))
}

/// Runs a controller until SIGTERM or SIGINT.
pub async fn serve(config: ServeConfig) -> Result<(), String> {
    let started = Instant::now();
    let limits = config.connections.clone().unwrap_or_default();
    let (caps, api_idle_timeout) = (limits.caps()?, limits.api_idle_timeout()?);
    raise_file_limit(caps);
    let demo = config.demo.unwrap_or(false);
    let discovery_chap = config.discovery_chap()?;
    let data_dir = config
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(if demo { DEFAULT_DEMO_DIR } else { DEFAULT_DATA_DIR }));
    // Private to this user (0700), and refused if another user owns it or may write it.
    create_private_dir(&data_dir).map_err(|e| e.to_string())?;
    let data_dir = std::path::absolute(&data_dir).map_err(|e| e.to_string())?;
    let token = load_or_create_token(&data_dir).map_err(|e| e.to_string())?;
    let file_options = FileOptions { direct: config.direct_io.unwrap_or(false), ..FileOptions::default() };
    let pool_name = config.pool_name.clone().unwrap_or_else(|| "strata".into());
    let device_dirs = config.device_dirs.clone().unwrap_or_default();
    let controller = Controller::open(&data_dir, file_options, pool_name, &device_dirs).await?;
    if demo {
        controller.ensure_demo().await.map_err(|e| format!("cannot set up the demo: {}", e.message))?;
    }

    let api_listener =
        listen(config.api.unwrap_or_else(|| DEFAULT_API.parse().expect("valid")), "the API", "--api").await?;
    let nbd_listener =
        listen(config.nbd.unwrap_or_else(|| DEFAULT_NBD.parse().expect("valid")), "NBD", "--nbd").await?;
    let iscsi_listener =
        listen(config.iscsi.unwrap_or_else(|| DEFAULT_ISCSI.parse().expect("valid")), "iSCSI", "--iscsi")
            .await?;
    let api_addr = api_listener.local_addr().map_err(|e| e.to_string())?;
    let nbd_addr = nbd_listener.local_addr().map_err(|e| e.to_string())?;
    let iscsi_addr = iscsi_listener.local_addr().map_err(|e| e.to_string())?;
    let _ = controller.nbd_addr.set(nbd_addr);
    let _ = controller.iscsi_addr.set(iscsi_addr);
    // Before the target accepts anyone: exports open to all need a loopback portal.
    controller.withhold_open_exports(iscsi_addr);
    if let Some(chap) = discovery_chap {
        let _ = controller.discovery_chap.set(chap);
    }
    let endpoints = serde_json::json!({
        "api": format!("http://{api_addr}"),
        "nbd": nbd_addr.to_string(),
        "iscsi": iscsi_addr.to_string(),
    });
    let endpoints_path = data_dir.join(ENDPOINTS_FILE);
    write_private(&endpoints_path, &serde_json::to_vec_pretty(&endpoints).expect("json"))
        .map_err(|e| format!("cannot write {}: {e}", endpoints_path.display()))?;

    let (stop, stopped) = watch::channel(false);
    // One byte budget for every connection of both frontends (strata_net::budget).
    let budget = Budget::new(CONTROLLER_BUDGET);
    let nbd = NbdServer::with_budget(controller.clone(), budget.clone());
    let nbd_listener = Listener::new(nbd_listener, "NBD", caps);
    let iscsi_listener = Listener::new(iscsi_listener, "iSCSI", caps);
    let api_listener = Listener::new(api_listener, "API", caps);
    let frontends = Frontends {
        budget: budget.clone(),
        listeners: vec![
            (Protocol::nbd, nbd_listener.open()),
            (Protocol::iscsi, iscsi_listener.open()),
            (Protocol::api, api_listener.open()),
        ],
    };
    let nbd_task = tokio::spawn(nbd.run(nbd_listener, stopped.clone()));
    let iscsi = IscsiServer::with_budget(controller.clone(), budget);
    let iscsi_task = tokio::spawn(iscsi.clone().run(iscsi_listener, stopped.clone()));
    let state = Arc::new(ApiState {
        controller: controller.clone(),
        token,
        iscsi,
        api_addr: format!("http://{api_addr}"),
        started,
        body_timeout: api_idle_timeout,
        frontends,
    });
    let api_task =
        tokio::spawn(crate::http::serve(api_listener, router(state), api_idle_timeout, stopped.clone()));

    tracing::info!(api = %api_addr, nbd = %nbd_addr, iscsi = %iscsi_addr, data_dir = %data_dir.display(), "controller running");
    println!("Strata controller running (data in {})", data_dir.display());
    println!("  REST API  http://{api_addr}   (token in {})", data_dir.join(TOKEN_FILE).display());
    println!("  NBD       {nbd_addr}");
    println!("  iSCSI     {iscsi_addr}");
    for export in controller.exports() {
        if let Some(uri) = &export.uri {
            println!("  export of volume {} over {}: {uri}", export.record.volume, export.record.protocol);
        }
    }
    if demo {
        println!("Try:");
        println!("  qemu-img info nbd://{nbd_addr}/demo");
        println!("  nbdinfo nbd://{nbd_addr}/demo");
        if let Some(iscsi) =
            controller.exports().into_iter().find(|e| e.record.protocol == "iscsi" && e.uri.is_some())
        {
            println!("  iscsi-inq {}", iscsi.uri.unwrap_or_default());
        }
        println!("  strata --api http://{api_addr} --data-dir {} volume list", data_dir.display());
    }

    wait_for_signal().await;
    tracing::info!("shutting down: no new connections; finishing requests in flight");
    let _ = stop.send(true);
    let _ = nbd_task.await;
    let _ = iscsi_task.await;
    if let Err(e) = api_task.await {
        tracing::error!(error = %e, "API task failed");
    }
    controller.shut_down().await;
    let _ = std::fs::remove_file(&endpoints_path);
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Raises the soft limit on open files to the hard limit: every connection and device
/// file is a file descriptor, and the usual soft limit (1024) is below what the listeners'
/// caps let clients open, so without this a flood on one listener (EMFILE) stops the others
/// from accepting.
fn raise_file_limit(caps: strata_net::listener::Caps) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    // Linux has no unlimited number of files: an unlimited hard limit is kept as it is.
    let raised = match limit.maximum {
        Some(hard) if limit.current != Some(hard) => {
            match setrlimit(Resource::Nofile, rustix::process::Rlimit { current: Some(hard), ..limit }) {
                Ok(()) => Some(hard),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot raise the limit on open files to the hard limit");
                    limit.current
                }
            }
        }
        _ => limit.current,
    };
    let soft = raised.map_or_else(|| "unlimited".to_string(), |n| n.to_string());
    let hard = limit.maximum.map_or_else(|| "unlimited".to_string(), |n| n.to_string());
    tracing::info!(soft = %soft, hard = %hard, "limit on open files");
    // Each NBD or iSCSI connection holds four descriptors (its socket and its thread's
    // runtime, measured), an API connection one; then devices, logs and the like.
    let wanted = (4 + 4 + 1) * caps.total as u64 + 256;
    if raised.is_some_and(|n| n < wanted) {
        tracing::warn!(
            soft = %soft,
            wanted,
            "the limit on open files is below what the connection caps allow; raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower [connections] total"
        );
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
