//! SCSI commands on a connection: collecting a write's data (immediate, unsolicited
//! Data-Out, R2T bursts), running the command against the session's LUNs, and answering
//! with Data-In and status, with residuals.

use bytes::{BufMut, Bytes, BytesMut};
use strata_scsi::{Command, Outcome, Status};

use super::{Connection, Done, Executing, Receiving, SANITIZE, WAITING_LIMIT, keep, len32, waiting_bytes};
use crate::login::{COMMAND_WINDOW, SessionKind};
use crate::pdu::{self, NO_TAG, Pdu, op};

/// Largest expected data transfer length a command may announce.
const MAX_TRANSFER: u32 = 32 << 20;
/// Commands a connection holds at once (collecting data or running): twice the CmdSN
/// window, leaving room for immediate commands.
const MAX_TASKS: usize = 2 * COMMAND_WINDOW as usize;
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

impl Connection<'_> {
    pub(super) fn scsi_command(&mut self, pdu: Pdu) {
        if !self.parked.is_empty() {
            // Behind commands waiting for the budget: keep the initiator's order.
            self.park(pdu);
            return;
        }
        if let Some(pdu) = self.command(pdu) {
            self.park(pdu);
        }
    }

    /// Whether unsolicited Data-Out follows this command (InitialR2T=No, no F bit): such a
    /// write is never parked, since its Data-Out would arrive for no task and be lost.
    fn data_out_follows(&self, pdu: &Pdu) -> bool {
        pdu.flags() & WRITE != 0 && !self.params.initial_r2t && !pdu.is_final()
    }

    /// Parks a command behind the others waiting for the budget, with its own copy of its
    /// data, or answers TASK SET FULL when the connection holds MAX_TASKS, its waiting
    /// commands would keep more than WAITING_LIMIT, or unsolicited Data-Out follows it.
    fn park(&mut self, mut pdu: Pdu) {
        let tasks = self.receiving.len() + self.executing.len() + self.parked.len();
        if tasks >= MAX_TASKS
            || self.waiting() + waiting_bytes(&pdu) > WAITING_LIMIT
            || self.data_out_follows(&pdu)
        {
            self.task_set_full(&pdu);
            return;
        }
        keep(&mut pdu);
        self.parked.push_back(pdu);
    }

    /// Answers a command the connection cannot take now with TASK SET FULL: the initiator
    /// sends it again later.
    pub(super) fn task_set_full(&mut self, pdu: &Pdu) {
        let outcome = Outcome { status: Status::TaskSetFull, data: Bytes::new(), sense: None };
        self.respond(pdu.itt(), outcome, pdu.u32_at(20), false, 0);
    }

    /// Starts the parked commands whose charges now fit, in order. With none left parked
    /// (all started, aborted or refused), the connection waits for nothing and leaves the
    /// controller's line.
    pub(super) fn resume_parked(&mut self) {
        while let Some(pdu) = self.parked.pop_front() {
            if let Some(pdu) = self.command(pdu) {
                // Still the oldest.
                self.parked.push_front(pdu);
                return;
            }
        }
        self.account.leave_line();
    }

    /// Takes a SCSI command: refuses it, starts collecting its data or running it, or,
    /// while its charge does not fit, gives it back to be parked.
    #[must_use]
    fn command(&mut self, pdu: Pdu) -> Option<Pdu> {
        self.blocked = None;
        if matches!(self.kind, SessionKind::Discovery) {
            self.protocol_error(&pdu.header, "SCSI command in a discovery session");
            return None;
        }
        let itt = pdu.itt();
        if self.receiving.contains_key(&itt) || self.executing.contains_key(&itt) {
            self.protocol_error(&pdu.header, "SCSI command reuses the ITT of a task under way");
            return None;
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
            return None;
        }
        if write && immediate > 0 && !self.params.immediate_data {
            self.protocol_error(&pdu.header, "immediate data when ImmediateData=No");
            return None;
        }
        if immediate as u64 > u64::from(edtl.min(self.params.first_burst_length)) {
            self.protocol_error(&pdu.header, "immediate data beyond the expected transfer or first burst");
            return None;
        }
        self.refresh_luns();
        if self.receiving.len() + self.executing.len() + self.parked.len() >= MAX_TASKS {
            // Immediate commands take no CmdSN, so the window does not bound them.
            self.task_set_full(&pdu);
            return None;
        }
        if edtl > MAX_TRANSFER && write {
            // Too large to buffer: answer at once; unsolicited data for it is ignored.
            let outcome = Outcome {
                status: Status::CheckCondition,
                data: Bytes::new(),
                sense: Some(Bytes::from_static(&INVALID_FIELD_IN_CDB)),
            };
            self.respond(itt, outcome, edtl, false, 0);
            return None;
        }
        // The data-in its CDB will produce (whatever the initiator expects) and a write's
        // data-out, from one parse that also gives the data-out a write's residual is
        // measured against.
        let transfer = strata_scsi::transfer(&self.luns, lun, &cdb);
        let data_out = if write { u64::from(edtl) } else { 0 };
        let charge = transfer.data_in + data_out;
        // A command that holds nothing (TEST UNIT READY) never waits, even while a large
        // command runs alone beyond the connection's budget.
        if charge > 0
            && let Err(full) = self.account.try_charge(charge)
        {
            self.blocked = Some(full);
            return Some(pdu);
        }
        // Only writes need what their CDB asks for (reads count the data they produce).
        let wanted_out = if read { 0 } else { transfer.data_out };
        if !write || edtl == 0 {
            self.execute(itt, lun, cdb, Bytes::new(), edtl, read, charge, wanted_out);
            return None;
        }
        let unsolicited = if self.params.initial_r2t || pdu.is_final() {
            len32(immediate)
        } else {
            edtl.min(self.params.first_burst_length)
        };
        // Room for what comes unasked (immediate and unsolicited data); each R2T reserves
        // its burst, so a length announced but not yet asked for costs nothing.
        let mut data = BytesMut::with_capacity(unsolicited.max(len32(pdu.data.len())) as usize);
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
            charge,
            wanted_out,
        };
        self.receiving.insert(itt, task);
        self.advance_write(itt, pdu.lun());
        None
    }

    /// After data arrived for `itt`: execute it when complete, or ask for the next burst.
    fn advance_write(&mut self, itt: u32, lun_bytes: [u8; 8]) {
        let Some(task) = self.receiving.get_mut(&itt) else { return };
        let received = len32(task.data.len());
        if received == task.edtl {
            let task = self.receiving.remove(&itt).expect("present");
            let data = task.data.freeze();
            self.execute(itt, task.lun, task.cdb, data, task.edtl, task.read, task.charge, task.wanted_out);
            return;
        }
        if received < task.burst_end {
            return; // the current burst is still arriving
        }
        let len = (task.edtl - received).min(self.params.max_burst_length);
        let ttt = self.take_ttt();
        let task = self.receiving.get_mut(&itt).expect("present");
        task.ttt = ttt;
        task.burst_end = received + len;
        task.data.reserve(len as usize);
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

    pub(super) fn data_out(&mut self, pdu: Pdu) {
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
            self.unsent += task.charge;
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

    #[allow(clippy::too_many_arguments)]
    fn execute(
        &mut self,
        itt: u32,
        lun: u64,
        cdb: Bytes,
        data_out: Bytes,
        edtl: u32,
        read: bool,
        charge: u64,
        wanted_out: u64,
    ) {
        let luns = self.luns.clone();
        let nexus = self.nexus.clone();
        let command = Command { cdb, data_out, allocation: if read { edtl } else { 0 } };
        let background = command.cdb.first() == Some(&SANITIZE);
        self.executing.insert(itt, Executing { lun, aborted: false, background, charge });
        self.running.push(Box::pin(async move {
            let outcome = strata_scsi::execute(&luns, lun, &nexus, &command).await;
            (itt, outcome, edtl, read, wanted_out)
        }));
    }

    pub(super) fn complete(&mut self, (itt, outcome, edtl, read, wanted_out): Done) {
        let (aborted, charge) = self.executing.remove(&itt).map_or((false, 0), |e| (e.aborted, e.charge));
        // Done, a command keeps at most its expected transfer length, released once its
        // response is on the socket: a read whose CDB asked for more gives the rest back now.
        let kept = if aborted { 0 } else { charge.min(u64::from(edtl)) };
        self.account.release(charge - kept);
        self.unsent += kept;
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
        // Data-In holds only what is sent: a command that produced more than its expected
        // transfer length (and its charge) does not keep its whole buffer queued.
        let data = if sent < outcome.data.len() {
            Bytes::copy_from_slice(&outcome.data[..sent])
        } else {
            outcome.data
        };
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
            let chunk = data.slice(offset..offset + len);
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
}
