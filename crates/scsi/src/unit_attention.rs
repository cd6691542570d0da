//! Per-nexus state of a logical unit: pending unit attentions (SAM-5 §5.14), the PREVENT
//! ALLOW MEDIUM REMOVAL state, and held EXTENDED COPY results.
//!
//! Every command looks its nexus up once (registering it on first sight, so that a later
//! reset can reach it); when nothing is pending for the nexus the check is one atomic load.
//! A unit attention is reported on the next command of its nexus, except INQUIRY, REPORT
//! LUNS and REQUEST SENSE (which returns it as its data and clears it).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Mutex, RwLock};

use crate::Nexus;
use crate::copy::CopyRecord;
use crate::sense::Sense;

/// A unit attention condition: its additional sense code and qualifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ua(pub u8, pub u8);

impl Ua {
    /// POWER ON, RESET, OR BUS DEVICE RESET OCCURRED: target (warm/cold) resets.
    pub const RESET: Ua = Ua(0x29, 0x00);
    /// BUS DEVICE RESET FUNCTION OCCURRED: LOGICAL UNIT RESET.
    pub const LU_RESET: Ua = Ua(0x29, 0x03);
    /// MODE PARAMETERS CHANGED.
    pub const MODE_PARAMETERS_CHANGED: Ua = Ua(0x2A, 0x01);
    /// RESERVATIONS PREEMPTED.
    pub const RESERVATIONS_PREEMPTED: Ua = Ua(0x2A, 0x03);
    /// RESERVATIONS RELEASED.
    pub const RESERVATIONS_RELEASED: Ua = Ua(0x2A, 0x04);
    /// REGISTRATIONS PREEMPTED.
    pub const REGISTRATIONS_PREEMPTED: Ua = Ua(0x2A, 0x05);

    fn is_reset(self) -> bool {
        self.0 == 0x29
    }
}

/// At most this many unit attentions wait per nexus; older ones are dropped first.
const MAX_PENDING: usize = 8;

/// What the LU keeps for one I_T nexus.
#[derive(Default)]
pub(crate) struct NexusState {
    pending: Mutex<VecDeque<Ua>>,
    has_pending: AtomicBool,
    /// PREVENT ALLOW MEDIUM REMOVAL with PREVENT=1 is in effect for this nexus.
    pub prevent: AtomicBool,
    /// Results of EXTENDED COPY commands held for RECEIVE COPY RESULTS, newest last.
    pub copies: Mutex<VecDeque<CopyRecord>>,
}

impl NexusState {
    fn push(&self, ua: Ua) {
        let mut pending = self.pending.lock();
        if ua.is_reset() {
            // A reset supersedes whatever was pending (SAM-5 §5.14).
            pending.clear();
        }
        if !pending.contains(&ua) {
            if pending.len() == MAX_PENDING {
                pending.pop_front();
            }
            pending.push_back(ua);
        }
        self.has_pending.store(true, Ordering::Release);
    }

    fn pop(&self) -> Option<Ua> {
        if !self.has_pending.load(Ordering::Acquire) {
            return None;
        }
        let mut pending = self.pending.lock();
        let ua = pending.pop_front();
        self.has_pending.store(!pending.is_empty(), Ordering::Release);
        ua
    }
}

/// The nexuses a LU has seen, with their state.
#[derive(Default)]
pub(crate) struct Nexuses {
    map: RwLock<HashMap<Nexus, NexusState, BuildHasherDefault<FxHasher>>>,
}

impl Nexuses {
    /// Runs `f` on the state of `nexus`, registering the nexus on first sight.
    pub fn with<R>(&self, nexus: &Nexus, f: impl FnOnce(&NexusState) -> R) -> R {
        if let Some(state) = self.map.read().get(nexus) {
            return f(state);
        }
        let mut map = self.map.write();
        f(map.entry(nexus.clone()).or_default())
    }

    /// Takes the oldest pending unit attention of `nexus`, if any.
    pub fn take(&self, nexus: &Nexus) -> Option<Sense> {
        self.with(nexus, NexusState::pop).map(|Ua(asc, ascq)| Sense::unit_attention(asc, ascq))
    }

    /// Queues `ua` for every known nexus `to` selects.
    pub fn queue(&self, ua: Ua, to: impl Fn(&Nexus) -> bool) {
        for (nexus, state) in self.map.read().iter() {
            if to(nexus) {
                state.push(ua);
            }
        }
    }

    /// Runs `f` on every known nexus.
    pub fn for_each(&self, mut f: impl FnMut(&Nexus, &NexusState)) {
        for (nexus, state) in self.map.read().iter() {
            f(nexus, state);
        }
    }

    /// Forgets `nexus` and everything kept for it.
    pub fn remove(&self, nexus: &Nexus) {
        self.map.write().remove(nexus);
    }
}

/// A small multiplicative hasher: nexus names are hashed on every command, and SipHash's
/// flooding resistance buys nothing for names that come from logged-in sessions.
#[derive(Default)]
pub(crate) struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nexus(i: u8) -> Nexus {
        Nexus {
            initiator_port: format!("iqn.i{i},i,0x1"),
            initiator_name: format!("iqn.i{i}"),
            target_port: "iqn.t,t,0x1".into(),
            relative_port: 1,
        }
    }

    #[test]
    fn a_reset_supersedes_pending_and_entries_are_fifo() {
        let n = Nexuses::default();
        let a = nexus(1);
        assert!(n.take(&a).is_none());
        n.queue(Ua::MODE_PARAMETERS_CHANGED, |_| true);
        n.queue(Ua::RESERVATIONS_RELEASED, |_| true);
        n.queue(Ua::RESERVATIONS_RELEASED, |_| true);
        assert_eq!(n.take(&a).unwrap().ascq(), 0x01);
        assert_eq!(n.take(&a).unwrap().ascq(), 0x04);
        assert!(n.take(&a).is_none());
        n.queue(Ua::MODE_PARAMETERS_CHANGED, |_| true);
        n.queue(Ua::LU_RESET, |_| true);
        assert_eq!((n.take(&a).unwrap().asc(), n.take(&a).is_none()), (0x29, true));
    }

    #[test]
    fn queue_reaches_only_selected_known_nexuses() {
        let n = Nexuses::default();
        let (a, b) = (nexus(1), nexus(2));
        n.with(&a, |_| ());
        n.with(&b, |_| ());
        n.queue(Ua::LU_RESET, |x| *x != a);
        assert!(n.take(&a).is_none());
        assert!(n.take(&b).is_some());
        n.remove(&b);
        n.queue(Ua::LU_RESET, |_| true);
        assert!(n.take(&a).is_some());
    }
}
