//! The MQTT 3.1.1/5 server: a TCP listener, one task per connection.
//!
//! - [`state`]: the per-connection protocol state without I/O (negotiation, packet ids, QoS
//!   windows, topic aliases, keep alive);
//! - [`session`]: the session registry (takeover, persistent sessions, expiry);
//! - [`retained`]: retained messages;
//! - [`convert`]: PUBLISH <-> Ferry message;
//! - `streams`: a connection's engine subscriptions by key, polled only when woken;
//! - [`websocket`]: MQTT over WebSocket at `/mqtt` on the HTTP listener;
//! - `connection`: the connection task that drives all of it from any byte stream (TCP, TLS,
//!   WebSocket) and the engine.
//!
//! MQTT topics are Ferry topics: a message published over MQTT reaches every engine subscriber
//! of its topic, and every message published to the engine reaches matching MQTT subscribers.

pub(crate) mod connection;
pub mod convert;
pub mod retained;
pub mod session;
pub mod state;
pub mod state_store;
mod streams;
pub mod websocket;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry::Broker;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acl::AclRules;
use crate::auth::Authenticator;
use crate::config::MqttConfig;
use retained::RetainedStore;
use session::Sessions;

/// Counters of the MQTT front end.
#[derive(Debug, Default)]
pub struct MqttMetrics {
    /// Connections accepted (TCP).
    pub accepted: AtomicU64,
    /// Currently open connections.
    pub active: AtomicUsize,
    /// Connections refused at CONNECT (auth, limits, bad client id, ...), or by a connection
    /// limit before their TLS handshake.
    pub refused: AtomicU64,
    /// Of those, connections refused because their address had `max_connections_per_address`
    /// open.
    pub refused_per_address: AtomicU64,
    /// Connections ended because the peer broke the protocol (malformed or too large packets,
    /// protocol errors).
    pub protocol_errors: AtomicU64,
    /// Connections ended by keep-alive expiry.
    pub keep_alive_timeouts: AtomicU64,
    /// PUBLISH packets received.
    pub publish_received: AtomicU64,
    /// PUBLISH packets sent.
    pub publish_sent: AtomicU64,
    /// Will messages published.
    pub wills_published: AtomicU64,
    /// PUBLISH packets and SUBSCRIBE filters refused by the ACL.
    pub acl_denied: AtomicU64,
    /// Latency histograms and refusal counters, shared with the HTTP API.
    pub server: crate::metrics::ServerMetrics,
    /// Connections closed because more than `max_queued_bytes` waited for their socket.
    pub slow_consumer_disconnects: AtomicU64,
    /// QoS 0 messages dropped for connections over `max_queued_bytes` (`drop_oldest`).
    pub slow_consumer_dropped: AtomicU64,
}

/// A snapshot of [`MqttMetrics`] plus session counts, for `/stats` and `/metrics`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MqttStats {
    /// Connections accepted (TCP).
    pub accepted: u64,
    /// Currently open connections.
    pub active: usize,
    /// Connections refused at CONNECT.
    pub refused: u64,
    /// Of those, refused for `max_connections_per_address`.
    pub refused_per_address: u64,
    /// Connections ended for protocol violations.
    pub protocol_errors: u64,
    /// Connections ended by keep-alive expiry.
    pub keep_alive_timeouts: u64,
    /// PUBLISH packets received.
    pub publish_received: u64,
    /// PUBLISH packets sent.
    pub publish_sent: u64,
    /// Will messages published.
    pub wills_published: u64,
    /// PUBLISH packets and SUBSCRIBE filters refused by the ACL.
    pub acl_denied: u64,
    /// Connections closed as slow consumers.
    pub slow_consumer_disconnects: u64,
    /// QoS 0 messages dropped for slow consumers.
    pub slow_consumer_dropped: u64,
    /// Connected sessions.
    pub sessions_online: usize,
    /// Persistent sessions kept for disconnected clients.
    pub sessions_offline: usize,
    /// Retained messages.
    pub retained: usize,
}

/// State shared by every connection.
pub(crate) struct MqttShared {
    pub(crate) broker: Broker,
    pub(crate) config: MqttConfig,
    pub(crate) auth: Authenticator,
    pub(crate) acl: AclRules,
    pub(crate) retained: Arc<RetainedStore>,
    pub(crate) sessions: Sessions,
    /// The backend link, when serving over a backend.
    pub(crate) bridge: Option<Arc<crate::bridge::Bridge>>,
    pub(crate) metrics: MqttMetrics,
    /// Open connections per client address, over every listener.
    pub(crate) addresses: AddressCounts,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tracker: TaskTracker,
    next_conn: AtomicU64,
    /// Connections past a limit kept open to answer their CONNECT with a refusing CONNACK;
    /// at most [`MAX_REFUSING`], past which one is closed at once (so refusals cost no more
    /// than that many sockets whatever a client opens).
    pub(crate) refusing: AtomicUsize,
    /// Saves sessions, retained messages and consumer positions before the acknowledgements
    /// that promise them (`None` if its thread could not start: then they wait for the
    /// once-a-second save).
    persister: Option<crate::persist::Persister>,
    /// Which state saves are failing (`/health` says "degraded" meanwhile).
    pub(crate) save_health: crate::persist::SaveHealth,
}

/// The parts of the saved state, as `/health` names them.
const SESSIONS: &str = "MQTT sessions";
const RETAINED: &str = "retained messages";
const POSITIONS: &str = "consumer positions";

impl MqttShared {
    /// Returns once the persistent sessions, retained messages and consumer positions as they
    /// stand now are on disk (a no-op in memory), or says why the save failed (also logged).
    pub(crate) async fn try_persist(&self) -> Result<(), String> {
        if let Some(p) = &self.persister {
            if let Err(e) = p.persist().await {
                tracing::error!(error = %e, "saving the server state failed");
                return Err(e.to_string());
            }
        }
        Ok(())
    }

    /// Saves the sessions and retained messages that changed, as records of the MQTT state
    /// store (blocking storage I/O: not on an async worker), recording the outcome for
    /// `/health`; says what failed.
    fn save_sessions_and_retained(&self) -> Result<(), String> {
        let sessions = self.sessions.save();
        self.save_health.record(SESSIONS, &sessions);
        let retained = self.retained.save();
        self.save_health.record(RETAINED, &retained);
        let failed: Vec<String> = [
            sessions.err().map(|e| e.to_string()),
            retained.err().map(|e| e.to_string()),
        ]
        .into_iter()
        .flatten()
        .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }

    /// Why saving the server's state is failing, if it is (until a save succeeds).
    pub(crate) fn save_failure(&self) -> Option<String> {
        self.save_health.failure()
    }

    pub(crate) fn stats(&self) -> MqttStats {
        let m = &self.metrics;
        let (online, offline) = self.sessions.counts();
        MqttStats {
            accepted: m.accepted.load(Ordering::Relaxed),
            active: m.active.load(Ordering::Relaxed),
            refused: m.refused.load(Ordering::Relaxed),
            refused_per_address: m.refused_per_address.load(Ordering::Relaxed),
            protocol_errors: m.protocol_errors.load(Ordering::Relaxed),
            keep_alive_timeouts: m.keep_alive_timeouts.load(Ordering::Relaxed),
            publish_received: m.publish_received.load(Ordering::Relaxed),
            publish_sent: m.publish_sent.load(Ordering::Relaxed),
            wills_published: m.wills_published.load(Ordering::Relaxed),
            acl_denied: m.acl_denied.load(Ordering::Relaxed),
            slow_consumer_disconnects: m.slow_consumer_disconnects.load(Ordering::Relaxed),
            slow_consumer_dropped: m.slow_consumer_dropped.load(Ordering::Relaxed),
            sessions_online: online,
            sessions_offline: offline,
            retained: self.retained.len(),
        }
    }
}

/// A handle on the MQTT front end, for stats.
#[derive(Clone)]
pub struct MqttHandle {
    pub(crate) shared: Arc<MqttShared>,
}

impl MqttHandle {
    /// Current counters.
    pub fn stats(&self) -> MqttStats {
        self.shared.stats()
    }

    /// The server's latency histograms and refusal counters (`ferry_refused_total`).
    pub fn server_metrics(&self) -> &crate::metrics::ServerMetrics {
        &self.shared.metrics.server
    }
}

/// The MQTT listeners: plain TCP, and TLS (its TCP listener and its acceptor) when configured.
pub(crate) struct Listeners {
    pub(crate) tcp: TcpListener,
    pub(crate) tls: Option<(TcpListener, TlsAcceptor)>,
}

/// Starts the MQTT front end on its listeners: the accept loops and the
/// session maintenance task run until `shutdown` is cancelled; connection tasks are tracked by
/// `tracker`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn start(
    broker: Broker,
    config: MqttConfig,
    retained: Arc<RetainedStore>,
    sessions: Sessions,
    listeners: Listeners,
    bridge: Option<Arc<crate::bridge::Bridge>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) -> MqttHandle {
    let auth = Authenticator::new(&config.users, config.allow_anonymous);
    let acl = AclRules::new(&config);
    let durable = broker.is_durable();
    let shared = Arc::new_cyclic(|weak: &std::sync::Weak<MqttShared>| {
        let weak = weak.clone();
        let persister = durable
            .then(|| {
                crate::persist::Persister::start(move || {
                    let Some(shared) = weak.upgrade() else {
                        return Ok(());
                    };
                    let mut failed = Vec::new();
                    let positions = shared.broker.flush();
                    shared.save_health.record(POSITIONS, &positions);
                    if let Err(e) = positions {
                        failed.push(format!("consumer positions: {e}"));
                    }
                    if let Err(e) = shared.save_sessions_and_retained() {
                        failed.push(e);
                    }
                    if failed.is_empty() {
                        Ok(())
                    } else {
                        Err(failed.join("; "))
                    }
                })
                .inspect_err(|e| tracing::warn!(error = %e, "no state saver thread"))
                .ok()
            })
            .flatten();
        MqttShared {
            broker,
            config,
            auth,
            acl,
            retained,
            sessions,
            bridge,
            metrics: MqttMetrics::default(),
            addresses: AddressCounts::default(),
            shutdown,
            tracker: tracker.clone(),
            next_conn: AtomicU64::new(1),
            refusing: AtomicUsize::new(0),
            persister,
            save_health: crate::persist::SaveHealth::default(),
        }
    });
    tracker.spawn(accept_loop(shared.clone(), listeners.tcp));
    if let Some((tcp, acceptor)) = listeners.tls {
        tracker.spawn(tls_accept_loop(shared.clone(), tcp, acceptor));
    }
    tracker.spawn(maintenance(shared.clone()));
    MqttHandle { shared }
}

async fn accept_loop(shared: Arc<MqttShared>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                set_tcp_keepalive(&stream, shared.config.tcp_keepalive_secs);
                spawn_connection(&shared, stream, peer);
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accepting an MQTT connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracing::info!("MQTT listener stopped");
}

/// The TLS listener's accept loop. A connection is counted against `max_connections` and
/// `max_connections_per_address` as it is accepted, before its handshake: one past either is
/// closed at once (no handshake, no task; counted in `refused` and `ferry_refused_total`), so
/// connections that never finish their handshake take no more than their address's share. An
/// admitted connection's handshake runs in its own task within `tls_handshake_timeout_secs`
/// (other clients' handshakes never wait for it), then the connection runs with the place it
/// holds.
async fn tls_accept_loop(shared: Arc<MqttShared>, listener: TcpListener, acceptor: TlsAcceptor) {
    let within = Duration::from_secs(shared.config.tls_handshake_timeout_secs.max(1));
    let mut refused = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accepting an MQTT TLS connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let place = match Place::take(&shared, peer.ip()) {
            Ok(place) => place,
            Err(limit) => {
                refused += 1;
                count_refusal(&shared, limit);
                if refused.is_power_of_two() {
                    tracing::warn!(%peer, ?limit, refused, "MQTT TLS connection refused before its handshake: too many connections");
                }
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        set_tcp_keepalive(&stream, shared.config.tcp_keepalive_secs);
        let acceptor = acceptor.clone();
        let s = shared.clone();
        shared.tracker.spawn(async move {
            let handshake = tokio::time::timeout(within, acceptor.accept(stream));
            let r = tokio::select! {
                _ = s.shutdown.cancelled() => return,
                r = handshake => r,
            };
            match r {
                Ok(Ok(tls)) => spawn_admitted(&s, tls, peer, place.keep(), None),
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "MQTT TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "MQTT TLS handshake timed out"),
            }
        });
    }
    tracing::info!("MQTT TLS listener stopped");
}

/// A connection counted by [`admit`] and not yet handed to its task (a TLS connection in its
/// handshake): dropped, it gives its place back; [`Place::keep`] hands it on to the connection
/// task, which gives it back when it ends.
struct Place {
    shared: Option<Arc<MqttShared>>,
    ip: IpAddr,
}

impl Place {
    /// Counts a connection from `ip`; the limit it is past, if any (and then nothing is
    /// counted).
    fn take(shared: &Arc<MqttShared>, ip: IpAddr) -> Result<Place, Limit> {
        match admit(shared, ip) {
            None => Ok(Place {
                shared: Some(shared.clone()),
                ip,
            }),
            Some(limit) => Err(limit),
        }
    }

    /// The connection task takes the place over.
    fn keep(mut self) -> Admitted {
        self.shared = None;
        Admitted(())
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            shared.metrics.active.fetch_sub(1, Ordering::AcqRel);
            shared.addresses.release(&shared.config, self.ip);
        }
    }
}

/// Proof that a connection went through [`admit`]: its place, if it was given one, is the
/// connection task's to give back.
struct Admitted(());

/// Counts a refusal by `limit` before the CONNECT (the refusing CONNACK counts its own).
fn count_refusal(shared: &MqttShared, limit: Limit) {
    let m = &shared.metrics;
    m.refused.fetch_add(1, Ordering::Relaxed);
    match limit {
        Limit::Connections => m.server.refused("mqtt_connections"),
        Limit::PerAddress => {
            m.refused_per_address.fetch_add(1, Ordering::Relaxed);
            m.server.refused("mqtt_connections_per_address");
        }
    }
}

/// Turns TCP keepalive on for an accepted socket (`idle_secs` before the first probe; 0: off),
/// so that the kernel closes the sockets of peers that vanished without a FIN (power loss,
/// a dropped network) even for clients whose keep alive is long.
fn set_tcp_keepalive(stream: &tokio::net::TcpStream, idle_secs: u64) {
    if idle_secs == 0 {
        return;
    }
    let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(idle_secs));
    #[cfg(target_os = "linux")]
    let keepalive = keepalive
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "setting TCP keepalive failed");
    }
}

/// Runs one connection over any byte stream (TCP, WebSocket): counted now, and when it is past
/// a limit its CONNECT is answered with a refusing CONNACK.
pub(crate) fn spawn_connection<S>(shared: &Arc<MqttShared>, stream: S, peer: SocketAddr)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let over_limit = admit(shared, peer.ip());
    if let Some(limit) = over_limit {
        // Told why with a CONNACK, unless too many are being told already: then closed now.
        let refusing = shared.refusing.fetch_add(1, Ordering::AcqRel);
        if refusing >= MAX_REFUSING {
            shared.refusing.fetch_sub(1, Ordering::AcqRel);
            count_refusal(shared, limit);
            tracing::debug!(%peer, ?limit, "connection past a limit closed at once");
            drop(stream);
            return;
        }
    }
    spawn_admitted(shared, stream, peer, Admitted(()), over_limit);
}

/// The most connections past a limit kept open at once to be refused with a CONNACK (see
/// `MqttShared::refusing`); the connection task gives its place back when it ends.
pub(crate) const MAX_REFUSING: usize = 256;

/// Counts a new connection from `ip` in `active` and on its address (the connection task
/// gives both back when it ends), or finds the limit it is past: then nothing stays counted,
/// so that connections being refused (waiting for their CONNECT, to answer it with a refusing
/// CONNACK) take no place from anyone, however many one address opens.
fn admit(shared: &MqttShared, ip: IpAddr) -> Option<Limit> {
    let m = &shared.metrics;
    m.accepted.fetch_add(1, Ordering::Relaxed);
    let active = m.active.fetch_add(1, Ordering::AcqRel) + 1;
    // Released when the connection ends (see `AddressGuard`).
    let on_address = shared.addresses.add(&shared.config, ip);
    let per_address = shared.config.max_connections_per_address;
    let over = if active > shared.config.max_connections {
        Some(Limit::Connections)
    } else if per_address > 0 && on_address > per_address {
        Some(Limit::PerAddress)
    } else {
        None
    };
    if over.is_some() {
        m.active.fetch_sub(1, Ordering::AcqRel);
        shared.addresses.release(&shared.config, ip);
    }
    over
}

/// Runs a connection counted by [`admit`] (`over_limit` what it found) to its end.
fn spawn_admitted<S>(
    shared: &Arc<MqttShared>,
    stream: S,
    peer: SocketAddr,
    _admitted: Admitted,
    over_limit: Option<Limit>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    // Boxed: the task's future then carries one pointer, not the stream and address, for the
    // life of the connection.
    let start = Box::new(connection::Start {
        shared: shared.clone(),
        stream,
        peer,
        conn,
        over_limit,
    });
    // The future boxed too: Tokio lays a task out on 128-byte lines, so the 72-byte future
    // inline makes a 256-byte task, while boxed it is a 128-byte task and an 80-byte box.
    shared.tracker.spawn(Box::pin(connection::run(start)));
}

/// A connection limit that refuses a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    /// `max_connections`: Server busy (MQTT 5), Server unavailable (3.1.1).
    Connections,
    /// `max_connections_per_address`: Quota exceeded (MQTT 5), Server unavailable (3.1.1).
    PerAddress,
}

/// Open MQTT connections per client IP address, over every listener (TCP, TLS, WebSocket);
/// kept only when `max_connections_per_address` is set. An address is forgotten when its
/// last connection ends.
#[derive(Debug, Default)]
pub(crate) struct AddressCounts {
    counts: parking_lot::Mutex<HashMap<IpAddr, usize>>,
}

impl AddressCounts {
    /// Counts a new connection from `ip`; returns how many the address has open with it (0 when
    /// there is no per-address limit, so nothing is counted).
    pub(crate) fn add(&self, config: &MqttConfig, ip: IpAddr) -> usize {
        if config.max_connections_per_address == 0 {
            return 0;
        }
        let mut counts = self.counts.lock();
        let n = counts.entry(ip.to_canonical()).or_insert(0);
        *n += 1;
        *n
    }

    /// A connection from `ip` counted by [`Self::add`] ended.
    pub(crate) fn release(&self, config: &MqttConfig, ip: IpAddr) {
        if config.max_connections_per_address == 0 {
            return;
        }
        let ip = ip.to_canonical();
        let mut counts = self.counts.lock();
        if let Some(n) = counts.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&ip);
            }
        }
    }
}

/// Releases a connection's count on its address when dropped, unless disarmed (once the
/// connection's state, which releases it in its own `Drop`, exists).
pub(crate) struct AddressGuard {
    shared: Option<Arc<MqttShared>>,
    ip: IpAddr,
}

impl AddressGuard {
    pub(crate) fn new(shared: &Arc<MqttShared>, ip: IpAddr) -> Self {
        AddressGuard {
            shared: Some(shared.clone()),
            ip,
        }
    }

    /// Leaves the release to someone else.
    pub(crate) fn disarm(mut self) {
        self.shared = None;
    }
}

impl Drop for AddressGuard {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            shared.addresses.release(&shared.config, self.ip);
        }
    }
}

/// Once a second: ends the connections whose keep alive expired, expires offline sessions
/// (expiry interval, `max_queued`), saves sessions and retained messages. At shutdown, kicks
/// every connection.
async fn maintenance(shared: Arc<MqttShared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        shared.sessions.expire_keep_alive();
        shared
            .sessions
            .expire(&shared.broker, shared.config.max_queued);
        // File I/O: on a blocking thread, not on this async worker.
        let s = shared.clone();
        match tokio::task::spawn_blocking(move || s.save_sessions_and_retained()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "saving the server state failed"),
            Err(e) => tracing::error!(error = %e, "the state save task failed"),
        }
    }
    shared.sessions.shutdown();
}
