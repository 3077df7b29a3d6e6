//! Test helpers: a server on ephemeral ports, rumqttc v5/v4 clients whose event loops forward
//! what they receive to a channel, and a raw MQTT connection for malformed input.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferry::Broker;
use ferry_mqtt::{decode, encode, Connect, Packet, ProtocolVersion};
use ferry_net::config::ServeConfig;
use ferry_net::Server;
use rumqttc::v5;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub const WAIT: Duration = Duration::from_secs(5);

/// An in-memory server on 127.0.0.1 ephemeral ports, config adjusted by `f`.
pub async fn server_with(f: impl FnOnce(&mut ServeConfig)) -> Server {
    let mut config = ServeConfig {
        memory: true,
        shutdown_timeout_secs: 1,
        ..ServeConfig::default()
    };
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    f(&mut config);
    let broker = ferry_net::server::open_broker(&config).unwrap();
    Server::start(&config, broker).await.unwrap()
}

pub async fn server() -> Server {
    server_with(|_| {}).await
}

/// What a test client saw.
#[derive(Debug, Clone)]
pub enum Seen {
    ConnAck { session_present: bool, code: String },
    Publish(Msg),
    Disconnect(String),
    SubAck(Vec<String>),
    PubAck(String),
    Error(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Msg {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    pub user_properties: Vec<(String, String)>,
    pub subscription_ids: Vec<usize>,
    pub expiry: Option<u32>,
}

pub struct Client5 {
    pub client: v5::AsyncClient,
    pub rx: mpsc::UnboundedReceiver<Seen>,
    pub task: JoinHandle<()>,
}

pub fn options5(addr: SocketAddr, id: &str) -> v5::MqttOptions {
    let mut o = v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o
}

/// Starts a v5 client; its event loop stops at the first error (no reconnect).
pub fn spawn5(opts: v5::MqttOptions) -> Client5 {
    let (client, mut el) = v5::AsyncClient::new(opts, 100);
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        use v5::mqttbytes::v5::Packet as P;
        loop {
            match el.poll().await {
                Ok(v5::Event::Incoming(p)) => {
                    let seen = match p {
                        P::ConnAck(c) => Seen::ConnAck {
                            session_present: c.session_present,
                            code: format!("{:?}", c.code),
                        },
                        P::Publish(p) => {
                            let props = p.properties.clone().unwrap_or_default();
                            Seen::Publish(Msg {
                                topic: String::from_utf8(p.topic.to_vec()).unwrap(),
                                payload: p.payload.clone(),
                                qos: p.qos as u8,
                                retain: p.retain,
                                dup: p.dup,
                                user_properties: props.user_properties,
                                subscription_ids: props.subscription_identifiers,
                                expiry: props.message_expiry_interval,
                            })
                        }
                        P::Disconnect(d) => Seen::Disconnect(format!("{:?}", d.reason_code)),
                        P::SubAck(s) => {
                            Seen::SubAck(s.return_codes.iter().map(|c| format!("{c:?}")).collect())
                        }
                        P::PubAck(a) => Seen::PubAck(format!("{:?}", a.reason)),
                        _ => continue,
                    };
                    if tx.send(seen).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Seen::Error(e.to_string()));
                    return;
                }
            }
        }
    });
    Client5 { client, rx, task }
}

impl Client5 {
    /// Waits for the CONNACK; returns session present.
    pub async fn connected(&mut self) -> bool {
        match self.next().await {
            Seen::ConnAck {
                session_present,
                code,
            } => {
                assert_eq!(code, "Success");
                session_present
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub async fn next(&mut self) -> Seen {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("timed out waiting for the client")
            .expect("client event loop ended")
    }

    /// The next PUBLISH (skipping acks).
    pub async fn publish(&mut self) -> Msg {
        loop {
            match self.next().await {
                Seen::Publish(m) => return m,
                Seen::Error(e) => panic!("client failed: {e}"),
                Seen::Disconnect(r) => panic!("disconnected: {r}"),
                _ => {}
            }
        }
    }

    /// Waits for a SUBACK.
    pub async fn suback(&mut self) -> Vec<String> {
        loop {
            match self.next().await {
                Seen::SubAck(c) => return c,
                Seen::Error(e) => panic!("client failed: {e}"),
                _ => {}
            }
        }
    }

    /// Asserts nothing is published within `d`.
    pub async fn nothing_for(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => return,
                Ok(Some(Seen::Publish(m))) => panic!("unexpected publish {m:?}"),
                Ok(_) => {}
            }
        }
    }

    /// Drops the TCP connection without DISCONNECT.
    pub fn kill(self) {
        self.task.abort();
    }
}

pub async fn connect5(addr: SocketAddr, id: &str) -> Client5 {
    let mut c = spawn5(options5(addr, id));
    c.connected().await;
    c
}

pub struct Client4 {
    pub client: rumqttc::AsyncClient,
    pub rx: mpsc::UnboundedReceiver<Seen>,
    pub task: JoinHandle<()>,
}

pub fn options4(addr: SocketAddr, id: &str) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o
}

pub fn spawn4(opts: rumqttc::MqttOptions) -> Client4 {
    let (client, mut el) = rumqttc::AsyncClient::new(opts, 100);
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        use rumqttc::Packet as P;
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(p)) => {
                    let seen = match p {
                        P::ConnAck(c) => Seen::ConnAck {
                            session_present: c.session_present,
                            code: format!("{:?}", c.code),
                        },
                        P::Publish(p) => Seen::Publish(Msg {
                            topic: p.topic.clone(),
                            payload: p.payload.clone(),
                            qos: p.qos as u8,
                            retain: p.retain,
                            dup: p.dup,
                            user_properties: vec![],
                            subscription_ids: vec![],
                            expiry: None,
                        }),
                        P::SubAck(s) => {
                            Seen::SubAck(s.return_codes.iter().map(|c| format!("{c:?}")).collect())
                        }
                        _ => continue,
                    };
                    if tx.send(seen).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Seen::Error(e.to_string()));
                    return;
                }
            }
        }
    });
    Client4 { client, rx, task }
}

impl Client4 {
    pub async fn next(&mut self) -> Seen {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("timed out waiting for the client")
            .expect("client event loop ended")
    }

    pub async fn connected(&mut self) -> bool {
        match self.next().await {
            Seen::ConnAck {
                session_present,
                code,
            } => {
                assert_eq!(code, "Success");
                session_present
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub async fn publish(&mut self) -> Msg {
        loop {
            match self.next().await {
                Seen::Publish(m) => return m,
                Seen::Error(e) => panic!("client failed: {e}"),
                _ => {}
            }
        }
    }

    pub async fn suback(&mut self) -> Vec<String> {
        loop {
            match self.next().await {
                Seen::SubAck(c) => return c,
                Seen::Error(e) => panic!("client failed: {e}"),
                _ => {}
            }
        }
    }
}

pub async fn connect4(addr: SocketAddr, id: &str) -> Client4 {
    let mut c = spawn4(options4(addr, id));
    c.connected().await;
    c
}

/// A raw MQTT connection speaking through the `ferry-mqtt` codec.
pub struct Raw {
    pub stream: TcpStream,
    pub version: ProtocolVersion,
    buf: BytesMut,
}

impl Raw {
    pub async fn connect(addr: SocketAddr, connect: Connect) -> (Raw, Packet) {
        let stream = TcpStream::connect(addr).await.unwrap();
        let version = connect.protocol_version;
        let mut raw = Raw {
            stream,
            version,
            buf: BytesMut::new(),
        };
        raw.send(&Packet::Connect(connect)).await;
        let ack = raw.recv().await.expect("CONNACK");
        (raw, ack)
    }

    pub async fn send(&mut self, p: &Packet) {
        let mut out = BytesMut::new();
        encode(p, self.version, &mut out).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }

    pub async fn send_bytes(&mut self, b: &[u8]) {
        self.stream.write_all(b).await.unwrap();
    }

    /// The next packet, or `None` once the server closed the connection.
    pub async fn recv(&mut self) -> Option<Packet> {
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

    /// Reads until the server closes; returns the packets seen before.
    pub async fn until_closed(&mut self) -> Vec<Packet> {
        let mut seen = Vec::new();
        while let Some(p) = self.recv().await {
            seen.push(p);
        }
        seen
    }
}

pub fn broker_of(server: &Server) -> Broker {
    server.broker().clone()
}
