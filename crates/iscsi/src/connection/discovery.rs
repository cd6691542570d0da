//! Text requests: SendTargets, in discovery sessions (every target the initiator may
//! use) and normal ones (its own target), with answers longer than a PDU continued.

use std::sync::Arc;

use bytes::Bytes;

use super::Connection;
use crate::TargetNode;
use crate::login::SessionKind;
use crate::pdu::{NO_TAG, Pdu, op, reject};
use crate::text::Pairs;

impl Connection<'_> {
    pub(super) fn text(&mut self, pdu: Pdu) {
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
}
