//! The accept loop: hyper's HTTP/1 and HTTP/2 connections with a deadline on the request
//! headers, so a client that trickles them (or opens a connection and sends nothing, or only
//! part of the HTTP/2 preface) is cut off instead of holding a connection open forever.
//! `axum::serve` sets no such deadline.
//! Bodies are bounded by the request timeout layer, which covers reading them.
//!
//! Shutdown: stop accepting, ask every connection to finish its request in flight, and wait up
//! to `drain_timeout` for them.

use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy)]
pub struct ServeConfig {
    /// Longest time a client may take to send a request's headers.
    pub header_timeout: Duration,
    /// Longest wait for requests in flight at shutdown.
    pub drain_timeout: Duration,
}

/// Waits until the connection's first bytes tell HTTP/1 from HTTP/2: false if it closes first.
async fn protocol_known(stream: &tokio::net::TcpStream) -> std::io::Result<bool> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut first = [0u8; PREFACE.len()];
    loop {
        let n = stream.peek(&mut first).await?;
        if n == 0 {
            return Ok(false);
        }
        if n == PREFACE.len() || first[..n] != PREFACE[..n] {
            return Ok(true);
        }
        // part of the HTTP/2 preface: peeking again returns at once, so wait a little for the rest
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, router: Router, config: ServeConfig, shutdown: CancellationToken) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(config.header_timeout);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let header_timeout = config.header_timeout;
        tokio::spawn(async move {
            // hyper's own header deadline starts once it has told the protocols apart, which
            // waits for the first bytes without one
            match tokio::time::timeout(header_timeout, protocol_known(&stream)).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => return,
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "connection failed before its first request"),
                Err(_) => return tracing::debug!(%peer, "no request within the header deadline; closed"),
            }
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(config.drain_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!("requests still in flight after {:?}; closing anyway", config.drain_timeout);
    }
    Ok(())
}
