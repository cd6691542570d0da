//! The listener: accepts connections, negotiates, and hands each connection its own task.
//! Shutdown stops accepting, lets every connection finish what it accepted, and waits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::Exports;
use crate::handshake::{self, HandshakeError};
use crate::transmission;

/// How long a client may take to finish negotiation.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most connections served at once (each has a thread); more are refused at accept.
const MAX_CONNECTIONS: usize = 1024;

/// An NBD server over a set of exports.
pub struct NbdServer {
    exports: Arc<dyn Exports>,
    connections: AtomicUsize,
    tracker: TaskTracker,
}

impl NbdServer {
    /// A server answering from `exports`.
    pub fn new(exports: Arc<dyn Exports>) -> Arc<Self> {
        Arc::new(Self { exports, connections: AtomicUsize::new(0), tracker: TaskTracker::new() })
    }

    /// Connections open now (negotiating or transmitting).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Accepts clients on `listener` until `shutdown` turns true, then waits until every
    /// connection has completed the requests it accepted and closed.
    pub async fn run(self: Arc<Self>, listener: TcpListener, shutdown: watch::Receiver<bool>) {
        let mut stop = shutdown.clone();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) if self.connections() >= MAX_CONNECTIONS => {
                        tracing::warn!(%peer, limit = MAX_CONNECTIONS, "too many NBD connections; refusing one");
                        drop(stream);
                    }
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        if let Err(e) = self.clone().start_thread(stream, peer, shutdown.clone()) {
                            tracing::warn!(%peer, error = %e, "cannot start a thread for an NBD connection");
                        }
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "NBD accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                () = stopped(&mut stop) => break,
            }
        }
        drop(listener);
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Serves a connection on a thread of its own with a single-threaded runtime: the
    /// socket's readiness, the request and its reply all happen on that thread, so no
    /// request pays a wake-up across CPUs, and connections spread over the cores.
    fn start_thread(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let stream = stream.into_std()?;
        let token = self.tracker.token();
        std::thread::Builder::new().name(format!("nbd {peer}")).spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
            match runtime {
                Ok(runtime) => runtime.block_on(async {
                    match TcpStream::from_std(stream) {
                        Ok(stream) => self.connection(stream, peer, shutdown).await,
                        Err(e) => tracing::warn!(%peer, error = %e, "cannot adopt an NBD connection"),
                    }
                }),
                Err(e) => tracing::warn!(%peer, error = %e, "cannot start a runtime for an NBD connection"),
            }
            drop(token);
        })?;
        Ok(())
    }

    /// Serves one client connection from negotiation to hang-up (any byte stream: the
    /// listener's TCP connections, or a test's in-memory pipe).
    pub async fn connection<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        mut stream: S,
        peer: SocketAddr,
        mut shutdown: watch::Receiver<bool>,
    ) {
        self.connections.fetch_add(1, Ordering::Relaxed);
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
                transmission::serve(stream, session, shutdown).await;
                tracing::debug!(%peer, "NBD client left");
            }
            Ok(Err(HandshakeError::Protocol(why))) => tracing::warn!(%peer, %why, "NBD negotiation refused"),
            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "NBD negotiation ended"),
            Err(_) => tracing::warn!(%peer, "NBD negotiation timed out"),
        }
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Returns once `shutdown` turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
}
