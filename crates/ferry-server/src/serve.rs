//! `ferry serve`: the MQTT 3.1.1/5 broker and HTTP admin API over a durable (or in-memory)
//! broker. Settings come from flags, then `FERRY_*` environment variables, then the TOML file
//! given by `--config` (or `FERRY_CONFIG`), then defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use ferry_net::config::{LogFormat, Override, Resolved, ServeConfig};

/// Options of `ferry serve`; each overrides the environment and the config file.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration file (default: $FERRY_CONFIG, else none).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// MQTT listen address [default: 0.0.0.0:1883].
    #[arg(long, value_name = "ADDR")]
    pub mqtt_listen: Option<SocketAddr>,
    /// HTTP listen address [default: 0.0.0.0:8080].
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<SocketAddr>,
    /// Do not serve the HTTP API.
    #[arg(long)]
    pub no_http: bool,
    /// Data directory of the durable broker [default: ./ferry-data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Keep everything in memory (nothing is written to disk).
    #[arg(long)]
    pub memory: bool,
    /// Segment files of the data directory's commit log roll at this size, at least 1 MiB
    /// [default: 67108864].
    #[arg(long, value_name = "BYTES")]
    pub segment_bytes: Option<u64>,
    /// Log format: text or json [default: text].
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Whether MQTT clients without a user name may connect [default: true].
    #[arg(long, value_name = "BOOL")]
    pub allow_anonymous: Option<bool>,
    /// Most simultaneous MQTT connections [default: 10000].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Largest MQTT packet accepted, in bytes [default: 1048576].
    #[arg(long, value_name = "BYTES")]
    pub max_packet_size: Option<usize>,
    /// Outbound QoS 1/2 messages in flight per connection [default: 64].
    #[arg(long, value_name = "N")]
    pub max_inflight: Option<u16>,
    /// Messages queued for an offline persistent session [default: 10000].
    #[arg(long, value_name = "N")]
    pub max_queued: Option<u64>,
    /// MQTT-over-TLS listen address [default: 0.0.0.0:8883]; used with --mqtt-tls-cert/key.
    #[arg(long, value_name = "ADDR")]
    pub mqtt_tls_listen: Option<SocketAddr>,
    /// PEM certificate chain of the MQTT TLS listener.
    #[arg(long, value_name = "PATH", requires = "mqtt_tls_key")]
    pub mqtt_tls_cert: Option<PathBuf>,
    /// PEM private key of the MQTT TLS listener.
    #[arg(long, value_name = "PATH", requires = "mqtt_tls_cert")]
    pub mqtt_tls_key: Option<PathBuf>,
    /// PEM certificate chain: serve the HTTP API (and MQTT over WebSocket) as HTTPS.
    #[arg(long, value_name = "PATH", requires = "http_tls_key")]
    pub http_tls_cert: Option<PathBuf>,
    /// PEM private key for HTTPS.
    #[arg(long, value_name = "PATH", requires = "http_tls_cert")]
    pub http_tls_key: Option<PathBuf>,
    /// Serve over a distributed engine shared with other Ferry servers: nats://HOST:PORT
    /// (JetStream), amqp://USER:PASS@HOST:PORT (RabbitMQ) or kafka://HOST:PORT.
    #[arg(long, value_name = "URL")]
    pub backend: Option<String>,
    /// This server's name among the servers sharing a backend [default: kept in the data
    /// directory].
    #[arg(long, value_name = "NAME")]
    pub node_id: Option<String>,
    /// Graceful shutdown timeout in seconds [default: 10].
    #[arg(long, value_name = "SECS")]
    pub shutdown_timeout_secs: Option<u64>,
    /// Any setting by its TOML key, e.g. `--set mqtt.max_connections=100` (repeatable; see
    /// the settings reference, or --print-config for every key).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print the resolved configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

impl ServeArgs {
    /// The flags as overrides, in the order they apply (`--set` last).
    pub fn overrides(&self) -> anyhow::Result<Vec<Override>> {
        fn text(path: &Path, flag: &str) -> anyhow::Result<String> {
            path.to_str()
                .map(str::to_string)
                .with_context(|| format!("{flag}: the path {path:?} is not valid UTF-8"))
        }
        let mut out = Vec::new();
        let mut add = |key: &str, value: String, flag: &str| {
            out.push(Override::flag(key, value, flag));
        };
        if let Some(p) = &self.data_dir {
            add("data_dir", text(p, "--data-dir")?, "--data-dir");
        }
        if self.memory {
            add("memory", "true".into(), "--memory");
        }
        if let Some(v) = self.segment_bytes {
            add("segment_bytes", v.to_string(), "--segment-bytes");
        }
        if let Some(v) = self.log_format {
            let v = match v {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            };
            add("log_format", v.into(), "--log-format");
        }
        if let Some(v) = self.shutdown_timeout_secs {
            add(
                "shutdown_timeout_secs",
                v.to_string(),
                "--shutdown-timeout-secs",
            );
        }
        if let Some(v) = self.mqtt_listen {
            add("mqtt.listen", v.to_string(), "--mqtt-listen");
        }
        if let Some(v) = self.allow_anonymous {
            add("mqtt.allow_anonymous", v.to_string(), "--allow-anonymous");
        }
        if let Some(v) = self.max_connections {
            add("mqtt.max_connections", v.to_string(), "--max-connections");
        }
        if let Some(v) = self.max_packet_size {
            add("mqtt.max_packet_size", v.to_string(), "--max-packet-size");
        }
        if let Some(v) = self.max_inflight {
            add("mqtt.max_inflight", v.to_string(), "--max-inflight");
        }
        if let Some(v) = self.max_queued {
            add("mqtt.max_queued", v.to_string(), "--max-queued");
        }
        if let Some(v) = self.http_listen {
            add("http.listen", v.to_string(), "--http-listen");
        }
        if self.no_http {
            add("http.enabled", "false".into(), "--no-http");
        }
        if let Some(v) = self.mqtt_tls_listen {
            add("mqtt.tls_listen", v.to_string(), "--mqtt-tls-listen");
        }
        for (path, key, flag) in [
            (&self.mqtt_tls_cert, "mqtt.tls_cert", "--mqtt-tls-cert"),
            (&self.mqtt_tls_key, "mqtt.tls_key", "--mqtt-tls-key"),
            (&self.http_tls_cert, "http.tls_cert", "--http-tls-cert"),
            (&self.http_tls_key, "http.tls_key", "--http-tls-key"),
        ] {
            if let Some(p) = path {
                add(key, text(p, flag)?, flag);
            }
        }
        if let Some(v) = &self.backend {
            add("backend", v.clone(), "--backend");
        }
        if let Some(v) = &self.node_id {
            add("node_id", v.clone(), "--node-id");
        }
        for set in &self.set {
            out.push(Override::parse_set(set).map_err(|e| anyhow::anyhow!("--set {e}"))?);
        }
        Ok(out)
    }

    /// Resolves the configuration from the flags, the process environment and the file.
    pub fn resolve(&self) -> anyhow::Result<Resolved> {
        ServeConfig::resolve(self.config.as_deref(), std::env::vars(), &self.overrides()?)
            .context("loading the configuration")
    }
}

/// Runs the server until SIGINT/SIGTERM.
pub async fn run(config: ServeConfig) -> anyhow::Result<ExitCode> {
    let collector = tokio::spawn(crate::memory::collect_periodically());
    let served = ferry_net::serve(config).await;
    collector.abort();
    let report = served?;
    tracing::info!(
        drained = report.drained,
        published = report.counters.published,
        dropped_at_close = report.dropped_at_close,
        "ferry stopped"
    );
    Ok(ExitCode::SUCCESS)
}

/// Prints the configuration as TOML.
pub fn print_config(config: &ServeConfig) -> anyhow::Result<()> {
    let text = toml_text(config)?;
    print!("{text}");
    Ok(())
}

fn toml_text(config: &ServeConfig) -> anyhow::Result<String> {
    // serde_json -> TOML would need another dependency; the library re-exports a printer.
    ferry_net::config::to_toml(config).context("printing the configuration")
}
