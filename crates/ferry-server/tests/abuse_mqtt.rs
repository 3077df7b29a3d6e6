//! `ferry serve` under MQTT abuse: each limit refuses the offender with a clear answer while
//! other clients keep being served. Small limits are set through a config file.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ferry_mqtt::{
    decode, encode, Connect, Packet, ProtocolVersion, Publish, QoS, ReasonCode, Subscribe,
    Subscription,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use common::Server;

const WAIT: Duration = Duration::from_secs(10);

/// Starts `ferry serve` on `dir` with `toml` as its config file.
fn serve_with(dir: &Path, toml: &str) -> Server {
    let file = dir.join("ferry-test.toml");
    std::fs::write(&file, toml).unwrap();
    let data = dir.join("data");
    common::serve(&data, &["--config", file.to_str().unwrap()]).unwrap_or_else(|e| panic!("{e}"))
}

/// A raw MQTT connection (the `ferry-mqtt` codec over a TCP socket).
struct Raw {
    stream: TcpStream,
    version: ProtocolVersion,
    buf: BytesMut,
}

impl Raw {
    /// Connects from `from` (any port) to `addr`.
    async fn open(addr: SocketAddr, from: IpAddr, version: ProtocolVersion) -> Raw {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(from, 0)).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            version,
            buf: BytesMut::new(),
        }
    }

    /// Opens a connection from `from` and sends CONNECT as `id`; returns the CONNACK code.
    async fn connect(
        addr: SocketAddr,
        from: IpAddr,
        version: ProtocolVersion,
        id: &str,
    ) -> (Raw, Option<ReasonCode>) {
        let mut raw = Raw::open(addr, from, version).await;
        raw.send(&Packet::Connect(Connect::new(version, id))).await;
        let code = match raw.recv().await {
            Some(Packet::ConnAck(a)) => Some(a.reason_code),
            Some(other) => panic!("{id}: expected CONNACK, got {other:?}"),
            None => None,
        };
        (raw, code)
    }

    async fn send(&mut self, p: &Packet) {
        let mut out = BytesMut::new();
        encode(p, self.version, &mut out).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }

    /// The next packet, or `None` once the server closed the connection.
    async fn recv(&mut self) -> Option<Packet> {
        loop {
            if let Some(p) = decode(&mut self.buf, self.version, 1 << 24).unwrap() {
                return Some(p);
            }
            let n = tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.buf))
                .await
                .expect("timed out reading")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }

    /// Subscribes to `filters` at QoS 1; returns the SUBACK codes.
    async fn subscribe(&mut self, id: u16, filters: &[String]) -> Vec<ReasonCode> {
        self.send(&Packet::Subscribe(Subscribe {
            packet_id: id,
            subscriptions: filters
                .iter()
                .map(|f| Subscription::new(f.clone(), QoS::AtLeastOnce))
                .collect(),
            properties: Default::default(),
        }))
        .await;
        loop {
            match self.recv().await {
                Some(Packet::SubAck(s)) if s.packet_id == id => return s.reason_codes,
                Some(_) => {}
                None => panic!("closed while waiting for SUBACK {id}"),
            }
        }
    }

    /// Publishes `payload` to `topic` at QoS 1 and waits for its PUBACK (delivering other
    /// packets to `seen`).
    async fn publish(&mut self, id: u16, topic: &str, payload: &str, seen: &mut Vec<Packet>) {
        let mut p = Publish::new(topic, payload.as_bytes().to_vec());
        p.qos = QoS::AtLeastOnce;
        p.packet_id = Some(id);
        self.send(&Packet::Publish(p)).await;
        loop {
            match self.recv().await {
                Some(Packet::PubAck(a)) if a.packet_id == id => {
                    assert_eq!(a.reason_code, ReasonCode::Success);
                    return;
                }
                Some(other) => seen.push(other),
                None => panic!("closed while waiting for PUBACK {id}"),
            }
        }
    }

    /// Waits for a PUBLISH to `topic` (acknowledging QoS 1 ones); returns its payload.
    async fn message(&mut self, topic: &str, seen: &mut Vec<Packet>) -> Vec<u8> {
        loop {
            let p = match seen.pop() {
                Some(p) => p,
                None => self
                    .recv()
                    .await
                    .expect("closed while waiting for a message"),
            };
            if let Packet::Publish(p) = p {
                if let Some(id) = p.packet_id {
                    self.send(&Packet::PubAck(ferry_mqtt::PubAck::new(id)))
                        .await;
                }
                if p.topic == topic {
                    return p.payload.to_vec();
                }
            }
        }
    }

    /// Whether the server closes the connection within `within` (reading and dropping what
    /// comes before).
    async fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        let mut scratch = [0u8; 4096];
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut scratch)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }
}

const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));
const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

/// A healthy client (from [`OTHER`]) publishes to itself and gets the message.
async fn still_served(addr: SocketAddr, version: ProtocolVersion, id: &str) {
    let (mut c, code) = Raw::connect(addr, OTHER, version, id).await;
    assert_eq!(code, Some(ReasonCode::Success), "{id}");
    let topic = format!("healthy/{id}");
    assert_eq!(
        c.subscribe(1, std::slice::from_ref(&topic)).await,
        vec![ReasonCode::GrantedQoS1]
    );
    let mut seen = Vec::new();
    c.publish(2, &topic, "alive", &mut seen).await;
    assert_eq!(c.message(&topic, &mut seen).await, b"alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_is_held_to_its_connection_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_with(dir.path(), "[mqtt]\nmax_connections_per_address = 3\n");
    let addr = server.mqtt;
    let mut held = Vec::new();
    for i in 0..3 {
        let (c, code) = Raw::connect(addr, LOCAL, ProtocolVersion::V5, &format!("held{i}")).await;
        assert_eq!(code, Some(ReasonCode::Success), "connection {i}");
        held.push(c);
    }
    // The fourth from the same address: Quota exceeded (MQTT 5), Server unavailable (3.1.1),
    // then closed.
    let (mut over5, code) = Raw::connect(addr, LOCAL, ProtocolVersion::V5, "over5").await;
    assert_eq!(code, Some(ReasonCode::QuotaExceeded));
    assert!(over5.recv().await.is_none(), "closed after the refusal");
    let (mut over4, code) = Raw::connect(addr, LOCAL, ProtocolVersion::V311, "over4").await;
    assert_eq!(code, Some(ReasonCode::ServerUnavailable));
    assert!(over4.recv().await.is_none(), "closed after the refusal");
    // Another address is served, and the held connections still work.
    still_served(addr, ProtocolVersion::V5, "other5").await;
    still_served(addr, ProtocolVersion::V311, "other4").await;
    let mut seen = Vec::new();
    held[0].publish(7, "held/t", "x", &mut seen).await;
    // A connection that ends gives its place back (the count is released as the connection
    // task ends, so poll for it).
    drop(held.pop());
    let deadline = Instant::now() + WAIT;
    loop {
        let (c, code) = Raw::connect(addr, LOCAL, ProtocolVersion::V5, "again").await;
        if code == Some(ReasonCode::Success) {
            held.push(c);
            break;
        }
        assert_eq!(code, Some(ReasonCode::QuotaExceeded));
        assert!(
            Instant::now() < deadline,
            "the closed connection's place never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats: serde_json::Value = reqwest::get(format!("http://{}/stats", server.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        stats["mqtt"]["refused_per_address"].as_u64().unwrap() >= 2,
        "{stats}"
    );
}

/// The bytes of a CONNECT of `id` asking keep alive `keep_alive`.
fn connect_bytes(version: ProtocolVersion, id: &str, keep_alive: u16) -> Vec<u8> {
    let mut c = Connect::new(version, id);
    c.keep_alive = keep_alive;
    let mut out = BytesMut::new();
    encode(&Packet::Connect(c), version, &mut out).unwrap();
    out.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_connect_or_a_dribbled_one_is_closed_at_the_connect_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_with(dir.path(), "[mqtt]\nconnect_timeout_secs = 2\n");
    let addr = server.mqtt;
    let whole = connect_bytes(ProtocolVersion::V5, "slow", 60);
    // Half a CONNECT, then silence.
    let began = Instant::now();
    let mut half = Raw::open(addr, LOCAL, ProtocolVersion::V5).await;
    half.stream
        .write_all(&whole[..whole.len() / 2])
        .await
        .unwrap();
    assert!(half.closed_within(WAIT).await, "half a CONNECT kept open");
    let took = began.elapsed();
    assert!(took >= Duration::from_millis(1900), "closed after {took:?}");
    // One byte a second: closed at the timeout too, long before the CONNECT is whole.
    let began = Instant::now();
    let mut dribble = Raw::open(addr, LOCAL, ProtocolVersion::V5).await;
    let mut closed = false;
    for b in &whole {
        if dribble.stream.write_all(&[*b]).await.is_err()
            || dribble.closed_within(Duration::from_secs(1)).await
        {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "a CONNECT dribbled over {:?} was waited for",
        began.elapsed()
    );
    assert!(
        began.elapsed() < WAIT,
        "closed only after {:?}",
        began.elapsed()
    );
    still_served(addr, ProtocolVersion::V5, "healthy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_is_capped_and_a_dribbled_packet_does_not_keep_a_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_with(dir.path(), "[mqtt]\nmax_keep_alive_secs = 2\n");
    let addr = server.mqtt;
    // MQTT 5 asking 0 (never) and more than the cap: told Server Keep Alive = the cap, and
    // closed with Keep alive timeout after 1.5 times it of silence.
    for asked in [0u16, 3600] {
        let mut c = Raw::open(addr, LOCAL, ProtocolVersion::V5).await;
        let began = Instant::now();
        c.stream
            .write_all(&connect_bytes(
                ProtocolVersion::V5,
                &format!("ka5-{asked}"),
                asked,
            ))
            .await
            .unwrap();
        match c.recv().await {
            Some(Packet::ConnAck(a)) => {
                assert_eq!(a.reason_code, ReasonCode::Success);
                assert_eq!(a.properties.server_keep_alive, Some(2), "asked {asked}");
            }
            other => panic!("{other:?}"),
        }
        match c.recv().await {
            Some(Packet::Disconnect(d)) => assert_eq!(d.reason_code, ReasonCode::KeepAliveTimeout),
            other => panic!("asked {asked}: expected DISCONNECT, got {other:?}"),
        }
        assert!(
            began.elapsed() >= Duration::from_millis(2900),
            "{:?}",
            began.elapsed()
        );
        assert!(c.recv().await.is_none());
    }
    // MQTT 3.1.1 asking 0: accepted (it cannot be told), closed after 1.5 times the cap.
    let mut c = Raw::open(addr, LOCAL, ProtocolVersion::V311).await;
    let began = Instant::now();
    c.stream
        .write_all(&connect_bytes(ProtocolVersion::V311, "ka4", 0))
        .await
        .unwrap();
    assert!(
        matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.reason_code == ReasonCode::Success)
    );
    assert!(
        c.closed_within(WAIT).await,
        "a 3.1.1 client asking 0 never timed out"
    );
    assert!(
        began.elapsed() >= Duration::from_millis(2900),
        "{:?}",
        began.elapsed()
    );
    // Within its keep alive a client that pings stays; one that dribbles a PUBLISH a byte at
    // a time (more often than its keep alive) is closed: only whole packets count.
    let (mut pinger, code) = Raw::connect(addr, LOCAL, ProtocolVersion::V5, "pinger").await;
    assert_eq!(code, Some(ReasonCode::Success));
    let (mut dribbler, code) = Raw::connect(addr, LOCAL, ProtocolVersion::V5, "dribbler").await;
    assert_eq!(code, Some(ReasonCode::Success));
    let mut publish = BytesMut::new();
    let mut p = Publish::new("dribble/t", vec![7u8; 64]);
    p.qos = QoS::AtLeastOnce;
    p.packet_id = Some(1);
    encode(&Packet::Publish(p), ProtocolVersion::V5, &mut publish).unwrap();
    let began = Instant::now();
    let mut closed = false;
    for (i, b) in publish.iter().enumerate() {
        if i % 2 == 0 {
            pinger.send(&Packet::PingReq).await;
            assert!(matches!(pinger.recv().await, Some(Packet::PingResp)));
        }
        if dribbler.stream.write_all(&[*b]).await.is_err()
            || dribbler.closed_within(Duration::from_millis(500)).await
        {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "a PUBLISH dribbled over {:?} kept the connection",
        began.elapsed()
    );
    pinger.send(&Packet::PingReq).await;
    assert!(
        matches!(pinger.recv().await, Some(Packet::PingResp)),
        "the pinging client was closed"
    );
    still_served(addr, ProtocolVersion::V311, "healthy4").await;
}
