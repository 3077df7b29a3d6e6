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
//! max_packet_size = 1048576
//! max_inflight = 64           # outbound QoS>0 in flight per connection, and the receive maximum
//! max_queued = 10000          # messages queued for an offline persistent session
//! topic_alias_maximum = 64
//! max_session_expiry_secs = 86400
//! max_keep_alive_secs = 3600
//! connect_timeout_secs = 10
//! # MQTT over TLS on a second listener, when both PEM files are given:
//! tls_listen = "0.0.0.0:8883"
//! tls_cert = "/etc/ferry/cert.pem"   # certificate chain
//! tls_key = "/etc/ferry/key.pem"     # PKCS#8, PKCS#1 or SEC1 private key
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
//!
//! [broker]
//! topic_capacity = 100000
//! overflow = "drop_oldest"   # or "block", "reject"
//! ```
//!
//! Environment variables (each overrides one key): `FERRY_DATA_DIR`, `FERRY_MEMORY`,
//! `FERRY_SEGMENT_BYTES`, `FERRY_LOG_FORMAT`, `FERRY_SHUTDOWN_TIMEOUT_SECS`, `FERRY_MQTT_LISTEN`,
//! `FERRY_ALLOW_ANONYMOUS`, `FERRY_MAX_CONNECTIONS`, `FERRY_MAX_PACKET_SIZE`,
//! `FERRY_MAX_INFLIGHT`, `FERRY_MAX_QUEUED`, `FERRY_HTTP_LISTEN`, `FERRY_HTTP_ENABLED`,
//! `FERRY_MQTT_TLS_LISTEN`, `FERRY_MQTT_TLS_CERT`, `FERRY_MQTT_TLS_KEY`, `FERRY_HTTP_TLS_CERT`,
//! `FERRY_HTTP_TLS_KEY`;
//! `FERRY_CONFIG` names the file when `--config` is not given.

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
    /// An environment variable has a value of the wrong type.
    #[error("environment variable {var}={value:?}: {reason}")]
    Env {
        /// The variable.
        var: String,
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
    /// Largest packet accepted (bytes, fixed header included); bigger ones end the connection
    /// with Packet too large (0x95).
    pub max_packet_size: usize,
    /// Outbound QoS 1/2 messages in flight per connection (also capped by the client's receive
    /// maximum), and the receive maximum announced to clients for inbound QoS 2.
    pub max_inflight: u16,
    /// Messages queued for an offline persistent session; a session whose backlog grows past it
    /// is expired (its subscriptions removed) with a warning.
    pub max_queued: u64,
    /// Topic Alias Maximum announced to MQTT 5 clients (0 disables inbound aliases).
    pub topic_alias_maximum: u16,
    /// Cap on the session expiry interval clients ask for (seconds). MQTT 3.1.1 persistent
    /// sessions use this value.
    pub max_session_expiry_secs: u32,
    /// Cap on keep alive (seconds); a client asking for more (or 0) is told this value
    /// (MQTT 5 Server Keep Alive). 0: no cap.
    pub max_keep_alive_secs: u16,
    /// How long a new connection may take to send CONNECT.
    pub connect_timeout_secs: u64,
    /// Address of the MQTT-over-TLS listener (used when `tls_cert` and `tls_key` are set).
    pub tls_listen: SocketAddr,
    /// PEM certificate chain of the TLS listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the TLS listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
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
            max_packet_size: 1 << 20,
            max_inflight: 64,
            max_queued: 10_000,
            topic_alias_maximum: 64,
            max_session_expiry_secs: 86_400,
            max_keep_alive_secs: 0,
            connect_timeout_secs: 10,
            tls_listen: SocketAddr::from(([0, 0, 0, 0], 8883)),
            tls_cert: None,
            tls_key: None,
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
    /// What a full topic does.
    pub overflow: OverflowPolicy,
}

impl Default for BrokerSection {
    fn default() -> Self {
        BrokerSection {
            topic_capacity: 100_000,
            overflow: OverflowPolicy::DropOldest,
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

/// Settings that the environment or the command line may override, each `None` when not given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `data_dir`.
    pub data_dir: Option<PathBuf>,
    /// `memory`.
    pub memory: Option<bool>,
    /// `segment_bytes`.
    pub segment_bytes: Option<u64>,
    /// `log_format`.
    pub log_format: Option<LogFormat>,
    /// `shutdown_timeout_secs`.
    pub shutdown_timeout_secs: Option<u64>,
    /// `mqtt.listen`.
    pub mqtt_listen: Option<SocketAddr>,
    /// `mqtt.allow_anonymous`.
    pub allow_anonymous: Option<bool>,
    /// `mqtt.max_connections`.
    pub max_connections: Option<usize>,
    /// `mqtt.max_packet_size`.
    pub max_packet_size: Option<usize>,
    /// `mqtt.max_inflight`.
    pub max_inflight: Option<u16>,
    /// `mqtt.max_queued`.
    pub max_queued: Option<u64>,
    /// `http.listen`.
    pub http_listen: Option<SocketAddr>,
    /// `http.enabled`.
    pub http_enabled: Option<bool>,
    /// `mqtt.tls_listen`.
    pub mqtt_tls_listen: Option<SocketAddr>,
    /// `mqtt.tls_cert`.
    pub mqtt_tls_cert: Option<PathBuf>,
    /// `mqtt.tls_key`.
    pub mqtt_tls_key: Option<PathBuf>,
    /// `http.tls_cert`.
    pub http_tls_cert: Option<PathBuf>,
    /// `http.tls_key`.
    pub http_tls_key: Option<PathBuf>,
    /// `backend`.
    pub backend: Option<String>,
    /// `node_id`.
    pub node_id: Option<String>,
}

/// The environment variable naming the config file.
pub const CONFIG_ENV: &str = "FERRY_CONFIG";

fn env_parse<T: std::str::FromStr>(var: &str, value: &str) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    value.trim().parse::<T>().map_err(|e| ConfigError::Env {
        var: var.to_string(),
        value: value.to_string(),
        reason: e.to_string(),
    })
}

fn env_bool(var: &str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::Env {
            var: var.to_string(),
            value: value.to_string(),
            reason: "expected true/false".to_string(),
        }),
    }
}

impl Overrides {
    /// The overrides set by `FERRY_*` variables among `vars` (pass `std::env::vars()`); other
    /// variables are ignored, and so are empty values.
    pub fn from_env<I, K, V>(vars: I) -> Result<Overrides, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut o = Overrides::default();
        for (k, v) in vars {
            let (k, v) = (k.as_ref(), v.as_ref());
            if v.trim().is_empty() {
                continue;
            }
            match k {
                "FERRY_DATA_DIR" => o.data_dir = Some(PathBuf::from(v)),
                "FERRY_MEMORY" => o.memory = Some(env_bool(k, v)?),
                "FERRY_SEGMENT_BYTES" => o.segment_bytes = Some(env_parse(k, v)?),
                "FERRY_LOG_FORMAT" => o.log_format = Some(env_parse(k, v)?),
                "FERRY_SHUTDOWN_TIMEOUT_SECS" => o.shutdown_timeout_secs = Some(env_parse(k, v)?),
                "FERRY_MQTT_LISTEN" => o.mqtt_listen = Some(env_parse(k, v)?),
                "FERRY_ALLOW_ANONYMOUS" => o.allow_anonymous = Some(env_bool(k, v)?),
                "FERRY_MAX_CONNECTIONS" => o.max_connections = Some(env_parse(k, v)?),
                "FERRY_MAX_PACKET_SIZE" => o.max_packet_size = Some(env_parse(k, v)?),
                "FERRY_MAX_INFLIGHT" => o.max_inflight = Some(env_parse(k, v)?),
                "FERRY_MAX_QUEUED" => o.max_queued = Some(env_parse(k, v)?),
                "FERRY_HTTP_LISTEN" => o.http_listen = Some(env_parse(k, v)?),
                "FERRY_HTTP_ENABLED" => o.http_enabled = Some(env_bool(k, v)?),
                "FERRY_MQTT_TLS_LISTEN" => o.mqtt_tls_listen = Some(env_parse(k, v)?),
                "FERRY_MQTT_TLS_CERT" => o.mqtt_tls_cert = Some(PathBuf::from(v)),
                "FERRY_MQTT_TLS_KEY" => o.mqtt_tls_key = Some(PathBuf::from(v)),
                "FERRY_HTTP_TLS_CERT" => o.http_tls_cert = Some(PathBuf::from(v)),
                "FERRY_HTTP_TLS_KEY" => o.http_tls_key = Some(PathBuf::from(v)),
                "FERRY_BACKEND" => o.backend = Some(v.trim().to_string()),
                "FERRY_NODE_ID" => o.node_id = Some(v.trim().to_string()),
                _ => {}
            }
        }
        Ok(o)
    }

    /// Writes every override that is set into `config`.
    pub fn apply(&self, config: &mut ServeConfig) {
        fn set<T: Clone>(slot: &mut T, value: &Option<T>) {
            if let Some(v) = value {
                *slot = v.clone();
            }
        }
        set(&mut config.data_dir, &self.data_dir);
        set(&mut config.memory, &self.memory);
        set(&mut config.segment_bytes, &self.segment_bytes);
        if self.backend.is_some() {
            config.backend.clone_from(&self.backend);
        }
        if self.node_id.is_some() {
            config.node_id.clone_from(&self.node_id);
        }
        set(&mut config.log_format, &self.log_format);
        set(
            &mut config.shutdown_timeout_secs,
            &self.shutdown_timeout_secs,
        );
        set(&mut config.mqtt.listen, &self.mqtt_listen);
        set(&mut config.mqtt.allow_anonymous, &self.allow_anonymous);
        set(&mut config.mqtt.max_connections, &self.max_connections);
        set(&mut config.mqtt.max_packet_size, &self.max_packet_size);
        set(&mut config.mqtt.max_inflight, &self.max_inflight);
        set(&mut config.mqtt.max_queued, &self.max_queued);
        set(&mut config.http.listen, &self.http_listen);
        set(&mut config.http.enabled, &self.http_enabled);
        set(&mut config.mqtt.tls_listen, &self.mqtt_tls_listen);
        if self.mqtt_tls_cert.is_some() {
            config.mqtt.tls_cert.clone_from(&self.mqtt_tls_cert);
        }
        if self.mqtt_tls_key.is_some() {
            config.mqtt.tls_key.clone_from(&self.mqtt_tls_key);
        }
        if self.http_tls_cert.is_some() {
            config.http.tls_cert.clone_from(&self.http_tls_cert);
        }
        if self.http_tls_key.is_some() {
            config.http.tls_key.clone_from(&self.http_tls_key);
        }
    }
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
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            source: e,
        })?;
        ServeConfig::from_toml(&text, path)
    }

    /// Resolves the configuration: defaults, then the file (`file`, else `FERRY_CONFIG` from
    /// `env`, else none), then the `FERRY_*` variables of `env`, then `flags`; finally checks it.
    pub fn resolve<I, K, V>(
        file: Option<&Path>,
        env: I,
        flags: &Overrides,
    ) -> Result<ServeConfig, ConfigError>
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
        let mut config = match file.map(Path::to_path_buf).or(env_file) {
            Some(path) => ServeConfig::from_file(&path)?,
            None => ServeConfig::default(),
        };
        Overrides::from_env(env)?.apply(&mut config);
        flags.apply(&mut config);
        config.validate()?;
        Ok(config)
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
        let c = ServeConfig::resolve(None, Vec::<(String, String)>::new(), &Overrides::default())
            .unwrap();
        assert_eq!(c.mqtt.listen.port(), 1883);
        assert_eq!(c.http.listen.port(), 8080);
        assert_eq!(c.data_dir, PathBuf::from("./ferry-data"));
        assert!(!c.memory);
    }

    #[test]
    fn segment_bytes_has_a_minimum() {
        let c = ServeConfig::resolve(
            None,
            [("FERRY_SEGMENT_BYTES", "2097152")],
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.segment_bytes, 2 << 20);
        let e = ServeConfig::resolve(
            None,
            [("FERRY_SEGMENT_BYTES", "4096")],
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("segment_bytes"), "{e}");
        let c = ServeConfig::from_toml("segment_bytes = 1048576\n", Path::new("x.toml")).unwrap();
        assert_eq!(c.segment_bytes, MIN_SEGMENT_BYTES);
    }

    #[test]
    fn bad_env_is_an_error() {
        let e = Overrides::from_env([("FERRY_MAX_CONNECTIONS", "many")]).unwrap_err();
        assert!(e.to_string().contains("FERRY_MAX_CONNECTIONS"));
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
}
