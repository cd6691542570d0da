//! The login phase (RFC 7143 §6.3): identity, security negotiation, operational
//! negotiation, then the switch to the full feature phase.
//!
//! ```text
//!          ┌──────────── T=1, NSG=1 (auth done) ──────────┐
//!  Security (CSG=0) ── T=1, NSG=3 (auth done) ──┐         ▼
//!                                               ▼   Operational (CSG=1)
//!                                        Full feature ◀── T=1, NSG=3
//! ```
//!
//! A login that starts in the operational stage skips security, which only a target
//! without CHAP allows (and a discovery session only when no discovery CHAP is set).
//! Every refusal is a Login Response with a status class and detail, after which the
//! connection closes; a refusal for a wrong secret, a name not allowed or a target not
//! found goes out only after [`FAILED_LOGIN_DELAY`] and is counted, so an initiator that
//! guesses gets one try a second per connection.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::chap::{Chap, ChapError};
use crate::negotiate::{Parameters, ours};
use crate::pdu::{self, Digests, Pdu, op};
use crate::session::Sessions;
use crate::text::Pairs;
use crate::{Credentials, LoginFailure, Refusal, TargetNode, Targets};

/// Login status (class, detail) pairs (RFC 7143 §11.13.5).
pub mod status {
    /// Generic initiator error.
    pub const INITIATOR_ERROR: (u8, u8) = (2, 0);
    /// Authentication failed.
    pub const AUTHENTICATION_FAILED: (u8, u8) = (2, 1);
    /// The initiator may not use the target.
    pub const AUTHORIZATION_FAILURE: (u8, u8) = (2, 2);
    /// No such target.
    pub const NOT_FOUND: (u8, u8) = (2, 3);
    /// No version in common.
    pub const UNSUPPORTED_VERSION: (u8, u8) = (2, 5);
    /// A required key is missing.
    pub const MISSING_PARAMETER: (u8, u8) = (2, 7);
    /// The session to add a connection to does not exist.
    pub const SESSION_DOES_NOT_EXIST: (u8, u8) = (2, 10);
}

/// Stages (CSG/NSG values).
mod stage {
    pub const SECURITY: u8 = 0;
    pub const OPERATIONAL: u8 = 1;
    pub const FULL_FEATURE: u8 = 3;
}

/// Login PDU flags.
const TRANSIT: u8 = 0x80;
const CONTINUE: u8 = 0x40;

/// Commands a session may have queued beyond ExpCmdSN.
pub const COMMAND_WINDOW: u32 = 128;

/// How long a login refused for its credentials, its name or its target waits before the
/// answer goes out (LIO and tgt answer at once, which let an initiator try 500 secrets a
/// second).
pub const FAILED_LOGIN_DELAY: Duration = Duration::from_secs(1);

/// What kind of session a login opened.
#[derive(Clone)]
pub enum SessionKind {
    /// SendTargets only.
    Discovery,
    /// SCSI commands to a target.
    Normal(Arc<TargetNode>),
}

/// A finished login: the connection enters the full feature phase.
pub struct LoggedIn {
    /// Discovery or normal.
    pub kind: SessionKind,
    /// The initiator's IQN.
    pub initiator: String,
    /// The initiator's session ID.
    pub isid: [u8; 6],
    /// Negotiated parameters.
    pub params: Parameters,
    /// Next StatSN to send.
    pub stat_sn: u32,
    /// Next CmdSN expected.
    pub exp_cmd_sn: u32,
}

/// Why a login did not finish.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The connection closed or failed.
    #[error("connection lost during login: {0}")]
    Io(#[from] std::io::Error),
    /// The initiator sent something that is not a login PDU.
    #[error("{0}")]
    Protocol(String),
    /// The login was refused with a status (already sent).
    #[error("login of '{initiator}' refused ({class:#04x}/{detail:#04x}): {why}")]
    Refused {
        /// Status class.
        class: u8,
        /// Status detail.
        detail: u8,
        /// What was wrong.
        why: String,
        /// The initiator's name, as it gave it (empty if it gave none).
        initiator: String,
    },
}

/// What a login needs from the server.
pub struct LoginContext<'a> {
    /// Targets and their allow-lists.
    pub targets: &'a dyn Targets,
    /// Gives out session handles.
    pub sessions: &'a Sessions,
}

/// Where security negotiation stands.
enum Security {
    /// No CHAP required; AuthMethod=None may still be negotiated.
    Open,
    /// CHAP chosen; the exchange is under way.
    Chap(Chap),
    /// Passed.
    Done,
}

struct Login {
    initiator: String,
    isid: [u8; 6],
    itt: u32,
    kind: SessionKind,
    /// What the initiator must prove, and what the target answers a mutual challenge with.
    chap: Option<(Credentials, Option<Credentials>)>,
    security: Security,
    params: Parameters,
    declared: bool,
    first_reply: bool,
    stat_sn: u32,
    exp_cmd_sn: u32,
}

/// Runs the login phase on `stream`; bytes that arrive after the last login PDU stay in
/// `input` for the full feature phase.
pub async fn login<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    input: &mut BytesMut,
    ctx: &LoginContext<'_>,
) -> Result<LoggedIn, LoginError> {
    let first = read_pdu(stream, input).await?;
    let mut login = match start(&first, ctx) {
        Ok(login) => login,
        Err((status, why)) => {
            let initiator = Pairs::parse(&first.data)
                .ok()
                .and_then(|p| p.get("InitiatorName").map(String::from))
                .unwrap_or_default();
            return Err(refuse(stream, ctx, &first, (status, why), &initiator, 0).await);
        }
    };
    let mut pdu = first;
    let mut text = Vec::new();
    loop {
        text.extend_from_slice(&pdu.data);
        if pdu.flags() & CONTINUE != 0 {
            // More keys follow in the next PDU: acknowledge with an empty response.
            let reply = login.reply(&pdu, false, Pairs::default());
            write(stream, &reply).await?;
            pdu = next_login_pdu(stream, input, &login).await?;
            continue;
        }
        let offered = match Pairs::parse(&text) {
            Ok(p) => p,
            Err(e) => {
                let failed = (status::INITIATOR_ERROR, e.to_string());
                return Err(refuse(stream, ctx, &pdu, failed, &login.initiator, login.stat_sn).await);
            }
        };
        text.clear();
        match login.step(&pdu, &offered) {
            Ok((answer, transit)) => {
                let done = transit && pdu.flags() & 0x03 == stage::FULL_FEATURE;
                let mut reply = login.reply(&pdu, transit, answer);
                if done {
                    let tsih = ctx.sessions.next_tsih();
                    reply.header[14..16].copy_from_slice(&tsih.to_be_bytes());
                    write(stream, &reply).await?;
                    return Ok(LoggedIn {
                        kind: login.kind,
                        initiator: login.initiator,
                        isid: login.isid,
                        params: login.params,
                        stat_sn: login.stat_sn,
                        exp_cmd_sn: login.exp_cmd_sn,
                    });
                }
                write(stream, &reply).await?;
            }
            Err(failed) => {
                return Err(refuse(stream, ctx, &pdu, failed, &login.initiator, login.stat_sn).await);
            }
        }
        pdu = next_login_pdu(stream, input, &login).await?;
    }
}

async fn next_login_pdu<S: AsyncRead + Unpin>(
    stream: &mut S,
    input: &mut BytesMut,
    login: &Login,
) -> Result<Pdu, LoginError> {
    let pdu = read_pdu(stream, input).await?;
    if pdu.itt() != login.itt {
        return Err(LoginError::Protocol(format!(
            "login PDU with ITT {:#x} in a login that started with {:#x}",
            pdu.itt(),
            login.itt
        )));
    }
    Ok(pdu)
}

/// Reads the next PDU, which must be a Login request.
async fn read_pdu<S: AsyncRead + Unpin>(stream: &mut S, input: &mut BytesMut) -> Result<Pdu, LoginError> {
    loop {
        match pdu::decode(input, Digests::default(), ours::MAX_RECV_DATA_SEGMENT_LENGTH) {
            Ok(Some(pdu)) if pdu.opcode() == op::LOGIN => return Ok(pdu),
            Ok(Some(pdu)) => {
                return Err(LoginError::Protocol(format!(
                    "opcode {:#04x} during login; only Login requests are allowed",
                    pdu.opcode()
                )));
            }
            Ok(None) => {}
            Err(e) => return Err(LoginError::Protocol(e.to_string())),
        }
        if stream.read_buf(input).await? == 0 {
            return Err(LoginError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

type Failed = ((u8, u8), String);

/// Checks the first login PDU: version, identity, session type and target.
fn start(pdu: &Pdu, ctx: &LoginContext<'_>) -> Result<Login, Failed> {
    if pdu.header[3] > 0 {
        return Err((status::UNSUPPORTED_VERSION, format!("version-min {} > 0", pdu.header[3])));
    }
    let tsih = u16::from_be_bytes([pdu.header[14], pdu.header[15]]);
    if tsih != 0 {
        return Err((
            status::SESSION_DOES_NOT_EXIST,
            format!("TSIH {tsih}: sessions take one connection (MaxConnections=1)"),
        ));
    }
    let offered = Pairs::parse(&pdu.data).map_err(|e| (status::INITIATOR_ERROR, e.to_string()))?;
    let initiator = offered
        .get("InitiatorName")
        .filter(|n| !n.is_empty())
        .ok_or((status::MISSING_PARAMETER, "the first login PDU must carry InitiatorName".into()))?
        .to_string();
    let kind = match offered.get("SessionType").unwrap_or("Normal") {
        "Discovery" => SessionKind::Discovery,
        "Normal" => {
            let name = offered
                .get("TargetName")
                .ok_or((status::MISSING_PARAMETER, "a normal session needs TargetName".into()))?;
            match ctx.targets.lookup(name, &initiator) {
                Ok(target) => SessionKind::Normal(target),
                Err(Refusal::NotFound) => {
                    return Err((status::NOT_FOUND, format!("no target named '{name}'")));
                }
                Err(Refusal::NotAllowed) => {
                    return Err((
                        status::AUTHORIZATION_FAILURE,
                        format!("initiator '{initiator}' is not allowed on target '{name}'"),
                    ));
                }
            }
        }
        other => return Err((status::INITIATOR_ERROR, format!("unknown SessionType '{other}'"))),
    };
    let chap = match &kind {
        SessionKind::Normal(target) => target.chap.clone().map(|c| (c, target.mutual.clone())),
        SessionKind::Discovery => ctx.targets.discovery_chap().map(|c| (c, None)),
    };
    let security = if chap.is_some() { Security::Chap(Chap::Start) } else { Security::Open };
    let mut isid = [0; 6];
    isid.copy_from_slice(&pdu.header[8..14]);
    Ok(Login {
        initiator,
        isid,
        itt: pdu.itt(),
        kind,
        chap,
        security,
        params: Parameters::default(),
        declared: false,
        first_reply: true,
        stat_sn: pdu.u32_at(28),
        exp_cmd_sn: pdu.u32_at(24),
    })
}

impl Login {
    fn target(&self) -> Option<&TargetNode> {
        match &self.kind {
            SessionKind::Normal(t) => Some(t),
            SessionKind::Discovery => None,
        }
    }

    /// Handles one complete set of keys; returns the answer and whether the stage ends.
    fn step(&mut self, pdu: &Pdu, offered: &Pairs) -> Result<(Pairs, bool), Failed> {
        let flags = pdu.flags();
        let (csg, nsg, transit) = ((flags >> 2) & 0x03, flags & 0x03, flags & TRANSIT != 0);
        let mut answer = Pairs::default();
        match csg {
            stage::SECURITY => self.security(offered, &mut answer)?,
            stage::OPERATIONAL => {
                if matches!(self.security, Security::Chap(_)) {
                    return Err((status::AUTHENTICATION_FAILED, "the target requires CHAP".into()));
                }
                self.params.negotiate(offered, &mut answer, &mut self.declared);
            }
            other => return Err((status::INITIATOR_ERROR, format!("login in stage {other}"))),
        }
        if transit {
            if nsg <= csg || nsg == 2 {
                return Err((status::INITIATOR_ERROR, format!("cannot move from stage {csg} to {nsg}")));
            }
            if matches!(self.security, Security::Chap(_)) {
                // Authentication is not finished: stay in this stage (T=0 in the answer).
                return Ok((answer, false));
            }
            if nsg == stage::FULL_FEATURE && !self.declared {
                // Straight from security to full feature: declare our limit anyway.
                self.params.negotiate(&Pairs::default(), &mut answer, &mut self.declared);
            }
        }
        Ok((answer, transit))
    }

    fn security(&mut self, offered: &Pairs, answer: &mut Pairs) -> Result<(), Failed> {
        if let Some(methods) = offered.get("AuthMethod") {
            let methods: Vec<&str> = methods.split(',').collect();
            let chosen = match &self.security {
                Security::Chap(_) if methods.contains(&"CHAP") => "CHAP",
                Security::Chap(_) => {
                    return Err((status::AUTHENTICATION_FAILED, "the target requires CHAP".into()));
                }
                _ if methods.contains(&"None") => "None",
                _ => {
                    return Err((
                        status::AUTHENTICATION_FAILED,
                        format!("no authentication method in common (offered {})", methods.join(",")),
                    ));
                }
            };
            answer.push("AuthMethod", chosen);
        }
        if let (Security::Chap(chap), Some((initiator, mutual))) = (&mut self.security, &self.chap)
            && (offered.get("CHAP_A").is_some() || offered.get("CHAP_N").is_some())
        {
            chap.step(offered, answer, initiator, mutual.as_ref()).map_err(|e| {
                let status = match e {
                    ChapError::Malformed(_) => status::INITIATOR_ERROR,
                    _ => status::AUTHENTICATION_FAILED,
                };
                (status, e.to_string())
            })?;
            if matches!(chap, Chap::Done) {
                self.security = Security::Done;
            }
        }
        // Operational keys may ride along in the security stage; this target declares its
        // own limit in the operational stage.
        self.params.negotiate(offered, answer, &mut true);
        Ok(())
    }

    /// A Login Response to `request`.
    fn reply(&mut self, request: &Pdu, transit: bool, mut answer: Pairs) -> Pdu {
        if self.first_reply {
            self.first_reply = false;
            if let Some(target) = self.target() {
                let alias = target.alias.clone();
                answer.0.insert(0, ("TargetPortalGroupTag".into(), "1".into()));
                if let Some(alias) = alias {
                    answer.0.insert(0, ("TargetAlias".into(), alias));
                }
            }
        }
        let mut pdu = Pdu::new(op::LOGIN_RESPONSE);
        let flags = request.flags();
        let csg = (flags >> 2) & 0x03;
        pdu.header[1] = if transit { TRANSIT | (csg << 2) | (flags & 0x03) } else { csg << 2 };
        pdu.header[8..14].copy_from_slice(&self.isid);
        pdu.set_u32(16, self.itt);
        pdu.set_u32(24, self.stat_sn);
        self.stat_sn = self.stat_sn.wrapping_add(1);
        pdu.set_u32(28, self.exp_cmd_sn);
        pdu.set_u32(32, self.exp_cmd_sn.wrapping_add(COMMAND_WINDOW - 1));
        pdu.data = answer.encode().into();
        pdu
    }
}

/// The failures that are delayed and counted: those an initiator guessing secrets, names
/// or targets would see.
fn counted(status: (u8, u8)) -> Option<LoginFailure> {
    match status {
        status::AUTHENTICATION_FAILED => Some(LoginFailure::Authentication),
        status::AUTHORIZATION_FAILURE => Some(LoginFailure::NotAllowed),
        status::NOT_FOUND => Some(LoginFailure::NoSuchTarget),
        _ => None,
    }
}

/// Sends a Login Response with a failure status (after the delay, for the failures that
/// are counted) and returns the error to end with.
async fn refuse<S: AsyncWrite + Unpin>(
    stream: &mut S,
    ctx: &LoginContext<'_>,
    request: &Pdu,
    ((class, detail), why): Failed,
    initiator: &str,
    stat_sn: u32,
) -> LoginError {
    if let Some(failure) = counted((class, detail)) {
        // Only this connection's thread waits; the others go on serving.
        tokio::time::sleep(ctx.targets.failed_login_delay()).await;
        ctx.targets.login_failed(failure);
    }
    let mut pdu = Pdu::new(op::LOGIN_RESPONSE);
    pdu.header[8..14].copy_from_slice(&request.header[8..14]);
    pdu.set_u32(16, request.itt());
    pdu.set_u32(24, stat_sn);
    pdu.set_u32(28, request.u32_at(24));
    pdu.set_u32(32, request.u32_at(24).wrapping_add(COMMAND_WINDOW - 1));
    pdu.header[36] = class;
    pdu.header[37] = detail;
    if let Err(e) = write(stream, &pdu).await {
        return e.into();
    }
    LoginError::Refused { class, detail, why, initiator: initiator.to_string() }
}

async fn write<S: AsyncWrite + Unpin>(stream: &mut S, pdu: &Pdu) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    pdu::encode(&mut out, pdu, Digests::default());
    stream.write_all(&out).await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use super::*;

    /// No targets; discovery needs CHAP; refusals are counted and wait 200 ms.
    #[derive(Default)]
    struct Guarded {
        failures: AtomicUsize,
    }

    impl Targets for Guarded {
        fn lookup(&self, _: &str, _: &str) -> Result<Arc<TargetNode>, Refusal> {
            Err(Refusal::NotFound)
        }
        fn list(&self, _: &str) -> Vec<Arc<TargetNode>> {
            Vec::new()
        }
        fn generation(&self) -> u64 {
            0
        }
        fn discovery_chap(&self) -> Option<Credentials> {
            Some(Credentials { user: "finder".into(), secret: "finder-secret".into() })
        }
        fn login_failed(&self, _: LoginFailure) {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        fn failed_login_delay(&self) -> Duration {
            Duration::from_millis(200)
        }
    }

    /// Sends one login PDU straight to the full feature phase (no security stage) and
    /// returns the status of the answer and how long it took.
    async fn login_without_chap(targets: &Guarded, keys: &[(&str, &str)]) -> ((u8, u8), Duration) {
        let (mut initiator, mut target) = tokio::io::duplex(1 << 16);
        let mut pdu = Pdu::new(op::LOGIN);
        pdu.header[1] = TRANSIT | (stage::OPERATIONAL << 2) | stage::FULL_FEATURE;
        pdu.data = Pairs(keys.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()).encode().into();
        write(&mut initiator, &pdu).await.unwrap();
        let sessions = Sessions::default();
        let ctx = LoginContext { targets, sessions: &sessions };
        let started = Instant::now();
        let result = login(&mut target, &mut BytesMut::new(), &ctx).await;
        let elapsed = started.elapsed();
        let Err(LoginError::Refused { class, detail, initiator: name, .. }) = result else {
            panic!("the login must be refused");
        };
        assert_eq!(name, "iqn.2026-11.test:h");
        let mut answer = BytesMut::new();
        initiator.read_buf(&mut answer).await.unwrap();
        assert_eq!((answer[36], answer[37]), (class, detail), "the refusal was sent");
        ((class, detail), elapsed)
    }

    #[tokio::test]
    async fn refusals_wait_and_are_counted_and_discovery_needs_chap() {
        let targets = Guarded::default();
        let discovery = [("InitiatorName", "iqn.2026-11.test:h"), ("SessionType", "Discovery")];
        let (status, waited) = login_without_chap(&targets, &discovery).await;
        assert_eq!(status, status::AUTHENTICATION_FAILED, "discovery without CHAP");
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        let normal = [("InitiatorName", "iqn.2026-11.test:h"), ("TargetName", "iqn.2026-11.test:none")];
        let (status, waited) = login_without_chap(&targets, &normal).await;
        assert_eq!(status, status::NOT_FOUND);
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        assert_eq!(targets.failures.load(Ordering::Relaxed), 2);
        // A malformed login is not a guess: answered at once, not counted.
        let (status, waited) = login_without_chap(
            &targets,
            &[("InitiatorName", "iqn.2026-11.test:h"), ("SessionType", "Other")],
        )
        .await;
        assert_eq!(status, status::INITIATOR_ERROR);
        assert!(waited < Duration::from_millis(200), "{waited:?}");
        assert_eq!(targets.failures.load(Ordering::Relaxed), 2);
    }
}
