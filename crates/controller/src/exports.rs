//! Exports: how volumes are offered to hosts, who may see them (allow-lists of addresses
//! and networks), and the lookup the NBD server asks.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::controller::Controller;

/// How a volume is offered to hosts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRecord {
    /// The volume.
    pub volume: String,
    /// Frontend protocol (`nbd`).
    pub protocol: String,
    /// Name clients ask for.
    pub name: String,
    /// Refuse writes.
    pub read_only: bool,
    /// Client addresses or networks (`10.0.0.5`, `10.0.0.0/24`) that may use it; empty
    /// means every client.
    pub allow: Vec<String>,
}

/// What listings show of an export.
#[derive(Clone, Debug, Serialize)]
pub struct ExportView {
    /// The export's settings.
    #[serde(flatten)]
    pub record: ExportRecord,
    /// Where a client connects.
    pub uri: Option<String>,
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
    pub(crate) allow: Vec<Network>,
    pub(crate) export: strata_nbd::Export,
}

impl LiveExport {
    /// Whether `client` may see and use this export.
    fn allows(&self, client: IpAddr) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(client))
    }
}

impl strata_nbd::Exports for Controller {
    fn lookup(&self, name: &str, client: IpAddr) -> Option<strata_nbd::Export> {
        let exports = self.exports.read();
        let allowed = |e: &&LiveExport| e.allows(client);
        if name.is_empty() {
            // The default export: the only one this client may see.
            let mut visible = exports.values().filter(allowed);
            let first = visible.next()?;
            return visible.next().is_none().then(|| first.export.clone());
        }
        exports.get(name).filter(allowed).map(|e| e.export.clone())
    }

    fn list(&self, client: IpAddr) -> Vec<strata_nbd::Export> {
        let exports = self.exports.read();
        exports.values().filter(|e| e.allows(client)).map(|e| e.export.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
