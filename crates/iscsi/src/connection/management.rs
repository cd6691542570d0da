//! Task management (ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET,
//! TARGET WARM and COLD RESET): aborted commands are not answered, and the response waits
//! until they have finished, so a host never reuses blocks under a write still running.

use strata_scsi::Reset;

use super::Connection;
use crate::login::SessionKind;
use crate::pdu::{Pdu, op};

/// Task management responses (RFC 7143 §11.6.1).
mod tmf {
    pub const COMPLETE: u8 = 0;
    pub const NO_TASK: u8 = 1;
    pub const NO_LUN: u8 = 2;
    pub const REASSIGN_UNSUPPORTED: u8 = 4;
    pub const UNSUPPORTED: u8 = 5;
    pub const REJECTED: u8 = 255;
}

/// A task management response waiting for aborted commands to finish.
pub(super) struct PendingTmf {
    reply: Pdu,
    waiting: Vec<u32>,
    cold_reset: bool,
}

impl Connection<'_> {
    pub(super) fn task_management(&mut self, pdu: Pdu) {
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
                if let Some(task) = self.receiving.remove(&referenced) {
                    self.unsent += task.charge;
                    tmf::COMPLETE
                } else if let Some(at) = self.parked.iter().position(|p| p.itt() == referenced) {
                    self.parked.remove(at);
                    tmf::COMPLETE
                } else if let Some(task) = self.executing.get_mut(&referenced) {
                    task.aborted = true;
                    if !task.background {
                        waiting.push(referenced);
                    }
                    tmf::COMPLETE
                } else {
                    let ref_cmd_sn = pdu.u32_at(32);
                    let queued =
                        self.queued.iter().find(|(_, q)| q.pdu.itt() == referenced).map(|(sn, _)| *sn);
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
                // Every LU of the target, including those masked from this initiator.
                let node = self
                    .target()
                    .and_then(|t| self.shared.targets.lookup(&t.name, &self.nexus.initiator_name).ok());
                match node {
                    Some(node) => node.every_lu.iter().for_each(|lu| lu.reset(&self.nexus, reset)),
                    None => self.luns.values().for_each(|lu| lu.reset(&self.nexus, reset)),
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
        let mut released = 0;
        self.receiving.retain(|_, t| {
            let keep = lun.is_some_and(|l| l != t.lun);
            if !keep {
                released += t.charge;
            }
            keep
        });
        self.unsent += released;
        self.parked.retain(|p| lun.is_some_and(|l| l != strata_scsi::decode_lun(p.lun())));
        self.queued.retain(|_, q| {
            let p = &q.pdu;
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

    pub(super) fn tmf_progress(&mut self, finished: u32) {
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
}
