//! Running the front ends together: bind, serve, shut down gracefully.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry::disk::DiskConfig;
use ferry::{Broker, BrokerConfig, HotWindow, ShutdownReport, TopicConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bridge::Bridge;
use crate::config::ServeConfig;
use crate::mqtt::retained::RetainedStore;
use crate::mqtt::session::Sessions;
use crate::mqtt::state_store::{StateError, StateStore};
use crate::mqtt::{self, MqttHandle};
use crate::tls::TlsError;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The data directory could not be created.
    #[error("creating the data directory {dir}: {source}")]
    DataDir {
        /// The data directory.
        dir: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The durable broker could not be opened.
    #[error("opening the data directory {dir}: {source}")]
    Storage {
        /// The data directory.
        dir: String,
        /// The engine's error.
        source: ferry::storage::StorageError,
    },
    /// A listener could not be bound. The message says what to do when the address is taken;
    /// the I/O error follows as the source.
    #[error("binding {what} on {addr}{}", bind_hint(what, source))]
    Bind {
        /// `MQTT` or `HTTP`.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The MQTT state store (retained messages, persistent sessions) could not be opened,
    /// read or migrated.
    #[error(transparent)]
    State(#[from] StateError),
    /// Opening the MQTT state store on a blocking thread failed.
    #[error("opening the MQTT state store: {0}")]
    StateTask(String),
    /// A TLS certificate or key could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The configuration is inconsistent.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The backend could not be used.
    #[error(transparent)]
    Backend(#[from] crate::bridge::BridgeError),
    /// The node id could not be kept in the data directory.
    #[error("keeping the node id in {dir}: {source}")]
    NodeId {
        /// The data directory.
        dir: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Installing the signal handlers failed.
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

/// The engine configuration `ferry serve` uses.
pub fn broker_config(config: &ServeConfig) -> BrokerConfig {
    BrokerConfig {
        topic_defaults: TopicConfig {
            capacity: config.broker.topic_capacity,
            max_bytes: (config.broker.topic_max_bytes > 0).then_some(config.broker.topic_max_bytes),
            overflow: config.broker.overflow.into(),
            ..TopicConfig::default()
        },
        hot_window: HotWindow {
            bytes: match config.broker.topic_max_bytes {
                0 => HotWindow::default().bytes,
                max => HotWindow::default().bytes.min(max),
            },
            ..HotWindow::default()
        },
        max_topics: Some(config.broker.max_topics),
        memory_limit: (config.broker.memory_limit_bytes > 0)
            .then_some(config.broker.memory_limit_bytes),
        forget_empty_topics: config.broker.forget_empty_topics,
        ..BrokerConfig::default()
    }
}

/// Opens the broker the configuration asks for: durable in `data_dir`, or in memory.
pub fn open_broker(config: &ServeConfig) -> Result<Broker, ServeError> {
    if config.memory {
        return Ok(Broker::new(broker_config(config)));
    }
    std::fs::create_dir_all(&config.data_dir).map_err(|e| ServeError::DataDir {
        dir: config.data_dir.display().to_string(),
        source: e,
    })?;
    Broker::open_with(
        &config.data_dir,
        broker_config(config),
        DiskConfig {
            segment_bytes: config.segment_bytes,
            ..DiskConfig::default()
        },
    )
    .map_err(|e| ServeError::Storage {
        dir: config.data_dir.display().to_string(),
        source: e,
    })
}

/// The peer address of an HTTP connection (plain or TLS), as axum connect info (set by
/// [`crate::http_serve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// What a failed bind means for the person starting the server (empty when the I/O error,
/// the source, says it all).
fn bind_hint(what: &str, e: &std::io::Error) -> String {
    let (flag, var) = match what {
        "MQTT" => ("--mqtt-listen", "FERRY_MQTT_LISTEN"),
        "MQTT TLS" => ("--mqtt-tls-listen", "FERRY_MQTT_TLS_LISTEN"),
        _ => ("--http-listen", "FERRY_HTTP_LISTEN"),
    };
    match e.kind() {
        std::io::ErrorKind::AddrInUse => format!(
            ": the port is already in use by another process (another broker, or another \
             `ferry serve`); stop it or choose another address with {flag} or {var}"
        ),
        std::io::ErrorKind::PermissionDenied => format!(
            ": not allowed (ports below 1024 need privileges); choose another address with \
             {flag} or {var}"
        ),
        _ => String::new(),
    }
}

async fn bind(
    what: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), ServeError> {
    let err = |e| ServeError::Bind {
        what,
        addr,
        source: e,
    };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    Ok((listener, local))
}

/// A running server: the MQTT listeners and (if enabled) the HTTP API over one broker.
pub struct Server {
    broker: Broker,
    mqtt: MqttHandle,
    mqtt_addr: SocketAddr,
    mqtt_tls_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    http_tls: bool,
    retained: Arc<RetainedStore>,
    state: Option<Arc<StateStore>>,
    bridge: Option<Arc<Bridge>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    timeout: Duration,
}

impl Server {
    /// Binds the listeners and starts serving `broker`. Retained messages and persistent MQTT
    /// sessions are kept in `data_dir` unless the config says `memory`.
    pub async fn start(config: &ServeConfig, broker: Broker) -> Result<Server, ServeError> {
        // A descriptor per connection: the soft open-file limit up to the hard one.
        crate::nofile::raise(config);
        // Everything that can fail on bad files first, before anything binds.
        let mqtt_tls = match config.mqtt.tls()? {
            Some(files) => Some(crate::tls::server_config(&files, &[])?),
            None => None,
        };
        let http_tls = match config.http.tls()? {
            Some(files) => Some(crate::tls::server_config(
                &files,
                &[b"http/1.1".as_slice()],
            )?),
            None => None,
        };
        let (retained, sessions, state) = if config.memory {
            (RetainedStore::in_memory(), Sessions::in_memory(), None)
        } else {
            // Storage I/O (open, recovery, reads, migration): on a blocking thread.
            let dir = config.data_dir.clone();
            let b = broker.clone();
            tokio::task::spawn_blocking(move || {
                let state = Arc::new(StateStore::open(&dir)?);
                let retained = RetainedStore::open(state.clone(), &dir)?;
                let sessions = Sessions::open(state.clone(), &dir, &b)?;
                Ok::<_, StateError>((retained, sessions, Some(state)))
            })
            .await
            .map_err(|e| ServeError::StateTask(e.to_string()))??
        };
        let retained = Arc::new(retained);
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let bridge = match &config.backend {
            Some(url) => {
                let dir = (!config.memory).then(|| Path::new(&config.data_dir));
                let node = crate::bridge::node_id(config.node_id.as_deref(), dir).map_err(|e| {
                    ServeError::NodeId {
                        dir: config.data_dir.display().to_string(),
                        source: e,
                    }
                })?;
                Some(
                    Bridge::start(
                        url,
                        broker.clone(),
                        retained.clone(),
                        node,
                        shutdown.clone(),
                        tracker.clone(),
                    )
                    .await?,
                )
            }
            None => None,
        };
        let (tcp, mqtt_addr) = bind("MQTT", config.mqtt.listen).await?;
        let (tls, mqtt_tls_addr) = match mqtt_tls {
            Some(tls_config) => {
                let (l, addr) = bind("MQTT TLS", config.mqtt.tls_listen).await?;
                let acceptor = tokio_rustls::TlsAcceptor::from(tls_config);
                (Some((l, acceptor)), Some(addr))
            }
            None => (None, None),
        };
        let mqtt = mqtt::start(
            broker.clone(),
            config.mqtt.clone(),
            retained.clone(),
            sessions,
            mqtt::Listeners { tcp, tls },
            bridge.clone(),
            shutdown.clone(),
            tracker.clone(),
        );
        let mut http_addr = None;
        let https = http_tls.is_some();
        if config.http.enabled {
            let (listener, addr) = bind("HTTP", config.http.listen).await?;
            http_addr = Some(addr);
            let app = crate::http::router(
                broker.clone(),
                Some(mqtt.clone()),
                bridge.clone(),
                &config.http,
            )
            .merge(mqtt::websocket::router(mqtt.clone()));
            let app = crate::http::with_json_errors(app, &config.http);
            crate::http_serve::spawn(
                listener,
                http_tls.map(tokio_rustls::TlsAcceptor::from),
                app,
                crate::http_serve::ConnectionLimits::of(&config.http),
                mqtt.server_metrics().clone(),
                shutdown.clone(),
                &tracker,
            );
        }
        tracing::info!(mqtt = %mqtt_addr, mqtt_tls = ?mqtt_tls_addr, http = ?http_addr, https, durable = broker.is_durable(), "ferry serving");
        Ok(Server {
            broker,
            mqtt,
            mqtt_addr,
            mqtt_tls_addr,
            http_addr,
            http_tls: https,
            retained,
            state,
            bridge,
            shutdown,
            tracker,
            timeout: config.shutdown_timeout(),
        })
    }

    /// Where MQTT listens.
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// Where MQTT over TLS listens, if configured.
    pub fn mqtt_tls_addr(&self) -> Option<SocketAddr> {
        self.mqtt_tls_addr
    }

    /// Where HTTP listens, if enabled.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Whether the HTTP listener speaks HTTPS.
    pub fn http_tls(&self) -> bool {
        self.http_tls
    }

    /// The broker.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// The backend link, when serving over a backend.
    pub fn bridge(&self) -> Option<&Arc<Bridge>> {
        self.bridge.as_ref()
    }

    /// The MQTT front end's stats handle.
    pub fn mqtt(&self) -> &MqttHandle {
        &self.mqtt
    }

    /// The MQTT state store (`None` in memory): for tests, whose fault switch
    /// ([`StateStore::fail_saves`]) makes its saves fail.
    #[doc(hidden)]
    pub fn state_store(&self) -> Option<&Arc<StateStore>> {
        self.state.as_ref()
    }

    /// Graceful shutdown: stop the listeners, close MQTT connections (MQTT 5 clients get
    /// DISCONNECT "Server shutting down"), wait for connection tasks, save retained messages
    /// and persistent sessions, then shut the broker down (which saves consumer positions).
    pub async fn shutdown(self) -> ShutdownReport {
        tracing::info!("shutting down");
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(self.timeout, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some connections did not close in time");
        }
        if let Some(bridge) = &self.bridge {
            bridge.close().await;
        }
        // Storage I/O: on a blocking thread.
        let (retained, shared, state) = (
            self.retained.clone(),
            self.mqtt.shared.clone(),
            self.state.clone(),
        );
        let saved = tokio::task::spawn_blocking(move || {
            if let Err(e) = retained.save() {
                tracing::error!(error = %e, "saving retained messages failed");
            }
            if let Err(e) = shared.sessions.save() {
                tracing::error!(error = %e, "saving MQTT sessions failed");
            }
            if let Some(state) = state {
                if let Err(e) = state.close() {
                    tracing::error!(error = %e, "closing the MQTT state store failed");
                }
            }
        })
        .await;
        if let Err(e) = saved {
            tracing::error!(error = %e, "the final state save failed");
        }
        let report = self.broker.shutdown(self.timeout).await;
        tracing::info!(
            drained = report.drained,
            dropped_at_close = report.dropped_at_close,
            "broker shut down"
        );
        report
    }
}

/// Waits for SIGINT (Ctrl-C) or SIGTERM.
pub async fn wait_for_signal() -> Result<(), ServeError> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(ServeError::Signals)?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.map_err(ServeError::Signals)?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await.map_err(ServeError::Signals)?;
    Ok(())
}

/// `ferry serve`: opens the broker, serves until SIGINT/SIGTERM, shuts down gracefully.
pub async fn serve(config: ServeConfig) -> Result<ShutdownReport, ServeError> {
    let broker = open_broker(&config)?;
    let server = Server::start(&config, broker).await?;
    wait_for_signal().await?;
    Ok(server.shutdown().await)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn a_port_in_use_is_explained() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind("MQTT", addr).await.err().unwrap();
        let shown = format!("{err}");
        assert_eq!(
            shown,
            format!(
                "binding MQTT on {addr}: the port is already in use by another process (another \
                 broker, or another `ferry serve`); stop it or choose another address with \
                 --mqtt-listen or FERRY_MQTT_LISTEN"
            )
        );
        // The OS error comes once, as the source.
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert!(!shown.contains(&source), "{shown} / {source}");
    }
}
