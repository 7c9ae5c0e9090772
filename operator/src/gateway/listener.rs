//! The gateway's accept loop: HTTP/1 connections served by hyper with a
//! header timeout, under a cap on concurrent connections, drained on
//! shutdown.
//!
//! `axum::serve` sets neither a header timeout nor a connection cap, so a
//! client could hold connections open forever by sending a request slowly.
//! Here each connection gets `header_timeout` to deliver its request line
//! and headers (also while a kept-alive connection sits idle between
//! requests), and at most `max_connections` are served at once: beyond
//! that, new connections are not accepted (they wait in the listen backlog)
//! until one closes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt as _;

/// Per-connection limits of the front door.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// Longest wait for a request's line and headers.
    pub header_timeout: Duration,
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
}

/// Serve `app` on `listener` until `shutdown` resolves, then stop accepting
/// and wait for the open connections' requests to finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = accept_within_cap(&listener, &slots) => a,
            () = &mut shutdown => break,
        };
        let Some((stream, peer, slot)) = accepted else {
            continue;
        };
        // The peer address goes where axum's `ConnectInfo` extractor finds
        // it: `cluster` registers' visibility is decided by it.
        let svc = app
            .clone()
            .map_request(move |mut req: axum::http::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req
            });
        let conn = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            // The slot frees when the connection is gone.
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Wait for a free slot, then accept one connection into it. `None` when
/// the accept failed (e.g. out of file descriptors): logged, retried after
/// a pause so the loop does not spin.
async fn accept_within_cap(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    // The semaphore is never closed.
    let slot = slots.clone().acquire_owned().await.ok()?;
    match listener.accept().await {
        Ok((stream, peer)) => {
            let _ = stream.set_nodelay(true);
            Some((stream, peer, slot))
        }
        Err(e) => {
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
            None
        }
    }
}
