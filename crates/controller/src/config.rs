//! How `strata serve` is set up: a TOML file, overridden by command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use strata_net::listener::Caps;

use crate::exports::ChapRecord;

/// Default REST API address.
pub const DEFAULT_API: &str = "127.0.0.1:7480";
/// Default NBD address (the protocol's registered port).
pub const DEFAULT_NBD: &str = "127.0.0.1:10809";
/// Where the iSCSI target listens unless told otherwise (the IANA port).
pub const DEFAULT_ISCSI: &str = "127.0.0.1:3260";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/strata";
/// Default data directory of `serve --demo`.
pub const DEFAULT_DEMO_DIR: &str = "strata-demo";

/// Settings of a controller; every field may come from the file or a flag.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// State and default device files.
    pub data_dir: Option<PathBuf>,
    /// REST API listen address.
    pub api: Option<SocketAddr>,
    /// NBD listen address.
    pub nbd: Option<SocketAddr>,
    /// iSCSI portal (listen address).
    pub iscsi: Option<SocketAddr>,
    /// Name of a pool made by the first `device add`.
    pub pool_name: Option<String>,
    /// Open device files with O_DIRECT (bypass the page cache).
    pub direct_io: Option<bool>,
    /// Make demo devices, a `demo` volume and its export if they are missing.
    pub demo: Option<bool>,
    /// Folders where `device add` may create or take device files, besides the data
    /// directory's `devices/` (always allowed). Block devices need no entry.
    pub device_dirs: Option<Vec<PathBuf>>,
    /// Caps on connections and the API's timeout (`[connections]`).
    pub connections: Option<ConnectionLimits>,
    /// CHAP user iSCSI discovery sessions must log in as; with it, SendTargets answers
    /// only initiators that proved the secret.
    pub iscsi_discovery_chap_user: Option<String>,
    /// The discovery CHAP secret (12 to 255 characters); keep the file 0600.
    pub iscsi_discovery_chap_secret: Option<String>,
}

/// How many connections each listener (NBD, iSCSI, the API) serves, and how long the API
/// waits for clients: the `[connections]` table. Every key has a default.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConnectionLimits {
    /// Most connections a listener serves at once [1024].
    pub total: Option<usize>,
    /// Most connections a listener serves at once from one client address [64], so one
    /// address cannot take every place.
    pub per_address: Option<usize>,
    /// Milliseconds an API connection may go without sending a whole request head (idle,
    /// silent, or sending its headers slowly) and a request body may take to arrive
    /// [30000]; then the connection is closed.
    pub api_idle_timeout_ms: Option<u64>,
}

/// Default of `api_idle_timeout_ms`.
pub const DEFAULT_API_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

impl ConnectionLimits {
    /// The caps of each listener; zero is refused (it would refuse every client).
    pub fn caps(&self) -> Result<Caps, String> {
        let caps = Caps {
            total: self.total.unwrap_or(Caps::TOTAL),
            per_address: self.per_address.unwrap_or(Caps::PER_ADDRESS),
        };
        if caps.total == 0 || caps.per_address == 0 {
            return Err("[connections] total and per_address must be at least 1".into());
        }
        Ok(caps)
    }

    /// How long the API waits for a request head or body.
    pub fn api_idle_timeout(&self) -> Result<Duration, String> {
        match self.api_idle_timeout_ms {
            Some(0) => Err("[connections] api_idle_timeout_ms must be at least 1".into()),
            Some(ms) => Ok(Duration::from_millis(ms)),
            None => Ok(DEFAULT_API_IDLE_TIMEOUT),
        }
    }
}

impl ServeConfig {
    /// Reads a TOML file; errors name the file, line and key.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        let config: Self =
            toml::from_str(&text).map_err(|e| format!("config file {}: {}", path.display(), one_line(&e)))?;
        if config.iscsi_discovery_chap_secret.is_some() {
            // The data directory's rule, but only a warning: the file is the operator's.
            match crate::data_dir::readable_by_others(path, crate::data_dir::SECRET_MODE) {
                Ok(None) => {}
                Ok(Some(mode)) => tracing::warn!(
                    file = %path.display(),
                    mode = format!("{mode:04o}"),
                    "the config file holds iscsi_discovery_chap_secret and group or others may read it; run `chmod 600` on it"
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    "the config file holds iscsi_discovery_chap_secret and others could change it"
                ),
            }
        }
        Ok(config)
    }

    /// `other`'s settings where it has them, ours elsewhere.
    pub fn overridden_by(self, other: ServeConfig) -> ServeConfig {
        ServeConfig {
            data_dir: other.data_dir.or(self.data_dir),
            api: other.api.or(self.api),
            nbd: other.nbd.or(self.nbd),
            iscsi: other.iscsi.or(self.iscsi),
            pool_name: other.pool_name.or(self.pool_name),
            direct_io: other.direct_io.or(self.direct_io),
            demo: other.demo.or(self.demo),
            device_dirs: other.device_dirs.or(self.device_dirs),
            connections: other.connections.or(self.connections),
            iscsi_discovery_chap_user: other.iscsi_discovery_chap_user.or(self.iscsi_discovery_chap_user),
            iscsi_discovery_chap_secret: other
                .iscsi_discovery_chap_secret
                .or(self.iscsi_discovery_chap_secret),
        }
    }

    /// The discovery CHAP credentials, if set: both keys or neither, and a secret of 12 to
    /// 255 characters.
    pub fn discovery_chap(&self) -> Result<Option<ChapRecord>, String> {
        match (&self.iscsi_discovery_chap_user, &self.iscsi_discovery_chap_secret) {
            (None, None) => Ok(None),
            (Some(user), Some(secret)) => {
                let chap = ChapRecord { user: user.clone(), secret: secret.clone() };
                chap.check().map_err(|e| format!("iscsi_discovery_chap_user and _secret: {e}"))?;
                Ok(Some(chap))
            }
            _ => Err(
                "iscsi_discovery_chap_user and iscsi_discovery_chap_secret go together: set both or neither"
                    .into(),
            ),
        }
    }
}

/// A TOML error as "line L, column C: message" (the crate's own text spans several lines,
/// headed by "TOML parse error at line L, column C").
fn one_line(e: &toml::de::Error) -> String {
    let message = e.message().trim();
    match e.to_string().lines().next().and_then(|l| l.split_once(" at ")) {
        Some((_, place)) => format!("{place}: {message}"),
        None => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limits_have_defaults_and_refuse_zero() {
        let none = ConnectionLimits::default();
        assert_eq!(none.caps().unwrap(), Caps { total: 1024, per_address: 64 });
        assert_eq!(none.api_idle_timeout().unwrap(), DEFAULT_API_IDLE_TIMEOUT);
        let set: ServeConfig =
            toml::from_str("[connections]\nper_address = 8\napi_idle_timeout_ms = 500\n").unwrap();
        let limits = set.connections.unwrap();
        assert_eq!(limits.caps().unwrap(), Caps { total: 1024, per_address: 8 });
        assert_eq!(limits.api_idle_timeout().unwrap(), Duration::from_millis(500));
        let zero: ServeConfig = toml::from_str("[connections]\ntotal = 0\n").unwrap();
        assert!(zero.connections.unwrap().caps().unwrap_err().contains("at least 1"));
        assert!(toml::from_str::<ServeConfig>("[connections]\nper_adress = 8\n").is_err());
    }

    #[test]
    fn errors_name_the_line_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("strata.toml");
        std::fs::write(&path, "data_dir = \"/tmp/x\"\nnbd_port = 5\n").unwrap();
        let e = ServeConfig::load(&path).unwrap_err();
        assert!(e.contains("line 2") && e.contains("nbd_port"), "{e}");
        std::fs::write(&path, "api = \"not an address\"\n").unwrap();
        let e = ServeConfig::load(&path).unwrap_err();
        assert!(e.contains("line 1"), "{e}");
        std::fs::write(&path, "api = \"127.0.0.1:1\"\n").unwrap();
        let file = ServeConfig::load(&path).unwrap();
        let flags = ServeConfig { api: Some("127.0.0.1:2".parse().unwrap()), ..Default::default() };
        assert_eq!(file.overridden_by(flags).api, Some("127.0.0.1:2".parse().unwrap()));
    }
}
