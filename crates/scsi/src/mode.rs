//! Mode parameters (SPC-4 §7.5, SBC-3 §6.4): MODE SENSE(6/10) and MODE SELECT(6/10).
//!
//! Pages: read-write error recovery (01h), caching (08h, WCE changeable), control (0Ah,
//! D_SENSE and SWP changeable), informational exceptions control (1Ch). The three
//! changeable bits live in one atomic byte because every command reads them: D_SENSE
//! picks the sense format, SWP write-protects the medium, WCE=0 makes every write FUA.
//! Saving is not supported; a change reaches every other nexus as a unit attention.

use std::sync::atomic::{AtomicU8, Ordering};

use bytes::Bytes;

use crate::Nexus;
use crate::lu::LogicalUnit;
use crate::sense::{Reply, Sense};
use crate::unit_attention::Ua;

const WCE: u8 = 0x01;
const D_SENSE: u8 = 0x02;
const SWP: u8 = 0x04;
/// Power-on values: write cache enabled, fixed-format sense, not write-protected.
const DEFAULTS: u8 = WCE;

/// Pages in the order MODE SENSE returns them for "all pages".
const PAGES: [u8; 4] = [0x01, 0x08, 0x0A, 0x1C];

/// The changeable mode parameters of a LU.
pub(crate) struct ModeState {
    flags: AtomicU8,
}

impl Default for ModeState {
    fn default() -> Self {
        ModeState { flags: AtomicU8::new(DEFAULTS) }
    }
}

impl ModeState {
    fn flags(&self) -> u8 {
        self.flags.load(Ordering::Relaxed)
    }

    /// Write cache enabled (caching page WCE).
    pub fn wce(&self) -> bool {
        self.flags() & WCE != 0
    }

    /// Descriptor-format sense data (control page D_SENSE).
    pub fn d_sense(&self) -> bool {
        self.flags() & D_SENSE != 0
    }

    /// Software write protect (control page SWP).
    pub fn swp(&self) -> bool {
        self.flags() & SWP != 0
    }
}

/// Which values a page shows (MODE SENSE page control).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Show {
    Current(u8),
    Changeable,
    Default,
}

/// Mode page `code` as MODE SENSE returns it, or `None` if there is no such page.
fn page(code: u8, show: Show) -> Option<Vec<u8>> {
    let flags = match show {
        Show::Current(flags) => flags,
        Show::Changeable => WCE | D_SENSE | SWP,
        Show::Default => DEFAULTS,
    };
    let bit = |flag: u8, value: u8| if flags & flag != 0 { value } else { 0 };
    let fixed = show != Show::Changeable;
    let mut p = match code {
        0x01 | 0x1C => vec![0u8; 12],
        0x08 => {
            let mut p = vec![0u8; 20];
            p[2] = bit(WCE, 0x04);
            p
        }
        0x0A => {
            let mut p = vec![0u8; 12];
            p[2] = bit(D_SENSE, 0x04);
            if fixed {
                // Unrestricted reordering: overlapping commands are not ordered (QAM=1).
                p[3] = 0x10;
                // Busy timeout: unlimited.
                p[8..10].copy_from_slice(&[0xFF, 0xFF]);
            }
            p[4] = bit(SWP, 0x08);
            p
        }
        _ => return None,
    };
    p[0] = code;
    p[1] = u8::try_from(p.len() - 2).unwrap_or(0);
    Some(p)
}

/// The changeable bits `page` (as sent by MODE SELECT) sets and clears.
fn changes(code: u8, page: &[u8]) -> (u8, u8) {
    let mut set = 0;
    let mut clear = 0;
    let mut take = |flag: u8, on: bool| if on { set |= flag } else { clear |= flag };
    match code {
        0x08 => take(WCE, page[2] & 0x04 != 0),
        0x0A => {
            take(D_SENSE, page[2] & 0x04 != 0);
            take(SWP, page[4] & 0x08 != 0);
        }
        _ => {}
    }
    (set, clear)
}

impl LogicalUnit {
    /// MODE SENSE(6/10).
    pub(crate) fn mode_sense(
        &self,
        ten: bool,
        dbd: bool,
        llbaa: bool,
        pc: u8,
        code: u8,
        subpage: u8,
    ) -> Reply {
        let show = match pc {
            0 => Show::Current(self.mode.flags()),
            1 => Show::Changeable,
            2 => Show::Default,
            _ => return Err(Sense::saving_not_supported().into()),
        };
        if subpage != 0 && subpage != 0xFF {
            return Err(Sense::invalid_cdb(3, None).into());
        }
        let mut pages = Vec::with_capacity(64);
        if code == 0x3F {
            for c in PAGES {
                pages.extend(page(c, show).unwrap_or_default());
            }
        } else {
            pages.extend(page(code, show).ok_or(Sense::invalid_cdb(2, Some(5)))?);
        }
        let mut descriptor = Vec::new();
        if !dbd {
            if llbaa {
                descriptor.extend_from_slice(&self.blocks.to_be_bytes());
                descriptor.extend_from_slice(&[0, 0, 0, 0]);
                descriptor.extend_from_slice(&self.block_size.to_be_bytes());
            } else {
                let blocks = u32::try_from(self.blocks).unwrap_or(u32::MAX);
                descriptor.extend_from_slice(&blocks.to_be_bytes());
                descriptor.extend_from_slice(&self.block_size.to_be_bytes());
                descriptor[4] = 0;
            }
        }
        // Device-specific parameter: WP when write-protected, DPOFUA always.
        let wp = if self.writable().is_err() { 0x80 } else { 0 };
        let specific = wp | 0x10;
        let mut out = Vec::with_capacity(8 + descriptor.len() + pages.len());
        if ten {
            let len = u16::try_from(6 + descriptor.len() + pages.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&[0, specific, u8::from(llbaa && !dbd), 0]);
            out.extend_from_slice(&u16::try_from(descriptor.len()).unwrap_or(0).to_be_bytes());
        } else {
            let len = u8::try_from(3 + descriptor.len() + pages.len()).unwrap_or(u8::MAX);
            out.extend_from_slice(&[len, 0, specific, u8::try_from(descriptor.len()).unwrap_or(0)]);
        }
        out.extend_from_slice(&descriptor);
        out.extend_from_slice(&pages);
        Ok(Bytes::from(out))
    }

    /// MODE SELECT(6/10): checks every page against the changeable bits, then applies.
    pub(crate) fn mode_select(&self, nexus: &Nexus, ten: bool, sp: bool, length: u32, data: &Bytes) -> Reply {
        if sp {
            return Err(Sense::invalid_cdb(1, Some(0)).into());
        }
        let length = usize::try_from(length).unwrap_or(usize::MAX);
        if length == 0 {
            return Ok(Bytes::new());
        }
        let header = if ten { 8 } else { 4 };
        if data.len() < length || length < header {
            return Err(Sense::param_list_length().into());
        }
        let p = &data[..length];
        let (bd_len, long) = if ten {
            (usize::from(u16::from_be_bytes([p[6], p[7]])), p[4] & 1 != 0)
        } else {
            (usize::from(p[3]), false)
        };
        if header + bd_len > length {
            return Err(Sense::param_list_length().into());
        }
        // Block descriptors may restate the block size but not change it.
        let size = if long { 16 } else { 8 };
        for at in (header..header + bd_len).step_by(size) {
            let Some(d) = p.get(at..at + size) else { return Err(Sense::param_list_length().into()) };
            let block_len = if long {
                u32::from_be_bytes([d[12], d[13], d[14], d[15]])
            } else {
                u32::from_be_bytes([0, d[5], d[6], d[7]])
            };
            if block_len != 0 && block_len != self.block_size {
                return Err(Sense::invalid_param(at + size - 3, None).into());
            }
        }
        let current = self.mode.flags();
        let (mut set, mut clear) = (0u8, 0u8);
        let mut at = header + bd_len;
        while at < length {
            if length - at < 2 {
                return Err(Sense::param_list_length().into());
            }
            let code = p[at] & 0x3F;
            let subpage_format = p[at] & 0x40 != 0;
            let page_len = if subpage_format {
                if length - at < 4 {
                    return Err(Sense::param_list_length().into());
                }
                usize::from(u16::from_be_bytes([p[at + 2], p[at + 3]])) + 4
            } else {
                usize::from(p[at + 1]) + 2
            };
            if at + page_len > length {
                return Err(Sense::param_list_length().into());
            }
            let (Some(now), Some(mask), false) =
                (page(code, Show::Current(current)), page(code, Show::Changeable), subpage_format)
            else {
                return Err(Sense::invalid_param(at, Some(5)).into());
            };
            if page_len != now.len() {
                return Err(Sense::invalid_param(at + 1, None).into());
            }
            let new = &p[at..at + page_len];
            if let Some(i) = (2..page_len).find(|&i| (new[i] ^ now[i]) & !mask[i] != 0) {
                return Err(Sense::invalid_param(at + i, None).into());
            }
            let (s, c) = changes(code, new);
            set = (set & !c) | s;
            clear = (clear & !s) | c;
            at += page_len;
        }
        let apply = |flags: u8| (flags & !clear) | set;
        let old = match self.mode.flags.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| Some(apply(f)))
        {
            Ok(old) | Err(old) => old,
        };
        if apply(old) != old {
            self.nexuses.queue(Ua::MODE_PARAMETERS_CHANGED, |n| n != nexus);
        }
        Ok(Bytes::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_have_their_lengths_and_changeable_bits() {
        for code in PAGES {
            let p = page(code, Show::Current(DEFAULTS)).unwrap();
            assert_eq!(usize::from(p[1]) + 2, p.len());
            assert_eq!(p[0], code);
        }
        assert_eq!(page(0x08, Show::Current(WCE)).unwrap()[2], 0x04);
        assert_eq!(page(0x0A, Show::Changeable).unwrap()[4], 0x08);
        assert!(page(0x02, Show::Default).is_none());
    }
}
