//! REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35): every command this crate runs, with the
//! CDB usage data (which bits it reads) and, on request, timeout descriptors.

use bytes::Bytes;

use crate::cdb::{op, sa};
use crate::sense::{Reply, Sense};

/// One supported command: opcode, service action (for commands that have them) and the
/// CDB usage data (byte 0 is the opcode; set bits are the ones the device server reads).
struct Supported {
    opcode: u8,
    service_action: Option<u8>,
    usage: &'static [u8],
}

const fn cmd(opcode: u8, usage: &'static [u8]) -> Supported {
    Supported { opcode, service_action: None, usage }
}

const fn sa_cmd(opcode: u8, service_action: u8, usage: &'static [u8]) -> Supported {
    Supported { opcode, service_action: Some(service_action), usage }
}

/// The control byte: NACA is read (and refused).
const C: u8 = 0x04;

/// Sorted by opcode, then service action.
const SUPPORTED: &[Supported] = &[
    cmd(op::TEST_UNIT_READY, &[0x00, 0, 0, 0, 0, C]),
    cmd(op::REQUEST_SENSE, &[0x03, 0x01, 0, 0, 0xFF, C]),
    cmd(op::READ_6, &[0x08, 0x1F, 0xFF, 0xFF, 0xFF, C]),
    cmd(op::WRITE_6, &[0x0A, 0x1F, 0xFF, 0xFF, 0xFF, C]),
    cmd(op::INQUIRY, &[0x12, 0x01, 0xFF, 0xFF, 0xFF, C]),
    cmd(op::MODE_SELECT_6, &[0x15, 0x11, 0, 0, 0xFF, C]),
    cmd(op::RESERVE_6, &[0x16, 0, 0, 0, 0, C]),
    cmd(op::RELEASE_6, &[0x17, 0, 0, 0, 0, C]),
    cmd(op::MODE_SENSE_6, &[0x1A, 0x08, 0xFF, 0xFF, 0xFF, C]),
    cmd(op::START_STOP_UNIT, &[0x1B, 0x01, 0, 0x0F, 0xF7, C]),
    cmd(op::PREVENT_ALLOW, &[0x1E, 0, 0, 0, 0x03, C]),
    cmd(op::READ_CAPACITY_10, &[0x25, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, C]),
    cmd(op::READ_10, &[0x28, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, C]),
    cmd(op::WRITE_10, &[0x2A, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, C]),
    cmd(op::WRITE_VERIFY_10, &[0x2E, 0xF2, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, C]),
    cmd(op::VERIFY_10, &[0x2F, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, C]),
    cmd(op::PRE_FETCH_10, &[0x34, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, C]),
    cmd(op::SYNC_CACHE_10, &[0x35, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, C]),
    cmd(op::READ_DEFECT_DATA_10, &[0x37, 0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, C]),
    cmd(op::WRITE_SAME_10, &[0x41, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, C]),
    cmd(op::UNMAP, &[0x42, 0x01, 0, 0, 0, 0, 0, 0xFF, 0xFF, C]),
    sa_cmd(op::SANITIZE, 0x01, &[0x48, 0xA1, 0, 0, 0, 0, 0, 0xFF, 0xFF, C]),
    sa_cmd(op::SANITIZE, 0x02, &[0x48, 0xA2, 0, 0, 0, 0, 0, 0xFF, 0xFF, C]),
    sa_cmd(op::SANITIZE, 0x03, &[0x48, 0xA3, 0, 0, 0, 0, 0, 0xFF, 0xFF, C]),
    sa_cmd(op::SANITIZE, 0x1F, &[0x48, 0xBF, 0, 0, 0, 0, 0, 0xFF, 0xFF, C]),
    cmd(op::MODE_SELECT_10, &[0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, C]),
    cmd(op::RESERVE_10, &[0x56, 0x10, 0, 0, 0, 0, 0, 0, 0, C]),
    cmd(op::RELEASE_10, &[0x57, 0x10, 0, 0, 0, 0, 0, 0, 0, C]),
    cmd(op::MODE_SENSE_10, &[0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, C]),
    sa_cmd(op::PERSISTENT_RESERVE_IN, 0x00, &[0x5E, 0x00, 0, 0, 0, 0, 0, 0xFF, 0xFF, C]),
    sa_cmd(op::PERSISTENT_RESERVE_IN, 0x01, &[0x5E, 0x01, 0, 0, 0, 0, 0, 0xFF, 0xFF, C]),
    sa_cmd(op::PERSISTENT_RESERVE_IN, 0x02, &[0x5E, 0x02, 0, 0, 0, 0, 0, 0xFF, 0xFF, C]),
    sa_cmd(op::PERSISTENT_RESERVE_IN, 0x03, &[0x5E, 0x03, 0, 0, 0, 0, 0, 0xFF, 0xFF, C]),
    sa_cmd(op::PERSISTENT_RESERVE_OUT, 0x00, &[0x5F, 0x00, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, C]),
    sa_cmd(op::PERSISTENT_RESERVE_OUT, 0x01, &[0x5F, 0x01, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, C]),
    sa_cmd(op::PERSISTENT_RESERVE_OUT, 0x02, &[0x5F, 0x02, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, C]),
    sa_cmd(op::PERSISTENT_RESERVE_OUT, 0x03, &[0x5F, 0x03, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, C]),
    sa_cmd(op::PERSISTENT_RESERVE_OUT, 0x04, &[0x5F, 0x04, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, C]),
    sa_cmd(op::PERSISTENT_RESERVE_OUT, 0x05, &[0x5F, 0x05, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, C]),
    sa_cmd(op::PERSISTENT_RESERVE_OUT, 0x06, &[0x5F, 0x06, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, C]),
    sa_cmd(op::PERSISTENT_RESERVE_OUT, 0x07, &[0x5F, 0x07, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, C]),
    sa_cmd(op::EXTENDED_COPY, 0x00, &[0x83, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, C]),
    sa_cmd(
        op::RECEIVE_COPY_RESULTS,
        0x00,
        &[0x84, 0x00, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, C],
    ),
    sa_cmd(
        op::RECEIVE_COPY_RESULTS,
        0x03,
        &[0x84, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, C],
    ),
    cmd(
        op::READ_16,
        &[0x88, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C],
    ),
    cmd(
        op::COMPARE_AND_WRITE,
        &[0x89, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0, C],
    ),
    cmd(
        op::WRITE_16,
        &[0x8A, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C],
    ),
    cmd(
        op::ORWRITE_16,
        &[0x8B, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C],
    ),
    cmd(
        op::WRITE_VERIFY_16,
        &[0x8E, 0xF2, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C],
    ),
    cmd(
        op::VERIFY_16,
        &[0x8F, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C],
    ),
    cmd(
        op::PRE_FETCH_16,
        &[0x90, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C],
    ),
    cmd(
        op::SYNC_CACHE_16,
        &[0x91, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C],
    ),
    cmd(
        op::WRITE_SAME_16,
        &[0x93, 0xF9, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C],
    ),
    cmd(
        op::WRITE_ATOMIC_16,
        &[0x9C, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C],
    ),
    sa_cmd(
        op::SERVICE_ACTION_IN_16,
        sa::READ_CAPACITY_16,
        &[0x9E, 0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01, C],
    ),
    sa_cmd(
        op::SERVICE_ACTION_IN_16,
        sa::GET_LBA_STATUS,
        &[0x9E, 0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C],
    ),
    cmd(op::REPORT_LUNS, &[0xA0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, C]),
    sa_cmd(
        op::MAINTENANCE_IN,
        sa::REPORT_TARGET_PORT_GROUPS,
        &[0xA3, 0xEA, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, C],
    ),
    sa_cmd(
        op::MAINTENANCE_IN,
        sa::REPORT_SUPPORTED_OPCODES,
        &[0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C],
    ),
    cmd(op::READ_12, &[0xA8, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C]),
    cmd(op::WRITE_12, &[0xAA, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C]),
    cmd(op::WRITE_VERIFY_12, &[0xAE, 0xF2, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C]),
    cmd(op::VERIFY_12, &[0xAF, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C]),
    cmd(op::READ_DEFECT_DATA_12, &[0xB7, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, C]),
];

/// Seconds a host should allow: long-running commands get more.
fn recommended_timeout(opcode: u8) -> u32 {
    match opcode {
        op::SANITIZE | op::EXTENDED_COPY | op::WRITE_SAME_10 | op::WRITE_SAME_16 => 3600,
        _ => 30,
    }
}

/// The command timeouts descriptor (SPC-4 §6.35.4).
fn timeouts(opcode: u8) -> [u8; 12] {
    let mut t = [0u8; 12];
    t[1] = 0x0A;
    t[8..12].copy_from_slice(&recommended_timeout(opcode).to_be_bytes());
    t
}

/// REPORT SUPPORTED OPERATION CODES with reporting options `options` (000b all, 001b one
/// opcode without service actions, 010b one opcode and service action, 011b either).
pub(crate) fn report(rctd: bool, options: u8, opcode: u8, service_action: u16) -> Reply {
    let mut out = Vec::with_capacity(1024);
    if options == 0 {
        out.extend_from_slice(&[0; 4]);
        for s in SUPPORTED {
            out.push(s.opcode);
            out.push(0);
            out.extend_from_slice(&u16::from(s.service_action.unwrap_or(0)).to_be_bytes());
            out.push(0);
            out.push(u8::from(rctd) << 1 | u8::from(s.service_action.is_some()));
            out.extend_from_slice(&u16::try_from(s.usage.len()).unwrap_or(0).to_be_bytes());
            if rctd {
                out.extend_from_slice(&timeouts(s.opcode));
            }
        }
        let len = u32::try_from(out.len() - 4).unwrap_or(u32::MAX);
        out[0..4].copy_from_slice(&len.to_be_bytes());
        return Ok(Bytes::from(out));
    }
    let has_service_actions = SUPPORTED.iter().any(|s| s.opcode == opcode && s.service_action.is_some());
    let found = match options {
        1 if has_service_actions => return Err(Sense::invalid_cdb(2, Some(2)).into()),
        2 if !has_service_actions && SUPPORTED.iter().any(|s| s.opcode == opcode) => {
            return Err(Sense::invalid_cdb(2, Some(2)).into());
        }
        1 => SUPPORTED.iter().find(|s| s.opcode == opcode && s.service_action.is_none()),
        _ => SUPPORTED.iter().find(|s| {
            s.opcode == opcode && s.service_action.is_none_or(|sa| u16::from(sa) == service_action)
        }),
    };
    out.push(0);
    match found {
        None => {
            // SUPPORT=001b: not supported.
            out.extend_from_slice(&[0x01, 0, 0]);
        }
        Some(s) => {
            out.push(u8::from(rctd) << 7 | 0x03);
            out.extend_from_slice(&u16::try_from(s.usage.len()).unwrap_or(0).to_be_bytes());
            out.extend_from_slice(s.usage);
            if rctd {
                out.extend_from_slice(&timeouts(s.opcode));
            }
        }
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_sorted_and_matches_the_parser() {
        for pair in SUPPORTED.windows(2) {
            let key = |s: &Supported| (s.opcode, s.service_action);
            assert!(key(&pair[0]) < key(&pair[1]), "{:#x} out of order", pair[1].opcode);
        }
        for s in SUPPORTED {
            assert_eq!(s.usage[0], s.opcode);
            assert_eq!(s.usage.len(), crate::cdb::cdb_length(s.opcode), "{:#x}", s.opcode);
        }
    }

    #[test]
    fn one_command_reports_and_rejects_by_service_action() {
        let r = report(true, 1, op::READ_10, 0).unwrap();
        assert_eq!(r[1], 0x83);
        assert_eq!(r[4 + 1] & 0x18, 0x18);
        assert!(report(false, 1, op::PERSISTENT_RESERVE_IN, 0).is_err());
        assert!(report(false, 2, op::READ_10, 0).is_err());
        assert_eq!(report(false, 2, op::PERSISTENT_RESERVE_IN, 3).unwrap()[5], 0x03);
        assert_eq!(report(false, 1, 0xC0, 0).unwrap()[1], 0x01);
    }
}
