//! iSCSI target (RFC 7143) over `strata-scsi` logical units.
//!
//! ```text
//!   accept ─▶ login: security (None | CHAP | mutual CHAP) ─▶ operational negotiation
//!          ─▶ full feature phase: SCSI Command / Data-Out / R2T / Data-In / SCSI Response,
//!             NOP, Task Management, Text (SendTargets), Logout
//! ```
//!
//! Each connection runs on its own thread with a single-threaded runtime, as the NBD
//! server's do: a command is decoded, executed against its logical unit and answered on
//! the thread that read it. Sessions have one connection each (MaxConnections=1) and
//! ErrorRecoveryLevel 0: any protocol error ends the connection, and the session with it;
//! the initiator logs in again, reinstating the session by its ISID.

mod chap;
mod connection;
mod login;
pub mod negotiate;
pub mod pdu;
mod server;
mod session;
pub mod text;

use std::sync::Arc;

pub use login::FAILED_LOGIN_DELAY;
pub use server::IscsiServer;
use strata_scsi::{LogicalUnit, LunMap};

/// A user name and secret for CHAP.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// CHAP_N.
    pub user: String,
    /// The shared secret.
    pub secret: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("user", &self.user).finish_non_exhaustive()
    }
}

/// A target as one initiator sees it: its LUNs already masked for that initiator.
#[derive(Clone)]
pub struct TargetNode {
    /// The target's IQN.
    pub name: String,
    /// TargetAlias sent at login, if any.
    pub alias: Option<String>,
    /// The logical units this initiator may use, by LUN.
    pub luns: LunMap,
    /// Every logical unit of the target, masked or not: a target reset reaches them all.
    pub every_lu: Vec<Arc<LogicalUnit>>,
    /// Credentials the initiator must prove (CHAP), if any.
    pub chap: Option<Credentials>,
    /// Credentials the target answers mutual CHAP with, if any.
    pub mutual: Option<Credentials>,
}

/// Why a login to a target is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No target of that name.
    NotFound,
    /// The target exists but none of its LUNs is open to this initiator.
    NotAllowed,
}

/// Why a login was refused, as the controller counts it. Each is answered only after
/// [`FAILED_LOGIN_DELAY`], so guessing secrets or names costs a second a try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginFailure {
    /// CHAP was not offered, or the user or response was wrong (discovery CHAP too).
    Authentication,
    /// The initiator may use no LUN of the target.
    NotAllowed,
    /// No target of that name.
    NoSuchTarget,
}

impl LoginFailure {
    /// The name used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            LoginFailure::Authentication => "authentication",
            LoginFailure::NotAllowed => "not_allowed",
            LoginFailure::NoSuchTarget => "no_such_target",
        }
    }
}

/// Where the server finds its targets; the controller keeps them, with allow-lists.
pub trait Targets: Send + Sync + 'static {
    /// `target` as `initiator` may use it.
    fn lookup(&self, target: &str, initiator: &str) -> Result<Arc<TargetNode>, Refusal>;

    /// Every target `initiator` may use, for SendTargets.
    fn list(&self, initiator: &str) -> Vec<Arc<TargetNode>>;

    /// A number that changes whenever any target or LUN changes, so sessions know to look
    /// their target up again.
    fn generation(&self) -> u64;

    /// The credentials a discovery session must prove with CHAP before SendTargets is
    /// answered; None leaves discovery open (it still lists only the targets an initiator
    /// may use).
    fn discovery_chap(&self) -> Option<Credentials> {
        None
    }

    /// Told of every refused login (after its delay), so it can be counted.
    fn login_failed(&self, _failure: LoginFailure) {}

    /// How long a refused login waits before its answer goes out; only the connection
    /// that failed waits (each has its own thread).
    fn failed_login_delay(&self) -> std::time::Duration {
        FAILED_LOGIN_DELAY
    }
}
