//! `ferry serve` configuration: a TOML file, `FERRY_*` environment variables and command-line
//! flags, resolved with the precedence flags > environment > file > defaults.
//!
//! The file is a full [`ServeConfig`] in TOML where every key is optional:
//!
//! ```toml
//! data_dir = "./ferry-data"   # durable topics (Broker::open); ignored with memory = true
//! memory = false              # in-memory broker, nothing on disk
//! segment_bytes = 67108864    # commit log segment files roll at this size (at least 1 MiB)
//! log_format = "text"         # or "json"
//! # backend = "nats://127.0.0.1:4222"  # serve over a shared engine (see the bridge module)
//! # node_id = "ferry-1"                # this server's name on it (default: kept in data_dir)
//! shutdown_timeout_secs = 10
//!
//! [mqtt]
//! listen = "0.0.0.0:1883"
//! allow_anonymous = true
//! max_connections = 10000
//! max_connections_per_address = 1000   # 0: no per-address limit
//! max_packet_size = 1048576
//! max_inflight = 64           # outbound QoS>0 in flight per connection, and the receive maximum
//! max_queued = 10000          # messages queued for an offline persistent session
//! max_queued_bytes = 67108864 # bytes taken for a connection and not yet written to its socket
//! slow_consumer = "disconnect" # past max_queued_bytes; or "drop_oldest" (QoS 0 dropped)
//! max_subscriptions_per_connection = 1000   # 0: no limit
//! topic_alias_maximum = 64
//! max_session_expiry_secs = 86400
//! max_keep_alive_secs = 3600
//! connect_timeout_secs = 10
//! tcp_keepalive_secs = 60     # TCP keepalive probes on accepted sockets (0: off)
//! # MQTT over TLS on a second listener, when both PEM files are given:
//! tls_listen = "0.0.0.0:8883"
//! tls_cert = "/etc/ferry/cert.pem"   # certificate chain
//! tls_key = "/etc/ferry/key.pem"     # PKCS#8, PKCS#1 or SEC1 private key
//! tls_handshake_timeout_secs = 10    # a TLS handshake within this, or the connection closes
//! # Users, each with optional topic ACLs (MQTT wildcards; %u = user name, %c = client id;
//! # a list that is absent allows everything, an empty list nothing):
//! users = [{ username = "alice", password_hash = "$argon2id$v=19$...",
//!            publish = ["users/%u/#"], subscribe = ["users/%u/#", "public/#"] }]
//!
//! [mqtt.anonymous]            # the ACL of clients without a user name (default: everything)
//! publish = []
//! subscribe = ["public/#"]
//!
//! [http]
//! enabled = true
//! listen = "0.0.0.0:8080"     # also serves MQTT over WebSocket at /mqtt
//! tls_cert = "/etc/ferry/cert.pem"   # both set: HTTPS (and wss://) instead of HTTP
//! tls_key = "/etc/ferry/key.pem"
//! tls_handshake_timeout_secs = 10
//! header_read_timeout_secs = 10      # a request head (and keep-alive idle) within this
//! request_timeout_secs = 30          # head to response; then 408
//! max_body_bytes = 2097152           # bigger bodies: 413
//! max_connections = 1024             # then 503 at once
//! max_connections_per_address = 256
//!
//! [broker]
//! topic_capacity = 100000
//! topic_max_bytes = 67108864 # bytes of unconsumed records a topic holds in memory
//! overflow = "drop_oldest"   # or "block", "reject"
//! max_topics = 1000000       # topics that may exist (stored or in memory)
//! ```
//!
//! Every key is also an environment variable, `FERRY_` and the dotted key in capitals with `_`
//! for `.` (`mqtt.max_connections` is `FERRY_MQTT_MAX_CONNECTIONS`), and a flag,
//! `--set mqtt.max_connections=100` (the common ones have flags of their own); lists (users,
//! ACLs) are set in the file only. [`settings`] lists them all; `docs/settings.md` is the
//! reference. `FERRY_CONFIG` names the file when `--config` is not given. Unknown `FERRY_*`
//! variables are reported as warnings at start ([`Resolved::warnings`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::acl::AclConfig;

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for a [`ServeConfig`].
    #[error("parsing config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: Box<toml::de::Error>,
    },
    /// A value given by an environment variable or a flag is not valid for its setting.
    #[error("{origin}={value:?}: {reason}")]
    Override {
        /// The variable or flag.
        origin: String,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// A setting is out of range.
    #[error("invalid setting {key}: {reason}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format {other:?} (expected text or json)"
            )),
        }
    }
}

/// What a full topic does with a publish (mirrors [`ferry::Overflow`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    /// Publishers wait for space.
    Block,
    /// Publishes that do not fit are refused.
    Reject,
    /// The oldest records make room (slow subscribers count them as dropped). The server's
    /// default: one slow MQTT subscriber must not stall every publisher.
    #[default]
    DropOldest,
}

impl From<OverflowPolicy> for ferry::Overflow {
    fn from(p: OverflowPolicy) -> Self {
        match p {
            OverflowPolicy::Block => ferry::Overflow::Block,
            OverflowPolicy::Reject => ferry::Overflow::Reject,
            OverflowPolicy::DropOldest => ferry::Overflow::DropOldest,
        }
    }
}

/// What a connection does when the messages queued for its socket pass
/// [`MqttConfig::max_queued_bytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowConsumerPolicy {
    /// The connection is closed (MQTT 5: DISCONNECT with Quota exceeded, 0x97); a persistent
    /// session keeps its position, and its unacknowledged messages come again.
    #[default]
    Disconnect,
    /// The oldest queued QoS 0 messages are dropped (counted); if the queue still does not fit
    /// (QoS 1/2 messages and acknowledgements), the connection is closed as with `disconnect`.
    DropOldest,
}

/// A user allowed to connect over MQTT, with its topic ACL (see [`crate::acl`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// The user name.
    pub username: String,
    /// An argon2 PHC string (`ferry hash-password` prints one).
    pub password_hash: String,
    /// Topic patterns the user may publish to (absent: any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<Vec<String>>,
    /// Topic filter patterns the user may subscribe to (absent: any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<Vec<String>>,
    /// An administrator: the HTTP stats, metrics and dashboard show it every topic and the
    /// server's totals, whatever its `subscribe` patterns (which still govern consuming).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
}

/// A certificate chain and private key, PEM files, for a TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}

/// Both paths or neither; `key` names the setting in errors.
fn tls_files(
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
    setting: &'static str,
) -> Result<Option<TlsFiles>, ConfigError> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        })),
        (None, None) => Ok(None),
        _ => Err(ConfigError::Invalid {
            key: setting,
            reason: "tls_cert and tls_key must be given together".into(),
        }),
    }
}

/// The MQTT listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Whether clients without a user name may connect.
    pub allow_anonymous: bool,
    /// Most simultaneous connections; more are refused with Server busy / Server unavailable.
    pub max_connections: usize,
    /// Most simultaneous connections from one client IP address, over every MQTT listener
    /// (TCP, TLS, WebSocket); more are refused with Quota exceeded (0x97, MQTT 5) / Server
    /// unavailable (0x03, MQTT 3.1.1). 0: no per-address limit.
    pub max_connections_per_address: usize,
    /// Largest packet accepted (bytes, fixed header included); bigger ones end the connection
    /// with Packet too large (0x95).
    pub max_packet_size: usize,
    /// Outbound QoS 1/2 messages in flight per connection (also capped by the client's receive
    /// maximum), and the receive maximum announced to clients for inbound QoS 2.
    pub max_inflight: u16,
    /// Messages queued for an offline persistent session; a session whose backlog grows past it
    /// is expired (its subscriptions removed) with a warning.
    pub max_queued: u64,
    /// Bytes of packets (messages taken from the engine for the connection, acknowledgements)
    /// queued for a connection's socket and not yet written to it; past it `slow_consumer`
    /// applies (a packet is always queued when the queue is empty, so a message bigger than
    /// this is still sent alone). The backlog a client has not taken yet stays in the engine (bounded per topic by
    /// `broker.topic_max_bytes` in memory, on disk for durable topics).
    pub max_queued_bytes: usize,
    /// What a connection whose queue passes `max_queued_bytes` does.
    pub slow_consumer: SlowConsumerPolicy,
    /// Most subscriptions (topic filters, shared ones included) one session holds; a SUBSCRIBE
    /// filter past it is refused with Quota exceeded (0x97, MQTT 5) / Failure (0x80, MQTT
    /// 3.1.1) while the other filters of the packet are granted and the connection stays. 0: no
    /// limit.
    pub max_subscriptions_per_connection: usize,
    /// Topic Alias Maximum announced to MQTT 5 clients (0 disables inbound aliases).
    pub topic_alias_maximum: u16,
    /// Cap on the session expiry interval clients ask for (seconds). MQTT 3.1.1 persistent
    /// sessions use this value.
    pub max_session_expiry_secs: u32,
    /// Cap on keep alive (seconds). A client asking for more, or for 0 (never time out), gets
    /// this value: an MQTT 5 client is told so (Server Keep Alive in the CONNACK); an MQTT 3.1.1
    /// client, which cannot be told, is accepted and closed after 1.5 times this long without a
    /// packet. 0: no cap (a client asking 0 is never timed out).
    pub max_keep_alive_secs: u16,
    /// How long a new connection may take to send its whole CONNECT (seconds; a connection
    /// that sends part of it, or dribbles it, is closed then).
    pub connect_timeout_secs: u64,
    /// TCP keepalive on accepted MQTT sockets (TCP and TLS listeners): idle seconds before the
    /// first probe (then a probe every 10 s, the peer dropped after 3 unanswered), so that the
    /// sockets of peers that vanished are closed by the kernel. 0: off.
    pub tcp_keepalive_secs: u64,
    /// Address of the MQTT-over-TLS listener (used when `tls_cert` and `tls_key` are set).
    pub tls_listen: SocketAddr,
    /// PEM certificate chain of the TLS listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the TLS listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// How long a connection to the TLS listener may take to complete its TLS handshake
    /// (seconds); then it is closed. Until then it counts against `max_connections` and
    /// `max_connections_per_address`, which are checked as the connection is accepted: one
    /// past either is closed before its handshake.
    pub tls_handshake_timeout_secs: u64,
    /// The ACL of anonymous clients (default: everything allowed).
    pub anonymous: AclConfig,
    /// Users (argon2 hashes) and their ACLs.
    pub users: Vec<UserConfig>,
}

impl MqttConfig {
    /// The TLS listener's files, if TLS is configured.
    pub fn tls(&self) -> Result<Option<TlsFiles>, ConfigError> {
        tls_files(&self.tls_cert, &self.tls_key, "mqtt.tls_cert")
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            allow_anonymous: true,
            max_connections: 10_000,
            max_connections_per_address: 1_000,
            max_packet_size: 1 << 20,
            max_inflight: 64,
            max_queued: 10_000,
            max_queued_bytes: 64 << 20,
            slow_consumer: SlowConsumerPolicy::Disconnect,
            max_subscriptions_per_connection: 1_000,
            topic_alias_maximum: 64,
            max_session_expiry_secs: 86_400,
            max_keep_alive_secs: 3_600,
            connect_timeout_secs: 10,
            tcp_keepalive_secs: 60,
            tls_listen: SocketAddr::from(([0, 0, 0, 0], 8883)),
            tls_cert: None,
            tls_key: None,
            tls_handshake_timeout_secs: 10,
            anonymous: AclConfig::default(),
            users: Vec::new(),
        }
    }
}

/// The HTTP admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Whether to serve it.
    pub enabled: bool,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// PEM certificate chain: with `tls_key`, the listener speaks HTTPS (and `wss://`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// How long an HTTPS connection may take to complete its TLS handshake (seconds); then it
    /// is closed. It holds its place in `max_connections` and `max_connections_per_address`
    /// meanwhile.
    pub tls_handshake_timeout_secs: u64,
    /// How long the server waits for a request's head to be complete (seconds): counted from
    /// the connection's start, and on a kept-alive connection from the previous response, so
    /// it also bounds how long an idle keep-alive connection stays open. A connection that has
    /// not sent a whole head in time (slowloris) is closed.
    pub header_read_timeout_secs: u64,
    /// How long a request may take from its head to its response (reading the body included,
    /// seconds); past it the answer is 408 `request_timeout`. A group fetch may take its own
    /// `wait_ms` (at most 30 s) on top. Upgraded WebSocket connections are not subject to it.
    pub request_timeout_secs: u64,
    /// Largest request body (bytes); a bigger one is answered 413 `payload_too_large`.
    pub max_body_bytes: usize,
    /// Most simultaneous HTTP connections (WebSocket connections at `/mqtt` included); past
    /// it a new connection is answered 503 `too_many_connections` (over HTTPS: closed) at once.
    pub max_connections: usize,
    /// Most simultaneous HTTP connections from one IP address; past it, the same refusal.
    pub max_connections_per_address: usize,
    /// Which topics `/metrics` gives series of their own (`ferry_topic_*`): `"top"`, the
    /// loaded topics with the most records stored, at most `metrics_topic_limit` of them; or
    /// `"none"`. Server totals are always there, under their own names.
    pub metrics_topics: MetricsTopics,
    /// The most topics with series of their own in `/metrics` (1..=10000).
    pub metrics_topic_limit: usize,
}

/// Which topics get series of their own in `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MetricsTopics {
    /// None: server totals only.
    None,
    /// The topics with the most records stored (then the most published).
    #[default]
    Top,
}

impl HttpConfig {
    /// The TLS files, if HTTPS is configured.
    pub fn tls(&self) -> Result<Option<TlsFiles>, ConfigError> {
        tls_files(&self.tls_cert, &self.tls_key, "http.tls_cert")
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            tls_cert: None,
            tls_key: None,
            tls_handshake_timeout_secs: 10,
            header_read_timeout_secs: 10,
            request_timeout_secs: 30,
            max_body_bytes: 2 << 20,
            max_connections: 1024,
            max_connections_per_address: 256,
            metrics_topics: MetricsTopics::Top,
            metrics_topic_limit: 100,
        }
    }
}

/// Engine settings the server applies to every topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerSection {
    /// Unconsumed records a topic holds before `overflow` applies.
    pub topic_capacity: usize,
    /// Bytes of unconsumed records (by message size) a topic holds in memory before `overflow`
    /// applies; a durable topic's in-memory window is at most this too (older records are read
    /// back from disk). 0: no byte bound.
    pub topic_max_bytes: usize,
    /// What a full topic does.
    pub overflow: OverflowPolicy,
    /// Topics that may exist, stored or in memory (topics unloaded while idle count); a publish
    /// that would create one more is refused (MQTT 5: Quota exceeded; HTTP 507).
    pub max_topics: usize,
    /// Bytes of records all topics together hold in memory: past it a publish to an in-memory
    /// topic is refused (MQTT 5 Quota exceeded; HTTP 429 `memory_limit`), while a durable topic
    /// gives up the oldest records of its in-memory window (they are on disk) instead. 0: no
    /// bound.
    pub memory_limit_bytes: usize,
    /// With a data directory: a stored topic whose records are all gone (retention, purge)
    /// and that nothing holds is forgotten (it leaves the catalog and `max_topics`; published
    /// to again it is a new topic from offset 0).
    pub forget_empty_topics: bool,
}

impl Default for BrokerSection {
    fn default() -> Self {
        BrokerSection {
            topic_capacity: 100_000,
            topic_max_bytes: 64 << 20,
            overflow: OverflowPolicy::DropOldest,
            max_topics: 1_000_000,
            memory_limit_bytes: 1 << 30,
            forget_empty_topics: true,
        }
    }
}

/// The smallest `segment_bytes` accepted: every segment costs three open files, so a smaller
/// size would multiply the open files and index look-ups for no gain.
pub const MIN_SEGMENT_BYTES: u64 = 1 << 20;

/// Everything `ferry serve` needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Data directory of the durable broker.
    pub data_dir: PathBuf,
    /// In-memory broker instead (nothing written to disk).
    pub memory: bool,
    /// Segment files of the data directory's commit log roll at this size (bytes, at least
    /// [`MIN_SEGMENT_BYTES`]). Default 64 MiB.
    pub segment_bytes: u64,
    /// Log format.
    pub log_format: LogFormat,
    /// How long graceful shutdown waits for subscribers to drain.
    pub shutdown_timeout_secs: u64,
    /// The MQTT listener.
    pub mqtt: MqttConfig,
    /// The HTTP API.
    pub http: HttpConfig,
    /// Engine settings.
    pub broker: BrokerSection,
    /// Serve over a distributed engine (`nats://`, `amqp://`, `kafka://`) shared with other
    /// servers, instead of this server's engine alone ([`crate::bridge`]).
    pub backend: Option<String>,
    /// This server's name among the servers sharing a backend (default: kept in the data
    /// directory, made on first start).
    pub node_id: Option<String>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            data_dir: PathBuf::from("./ferry-data"),
            memory: false,
            segment_bytes: ferry::disk::DiskConfig::default().segment_bytes,
            log_format: LogFormat::Text,
            shutdown_timeout_secs: 10,
            mqtt: MqttConfig::default(),
            http: HttpConfig::default(),
            broker: BrokerSection::default(),
            backend: None,
            node_id: None,
        }
    }
}

/// The environment variable naming the config file.
pub const CONFIG_ENV: &str = "FERRY_CONFIG";

/// `FERRY_*` variables that are not settings: the config file, the log filter, and those of the
/// `ferry` clients and of Ferry's own test suite. Start-up does not warn about them.
pub const OTHER_ENV: &[&str] = &[
    CONFIG_ENV,
    "FERRY_LOG",
    "FERRY_URL",
    "FERRY_USER",
    "FERRY_PASSWORD",
    "FERRY_REQUIRE_SERVICES",
    "FERRY_NATS_URL",
    "FERRY_REDIS_URL",
    "FERRY_AMQP_URL",
    "FERRY_KAFKA_URL",
    "FERRY_BIN",
    "FERRY_CHROMIUM",
    "FERRY_CRASH_CYCLES",
    "FERRY_CRASH_SEED",
];

/// Earlier names of a few variables, still read (with a warning) so that existing deployments
/// keep working; the setting's own name wins when both are set.
const LEGACY_ENV: &[(&str, &str)] = &[
    ("FERRY_ALLOW_ANONYMOUS", "mqtt.allow_anonymous"),
    ("FERRY_MAX_CONNECTIONS", "mqtt.max_connections"),
    ("FERRY_MAX_PACKET_SIZE", "mqtt.max_packet_size"),
    ("FERRY_MAX_INFLIGHT", "mqtt.max_inflight"),
    ("FERRY_MAX_QUEUED", "mqtt.max_queued"),
];

/// Settings whose default is "not set", so they are absent from the default configuration's
/// TOML; all are strings (paths, a URL, a name).
const UNSET_BY_DEFAULT: &[&str] = &[
    "backend",
    "node_id",
    "mqtt.tls_cert",
    "mqtt.tls_key",
    "http.tls_cert",
    "http.tls_key",
];

/// The TOML type of a setting's value, which says how a variable's or flag's text is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettingKind {
    /// `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`).
    Bool,
    /// A whole number.
    Integer,
    /// A number.
    Float,
    /// Text: addresses, paths, names and choices such as `log_format`.
    Text,
}

/// One setting of [`ServeConfig`]: a TOML key such as `mqtt.max_connections`, which is also
/// the environment variable `FERRY_MQTT_MAX_CONNECTIONS` and the flag
/// `--set mqtt.max_connections=N`. Lists (users, ACL patterns) are set in the file only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// The dotted TOML key.
    pub key: String,
    /// Its environment variable.
    pub env: String,
    /// How its text is read.
    pub kind: SettingKind,
    /// Its default as TOML text (`None`: not set).
    pub default: Option<String>,
}

/// The environment variable of a dotted key: `FERRY_` and the key in capitals with `_` for `.`.
pub fn env_name(key: &str) -> String {
    format!("FERRY_{}", key.replace('.', "_").to_ascii_uppercase())
}

/// Every setting, in key order, read off the default configuration (so a field added to a
/// section is a setting at once).
pub fn settings() -> Vec<Setting> {
    fn walk(table: &toml::Table, prefix: &str, out: &mut Vec<Setting>) {
        for (name, value) in table {
            let key = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            let kind = match value {
                toml::Value::Table(t) => {
                    walk(t, &key, out);
                    continue;
                }
                toml::Value::Array(_) => continue,
                toml::Value::Boolean(_) => SettingKind::Bool,
                toml::Value::Integer(_) => SettingKind::Integer,
                toml::Value::Float(_) => SettingKind::Float,
                toml::Value::String(_) | toml::Value::Datetime(_) => SettingKind::Text,
            };
            out.push(Setting {
                env: env_name(&key),
                default: Some(value.to_string()),
                key,
                kind,
            });
        }
    }
    let mut out = Vec::new();
    if let Ok(toml::Value::Table(defaults)) = toml::Value::try_from(ServeConfig::default()) {
        walk(&defaults, "", &mut out);
    }
    out.extend(UNSET_BY_DEFAULT.iter().map(|key| Setting {
        key: (*key).to_string(),
        env: env_name(key),
        kind: SettingKind::Text,
        default: None,
    }));
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// A value for a setting given outside the file: by an environment variable or a flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    /// The dotted key (see [`settings`]).
    pub key: String,
    /// The value's text.
    pub value: String,
    /// Where it came from, for messages: `FERRY_X` or `--flag`.
    pub origin: String,
}

impl Override {
    /// A flag's value for `key`.
    pub fn flag(key: &str, value: impl Into<String>, flag: &str) -> Override {
        Override {
            key: key.to_string(),
            value: value.into(),
            origin: flag.to_string(),
        }
    }

    /// `--set KEY=VALUE`.
    pub fn parse_set(text: &str) -> Result<Override, String> {
        let (key, value) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
        Ok(Override::flag(
            key.trim(),
            value,
            &format!("--set {}", key.trim()),
        ))
    }
}

/// The configuration and what start-up should warn about (unknown or renamed `FERRY_*`
/// variables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The configuration.
    pub config: ServeConfig,
    /// One line per warning.
    pub warnings: Vec<String>,
}

/// The overrides set by `FERRY_*` variables among `vars`, and warnings about the variables that
/// are not settings or that use a former name. Empty values are ignored.
pub fn env_overrides<I, K, V>(vars: I) -> (Vec<Override>, Vec<String>)
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let known = settings();
    let mut current = Vec::new();
    let mut legacy = Vec::new();
    let mut warnings = Vec::new();
    for (k, v) in vars {
        let (k, v) = (k.as_ref(), v.as_ref());
        if !k.starts_with("FERRY_") || OTHER_ENV.contains(&k) {
            continue;
        }
        if let Some(s) = known.iter().find(|s| s.env == k) {
            if !v.trim().is_empty() {
                current.push(Override::flag(&s.key, v.trim(), k));
            }
        } else if let Some((_, key)) = LEGACY_ENV.iter().find(|(name, _)| *name == k) {
            warnings.push(format!(
                "{k} is a former name of {}; it still works, but use that instead",
                env_name(key)
            ));
            if !v.trim().is_empty() {
                legacy.push(Override::flag(key, v.trim(), k));
            }
        } else {
            warnings.push(format!(
                "ignoring the environment variable {k}: no setting has that name (see the \
                 settings reference; `ferry serve --print-config` shows every key)"
            ));
        }
    }
    // Former names first, so that a setting's own variable wins.
    legacy.extend(current);
    (legacy, warnings)
}

/// Reads `text` as a value of `kind`.
fn typed_value(kind: SettingKind, text: &str) -> Result<toml::Value, String> {
    let text = text.trim();
    match kind {
        SettingKind::Bool => match text.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(toml::Value::Boolean(true)),
            "0" | "false" | "no" | "off" => Ok(toml::Value::Boolean(false)),
            _ => Err("expected true/false".into()),
        },
        SettingKind::Integer => text
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|e| format!("expected a whole number: {e}")),
        SettingKind::Float => text
            .parse::<f64>()
            .map(toml::Value::Float)
            .map_err(|e| format!("expected a number: {e}")),
        SettingKind::Text => Ok(toml::Value::String(text.to_string())),
    }
}

/// Writes `value` at the dotted `key` of `root`, creating the sections on the way.
fn set_key(root: &mut toml::Table, key: &str, value: toml::Value) -> Result<(), String> {
    let mut table = root;
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            table.insert(part.to_string(), value);
            return Ok(());
        }
        let entry = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(format!("{part} is not a section")),
        };
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.to_path_buf(),
        source: e,
    })
}

impl ServeConfig {
    /// Parses a TOML document (missing keys take their defaults; unknown keys are errors).
    pub fn from_toml(text: &str, path: &Path) -> Result<ServeConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<ServeConfig, ConfigError> {
        ServeConfig::from_toml(&read_file(path)?, path)
    }

    /// Resolves the configuration: defaults, then the file (`file`, else `FERRY_CONFIG` from
    /// `env`, else none), then the `FERRY_*` variables of `env`, then `flags` in order; finally
    /// checks it.
    pub fn resolve<I, K, V>(
        file: Option<&Path>,
        env: I,
        flags: &[Override],
    ) -> Result<Resolved, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let env: Vec<(String, String)> = env
            .into_iter()
            .map(|(k, v)| (k.as_ref().to_string(), v.as_ref().to_string()))
            .collect();
        let env_file = env
            .iter()
            .find(|(k, v)| k == CONFIG_ENV && !v.trim().is_empty())
            .map(|(_, v)| PathBuf::from(v));
        let (mut root, mut config) = match file.map(Path::to_path_buf).or(env_file) {
            Some(path) => {
                let text = read_file(&path)?;
                // Parsed whole first, so that the file's own errors name the file.
                let config = ServeConfig::from_toml(&text, &path)?;
                let table = text
                    .parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse {
                        path: path.clone(),
                        source: Box::new(e),
                    })?;
                (table, config)
            }
            None => (toml::Table::new(), ServeConfig::default()),
        };
        let (from_env, warnings) = env_overrides(env.iter().map(|(k, v)| (k, v)));
        let known = settings();
        for o in from_env.iter().chain(flags) {
            let invalid = |reason: String| ConfigError::Override {
                origin: o.origin.clone(),
                value: o.value.clone(),
                reason,
            };
            let setting = known
                .iter()
                .find(|s| s.key == o.key)
                .ok_or_else(|| invalid(format!("{} is not a setting", o.key)))?;
            let value = typed_value(setting.kind, &o.value).map_err(invalid)?;
            set_key(&mut root, &o.key, value).map_err(invalid)?;
            // Each value is checked on its own so that an error names where it came from.
            config = toml::Value::Table(root.clone())
                .try_into()
                .map_err(|e: toml::de::Error| invalid(e.message().to_string()))?;
        }
        config.validate()?;
        Ok(Resolved { config, warnings })
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.mqtt;
        if m.max_packet_size < 64 || m.max_packet_size > 268_435_460 {
            return Err(ConfigError::Invalid {
                key: "mqtt.max_packet_size",
                reason: format!("{} is outside 64..=268435460", m.max_packet_size),
            });
        }
        if m.max_inflight == 0 {
            return Err(ConfigError::Invalid {
                key: "mqtt.max_inflight",
                reason: "must be at least 1".into(),
            });
        }
        if m.max_connections == 0 {
            return Err(ConfigError::Invalid {
                key: "mqtt.max_connections",
                reason: "must be at least 1".into(),
            });
        }
        if self.segment_bytes < MIN_SEGMENT_BYTES {
            return Err(ConfigError::Invalid {
                key: "segment_bytes",
                reason: format!(
                    "{} is below the minimum {MIN_SEGMENT_BYTES}",
                    self.segment_bytes
                ),
            });
        }
        if self.http.metrics_topic_limit == 0 || self.http.metrics_topic_limit > 10_000 {
            return Err(ConfigError::Invalid {
                key: "http.metrics_topic_limit",
                reason: format!("{} is outside 1..=10000", self.http.metrics_topic_limit),
            });
        }
        if self.broker.topic_capacity == 0 {
            return Err(ConfigError::Invalid {
                key: "broker.topic_capacity",
                reason: "must be at least 1".into(),
            });
        }
        let h = &self.http;
        for (key, v) in [
            (
                "mqtt.tls_handshake_timeout_secs",
                m.tls_handshake_timeout_secs,
            ),
            (
                "http.tls_handshake_timeout_secs",
                h.tls_handshake_timeout_secs,
            ),
            ("http.header_read_timeout_secs", h.header_read_timeout_secs),
            ("http.request_timeout_secs", h.request_timeout_secs),
            ("http.max_body_bytes", h.max_body_bytes as u64),
            ("http.max_connections", h.max_connections as u64),
            (
                "http.max_connections_per_address",
                h.max_connections_per_address as u64,
            ),
        ] {
            if v == 0 {
                return Err(ConfigError::Invalid {
                    key,
                    reason: "must be at least 1".into(),
                });
            }
        }
        if h.max_connections > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(ConfigError::Invalid {
                key: "http.max_connections",
                reason: format!("must be at most {}", tokio::sync::Semaphore::MAX_PERMITS),
            });
        }
        let tmb = self.broker.topic_max_bytes;
        if tmb != 0 && tmb < m.max_packet_size {
            return Err(ConfigError::Invalid {
                key: "broker.topic_max_bytes",
                reason: format!(
                    "{tmb} is below mqtt.max_packet_size ({}): such messages could never be stored",
                    m.max_packet_size
                ),
            });
        }
        let mlb = self.broker.memory_limit_bytes;
        if mlb != 0 && mlb < tmb.max(m.max_packet_size) {
            return Err(ConfigError::Invalid {
                key: "broker.memory_limit_bytes",
                reason: format!(
                    "{mlb} is below broker.topic_max_bytes or mqtt.max_packet_size: a single topic \
                     could not hold what it may"
                ),
            });
        }
        if self.broker.max_topics == 0 {
            return Err(ConfigError::Invalid {
                key: "broker.max_topics",
                reason: "must be at least 1".into(),
            });
        }
        m.tls()?;
        self.http.tls()?;
        for u in &m.users {
            if let Err(e) = argon2::PasswordHash::new(&u.password_hash) {
                return Err(ConfigError::Invalid {
                    key: "mqtt.users",
                    reason: format!("password_hash of {:?} is not a PHC string: {e}", u.username),
                });
            }
        }
        Ok(())
    }

    /// Graceful shutdown timeout.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_secs)
    }
}

/// The configuration as a TOML document (what `ferry serve --print-config` prints).
pub fn to_toml(config: &ServeConfig) -> Result<String, toml::ser::Error> {
    toml::to_string_pretty(config)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults() {
        let c = ServeConfig::resolve(None, Vec::<(String, String)>::new(), &[])
            .unwrap()
            .config;
        assert_eq!(c.mqtt.listen.port(), 1883);
        assert_eq!(c.http.listen.port(), 8080);
        assert_eq!(c.data_dir, PathBuf::from("./ferry-data"));
        assert!(!c.memory);
    }

    #[test]
    fn segment_bytes_has_a_minimum() {
        let c = ServeConfig::resolve(None, [("FERRY_SEGMENT_BYTES", "2097152")], &[])
            .unwrap()
            .config;
        assert_eq!(c.segment_bytes, 2 << 20);
        let e = ServeConfig::resolve(None, [("FERRY_SEGMENT_BYTES", "4096")], &[]).unwrap_err();
        assert!(e.to_string().contains("segment_bytes"), "{e}");
        let c = ServeConfig::from_toml("segment_bytes = 1048576\n", Path::new("x.toml")).unwrap();
        assert_eq!(c.segment_bytes, MIN_SEGMENT_BYTES);
    }

    #[test]
    fn bad_env_is_an_error() {
        let e =
            ServeConfig::resolve(None, [("FERRY_MQTT_MAX_CONNECTIONS", "many")], &[]).unwrap_err();
        assert!(e.to_string().contains("FERRY_MQTT_MAX_CONNECTIONS"), "{e}");
        let e = ServeConfig::resolve(None, [("FERRY_MAX_CONNECTIONS", "many")], &[]).unwrap_err();
        assert!(e.to_string().contains("FERRY_MAX_CONNECTIONS"), "{e}");
        let set = Override::parse_set("mqtt.listen=nowhere").unwrap();
        let e = ServeConfig::resolve(None, Vec::<(String, String)>::new(), &[set]).unwrap_err();
        assert!(e.to_string().contains("--set mqtt.listen"), "{e}");
        let set = Override::parse_set("mqtt.no_such_key=1").unwrap();
        let e = ServeConfig::resolve(None, Vec::<(String, String)>::new(), &[set]).unwrap_err();
        assert!(e.to_string().contains("not a setting"), "{e}");
        assert!(Override::parse_set("mqtt.listen").is_err());
    }

    #[test]
    fn acl_and_tls_keys_parse_and_print_back() {
        let text = r#"
[mqtt]
tls_listen = "127.0.0.1:8883"
tls_cert = "c.pem"
tls_key = "k.pem"
users = [{ username = "a", password_hash = "h", publish = ["u/%u/#"], subscribe = [] }]
[mqtt.anonymous]
subscribe = ["public/#"]
[http]
tls_cert = "c.pem"
tls_key = "k.pem"
"#;
        let c = ServeConfig::from_toml(text, Path::new("x.toml")).unwrap();
        assert_eq!(c.mqtt.users[0].publish, Some(vec!["u/%u/#".to_string()]));
        assert_eq!(c.mqtt.users[0].subscribe, Some(vec![]));
        assert_eq!(c.mqtt.anonymous.publish, None);
        assert!(c.mqtt.tls().unwrap().is_some());
        assert!(c.http.tls().unwrap().is_some());
        let back = ServeConfig::from_toml(&to_toml(&c).unwrap(), Path::new("y.toml")).unwrap();
        assert_eq!(back, c);
        let half =
            ServeConfig::from_toml("[http]\ntls_cert = \"c.pem\"\n", Path::new("z")).unwrap();
        assert!(half.validate().is_err());
    }

    #[test]
    fn every_key_is_a_variable_and_a_set_flag() {
        let all = settings();
        let find = |key: &str| all.iter().find(|s| s.key == key).unwrap().clone();
        assert_eq!(
            find("mqtt.max_connections").env,
            "FERRY_MQTT_MAX_CONNECTIONS"
        );
        assert_eq!(find("mqtt.max_connections").kind, SettingKind::Integer);
        assert_eq!(find("http.enabled").kind, SettingKind::Bool);
        assert_eq!(find("mqtt.tls_cert").default, None);
        assert_eq!(
            find("data_dir").default.as_deref(),
            Some("\"./ferry-data\"")
        );
        // Every key of a configuration with every optional value set is known, so a field
        // added without a default cannot escape the environment and `--set`.
        let mut full = ServeConfig {
            backend: Some("nats://x".into()),
            node_id: Some("n".into()),
            ..ServeConfig::default()
        };
        full.mqtt.tls_cert = Some("c".into());
        full.mqtt.tls_key = Some("k".into());
        full.http.tls_cert = Some("c".into());
        full.http.tls_key = Some("k".into());
        let mut printed = Vec::new();
        for line in to_toml(&full).unwrap().lines() {
            if let Some((k, v)) = line.split_once(" = ") {
                if !v.starts_with('[') {
                    printed.push(k.trim().to_string());
                }
            }
        }
        for k in printed {
            assert!(
                all.iter().any(|s| s.key.ends_with(&k)),
                "{k} is not a known setting"
            );
        }
        for s in &all {
            let env = [(s.env.as_str(), "")];
            let r = ServeConfig::resolve(None, env, &[]).unwrap();
            assert!(r.warnings.is_empty(), "{}: {:?}", s.env, r.warnings);
        }
    }

    #[test]
    fn env_and_set_values_override_in_order() {
        let env = [
            ("FERRY_MQTT_MAX_INFLIGHT", "9"),
            ("FERRY_HTTP_ENABLED", "off"),
            ("FERRY_MAX_QUEUED", "5"),
            ("FERRY_MQTT_MAX_QUEUED", "6"),
            ("FERRY_NO_SUCH_THING", "1"),
            ("FERRY_LOG", "debug"),
            ("PATH", "/bin"),
        ];
        let flags = [
            Override::parse_set("mqtt.max_inflight=11").unwrap(),
            Override::flag("mqtt.tls_listen", "127.0.0.1:9883", "--mqtt-tls-listen"),
        ];
        let r = ServeConfig::resolve(None, env, &flags).unwrap();
        assert_eq!(r.config.mqtt.max_inflight, 11);
        assert!(!r.config.http.enabled);
        assert_eq!(
            r.config.mqtt.max_queued, 6,
            "a setting's own name beats its former one"
        );
        assert_eq!(r.config.mqtt.tls_listen.port(), 9883);
        assert_eq!(r.warnings.len(), 2, "{:?}", r.warnings);
        assert!(r.warnings.iter().any(|w| w.contains("FERRY_NO_SUCH_THING")));
        assert!(r
            .warnings
            .iter()
            .any(|w| w.contains("FERRY_MQTT_MAX_QUEUED")));
    }

    #[test]
    fn stats_settings() {
        let c = ServeConfig::from_toml(
            "[http]\nmetrics_topics = \"none\"\nmetrics_topic_limit = 7\n\n[[mqtt.users]]\nusername = \"root\"\npassword_hash = \"h\"\nadmin = true\n",
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(c.http.metrics_topics, MetricsTopics::None);
        assert_eq!(c.http.metrics_topic_limit, 7);
        assert!(c.mqtt.users[0].admin);
        let d = ServeConfig::default();
        assert_eq!(
            (d.http.metrics_topics, d.http.metrics_topic_limit),
            (MetricsTopics::Top, 100)
        );
        for bad in [0, 10_001] {
            let text = format!("[http]\nmetrics_topic_limit = {bad}\n");
            let c = ServeConfig::from_toml(&text, Path::new("x.toml")).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("http.metrics_topic_limit"), "{e}");
        }
        assert!(
            ServeConfig::from_toml("[http]\nmetrics_topics = \"all\"\n", Path::new("x")).is_err()
        );
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = ServeConfig::from_toml("[mqtt]\nlisten_port = 3\n", Path::new("x.toml"));
        assert!(e.is_err());
    }

    #[test]
    fn http_limits_parse_and_zero_is_refused() {
        let c = ServeConfig::from_toml(
            "[http]\nheader_read_timeout_secs = 3\nrequest_timeout_secs = 4\nmax_body_bytes = 5\n\
             max_connections = 6\nmax_connections_per_address = 7\n",
            Path::new("x.toml"),
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            (
                c.http.header_read_timeout_secs,
                c.http.request_timeout_secs,
                c.http.max_body_bytes,
                c.http.max_connections,
                c.http.max_connections_per_address
            ),
            (3, 4, 5, 6, 7)
        );
        for key in [
            "header_read_timeout_secs",
            "request_timeout_secs",
            "max_body_bytes",
            "max_connections",
            "max_connections_per_address",
            "tls_handshake_timeout_secs",
        ] {
            let c = ServeConfig::from_toml(&format!("[http]\n{key} = 0\n"), Path::new("x.toml"))
                .unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("http.{key}")), "{e}");
        }
        let c = ServeConfig::from_toml(
            "[mqtt]\ntls_handshake_timeout_secs = 0\n",
            Path::new("x.toml"),
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("mqtt.tls_handshake_timeout_secs"), "{e}");
    }
}
