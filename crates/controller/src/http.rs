//! Serving the REST API's HTTP/1.1 connections from a strata-net [`Listener`], so the API
//! has the same caps as NBD and iSCSI (total and per client address) and a timeout on
//! clients that hold a connection without sending a request.
//!
//! `axum::serve` has neither, so each connection is served with hyper's own connection
//! builder: its header read timeout starts whenever the connection waits for a request
//! (after connecting, and after each answer), so it closes connections that are idle,
//! silent, or send their headers slowly. Request bodies get the same time to arrive
//! (`api::read_body`).

use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use strata_net::listener::{Listener, stopped};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

/// Serves `router` on connections from `listener` until `shutdown` turns true; then stops
/// accepting, lets each connection finish the request it is answering (idle ones close at
/// once), and returns when all have closed.
pub async fn serve(
    listener: Listener,
    router: Router,
    idle_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(idle_timeout);
    let connections = TaskTracker::new();
    loop {
        tokio::select! {
            (stream, peer, admitted) = listener.accept() => {
                let _ = stream.set_nodelay(true);
                let connection =
                    builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router.clone()));
                let mut shutdown = shutdown.clone();
                connections.spawn(async move {
                    tokio::pin!(connection);
                    let result = tokio::select! {
                        result = connection.as_mut() => result,
                        () = stopped(&mut shutdown) => {
                            connection.as_mut().graceful_shutdown();
                            connection.await
                        }
                    };
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "API connection closed");
                    }
                    // The connection's place is given back only now that it is closed.
                    drop(admitted);
                });
            }
            () = stopped(&mut shutdown) => break,
        }
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}
