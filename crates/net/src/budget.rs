//! The byte budget of commands in flight and unsent replies, per connection and per
//! controller.
//!
//! A frontend charges every command it accepts with the bytes it will hold: a read's
//! buffer until its data has gone out on the socket, a write's payload until it is done.
//! When a charge does not fit, the connection stops reading new commands until replies
//! have gone out (as LIO's command window does), so a client that never reads its replies
//! holds at most its connection's budget, and all clients together at most the
//! controller's plus one [`FLOOR`] each.
//!
//! ```text
//!   connection: [ FLOOR (its own) | the rest, up to CONNECTION_BUDGET ]
//!                                    └─ charged to the controller's Budget,
//!                                       CONTROLLER_BUDGET shared by every connection
//! ```
//!
//! The first [`FLOOR`] bytes of every connection are its own, so small IO (a 4 KiB read)
//! keeps flowing while clients that do not read hold the shared budget. A command that
//! alone is larger than what is left runs when its connection holds nothing (and, for the
//! shared part, when the controller's budget is free): a legal 32 MiB read never waits
//! forever.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// Bytes one connection may hold in commands in flight and unsent replies: sixteen 1 MiB
/// reads, more than a host's queue needs to keep a link busy.
pub const CONNECTION_BUDGET: u64 = 16 << 20;
/// Bytes all connections together may hold beyond their floors: bounds the memory of a
/// controller whatever its clients do (the floors add 1 MiB per connection).
pub const CONTROLLER_BUDGET: u64 = 128 << 20;
/// Bytes of every connection not charged to the controller's budget, so its small IO goes
/// on while others hold the shared budget.
pub const FLOOR: u64 = 1 << 20;
/// How long a reply may wait for a client that does not read (no byte taken by the
/// socket): then the connection is dropped, and what it held is released. As long as an
/// initiator's keep-alive, so a peer that stopped reading is treated as one that is gone.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long replies may still take once the server shuts down (or a connection closes):
/// every accepted command still completes, but a client that does not read cannot hold
/// up SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How long a connection waiting for the shared budget sleeps before looking again, in
/// case a release raced with its going to sleep.
const RECHECK: Duration = Duration::from_millis(20);

/// The controller's shared budget: bytes held by every connection beyond its floor.
#[derive(Debug)]
pub struct Budget {
    capacity: u64,
    used: AtomicU64,
    /// Someone waits for room: releases wake it.
    waiting: AtomicBool,
    freed: Notify,
}

impl Budget {
    /// A budget of `capacity` bytes.
    pub fn new(capacity: u64) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            used: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            freed: Notify::new(),
        })
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// The budget's size.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Takes `bytes` if they fit, or if nothing is held (so a charge larger than the whole
    /// budget still runs, alone).
    fn try_take(&self, bytes: u64) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            if used != 0 && used + bytes > self.capacity {
                self.waiting.store(true, Ordering::Relaxed);
                return false;
            }
            match self.used.compare_exchange_weak(used, used + bytes, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => used = now,
            }
        }
    }

    fn release(&self, bytes: u64) {
        let before = self.used.fetch_sub(bytes, Ordering::AcqRel);
        debug_assert!(before >= bytes, "released more than was taken");
        if self.waiting.swap(false, Ordering::AcqRel) {
            self.freed.notify_waiters();
        }
    }

    /// Returns once some bytes may have been released (or after a short while anyway).
    pub async fn changed(&self) {
        let _ = tokio::time::timeout(RECHECK, self.freed.notified()).await;
    }
}

/// Why a charge did not fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    /// The connection's own budget: its replies going out will make room.
    Connection,
    /// The controller's: other connections must release first ([`Budget::changed`]).
    Controller,
}

/// One connection's share: owned by the connection's task, not shared. Dropping it gives
/// back to the controller whatever it still holds.
#[derive(Debug)]
pub struct Account {
    limit: u64,
    held: u64,
    controller: Arc<Budget>,
}

impl Account {
    /// An account of `limit` bytes drawing beyond [`FLOOR`] on `controller`.
    pub fn new(limit: u64, controller: Arc<Budget>) -> Self {
        Self { limit, held: 0, controller }
    }

    /// An account with the default per-connection budget.
    pub fn connection(controller: &Arc<Budget>) -> Self {
        Self::new(CONNECTION_BUDGET, controller.clone())
    }

    /// Bytes the connection holds.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// The controller's budget this account draws on.
    pub fn controller(&self) -> &Arc<Budget> {
        &self.controller
    }

    /// Charges `bytes`, or says which budget is full. A connection that holds nothing may
    /// always take a charge larger than its limit.
    pub fn try_charge(&mut self, bytes: u64) -> Result<(), Full> {
        if self.held != 0 && self.held + bytes > self.limit {
            return Err(Full::Connection);
        }
        let shared = Self::beyond_floor(self.held + bytes) - Self::beyond_floor(self.held);
        if shared > 0 && !self.controller.try_take(shared) {
            return Err(Full::Controller);
        }
        self.held += bytes;
        Ok(())
    }

    /// Gives back `bytes` charged earlier.
    pub fn release(&mut self, bytes: u64) {
        debug_assert!(bytes <= self.held, "released more than was charged");
        let bytes = bytes.min(self.held);
        let shared = Self::beyond_floor(self.held) - Self::beyond_floor(self.held - bytes);
        self.held -= bytes;
        if shared > 0 {
            self.controller.release(shared);
        }
    }

    fn beyond_floor(held: u64) -> u64 {
        held.saturating_sub(FLOOR)
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        let held = self.held;
        self.release(held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_connection_stops_at_its_limit_and_resumes_after_a_release() {
        let controller = Budget::new(CONTROLLER_BUDGET);
        let mut account = Account::new(16 * MIB, controller.clone());
        assert_eq!(account.try_charge(8 * MIB), Ok(()));
        assert_eq!(account.try_charge(8 * MIB), Ok(()));
        assert_eq!(account.try_charge(4096), Err(Full::Connection));
        account.release(8 * MIB);
        assert_eq!(account.try_charge(4096), Ok(()));
        assert_eq!(account.held(), 8 * MIB + 4096);
        assert_eq!(controller.used(), 7 * MIB + 4096);
    }

    #[test]
    fn a_command_larger_than_the_budget_runs_alone() {
        let controller = Budget::new(8 * MIB);
        let mut account = Account::new(4 * MIB, controller.clone());
        assert_eq!(account.try_charge(32 * MIB), Ok(()), "nothing held: the whole budget is its");
        assert_eq!(account.try_charge(4096), Err(Full::Connection));
        let mut other = Account::new(4 * MIB, controller.clone());
        assert_eq!(other.try_charge(4 * MIB), Err(Full::Controller));
        account.release(32 * MIB);
        assert_eq!(controller.used(), 0);
        assert_eq!(other.try_charge(4 * MIB), Ok(()));
    }

    #[test]
    fn the_floor_is_not_charged_to_the_controller() {
        let controller = Budget::new(2 * MIB);
        let mut greedy = Account::new(16 * MIB, controller.clone());
        assert_eq!(greedy.try_charge(3 * MIB), Ok(()));
        assert_eq!(controller.used(), 2 * MIB);
        assert_eq!(greedy.try_charge(MIB), Err(Full::Controller));
        // Another connection's small IO still runs within its floor, and no further.
        let mut small = Account::new(16 * MIB, controller.clone());
        for _ in 0..256 {
            assert_eq!(small.try_charge(4096), Ok(()));
        }
        assert_eq!(small.try_charge(4096), Err(Full::Controller));
        assert_eq!(controller.used(), 2 * MIB);
    }

    #[test]
    fn dropping_an_account_gives_everything_back() {
        let controller = Budget::new(CONTROLLER_BUDGET);
        let mut account = Account::connection(&controller);
        account.try_charge(10 * MIB).unwrap();
        account.try_charge(5 * MIB).unwrap();
        account.release(MIB);
        assert_eq!(controller.used(), 13 * MIB);
        drop(account);
        assert_eq!(controller.used(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_release_wakes_a_waiter() {
        let controller = Budget::new(MIB);
        let mut holder = Account::new(16 * MIB, controller.clone());
        holder.try_charge(2 * MIB).unwrap();
        let mut waiter = Account::new(16 * MIB, controller.clone());
        waiter.try_charge(MIB).unwrap();
        assert_eq!(waiter.try_charge(MIB), Err(Full::Controller));
        let wait = controller.changed();
        tokio::pin!(wait);
        assert!(futures_poll(wait.as_mut()).is_pending());
        holder.release(2 * MIB);
        assert!(futures_poll(wait.as_mut()).is_ready(), "the release woke the waiter at once");
        assert_eq!(waiter.try_charge(MIB), Ok(()));
    }

    fn futures_poll<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
        let waker = std::task::Waker::noop();
        f.poll(&mut std::task::Context::from_waker(waker))
    }
}
