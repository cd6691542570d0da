//! The full feature phase of one connection (RFC 7143 §4): commands in CmdSN order, write
//! data by immediate data, unsolicited Data-Out and R2T, read data by Data-In with the
//! status in the last PDU, task management, NOP pings both ways, SendTargets and logout.
//!
//! One task owns the socket, as in the NBD server: it decodes every whole PDU in its read
//! buffer, starts the commands whose data is complete, and writes what finished. Commands
//! already started always run to completion (the block-IO contract); an aborted command's
//! response is not sent, and the task management response waits for it.
//!
//! Memory is bounded by a byte budget (`strata_net::budget`): from its start a command is
//! charged the data-in its CDB will produce (not the initiator's expected length, which
//! may be smaller) and a write's data-out; once it completes, while its response waits
//! for the socket, no more than its expected transfer length. A command whose charge does
//! not fit is parked, in order, and the connection reads no more from the socket (unless
//! a write still waits for its Data-Out) until replies have gone out. Commands not yet
//! started (ahead of their CmdSN, or parked) keep their own copy of their immediate data,
//! at most [`WAITING_LIMIT`] per connection beyond its budget: past it a command is
//! answered TASK SET FULL (in its turn, when it is ahead of its CmdSN), so reading on, for
//! Data-Out or for a missing CmdSN, neither deadlocks nor holds more. Writes race with
//! reading, completions, keep-alive and shutdown in one `select!`; an initiator that
//! takes no byte for `SEND_TIMEOUT` or the keep-alive's interval and timeout, whichever is
//! shorter, or that does not take all of the output the socket made wait within
//! `send_allowance` of its size (or `SHUTDOWN_GRACE` once the connection closes), is
//! dropped, after the commands it started have finished. Replies that carry no charge
//! (NOP-In echoes, R2Ts, sense) stop the reading once more than [`UNCHARGED_LIMIT`] of
//! them wait.
//!
//! At ErrorRecoveryLevel 0 a protocol error (a bad digest, a PDU too long, immediate
//! data beyond what was negotiated) is answered with a Reject and ends the connection.
//! Data-Out out of sequence (DataSN, offset, transfer tag, beyond its burst) ends only its
//! command, with CHECK CONDITION: the header was sound, so the connection still frames.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use strata_net::budget::{Account, Budget, FLOOR, Full, SEND_TIMEOUT, SHUTDOWN_GRACE, send_allowance};
use strata_scsi::{LunMap, Nexus, Outcome};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::login::{COMMAND_WINDOW, LoggedIn, SessionKind};
use crate::negotiate::Parameters;
use crate::pdu::{self, DecodeError, Digests, NO_TAG, Pdu, op, reject};
use crate::session::Sessions;
use crate::{TargetNode, Targets};

mod commands;
mod discovery;
mod management;
mod outbox;

use management::PendingTmf;
use outbox::Outbox;

/// Bytes the read buffer has free before each read from the socket.
const READ_ROOM: usize = 256 << 10;
/// Unsent bytes not covered by a charge (NOP-In echoes, R2Ts, sense, TASK SET FULL)
/// beyond which the connection reads nothing new: what an initiator that never reads
/// makes the target hold outside the budget, even before it logs in to a target (a
/// discovery session answers NOP-Out too). Replies going out make room again.
const UNCHARGED_LIMIT: u64 = FLOOR;
/// Bytes of data and AHS that commands not yet started (ahead of their CmdSN, or parked
/// behind the budget) may keep, per connection, beyond its budget: sixteen writes with
/// 256 KiB of immediate data each, what a host with 1 MiB writes at queue depth 32 has
/// waiting behind a full budget. Beyond it, commands are refused with TASK SET FULL.
const WAITING_LIMIT: u64 = 4 << 20;

/// How a connection keeps its initiator honest when idle.
#[derive(Clone, Copy, Debug)]
pub struct Keepalive {
    /// Idle time before the target pings with a NOP-In.
    pub interval: Duration,
    /// How long the initiator has to answer before the connection is dropped.
    pub timeout: Duration,
}

/// Everything a connection shares with the server.
pub struct Shared<'a> {
    pub targets: &'a dyn Targets,
    pub sessions: &'a Arc<Sessions>,
    pub portal: String,
    pub keepalive: Keepalive,
    pub peer: SocketAddr,
}

/// A write command collecting its data.
struct Receiving {
    lun: u64,
    cdb: Bytes,
    edtl: u32,
    read: bool,
    data: BytesMut,
    /// The burst under way: its target transfer tag (NO_TAG = unsolicited), its end
    /// offset and the DataSN expected next.
    ttt: u32,
    burst_end: u32,
    data_sn: u32,
    r2t_sn: u32,
    /// Bytes charged to the connection's budget.
    charge: u64,
    /// The data-out its CDB asks for (write residuals are measured against it).
    wanted_out: u64,
}

/// A PDU that arrived ahead of its CmdSN.
struct Queued {
    pdu: Pdu,
    /// Its data was not kept (the connection's waiting commands held [`WAITING_LIMIT`]):
    /// in its turn it is answered TASK SET FULL.
    refused: bool,
}

/// A finished command: its ITT, outcome, expected transfer length, read flag, and the
/// data-out length its CDB asked for (for write residuals).
type Done = (u32, Outcome, u32, bool, u64);
type Running = Pin<Box<dyn Future<Output = Done> + Send>>;

/// A command being executed.
struct Executing {
    lun: u64,
    /// Aborted: its response is not sent.
    aborted: bool,
    /// Its work goes on by itself (SANITIZE runs on a thread of its own), so aborts and a
    /// closing connection need not wait for it.
    background: bool,
    /// Bytes charged to the connection's budget.
    charge: u64,
}

/// SANITIZE, the one command whose work outlives it.
const SANITIZE: u8 = 0x48;

struct Connection<'a> {
    shared: &'a Shared<'a>,
    kind: SessionKind,
    params: Parameters,
    digests: Digests,
    stat_sn: u32,
    exp_cmd_sn: u32,
    nexus: Arc<Nexus>,
    luns: Arc<LunMap>,
    generation: u64,
    /// Commands that arrived ahead of ExpCmdSN, by CmdSN.
    queued: BTreeMap<u32, Queued>,
    receiving: HashMap<u32, Receiving>,
    /// Commands executing, by ITT.
    executing: HashMap<u32, Executing>,
    running: FuturesUnordered<Running>,
    tmfs: Vec<PendingTmf>,
    next_ttt: u32,
    /// SendTargets answers too long for one PDU: the rest, by target transfer tag.
    text_rest: Option<(u32, Bytes)>,
    output: Outbox,
    /// The connection's byte budget.
    account: Account,
    /// Charges of commands whose responses are in `output`, released once it is sent.
    unsent: u64,
    /// SCSI commands waiting, in order, for their charge to fit.
    parked: VecDeque<Pdu>,
    /// Which budget the first parked command waits for.
    blocked: Option<Full>,
    /// A reason to stop reading and close once work drains.
    closing: Option<String>,
    /// When replies must have gone out: set once the connection closes.
    stop_by: Option<Instant>,
    logout: Option<Pdu>,
    ping: Option<(u32, tokio::time::Instant)>,
}

/// Serves the full feature phase of a logged-in connection until it ends; its commands
/// are charged to `account` until their responses are sent.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    mut input: BytesMut,
    login: LoggedIn,
    shared: &Shared<'_>,
    mut shutdown: watch::Receiver<bool>,
    account: Account,
) {
    let (nexus, luns, generation, handle) = match &login.kind {
        SessionKind::Normal(target) => {
            let generation = shared.targets.generation();
            let key = crate::session::SessionKey {
                initiator: login.initiator.clone(),
                isid: login.isid,
                target: target.name.clone(),
            };
            let handle = shared.sessions.open(key).await;
            (nexus(&login, &target.name), Arc::new(target.luns.clone()), generation, Some(handle))
        }
        SessionKind::Discovery => (nexus(&login, ""), Arc::new(LunMap::new()), 0, None),
    };
    let mut stop = handle.as_ref().map(|h| h.stop.clone());
    let mut conn = Connection {
        shared,
        digests: Digests { header: login.params.header_digest, data: login.params.data_digest },
        kind: login.kind,
        params: login.params,
        stat_sn: login.stat_sn,
        exp_cmd_sn: login.exp_cmd_sn,
        nexus: Arc::new(nexus),
        luns,
        generation,
        queued: BTreeMap::new(),
        receiving: HashMap::new(),
        executing: HashMap::new(),
        running: FuturesUnordered::new(),
        tmfs: Vec::new(),
        next_ttt: 1,
        text_rest: None,
        output: Outbox::default(),
        account,
        unsent: 0,
        parked: VecDeque::new(),
        blocked: None,
        closing: None,
        stop_by: None,
        logout: None,
        ping: None,
    };
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut writable = true;
    let mut last_heard = Instant::now();
    // When the socket last took bytes, or had nothing to take.
    let mut last_sent = Instant::now();
    // Output the socket made wait: the bytes of it still to go, and when all of them must
    // have gone (`send_allowance` of their size), so a peer that takes a byte now and
    // then cannot hold its budget forever. No timer while the socket takes everything.
    let mut waiting_output: Option<(usize, Instant)> = None;
    loop {
        while conn.closing.is_none() {
            match pdu::decode(&mut input, conn.digests, conn.params.max_recv_data_segment_length) {
                Ok(Some(pdu)) => {
                    last_heard = Instant::now();
                    conn.receive(pdu);
                }
                Ok(None) => break,
                Err(e) => conn.broken(e),
            }
        }
        while let Some(Some(done)) = conn.running.next().now_or_never() {
            conn.complete(done);
        }
        if conn.executing.values().all(|e| e.background)
            && let Some(logout) = conn.logout.take()
        {
            conn.logout_response(&logout);
        }
        if writable && !conn.output.is_empty() {
            let before = conn.output.len();
            match conn.output.write_now(&mut writer) {
                Ok(true) => {
                    last_sent = Instant::now();
                    took(&mut waiting_output, before - conn.output.len());
                }
                Ok(false) => {}
                Err(_) => writable = false,
            }
            if !conn.output.is_empty() && waiting_output.is_none() {
                let left = conn.output.len();
                waiting_output = Some((left, Instant::now() + send_allowance(left)));
            }
        }
        if !writable {
            conn.output.clear();
        }
        if conn.output.is_empty() {
            last_sent = Instant::now();
            waiting_output = None;
            conn.account.release(std::mem::take(&mut conn.unsent));
        }
        if conn.closing.is_none() {
            conn.resume_parked();
        }
        if conn.closing.is_some() && conn.executing.values().all(|e| e.background) && conn.output.is_empty() {
            // Only work that goes on by itself is left: dropping its future is safe.
            break;
        }
        if input.capacity() - input.len() < READ_ROOM / 4 {
            input.reserve(READ_ROOM);
        }
        let open = conn.closing.is_none();
        // Over budget: read nothing new, unless a write still waits for its Data-Out.
        let reading = open
            && (conn.parked.is_empty() || !conn.receiving.is_empty())
            && conn.uncharged_output() < UNCHARGED_LIMIT;
        let sending = writable && !conn.output.is_empty();
        // An initiator that takes no byte for as long as keep-alive allows is as gone as
        // one that does not answer a ping (which, unread, it cannot).
        let patience = SEND_TIMEOUT.min(shared.keepalive.interval + shared.keepalive.timeout);
        let mut send_by = last_sent + patience;
        if let Some((_, give_up_by)) = waiting_output {
            send_by = send_by.min(give_up_by);
        }
        if let Some(stop_by) = conn.stop_by {
            send_by = send_by.min(stop_by);
        }
        let ping_by = match conn.ping {
            Some((_, sent)) => sent + shared.keepalive.timeout,
            None => last_heard + shared.keepalive.interval,
        };
        let room = match conn.blocked {
            Some(Full::Controller) if open && !conn.parked.is_empty() => {
                Some(conn.account.controller().clone())
            }
            _ => None,
        };
        tokio::select! {
            biased;
            Some(done) = conn.running.next(), if !conn.running.is_empty() => {
                conn.complete(done);
                while let Some(Some(done)) = conn.running.next().now_or_never() {
                    conn.complete(done);
                }
            }
            written = conn.output.write_some(&mut writer), if sending => match written {
                Ok(n) => {
                    last_sent = Instant::now();
                    took(&mut waiting_output, n);
                }
                Err(_) => writable = false,
            },
            read = reader.read_buf(&mut input), if reading => {
                if !matches!(read, Ok(n) if n > 0) {
                    conn.close("the initiator closed the connection");
                }
            }
            () = tokio::time::sleep_until(send_by), if sending => {
                tracing::warn!(peer = %shared.peer, "iSCSI initiator does not read its responses; dropping the connection");
                writable = false;
                conn.close("the initiator does not read");
            }
            () = tokio::time::sleep_until(ping_by), if reading => {
                if conn.ping.is_some() {
                    tracing::warn!(peer = %shared.peer, "iSCSI initiator did not answer a NOP-In ping; dropping the connection");
                    conn.close("ping timed out");
                } else {
                    conn.send_ping();
                }
            }
            () = room_in(room.as_deref()) => {}
            _ = stopped(stop.as_mut()), if open => conn.close("session reinstated or target reset"),
            _ = shutdown.changed(), if open => conn.close("server shutting down"),
        }
        if !writable {
            conn.close("the socket refuses writes");
        }
    }
    if writable {
        let _ = writer.shutdown().await;
    }
    for lu in conn.luns.values() {
        lu.nexus_lost(&conn.nexus);
    }
    tracing::debug!(peer = %shared.peer, why = conn.closing.as_deref().unwrap_or(""), "iSCSI connection closed");
    drop(handle);
}

/// Counts `written` bytes against the output the socket made wait; once all of it has
/// gone, the next wait starts a new allowance.
fn took(waiting_output: &mut Option<(usize, Instant)>, written: usize) {
    if let Some((left, _)) = waiting_output {
        *left = left.saturating_sub(written);
        if *left == 0 {
            *waiting_output = None;
        }
    }
}

/// Returns once the shared budget may have room again; never when no one waits for it.
async fn room_in(budget: Option<&Budget>) {
    match budget {
        Some(budget) => budget.changed().await,
        None => std::future::pending().await,
    }
}

async fn stopped(stop: Option<&mut watch::Receiver<bool>>) {
    match stop {
        Some(stop) => {
            let _ = stop.wait_for(|s| *s).await;
        }
        None => std::future::pending().await,
    }
}

/// Bytes a PDU keeps while it waits for its turn: its data segment and AHS.
fn waiting_bytes(pdu: &Pdu) -> u64 {
    (pdu.data.len() + pdu.ahs.len()) as u64
}

/// Gives a PDU that waits for its turn its own copy of its data and AHS: as slices of the
/// read buffer, even empty ones, they would keep the whole buffer (256 KiB or more) alive.
fn keep(pdu: &mut Pdu) {
    let own = |b: &Bytes| if b.is_empty() { Bytes::new() } else { Bytes::copy_from_slice(b) };
    pdu.data = own(&pdu.data);
    pdu.ahs = own(&pdu.ahs);
}

/// A buffer length as the 32-bit field it goes in (every buffer here is bounded by
/// MAX_TRANSFER or a data segment length).
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn nexus(login: &LoggedIn, target: &str) -> Nexus {
    let isid: String = login.isid.iter().map(|b| format!("{b:02x}")).collect();
    Nexus {
        initiator_port: format!("{},i,0x{isid}", login.initiator),
        initiator_name: login.initiator.clone(),
        target_port: format!("{target},t,0x0001"),
        relative_port: 1,
    }
}

/// Whether `a` comes before `b` in 32-bit serial number arithmetic (RFC 1982).
fn serial_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 0x8000_0000
}

impl Connection<'_> {
    /// Stops reading; what was started finishes, and its responses get
    /// [`SHUTDOWN_GRACE`] to go out.
    fn close(&mut self, why: &str) {
        if self.closing.is_none() {
            self.closing = Some(why.to_string());
            self.stop_by = Some(Instant::now() + SHUTDOWN_GRACE);
            // Parked commands never started: the initiator retries them elsewhere, and
            // nobody keeps room in the controller's budget for them.
            self.parked.clear();
            self.account.leave_line();
        }
    }

    /// Unsent bytes not covered by the charges of the responses among them.
    fn uncharged_output(&self) -> u64 {
        (self.output.len() as u64).saturating_sub(self.unsent)
    }

    fn target(&self) -> Option<&Arc<TargetNode>> {
        match &self.kind {
            SessionKind::Normal(t) => Some(t),
            SessionKind::Discovery => None,
        }
    }

    /// A PDU that cannot be decoded: Reject it if the header can be trusted, then close.
    fn broken(&mut self, error: DecodeError) {
        tracing::warn!(peer = %self.shared.peer, %error, "iSCSI protocol error; closing the connection");
        match &error {
            DecodeError::DataDigest { header, .. } => self.reject(header, reject::DATA_DIGEST),
            DecodeError::TooLong { header, .. } => self.reject(header, reject::PROTOCOL_ERROR),
            DecodeError::HeaderDigest { .. } => {}
        }
        self.close("protocol error");
    }

    /// Rejects a PDU whose header is `header` and closes the connection (ERL 0).
    fn protocol_error(&mut self, header: &[u8; pdu::BHS_LEN], why: &str) {
        tracing::warn!(peer = %self.shared.peer, why, "iSCSI protocol error; closing the connection");
        self.reject(header, reject::PROTOCOL_ERROR);
        self.close("protocol error");
    }

    fn reject(&mut self, header: &[u8; pdu::BHS_LEN], reason: u8) {
        let mut pdu = Pdu::new(op::REJECT);
        pdu.header[1] = 0x80;
        pdu.header[2] = reason;
        pdu.set_u32(16, NO_TAG);
        pdu.data = Bytes::copy_from_slice(header);
        self.send_status(pdu);
    }

    /// Fills in StatSN, ExpCmdSN and MaxCmdSN, advances StatSN, and queues the PDU.
    fn send_status(&mut self, mut pdu: Pdu) {
        pdu.set_u32(24, self.stat_sn);
        self.stat_sn = self.stat_sn.wrapping_add(1);
        self.send(pdu);
    }

    /// Fills in ExpCmdSN and MaxCmdSN and queues the PDU.
    fn send(&mut self, mut pdu: Pdu) {
        pdu.set_u32(28, self.exp_cmd_sn);
        pdu.set_u32(32, self.exp_cmd_sn.wrapping_add(COMMAND_WINDOW - 1));
        pdu::encode(&mut self.output.buf, &pdu, self.digests);
    }

    fn send_ping(&mut self) {
        let ttt = self.take_ttt();
        let mut pdu = Pdu::new(op::NOP_IN);
        pdu.header[1] = 0x80;
        pdu.set_u32(16, NO_TAG);
        pdu.set_u32(20, ttt);
        // A ping does not advance StatSN.
        pdu.set_u32(24, self.stat_sn);
        self.send(pdu);
        self.ping = Some((ttt, Instant::now()));
    }

    fn take_ttt(&mut self) -> u32 {
        let ttt = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == NO_TAG {
            self.next_ttt = 1;
        }
        ttt
    }

    /// Orders a PDU by CmdSN (immediate ones go at once), then handles it.
    fn receive(&mut self, pdu: Pdu) {
        let ordered = matches!(
            pdu.opcode(),
            op::SCSI_COMMAND | op::TASK_MANAGEMENT | op::TEXT | op::LOGOUT | op::NOP_OUT
        );
        if !ordered || pdu.immediate() {
            self.handle(pdu);
            return;
        }
        let cmd_sn = pdu.u32_at(24);
        if cmd_sn == self.exp_cmd_sn {
            self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
            self.handle(pdu);
            while let Some(next) = self.queued.remove(&self.exp_cmd_sn) {
                self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
                if next.refused {
                    self.task_set_full(&next.pdu);
                } else {
                    self.handle(next.pdu);
                }
            }
        } else if serial_lt(self.exp_cmd_sn, cmd_sn) && cmd_sn.wrapping_sub(self.exp_cmd_sn) < COMMAND_WINDOW
        {
            self.queue(cmd_sn, pdu);
        } else {
            // Outside the window: silently ignored (RFC 7143 §4.2.2.1).
            tracing::debug!(cmd_sn, exp = self.exp_cmd_sn, "ignoring a command outside the CmdSN window");
        }
    }

    /// Keeps a PDU that came ahead of its CmdSN until its turn, with its own copy of its
    /// data within [`WAITING_LIMIT`]. Beyond it a SCSI command keeps only its header and is
    /// refused in its turn, so the connection reads on, for the CmdSN that is missing, in
    /// bounded memory; a NOP-Out or Text request there ends the connection (at
    /// ErrorRecoveryLevel 0 on a one-connection session, CmdSN order is never broken).
    fn queue(&mut self, cmd_sn: u32, mut pdu: Pdu) {
        if self.queued.contains_key(&cmd_sn) {
            // A duplicate within the window: silently ignored (RFC 7143 §4.2.2.1).
            return;
        }
        let refused = self.waiting() + waiting_bytes(&pdu) > WAITING_LIMIT;
        if refused && pdu.opcode() != op::SCSI_COMMAND {
            self.protocol_error(&pdu.header, "requests ahead of their CmdSN hold more data than is kept");
            return;
        }
        if refused {
            pdu.data = Bytes::new();
            pdu.ahs = Bytes::new();
        } else {
            keep(&mut pdu);
        }
        self.queued.insert(cmd_sn, Queued { pdu, refused });
    }

    /// Bytes of data and AHS kept by commands not yet started: ahead of their CmdSN, or
    /// parked (a few hundred at most, counted when one more would be kept).
    fn waiting(&self) -> u64 {
        let queued: u64 = self.queued.values().map(|q| waiting_bytes(&q.pdu)).sum();
        queued + self.parked.iter().map(waiting_bytes).sum::<u64>()
    }

    fn handle(&mut self, pdu: Pdu) {
        match pdu.opcode() {
            op::SCSI_COMMAND => self.scsi_command(pdu),
            op::DATA_OUT => self.data_out(pdu),
            op::NOP_OUT => self.nop_out(pdu),
            op::TASK_MANAGEMENT => self.task_management(pdu),
            op::TEXT => self.text(pdu),
            op::LOGOUT => {
                // Answered once the commands under way have finished.
                self.logout = Some(pdu);
                self.close("logout");
            }
            op::LOGIN => self.protocol_error(&pdu.header, "Login request in the full feature phase"),
            op::SNACK => self.protocol_error(&pdu.header, "SNACK needs ErrorRecoveryLevel > 0"),
            _ => self.reject(&pdu.header, reject::COMMAND_NOT_SUPPORTED),
        }
    }

    fn refresh_luns(&mut self) {
        let generation = self.shared.targets.generation();
        if generation == self.generation {
            return;
        }
        self.generation = generation;
        if let Some(target) = self.target()
            && let Ok(fresh) = self.shared.targets.lookup(&target.name, &self.nexus.initiator_name)
        {
            self.luns = Arc::new(fresh.luns.clone());
        } else if self.target().is_some() {
            self.luns = Arc::new(LunMap::new());
        }
    }

    fn nop_out(&mut self, pdu: Pdu) {
        let itt = pdu.itt();
        if itt == NO_TAG {
            // The answer to our ping.
            if self.ping.is_some_and(|(ttt, _)| ttt == pdu.u32_at(20)) {
                self.ping = None;
            }
            return;
        }
        let mut reply = Pdu::new(op::NOP_IN);
        reply.header[1] = 0x80;
        reply.header[8..16].copy_from_slice(&pdu.header[8..16]);
        reply.set_u32(16, itt);
        reply.set_u32(20, NO_TAG);
        reply.data = pdu.data.clone();
        self.send_status(reply);
    }

    fn logout_response(&mut self, request: &Pdu) {
        // The nexus ends before the initiator hears so: a command it sends next on another
        // session must already find this one's RESERVE(6) and the like released.
        for lu in self.luns.values() {
            lu.nexus_lost(&self.nexus);
        }
        let reason = request.flags() & 0x7f;
        let mut reply = Pdu::new(op::LOGOUT_RESPONSE);
        reply.header[1] = 0x80;
        reply.header[2] = if reason == 2 { 2 } else { 0 };
        reply.set_u32(16, request.itt());
        reply.header[40..42]
            .copy_from_slice(&u16::try_from(self.params.default_time2wait).unwrap_or(u16::MAX).to_be_bytes());
        reply.header[42..44].copy_from_slice(
            &u16::try_from(self.params.default_time2retain).unwrap_or(u16::MAX).to_be_bytes(),
        );
        self.send_status(reply);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Refusal;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct NoTargets;

    impl Targets for NoTargets {
        fn lookup(&self, _: &str, _: &str) -> Result<Arc<TargetNode>, Refusal> {
            Err(Refusal::NotFound)
        }
        fn list(&self, _: &str) -> Vec<Arc<TargetNode>> {
            Vec::new()
        }
        fn generation(&self) -> u64 {
            0
        }
    }

    /// What a connection with no targets shares: keep-alive pings an hour apart, so only
    /// what a test looks at ends it.
    fn quiet(sessions: &Arc<Sessions>) -> Shared<'_> {
        let hour = Duration::from_secs(3600);
        Shared {
            targets: &NoTargets,
            sessions,
            portal: "127.0.0.1:3260,1".into(),
            keepalive: Keepalive { interval: hour, timeout: hour },
            peer: "127.0.0.1:1".parse().unwrap(),
        }
    }

    /// A discovery session whose initiator sends NOP-Outs with 64 KiB of data, then takes
    /// one byte of the echoes every 29 s (never idle for SEND_TIMEOUT): it is dropped once
    /// the output the socket made wait has not all gone within its `send_allowance`.
    /// Before, every byte taken reset a 30 s patience and the connection lived on.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn an_initiator_taking_a_byte_now_and_then_is_dropped() {
        let (near, far) = tokio::io::duplex(64 << 10);
        let sessions = Arc::new(Sessions::default());
        let shared = quiet(&sessions);
        let params = Parameters {
            max_recv_data_segment_length: 256 << 10,
            max_send_data_segment_length: 256 << 10,
            ..Parameters::default()
        };
        let login = LoggedIn {
            kind: SessionKind::Discovery,
            initiator: "iqn.2026-11.test:slow".into(),
            isid: [0x80, 0, 0, 0, 0, 1],
            params,
            stat_sn: 1,
            exp_cmd_sn: 1,
        };
        let (_stop, shutdown) = watch::channel(false);
        let account = Account::connection(&Budget::new(128 << 20));
        let (mut from_target, mut to_target) = tokio::io::split(far);
        let initiator = tokio::spawn(async move {
            let data = vec![0x6b; 64 << 10];
            for i in 0..64u32 {
                let mut pdu = Pdu::new(op::NOP_OUT | 0x40);
                pdu.header[1] = 0x80;
                pdu.set_u32(16, i);
                pdu.set_u32(20, NO_TAG);
                pdu.set_u32(24, 1);
                pdu.data = Bytes::from(data.clone());
                let mut wire = BytesMut::new();
                pdu::encode(&mut wire, &pdu, Digests::default());
                if to_target.write_all(&wire).await.is_err() {
                    break;
                }
            }
            // Keep the write half open: closing it would end the connection by itself.
            std::future::pending::<()>().await;
        });
        let trickle = tokio::spawn(async move {
            let mut byte = [0u8; 1];
            loop {
                tokio::time::sleep(Duration::from_secs(29)).await;
                if !matches!(from_target.read(&mut byte).await, Ok(1)) {
                    break;
                }
            }
        });
        let started = Instant::now();
        let served = tokio::time::timeout(
            Duration::from_secs(600),
            serve(near, BytesMut::new(), login, &shared, shutdown, account),
        )
        .await;
        initiator.abort();
        trickle.abort();
        assert!(served.is_ok(), "the connection still lives after 600 s of one byte every 29 s");
        let lived = started.elapsed();
        let allowance = send_allowance(usize::try_from(UNCHARGED_LIMIT).unwrap() + (512 << 10));
        assert!(lived <= allowance, "dropped after {lived:?}, beyond {allowance:?}");
    }

    /// A target with one 4 MiB LU of 4 KiB blocks.
    fn target() -> Arc<TargetNode> {
        use strata_scsi::{Directory, Identity, LogicalUnit, Volatile};
        let device: Arc<dyn strata_block::BlockIo> = strata_block::MemDevice::new("close", 4 << 20, 4096);
        let identity = Identity {
            vendor: "STRATA".into(),
            product: "TEST".into(),
            revision: "0001".into(),
            serial: "close".into(),
            naa: [0x60; 16],
            target_port_group: 1,
            read_only: false,
        };
        let lu =
            LogicalUnit::new(device, identity, None, Arc::new(Volatile), Arc::new(Directory::new())).unwrap();
        let mut luns = LunMap::new();
        luns.insert(0, Arc::new(lu));
        Arc::new(TargetNode {
            name: "iqn.2026-11.io.strata:close".into(),
            alias: None,
            every_lu: luns.values().cloned().collect(),
            luns,
            chap: None,
            mutual: None,
        })
    }

    /// A READ(16) of `blocks` 4 KiB blocks at LBA 0.
    fn read16(itt: u32, cmd_sn: u32, blocks: u32) -> Vec<u8> {
        let mut pdu = Pdu::new(op::SCSI_COMMAND);
        pdu.header[1] = 0x80 | 0x40;
        pdu.set_u32(16, itt);
        pdu.set_u32(20, blocks * 4096);
        pdu.set_u32(24, cmd_sn);
        pdu.header[32] = 0x88;
        pdu.header[42..46].copy_from_slice(&blocks.to_be_bytes());
        let mut wire = BytesMut::new();
        pdu::encode(&mut wire, &pdu, Digests::default());
        wire.to_vec()
    }

    /// A connection whose second read waits in the controller's line closes (the server
    /// shuts down) while its first read's data waits for an initiator that does not read:
    /// it leaves the line at once, not when its replies are given up 2 s later, so nobody
    /// keeps room for a command that will never run.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_closing_connection_leaves_the_line() {
        let (near, far) = tokio::io::duplex(64 << 10);
        let sessions = Arc::new(Sessions::default());
        let shared = quiet(&sessions);
        let params = Parameters { max_send_data_segment_length: 256 << 10, ..Parameters::default() };
        let login = LoggedIn {
            kind: SessionKind::Normal(target()),
            initiator: "iqn.2026-11.test:close".into(),
            isid: [0x80, 0, 0, 0, 0, 2],
            params,
            stat_sn: 1,
            exp_cmd_sn: 1,
        };
        let budget = Budget::new(4 << 20);
        // Another connection holds the whole shared budget.
        let mut other = Account::connection(&budget);
        other.try_charge(FLOOR + (4 << 20)).unwrap();
        let (stop, shutdown) = watch::channel(false);
        let account = Account::connection(&budget);
        let (_from_target, mut to_target) = tokio::io::split(far);
        let initiator = async {
            // 512 KiB within the floor, then 2 MiB that needs the shared budget.
            to_target.write_all(&read16(1, 1, 128)).await.unwrap();
            to_target.write_all(&read16(2, 2, 512)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            let waiting = budget.waiters();
            stop.send(true).unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            (waiting, budget.waiters())
        };
        let ((), (waiting, closing)) =
            tokio::join!(serve(near, BytesMut::new(), login, &shared, shutdown, account), initiator);
        assert_eq!(waiting, 1, "the second read waits in the controller's line");
        assert_eq!(closing, 0, "the closing connection left the line");
    }
}
