//! Exports: how volumes are offered to hosts (NBD exports, iSCSI targets and their LUNs),
//! who may see them (allow-lists of addresses and networks for NBD, of initiator names
//! for iSCSI), and the lookups the NBD and iSCSI servers ask.
//!
//! An iSCSI export with neither an allow-list nor CHAP is open to every initiator. That
//! is allowed only while the iSCSI portal is a loopback address (the demo's case), or when
//! the export asks for it (`allow_any`, `--allow-any`): on any other portal such an export
//! is refused when added, and one recorded before is not served, with the reason in the
//! listing and the log. LIO denies an initiator without an ACL by default for the same
//! reason.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use strata_iscsi::{Credentials, LoginFailure, Refusal, TargetNode};
use strata_scsi::{LogicalUnit, LunMap};

use crate::controller::Controller;
use crate::metrics::ReasonLabel;

/// The frontend protocols.
pub const NBD: &str = "nbd";
/// iSCSI.
pub const ISCSI: &str = "iscsi";

/// How a volume is offered to hosts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRecord {
    /// The volume.
    pub volume: String,
    /// Frontend protocol (`nbd` or `iscsi`).
    pub protocol: String,
    /// Name clients ask for: the NBD export name, or the iSCSI target name (IQN).
    pub name: String,
    /// Refuse writes.
    pub read_only: bool,
    /// Who may use it; empty means everyone. NBD: client addresses or networks
    /// (`10.0.0.5`, `10.0.0.0/24`); iSCSI: initiator names (IQNs).
    pub allow: Vec<String>,
    /// iSCSI: open to every initiator on purpose, even without CHAP on a portal that is
    /// not loopback (see the module's doc).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_any: bool,
    /// iSCSI: the LUN of the volume within its target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lun: Option<u64>,
    /// iSCSI: the CHAP user and secret initiators must prove.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chap: Option<ChapRecord>,
    /// iSCSI: the user and secret the target answers mutual CHAP with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutual_chap: Option<ChapRecord>,
    /// iSCSI: the logical block size hosts see (512 emulated on 4096-byte volumes, for
    /// hosts that need it); None: the volume's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
    /// iSCSI: report removable medium (START STOP UNIT ejects, PREVENT ALLOW MEDIUM
    /// REMOVAL guards it), as tgt's `removable=1`; off by default, since hosts treat
    /// removable disks differently.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removable: bool,
}

/// A CHAP user and secret; listings leave the secret out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChapRecord {
    /// CHAP_N.
    pub user: String,
    /// The shared secret (12 to 255 characters).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub secret: String,
}

impl ChapRecord {
    fn credentials(&self) -> Credentials {
        Credentials { user: self.user.clone(), secret: self.secret.clone() }
    }

    /// Refuses an empty user or a secret outside RFC 7143's advice (at least 12 bytes) or
    /// over 255 characters.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.user.is_empty() || !(12..=255).contains(&self.secret.len()) {
            return Err(format!(
                "CHAP user '{}': the user must not be empty and the secret must be 12 to 255 characters",
                self.user
            ));
        }
        Ok(())
    }
}

/// Whether `ip` is a loopback address (IPv4-mapped IPv6 included).
fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(v6.is_loopback(), |v4| v4.is_loopback()),
        IpAddr::V4(v4) => v4.is_loopback(),
    }
}

/// Why the iSCSI export `record` may not be served on `portal`: it names no initiators,
/// needs no CHAP and did not ask to be open to all, and the portal is not loopback.
pub(crate) fn open_to_all(record: &ExportRecord, portal: SocketAddr) -> Option<String> {
    let open = record.protocol == ISCSI && record.allow.is_empty() && record.chap.is_none();
    (open && !record.allow_any && !is_loopback(portal.ip())).then(|| {
        format!(
            "the iSCSI export of volume '{}' would be open to every initiator that reaches {portal}; \
             name the initiators that may use it (--allow IQN), require CHAP (--chap-user and \
             --chap-secret), or open it to all on purpose with --allow-any",
            record.volume
        )
    })
}

/// What listings show of an export.
#[derive(Clone, Debug, Serialize)]
pub struct ExportView {
    /// The export's settings (without CHAP secrets).
    #[serde(flatten)]
    pub record: ExportRecord,
    /// Where a client connects.
    pub uri: Option<String>,
    /// iSCSI: the portal (address:port) initiators log in through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub portal: Option<String>,
    /// Being served now.
    pub served: bool,
    /// Why it is not served.
    pub problem: Option<String>,
}

/// An IP network in an allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Network {
    addr: IpAddr,
    prefix: u32,
}

impl Network {
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("'{text}' is not an IP address or network (10.0.0.0/24)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("'{text}': the prefix length must be a number from 0 to {max}"))?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }

    pub(crate) fn contains(&self, client: IpAddr) -> bool {
        let client = match client {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(client),
            v4 => v4,
        };
        let bits = |a: IpAddr| -> u128 {
            match a {
                IpAddr::V4(v4) => u128::from(u32::from(v4)) << 96,
                IpAddr::V6(v6) => u128::from(v6),
            }
        };
        if self.addr.is_ipv4() != client.is_ipv4() {
            return false;
        }
        // IPv4 sits in the top 32 bits, so both families mask their top `prefix` bits.
        let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - self.prefix) };
        bits(self.addr) & mask == bits(client) & mask
    }
}

/// An export being served.
pub(crate) struct LiveExport {
    pub(crate) record: ExportRecord,
    pub(crate) frontend: Frontend,
}

/// What a frontend server needs of an export.
pub(crate) enum Frontend {
    /// An NBD export and the networks that may use it.
    Nbd { allow: Vec<Network>, export: strata_nbd::Export },
    /// A SCSI logical unit within an iSCSI target.
    Iscsi { lu: Arc<LogicalUnit> },
}

/// The key of an export in the controller's map: protocol, name and (iSCSI) LUN.
pub(crate) fn export_key(record: &ExportRecord) -> String {
    match record.lun {
        Some(lun) => format!("{}/{}/{lun}", record.protocol, record.name),
        None => format!("{}/{}", record.protocol, record.name),
    }
}

impl LiveExport {
    /// The NBD export, if this is one and `client` may see it.
    fn nbd_for(&self, client: IpAddr) -> Option<&strata_nbd::Export> {
        match &self.frontend {
            Frontend::Nbd { allow, export }
                if allow.is_empty() || allow.iter().any(|n| n.contains(client)) =>
            {
                Some(export)
            }
            _ => None,
        }
    }

    /// The logical unit, if this is an iSCSI export of `target`.
    fn lu_of(&self, target: &str) -> Option<&Arc<LogicalUnit>> {
        match &self.frontend {
            Frontend::Iscsi { lu } if self.record.name == target => Some(lu),
            _ => None,
        }
    }

    /// Whether `initiator` is on this export's allow-list (iSCSI names compare without case).
    fn allows_initiator(&self, initiator: &str) -> bool {
        self.record.allow.is_empty() || self.record.allow.iter().any(|a| a.eq_ignore_ascii_case(initiator))
    }
}

impl strata_nbd::Exports for Controller {
    fn lookup(&self, name: &str, client: IpAddr) -> Option<strata_nbd::Export> {
        let exports = self.exports.read();
        let mut visible = exports.values().filter_map(|e| e.nbd_for(client));
        if name.is_empty() {
            // The default export: the only one this client may see.
            let first = visible.next()?;
            return visible.next().is_none().then(|| first.clone());
        }
        visible.find(|e| e.name == name).cloned()
    }

    fn list(&self, client: IpAddr) -> Vec<strata_nbd::Export> {
        let exports = self.exports.read();
        exports.values().filter_map(|e| e.nbd_for(client)).cloned().collect()
    }
}

impl strata_iscsi::Targets for Controller {
    fn lookup(&self, target: &str, initiator: &str) -> Result<Arc<TargetNode>, Refusal> {
        let exports = self.exports.read();
        let mut node = TargetNode {
            name: target.to_string(),
            alias: None,
            luns: LunMap::new(),
            every_lu: Vec::new(),
            chap: None,
            mutual: None,
        };
        for export in exports.values() {
            let Some(lu) = export.lu_of(target) else { continue };
            node.every_lu.push(lu.clone());
            // Every LUN of a target has the same credentials (checked when exported).
            node.chap = export.record.chap.as_ref().map(ChapRecord::credentials);
            node.mutual = export.record.mutual_chap.as_ref().map(ChapRecord::credentials);
            if export.allows_initiator(initiator) {
                node.luns.insert(export.record.lun.unwrap_or(0), lu.clone());
            }
        }
        match (node.every_lu.is_empty(), node.luns.is_empty()) {
            (true, _) => Err(Refusal::NotFound),
            (false, true) => Err(Refusal::NotAllowed),
            (false, false) => Ok(Arc::new(node)),
        }
    }

    fn list(&self, initiator: &str) -> Vec<Arc<TargetNode>> {
        let names: std::collections::BTreeSet<String> = self
            .exports
            .read()
            .values()
            .filter(|e| e.record.protocol == ISCSI)
            .map(|e| e.record.name.clone())
            .collect();
        names.iter().filter_map(|name| strata_iscsi::Targets::lookup(self, name, initiator).ok()).collect()
    }

    fn generation(&self) -> u64 {
        self.export_generation.load(Ordering::Acquire)
    }

    fn discovery_chap(&self) -> Option<Credentials> {
        self.discovery_chap.get().map(ChapRecord::credentials)
    }

    fn login_failed(&self, failure: LoginFailure) {
        let reason = ReasonLabel { reason: failure.as_str().to_string() };
        self.metrics.iscsi_login_failures.get_or_create(&reason).inc();
    }
}

/// Checks an iSCSI name (RFC 3720 §3.2.6: `iqn.`, `eui.` or `naa.` forms) and returns it
/// in its normal, lower-case form.
pub(crate) fn iscsi_name(name: &str) -> Result<String, String> {
    let lower = name.to_ascii_lowercase();
    let valid_chars =
        lower.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.:".contains(c));
    let form = lower.starts_with("iqn.") || lower.starts_with("eui.") || lower.starts_with("naa.");
    if lower.len() > 223 || lower.len() < 5 || !valid_chars || !form {
        return Err(format!(
            "'{name}' is not an iSCSI name: use iqn.YYYY-MM.reversed.domain[:suffix] (letters, digits, '-', '.', ':'; at most 223)"
        ));
    }
    Ok(lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iscsi_names_are_checked_and_lowered() {
        assert_eq!(iscsi_name("iqn.2026-11.io.Strata:Vol1").unwrap(), "iqn.2026-11.io.strata:vol1");
        for bad in ["", "iqn", "target1", "iqn.2026-11.io.strata:vol 1", "iqn.2026_11"] {
            assert!(iscsi_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn allow_lists_match_addresses_and_networks() {
        let net = Network::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()), "v4-mapped clients match v4 rules");
        let host = Network::parse("127.0.0.1").unwrap();
        assert!(host.contains("127.0.0.1".parse().unwrap()) && !host.contains("127.0.0.2".parse().unwrap()));
        assert!(Network::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        assert!(Network::parse("fd00::/8").unwrap().contains("fd12::1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "host", "10.0.0.1/x", ""] {
            assert!(Network::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exports_open_to_all_need_a_loopback_portal_or_allow_any() {
        let open = ExportRecord {
            volume: "v".into(),
            protocol: ISCSI.into(),
            name: "iqn.2026-11.io.strata:v".into(),
            read_only: false,
            allow: Vec::new(),
            allow_any: false,
            lun: Some(0),
            chap: None,
            mutual_chap: None,
            block_size: None,
            removable: false,
        };
        for loopback in ["127.0.0.1:3260", "127.9.9.9:1", "[::1]:3260", "[::ffff:127.0.0.1]:3260"] {
            assert_eq!(open_to_all(&open, loopback.parse().unwrap()), None, "{loopback}");
        }
        let wide: SocketAddr = "0.0.0.0:3260".parse().unwrap();
        let why = open_to_all(&open, wide).expect("refused on 0.0.0.0");
        assert!(why.contains("--allow-any") && why.contains("--allow IQN"), "{why}");
        assert!(open_to_all(&open, "[::]:3260".parse().unwrap()).is_some());
        let allowed = ExportRecord { allow: vec!["iqn.2026-11.test:h".into()], ..open.clone() };
        let chap = ExportRecord {
            chap: Some(ChapRecord { user: "u".into(), secret: "twelve-chars".into() }),
            ..open.clone()
        };
        let any = ExportRecord { allow_any: true, ..open.clone() };
        let nbd = ExportRecord { protocol: NBD.into(), ..open.clone() };
        for served in [allowed, chap, any, nbd] {
            assert_eq!(open_to_all(&served, wide), None, "{served:?}");
        }
    }
}
