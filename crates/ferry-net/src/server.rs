//! Running the front ends together: bind, serve, shut down gracefully.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry::disk::DiskConfig;
use ferry::{Broker, BrokerConfig, ShutdownReport, TopicConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ServeConfig;
use crate::mqtt::retained::{RetainedError, RetainedStore};
use crate::mqtt::{self, MqttHandle};

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
    /// A listener could not be bound.
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        /// `MQTT` or `HTTP`.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The retained-message file could not be read.
    #[error(transparent)]
    Retained(#[from] RetainedError),
    /// Installing the signal handlers failed.
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

/// The engine configuration `ferry serve` uses.
pub fn broker_config(config: &ServeConfig) -> BrokerConfig {
    BrokerConfig {
        topic_defaults: TopicConfig {
            capacity: config.broker.topic_capacity,
            overflow: config.broker.overflow.into(),
            ..TopicConfig::default()
        },
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
        DiskConfig::default(),
    )
    .map_err(|e| ServeError::Storage {
        dir: config.data_dir.display().to_string(),
        source: e,
    })
}

/// A running server: the MQTT listener and (if enabled) the HTTP API over one broker.
pub struct Server {
    broker: Broker,
    mqtt: MqttHandle,
    mqtt_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    retained: Arc<RetainedStore>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    timeout: Duration,
}

impl Server {
    /// Binds the listeners and starts serving `broker`. Retained messages are kept in
    /// `data_dir` unless the config says `memory`.
    pub async fn start(config: &ServeConfig, broker: Broker) -> Result<Server, ServeError> {
        let retained = Arc::new(if config.memory {
            RetainedStore::in_memory()
        } else {
            RetainedStore::open(Path::new(&config.data_dir))?
        });
        let mqtt_listener =
            TcpListener::bind(config.mqtt.listen)
                .await
                .map_err(|e| ServeError::Bind {
                    what: "MQTT",
                    addr: config.mqtt.listen,
                    source: e,
                })?;
        let mqtt_addr = mqtt_listener.local_addr().map_err(|e| ServeError::Bind {
            what: "MQTT",
            addr: config.mqtt.listen,
            source: e,
        })?;
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let mqtt = mqtt::start(
            broker.clone(),
            config.mqtt.clone(),
            retained.clone(),
            mqtt_listener,
            shutdown.clone(),
            tracker.clone(),
        );
        let mut http_addr = None;
        if config.http.enabled {
            let listener =
                TcpListener::bind(config.http.listen)
                    .await
                    .map_err(|e| ServeError::Bind {
                        what: "HTTP",
                        addr: config.http.listen,
                        source: e,
                    })?;
            http_addr = Some(listener.local_addr().map_err(|e| ServeError::Bind {
                what: "HTTP",
                addr: config.http.listen,
                source: e,
            })?);
            let app = crate::http::router(broker.clone(), Some(mqtt.clone()));
            let stop = shutdown.clone();
            tracker.spawn(async move {
                let r = axum::serve(listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
                if let Err(e) = r {
                    tracing::error!(error = %e, "HTTP server failed");
                }
                tracing::info!("HTTP listener stopped");
            });
        }
        tracing::info!(mqtt = %mqtt_addr, http = ?http_addr, durable = broker.is_durable(), "ferry serving");
        Ok(Server {
            broker,
            mqtt,
            mqtt_addr,
            http_addr,
            retained,
            shutdown,
            tracker,
            timeout: config.shutdown_timeout(),
        })
    }

    /// Where MQTT listens.
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// Where HTTP listens, if enabled.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The broker.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// The MQTT front end's stats handle.
    pub fn mqtt(&self) -> &MqttHandle {
        &self.mqtt
    }

    /// Graceful shutdown: stop the listeners, close MQTT connections (MQTT 5 clients get
    /// DISCONNECT "Server shutting down"), wait for connection tasks, save retained messages,
    /// then shut the broker down (which saves consumer positions).
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
        if let Err(e) = self.retained.save() {
            tracing::error!(error = %e, "saving retained messages failed");
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
