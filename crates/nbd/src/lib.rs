//! NBD server: serves Strata volumes to qemu, libnbd (nbdcopy, nbdinfo, fio) and the Linux
//! kernel client over the NBD protocol (`NetworkBlockDevice/nbd` `doc/proto.md`).
//!
//! ```text
//!   accept ─▶ handshake (fixed newstyle options: GO/INFO/LIST/EXPORT_NAME,
//!             STRUCTURED_REPLY, SET/LIST_META_CONTEXT base:allocation)
//!          ─▶ transmission: requests decoded from one read buffer, run at once on the
//!             connection's own task, replies written in completion order by cookie
//! ```
//!
//! A request never leaves the task that read it from the socket: on this kind of machine
//! a hand-off between threads costs far more than a 4 KiB read from memory.

mod handshake;
pub mod proto;
mod server;
mod transmission;

use std::net::IpAddr;
use std::sync::Arc;

use strata_block::BlockIo;

pub use server::NbdServer;

/// A block device offered to NBD clients under a name.
#[derive(Clone)]
pub struct Export {
    /// Name clients ask for.
    pub name: String,
    /// Free text shown by `nbdinfo --list`.
    pub description: String,
    /// What reads and writes go to.
    pub device: Arc<dyn BlockIo>,
    /// Refuse writes, trims and zeroing with EPERM.
    pub read_only: bool,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export").field("name", &self.name).field("read_only", &self.read_only).finish()
    }
}

/// Where the server finds its exports; the controller keeps them, with their allow-lists.
pub trait Exports: Send + Sync + 'static {
    /// The export `name` if `client` may use it. The empty name means the default export.
    /// An export a client may not use is reported as unknown: masking hides it.
    fn lookup(&self, name: &str, client: IpAddr) -> Option<Export>;

    /// Every export `client` may use, for `NBD_OPT_LIST`.
    fn list(&self, client: IpAddr) -> Vec<Export>;
}
