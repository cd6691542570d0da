//! `strata`: `strata serve` runs a controller; every other subcommand is a client of a
//! controller's REST API. Tables for people, `--json` for scripts, and on failure one line
//! that says what to do, with a non-zero exit status.

mod client;
mod commands;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use strata_controller::ServeConfig;
use strata_controller::size::parse_size;

/// Strata storage controller.
#[derive(Parser)]
#[command(name = "strata", version, about, propagate_version = true)]
struct Cli {
    /// REST API: the URL a client talks to, or the address `serve` listens on
    /// [client default: http://127.0.0.1:7480, or the address a local controller wrote in
    /// its --data-dir]
    #[arg(long, env = "STRATA_API", global = true)]
    api: Option<String>,
    /// API token [default: read from the token file in --data-dir]
    #[arg(long, env = "STRATA_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Controller data directory: where `serve` keeps its state, and where a client finds
    /// the token and address of a local controller
    #[arg(long, env = "STRATA_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Print JSON objects with stable field names instead of tables
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a controller in the foreground (SIGTERM or Ctrl-C stops it cleanly)
    Serve(ServeArgs),
    /// Summary of the controller, its pool, volumes and exports
    Status,
    /// Physical devices of the pool
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Virtual volumes
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// How volumes are offered to hosts
    #[command(subcommand)]
    Export(ExportCommand),
}

#[derive(Args)]
struct ServeArgs {
    /// NBD listen address [default: 127.0.0.1:10809]
    #[arg(long, value_name = "ADDR")]
    nbd: Option<std::net::SocketAddr>,
    /// iSCSI portal: the address initiators log in to [default: 127.0.0.1:3260]
    #[arg(long, value_name = "ADDR")]
    iscsi: Option<std::net::SocketAddr>,
    /// TOML file with data_dir, api, nbd, iscsi, pool_name, direct_io, demo, device_dirs,
    /// iscsi_discovery_chap_user and _secret, and a [connections] table (total,
    /// per_address, api_idle_timeout_ms); flags override it
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Make (or reuse) four file devices in DIR [default: ./strata-demo], a volume `demo`
    /// and its NBD and iSCSI exports
    #[arg(long, value_name = "DIR", num_args = 0..=1)]
    demo: Option<Option<PathBuf>>,
    /// Name of the pool the first added device creates [default: strata]
    #[arg(long)]
    pool_name: Option<String>,
    /// Open device files with O_DIRECT
    #[arg(long)]
    direct_io: bool,
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// List the pool's devices
    List,
    /// Show one device (id, id prefix or path)
    Show {
        /// Device id, unique id prefix, or path
        id: String,
    },
    /// Add a file or block device to the pool (making the pool on the first one)
    Add {
        /// Path of the file or block device
        path: PathBuf,
        /// Create a sparse file of this size first (K, M, G, T suffixes)
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        create: Option<u64>,
        /// Failure domain (shelf, host, rack): copies are kept in different ones
        #[arg(long, value_name = "NAME")]
        fault_domain: Option<String>,
        /// Overwrite what the device holds: a filesystem, partition table or other
        /// signature, or data where Strata writes its labels (refused without it)
        #[arg(long)]
        force: bool,
    },
    /// Remove a device that no volume uses, wiping its labels
    Remove {
        /// Device id, unique id prefix, or path
        id: String,
    },
    /// Show what each known device file is, without writing anything
    Scan,
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Create a volume
    Create {
        /// Name (letters, digits, '.', '_', '-')
        name: String,
        /// Size hosts see (K, M, G, T suffixes)
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// linear, stripe, mirror, raid10, raid5 or raid6
        #[arg(long, default_value = "linear")]
        layout: String,
        /// Copies of each block (mirror, raid10)
        #[arg(long)]
        copies: Option<u32>,
        /// Devices a stripe or parity set spans
        #[arg(long)]
        width: Option<u32>,
        /// Chunk size (stripe, raid10, raid5, raid6)
        #[arg(long, value_parser = parse_size)]
        chunk: Option<u64>,
    },
    /// List volumes
    List,
    /// Show a volume and its tree
    Show {
        /// Volume name
        name: String,
    },
    /// Delete a volume (it must not be exported)
    Delete {
        /// Volume name
        name: String,
    },
    /// Show where a byte of a volume is stored, on every copy
    Map {
        /// Volume name
        name: String,
        /// Byte offset in the volume (K, M, G, T suffixes)
        #[arg(value_parser = parse_size)]
        offset: u64,
    },
}

#[derive(Subcommand)]
enum ExportCommand {
    /// Export a volume over NBD or iSCSI
    Add {
        /// Volume name
        volume: String,
        /// Serve it over NBD
        #[arg(long, conflicts_with = "iscsi")]
        nbd: bool,
        /// Serve it over iSCSI, as a LUN of a target
        #[arg(long)]
        iscsi: bool,
        /// NBD export name clients ask for [default: the volume name]
        #[arg(long, conflicts_with = "iscsi")]
        name: Option<String>,
        /// iSCSI target name [default: iqn.2026-11.io.strata:POOL.VOLUME, from their ids]
        #[arg(long, requires = "iscsi")]
        iqn: Option<String>,
        /// LUN of the volume within the target [default: 0]
        #[arg(long, requires = "iscsi")]
        lun: Option<u64>,
        /// Refuse writes
        #[arg(long)]
        read_only: bool,
        /// Who may use it (default: everyone): client addresses or networks for NBD,
        /// initiator names (IQNs) for iSCSI
        #[arg(long, value_name = "CLIENT", num_args = 1..)]
        allow: Vec<String>,
        /// iSCSI: open to every initiator, without --allow or CHAP, although the portal is
        /// not a loopback address (such an export is refused there otherwise)
        #[arg(long, requires = "iscsi", conflicts_with = "allow")]
        allow_any: bool,
        /// CHAP user initiators must log in as
        #[arg(long, requires_all = ["iscsi", "chap_secret"])]
        chap_user: Option<String>,
        /// CHAP secret (12 to 255 characters)
        #[arg(long, requires = "chap_user")]
        chap_secret: Option<String>,
        /// User the target answers mutual CHAP with
        #[arg(long, requires_all = ["chap_user", "mutual_secret"])]
        mutual_user: Option<String>,
        /// Mutual CHAP secret (12 to 255 characters)
        #[arg(long, requires = "mutual_user")]
        mutual_secret: Option<String>,
        /// Logical block size hosts see: 512 (emulated on 4 KiB volumes, for hosts such as
        /// VMware ESXi that need it), 1024, 2048 or the volume's [default: the volume's]
        #[arg(long, requires = "iscsi")]
        block_size: Option<u32>,
        /// Report removable medium (ejectable, as tgt's removable=1)
        #[arg(long, requires = "iscsi")]
        removable: bool,
    },
    /// List exports
    List,
    /// Stop exporting a volume (over every protocol unless one is given)
    Remove {
        /// Volume name
        volume: String,
        /// Only the NBD export
        #[arg(long, conflicts_with = "iscsi")]
        nbd: bool,
        /// Only the iSCSI export
        #[arg(long)]
        iscsi: bool,
    },
}

fn main() -> ExitCode {
    // A bug must still end in one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal error ({info}); please report it");
    }));
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(ref args) => {
            init_logging();
            keep_large_buffers();
            serve_config(&cli, args).and_then(|config| runtime.block_on(strata_controller::serve(config)))
        }
        _ => runtime.block_on(commands::run(&cli)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Makes IO buffers of up to 32 MiB come from the heap, where freed ones are reused,
/// instead of being mapped afresh: glibc maps allocations over 128 KiB until it has seen
/// such a block freed, so in a new process every 1 MiB read paid page faults and the
/// kernel's zeroing of 256 pages, which halved 1 MiB read throughput (NBD and iSCSI).
fn keep_large_buffers() {
    // SAFETY: mallopt only changes allocator tunables; it is called before any thread
    // that allocates is started.
    let set = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20) == 1
    };
    if !set {
        tracing::warn!("cannot tune the memory allocator; large reads may be slower");
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// The serve settings: the config file, then the flags over it.
fn serve_config(cli: &Cli, args: &ServeArgs) -> Result<ServeConfig, String> {
    let file = match &args.config {
        Some(path) => ServeConfig::load(path)?,
        None => ServeConfig::default(),
    };
    let api = match &cli.api {
        Some(text) => {
            let addr = text.trim_start_matches("http://").trim_end_matches('/');
            Some(
                addr.parse()
                    .map_err(|_| format!("--api '{text}' is not a listen address such as 127.0.0.1:7480"))?,
            )
        }
        None => None,
    };
    let demo_dir = args.demo.clone().flatten();
    let flags = ServeConfig {
        data_dir: cli.data_dir.clone().or(demo_dir),
        api,
        nbd: args.nbd,
        iscsi: args.iscsi,
        pool_name: args.pool_name.clone(),
        direct_io: args.direct_io.then_some(true),
        demo: args.demo.is_some().then_some(true),
        connections: None,
        device_dirs: None,
        iscsi_discovery_chap_user: None,
        iscsi_discovery_chap_secret: None,
    };
    Ok(file.overridden_by(flags))
}
