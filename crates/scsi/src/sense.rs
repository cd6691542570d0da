//! Sense data: why a command ended in CHECK CONDITION (SPC-4 §4.5).
//!
//! A [`Sense`] is built where the error is found and encoded only when the outcome is
//! built, in fixed format (18 bytes) or descriptor format as the LU's `D_SENSE` bit says.
//! Handlers return `Result<Bytes, Failure>`: a failure is either sense data or a
//! RESERVATION CONFLICT, which carries none.

use bytes::Bytes;

use crate::{Outcome, Status};

/// Sense keys (SPC-4 table 27).
pub(crate) mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const COPY_ABORTED: u8 = 0xA;
    pub const MISCOMPARE: u8 = 0xE;
}

/// Sense data for one failed command: key, additional sense code and qualifier, and the
/// optional INFORMATION and sense-key-specific fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    key: u8,
    asc: u8,
    ascq: u8,
    info: Option<u64>,
    specific: Option<[u8; 3]>,
}

impl Sense {
    pub(crate) const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Sense { key, asc, ascq, info: None, specific: None }
    }

    /// The sense key (SPC-4 table 27).
    pub fn key(&self) -> u8 {
        self.key
    }

    /// The additional sense code.
    pub fn asc(&self) -> u8 {
        self.asc
    }

    /// The additional sense code qualifier.
    pub fn ascq(&self) -> u8 {
        self.ascq
    }

    /// The INFORMATION field, when set (e.g. the offset of a miscompare).
    pub fn information(&self) -> Option<u64> {
        self.info
    }

    pub(crate) fn with_info(mut self, info: u64) -> Self {
        self.info = Some(info);
        self
    }

    fn field_pointer(mut self, in_cdb: bool, byte: usize, bit: Option<u8>) -> Self {
        let [hi, lo] = u16::try_from(byte).unwrap_or(u16::MAX).to_be_bytes();
        let mut b0 = 0x80 | if in_cdb { 0x40 } else { 0 };
        if let Some(bit) = bit {
            b0 |= 0x08 | (bit & 0x07);
        }
        self.specific = Some([b0, hi, lo]);
        self
    }

    /// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE.
    pub(crate) fn invalid_opcode() -> Self {
        Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00).field_pointer(true, 0, None)
    }

    /// ILLEGAL REQUEST, INVALID FIELD IN CDB, pointing at `byte` (and `bit`) of the CDB.
    pub(crate) fn invalid_cdb(byte: usize, bit: Option<u8>) -> Self {
        Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00).field_pointer(true, byte, bit)
    }

    /// ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST, pointing into the data-out.
    pub(crate) fn invalid_param(byte: usize, bit: Option<u8>) -> Self {
        Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x00).field_pointer(false, byte, bit)
    }

    /// ILLEGAL REQUEST, PARAMETER LIST LENGTH ERROR.
    pub(crate) fn param_list_length() -> Self {
        Sense::new(key::ILLEGAL_REQUEST, 0x1A, 0x00)
    }

    /// ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub(crate) fn lba_out_of_range() -> Self {
        Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00)
    }

    /// ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED.
    pub(crate) fn lun_not_supported() -> Self {
        Sense::new(key::ILLEGAL_REQUEST, 0x25, 0x00)
    }

    /// ILLEGAL REQUEST, SAVING PARAMETERS NOT SUPPORTED.
    pub(crate) fn saving_not_supported() -> Self {
        Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00)
    }

    /// ILLEGAL REQUEST, MEDIUM REMOVAL PREVENTED.
    pub(crate) fn removal_prevented() -> Self {
        Sense::new(key::ILLEGAL_REQUEST, 0x53, 0x02)
    }

    /// DATA PROTECT, WRITE PROTECTED (the controller made the LU read-only).
    pub(crate) fn write_protected() -> Self {
        Sense::new(key::DATA_PROTECT, 0x27, 0x00)
    }

    /// DATA PROTECT, SOFTWARE WRITE PROTECTED (the SWP bit of the control mode page).
    pub(crate) fn software_write_protected() -> Self {
        Sense::new(key::DATA_PROTECT, 0x27, 0x02)
    }

    /// DATA PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT: the device under the LU has no
    /// space left (SBC-3 thin provisioning). Hosts treat it as out of space, not as a medium
    /// error: qemu reports ENOSPC to the guest or pauses it (`werror=enospc`), Linux fails the
    /// request with `BLK_STS_NOSPC`.
    pub(crate) fn space_allocation_failed() -> Self {
        Sense::new(key::DATA_PROTECT, 0x27, 0x07)
    }

    /// MISCOMPARE, MISCOMPARE DURING VERIFY OPERATION, at byte `offset` of the data-out.
    pub(crate) fn miscompare(offset: u64) -> Self {
        Sense::new(key::MISCOMPARE, 0x1D, 0x00).with_info(offset)
    }

    /// NOT READY, MEDIUM NOT PRESENT.
    pub(crate) fn no_medium() -> Self {
        Sense::new(key::NOT_READY, 0x3A, 0x00)
    }

    /// NOT READY, SANITIZE IN PROGRESS, with the progress indication (0..=0xffff).
    pub(crate) fn sanitize_in_progress(progress: u16) -> Self {
        let [hi, lo] = progress.to_be_bytes();
        Sense { specific: Some([0x80, hi, lo]), ..Sense::new(key::NOT_READY, 0x04, 0x1B) }
    }

    /// MEDIUM ERROR, SANITIZE COMMAND FAILED: the LU stays so until a sanitize succeeds.
    pub(crate) fn sanitize_failed() -> Self {
        Sense::new(key::MEDIUM_ERROR, 0x31, 0x03)
    }

    /// HARDWARE ERROR, INTERNAL TARGET FAILURE.
    pub(crate) fn internal_failure() -> Self {
        Sense::new(key::HARDWARE_ERROR, 0x44, 0x00)
    }

    /// UNIT ATTENTION with the given additional sense code.
    pub(crate) fn unit_attention(asc: u8, ascq: u8) -> Self {
        Sense::new(key::UNIT_ATTENTION, asc, ascq)
    }

    /// COPY ABORTED with the given additional sense code.
    pub(crate) fn copy_aborted(asc: u8, ascq: u8) -> Self {
        Sense::new(key::COPY_ABORTED, asc, ascq)
    }

    /// NO SENSE: what REQUEST SENSE returns when nothing is pending.
    pub(crate) fn none() -> Self {
        Sense::new(key::NO_SENSE, 0, 0)
    }

    /// Encodes the sense data in fixed (`descriptor == false`) or descriptor format.
    pub fn encode(&self, descriptor: bool) -> Bytes {
        if descriptor {
            let mut buf = vec![0x72, self.key, self.asc, self.ascq, 0, 0, 0, 0];
            if let Some(info) = self.info {
                buf.extend_from_slice(&[0x00, 0x0A, 0x80, 0x00]);
                buf.extend_from_slice(&info.to_be_bytes());
            }
            if let Some(sks) = self.specific {
                buf.extend_from_slice(&[0x02, 0x06, 0x00, 0x00, sks[0], sks[1], sks[2], 0x00]);
            }
            buf[7] = u8::try_from(buf.len() - 8).unwrap_or(u8::MAX);
            Bytes::from(buf)
        } else {
            let mut buf = [0u8; 18];
            buf[0] = 0x70;
            buf[2] = self.key;
            if let Some(info) = self.info.and_then(|i| u32::try_from(i).ok()) {
                buf[0] |= 0x80;
                buf[3..7].copy_from_slice(&info.to_be_bytes());
            }
            buf[7] = 10;
            buf[12] = self.asc;
            buf[13] = self.ascq;
            if let Some(sks) = self.specific {
                buf[15..18].copy_from_slice(&sks);
            }
            Bytes::copy_from_slice(&buf)
        }
    }
}

/// Why a command did not end GOOD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// CHECK CONDITION with this sense data.
    Check(Sense),
    /// RESERVATION CONFLICT (no sense data).
    Conflict,
}

impl From<Sense> for Failure {
    fn from(sense: Sense) -> Self {
        Failure::Check(sense)
    }
}

/// What a command handler returns: data-in on GOOD.
pub(crate) type Reply = Result<Bytes, Failure>;

/// GOOD with `data`.
pub(crate) fn good(data: Bytes) -> Outcome {
    Outcome { status: Status::Good, data, sense: None }
}

/// CHECK CONDITION with `sense` encoded as `descriptor` says.
pub(crate) fn check_condition(sense: Sense, descriptor: bool) -> Outcome {
    Outcome { status: Status::CheckCondition, data: Bytes::new(), sense: Some(sense.encode(descriptor)) }
}

/// The outcome of a handler's reply.
pub(crate) fn outcome(reply: Reply, descriptor: bool) -> Outcome {
    match reply {
        Ok(data) => good(data),
        Err(Failure::Check(sense)) => check_condition(sense, descriptor),
        Err(Failure::Conflict) => {
            Outcome { status: Status::ReservationConflict, data: Bytes::new(), sense: None }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format_carries_key_codes_info_and_field_pointer() {
        let s = Sense::invalid_cdb(2, Some(3)).with_info(7).encode(false);
        assert_eq!(s.len(), 18);
        assert_eq!(s[0], 0xF0);
        assert_eq!(s[2], key::ILLEGAL_REQUEST);
        assert_eq!(&s[3..7], &[0, 0, 0, 7]);
        assert_eq!((s[12], s[13]), (0x24, 0x00));
        assert_eq!(&s[15..18], &[0xC8 | 3, 0, 2]);
    }

    #[test]
    fn descriptor_format_has_information_and_specific_descriptors() {
        let s = Sense::miscompare(1 << 40).encode(true);
        assert_eq!(&s[..4], &[0x72, key::MISCOMPARE, 0x1D, 0x00]);
        assert_eq!(usize::from(s[7]), s.len() - 8);
        assert_eq!(&s[8..12], &[0x00, 0x0A, 0x80, 0x00]);
        assert_eq!(u64::from_be_bytes(s[12..20].try_into().unwrap()), 1 << 40);
        // An offset beyond 32 bits does not fit fixed format: VALID stays clear.
        assert_eq!(Sense::miscompare(1 << 40).encode(false)[0], 0x70);
    }
}
