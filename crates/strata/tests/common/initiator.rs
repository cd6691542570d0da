//! A small, deliberately literal iSCSI initiator for the cases libiscsi's tools cannot
//! reach: digests on (and corrupted), persistent reservation commands, raw bytes. It is
//! written from RFC 7143 independently of the target's code.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Flags of a SCSI Command PDU.
const FINAL: u8 = 0x80;
const READ: u8 = 0x40;
const WRITE: u8 = 0x20;

/// A logged-in normal session on one connection.
pub struct Initiator {
    pub stream: TcpStream,
    pub header_digest: bool,
    pub data_digest: bool,
    pub cmd_sn: u32,
    exp_stat_sn: u32,
    itt: u32,
    /// MaxRecvDataSegmentLength the target declared.
    pub target_mrdsl: usize,
}

/// A PDU as read back.
#[derive(Debug)]
pub struct Reply {
    pub header: [u8; 48],
    pub data: Vec<u8>,
}

impl Reply {
    pub fn opcode(&self) -> u8 {
        self.header[0] & 0x3f
    }
    pub fn u32_at(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.header[at..at + 4].try_into().unwrap())
    }
}

/// What a SCSI command came back with.
#[derive(Debug)]
pub struct ScsiResult {
    pub status: u8,
    pub data: Vec<u8>,
    pub sense: Vec<u8>,
}

impl ScsiResult {
    /// (sense key, ASC, ASCQ) from fixed or descriptor sense.
    pub fn sense_code(&self) -> Option<(u8, u8, u8)> {
        let s = &self.sense;
        match s.first()? & 0x7f {
            0x70 | 0x71 if s.len() >= 14 => Some((s[2] & 0x0f, s[12], s[13])),
            0x72 | 0x73 if s.len() >= 4 => Some((s[1] & 0x0f, s[2], s[3])),
            _ => None,
        }
    }
}

fn pad(len: usize) -> usize {
    len.div_ceil(4) * 4
}

/// Encodes key=value pairs.
pub fn text(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(format!("{k}={v}").as_bytes());
        out.push(0);
    }
    out
}

/// Parses key=value pairs.
pub fn pairs(data: &[u8]) -> Vec<(String, String)> {
    data.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let s = String::from_utf8_lossy(s);
            s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

impl Initiator {
    /// Connects and logs in to `target` as `initiator`, asking for digests if `digests`.
    pub fn login(portal: &str, target: &str, initiator: &str, digests: bool) -> Result<Self, String> {
        let stream = TcpStream::connect(portal).map_err(|e| e.to_string())?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut s = Initiator {
            stream,
            header_digest: false,
            data_digest: false,
            cmd_sn: 1,
            exp_stat_sn: 0,
            itt: 1,
            target_mrdsl: 8192,
        };
        let digest = if digests { "CRC32C" } else { "None" };
        let keys = text(&[
            ("InitiatorName", initiator),
            ("TargetName", target),
            ("SessionType", "Normal"),
            ("HeaderDigest", digest),
            ("DataDigest", digest),
            ("MaxRecvDataSegmentLength", "65536"),
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("FirstBurstLength", "65536"),
            ("MaxBurstLength", "262144"),
            ("ErrorRecoveryLevel", "0"),
        ]);
        // Straight to the operational stage (no authentication), then full feature.
        let mut header = [0u8; 48];
        header[0] = 0x43;
        header[1] = 0x80 | (1 << 2) | 3;
        header[8..14].copy_from_slice(&[0x80, 0x12, 0x34, 0x56, 0x78, 0x9a]);
        header[16..20].copy_from_slice(&0u32.to_be_bytes());
        header[24..28].copy_from_slice(&s.cmd_sn.to_be_bytes());
        s.send_raw(&header, &keys, false);
        let reply = s.read_raw(false).map_err(|e| format!("no login response: {e}"))?;
        if reply.opcode() != 0x23 {
            return Err(format!("expected a login response, got opcode {:#x}", reply.opcode()));
        }
        let (class, detail) = (reply.header[36], reply.header[37]);
        if class != 0 {
            return Err(format!("login refused with status {class:#04x}/{detail:#04x}"));
        }
        if reply.header[1] & 0x80 == 0 {
            return Err("the target did not move to full feature".into());
        }
        for (k, v) in pairs(&reply.data) {
            match k.as_str() {
                "HeaderDigest" => s.header_digest = v == "CRC32C",
                "DataDigest" => s.data_digest = v == "CRC32C",
                "MaxRecvDataSegmentLength" => s.target_mrdsl = v.parse().unwrap(),
                _ => {}
            }
        }
        s.exp_stat_sn = reply.u32_at(24).wrapping_add(1);
        Ok(s)
    }

    /// Sends a PDU with the digests in force (`corrupt_data` flips a bit of the data
    /// digest).
    pub fn send(&mut self, header: &[u8; 48], data: &[u8], corrupt_data: bool) {
        let (h, d) = (self.header_digest, self.data_digest);
        let mut wire = header.to_vec();
        let len = u32::try_from(data.len()).unwrap().to_be_bytes();
        wire[5..8].copy_from_slice(&len[1..]);
        if h {
            wire.extend_from_slice(&crc32c::crc32c(&wire[..48]).to_le_bytes());
        }
        let mut body = data.to_vec();
        body.resize(pad(data.len()), 0);
        if d && !data.is_empty() {
            let mut crc = crc32c::crc32c(&body);
            if corrupt_data {
                crc ^= 1;
            }
            body.extend_from_slice(&crc.to_le_bytes());
        }
        wire.extend_from_slice(&body);
        self.stream.write_all(&wire).unwrap();
    }

    fn send_raw(&mut self, header: &[u8; 48], data: &[u8], digests: bool) {
        let saved = (self.header_digest, self.data_digest);
        if !digests {
            (self.header_digest, self.data_digest) = (false, false);
        }
        self.send(header, data, false);
        (self.header_digest, self.data_digest) = saved;
    }

    /// Reads one PDU, checking its digests.
    pub fn read(&mut self) -> std::io::Result<Reply> {
        self.read_raw(true)
    }

    fn read_raw(&mut self, digests: bool) -> std::io::Result<Reply> {
        let mut header = [0u8; 48];
        self.stream.read_exact(&mut header)?;
        let (h, d) = if digests { (self.header_digest, self.data_digest) } else { (false, false) };
        if h {
            let mut crc = [0u8; 4];
            self.stream.read_exact(&mut crc)?;
            assert_eq!(u32::from_le_bytes(crc), crc32c::crc32c(&header), "target's header digest");
        }
        let len = u32::from_be_bytes([0, header[5], header[6], header[7]]) as usize;
        let ahs = usize::from(header[4]) * 4;
        let mut skip = vec![0u8; ahs];
        self.stream.read_exact(&mut skip)?;
        let mut body = vec![0u8; pad(len)];
        self.stream.read_exact(&mut body)?;
        if d && len > 0 {
            let mut crc = [0u8; 4];
            self.stream.read_exact(&mut crc)?;
            assert_eq!(u32::from_le_bytes(crc), crc32c::crc32c(&body), "target's data digest");
        }
        body.truncate(len);
        Ok(Reply { header, data: body })
    }

    /// A SCSI Command PDU header for `cdb` with `edtl`, read/write flags.
    pub fn command_header(&mut self, cdb: &[u8], edtl: u32, read: bool, write: bool) -> [u8; 48] {
        let mut header = [0u8; 48];
        header[0] = 0x01;
        header[1] = FINAL | if read { READ } else { 0 } | if write { WRITE } else { 0 } | 1;
        header[16..20].copy_from_slice(&self.itt.to_be_bytes());
        self.itt += 1;
        header[20..24].copy_from_slice(&edtl.to_be_bytes());
        header[24..28].copy_from_slice(&self.cmd_sn.to_be_bytes());
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        header[28..32].copy_from_slice(&self.exp_stat_sn.to_be_bytes());
        header[32..32 + cdb.len()].copy_from_slice(cdb);
        header
    }

    /// Runs a command with `data_out` as immediate data (it must fit the first burst) and
    /// collects its Data-In and status.
    pub fn command(&mut self, cdb: &[u8], data_out: &[u8], read_len: u32) -> Result<ScsiResult, String> {
        let edtl = if data_out.is_empty() { read_len } else { u32::try_from(data_out.len()).unwrap() };
        let header = self.command_header(cdb, edtl, read_len > 0, !data_out.is_empty());
        self.send(&header, data_out, false);
        self.finish()
    }

    /// Reads Data-In and R2T answers until the command's status arrives.
    pub fn finish(&mut self) -> Result<ScsiResult, String> {
        let mut data = Vec::new();
        loop {
            let reply = self.read().map_err(|e| format!("connection lost: {e}"))?;
            match reply.opcode() {
                0x25 => {
                    data.extend_from_slice(&reply.data);
                    if reply.header[1] & 0x01 != 0 {
                        self.exp_stat_sn = reply.u32_at(24).wrapping_add(1);
                        return Ok(ScsiResult { status: reply.header[3], data, sense: Vec::new() });
                    }
                }
                0x21 => {
                    self.exp_stat_sn = reply.u32_at(24).wrapping_add(1);
                    let sense = if reply.data.len() >= 2 {
                        let n = usize::from(u16::from_be_bytes([reply.data[0], reply.data[1]]));
                        reply.data[2..(2 + n).min(reply.data.len())].to_vec()
                    } else {
                        Vec::new()
                    };
                    return Ok(ScsiResult { status: reply.header[3], data, sense });
                }
                0x3f => return Err(format!("Reject, reason {:#04x}", reply.header[2])),
                0x20 => {} // a NOP-In ping; ignore
                other => return Err(format!("unexpected opcode {other:#04x}")),
            }
        }
    }

    /// Whether the target has closed the connection (reads EOF or reset within `wait`).
    pub fn closed_within(&mut self, wait: Duration) -> bool {
        self.stream.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return false;
                }
                Err(_) => return true,
            }
        }
    }
}

/// WRITE(10) CDB.
pub fn write10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut cdb = vec![0x2a, 0];
    cdb.extend_from_slice(&lba.to_be_bytes());
    cdb.push(0);
    cdb.extend_from_slice(&blocks.to_be_bytes());
    cdb.push(0);
    cdb
}

/// READ(10) CDB.
pub fn read10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut cdb = write10(lba, blocks);
    cdb[0] = 0x28;
    cdb
}
