//! Reservations: SPC-2 RESERVE/RELEASE and SPC-4 persistent reservations (§5.13).
//!
//! ```text
//!   command ─▶ check(nexus, request)    one atomic load when nothing is reserved
//!   PERSISTENT RESERVE OUT ─▶ (serialized) clone state ─▶ apply ─▶ store.save ─▶ commit
//!                                                               └─ UAs queued at commit
//! ```
//!
//! Persistent reservation changes are computed on a copy and committed only after the
//! store took them (APTPL=1: the state; APTPL=0: nothing), so a failed save leaves the LU
//! as it was. Registrations name an I_T nexus by initiator port and relative target port
//! (any target port when registered with ALL_TG_PT). The holder of a reservation that is
//! not "all registrants" is the registration flagged `holder`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::cdb::Action;
use crate::sense::{Failure, Reply, Sense, key};
use crate::unit_attention::{Nexuses, Ua};
use crate::{Nexus, ReservationStore, ScsiError};

/// What a command does to the medium, for the persistent reservation access rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    /// Allowed whatever the reservation.
    Any,
    /// Allowed to non-holders under the write-exclusive types.
    Read,
    /// Allowed only to holders (and registrants under the registrants types).
    Write,
}

/// Whether `request` passes a RESERVE(6) held by another nexus, and its access class
/// under a persistent reservation (SPC-4 table 46, SBC-3 table 13).
fn classify(request: &Action) -> (bool, Access) {
    use Action::*;
    match request {
        Inquiry { .. } | RequestSense { .. } | ReportLuns { .. } | ReportTargetPortGroups { .. } => {
            (true, Access::Any)
        }
        // RESERVE and RELEASE sort out conflicts themselves.
        Reserve | Release => (true, Access::Any),
        PrIn { .. } | PrOut { .. } | TestUnitReady | ReadCapacity10 | ReadCapacity16 => (false, Access::Any),
        ReportSupportedOpcodes { .. } | PreventAllow { prevent: false } => (false, Access::Any),
        Read(_) | Verify { .. } | PreFetch { .. } | GetLbaStatus { .. } | ModeSense { .. } => {
            (false, Access::Read)
        }
        ReadDefectData { .. } | ReceiveCopyResults { .. } => (false, Access::Read),
        _ => (false, Access::Write),
    }
}

/// Persistent reservation types (SPC-4 table 45).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum PrType {
    WriteExclusive,
    ExclusiveAccess,
    WriteExclusiveRegistrantsOnly,
    ExclusiveAccessRegistrantsOnly,
    WriteExclusiveAllRegistrants,
    ExclusiveAccessAllRegistrants,
}

impl PrType {
    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => PrType::WriteExclusive,
            3 => PrType::ExclusiveAccess,
            5 => PrType::WriteExclusiveRegistrantsOnly,
            6 => PrType::ExclusiveAccessRegistrantsOnly,
            7 => PrType::WriteExclusiveAllRegistrants,
            8 => PrType::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    fn code(self) -> u8 {
        match self {
            PrType::WriteExclusive => 1,
            PrType::ExclusiveAccess => 3,
            PrType::WriteExclusiveRegistrantsOnly => 5,
            PrType::ExclusiveAccessRegistrantsOnly => 6,
            PrType::WriteExclusiveAllRegistrants => 7,
            PrType::ExclusiveAccessAllRegistrants => 8,
        }
    }

    fn all_registrants(self) -> bool {
        matches!(self, PrType::WriteExclusiveAllRegistrants | PrType::ExclusiveAccessAllRegistrants)
    }

    /// Registrants-only or all-registrants: registered nexuses share the access.
    fn registrants(self) -> bool {
        !matches!(self, PrType::WriteExclusive | PrType::ExclusiveAccess)
    }

    fn write_exclusive(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusive
                | PrType::WriteExclusiveRegistrantsOnly
                | PrType::WriteExclusiveAllRegistrants
        )
    }
}

/// One registered I_T nexus (or, with `all_tg_pt`, an initiator port on every target port).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Registration {
    key: u64,
    initiator_port: String,
    initiator_name: String,
    relative_port: u16,
    all_tg_pt: bool,
    /// Holds the reservation (types other than all-registrants).
    holder: bool,
}

impl Registration {
    fn of(nexus: &Nexus, key: u64, all_tg_pt: bool) -> Self {
        Registration {
            key,
            initiator_port: nexus.initiator_port.clone(),
            initiator_name: nexus.initiator_name.clone(),
            relative_port: nexus.relative_port,
            all_tg_pt,
            holder: false,
        }
    }

    fn matches(&self, nexus: &Nexus) -> bool {
        self.initiator_port.eq_ignore_ascii_case(&nexus.initiator_port)
            && (self.all_tg_pt || self.relative_port == nexus.relative_port)
    }
}

/// The persistent reservation state of a LU.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct PrState {
    generation: u32,
    aptpl: bool,
    registrations: Vec<Registration>,
    reservation: Option<PrType>,
}

/// What the store holds, versioned so later formats can still read older ones.
#[derive(Serialize, Deserialize)]
enum Persisted {
    /// First format: the whole state as JSON.
    V1(PrState),
}

impl PrState {
    fn find(&self, nexus: &Nexus) -> Option<usize> {
        self.registrations.iter().position(|r| r.matches(nexus))
    }

    fn is_holder(&self, nexus: &Nexus) -> bool {
        match (self.reservation, self.find(nexus)) {
            (Some(t), Some(i)) => t.all_registrants() || self.registrations[i].holder,
            _ => false,
        }
    }

    fn allows(&self, nexus: &Nexus, access: Access) -> bool {
        let Some(t) = self.reservation else { return true };
        if access == Access::Any || self.is_holder(nexus) {
            return true;
        }
        (t.registrants() && self.find(nexus).is_some()) || (t.write_exclusive() && access == Access::Read)
    }

    /// Removes registration `i`, releasing a reservation it held.
    fn unregister(&mut self, i: usize, uas: &mut Vec<(Ua, Registration)>) {
        let gone = self.registrations.remove(i);
        let Some(t) = self.reservation else { return };
        if t.all_registrants() {
            if self.registrations.is_empty() {
                self.reservation = None;
            }
        } else if gone.holder {
            self.reservation = None;
            if t.registrants() {
                uas.extend(self.registrations.iter().map(|r| (Ua::RESERVATIONS_RELEASED, r.clone())));
            }
        }
    }

    /// Removes every registration with `key` but the one at `me`; returns them.
    fn remove_key(&mut self, key: u64, me: usize) -> Vec<Registration> {
        let mut removed = Vec::new();
        let mut i = 0;
        self.registrations.retain(|r| {
            let keep = i == me || r.key != key;
            i += 1;
            if !keep {
                removed.push(r.clone());
            }
            keep
        });
        removed
    }
}

/// PERSISTENT RESERVE OUT parameters (SPC-4 §6.16.3).
struct Params {
    key: u64,
    sa_key: u64,
    all_tg_pt: bool,
    aptpl: bool,
    /// REGISTER AND MOVE: UNREG, relative target port and the TransportID.
    moving: Option<(bool, u16, String)>,
}

impl Params {
    fn parse(sa: u8, p: &[u8]) -> Result<Self, Sense> {
        let be64 = |i: usize| u64::from_be_bytes(p[i..i + 8].try_into().unwrap_or([0; 8]));
        if sa == SA_REGISTER_AND_MOVE {
            if p.len() < 24 {
                return Err(Sense::param_list_length());
            }
            let tid_len =
                usize::try_from(u32::from_be_bytes([p[20], p[21], p[22], p[23]])).unwrap_or(usize::MAX);
            if tid_len > p.len() - 24 {
                return Err(Sense::param_list_length());
            }
            let port = transport_id(&p[24..24 + tid_len]).ok_or(Sense::invalid_param(24, None))?;
            let moving = Some((p[17] & 0x02 != 0, u16::from_be_bytes([p[18], p[19]]), port));
            return Ok(Params {
                key: be64(0),
                sa_key: be64(8),
                all_tg_pt: false,
                aptpl: p[17] & 1 != 0,
                moving,
            });
        }
        if p.len() != 24 {
            return Err(Sense::param_list_length());
        }
        if p[20] & 0x08 != 0 {
            // SPEC_I_PT is not supported (REPORT CAPABILITIES says SIP_C=0).
            return Err(Sense::invalid_param(20, Some(3)));
        }
        let all_tg_pt = p[20] & 0x04 != 0;
        if all_tg_pt && !matches!(sa, SA_REGISTER | SA_REGISTER_AND_IGNORE) {
            return Err(Sense::invalid_param(20, Some(2)));
        }
        Ok(Params { key: be64(0), sa_key: be64(8), all_tg_pt, aptpl: p[20] & 1 != 0, moving: None })
    }
}

/// The initiator port an iSCSI TransportID (format 01b, "name,i,0x<ISID>") names.
fn transport_id(tid: &[u8]) -> Option<String> {
    if tid.len() < 4 || tid[0] & 0x0F != 0x05 || tid[0] >> 6 != 1 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([tid[2], tid[3]])).min(tid.len() - 4);
    let name = &tid[4..4 + len];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let port = std::str::from_utf8(&name[..end]).ok()?;
    (port.contains(",i,0x") || port.contains(",I,0X")).then(|| port.to_string())
}

/// The TransportID of a registration, for READ FULL STATUS: iSCSI, with the ISID when the
/// initiator port carries one (format 01b), by initiator name otherwise (format 00b).
fn encode_transport_id(r: &Registration) -> Vec<u8> {
    let (format, name) = if r.initiator_port.contains(",i,0x") {
        (0x40, r.initiator_port.as_bytes())
    } else {
        (0x00, r.initiator_name.as_bytes())
    };
    let padded = (name.len() + 1).div_ceil(4) * 4;
    let mut tid = vec![format | 0x05, 0];
    tid.extend_from_slice(&u16::try_from(padded).unwrap_or(u16::MAX).to_be_bytes());
    tid.extend_from_slice(name);
    tid.resize(4 + padded, 0);
    tid
}

const SA_REGISTER: u8 = 0x00;
const SA_RESERVE: u8 = 0x01;
const SA_RELEASE: u8 = 0x02;
const SA_CLEAR: u8 = 0x03;
const SA_PREEMPT: u8 = 0x04;
const SA_PREEMPT_AND_ABORT: u8 = 0x05;
const SA_REGISTER_AND_IGNORE: u8 = 0x06;
const SA_REGISTER_AND_MOVE: u8 = 0x07;

struct Inner {
    pr: PrState,
    /// Holder of a RESERVE(6)/RESERVE(10) reservation.
    reserve6: Option<Nexus>,
}

/// The reservations of one LU.
pub(crate) struct Reservations {
    inner: Mutex<Inner>,
    /// Some reservation (either kind) is held: the fast path of `check` reads only this.
    held: AtomicBool,
    /// Serializes PERSISTENT RESERVE OUT across its save; holds "the store keeps a
    /// non-empty state".
    out: tokio::sync::Mutex<bool>,
    store: Arc<dyn ReservationStore>,
}

impl Reservations {
    pub fn new(persisted: Option<&[u8]>, store: Arc<dyn ReservationStore>) -> Result<Self, ScsiError> {
        let pr = match persisted {
            None | Some([]) => PrState::default(),
            Some(bytes) => {
                let Persisted::V1(mut pr) =
                    serde_json::from_slice(bytes).map_err(ScsiError::CorruptReservations)?;
                if pr.reservation.is_some()
                    && !pr.reservation.is_some_and(PrType::all_registrants)
                    && pr.registrations.iter().filter(|r| r.holder).count() != 1
                {
                    return Err(ScsiError::InconsistentReservations);
                }
                // PRGENERATION starts at zero at power on (SPC-4 §6.16.2).
                pr.generation = 0;
                pr
            }
        };
        let held = pr.reservation.is_some();
        let stored = persisted.is_some_and(|b| !b.is_empty());
        Ok(Reservations {
            inner: Mutex::new(Inner { pr, reserve6: None }),
            held: AtomicBool::new(held),
            out: tokio::sync::Mutex::new(stored),
            store,
        })
    }

    fn update_held(&self, inner: &Inner) {
        self.held.store(inner.reserve6.is_some() || inner.pr.reservation.is_some(), Ordering::Release);
    }

    /// RESERVATION CONFLICT if a reservation keeps `nexus` from running `request`.
    pub fn check(&self, nexus: &Nexus, request: &Action) -> Result<(), Failure> {
        if !self.held.load(Ordering::Acquire) {
            return Ok(());
        }
        let (past_reserve6, access) = classify(request);
        let inner = self.inner.lock();
        if inner.reserve6.as_ref().is_some_and(|h| h != nexus) && !past_reserve6 {
            return Err(Failure::Conflict);
        }
        if !inner.pr.allows(nexus, access) {
            return Err(Failure::Conflict);
        }
        Ok(())
    }

    /// Whether `nexus` may write through a copy manager (EXTENDED COPY to this LU).
    pub fn may_write(&self, nexus: &Nexus) -> bool {
        self.check(nexus, &Action::Write(crate::cdb::Io { lba: 0, blocks: 0, fua: false, protect: 0 }))
            .is_ok()
    }

    /// RESERVE(6)/(10). With a persistent reservation in place (compatible reservation
    /// handling, SPC-4 §5.13.3) the holder gets GOOD and nothing changes; others conflict.
    pub fn reserve(&self, nexus: &Nexus) -> Reply {
        let mut inner = self.inner.lock();
        if inner.pr.reservation.is_some() {
            return if inner.pr.is_holder(nexus) { Ok(Bytes::new()) } else { Err(Failure::Conflict) };
        }
        match &inner.reserve6 {
            Some(holder) if holder != nexus => Err(Failure::Conflict),
            _ => {
                inner.reserve6 = Some(nexus.clone());
                self.update_held(&inner);
                Ok(Bytes::new())
            }
        }
    }

    /// RELEASE(6)/(10): releases this nexus's reservation; a no-op for anyone else.
    pub fn release(&self, nexus: &Nexus) -> Reply {
        let mut inner = self.inner.lock();
        if inner.pr.reservation.is_some() {
            return if inner.pr.find(nexus).is_some() { Ok(Bytes::new()) } else { Err(Failure::Conflict) };
        }
        if inner.reserve6.as_ref() == Some(nexus) {
            inner.reserve6 = None;
            self.update_held(&inner);
        }
        Ok(Bytes::new())
    }

    /// A reset or the loss of `nexus` (or of every nexus, with `None`) ends RESERVE(6).
    pub fn drop_reserve6(&self, nexus: Option<&Nexus>) {
        let mut inner = self.inner.lock();
        if nexus.is_none() || inner.reserve6.as_ref() == nexus {
            inner.reserve6 = None;
            self.update_held(&inner);
        }
    }

    /// PERSISTENT RESERVE IN.
    pub fn pr_in(&self, sa: u8) -> Reply {
        let inner = self.inner.lock();
        let pr = &inner.pr;
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&pr.generation.to_be_bytes());
        match sa {
            0x00 => {
                let len = u32::try_from(pr.registrations.len() * 8).unwrap_or(u32::MAX);
                out.extend_from_slice(&len.to_be_bytes());
                for r in &pr.registrations {
                    out.extend_from_slice(&r.key.to_be_bytes());
                }
            }
            0x01 => match pr.reservation {
                None => out.extend_from_slice(&0u32.to_be_bytes()),
                Some(t) => {
                    out.extend_from_slice(&16u32.to_be_bytes());
                    let key = if t.all_registrants() {
                        0
                    } else {
                        pr.registrations.iter().find(|r| r.holder).map_or(0, |r| r.key)
                    };
                    out.extend_from_slice(&key.to_be_bytes());
                    out.extend_from_slice(&[0, 0, 0, 0, 0, t.code(), 0, 0]);
                }
            },
            0x02 => {
                // REPORT CAPABILITIES: CRH, ATP_C, PTPL_C; TMV; every type.
                out.clear();
                out.extend_from_slice(&[0x00, 0x08, 0x15, 0x80 | u8::from(pr.aptpl), 0xEA, 0x01, 0, 0]);
            }
            _ => {
                // READ FULL STATUS.
                let mut descriptors = Vec::new();
                for r in &pr.registrations {
                    let holder = pr.reservation.is_some_and(|t| t.all_registrants() || r.holder);
                    descriptors.extend_from_slice(&r.key.to_be_bytes());
                    descriptors.extend_from_slice(&[0, 0, 0, 0]);
                    descriptors.push(u8::from(r.all_tg_pt) << 1 | u8::from(holder));
                    descriptors.push(if holder { pr.reservation.map_or(0, PrType::code) } else { 0 });
                    descriptors.extend_from_slice(&[0, 0, 0, 0]);
                    descriptors
                        .extend_from_slice(&(if r.all_tg_pt { 0 } else { r.relative_port }).to_be_bytes());
                    let tid = encode_transport_id(r);
                    descriptors.extend_from_slice(&u32::try_from(tid.len()).unwrap_or(0).to_be_bytes());
                    descriptors.extend_from_slice(&tid);
                }
                out.extend_from_slice(&u32::try_from(descriptors.len()).unwrap_or(u32::MAX).to_be_bytes());
                out.extend_from_slice(&descriptors);
            }
        }
        Ok(Bytes::from(out))
    }

    /// PERSISTENT RESERVE OUT with parameter list `params`; `nexuses` receives the unit
    /// attentions the change causes.
    pub async fn pr_out(
        &self,
        nexus: &Nexus,
        (sa, scope, kind): (u8, u8, u8),
        params: &[u8],
        nexuses: &Nexuses,
    ) -> Reply {
        let p = Params::parse(sa, params)?;
        let mut stored = self.out.lock().await;
        let before = self.inner.lock().pr.clone();
        let mut next = before.clone();
        let uas = apply(&mut next, nexus, sa, scope, kind, &p)?;
        if next != before && (next.aptpl || *stored) {
            let bytes = if next.aptpl {
                Bytes::from(
                    serde_json::to_vec(&Persisted::V1(next.clone()))
                        .map_err(|_| Sense::internal_failure())?,
                )
            } else {
                Bytes::new()
            };
            let non_empty = !bytes.is_empty();
            if let Err(e) = self.store.save(bytes).await {
                tracing::warn!(error = %e, "Persistent reservation state could not be saved");
                return Err(Sense::internal_failure().into());
            }
            *stored = non_empty;
        }
        {
            let mut inner = self.inner.lock();
            inner.pr = next;
            self.update_held(&inner);
        }
        for (ua, reg) in uas {
            nexuses.queue(ua, |n| reg.matches(n) && n != nexus);
        }
        Ok(Bytes::new())
    }
}

/// Applies one PERSISTENT RESERVE OUT service action to `s`.
fn apply(
    s: &mut PrState,
    nexus: &Nexus,
    sa: u8,
    scope: u8,
    kind: u8,
    p: &Params,
) -> Result<Vec<(Ua, Registration)>, Failure> {
    let mut uas = Vec::new();
    let me = s.find(nexus);
    let check_key = |me: Option<usize>| match me {
        Some(i) if s.registrations[i].key == p.key => Ok(i),
        _ => Err(Failure::Conflict),
    };
    let new_type = || {
        if scope != 0 {
            return Err(Sense::invalid_cdb(2, Some(7)));
        }
        PrType::from_code(kind).ok_or(Sense::invalid_cdb(2, Some(3)))
    };
    match sa {
        SA_REGISTER | SA_REGISTER_AND_IGNORE => match me {
            None => {
                if sa == SA_REGISTER && p.key != 0 {
                    return Err(Failure::Conflict);
                }
                if p.sa_key != 0 {
                    s.registrations.push(Registration::of(nexus, p.sa_key, p.all_tg_pt));
                    s.aptpl = p.aptpl;
                    s.generation = s.generation.wrapping_add(1);
                }
            }
            Some(i) => {
                if sa == SA_REGISTER && p.key != s.registrations[i].key {
                    return Err(Failure::Conflict);
                }
                if p.sa_key == 0 {
                    s.unregister(i, &mut uas);
                } else {
                    s.registrations[i].key = p.sa_key;
                    s.aptpl = p.aptpl;
                }
                s.generation = s.generation.wrapping_add(1);
            }
        },
        SA_RESERVE => {
            let t = new_type()?;
            let i = check_key(me)?;
            match s.reservation {
                Some(held) if held == t && s.is_holder(nexus) => {}
                Some(_) => return Err(Failure::Conflict),
                None => {
                    s.reservation = Some(t);
                    s.registrations[i].holder = !t.all_registrants();
                }
            }
        }
        SA_RELEASE => {
            check_key(me)?;
            if let Some(t) = s.reservation
                && s.is_holder(nexus)
            {
                if scope != 0 || kind != t.code() {
                    return Err(Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x04).into());
                }
                s.reservation = None;
                for r in &mut s.registrations {
                    r.holder = false;
                }
                if t.registrants() {
                    uas.extend(
                        s.registrations
                            .iter()
                            .filter(|r| !r.matches(nexus))
                            .map(|r| (Ua::RESERVATIONS_RELEASED, r.clone())),
                    );
                }
            }
        }
        SA_CLEAR => {
            check_key(me)?;
            uas.extend(
                s.registrations
                    .iter()
                    .filter(|r| !r.matches(nexus))
                    .map(|r| (Ua::RESERVATIONS_PREEMPTED, r.clone())),
            );
            s.registrations.clear();
            s.reservation = None;
            s.generation = s.generation.wrapping_add(1);
        }
        SA_PREEMPT | SA_PREEMPT_AND_ABORT => {
            let i = check_key(me)?;
            let holder_key = s.registrations.iter().find(|r| r.holder).map(|r| r.key);
            let take_over = match s.reservation {
                None => false,
                Some(t) if t.all_registrants() => p.sa_key == 0,
                Some(_) => holder_key == Some(p.sa_key),
            };
            if take_over {
                let t = new_type()?;
                let old = s.reservation;
                let removed = if p.sa_key == 0 {
                    let mine = s.registrations[i].clone();
                    let others = s.registrations.iter().filter(|r| **r != mine).cloned().collect();
                    s.registrations = vec![mine];
                    others
                } else {
                    s.remove_key(p.sa_key, i)
                };
                uas.extend(removed.into_iter().map(|r| (Ua::REGISTRATIONS_PREEMPTED, r)));
                let me = s.find(nexus).unwrap_or(0);
                for (j, r) in s.registrations.iter_mut().enumerate() {
                    r.holder = j == me && !t.all_registrants();
                }
                s.reservation = Some(t);
                if old != Some(t) {
                    uas.extend(
                        s.registrations
                            .iter()
                            .filter(|r| !r.matches(nexus))
                            .map(|r| (Ua::RESERVATIONS_RELEASED, r.clone())),
                    );
                }
            } else {
                if p.sa_key == 0 {
                    return Err(Sense::invalid_param(8, None).into());
                }
                let removed = s.remove_key(p.sa_key, i);
                if removed.is_empty() {
                    return Err(Failure::Conflict);
                }
                uas.extend(removed.into_iter().map(|r| (Ua::REGISTRATIONS_PREEMPTED, r)));
            }
            s.generation = s.generation.wrapping_add(1);
        }
        SA_REGISTER_AND_MOVE => {
            let i = check_key(me)?;
            let (unreg, relative_port, port) = p.moving.clone().unwrap_or_default();
            match s.reservation {
                Some(t) if !t.all_registrants() && s.registrations[i].holder => {}
                _ => return Err(Failure::Conflict),
            }
            if p.sa_key == 0 {
                return Err(Sense::invalid_param(8, None).into());
            }
            let name = port.split(",i,0x").next().unwrap_or_default().to_string();
            let dest = Nexus {
                initiator_port: port,
                initiator_name: name,
                target_port: String::new(),
                relative_port,
            };
            if s.registrations[i].matches(&dest) {
                return Err(Sense::invalid_param(24, None).into());
            }
            let d = match s.find(&dest) {
                Some(d) => d,
                None => {
                    s.registrations.push(Registration::of(&dest, p.sa_key, false));
                    s.registrations.len() - 1
                }
            };
            s.registrations[i].holder = false;
            s.registrations[d].holder = true;
            if unreg {
                s.registrations.remove(i);
            }
            s.aptpl = p.aptpl;
            s.generation = s.generation.wrapping_add(1);
        }
        _ => return Err(Sense::invalid_cdb(1, Some(4)).into()),
    }
    Ok(uas)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(i: u8) -> Nexus {
        Nexus {
            initiator_port: format!("iqn.i{i},i,0x23d00000{i}"),
            initiator_name: format!("iqn.i{i}"),
            target_port: "iqn.t,t,0x1".into(),
            relative_port: 1,
        }
    }

    fn params(key: u64, sa_key: u64) -> Params {
        Params { key, sa_key, all_tg_pt: false, aptpl: false, moving: None }
    }

    #[test]
    fn access_rules_follow_the_reservation_type() {
        let write = Access::Write;
        let read = Access::Read;
        // (type, registered-non-holder read, write, unregistered read, write) as in
        // libiscsi's prout_reserve_access tests.
        let table = [
            (3, false, false, false, false),
            (1, true, false, true, false),
            (6, true, true, false, false),
            (5, true, true, true, false),
            (8, true, true, false, false),
            (7, true, true, true, false),
        ];
        for (code, rr, rw, ur, uw) in table {
            let mut s = PrState::default();
            apply(&mut s, &n(1), SA_REGISTER, 0, 0, &params(0, 1)).unwrap();
            apply(&mut s, &n(2), SA_REGISTER, 0, 0, &params(0, 2)).unwrap();
            apply(&mut s, &n(1), SA_RESERVE, 0, code, &params(1, 0)).unwrap();
            assert!(s.allows(&n(1), write) && s.allows(&n(1), read), "holder of type {code}");
            assert_eq!((s.allows(&n(2), read), s.allows(&n(2), write)), (rr, rw), "registered, type {code}");
            assert_eq!(
                (s.allows(&n(3), read), s.allows(&n(3), write)),
                (ur, uw),
                "unregistered, type {code}"
            );
        }
    }

    #[test]
    fn register_rules_and_generation() {
        let mut s = PrState::default();
        assert_eq!(apply(&mut s, &n(1), SA_REGISTER, 0, 0, &params(5, 7)).unwrap_err(), Failure::Conflict);
        apply(&mut s, &n(1), SA_REGISTER, 0, 0, &params(0, 7)).unwrap();
        assert_eq!(s.generation, 1);
        // Re-registering with the wrong current key conflicts; IGNORE does not care.
        assert_eq!(apply(&mut s, &n(1), SA_REGISTER, 0, 0, &params(0, 8)).unwrap_err(), Failure::Conflict);
        apply(&mut s, &n(1), SA_REGISTER_AND_IGNORE, 0, 0, &params(0, 8)).unwrap();
        assert_eq!(s.registrations[0].key, 8);
        apply(&mut s, &n(1), SA_REGISTER, 0, 0, &params(8, 0)).unwrap();
        assert!(s.registrations.is_empty());
        assert_eq!(s.generation, 3);
    }

    #[test]
    fn holder_unregistering_releases_and_tells_registrants_only() {
        let mut s = PrState::default();
        apply(&mut s, &n(1), SA_REGISTER, 0, 0, &params(0, 1)).unwrap();
        apply(&mut s, &n(2), SA_REGISTER, 0, 0, &params(0, 2)).unwrap();
        apply(&mut s, &n(1), SA_RESERVE, 0, 6, &params(1, 0)).unwrap();
        let uas = apply(&mut s, &n(1), SA_REGISTER, 0, 0, &params(1, 0)).unwrap();
        assert_eq!(s.reservation, None);
        assert_eq!(uas.len(), 1);
        assert_eq!(uas[0].0, Ua::RESERVATIONS_RELEASED);
        // All registrants: the reservation outlives the registrant that took it.
        apply(&mut s, &n(1), SA_REGISTER, 0, 0, &params(0, 1)).unwrap();
        apply(&mut s, &n(1), SA_RESERVE, 0, 7, &params(1, 0)).unwrap();
        apply(&mut s, &n(1), SA_REGISTER, 0, 0, &params(1, 0)).unwrap();
        assert_eq!(s.reservation, Some(PrType::WriteExclusiveAllRegistrants));
        assert!(s.is_holder(&n(2)));
    }

    #[test]
    fn preempt_removes_registrations_and_takes_the_reservation() {
        let mut s = PrState::default();
        apply(&mut s, &n(1), SA_REGISTER, 0, 0, &params(0, 1)).unwrap();
        apply(&mut s, &n(2), SA_REGISTER, 0, 0, &params(0, 2)).unwrap();
        let uas = apply(&mut s, &n(2), SA_PREEMPT, 0, 3, &params(2, 1)).unwrap();
        assert_eq!(s.registrations.len(), 1);
        assert_eq!(uas[0].0, Ua::REGISTRATIONS_PREEMPTED);
        assert_eq!(s.reservation, None);
        apply(&mut s, &n(1), SA_REGISTER, 0, 0, &params(0, 1)).unwrap();
        apply(&mut s, &n(1), SA_RESERVE, 0, 3, &params(1, 0)).unwrap();
        apply(&mut s, &n(2), SA_PREEMPT, 0, 1, &params(2, 1)).unwrap();
        assert!(s.is_holder(&n(2)) && !s.is_holder(&n(1)));
        assert_eq!(s.reservation, Some(PrType::WriteExclusive));
        assert_eq!(
            apply(&mut s, &n(2), SA_PREEMPT, 0, 1, &params(2, 99)).unwrap_err(),
            Failure::Conflict,
            "no registration has the key"
        );
    }

    #[test]
    fn iscsi_transport_ids_round_trip() {
        let r = Registration::of(&n(3), 1, false);
        let tid = encode_transport_id(&r);
        assert_eq!(tid.len() % 4, 0);
        assert_eq!(transport_id(&tid).as_deref(), Some(n(3).initiator_port.as_str()));
    }
}
