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
//! shared part, when the controller's budget is free).
//!
//! Connections waiting for the shared budget stand in line, oldest first. What the oldest
//! needs is kept for it: any other charge fits only in what is left beside it, so every
//! release brings the oldest waiter closer and newer small charges cannot overtake it
//! forever (without the line, seven busy connections kept a legal 32 MiB read waiting
//! indefinitely). A waiter is served once the bytes held when it got to the head of the
//! line are released, which replies going out or [`SEND_TIMEOUT`] bound.
//!
//! ```text
//!   shared: [ held by connections | kept for the oldest waiter | free for others ]
//!   line:   oldest waiter ─▶ next ─▶ …   (only charges beyond a FLOOR wait in it)
//! ```

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
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
/// The slowest a client may take its replies beyond [`SEND_TIMEOUT`]: 256 KiB/s, a
/// 2 Mbit/s link. Replies written together must all be taken within
/// [`send_allowance`] of their size, so a client that reads a byte now and then, just
/// often enough never to be idle for `SEND_TIMEOUT`, cannot keep its budget forever.
pub const MIN_SEND_RATE: u64 = 256 << 10;
/// How long `bytes` of replies written together may take to go out: [`SEND_TIMEOUT`]
/// plus their size at [`MIN_SEND_RATE`] (30 s for a small reply, 158 s for a 32 MiB read).
pub fn send_allowance(bytes: usize) -> Duration {
    let bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
    SEND_TIMEOUT + Duration::from_millis(bytes.saturating_mul(1000) / MIN_SEND_RATE)
}
/// How long replies may still take once the server shuts down (or a connection closes):
/// every accepted command still completes, but a client that does not read cannot hold
/// up SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How long a connection waiting for the shared budget sleeps before looking again, in
/// case a release raced with its going to sleep.
const RECHECK: Duration = Duration::from_millis(20);

/// The controller's shared budget: bytes held by every connection beyond its floor, and
/// the line of connections waiting for it.
#[derive(Debug)]
pub struct Budget {
    capacity: u64,
    used: AtomicU64,
    /// What the oldest waiter needs (at most `capacity`), 0 when nobody waits: the fast
    /// path of a charge looks at it without taking the lock.
    kept: AtomicU64,
    line: Mutex<Line>,
    /// Someone waits for room: releases wake it.
    waiting: AtomicBool,
    freed: Notify,
}

/// Connections waiting for the shared budget, oldest first.
#[derive(Debug, Default)]
struct Line {
    next_ticket: u64,
    waiters: VecDeque<Waiter>,
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    /// The shared bytes its last refused charge needed.
    bytes: u64,
}

impl Budget {
    /// A budget of `capacity` bytes.
    pub fn new(capacity: u64) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            used: AtomicU64::new(0),
            kept: AtomicU64::new(0),
            line: Mutex::new(Line::default()),
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

    /// Connections waiting in line for the shared budget.
    pub fn waiters(&self) -> usize {
        self.lock().waiters.len()
    }

    /// Takes `bytes` for the holder of `place` (its ticket in the line, if it stands in
    /// it) if they fit beside what the oldest other waiter needs; otherwise puts it in
    /// line (or keeps its place) and says no. Nothing held and nobody waiting: any charge
    /// fits, so one larger than the whole budget still runs, alone.
    fn try_take(&self, bytes: u64, place: &mut Option<u64>) -> bool {
        // The normal path: nobody waits, one atomic operation.
        if place.is_none() && self.kept.load(Ordering::Acquire) == 0 && self.take_beside(bytes, 0) {
            return true;
        }
        let mut line = self.lock();
        let kept = match line.waiters.front() {
            Some(oldest) if Some(oldest.ticket) != *place => oldest.bytes.min(self.capacity),
            _ => 0,
        };
        let position = place.and_then(|ticket| line.waiters.iter().position(|w| w.ticket == ticket));
        if self.take_beside(bytes, kept) {
            // Served: out of line. (Its need may have shrunk while it waited, as what it
            // held fell below its floor; it waits for one charge at a time, so any charge
            // taken is the one it waited for.)
            if let Some(i) = position {
                line.waiters.remove(i);
                *place = None;
                self.line_changed(&line, i == 0);
            }
            return true;
        }
        match position {
            Some(i) => line.waiters[i].bytes = bytes,
            None => {
                let ticket = line.next_ticket;
                line.next_ticket += 1;
                line.waiters.push_back(Waiter { ticket, bytes });
                *place = Some(ticket);
            }
        }
        self.line_changed(&line, false);
        self.waiting.store(true, Ordering::Release);
        false
    }

    /// Takes `bytes` if they fit with `kept` bytes left free for the oldest waiter.
    fn take_beside(&self, bytes: u64, kept: u64) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let alone = used == 0 && kept == 0;
            if !alone && used.saturating_add(bytes).saturating_add(kept) > self.capacity {
                return false;
            }
            match self.used.compare_exchange_weak(used, used + bytes, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => used = now,
            }
        }
    }

    /// The holder of `ticket` stops waiting (its connection is gone).
    fn leave(&self, ticket: u64) {
        let mut line = self.lock();
        if let Some(i) = line.waiters.iter().position(|w| w.ticket == ticket) {
            line.waiters.remove(i);
            self.line_changed(&line, i == 0);
        }
    }

    /// Keeps what the (maybe new) oldest waiter needs; wakes waiters when it changed, so
    /// the next in line looks again.
    fn line_changed(&self, line: &Line, head_left: bool) {
        let kept = line.waiters.front().map_or(0, |w| w.bytes.min(self.capacity));
        self.kept.store(kept, Ordering::Release);
        if head_left {
            self.freed.notify_waiters();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Line> {
        self.line.lock().unwrap_or_else(PoisonError::into_inner)
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
    /// Its ticket while it waits in the controller's line.
    place: Option<u64>,
}

impl Account {
    /// An account of `limit` bytes drawing beyond [`FLOOR`] on `controller`.
    pub fn new(limit: u64, controller: Arc<Budget>) -> Self {
        Self { limit, held: 0, controller, place: None }
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
    /// always take a charge larger than its limit. Refused by the controller's budget, the
    /// connection stands in its line until a charge is taken (one waits at a time: the
    /// one it retries), so trying again after [`Budget::changed`] keeps its place.
    pub fn try_charge(&mut self, bytes: u64) -> Result<(), Full> {
        if self.held != 0 && self.held + bytes > self.limit {
            return Err(Full::Connection);
        }
        let shared = Self::beyond_floor(self.held + bytes) - Self::beyond_floor(self.held);
        if shared > 0 && !self.controller.try_take(shared, &mut self.place) {
            return Err(Full::Controller);
        }
        self.held += bytes;
        // Taken, perhaps within the floor alone once what it held went out: no longer
        // waiting, whatever the line recorded.
        self.leave_line();
        Ok(())
    }

    /// Steps out of the controller's line: the charge it waited for is no longer wanted
    /// (its command was aborted or refused), so nobody keeps room for it.
    pub fn leave_line(&mut self) {
        if let Some(ticket) = self.place.take() {
            self.controller.leave(ticket);
        }
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
        if let Some(ticket) = self.place {
            self.controller.leave(ticket);
        }
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

    #[test]
    fn the_oldest_waiter_is_served_before_newer_charges_overtake_it() {
        let controller = Budget::new(CONTROLLER_BUDGET);
        // Seven busy connections hold 16 MiB each: 105 MiB of the shared 128.
        let mut busy: Vec<Account> = (0..7).map(|_| Account::connection(&controller)).collect();
        for account in &mut busy {
            assert_eq!(account.try_charge(16 * MIB), Ok(()));
        }
        let mut large = Account::new(32 * MIB, controller.clone());
        assert_eq!(large.try_charge(32 * MIB), Err(Full::Controller));
        assert_eq!(controller.waiters(), 1);
        // Busy connections turn their replies over, many times: each new charge must leave
        // the waiter its 31 MiB, so the waiter is served at the first release.
        for round in 0..20 {
            let account = &mut busy[round % 7];
            account.release(16 * MIB);
            if account.try_charge(16 * MIB).is_err() {
                break;
            }
            assert_eq!(large.try_charge(32 * MIB), Err(Full::Controller), "round {round}");
        }
        assert_eq!(large.try_charge(32 * MIB), Ok(()), "the oldest waiter goes first");
        assert_eq!(controller.waiters(), 1, "the refused busy connection waits in its turn");
        assert_eq!(controller.used(), 6 * 15 * MIB + 31 * MIB);
    }

    #[test]
    fn waiters_are_served_oldest_first_and_floors_never_wait() {
        let controller = Budget::new(8 * MIB);
        let mut holder = Account::new(16 * MIB, controller.clone());
        holder.try_charge(9 * MIB).unwrap();
        let mut first = Account::new(16 * MIB, controller.clone());
        let mut second = Account::new(16 * MIB, controller.clone());
        assert_eq!(first.try_charge(5 * MIB), Err(Full::Controller));
        assert_eq!(second.try_charge(2 * MIB), Err(Full::Controller));
        // Small IO within a connection's floor does not stand in line.
        let mut small = Account::new(16 * MIB, controller.clone());
        assert_eq!(small.try_charge(4096), Ok(()));
        holder.release(4 * MIB);
        // 4 MiB used, 4 free: the first needs 4, so the second (1) must wait behind it.
        assert_eq!(second.try_charge(2 * MIB), Err(Full::Controller));
        assert_eq!(first.try_charge(5 * MIB), Ok(()));
        holder.release(4 * MIB);
        assert_eq!(second.try_charge(2 * MIB), Ok(()));
        assert_eq!(controller.waiters(), 0);
    }

    #[test]
    fn a_waiter_that_leaves_keeps_nothing_for_itself() {
        let controller = Budget::new(8 * MIB);
        let mut holder = Account::new(16 * MIB, controller.clone());
        holder.try_charge(5 * MIB).unwrap();
        let mut large = Account::new(16 * MIB, controller.clone());
        assert_eq!(large.try_charge(9 * MIB), Err(Full::Controller));
        let mut other = Account::new(16 * MIB, controller.clone());
        assert_eq!(other.try_charge(2 * MIB), Err(Full::Controller), "kept for the waiter");
        drop(large);
        assert_eq!(controller.waiters(), 1);
        assert_eq!(other.try_charge(2 * MIB), Ok(()));
        assert_eq!(controller.waiters(), 0);
    }

    #[test]
    fn a_live_connection_whose_charge_is_no_longer_wanted_keeps_nothing() {
        let controller = Budget::new(8 * MIB);
        let mut holder = Account::new(16 * MIB, controller.clone());
        holder.try_charge(5 * MIB).unwrap();
        let mut aborted = Account::new(16 * MIB, controller.clone());
        assert_eq!(aborted.try_charge(9 * MIB), Err(Full::Controller));
        let mut other = Account::new(16 * MIB, controller.clone());
        assert_eq!(other.try_charge(2 * MIB), Err(Full::Controller), "kept for the waiter");
        aborted.leave_line();
        assert_eq!(controller.waiters(), 1, "only the other one waits");
        assert_eq!(other.try_charge(2 * MIB), Ok(()));
        // Leaving twice, or without a place, changes nothing.
        aborted.leave_line();
        assert_eq!(controller.waiters(), 0);
    }

    #[test]
    fn a_waiter_whose_need_shrank_while_it_waited_leaves_the_line_once_served() {
        let controller = Budget::new(8 * MIB);
        let mut holder = Account::new(16 * MIB, controller.clone());
        holder.try_charge(8 * MIB).unwrap();
        // Holding its floor, a 2 MiB read needs 2 MiB of the shared part: refused.
        let mut reader = Account::new(16 * MIB, controller.clone());
        reader.try_charge(FLOOR).unwrap();
        assert_eq!(reader.try_charge(2 * MIB), Err(Full::Controller));
        // Its small requests go out: now the read needs only 1 MiB shared, and fits.
        reader.release(FLOOR);
        assert_eq!(reader.try_charge(2 * MIB), Ok(()));
        assert_eq!(controller.waiters(), 0, "served, so out of line");
        // And a charge within the floor alone also ends the wait.
        let mut small = Account::new(16 * MIB, controller.clone());
        small.try_charge(FLOOR / 2).unwrap();
        assert_eq!(small.try_charge(FLOOR), Err(Full::Controller));
        small.release(FLOOR / 2);
        assert_eq!(small.try_charge(FLOOR), Ok(()));
        assert_eq!(controller.waiters(), 0);
    }

    #[test]
    fn a_waiter_larger_than_the_budget_runs_once_it_is_free() {
        let controller = Budget::new(8 * MIB);
        let mut holder = Account::new(16 * MIB, controller.clone());
        holder.try_charge(2 * MIB).unwrap();
        let mut huge = Account::new(4 * MIB, controller.clone());
        assert_eq!(huge.try_charge(32 * MIB), Err(Full::Controller));
        let mut other = Account::new(16 * MIB, controller.clone());
        assert_eq!(other.try_charge(2 * MIB), Err(Full::Controller));
        holder.release(2 * MIB);
        assert_eq!(other.try_charge(2 * MIB), Err(Full::Controller), "the whole budget is kept");
        assert_eq!(huge.try_charge(32 * MIB), Ok(()));
    }

    #[test]
    fn replies_may_take_their_size_at_the_minimum_rate() {
        assert_eq!(send_allowance(0), SEND_TIMEOUT);
        assert_eq!(send_allowance(32 << 20), SEND_TIMEOUT + Duration::from_secs(128));
    }

    fn futures_poll<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
        let waker = std::task::Waker::noop();
        f.poll(&mut std::task::Context::from_waker(waker))
    }
}
