//! Ferry's network front ends: an MQTT 3.1.1/5 server and an HTTP admin API over one
//! [`ferry::Broker`], as run by `ferry serve`.
//!
//! - [`config`]: the `ferry serve` configuration (TOML file, `FERRY_*` variables, flags);
//! - [`mqtt`]: the MQTT server (sessions, QoS 0/1/2, retained messages, wills, shared
//!   subscriptions), on the sans-io codec of `ferry-mqtt`;
//! - [`http`]: the HTTP API (health, stats, Prometheus metrics, publishing, dead letters,
//!   OpenAPI);
//! - [`server`]: binding both, serving and graceful shutdown;
//! - [`auth`]: argon2 password hashes for MQTT users;
//! - [`acl`]: per-user topic ACLs for MQTT publish and subscribe;
//! - [`tls`]: rustls acceptors for the MQTT-over-TLS and HTTPS listeners.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use ferry_net::config::ServeConfig;
//! use ferry_net::server::Server;
//!
//! let mut config = ServeConfig::default();
//! config.memory = true;
//! config.mqtt.listen = "127.0.0.1:0".parse()?;
//! config.http.listen = "127.0.0.1:0".parse()?;
//! let server = Server::start(&config, ferry::Broker::default()).await?;
//! println!("MQTT on {}", server.mqtt_addr());
//! let report = server.shutdown().await;
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

pub mod acl;
pub mod auth;
pub mod bridge;
pub mod config;
pub mod consume;
pub mod dashboard;
mod fsutil;
pub mod http;
pub mod http_auth;
pub mod http_serve;
pub mod metrics;
pub mod mqtt;
pub mod nofile;
mod persist;
pub mod server;
pub mod tls;
mod unix_time;

pub use config::{Override, ServeConfig};
pub use server::{serve, ServeError, Server};
