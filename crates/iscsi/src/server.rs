//! The target's server: accepts connections within the listener's caps (strata-net) and
//! gives each its own thread, which runs the login and then the full feature phase.
//! Shutdown stops accepting, lets every connection finish the commands it started, and
//! waits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use strata_net::budget::{Account, Budget, CONTROLLER_BUDGET};
use strata_net::listener::{Listener, stopped};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::Targets;
use crate::connection::{self, Keepalive, Shared};
use crate::login::{self, LoginContext, LoginError};
use crate::session::Sessions;

/// How long an initiator may take to log in.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// An iSCSI target server over a set of targets.
pub struct IscsiServer {
    targets: Arc<dyn Targets>,
    sessions: Arc<Sessions>,
    keepalive: Keepalive,
    /// The controller's byte budget every connection draws on.
    budget: Arc<Budget>,
}

impl IscsiServer {
    /// A server answering from `targets`, pinging idle initiators every 30 seconds.
    pub fn new(targets: Arc<dyn Targets>) -> Arc<Self> {
        Self::with_keepalive(targets, Duration::from_secs(30), Duration::from_secs(30))
    }

    /// A server that pings an initiator idle for `interval` and drops it when a ping goes
    /// unanswered for `timeout`.
    pub fn with_keepalive(targets: Arc<dyn Targets>, interval: Duration, timeout: Duration) -> Arc<Self> {
        Self::build(targets, Keepalive { interval, timeout }, Budget::new(CONTROLLER_BUDGET))
    }

    /// A server whose connections draw on `budget` (the controller's, shared with its
    /// other frontends), pinging idle initiators every 30 seconds.
    pub fn with_budget(targets: Arc<dyn Targets>, budget: Arc<Budget>) -> Arc<Self> {
        let keepalive = Keepalive { interval: Duration::from_secs(30), timeout: Duration::from_secs(30) };
        Self::build(targets, keepalive, budget)
    }

    fn build(targets: Arc<dyn Targets>, keepalive: Keepalive, budget: Arc<Budget>) -> Arc<Self> {
        Arc::new(Self { targets, sessions: Arc::default(), keepalive, budget })
    }

    /// Normal sessions open now.
    pub fn sessions(&self) -> usize {
        self.sessions.count()
    }

    /// Accepts initiators on `listener`, within its caps, until `shutdown` turns true,
    /// then waits until every connection has finished the commands it started and closed.
    /// Each connection has a thread of its own (see [`Listener::serve_on_threads`]).
    pub async fn run(self: Arc<Self>, listener: Listener, shutdown: watch::Receiver<bool>) {
        let stop = shutdown.clone();
        listener
            .serve_on_threads(stop, move |stream, peer| {
                let server = self.clone();
                let shutdown = shutdown.clone();
                async move {
                    let portal = stream.local_addr().map(portal).unwrap_or_default();
                    server.connection(stream, peer, portal, shutdown).await
                }
            })
            .await;
    }

    /// Serves one connection from login to close (any byte stream: the listener's TCP
    /// connections, or a test's in-memory pipe). `portal` is the address SendTargets
    /// reports.
    pub async fn connection<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        mut stream: S,
        peer: SocketAddr,
        portal: String,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut input = BytesMut::with_capacity(64 << 10);
        let ctx = LoginContext { targets: self.targets.as_ref(), sessions: &self.sessions };
        let logged_in = tokio::select! {
            result = tokio::time::timeout(LOGIN_TIMEOUT, login::login(&mut stream, &mut input, &ctx)) => result,
            () = stopped(&mut shutdown) => Ok(Err(LoginError::Protocol("server shutting down".into()))),
        };
        match logged_in {
            Ok(Ok(login)) => {
                tracing::debug!(%peer, initiator = %login.initiator, "iSCSI login complete");
                let shared = Shared {
                    targets: self.targets.as_ref(),
                    sessions: &self.sessions,
                    portal,
                    keepalive: self.keepalive,
                    peer,
                };
                let account = Account::connection(&self.budget);
                connection::serve(stream, input, login, &shared, shutdown, account).await;
            }
            Ok(Err(LoginError::Refused { class, detail, why, initiator })) => {
                tracing::warn!(%peer, %initiator, class, detail, %why, "iSCSI login refused")
            }
            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "iSCSI login ended"),
            Err(_) => tracing::warn!(%peer, "iSCSI login timed out"),
        }
    }
}

/// `address:port` as SendTargets writes it (IPv6 in brackets).
fn portal(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(v4) => v4.to_string(),
        SocketAddr::V6(v6) => format!("[{}]:{}", v6.ip(), v6.port()),
    }
}
