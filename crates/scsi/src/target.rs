//! The LUNs an initiator sees: REPORT LUNS, commands to LUNs with no logical unit, and the
//! SAM-5 single-level LUN encoding the transport shares.
//!
//! | LUN encoding (first two bytes, the rest zero) | LUNs          |
//! |-----------------------------------------------|---------------|
//! | `00 LL` peripheral device addressing          | 0..=255       |
//! | `4H LL` flat space addressing                 | 256..=16383   |
//! | `D2 XX XX XX` extended flat space             | 16384..2^24   |

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::cdb::{self, Action, op};
use crate::inquiry::absent_lun;
use crate::lu::LogicalUnit;
use crate::sense::{self, Sense};
use crate::{Command, Nexus, Outcome};

/// LUNs one initiator sees on a target (already masked by the caller).
pub type LunMap = BTreeMap<u64, Arc<LogicalUnit>>;

/// The 8-byte SAM-5 LUN for `lun` (single level). LUNs of 2^24 and above cannot be
/// addressed; only their low 24 bits are kept.
pub fn encode_lun(lun: u64) -> [u8; 8] {
    let b = lun.to_be_bytes();
    match lun {
        0..=0xFF => [0, b[7], 0, 0, 0, 0, 0, 0],
        0x100..=0x3FFF => [0x40 | b[6], b[7], 0, 0, 0, 0, 0, 0],
        _ => [0xD2, b[5], b[6], b[7], 0, 0, 0, 0],
    }
}

/// The LUN number an 8-byte SAM-5 LUN names. Encodings this crate never produces
/// (multi-level, logical unit addressing) give a number no LUN map holds.
pub fn decode_lun(lun: [u8; 8]) -> u64 {
    let raw = u64::from_be_bytes(lun);
    let single_level = lun[2..].iter().all(|&b| b == 0);
    match lun[0] >> 6 {
        0 if single_level && lun[0] == 0 => u64::from(lun[1]),
        1 if single_level => (u64::from(lun[0] & 0x3F) << 8) | u64::from(lun[1]),
        3 if lun[0] == 0xD2 && lun[4..].iter().all(|&b| b == 0) => {
            u64::from_be_bytes([0, 0, 0, 0, 0, lun[1], lun[2], lun[3]])
        }
        // Never a valid LUN number: the top bits are set.
        _ => raw | (1 << 63),
    }
}

/// REPORT LUNS parameter data for `luns`.
pub(crate) fn report_luns(luns: impl Iterator<Item = u64>) -> Bytes {
    let mut out = vec![0u8; 8];
    for lun in luns {
        out.extend_from_slice(&encode_lun(lun));
    }
    let len = u32::try_from(out.len() - 8).unwrap_or(u32::MAX);
    out[0..4].copy_from_slice(&len.to_be_bytes());
    Bytes::from(out)
}

/// The data a command moves as its CDB says (see [`transfer`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfer {
    /// Data-in it produces at most ([`crate::Cdb::data_in_length`]): what its buffer holds
    /// while it runs.
    pub data_in: u64,
    /// Data-out it asks for ([`LogicalUnit::data_out_length`]); 0 on a LUN with no LU.
    pub data_out: u64,
}

/// What `cdb` sent to `lun` moves, from one parse: the transport charges the data-in
/// before the command runs and measures write residuals against the data-out. On a LUN
/// with no LU nothing reads or writes blocks; INQUIRY and REQUEST SENSE still answer.
pub fn transfer(luns: &LunMap, lun: u64, cdb: &[u8]) -> Transfer {
    let Ok(parsed) = cdb::parse(cdb) else { return Transfer::default() };
    match luns.get(&lun) {
        Some(lu) => Transfer {
            data_in: parsed.data_in_length(lu.block_size()),
            data_out: parsed.data_out_length(lu.block_size()),
        },
        None => Transfer { data_in: parsed.data_in_length(0), data_out: 0 },
    }
}

/// Runs a command addressed to `lun`. REPORT LUNS is answered for any LUN (LUN 0 included
/// when it has no LU); INQUIRY to a LUN with no LU answers peripheral qualifier 011b,
/// device type 1Fh; REQUEST SENSE there returns LOGICAL UNIT NOT SUPPORTED as its data;
/// anything else there ends in CHECK CONDITION, LOGICAL UNIT NOT SUPPORTED.
pub async fn execute(luns: &LunMap, lun: u64, nexus: &Nexus, command: &Command) -> Outcome {
    let lu = luns.get(&lun);
    let d_sense = lu.is_some_and(|lu| lu.mode.d_sense());
    let opcode = command.cdb.first().copied();
    if opcode == Some(op::REPORT_LUNS) {
        if let Some(lu) = lu {
            lu.nexuses.with(nexus, |_| ());
        }
        return match cdb::parse(&command.cdb) {
            Ok(parsed) => {
                let Action::ReportLuns { select } = parsed.request else {
                    return sense::check_condition(Sense::invalid_opcode(), d_sense);
                };
                // No well-known or administrative logical units: those selections are empty.
                let mut data = match select {
                    0x00 | 0x02 => report_luns(luns.keys().copied()),
                    _ => report_luns(std::iter::empty()),
                };
                data.truncate(usize::try_from(parsed.allocation.unwrap_or(0)).unwrap_or(usize::MAX));
                sense::good(data)
            }
            Err(sense) => sense::check_condition(sense, d_sense),
        };
    }
    if let Some(lu) = lu {
        return lu.execute(nexus, command).await;
    }
    let parsed = match cdb::parse(&command.cdb) {
        Ok(parsed) => parsed,
        Err(_) if !matches!(opcode, Some(op::INQUIRY | op::REQUEST_SENSE)) => {
            return sense::check_condition(Sense::lun_not_supported(), false);
        }
        Err(sense) => return sense::check_condition(sense, false),
    };
    let mut data = match parsed.request {
        Action::Inquiry { evpd, page } => absent_lun(evpd, page),
        Action::RequestSense { descriptor } => Sense::lun_not_supported().encode(descriptor),
        _ => return sense::check_condition(Sense::lun_not_supported(), false),
    };
    data.truncate(usize::try_from(parsed.allocation.unwrap_or(0)).unwrap_or(usize::MAX));
    sense::good(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luns_round_trip_through_their_encoding() {
        for lun in [0u64, 1, 255, 256, 1000, 0x3FFF, 0x4000, 0xFF_FFFF] {
            assert_eq!(decode_lun(encode_lun(lun)), lun, "{lun}");
        }
        assert_eq!(encode_lun(5), [0, 5, 0, 0, 0, 0, 0, 0]);
        assert_eq!(encode_lun(0x123), [0x41, 0x23, 0, 0, 0, 0, 0, 0]);
        assert!(decode_lun([0x80, 1, 0, 0, 0, 0, 0, 0]) >= 1 << 63);
        assert!(decode_lun([0, 1, 0, 7, 0, 0, 0, 0]) >= 1 << 63);
    }
}
