//! CHAP with MD5 (RFC 1994, as RFC 7143 §12.1.3 uses it): the target challenges the
//! initiator; with mutual CHAP the initiator challenges the target back.
//!
//! ```text
//!  initiator                      target
//!  CHAP_A=5            ──▶
//!                      ◀──  CHAP_A=5 CHAP_I=id CHAP_C=challenge
//!  CHAP_N CHAP_R [CHAP_I CHAP_C] ──▶   R == MD5(id ‖ secret ‖ challenge)?
//!                      ◀──  [CHAP_N CHAP_R = MD5(id' ‖ mutual secret ‖ challenge')]
//! ```

use md5::{Digest, Md5};
use rand::RngCore;

use crate::Credentials;
use crate::text::Pairs;

/// Bytes of challenge the target sends.
const CHALLENGE_LEN: usize = 16;
/// Longest challenge accepted from the initiator (RFC 7143 allows up to 1024 bytes).
const MAX_CHALLENGE: usize = 1024;

/// Why authentication failed; every case ends the login with status 0201.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChapError {
    /// The initiator did not offer MD5.
    #[error("the initiator offers no CHAP algorithm this target supports (CHAP_A={0})")]
    Algorithm(String),
    /// A key is missing or not in the expected form.
    #[error("CHAP key {0} is missing or malformed")]
    Malformed(&'static str),
    /// Wrong user name or response.
    #[error("CHAP authentication of user '{0}' failed")]
    Denied(String),
    /// The initiator asked the target to authenticate itself but none is configured, or
    /// sent back the target's own challenge.
    #[error("mutual CHAP requested but {0}")]
    Mutual(&'static str),
}

/// Where a CHAP exchange stands.
#[derive(Debug)]
pub enum Chap {
    /// Waiting for CHAP_A.
    Start,
    /// Challenge sent; waiting for CHAP_N/CHAP_R.
    Challenged {
        /// CHAP_I sent.
        id: u8,
        /// CHAP_C sent.
        challenge: [u8; CHALLENGE_LEN],
    },
    /// The initiator proved itself (and the target answered any mutual challenge).
    Done,
}

impl Chap {
    /// Takes the initiator's keys, adds the target's answer to `answer`.
    pub fn step(
        &mut self,
        offered: &Pairs,
        answer: &mut Pairs,
        initiator: &Credentials,
        mutual: Option<&Credentials>,
    ) -> Result<(), ChapError> {
        match self {
            Chap::Start => {
                let algorithms = offered.get("CHAP_A").ok_or(ChapError::Malformed("CHAP_A"))?;
                if !algorithms.split(',').any(|a| a == "5") {
                    return Err(ChapError::Algorithm(algorithms.into()));
                }
                let mut rng = rand::rng();
                let mut challenge = [0; CHALLENGE_LEN];
                rng.fill_bytes(&mut challenge);
                let id = (rng.next_u32() & 0xff) as u8;
                answer.push("CHAP_A", "5");
                answer.push("CHAP_I", id.to_string());
                answer.push("CHAP_C", hex(&challenge));
                *self = Chap::Challenged { id, challenge };
                Ok(())
            }
            Chap::Challenged { id, challenge } => {
                let user = offered.get("CHAP_N").ok_or(ChapError::Malformed("CHAP_N"))?;
                let response = offered.get("CHAP_R").and_then(unhex).ok_or(ChapError::Malformed("CHAP_R"))?;
                let expected = digest(*id, initiator.secret.as_bytes(), challenge);
                if user != initiator.user || !constant_time_eq(&response, &expected) {
                    return Err(ChapError::Denied(user.into()));
                }
                if let Some(their_id) = offered.get("CHAP_I") {
                    let their_id: u8 = their_id.parse().map_err(|_| ChapError::Malformed("CHAP_I"))?;
                    let their_challenge = offered
                        .get("CHAP_C")
                        .and_then(unhex)
                        .filter(|c| !c.is_empty() && c.len() <= MAX_CHALLENGE)
                        .ok_or(ChapError::Malformed("CHAP_C"))?;
                    let mutual = mutual.ok_or(ChapError::Mutual("the target has no mutual credentials"))?;
                    if their_challenge[..] == challenge[..] {
                        return Err(ChapError::Mutual("the initiator reflected the target's challenge"));
                    }
                    answer.push("CHAP_N", mutual.user.clone());
                    answer.push("CHAP_R", hex(&digest(their_id, mutual.secret.as_bytes(), &their_challenge)));
                }
                *self = Chap::Done;
                Ok(())
            }
            Chap::Done => Ok(()),
        }
    }
}

/// MD5(id ‖ secret ‖ challenge).
pub fn digest(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut md5 = Md5::new();
    md5.update([id]);
    md5.update(secret);
    md5.update(challenge);
    md5.finalize().into()
}

/// `0x`-prefixed lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Decodes `0x` hex (RFC 7143 also allows base64 with `0b`, which initiators do not use
/// for CHAP).
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    let digits = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X"))?;
    if digits.is_empty() || digits.len() % 2 != 0 || digits.len() > 2 * MAX_CHALLENGE {
        return None;
    }
    (0..digits.len()).step_by(2).map(|i| u8::from_str_radix(digits.get(i..i + 2)?, 16).ok()).collect()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(user: &str, secret: &str) -> Credentials {
        Credentials { user: user.into(), secret: secret.into() }
    }

    fn pairs(list: &[(&str, String)]) -> Pairs {
        Pairs(list.iter().map(|(k, v)| (k.to_string(), v.clone())).collect())
    }

    #[test]
    fn one_way_and_mutual() {
        let user = creds("alice", "secret-12345");
        let target = creds("target", "other-secret-1");
        let mut chap = Chap::Start;
        let mut answer = Pairs::default();
        chap.step(&pairs(&[("CHAP_A", "7,5".into())]), &mut answer, &user, Some(&target)).unwrap();
        let id: u8 = answer.get("CHAP_I").unwrap().parse().unwrap();
        let challenge = unhex(answer.get("CHAP_C").unwrap()).unwrap();
        let response = hex(&digest(id, b"secret-12345", &challenge));
        let mut answer = Pairs::default();
        let offered = pairs(&[
            ("CHAP_N", "alice".into()),
            ("CHAP_R", response),
            ("CHAP_I", "9".into()),
            ("CHAP_C", "0x0102030405".into()),
        ]);
        chap.step(&offered, &mut answer, &user, Some(&target)).unwrap();
        assert_eq!(answer.get("CHAP_N"), Some("target"));
        assert_eq!(
            answer.get("CHAP_R").map(String::from),
            Some(hex(&digest(9, b"other-secret-1", &[1, 2, 3, 4, 5])))
        );
    }

    #[test]
    fn wrong_secret_and_bad_keys_fail() {
        let user = creds("alice", "secret-12345");
        let mut chap = Chap::Start;
        assert!(matches!(
            chap.step(&pairs(&[("CHAP_A", "7".into())]), &mut Pairs::default(), &user, None),
            Err(ChapError::Algorithm(_))
        ));
        chap.step(&pairs(&[("CHAP_A", "5".into())]), &mut Pairs::default(), &user, None).unwrap();
        let offered = pairs(&[("CHAP_N", "alice".into()), ("CHAP_R", hex(&[0; 16]))]);
        assert!(matches!(chap.step(&offered, &mut Pairs::default(), &user, None), Err(ChapError::Denied(_))));
        assert_eq!(unhex("0x1"), None);
        assert_eq!(unhex("0xzz"), None);
        assert_eq!(unhex("12"), None);
    }
}
