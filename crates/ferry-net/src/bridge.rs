//! `ferry serve --backend URL`: the MQTT/HTTP front over a distributed engine (NATS JetStream,
//! RabbitMQ, Kafka), so that several Ferry servers share one message store and scale out.
//!
//! The server keeps its local engine as the dispatcher for its own clients (sessions, retained
//! messages, QoS flows, the dashboard), and the backend becomes the source of truth:
//!
//! - **Publishing.** A message a client publishes (MQTT, HTTP, a will) goes to the backend and
//!   is acknowledged to the client (PUBACK, PUBREC, `201`) only once the backend confirmed it.
//!   Nothing is written to a local topic at that point.
//! - **Fanout ingress.** Each server has one durable backend consumer group of its own
//!   (`ferry-node-<node id>`) over every topic. Each message it receives is written to the local
//!   topic of the same name with the header [`VIA_HEADER`]` = fanout`, then acknowledged to the
//!   backend. Ordinary and persistent-session MQTT subscriptions read only those records, so
//!   every client of every server sees every message once.
//! - **Group ingress.** A shared subscription `$share/<g>/<filter>` (a consumer group spanning
//!   servers) is a backend consumer group named after `<g>` and the filter, the same on every
//!   server. Each server that has members pulls from it and writes what it gets to the local
//!   topic with [`VIA_HEADER`]` = <that group>`; the local members read only those records. So a
//!   message goes to exactly one server and, there, to one member. When a server's last member
//!   leaves, it stops pulling after a grace period (what it already took stays queued in its
//!   local group for the next member).
//!
//! Delivery from the backend to a server is at-least-once (a crash between the local write and
//! the backend ack redelivers); with a data directory the local write is durable. Topics map
//! level by level (`a/b` is backend topic `a.b`); characters the backends cannot carry in a
//! level (`.`, `*`, `>`, `#`, `+`, `~`, whitespace, and a `$` that begins a level, which
//! backends reserve: NATS `$JS.API...`) are escaped as `~XX`, an empty level is
//! `~`. A filter `a/#` reads backend `a` and `a.#`, as MQTT's `#` also matches its parent.
//!
//! Backends without wildcard subscriptions (Redis Streams) cannot feed the fanout ingress, and
//! are refused at start.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::{Broker, HeaderMatch, Message, MessageId, Priority, PublishError};
use ferry_backends::{
    Backend, BackendError, BackendMessage, BackendSubscription, SubscribeOptions,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::mqtt::retained::RetainedStore;
use crate::unix_time::{from_unix_ms, unix_ms};

/// The header marking which ingress wrote a local record (`fanout`, or a backend group name).
/// It starts with `mqtt-`, so it is never sent to MQTT clients as a user property.
pub const VIA_HEADER: &str = "mqtt-bridge-via";
const VIA_FANOUT: &str = "fanout";
/// The backend header carrying a Ferry message's metadata (JSON).
const META_HEADER: &str = "ferry-meta";
/// How long a group ingress keeps pulling after its last local member left.
const GROUP_GRACE: Duration = Duration::from_secs(5);
/// Unsettled backend deliveries of the fanout ingress (one reader per server: big batches).
const FANOUT_PREFETCH: usize = 256;
/// Unsettled backend deliveries of a group ingress: small, so that the servers pulling from one
/// group take turns instead of the first taking a whole batch.
const GROUP_PREFETCH: usize = 8;

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The backend could not be reached or refused the subscription.
    #[error("backend {url}: {source}")]
    Backend {
        /// The backend URL (without credentials).
        url: String,
        /// The adapter's error.
        source: BackendError,
    },
    /// The backend cannot carry the server.
    #[error("backend {url} cannot run `ferry serve`: {reason}")]
    Unsuitable {
        /// The backend URL (without credentials).
        url: String,
        /// Why.
        reason: String,
    },
}

/// The link between the local engine and the backend. See the module docs.
pub struct Bridge {
    backend: Arc<dyn Backend>,
    broker: Broker,
    retained: Arc<RetainedStore>,
    node: String,
    groups: Mutex<HashMap<String, GroupIngress>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

struct GroupIngress {
    /// The local consumer group whose members read what this ingress writes.
    local_group: String,
    /// Stops the ingress.
    stop: CancellationToken,
    /// Since when the local group has had no members.
    idle_since: Option<Instant>,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("backend", &self.backend.name())
            .field("node", &self.node)
            .finish()
    }
}

impl Bridge {
    /// Connects to `url`, starts the fanout ingress of node `node` and the group maintenance.
    pub async fn start(
        url: &str,
        broker: Broker,
        retained: Arc<RetainedStore>,
        node: String,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<Arc<Bridge>, BridgeError> {
        let shown = ferry_backends::redact_url(url);
        let backend =
            ferry_backends::connect(url)
                .await
                .map_err(|source| BridgeError::Backend {
                    url: shown.clone(),
                    source,
                })?;
        if !backend.capabilities().wildcards.is_supported() {
            return Err(BridgeError::Unsuitable {
                url: shown,
                reason: format!(
                    "the {} adapter has no wildcard subscriptions, which the fanout ingress needs",
                    backend.name()
                ),
            });
        }
        let bridge = Arc::new(Bridge {
            backend,
            broker,
            retained,
            node,
            groups: Mutex::new(HashMap::new()),
            shutdown,
            tracker,
        });
        let group = format!("ferry-node-{}", sanitize(&bridge.node));
        let opts = ingress_options("#", &group, FANOUT_PREFETCH);
        let sub = bridge
            .backend
            .subscribe(opts.clone())
            .await
            .map_err(|source| BridgeError::Backend {
                url: shown.clone(),
                source,
            })?;
        let stop = bridge.shutdown.child_token();
        bridge.tracker.spawn(ingress(
            bridge.clone(),
            opts,
            sub,
            VIA_FANOUT.to_string(),
            None,
            stop,
        ));
        bridge.tracker.spawn(maintenance(bridge.clone()));
        tracing::info!(backend = %shown, node = bridge.node, "serving over a backend");
        Ok(bridge)
    }

    /// The backend's name.
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// Publishes a client's message to the backend; `Ok` once the backend confirmed it.
    pub async fn publish(&self, topic: &str, message: &Message) -> Result<(), PublishError> {
        let (backend_topic, m) = to_backend(topic, message);
        match self.backend.publish(&backend_topic, m).await {
            Ok(_) => Ok(()),
            Err(BackendError::Closed) => Err(PublishError::Closed),
            // Sent without a confirmation (a confirmation timeout, the connection lost after
            // the send), or a client library failure that does not say: the backend may have
            // the message, and then every server delivers it.
            Err(BackendError::InDoubt {
                backend, reason, ..
            }) => Err(PublishError::InDoubt {
                topic: topic.to_string(),
                // The error's own words without its "in doubt", which the answer says first.
                reason: format!("backend {backend} did not confirm: {reason}"),
            }),
            Err(e @ BackendError::Backend { .. }) => Err(PublishError::InDoubt {
                topic: topic.to_string(),
                reason: format!("backend {} did not confirm: {e}", self.backend.name()),
            }),
            // Refused by the backend, or certainly never sent (unreachable, or out of time
            // before the send): not published.
            Err(e) => Err(PublishError::Storage(format!(
                "backend {}: {e}",
                self.backend.name()
            ))),
        }
    }

    /// The header condition of an ordinary (fanout) subscription's local records.
    pub fn fanout_condition() -> HeaderMatch {
        HeaderMatch::equals(VIA_HEADER, VIA_FANOUT)
    }

    /// The header condition of the local members of shared subscription `share` on MQTT
    /// `filter` (local consumer group `local_group`), starting its group ingress if this server
    /// has none yet.
    pub fn share_condition(
        self: &Arc<Self>,
        share: &str,
        filter: &str,
        local_group: &str,
    ) -> HeaderMatch {
        let group = share_group_name(share, filter);
        let mut groups = self.groups.lock();
        match groups.get_mut(&group) {
            Some(g) => g.idle_since = None,
            None => {
                let stop = self.shutdown.child_token();
                groups.insert(
                    group.clone(),
                    GroupIngress {
                        local_group: local_group.to_string(),
                        stop: stop.clone(),
                        idle_since: None,
                    },
                );
                let bridge = self.clone();
                let filters = backend_filters(filter);
                // With `a.#` and `a` both subscribed, `a.#` may also match `a` itself (RabbitMQ,
                // Ferry): its ingress leaves `a` to the other one.
                let parent = filters.get(1).cloned();
                let via = group.clone();
                self.tracker.spawn(async move {
                    for (i, f) in filters.into_iter().enumerate() {
                        let opts = ingress_options(&f, &via, GROUP_PREFETCH);
                        let skip = if i == 0 { parent.clone() } else { None };
                        match bridge.backend.subscribe(opts.clone()).await {
                            Ok(sub) => {
                                bridge.tracker.spawn(ingress(
                                    bridge.clone(),
                                    opts,
                                    sub,
                                    via.clone(),
                                    skip,
                                    stop.clone(),
                                ));
                            }
                            Err(e) => {
                                tracing::error!(group = via, filter = f, error = %e, "shared subscription ingress failed");
                                bridge.groups.lock().remove(&via);
                                stop.cancel();
                            }
                        }
                    }
                });
            }
        }
        HeaderMatch::equals(VIA_HEADER, group)
    }

    /// The group ingresses running now (backend group names).
    pub fn group_ingresses(&self) -> Vec<String> {
        self.groups.lock().keys().cloned().collect()
    }

    /// Stops the ingresses and closes the backend handle.
    pub async fn close(&self) {
        for (_, g) in self.groups.lock().drain() {
            g.stop.cancel();
        }
        if let Err(e) = self.backend.close().await {
            tracing::warn!(error = %e, "closing the backend failed");
        }
    }
}

fn ingress_options(filter: &str, group: &str, prefetch: usize) -> SubscribeOptions {
    SubscribeOptions::new(filter)
        .group(group)
        .ack_timeout(Duration::from_secs(30))
        .max_attempts(u32::MAX)
        .prefetch(prefetch)
}

/// Failed receives in a row after which an ingress subscribes again (some adapters end a
/// subscription whose connection was lost).
const RESUBSCRIBE_AFTER: u32 = 3;

/// Moves backend deliveries into local topics until stopped; deliveries on backend topic `skip`
/// are acknowledged and left out. A subscription that ends or keeps failing is made again (with
/// backoff) from `opts`.
async fn ingress(
    bridge: Arc<Bridge>,
    opts: SubscribeOptions,
    sub: Box<dyn BackendSubscription>,
    via: String,
    skip: Option<String>,
    stop: CancellationToken,
) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(50);
    let mut backoff = FIRST_BACKOFF;
    let mut failures = 0u32;
    let mut current = Some(sub);
    loop {
        let Some(sub) = current.as_mut() else {
            // The subscription ended: make it again, with backoff, until stopped.
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            match bridge.backend.subscribe(opts.clone()).await {
                Ok(new) => {
                    tracing::info!(via, "backend ingress subscribed again");
                    current = Some(new);
                    failures = 0;
                }
                Err(e) => {
                    tracing::warn!(via, error = %e, "backend ingress: subscribing again failed");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
            continue;
        };
        let next = tokio::select! {
            _ = stop.cancelled() => break,
            n = sub.next() => n,
        };
        let delivery = match next {
            Ok(d) => {
                backoff = FIRST_BACKOFF;
                failures = 0;
                d
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(via, error = %e, failures, "backend ingress: receive failed");
                if matches!(e, BackendError::Closed) || failures >= RESUBSCRIBE_AFTER {
                    if let Some(old) = current.take() {
                        let _ = old.close().await;
                    }
                    continue;
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if skip.as_deref() == Some(delivery.topic()) {
            let _ = delivery.ack().await;
            continue;
        }
        let Some(topic) = from_backend_topic(delivery.topic()) else {
            tracing::warn!(
                topic = delivery.topic(),
                "backend message on a topic that is not an MQTT topic; dead-lettered"
            );
            let _ = delivery.reject("topic is not an MQTT topic").await;
            continue;
        };
        let message = from_backend(delivery.message()).with_header(VIA_HEADER, via.clone());
        if via == VIA_FANOUT && crate::mqtt::convert::published_retained(&message) {
            bridge.retained.set(&topic, message.clone());
        }
        match bridge.broker.publish(topic.as_str(), message).await {
            Ok(_) => {
                if let Err(e) = delivery.ack().await {
                    tracing::debug!(error = %e, "backend ack failed; the message comes again");
                }
            }
            Err(PublishError::Closed) => break,
            Err(e) => {
                tracing::warn!(topic, error = %e, "backend ingress: local write failed; dead-lettered");
                let _ = delivery.reject(format!("local write failed: {e}")).await;
            }
        }
    }
    if let Some(sub) = current {
        let _ = sub.close().await;
    }
}

/// Stops group ingresses whose local group has had no members for [`GROUP_GRACE`].
async fn maintenance(bridge: Arc<Bridge>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = bridge.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let stats = bridge.broker.subscription_stats();
        let now = Instant::now();
        bridge.groups.lock().retain(|name, g| {
            let members: usize = stats
                .iter()
                .filter(|s| s.group && s.name == g.local_group)
                .map(|s| s.members)
                .sum();
            if members > 0 {
                g.idle_since = None;
                return true;
            }
            let since = *g.idle_since.get_or_insert(now);
            if now.duration_since(since) < GROUP_GRACE {
                return true;
            }
            tracing::info!(
                group = name,
                "no local members left; shared subscription ingress stopped"
            );
            g.stop.cancel();
            false
        });
    }
}

/// The backend consumer group of shared subscription `share` on MQTT `filter`: the same on
/// every server.
pub fn share_group_name(share: &str, filter: &str) -> String {
    format!(
        "share-{}-{:016x}",
        sanitize(share),
        fnv1a(format!("{share}\0{filter}").as_bytes())
    )
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Keeps `[A-Za-z0-9_-]`, turns the rest into `_` (names of groups and consumers).
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn escape_level(level: &str, out: &mut String) {
    if level.is_empty() {
        out.push('~');
        return;
    }
    for (i, c) in level.chars().enumerate() {
        // A leading `$` too: backends give `$` names meanings of their own (NATS `$JS.API...`
        // calls JetStream), so a user `$` topic must not reach them as such.
        if matches!(c, '.' | '*' | '>' | '#' | '+' | '~')
            || (c == '$' && i == 0)
            || c.is_whitespace()
            || c.is_control()
        {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                let _ = write!(out, "~{b:02X}");
            }
        } else {
            out.push(c);
        }
    }
}

/// The backend topic of MQTT topic `topic`.
pub fn to_backend_topic(topic: &str) -> String {
    let mut out = String::with_capacity(topic.len() + 4);
    for (i, level) in topic.split('/').enumerate() {
        if i > 0 {
            out.push('.');
        }
        escape_level(level, &mut out);
    }
    out
}

/// The MQTT topic of backend topic `topic`, `None` if it is not one [`to_backend_topic`] makes.
pub fn from_backend_topic(topic: &str) -> Option<String> {
    let mut levels = Vec::new();
    for level in topic.split('.') {
        if level == "~" {
            levels.push(String::new());
            continue;
        }
        let mut bytes = Vec::with_capacity(level.len());
        let mut rest = level.as_bytes();
        while let Some((&b, tail)) = rest.split_first() {
            if b == b'~' {
                let hex = tail.get(..2)?;
                let s = std::str::from_utf8(hex).ok()?;
                bytes.push(u8::from_str_radix(s, 16).ok()?);
                rest = tail.get(2..)?;
            } else {
                bytes.push(b);
                rest = tail;
            }
        }
        levels.push(String::from_utf8(bytes).ok()?);
    }
    let t = levels.join("/");
    (!t.is_empty()).then_some(t)
}

/// The backend filters that together match what MQTT `filter` matches.
pub fn backend_filters(filter: &str) -> Vec<String> {
    let levels: Vec<&str> = filter.split('/').collect();
    let mut out = String::new();
    for (i, level) in levels.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        match *level {
            "+" => out.push('*'),
            "#" => out.push('#'),
            l => escape_level(l, &mut out),
        }
    }
    if levels.len() > 1 && levels.last() == Some(&"#") {
        // MQTT's `a/#` also matches `a`; the portable `a.#` needs a level after `a`.
        let parent = out
            .strip_suffix(".#")
            .map(str::to_string)
            .unwrap_or_default();
        vec![out, parent]
    } else {
        vec![out]
    }
}

/// A Ferry message's metadata as carried in [`META_HEADER`].
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct Meta {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    headers: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    producer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_hex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timestamp_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    deliver_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    priority: Option<u8>,
}

fn priority_from(p: u8) -> Priority {
    match p {
        0 => Priority::Lowest,
        1 => Priority::Low,
        3 => Priority::High,
        4 => Priority::Highest,
        _ => Priority::Normal,
    }
}

/// A client's message as the backend carries it.
pub fn to_backend(topic: &str, m: &Message) -> (String, BackendMessage) {
    let meta = Meta {
        headers: m
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        producer: m.producer_id().map(str::to_string),
        key_hex: m.key().map(|k| crate::mqtt::convert::to_hex(k)),
        timestamp_ms: Some(unix_ms(m.timestamp())),
        expires_at_ms: m.expires_at().map(unix_ms),
        deliver_at_ms: m.deliver_at().map(unix_ms),
        priority: (m.priority() != Priority::Normal).then_some(m.priority() as u8),
    };
    let mut b = BackendMessage::new(m.payload().clone()).with_id(m.id().to_string());
    if let Some(k) = m.key() {
        b = b.with_key(String::from_utf8_lossy(k).into_owned());
    }
    // Serializing plain strings and numbers cannot fail.
    if let Ok(json) = serde_json::to_string(&meta) {
        b = b.with_header(META_HEADER, json);
    }
    (to_backend_topic(topic), b)
}

/// A backend message as a local engine message. Messages without Ferry metadata (published by
/// other clients of the backend) keep their payload, headers and key.
pub fn from_backend(b: &BackendMessage) -> Message {
    let mut builder = Message::builder().payload(b.payload.clone());
    if let Ok(uuid) = b.id.parse() {
        builder = builder.id(MessageId::from_uuid(uuid));
    }
    let meta = b
        .header(META_HEADER)
        .and_then(|j| serde_json::from_str::<Meta>(j).ok());
    match meta {
        Some(meta) => {
            for (k, v) in meta.headers {
                builder = builder.append_header(k, v);
            }
            if let Some(p) = meta.producer {
                builder = builder.producer(p);
            }
            if let Some(k) = meta
                .key_hex
                .as_deref()
                .and_then(crate::mqtt::convert::from_hex)
            {
                builder = builder.key(k);
            }
            if let Some(t) = meta.timestamp_ms {
                builder = builder.timestamp(from_unix_ms(t));
            }
            if let Some(t) = meta.expires_at_ms {
                builder = builder.expires_at(from_unix_ms(t));
            }
            if let Some(t) = meta.deliver_at_ms {
                builder = builder.deliver_at(from_unix_ms(t));
            }
            if let Some(p) = meta.priority {
                builder = builder.priority(priority_from(p));
            }
        }
        None => {
            for (k, v) in &b.headers {
                if !k.starts_with("ferry-") {
                    builder = builder.append_header(k.clone(), v.clone());
                }
            }
            if let Some(k) = &b.key {
                builder = builder.key(k.clone().into_bytes());
            }
        }
    }
    builder.build()
}

/// This server's node id: `configured`, else the one kept in `data_dir` (made on first start),
/// else a fresh one (in memory, a new node each start).
pub fn node_id(
    configured: Option<&str>,
    data_dir: Option<&std::path::Path>,
) -> std::io::Result<String> {
    if let Some(id) = configured {
        return Ok(id.to_string());
    }
    let fresh = || uuid_like();
    let Some(dir) = data_dir else {
        return Ok(fresh());
    };
    let path = dir.join("node-id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Ok(_) | Err(_) => {
            let id = fresh();
            crate::fsutil::write_atomic(&path, id.as_bytes())?;
            Ok(id)
        }
    }
}

fn uuid_like() -> String {
    format!("{:016x}{:08x}", fastrand::u64(..), fastrand::u32(..))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip() {
        for t in [
            "a",
            "a/b/c",
            "/a",
            "a//b",
            "a/",
            "sensor.1/temp",
            "x y/z~q",
            "ünï/cödé",
            "a/*/>",
            "$foo/bar",
            "$JS/API/STREAM/DELETE/x",
            "a/$b/c$",
        ] {
            let b = to_backend_topic(t);
            assert!(
                !b.split('.').any(|l| l.is_empty()
                    || l.starts_with('$')
                    || l.contains(['*', '>', '#', ' '])),
                "{t} -> {b}"
            );
            assert_eq!(from_backend_topic(&b).as_deref(), Some(t), "{t} -> {b}");
        }
        assert_eq!(to_backend_topic("a/b"), "a.b");
        assert_eq!(to_backend_topic("$JS/API"), "~24JS.API");
        assert_eq!(to_backend_topic("a$/b"), "a$.b");
        assert_eq!(backend_filters("$foo/#"), vec!["~24foo.#", "~24foo"]);
        assert_eq!(from_backend_topic("a.~2"), None);
        assert_eq!(from_backend_topic("a.~zz"), None);
    }

    #[test]
    fn filters_map_to_portable_filters() {
        assert_eq!(backend_filters("a/+/c"), vec!["a.*.c"]);
        assert_eq!(backend_filters("a/#"), vec!["a.#", "a"]);
        assert_eq!(backend_filters("#"), vec!["#"]);
        assert_eq!(backend_filters("a.b/c"), vec!["a~2Eb.c"]);
    }

    #[test]
    fn messages_round_trip() {
        let m = Message::builder()
            .payload("hello")
            .header("h", "1")
            .append_header("h", "2")
            .key("k1")
            .producer("client-7")
            .priority(Priority::High)
            .ttl(Duration::from_secs(60))
            .build();
        let (topic, b) = to_backend("a/b", &m);
        assert_eq!(topic, "a.b");
        let back = from_backend(&b);
        assert_eq!(back.id(), m.id());
        assert_eq!(back.payload(), m.payload());
        assert_eq!(back.headers(), m.headers());
        assert_eq!(back.key(), m.key());
        assert_eq!(back.producer_id(), Some("client-7"));
        assert_eq!(back.priority(), Priority::High);
        assert_eq!(back.expires_at().map(unix_ms), m.expires_at().map(unix_ms));
        assert_eq!(unix_ms(back.timestamp()), unix_ms(m.timestamp()));
    }

    #[test]
    fn foreign_messages_keep_payload_and_headers() {
        let b = BackendMessage::new("x")
            .with_header("trace", "t1")
            .with_header("ferry-dlq-reason", "r")
            .with_key("k");
        let m = from_backend(&b);
        assert_eq!(&m.payload()[..], b"x");
        assert_eq!(m.header("trace"), Some("t1"));
        assert_eq!(m.header("ferry-dlq-reason"), None);
        assert_eq!(m.key().map(|k| &k[..]), Some(&b"k"[..]));
    }

    #[test]
    fn group_names_are_stable_and_safe() {
        let a = share_group_name("workers", "jobs/+");
        assert_eq!(a, share_group_name("workers", "jobs/+"));
        assert_ne!(a, share_group_name("workers", "jobs/#"));
        assert!(a
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
    }

    #[test]
    fn node_ids_persist_in_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let a = node_id(None, Some(dir.path())).unwrap();
        assert_eq!(node_id(None, Some(dir.path())).unwrap(), a);
        assert_eq!(node_id(Some("n1"), Some(dir.path())).unwrap(), "n1");
        assert_ne!(node_id(None, None).unwrap(), node_id(None, None).unwrap());
    }
}
