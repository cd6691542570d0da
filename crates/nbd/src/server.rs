//! The server: accepts connections within the listener's caps (strata-net), gives each a
//! thread of its own, negotiates and serves it. Shutdown stops accepting, lets every
//! connection finish what it accepted, and waits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use strata_net::budget::{Account, Budget, CONTROLLER_BUDGET};
use strata_net::listener::{Listener, stopped};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::Exports;
use crate::handshake::{self, HandshakeError};
use crate::transmission;

/// How long a client may take to finish negotiation.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// An NBD server over a set of exports.
pub struct NbdServer {
    exports: Arc<dyn Exports>,
    /// The controller's byte budget every connection draws on.
    budget: Arc<Budget>,
}

impl NbdServer {
    /// A server answering from `exports`, with a byte budget of its own.
    pub fn new(exports: Arc<dyn Exports>) -> Arc<Self> {
        Self::with_budget(exports, Budget::new(CONTROLLER_BUDGET))
    }

    /// A server answering from `exports` whose connections draw on `budget` (the
    /// controller's, shared with its other frontends).
    pub fn with_budget(exports: Arc<dyn Exports>, budget: Arc<Budget>) -> Arc<Self> {
        Arc::new(Self { exports, budget })
    }

    /// Accepts clients on `listener`, within its caps, until `shutdown` turns true, then
    /// waits until every connection has completed the requests it accepted and closed.
    /// Each connection has a thread of its own (see [`Listener::serve_on_threads`]).
    pub async fn run(self: Arc<Self>, listener: Listener, shutdown: watch::Receiver<bool>) {
        let stop = shutdown.clone();
        listener
            .serve_on_threads(stop, move |stream, peer| {
                let server = self.clone();
                let shutdown = shutdown.clone();
                async move { server.connection(stream, peer, shutdown).await }
            })
            .await;
    }

    /// Serves one client connection from negotiation to hang-up (any byte stream: the
    /// listener's TCP connections, or a test's in-memory pipe).
    pub async fn connection<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        mut stream: S,
        peer: SocketAddr,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let negotiated = tokio::select! {
            result = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                handshake::negotiate(&mut stream, peer.ip(), self.exports.as_ref()),
            ) => result,
            () = stopped(&mut shutdown) => Ok(Err(HandshakeError::Ended)),
        };
        match negotiated {
            Ok(Ok(session)) => {
                tracing::debug!(%peer, export = %session.export.name, structured = session.structured, "NBD client connected");
                transmission::serve(stream, session, shutdown, Account::connection(&self.budget)).await;
                tracing::debug!(%peer, "NBD client left");
            }
            Ok(Err(HandshakeError::Protocol(why))) => tracing::warn!(%peer, %why, "NBD negotiation refused"),
            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "NBD negotiation ended"),
            Err(_) => tracing::warn!(%peer, "NBD negotiation timed out"),
        }
    }
}
