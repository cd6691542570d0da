//! The full feature phase of one connection (RFC 7143 §4): commands in CmdSN order, write
//! data by immediate data, unsolicited Data-Out and R2T, read data by Data-In with the
//! status in the last PDU, task management, NOP pings both ways, SendTargets and logout.
//!
//! One task owns the socket, as in the NBD server: it decodes every whole PDU in its read
//! buffer, starts the commands whose data is complete, and writes what finished. Commands
//! already started always run to completion (the block-IO contract); an aborted command's
//! response is not sent, and the task management response waits for it.
//!
//! At ErrorRecoveryLevel 0 a protocol error (a bad digest, a PDU too long, immediate
//! data beyond what was negotiated) is answered with a Reject and ends the connection.
//! Data-Out out of sequence (DataSN, offset, transfer tag, beyond its burst) ends only its
//! command, with CHECK CONDITION: the header was sound, so the connection still frames.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use strata_scsi::{Command, LunMap, Nexus, Outcome, Reset, Status};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::login::{COMMAND_WINDOW, LoggedIn, SessionKind};
use crate::negotiate::Parameters;
use crate::pdu::{self, DecodeError, Digests, NO_TAG, Pdu, op, reject};
use crate::session::Sessions;
use crate::text::Pairs;
use crate::{TargetNode, Targets};

/// Largest expected data transfer length a command may announce.
const MAX_TRANSFER: u32 = 32 << 20;
/// Bytes the read buffer has free before each read from the socket.
const READ_ROOM: usize = 256 << 10;

/// Fixed-format sense: ILLEGAL REQUEST, INVALID FIELD IN CDB (for a transfer too large to
/// take).
const INVALID_FIELD_IN_CDB: [u8; 18] = [0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0];

/// Fixed-format sense: ABORTED COMMAND, DATA PHASE ERROR (Data-Out out of sequence).
const DATA_PHASE_ERROR: [u8; 18] = [0x70, 0, 0x0b, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x4b, 0, 0, 0, 0, 0];

/// SCSI Command flags.
const READ: u8 = 0x40;
const WRITE: u8 = 0x20;
/// Data-In flags.
const ACK_STATUS: u8 = 0x01;
const UNDERFLOW: u8 = 0x02;
const OVERFLOW: u8 = 0x04;

/// Task management responses (RFC 7143 §11.6.1).
mod tmf {
    pub const COMPLETE: u8 = 0;
    pub const NO_TASK: u8 = 1;
    pub const NO_LUN: u8 = 2;
    pub const REASSIGN_UNSUPPORTED: u8 = 4;
    pub const UNSUPPORTED: u8 = 5;
    pub const REJECTED: u8 = 255;
}

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
}

/// A finished command: its ITT, outcome, expected transfer length, read flag, and the
/// data-out length its CDB asked for (for write residuals).
type Done = (u32, Outcome, u32, bool, u64);
type Running = Pin<Box<dyn Future<Output = Done> + Send>>;

/// What a connection has to send: small PDUs are copied into one buffer, large data
/// segments are queued as they are and go out with the rest in one vectored write.
#[derive(Default)]
struct Outbox {
    buf: BytesMut,
    frames: Vec<Bytes>,
}

impl Outbox {
    /// Data segments at least this long are not copied.
    const COPY_LIMIT: usize = 16 << 10;

    fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.frames.is_empty()
    }

    /// A data segment with its padding and digest, after the header just encoded.
    fn data(&mut self, data: Bytes, digests: Digests) {
        if data.len() < Self::COPY_LIMIT {
            pdu::encode_data(&mut self.buf, &data, digests);
            return;
        }
        let (trailer, len) = pdu::data_trailer(&data, digests);
        self.frames.push(self.buf.split().freeze());
        self.frames.push(data);
        self.buf.put_slice(&trailer[..len]);
    }

    async fn flush<W: AsyncWrite + Unpin>(&mut self, stream: &mut W) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.frames.push(self.buf.split().freeze());
        }
        let mut frames: std::collections::VecDeque<Bytes> =
            self.frames.drain(..).filter(|f| !f.is_empty()).collect();
        while !frames.is_empty() {
            let slices: Vec<std::io::IoSlice<'_>> =
                frames.iter().take(64).map(|f| std::io::IoSlice::new(f)).collect();
            let mut written = stream.write_vectored(&slices).await?;
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            while written > 0 {
                let front = frames.front_mut().expect("written bytes came from frames");
                if written >= front.len() {
                    written -= front.len();
                    frames.pop_front();
                } else {
                    bytes::Buf::advance(front, written);
                    written = 0;
                }
            }
        }
        self.buf.reserve(64 << 10);
        Ok(())
    }
}

/// A command being executed.
struct Executing {
    lun: u64,
    /// Aborted: its response is not sent.
    aborted: bool,
    /// Its work goes on by itself (SANITIZE runs on a thread of its own), so aborts and a
    /// closing connection need not wait for it.
    background: bool,
}

/// SANITIZE, the one command whose work outlives it.
const SANITIZE: u8 = 0x48;

/// A task management response waiting for aborted commands to finish.
struct PendingTmf {
    reply: Pdu,
    waiting: Vec<u32>,
    cold_reset: bool,
}

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
    queued: BTreeMap<u32, Pdu>,
    receiving: HashMap<u32, Receiving>,
    /// Commands executing, by ITT.
    executing: HashMap<u32, Executing>,
    running: FuturesUnordered<Running>,
    tmfs: Vec<PendingTmf>,
    next_ttt: u32,
    /// SendTargets answers too long for one PDU: the rest, by target transfer tag.
    text_rest: Option<(u32, Bytes)>,
    output: Outbox,
    /// A reason to stop reading and close once work drains.
    closing: Option<String>,
    logout: Option<Pdu>,
    ping: Option<(u32, tokio::time::Instant)>,
}

/// Serves the full feature phase of a logged-in connection until it ends.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    mut input: BytesMut,
    login: LoggedIn,
    shared: &Shared<'_>,
    mut shutdown: watch::Receiver<bool>,
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
        closing: None,
        logout: None,
        ping: None,
    };
    let mut writable = true;
    let mut last_heard = tokio::time::Instant::now();
    loop {
        while conn.closing.is_none() {
            match pdu::decode(&mut input, conn.digests, conn.params.max_recv_data_segment_length) {
                Ok(Some(pdu)) => {
                    last_heard = tokio::time::Instant::now();
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
            writable = conn.output.flush(&mut stream).await.is_ok();
        }
        if conn.closing.is_some() && conn.executing.values().all(|e| e.background) {
            // Only work that goes on by itself is left: dropping its future is safe.
            break;
        }
        if input.capacity() - input.len() < READ_ROOM / 4 {
            input.reserve(READ_ROOM);
        }
        let reading = conn.closing.is_none();
        let deadline = match conn.ping {
            Some((_, sent)) => sent + shared.keepalive.timeout,
            None => last_heard + shared.keepalive.interval,
        };
        tokio::select! {
            biased;
            Some(done) = conn.running.next(), if !conn.running.is_empty() => {
                conn.complete(done);
                while let Some(Some(done)) = conn.running.next().now_or_never() {
                    conn.complete(done);
                }
            }
            read = stream.read_buf(&mut input), if reading => {
                if !matches!(read, Ok(n) if n > 0) {
                    conn.close("the initiator closed the connection");
                }
            }
            () = tokio::time::sleep_until(deadline), if reading => {
                if conn.ping.is_some() {
                    tracing::warn!(peer = %shared.peer, "iSCSI initiator did not answer a NOP-In ping; dropping the connection");
                    conn.close("ping timed out");
                } else {
                    conn.send_ping();
                }
            }
            _ = stopped(stop.as_mut()), if reading => conn.close("session reinstated or target reset"),
            _ = shutdown.changed(), if reading => conn.close("server shutting down"),
        }
        if !writable {
            conn.close("the socket refuses writes");
        }
    }
    if writable {
        let _ = stream.shutdown().await;
    }
    for lu in conn.luns.values() {
        lu.nexus_lost(&conn.nexus);
    }
    tracing::debug!(peer = %shared.peer, why = conn.closing.as_deref().unwrap_or(""), "iSCSI connection closed");
    drop(handle);
}

async fn stopped(stop: Option<&mut watch::Receiver<bool>>) {
    match stop {
        Some(stop) => {
            let _ = stop.wait_for(|s| *s).await;
        }
        None => std::future::pending().await,
    }
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
    fn close(&mut self, why: &str) {
        if self.closing.is_none() {
            self.closing = Some(why.to_string());
        }
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
        self.ping = Some((ttt, tokio::time::Instant::now()));
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
                self.handle(next);
            }
        } else if serial_lt(self.exp_cmd_sn, cmd_sn) && cmd_sn.wrapping_sub(self.exp_cmd_sn) < COMMAND_WINDOW
        {
            self.queued.insert(cmd_sn, pdu);
        } else {
            // Outside the window: silently ignored (RFC 7143 §4.2.2.1).
            tracing::debug!(cmd_sn, exp = self.exp_cmd_sn, "ignoring a command outside the CmdSN window");
        }
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

    fn scsi_command(&mut self, pdu: Pdu) {
        if matches!(self.kind, SessionKind::Discovery) {
            self.protocol_error(&pdu.header, "SCSI command in a discovery session");
            return;
        }
        let itt = pdu.itt();
        if self.receiving.contains_key(&itt) || self.executing.contains_key(&itt) {
            self.protocol_error(&pdu.header, "SCSI command reuses the ITT of a task under way");
            return;
        }
        let flags = pdu.flags();
        let edtl = pdu.u32_at(20);
        let (read, write) = (flags & READ != 0, flags & WRITE != 0);
        let lun = strata_scsi::decode_lun(pdu.lun());
        let mut cdb = BytesMut::from(&pdu.header[32..48]);
        if !pdu.ahs.is_empty() {
            // An extended CDB AHS (type 1) carries the bytes past the sixteenth.
            if pdu.ahs.len() >= 4 && pdu.ahs[2] == 1 {
                let len = usize::from(u16::from_be_bytes([pdu.ahs[0], pdu.ahs[1]])).saturating_sub(1);
                cdb.extend_from_slice(&pdu.ahs[4..(4 + len).min(pdu.ahs.len())]);
            }
        }
        let cdb = cdb.freeze();
        let immediate = pdu.data.len();
        if !write && immediate > 0 {
            self.protocol_error(&pdu.header, "data with a command that has no W bit");
            return;
        }
        if write && immediate > 0 && !self.params.immediate_data {
            self.protocol_error(&pdu.header, "immediate data when ImmediateData=No");
            return;
        }
        if immediate as u64 > u64::from(edtl.min(self.params.first_burst_length)) {
            self.protocol_error(&pdu.header, "immediate data beyond the expected transfer or first burst");
            return;
        }
        self.refresh_luns();
        if !write || edtl == 0 {
            self.execute(itt, lun, cdb, Bytes::new(), edtl, read);
            return;
        }
        if edtl > MAX_TRANSFER {
            // Too large to buffer: answer at once; unsolicited data for it is ignored.
            let outcome = Outcome {
                status: Status::CheckCondition,
                data: Bytes::new(),
                sense: Some(Bytes::from_static(&INVALID_FIELD_IN_CDB)),
            };
            self.respond(itt, outcome, edtl, false, 0);
            return;
        }
        let unsolicited = if self.params.initial_r2t || pdu.is_final() {
            len32(immediate)
        } else {
            edtl.min(self.params.first_burst_length)
        };
        let mut data = BytesMut::with_capacity(edtl as usize);
        data.extend_from_slice(&pdu.data);
        let task = Receiving {
            lun,
            cdb,
            edtl,
            read,
            data,
            ttt: NO_TAG,
            burst_end: unsolicited,
            data_sn: 0,
            r2t_sn: 0,
        };
        self.receiving.insert(itt, task);
        self.advance_write(itt, pdu.lun());
    }

    /// After data arrived for `itt`: execute it when complete, or ask for the next burst.
    fn advance_write(&mut self, itt: u32, lun_bytes: [u8; 8]) {
        let Some(task) = self.receiving.get_mut(&itt) else { return };
        let received = len32(task.data.len());
        if received == task.edtl {
            let task = self.receiving.remove(&itt).expect("present");
            self.execute(itt, task.lun, task.cdb, task.data.freeze(), task.edtl, task.read);
            return;
        }
        if received < task.burst_end {
            return; // the current burst is still arriving
        }
        let len = (task.edtl - received).min(self.params.max_burst_length);
        let ttt = {
            let t = self.next_ttt;
            self.next_ttt = if t.wrapping_add(1) == NO_TAG { 1 } else { t.wrapping_add(1) };
            t
        };
        let task = self.receiving.get_mut(&itt).expect("present");
        task.ttt = ttt;
        task.burst_end = received + len;
        task.data_sn = 0;
        let r2t_sn = task.r2t_sn;
        task.r2t_sn += 1;
        let mut r2t = Pdu::new(op::R2T);
        r2t.header[1] = 0x80;
        r2t.header[8..16].copy_from_slice(&lun_bytes);
        r2t.set_u32(16, itt);
        r2t.set_u32(20, ttt);
        r2t.set_u32(24, self.stat_sn);
        r2t.set_u32(36, r2t_sn);
        r2t.set_u32(40, received);
        r2t.set_u32(44, len);
        self.send(r2t);
    }

    fn data_out(&mut self, pdu: Pdu) {
        let itt = pdu.itt();
        let Some(task) = self.receiving.get_mut(&itt) else {
            // Data for a command refused at once, or aborted: discard it.
            tracing::debug!(itt, "Data-Out for no task under way; ignored");
            return;
        };
        let (ttt, data_sn, offset) = (pdu.u32_at(20), pdu.u32_at(36), pdu.u32_at(40));
        let received = len32(task.data.len());
        let why = if ttt != task.ttt {
            Some("Data-Out with a target transfer tag that does not match the burst")
        } else if data_sn != task.data_sn {
            Some("Data-Out DataSN out of order")
        } else if offset != received {
            Some("Data-Out buffer offset out of order")
        } else if u64::from(offset) + pdu.data.len() as u64 > u64::from(task.burst_end) {
            Some("Data-Out beyond the burst or the expected transfer length")
        } else if pdu.is_final() && offset as usize + pdu.data.len() != task.burst_end as usize {
            Some("Data-Out sequence ended before its burst was complete")
        } else {
            None
        };
        if let Some(why) = why {
            // The header is sound, so framing holds: end this task with CHECK CONDITION
            // (ABORTED COMMAND, DATA PHASE ERROR) and keep the connection; later Data-Out
            // for it is ignored.
            tracing::warn!(peer = %self.shared.peer, itt, why, "iSCSI data sequence error; the command is aborted");
            let task = self.receiving.remove(&itt).expect("present");
            let outcome = Outcome {
                status: Status::CheckCondition,
                data: Bytes::new(),
                sense: Some(Bytes::from_static(&DATA_PHASE_ERROR)),
            };
            self.respond(itt, outcome, task.edtl, false, 0);
            return;
        }
        task.data_sn += 1;
        task.data.extend_from_slice(&pdu.data);
        if pdu.is_final() || len32(task.data.len()) == task.burst_end {
            self.advance_write(itt, pdu.lun());
        }
    }

    fn execute(&mut self, itt: u32, lun: u64, cdb: Bytes, data_out: Bytes, edtl: u32, read: bool) {
        let luns = self.luns.clone();
        let nexus = self.nexus.clone();
        let command = Command { cdb, data_out, allocation: if read { edtl } else { 0 } };
        let background = command.cdb.first() == Some(&SANITIZE);
        self.executing.insert(itt, Executing { lun, aborted: false, background });
        self.running.push(Box::pin(async move {
            let outcome = strata_scsi::execute(&luns, lun, &nexus, &command).await;
            let wanted_out = luns.get(&lun).map_or(0, |lu| lu.data_out_length(&command.cdb));
            (itt, outcome, edtl, read, wanted_out)
        }));
    }

    fn complete(&mut self, (itt, outcome, edtl, read, wanted_out): Done) {
        let aborted = self.executing.remove(&itt).is_some_and(|e| e.aborted);
        if aborted {
            self.tmf_progress(itt);
        } else {
            self.respond(itt, outcome, edtl, read, wanted_out);
        }
    }

    /// Sends a command's data and status. Residuals compare what the command wanted to
    /// move (its data-in, or the data-out its CDB asks for) with the expected transfer
    /// length: more is an overflow, less an underflow.
    fn respond(&mut self, itt: u32, outcome: Outcome, edtl: u32, read: bool, wanted_out: u64) {
        let produced = outcome.data.len() as u64;
        let expected = if read { u64::from(edtl) } else { 0 };
        let sent = usize::try_from(produced.min(expected)).unwrap_or(usize::MAX);
        let wanted = if read || (wanted_out == 0 && produced > 0) { produced } else { wanted_out };
        let edtl = u64::from(edtl);
        let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        let (residual_flag, residual) = if wanted > edtl {
            (OVERFLOW, clamp(wanted - edtl))
        } else if wanted < edtl {
            (UNDERFLOW, clamp(edtl - wanted))
        } else {
            (0, 0)
        };
        let status_in_data = outcome.sense.is_none() && sent > 0;
        let mut offset = 0usize;
        let mut data_sn = 0u32;
        let segment = self.params.max_send_data_segment_length as usize;
        let burst = self.params.max_burst_length as usize;
        while offset < sent {
            let len = (sent - offset).min(segment).min(burst - offset % burst);
            let last = offset + len == sent;
            let mut pdu = Pdu::new(op::DATA_IN);
            let end_of_sequence = last || (offset + len).is_multiple_of(burst);
            pdu.header[1] = if end_of_sequence { 0x80 } else { 0 };
            pdu.set_u32(16, itt);
            pdu.set_u32(20, NO_TAG);
            pdu.set_u32(36, data_sn);
            pdu.set_u32(40, len32(offset));
            let chunk = outcome.data.slice(offset..offset + len);
            if last && status_in_data {
                pdu.header[1] |= ACK_STATUS | residual_flag;
                pdu.header[3] = outcome.status as u8;
                pdu.set_u32(44, residual);
                pdu.set_u32(24, self.stat_sn);
                self.stat_sn = self.stat_sn.wrapping_add(1);
            }
            pdu.set_u32(28, self.exp_cmd_sn);
            pdu.set_u32(32, self.exp_cmd_sn.wrapping_add(COMMAND_WINDOW - 1));
            pdu::encode_header(&mut self.output.buf, &pdu, len, self.digests);
            self.output.data(chunk, self.digests);
            data_sn += 1;
            offset += len;
        }
        if status_in_data {
            return;
        }
        let mut pdu = Pdu::new(op::SCSI_RESPONSE);
        pdu.header[1] = 0x80 | residual_flag;
        pdu.header[3] = outcome.status as u8;
        pdu.set_u32(16, itt);
        pdu.set_u32(36, data_sn);
        pdu.set_u32(44, residual);
        if let Some(sense) = &outcome.sense {
            let mut data = BytesMut::with_capacity(2 + sense.len());
            data.put_u16(u16::try_from(sense.len()).unwrap_or(u16::MAX));
            data.extend_from_slice(sense);
            pdu.data = data.freeze();
        }
        self.send_status(pdu);
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

    fn task_management(&mut self, pdu: Pdu) {
        let function = pdu.flags() & 0x7f;
        let lun = strata_scsi::decode_lun(pdu.lun());
        let mut reply = Pdu::new(op::TASK_MANAGEMENT_RESPONSE);
        reply.header[1] = 0x80;
        reply.set_u32(16, pdu.itt());
        if matches!(self.kind, SessionKind::Discovery) {
            reply.header[2] = tmf::REJECTED;
            self.send_status(reply);
            return;
        }
        self.refresh_luns();
        let mut waiting = Vec::new();
        let mut cold_reset = false;
        let response = match function {
            1 => {
                // ABORT TASK
                let referenced = pdu.u32_at(20);
                if self.receiving.remove(&referenced).is_some() {
                    tmf::COMPLETE
                } else if let Some(task) = self.executing.get_mut(&referenced) {
                    task.aborted = true;
                    if !task.background {
                        waiting.push(referenced);
                    }
                    tmf::COMPLETE
                } else {
                    let ref_cmd_sn = pdu.u32_at(32);
                    let queued = self.queued.iter().find(|(_, p)| p.itt() == referenced).map(|(sn, _)| *sn);
                    match queued {
                        Some(sn) if sn == ref_cmd_sn => {
                            self.queued.remove(&sn);
                            tmf::COMPLETE
                        }
                        _ => tmf::NO_TASK,
                    }
                }
            }
            2 | 4 | 5 => {
                // ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET
                if !self.luns.contains_key(&lun) {
                    tmf::NO_LUN
                } else {
                    waiting = self.abort_all(Some(lun));
                    if function == 5 {
                        self.luns[&lun].reset(&self.nexus, Reset::LogicalUnit);
                    }
                    tmf::COMPLETE
                }
            }
            6 | 7 => {
                // TARGET WARM RESET, TARGET COLD RESET
                waiting = self.abort_all(None);
                let reset = if function == 6 { Reset::TargetWarm } else { Reset::TargetCold };
                for lu in self.luns.values() {
                    lu.reset(&self.nexus, reset);
                }
                cold_reset = function == 7;
                tmf::COMPLETE
            }
            3 => tmf::UNSUPPORTED,
            8 => tmf::REASSIGN_UNSUPPORTED,
            _ => tmf::REJECTED,
        };
        reply.header[2] = response;
        let pending = PendingTmf { reply, waiting, cold_reset };
        if pending.waiting.is_empty() {
            self.finish_tmf(pending);
        } else {
            self.tmfs.push(pending);
        }
    }

    /// Aborts every task of this session (on `lun`, or all); returns those still running.
    fn abort_all(&mut self, lun: Option<u64>) -> Vec<u32> {
        self.receiving.retain(|_, t| lun.is_some_and(|l| l != t.lun));
        self.queued.retain(|_, p| {
            p.opcode() != op::SCSI_COMMAND || lun.is_some_and(|l| l != strata_scsi::decode_lun(p.lun()))
        });
        let mut waiting = Vec::new();
        for (itt, task) in &mut self.executing {
            if lun.is_none_or(|l| l == task.lun) {
                task.aborted = true;
                if !task.background {
                    waiting.push(*itt);
                }
            }
        }
        waiting
    }

    fn tmf_progress(&mut self, finished: u32) {
        for tmf in &mut self.tmfs {
            tmf.waiting.retain(|itt| *itt != finished);
        }
        let (ready, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.tmfs).into_iter().partition(|t| t.waiting.is_empty());
        self.tmfs = rest;
        for tmf in ready {
            self.finish_tmf(tmf);
        }
    }

    fn finish_tmf(&mut self, tmf: PendingTmf) {
        self.send_status(tmf.reply);
        if tmf.cold_reset
            && let Some(target) = self.target().map(|t| t.name.clone())
        {
            // A cold reset ends every connection to the target, this one too.
            self.shared.sessions.stop_target(&target);
            self.close("target cold reset");
        }
    }

    fn text(&mut self, pdu: Pdu) {
        let ttt = pdu.u32_at(20);
        let mut reply = Pdu::new(op::TEXT_RESPONSE);
        reply.header[8..16].copy_from_slice(&pdu.header[8..16]);
        reply.set_u32(16, pdu.itt());
        let answer = match self.text_rest.take() {
            Some((tag, rest)) if tag == ttt => rest,
            _ => match Pairs::parse(&pdu.data) {
                Ok(offered) => Bytes::from(self.text_answer(&offered).encode()),
                Err(e) => {
                    tracing::debug!(error = %e, "malformed Text request");
                    self.reject(&pdu.header, reject::INVALID_PDU_FIELD);
                    return;
                }
            },
        };
        let max = self.params.max_send_data_segment_length as usize;
        if answer.len() > max {
            let tag = self.take_ttt();
            reply.header[1] = 0x40; // C: more follows
            reply.set_u32(20, tag);
            reply.data = answer.slice(..max);
            self.text_rest = Some((tag, answer.slice(max..)));
        } else {
            reply.header[1] = 0x80;
            reply.set_u32(20, NO_TAG);
            reply.data = answer;
        }
        self.send_status(reply);
    }

    fn text_answer(&self, offered: &Pairs) -> Pairs {
        let mut answer = Pairs::default();
        for (key, value) in &offered.0 {
            if key != "SendTargets" {
                answer.push(key, "NotUnderstood");
                continue;
            }
            let targets: Vec<Arc<TargetNode>> = match (value.as_str(), &self.kind) {
                ("All", SessionKind::Discovery) => self.shared.targets.list(&self.nexus.initiator_name),
                ("", SessionKind::Normal(t)) => vec![t.clone()],
                (name, _) => self
                    .shared
                    .targets
                    .lookup(name, &self.nexus.initiator_name)
                    .ok()
                    .into_iter()
                    .filter(|t| {
                        matches!(self.kind, SessionKind::Discovery)
                            || self.target().is_some_and(|s| s.name == t.name)
                    })
                    .collect(),
            };
            for target in targets {
                answer.push("TargetName", target.name.clone());
                answer.push("TargetAddress", format!("{},1", self.shared.portal));
            }
        }
        answer
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
