//! `ferry serve`: the MQTT 3.1.1/5 broker and HTTP admin API over a durable (or in-memory)
//! broker. Settings come from flags, then `FERRY_*` environment variables, then the TOML file
//! given by `--config` (or `FERRY_CONFIG`), then defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use ferry_net::config::{LogFormat, Overrides, ServeConfig};

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
    /// Print the resolved configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

impl ServeArgs {
    /// The flags as overrides.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            data_dir: self.data_dir.clone(),
            memory: self.memory.then_some(true),
            segment_bytes: self.segment_bytes,
            log_format: self.log_format,
            shutdown_timeout_secs: self.shutdown_timeout_secs,
            mqtt_listen: self.mqtt_listen,
            allow_anonymous: self.allow_anonymous,
            max_connections: self.max_connections,
            max_packet_size: self.max_packet_size,
            max_inflight: self.max_inflight,
            max_queued: self.max_queued,
            http_listen: self.http_listen,
            http_enabled: self.no_http.then_some(false),
            mqtt_tls_listen: self.mqtt_tls_listen,
            mqtt_tls_cert: self.mqtt_tls_cert.clone(),
            mqtt_tls_key: self.mqtt_tls_key.clone(),
            http_tls_cert: self.http_tls_cert.clone(),
            http_tls_key: self.http_tls_key.clone(),
            backend: self.backend.clone(),
            node_id: self.node_id.clone(),
        }
    }

    /// Resolves the configuration from the flags, the process environment and the file.
    pub fn resolve(&self) -> anyhow::Result<ServeConfig> {
        ServeConfig::resolve(self.config.as_deref(), std::env::vars(), &self.overrides())
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
