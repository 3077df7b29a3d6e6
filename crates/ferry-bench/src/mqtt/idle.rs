//! Idle connections: many MQTT 3.1.1 clients that connect and then do nothing, to measure the
//! broker's resident memory per connection. Each is a raw CONNECT over a `TcpStream` (10,000
//! rumqttc event loops would cost the generator far more than the brokers), kept open with a
//! 10-minute keep-alive while the broker's RSS is read.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use futures::stream::{self, StreamExt as _, TryStreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::brokers::BrokerProcess;

/// Connections being opened at once.
const CONCURRENCY: usize = 128;
/// Keep-alive of the idle clients, seconds: far longer than a run.
const KEEP_ALIVE: u16 = 600;

/// The result of an idle-connection run.
#[derive(Debug)]
pub struct IdleResult {
    /// Connections held open.
    pub connections: usize,
    /// Broker RSS before the first connection, bytes.
    pub rss_before: u64,
    /// Broker RSS with every connection open (after settling), bytes.
    pub rss_after: u64,
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

/// An MQTT 3.1.1 CONNECT: clean session, no will, no credentials.
fn connect_packet(client_id: &str) -> Result<Vec<u8>> {
    let id = client_id.as_bytes();
    let remaining = 10 + 2 + id.len();
    if remaining > 127 || id.len() > 23 {
        bail!("client id {client_id:?} too long");
    }
    let mut p = Vec::with_capacity(2 + remaining);
    p.extend_from_slice(&[0x10, remaining as u8, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02]);
    p.extend_from_slice(&KEEP_ALIVE.to_be_bytes());
    p.extend_from_slice(&(id.len() as u16).to_be_bytes());
    p.extend_from_slice(id);
    Ok(p)
}

async fn open(broker: std::net::SocketAddr, client_id: String) -> Result<TcpStream> {
    let mut s = TcpStream::connect(broker)
        .await
        .with_context(|| format!("connecting {client_id}"))?;
    s.write_all(&connect_packet(&client_id)?).await?;
    let mut ack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut ack))
        .await
        .with_context(|| format!("{client_id}: no CONNACK within 30 s"))?
        .with_context(|| format!("{client_id}: reading the CONNACK"))?;
    if ack[0] != 0x20 || ack[1] != 2 || ack[3] != 0 {
        bail!("{client_id}: CONNACK refused: {ack:02x?}");
    }
    Ok(s)
}

/// Opens `n` idle connections to `broker`, reads its RSS, closes them.
pub async fn run(broker: &mut BrokerProcess, n: usize) -> Result<IdleResult> {
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = broker.rss()?;
    let addr = broker.addr;
    let start = Instant::now();
    let conns: Vec<TcpStream> = stream::iter(0..n)
        .map(|i| open(addr, format!("idle-{i}")))
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    let connect_time = start.elapsed();
    // Let the broker finish whatever follows a CONNACK (and allocators settle).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    if !broker.alive() {
        bail!(
            "{} died holding idle connections:\n{}",
            broker.kind,
            broker.log_tail()
        );
    }
    let rss_after = broker.rss()?;
    let threads = broker.threads().unwrap_or(0);
    drop(conns);
    Ok(IdleResult {
        connections: n,
        rss_before,
        rss_after,
        threads,
        connect_time,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn connect_packet_is_mqtt_3_1_1() {
        let p = connect_packet("ab").unwrap();
        assert_eq!(
            p,
            [0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0x02, 0x58, 0, 2, b'a', b'b']
        );
    }
}
