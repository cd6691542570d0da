//! Text key=value lists (RFC 7143 §6): the data segment of Login and Text PDUs, each
//! pair ended by a NUL byte.

use std::fmt::Write;

/// Longest key the RFC allows.
const MAX_KEY: usize = 63;
/// Longest value this target takes (the RFC's limit for most keys).
const MAX_VALUE: usize = 8192;

/// Why a text segment is not a list of key=value pairs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TextError {
    /// A pair has no `=`.
    #[error("text pair '{0}' has no '='")]
    NoEquals(String),
    /// A key or value is longer than the RFC allows, or not UTF-8.
    #[error("text key '{0}' is malformed or too long")]
    Malformed(String),
}

/// Ordered key=value pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pairs(pub Vec<(String, String)>);

impl Pairs {
    /// Parses a data segment.
    pub fn parse(data: &[u8]) -> Result<Self, TextError> {
        let mut pairs = Vec::new();
        for item in data.split(|b| *b == 0).filter(|s| !s.is_empty()) {
            let text = std::str::from_utf8(item)
                .map_err(|_| TextError::Malformed(String::from_utf8_lossy(item).into_owned()))?;
            let (key, value) = text.split_once('=').ok_or_else(|| TextError::NoEquals(text.into()))?;
            if key.is_empty() || key.len() > MAX_KEY || value.len() > MAX_VALUE {
                return Err(TextError::Malformed(key.chars().take(MAX_KEY).collect()));
            }
            pairs.push((key.to_string(), value.to_string()));
        }
        Ok(Self(pairs))
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Appends a pair.
    pub fn push(&mut self, key: &str, value: impl Into<String>) {
        self.0.push((key.to_string(), value.into()));
    }

    /// The wire form: every pair followed by NUL.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = String::new();
        for (k, v) in &self.0 {
            let _ = write!(out, "{k}={v}\0");
        }
        out.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_encodes() {
        let pairs = Pairs::parse(b"InitiatorName=iqn.x\0SessionType=Normal\0\0").unwrap();
        assert_eq!(pairs.get("SessionType"), Some("Normal"));
        assert_eq!(Pairs::parse(&pairs.encode()).unwrap(), pairs);
        assert!(Pairs::parse(b"novalue\0").is_err());
        assert!(Pairs::parse(&[b'k', b'=', 0xff, 0]).is_err());
        assert!(Pairs::parse(format!("{}=1\0", "k".repeat(64)).as_bytes()).is_err());
    }
}
