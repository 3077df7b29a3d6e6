//! Serving the HTTP listener's connections (plain or TLS): one accept loop that counts
//! connections against `http.max_connections` and `http.max_connections_per_address` and
//! serves each admitted one with hyper's HTTP/1 connection builder (header read timeout from
//! `http.header_read_timeout_secs`, upgrades for MQTT over WebSocket).
//!
//! A connection past either cap is refused at once: over plain HTTP it is sent a `503` with the
//! API's JSON error (`too_many_connections`) without reading anything, over HTTPS it is closed
//! before the handshake; either way it costs the server no task and no buffer. A connection
//! holds its [`ConnectionSlot`] until it ends; a WebSocket upgrade carries the slot on (see
//! [`crate::mqtt::websocket`]), so an MQTT-over-WebSocket client still counts, while hyper's
//! timers and the request timeout no longer apply to it (its MQTT keep-alive does).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::server::PeerAddr;

/// The limits of the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Most connections at once.
    pub max_connections: usize,
    /// Most connections at once from one IP address.
    pub max_per_address: usize,
    /// How long a request head may take (also the keep-alive idle time).
    pub header_read_timeout: Duration,
    /// How long a TLS handshake may take (HTTPS).
    pub tls_handshake_timeout: Duration,
}

impl ConnectionLimits {
    /// The limits of `http`.
    pub fn of(http: &crate::config::HttpConfig) -> Self {
        ConnectionLimits {
            max_connections: http.max_connections,
            max_per_address: http.max_connections_per_address,
            header_read_timeout: Duration::from_secs(http.header_read_timeout_secs),
            tls_handshake_timeout: Duration::from_secs(http.tls_handshake_timeout_secs.max(1)),
        }
    }
}

/// The open connections, overall and per address.
struct Counts {
    all: Arc<Semaphore>,
    per_address: Mutex<HashMap<IpAddr, usize>>,
    max_per_address: usize,
}

/// One admitted connection's place in the counts; released when the last clone is dropped.
#[derive(Clone)]
pub struct ConnectionSlot(#[allow(dead_code)] Arc<SlotInner>);

struct SlotInner {
    counts: Arc<Counts>,
    ip: IpAddr,
    _permit: OwnedSemaphorePermit,
}

impl Drop for SlotInner {
    fn drop(&mut self) {
        let mut per = self.counts.per_address.lock();
        if let Some(n) = per.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.ip);
            }
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    Total,
    Address,
}

impl Counts {
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionSlot, Refused> {
        let permit = self
            .all
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::Total)?;
        let mut per = self.per_address.lock();
        let n = per.entry(ip).or_insert(0);
        if *n >= self.max_per_address {
            if *n == 0 {
                per.remove(&ip);
            }
            return Err(Refused::Address);
        }
        *n += 1;
        drop(per);
        Ok(ConnectionSlot(Arc::new(SlotInner {
            counts: self.clone(),
            ip,
            _permit: permit,
        })))
    }
}

/// The answer to a connection past a cap: the API's JSON error, then the connection closes.
fn refusal(why: Refused) -> Vec<u8> {
    let message = match why {
        Refused::Total => "the server has as many HTTP connections as http.max_connections allows",
        Refused::Address => {
            "this address has as many HTTP connections as http.max_connections_per_address allows"
        }
    };
    let body = serde_json::json!({"error": "too_many_connections", "message": message}).to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `app` on `listener` (over TLS with `tls`) until `shutdown`, each connection a task of
/// `tracker`.
pub fn spawn(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    limits: ConnectionLimits,
    metrics: crate::metrics::ServerMetrics,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) {
    let counts = Arc::new(Counts {
        all: Arc::new(Semaphore::new(limits.max_connections)),
        per_address: Mutex::new(HashMap::new()),
        max_per_address: limits.max_per_address,
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let builder = Arc::new(builder);
    let tasks = tracker.clone();
    tracker.spawn(async move {
        let mut refused = 0u64;
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file handles, most likely: wait for some to close.
                    tracing::warn!(error = %e, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let slot = match counts.admit(peer.ip()) {
                Ok(slot) => slot,
                Err(why) => {
                    refused += 1;
                    metrics.refused(match why {
                        Refused::Total => "http_connections",
                        Refused::Address => "http_connections_per_address",
                    });
                    if refused.is_power_of_two() {
                        tracing::warn!(%peer, reason = ?why, refused, "HTTP connection refused: too many connections");
                    }
                    if tls.is_none() {
                        // A fresh socket's send buffer takes this at once; nothing is waited for.
                        let _ = stream.try_write(&refusal(why));
                    }
                    drop(stream);
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            tasks.spawn(connection(
                stream,
                peer,
                slot,
                tls.clone().map(|acceptor| (acceptor, limits.tls_handshake_timeout)),
                app.clone(),
                builder.clone(),
                shutdown.clone(),
            ));
        }
        tracing::info!("HTTP listener stopped");
    });
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    slot: ConnectionSlot,
    tls: Option<(TlsAcceptor, Duration)>,
    app: Router,
    builder: Arc<hyper::server::conn::http1::Builder>,
    shutdown: CancellationToken,
) {
    match tls {
        None => serve(stream, peer, slot, app, &builder, shutdown).await,
        // The slot is held through the handshake: a client that never finishes it takes its
        // place in the caps until the timeout.
        Some((acceptor, within)) => {
            let handshake = tokio::time::timeout(within, acceptor.accept(stream));
            let r = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = handshake => r,
            };
            match r {
                Ok(Ok(tls)) => serve(tls, peer, slot, app, &builder, shutdown).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "HTTPS handshake failed"),
                Err(_) => tracing::debug!(%peer, "HTTPS handshake timed out"),
            }
        }
    }
}

async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    slot: ConnectionSlot,
    app: Router,
    builder: &hyper::server::conn::http1::Builder,
    shutdown: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(PeerAddr(peer)));
        req.extensions_mut().insert(slot.clone());
        crate::http::topic_path(&mut req);
        let app = app.clone();
        async move {
            let r: Result<_, Infallible> = app.oneshot(req.map(axum::body::Body::new)).await;
            r
        }
    });
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    let r = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = r {
        tracing::debug!(%peer, error = %e, "HTTP connection ended");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn counts_are_capped_in_total_and_per_address_and_released() {
        let counts = Arc::new(Counts {
            all: Arc::new(Semaphore::new(3)),
            per_address: Mutex::new(HashMap::new()),
            max_per_address: 2,
        });
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let a1 = counts.admit(a).unwrap();
        let a2 = counts.admit(a).unwrap();
        assert_eq!(counts.admit(a).err(), Some(Refused::Address));
        let b1 = counts.admit(b).unwrap();
        assert_eq!(counts.admit(b).err(), Some(Refused::Total));
        let a2_copy = a2.clone();
        drop(a2);
        assert_eq!(
            counts.admit(b).err(),
            Some(Refused::Total),
            "a clone holds it"
        );
        drop(a2_copy);
        let b2 = counts.admit(b).unwrap();
        drop((a1, b1, b2));
        assert!(counts.per_address.lock().is_empty());
        assert_eq!(counts.all.available_permits(), 3);
    }

    #[test]
    fn the_refusal_is_a_whole_http_response_with_the_json_error() {
        let r = String::from_utf8(refusal(Refused::Address)).unwrap();
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "too_many_connections");
    }
}
