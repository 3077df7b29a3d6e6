//! Idle connections: many MQTT 3.1.1 clients that connect and then do nothing, to measure the
//! broker's resident memory per connection. Each connects as the throughput scenarios' clients
//! do ([`Conn::open`]: CONNECT, CONNACK, a 10-minute keep-alive), then keeps only its
//! `TcpStream` open, with no task reading it (10,000 full clients would cost the generator far
//! more than the brokers), while the broker's RSS is read.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures::stream::{self, StreamExt as _, TryStreamExt as _};
use tokio::net::TcpStream;

use super::brokers::BrokerProcess;
use super::load::Conn;

/// Connections being opened at once.
const CONCURRENCY: usize = 128;
/// When the first RSS reading with every connection open is taken, after the last CONNACK.
const SETTLE_FIRST: Duration = Duration::from_secs(5);
/// Between two RSS readings while the broker settles.
const SETTLE_POLL: Duration = Duration::from_secs(1);
/// The RSS counts as settled once two readings differ by less than this.
const SETTLE_DELTA: u64 = 256 * 1024;
/// The longest the readings go on, after the first one.
const SETTLE_MAX: Duration = Duration::from_secs(15);

/// The result of an idle-connection run.
#[derive(Debug)]
pub struct IdleResult {
    /// Connections held open.
    pub connections: usize,
    /// Broker RSS with one warm-up connection open, before the measured ones, bytes.
    pub rss_before: u64,
    /// Broker RSS with every connection open (after settling), bytes.
    pub rss_after: u64,
    /// From the last CONNACK to the RSS reading taken as settled.
    pub settle: Duration,
    /// The broker's threads with every connection open.
    pub threads: u64,
    /// Time to open every connection (CONNECT -> CONNACK, `CONCURRENCY` at a time).
    pub connect_time: Duration,
}

impl IdleResult {
    /// Resident bytes per connection.
    pub fn bytes_per_connection(&self) -> f64 {
        self.rss_after.saturating_sub(self.rss_before) as f64 / self.connections.max(1) as f64
    }
}

/// A connected client (CONNACK received) that reads nothing more: the connection alone, so
/// that the generator holds no read buffer per idle connection.
async fn open(broker: std::net::SocketAddr, client_id: String) -> Result<TcpStream> {
    Ok(Conn::open(broker, client_id).await?.into_stream())
}

/// Opens `n` idle connections to `broker`, reads its RSS, closes them.
///
/// One warm-up connection is opened before the RSS before is read, so that what the broker
/// allocates once, on its first connection, is not counted per connection. The RSS with every
/// connection open is read from [`SETTLE_FIRST`] after the last CONNACK on, once a
/// [`SETTLE_POLL`], until two readings differ by less than [`SETTLE_DELTA`] (at most
/// [`SETTLE_MAX`] more): allocators return memory to the system some time after a burst.
pub async fn run(broker: &mut BrokerProcess, n: usize) -> Result<IdleResult> {
    let addr = broker.addr;
    let warmup = open(addr, "idle-warmup".to_string()).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = broker.rss()?;
    let start = Instant::now();
    let conns: Vec<TcpStream> = stream::iter(0..n)
        .map(|i| open(addr, format!("idle-{i}")))
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    let connected = Instant::now();
    let connect_time = connected - start;
    tokio::time::sleep(SETTLE_FIRST).await;
    let mut rss_after = broker.rss()?;
    let polling = Instant::now();
    while polling.elapsed() < SETTLE_MAX {
        tokio::time::sleep(SETTLE_POLL).await;
        let now = broker.rss()?;
        let settled = now.abs_diff(rss_after) < SETTLE_DELTA;
        rss_after = now;
        if settled {
            break;
        }
    }
    let settle = connected.elapsed();
    if !broker.alive() {
        bail!(
            "{} died holding idle connections:\n{}",
            broker.kind,
            broker.log_tail()
        );
    }
    let threads = broker.threads().unwrap_or(0);
    drop(conns);
    drop(warmup);
    Ok(IdleResult {
        connections: n,
        rss_before,
        rss_after,
        settle,
        threads,
        connect_time,
    })
}
