//! Bad conditions: a backend unreachable at start, or lost in the middle of a run.
//!
//! 1. Unreachable at start: connecting to a closed port fails with
//!    [`BackendError::Unreachable`] after exactly the policy's attempts, within the time the
//!    [`RetryPolicy`] allows (counted on a listener that accepts and drops every connection, and
//!    timed on a closed port); a server that accepts but never answers costs one
//!    `attempt_timeout` per attempt.
//! 2. Lost mid-run: the adapter talks to the real service through a TCP proxy of this test. A
//!    few publishes succeed, a publisher keeps publishing while the proxy is killed (every
//!    connection dropped, no more accepts); publishes after that fail with a transient typed
//!    error (`Unreachable` or `Timeout`), or `InDoubt` where the message was handed to the
//!    client (NATS buffers it for the reconnect), within the operation timeout, never `Ok`. Every
//!    message the adapter acknowledged is then read back from the service directly (with the
//!    engine's own client, not through the proxy): no acked-but-lost message. Then the proxy
//!    restarts on the same port and publishing works again (NATS: the client reconnects by
//!    itself; Redis and RabbitMQ: the adapter reconnects on the next call after the failure).
//!    A group member and a fanout subscriber made before the loss resume by themselves: the
//!    group member receives the messages published after the restart, the fanout subscriber
//!    those published once it is back, without subscribing again; a delivery held across the
//!    loss cannot be acknowledged any more on RabbitMQ (`Stale`).
//!
//! Service tests skip with a printed reason when the service is unreachable, and fail instead
//! with `FERRY_REQUIRE_SERVICES=1`. URLs: `FERRY_NATS_URL`, `FERRY_REDIS_URL`, `FERRY_AMQP_URL`
//! (defaults: the local services).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_backends::{
    connect_with, Backend, BackendError, BackendMessage, ConnectOptions, Position, PublishAck,
    RetryPolicy, SubscribeOptions,
};
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------------
// Helpers.

fn require_services() -> bool {
    std::env::var("FERRY_REQUIRE_SERVICES").is_ok_and(|v| v == "1" || v == "true")
}

fn env_or(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_string())
}

/// The service's address from its URL, if something listens there; `None` (skip) otherwise.
async fn service(kind: &str, url: &str) -> Option<SocketAddr> {
    let parsed = url::Url::parse(url).expect("service URL");
    let host = parsed.host_str().unwrap_or("127.0.0.1").to_string();
    let port = parsed.port_or_known_default().unwrap_or(match kind {
        "nats" => 4222,
        "redis" => 6379,
        _ => 5672,
    });
    let reachable = tokio::time::timeout(
        Duration::from_secs(2),
        TcpStream::connect((host.as_str(), port)),
    )
    .await;
    match reachable {
        Ok(Ok(s)) => s.peer_addr().ok(),
        other => {
            let why = match other {
                Ok(Err(e)) => e.to_string(),
                _ => "connect timed out".into(),
            };
            if require_services() {
                panic!(
                    "{kind} is required (FERRY_REQUIRE_SERVICES=1) but unreachable at {url}: {why}"
                );
            }
            eprintln!("SKIP {kind}: unreachable at {url}: {why} (set FERRY_REQUIRE_SERVICES=1 to fail instead)");
            None
        }
    }
}

/// A port on loopback where nothing listens.
async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    port
}

fn unique(name: &str) -> String {
    format!(
        "{name}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// A TCP proxy on loopback to `upstream`; [`kill`](Self::kill) drops every connection and
/// stops listening.
struct Proxy {
    port: u16,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    accepted: Arc<AtomicU32>,
}

impl Proxy {
    async fn start(port: u16, upstream: SocketAddr) -> Proxy {
        // Binding the port again right after a kill: retry for a moment.
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", port)).await {
                Ok(l) => break l,
                Err(e) if tries < 40 => {
                    tries += 1;
                    eprintln!("proxy: bind {port}: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("proxy: cannot bind {port}: {e}"),
            }
        };
        let port = listener.local_addr().unwrap().port();
        let cancel = CancellationToken::new();
        let accepted = Arc::new(AtomicU32::new(0));
        let stop = cancel.clone();
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    () = stop.cancelled() => return,
                    r = listener.accept() => match r {
                        Ok(c) => c,
                        Err(_) => continue,
                    },
                };
                count.fetch_add(1, Ordering::SeqCst);
                let stop = stop.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        () = stop.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                    // Both sockets drop here: the client sees its connection closed.
                });
            }
        });
        Proxy {
            port,
            cancel,
            task,
            accepted,
        }
    }

    /// Drops every proxied connection and stops listening (the port is closed on return).
    async fn kill(self) -> u16 {
        self.cancel.cancel();
        let _ = self.task.await;
        // Let the connection tasks see the cancellation and close their sockets.
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.port
    }
}

fn options(op_timeout: Duration) -> ConnectOptions {
    ConnectOptions {
        retry: RetryPolicy {
            attempts: 2,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(100),
            attempt_timeout: Duration::from_secs(3),
        },
        operation_timeout: op_timeout,
    }
}

/// The operation timeout of the mid-run tests: a publish never takes longer than this (+ slack).
const OP_TIMEOUT: Duration = Duration::from_secs(3);
const SLACK: Duration = Duration::from_secs(3);

/// Messages the adapter acknowledged: id and position.
type Acked = Arc<Mutex<Vec<(String, PublishAck)>>>;

async fn publish_ok(backend: &Arc<dyn Backend>, topic: &str, acked: &Acked, n: usize) {
    for i in 0..n {
        let m = BackendMessage::new(format!("before-{i}"));
        let id = m.id.clone();
        let ack = backend
            .publish(topic, m)
            .await
            .unwrap_or_else(|e| panic!("publish {i} through the proxy: {e}"));
        assert_eq!(ack.id, id);
        acked.lock().push((id, ack));
    }
}

/// The scenario shared by every backend, up to the read-back (see the module docs). Returns
/// the messages the adapter acknowledged.
async fn lose_and_recover(
    kind: &str,
    backend: Arc<dyn Backend>,
    proxy: Proxy,
    upstream: SocketAddr,
    topic: &str,
) -> (Vec<(String, PublishAck)>, Proxy) {
    let acked: Acked = Arc::default();
    // A member of a group and a fanout subscriber, subscribed through the proxy before the
    // loss, which must both resume by themselves afterwards.
    let group = unique("g");
    let mut sub = backend
        .subscribe(SubscribeOptions::new(topic).group(group.clone()))
        .await
        .unwrap();
    let mut fanout = backend
        .subscribe(SubscribeOptions::new(topic))
        .await
        .unwrap();
    publish_ok(&backend, topic, &acked, 20).await;
    // A delivery held, unsettled, across the loss.
    let held = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("no delivery before the loss")
        .expect("subscription failed before the loss");

    // A publisher running while the connection is lost.
    let stop = CancellationToken::new();
    let background = {
        let (backend, topic, acked, stop) = (
            backend.clone(),
            topic.to_string(),
            acked.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut errors = 0u32;
            let mut i = 0u32;
            while !stop.is_cancelled() {
                let m = BackendMessage::new(format!("during-{i}"));
                let id = m.id.clone();
                i += 1;
                let started = Instant::now();
                match backend.publish(&topic, m).await {
                    Ok(ack) => acked.lock().push((id, ack)),
                    Err(e) => {
                        errors += 1;
                        tracing_free_log(&format!("background publish failed: {e}"));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                assert!(
                    started.elapsed() < OP_TIMEOUT + SLACK,
                    "a publish took {:?}",
                    started.elapsed()
                );
            }
            errors
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before_kill = acked.lock().len();
    let port = proxy.kill().await;
    eprintln!("{kind}: proxy killed after {before_kill} acknowledged publishes");

    // While the service is gone, publishes fail with a transient typed error, in bounded time.
    for i in 0..2 {
        let started = Instant::now();
        let r = tokio::time::timeout(
            OP_TIMEOUT + SLACK,
            backend.publish(topic, BackendMessage::new(format!("down-{i}"))),
        )
        .await
        .unwrap_or_else(|_| panic!("{kind}: a publish hung while the service was gone"));
        match r {
            Ok(ack) => panic!("{kind}: publish acknowledged while the service was gone: {ack:?}"),
            Err(e) => {
                eprintln!(
                    "{kind}: publish while down failed in {:?}: {e} ({})",
                    started.elapsed(),
                    e.code()
                );
                // Unsent: transient. Sent (NATS buffers it for the reconnect) without a
                // confirmation: in doubt.
                assert!(
                    e.is_transient() || e.is_in_doubt(),
                    "{kind}: neither transient nor in doubt: {e:?}"
                );
            }
        }
    }
    stop.cancel();
    let background_errors = tokio::time::timeout(OP_TIMEOUT + SLACK * 2, background)
        .await
        .expect("the background publisher hung")
        .expect("the background publisher panicked");
    assert!(
        background_errors > 0,
        "{kind}: no background publish failed"
    );

    // The service comes back on the same port: publishing works again.
    let proxy = Proxy::start(port, upstream).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut failures = 0;
    loop {
        match tokio::time::timeout(
            OP_TIMEOUT + SLACK,
            backend.publish(topic, BackendMessage::new("after")),
        )
        .await
        {
            Ok(Ok(ack)) => {
                acked.lock().push((ack.id.clone(), ack));
                break;
            }
            Ok(Err(e)) if Instant::now() < deadline => {
                failures += 1;
                eprintln!("{kind}: publish after the restart failed ({failures}): {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(Err(e)) => panic!("{kind}: publishing did not recover within 20 s: {e}"),
            Err(_) => panic!("{kind}: a publish hung after the restart"),
        }
    }
    eprintln!(
        "{kind}: publishing recovered after {failures} failed call(s); {} connection(s) to the new proxy",
        proxy.accepted.load(Ordering::SeqCst)
    );
    publish_ok(&backend, topic, &acked, 5).await;
    let out = acked.lock().clone();

    // The group member receives what was published after the restart, by itself: the client
    // (NATS) or the adapter (Redis, RabbitMQ) reconnects; `next` may report a transient error
    // meanwhile, but the subscription is never made again.
    let last = out.last().map(|(id, _)| id.clone()).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut received, mut transient, mut ack_errors) = (0usize, 0u32, 0u32);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sub.next()).await {
            Err(_) => panic!(
                "{kind}: the subscriber did not get the last message within 20 s ({received} received, {transient} transient errors)"
            ),
            Ok(Ok(d)) => {
                received += 1;
                let done = d.id == last;
                if let Err(e) = d.ack().await {
                    ack_errors += 1;
                    tracing_free_log(&format!("{kind}: ack failed: {e}"));
                }
                if done {
                    break;
                }
            }
            Ok(Err(e)) => {
                eprintln!("{kind}: subscription error: {e} ({})", e.code());
                assert!(e.is_transient(), "{kind}: the subscription failed: {e:?}");
                transient += 1;
            }
        }
    }
    eprintln!(
        "{kind}: subscriber got the last message after {received} deliveries, {transient} transient error(s), {ack_errors} failed ack(s)"
    );

    // The delivery held across the loss: RabbitMQ took it back with the lost channel, so it
    // cannot be settled any more (a typed `Stale`, not a panic or a hang).
    let settled = tokio::time::timeout(OP_TIMEOUT + SLACK, held.ack())
        .await
        .unwrap_or_else(|_| panic!("{kind}: acking a delivery from before the loss hung"));
    eprintln!("{kind}: ack of a delivery from before the loss: {settled:?}");
    if kind == "rabbitmq" {
        assert!(
            matches!(settled, Err(BackendError::Stale)),
            "{kind}: ack of a delivery from a lost channel: {settled:?}"
        );
    }

    // The fanout subscriber receives messages published after it is back (RabbitMQ: its queue
    // died with the connection and is declared again, so what was published in between is
    // lost; publish probes until one arrives).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut probes = 0u32;
    'probe: loop {
        assert!(
            Instant::now() < deadline,
            "{kind}: the fanout subscriber received no probe within 20 s ({probes} sent)"
        );
        backend
            .publish(topic, BackendMessage::new(format!("probe-{probes}")))
            .await
            .unwrap_or_else(|e| panic!("{kind}: probe publish: {e}"));
        probes += 1;
        let wait = Instant::now() + Duration::from_millis(500);
        loop {
            let left = wait.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, fanout.next()).await {
                Err(_) => break,
                Ok(Ok(d)) => {
                    let probe = d.payload.starts_with(b"probe-");
                    let _ = d.ack().await;
                    if probe {
                        break 'probe;
                    }
                }
                Ok(Err(e)) => {
                    assert!(
                        e.is_transient(),
                        "{kind}: the fanout subscription failed: {e:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    eprintln!("{kind}: the fanout subscriber resumed ({probes} probe(s) sent)");
    drop(fanout);
    drop(sub);
    (out, proxy)
}

async fn cleanup(kind: &str, backend: &Arc<dyn Backend>, topic: &str, proxy: Proxy) {
    if let Err(e) = backend.delete_topic(topic).await {
        eprintln!("{kind}: cleanup: {e}");
    }
    let _ = backend.close().await;
    proxy.kill().await;
}

fn tracing_free_log(line: &str) {
    // Only the first few lines matter when reading a failure.
    static N: AtomicU32 = AtomicU32::new(0);
    if N.fetch_add(1, Ordering::Relaxed) < 5 {
        eprintln!("{line}");
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Unreachable at start.

fn policy() -> RetryPolicy {
    RetryPolicy {
        attempts: 3,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(150),
        attempt_timeout: Duration::from_secs(1),
    }
}

fn urls(port: u16) -> [String; 3] {
    [
        format!("nats://127.0.0.1:{port}"),
        format!("redis://127.0.0.1:{port}"),
        format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_at_start_is_a_typed_error_after_bounded_retries() {
    let policy = policy();
    // Backoff waits: 100 ms then 150 ms, ±25% jitter.
    let least_wait = Duration::from_millis(185);
    let most = policy.attempt_timeout * policy.attempts + Duration::from_millis(320) + SLACK;
    let port = closed_port().await;
    for url in urls(port) {
        let started = Instant::now();
        let r = connect_with(
            &url,
            ConnectOptions {
                retry: policy.clone(),
                ..ConnectOptions::default()
            },
        )
        .await;
        let took = started.elapsed();
        match r {
            Err(BackendError::Unreachable { .. }) => {}
            other => panic!("{url}: expected Unreachable, got {other:?}"),
        }
        assert!(
            took >= least_wait,
            "{url}: no backoff between attempts ({took:?})"
        );
        assert!(took <= most, "{url}: took {took:?}, more than {most:?}");
        eprintln!("{url}: Unreachable after {took:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_makes_exactly_the_policy_attempts() {
    // A listener that accepts and drops every connection, counting them: each attempt is one
    // connection (the clients do not retry on their own within an attempt).
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicU32::new(0));
    let c = count.clone();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    let policy = policy();
    for url in urls(port) {
        count.store(0, Ordering::SeqCst);
        let started = Instant::now();
        let r = connect_with(
            &url,
            ConnectOptions {
                retry: policy.clone(),
                ..ConnectOptions::default()
            },
        )
        .await;
        let took = started.elapsed();
        let e = r.expect_err("connected to a listener that drops every connection");
        assert!(e.is_transient(), "{url}: {e:?}");
        assert!(
            matches!(e, BackendError::Unreachable { .. }),
            "{url}: expected Unreachable, got {e:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            count.load(Ordering::SeqCst),
            policy.attempts,
            "{url}: connection attempts"
        );
        assert!(
            took < policy.attempt_timeout * policy.attempts + SLACK,
            "{url}: {took:?}"
        );
        eprintln!("{url}: {} attempts, {took:?}: {e}", policy.attempts);
    }
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_costs_one_attempt_timeout_per_attempt() {
    // Accepts connections and never answers: each attempt ends at `attempt_timeout`.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            h.lock().push(s);
        }
    });
    let policy = RetryPolicy {
        attempts: 2,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(50),
        attempt_timeout: Duration::from_millis(500),
    };
    for url in urls(port) {
        let started = Instant::now();
        let r = connect_with(
            &url,
            ConnectOptions {
                retry: policy.clone(),
                ..ConnectOptions::default()
            },
        )
        .await;
        let took = started.elapsed();
        let e = r.expect_err("connected to a silent server");
        assert!(
            matches!(e, BackendError::Unreachable { .. }),
            "{url}: expected Unreachable, got {e:?}"
        );
        assert!(took >= Duration::from_millis(1000), "{url}: {took:?}");
        assert!(
            took < Duration::from_millis(1000) + SLACK,
            "{url}: {took:?}"
        );
        eprintln!("{url}: {e} after {took:?}");
    }
    task.abort();
}

// ---------------------------------------------------------------------------------------------
// 2. Lost mid-run.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_lost_mid_run() {
    let base = env_or("FERRY_NATS_URL", "nats://127.0.0.1:4222");
    let Some(upstream) = service("nats", &base).await else {
        return;
    };
    let proxy = Proxy::start(0, upstream).await;
    let stream = "FERRY_BADCOND";
    let url = format!(
        "nats://127.0.0.1:{}?stream={stream}&prefix=ferry-badcond&inactive_s=300",
        proxy.port
    );
    let backend = connect_with(&url, options(OP_TIMEOUT)).await.unwrap();
    let topic = unique("t");
    let (acked, proxy) = lose_and_recover("nats", backend.clone(), proxy, upstream, &topic).await;

    // Read back with async-nats, straight from the server: each acknowledged sequence holds
    // the message with that id.
    let client = async_nats::connect(upstream.to_string()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let s = js.get_stream(stream).await.unwrap();
    for (id, ack) in &acked {
        let Position::Offset(seq) = ack.position else {
            panic!("nats: unexpected position {:?}", ack.position)
        };
        let m = s.get_raw_message(seq).await.unwrap_or_else(|e| {
            panic!("nats: acknowledged message {id} (seq {seq}) is missing: {e}")
        });
        let stored = m
            .headers
            .get("Ferry-Id")
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        assert_eq!(&stored, id, "nats: seq {seq} holds another message");
        assert_eq!(m.subject.as_str(), format!("ferry-badcond.t.{topic}"));
    }
    eprintln!("nats: {} acknowledged messages all stored", acked.len());
    cleanup("nats", &backend, &topic, proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lost_mid_run() {
    let base = env_or("FERRY_REDIS_URL", "redis://127.0.0.1:6379/0");
    let Some(upstream) = service("redis", &base).await else {
        return;
    };
    let proxy = Proxy::start(0, upstream).await;
    let mut url = url::Url::parse(&base).unwrap();
    url.set_port(Some(proxy.port)).unwrap();
    url.set_host(Some("127.0.0.1")).unwrap();
    url.set_query(Some("prefix=ferry-badcond:"));
    let backend = connect_with(url.as_str(), options(OP_TIMEOUT))
        .await
        .unwrap();
    let topic = unique("t");
    let (acked, proxy) = lose_and_recover("redis", backend.clone(), proxy, upstream, &topic).await;

    // Read back with redis-rs, straight from the server: XRANGE on each acknowledged entry id.
    let client = redis::Client::open(base.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("ferry-badcond:{topic}");
    for (id, ack) in &acked {
        let Position::EntryId(entry) = &ack.position else {
            panic!("redis: unexpected position {:?}", ack.position)
        };
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&key)
            .arg(entry)
            .arg(entry)
            .query_async(&mut conn)
            .await
            .unwrap();
        let found = reply
            .ids
            .first()
            .unwrap_or_else(|| panic!("redis: acknowledged message {id} ({entry}) is missing"));
        assert_eq!(found.get::<String>("id").as_deref(), Some(id.as_str()));
    }
    eprintln!("redis: {} acknowledged messages all stored", acked.len());
    cleanup("redis", &backend, &topic, proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_lost_mid_run() {
    use lapin::options::{
        BasicGetOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::FieldTable;

    let base = env_or("FERRY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let Some(upstream) = service("rabbitmq", &base).await else {
        return;
    };
    let proxy = Proxy::start(0, upstream).await;
    let exchange = "ferry-badcond";
    let mut url = url::Url::parse(&base).unwrap();
    url.set_port(Some(proxy.port)).unwrap();
    url.set_host(Some("127.0.0.1")).unwrap();
    url.set_query(Some(&format!("exchange={exchange}&queue_expires_s=300")));
    let backend = connect_with(url.as_str(), options(OP_TIMEOUT))
        .await
        .unwrap();
    let topic = unique("t");

    // RabbitMQ keeps only what a queue holds: bind a queue of this test (straight to the
    // server, with lapin) to the topic first, to read every message back afterwards.
    let direct = lapin::Connection::connect(&base, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = direct.create_channel().await.unwrap();
    let queue = format!("ferry-badcond-check:{topic}");
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.as_str().into(),
        exchange.into(),
        topic.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    let (acked, proxy) =
        lose_and_recover("rabbitmq", backend.clone(), proxy, upstream, &topic).await;

    let mut stored = std::collections::HashSet::new();
    while let Some(m) = ch
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        if let Some(id) = m.delivery.properties.message_id() {
            stored.insert(id.as_str().to_string());
        }
    }
    for (id, _) in &acked {
        assert!(
            stored.contains(id),
            "rabbitmq: acknowledged message {id} is missing"
        );
    }
    eprintln!(
        "rabbitmq: {} acknowledged messages all stored ({} in the queue)",
        acked.len(),
        stored.len()
    );
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = direct.close(200, "done".into()).await;
    cleanup("rabbitmq", &backend, &topic, proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_closed_subscriptions_do_not_reconnect() {
    let base = env_or("FERRY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let Some(upstream) = service("rabbitmq", &base).await else {
        return;
    };
    let proxy = Proxy::start(0, upstream).await;
    let mut url = url::Url::parse(&base).unwrap();
    url.set_port(Some(proxy.port)).unwrap();
    url.set_host(Some("127.0.0.1")).unwrap();
    url.set_query(Some("exchange=ferry-badcond&queue_expires_s=60"));
    let backend = connect_with(url.as_str(), options(OP_TIMEOUT))
        .await
        .unwrap();
    let topic = unique("t");
    let closed = backend
        .subscribe(SubscribeOptions::new(&topic).group(unique("g")))
        .await
        .unwrap();
    let mut open = backend
        .subscribe(SubscribeOptions::new(&topic))
        .await
        .unwrap();

    // Lost: both subscriptions start trying to consume again. One is closed by its owner, then
    // the backend is closed under the other.
    let port = proxy.kill().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::time::timeout(OP_TIMEOUT + SLACK, closed.close())
        .await
        .expect("closing a subscription hung while the service was gone")
        .unwrap();
    backend.close().await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(2), open.next())
        .await
        .expect("next hung after the backend was closed");
    assert!(matches!(r, Err(BackendError::Closed)), "{r:?}");

    // The service is back: nothing connects to it any more (the resubscription backoff is at
    // most 2 s).
    let proxy = Proxy::start(port, upstream).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        proxy.accepted.load(Ordering::SeqCst),
        0,
        "a closed subscription or backend reconnected"
    );
    drop(open);
    proxy.kill().await;
}
