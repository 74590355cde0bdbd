//! Accepting and serving connections: hyper's HTTP/1 with a header-read timeout (which also
//! bounds how long an idle keep-alive connection is held: hyper starts it again while waiting
//! for each next request), a bound on open connections (one over it gets a 503 and is closed,
//! never queued), TCP_NODELAY, and graceful shutdown (connections finish their requests, then
//! close). axum's own `serve` sets no timer, so no timeout could apply there.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

/// Limits on connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Longest wait for a request's headers, counted from when the connection starts waiting
    /// for a request (a new connection, or a kept-alive one after its last response).
    pub header_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets open connections finish
/// their requests and returns once every one has closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let (closed_tx, closed_rx) = watch::channel(());
    let (stop_tx, _) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (accept_failed, refused) = (Throttled::default(), Throttled::default());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors, most often: wait for some to close.
                    if let Some(more) = accept_failed.due() {
                        tracing::warn!(error = %e, more, "accepting a connection failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if let Some(more) = refused.due() {
                let max = limits.max_connections;
                tracing::warn!(max_connections = max, more, "refusing connections: the server holds its most");
            }
            tokio::spawn(refuse(tcp, limits.max_connections));
            continue;
        };
        if let Err(e) = tcp.set_nodelay(true) {
            // Streamed tokens are small writes: Nagle's algorithm would hold each one back
            // until the client's delayed ACK (~40 ms).
            tracing::warn!(error = %e, "could not set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(router.clone().map_request(|r: Request<Incoming>| r.map(Body::new)));
        let mut stop = stop_tx.subscribe();
        let closed = closed_rx.clone();
        tokio::spawn(async move {
            // HTTP/1 only: the version-sniffing of hyper-util's `auto` builder reads a new
            // connection's first bytes with no timeout, so an idle one would be held forever.
            let mut builder = http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
            let mut conn = std::pin::pin!(builder.serve_connection(TokioIo::new(tcp), service).with_upgrades());
            let mut stopping = false;
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = stop.wait_for(|&s| s), if !stopping => {
                        stopping = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            drop((slot, closed));
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(closed_rx);
    closed_tx.closed().await;
}

/// A warning repeated by every refused connection, logged at most every 10 s with how many
/// more happened since (a flood of clients must not flood the log too).
#[derive(Default)]
struct Throttled {
    last: std::sync::Mutex<Option<std::time::Instant>>,
    since: std::sync::atomic::AtomicU64,
}

impl Throttled {
    /// `Some(n)` when the warning is due (`n` occurrences went unlogged before it), else `None`.
    fn due(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(10)) {
            self.since.fetch_add(1, Relaxed);
            return None;
        }
        *last = Some(std::time::Instant::now());
        Some(self.since.swap(0, Relaxed))
    }
}

/// Answers a connection over the bound with a 503 in OpenAI's shape and closes it.
async fn refuse(mut tcp: TcpStream, max: usize) {
    let body = serde_json::json!({"error": {
        "message": format!("the server holds its most connections ({max}); retry shortly"),
        "type": "server_error", "param": null, "code": "too_many_connections"}})
    .to_string();
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = tcp.write_all(resp.as_bytes()).await;
        let _ = tcp.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::Throttled;

    #[test]
    fn a_repeated_warning_is_logged_once_then_counted() {
        let t = Throttled::default();
        assert_eq!(t.due(), Some(0));
        assert_eq!((t.due(), t.due()), (None, None));
        // Ten seconds later it is due again, saying how many went unlogged.
        *t.last.lock().unwrap() = Some(std::time::Instant::now() - std::time::Duration::from_secs(11));
        assert_eq!(t.due(), Some(2));
    }
}
