//! `ferry serve --backend ...` when the backend's publish outcome is unknown: the client is
//! told the publish is in doubt (MQTT 5 PUBACK 0x80 with a reason string starting "in doubt"
//! and saying the backend did not confirm; HTTP 500 `{"error": "in_doubt", "in_doubt": true}`),
//! not that it was refused, and the server keeps serving (a PING is answered meanwhile). The
//! in-doubt message then turns out stored: the subscriber receives it, as "in doubt" warned.
//!
//! - NATS: a NATS server of the test's own (`nats-server -js` on a free port) is paused
//!   (SIGSTOP) while a client publishes: the publish was sent, JetStream's acknowledgement
//!   never comes, and the adapter's operation timeout answers. Skipped with a printed reason
//!   where `nats-server` is not installed, unless `FERRY_REQUIRE_SERVICES=1`.
//! - RabbitMQ (`FERRY_AMQP_URL`, default the local one on 5672): Ferry talks to it through a
//!   TCP proxy of the test that, once it has forwarded a publish carrying a marker, withholds
//!   what RabbitMQ answers (the publisher confirm) and cuts the connection. Skipped with a
//!   printed reason where RabbitMQ is unreachable, unless `FERRY_REQUIRE_SERVICES=1`.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::raw::Raw;
use common::Server;

/// A `nats-server` with JetStream on a free port, killed when dropped.
struct Nats {
    child: Child,
    port: u16,
    _store: tempfile::TempDir,
}

impl Nats {
    fn start() -> Option<Nats> {
        let store = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                let required = required();
                assert!(
                    !required,
                    "nats-server cannot start ({e}) and FERRY_REQUIRE_SERVICES=1"
                );
                eprintln!("SKIP: nats-server cannot start: {e}");
                return None;
            }
        };
        let nats = Nats {
            child,
            port,
            _store: store,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(nats)
    }

    fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {signal} nats-server");
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ferry serve --backend backend` with a subscriber to `doubt/#` and a publisher whose first
/// publish went through (confirmed by the backend, and carried back by the fanout ingress).
fn serve_over(backend: &str) -> (tempfile::TempDir, Server, Raw, Raw) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.toml");
    std::fs::write(&config, format!("backend = \"{backend}\"\n")).unwrap();
    let server = common::serve(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut watcher = Raw::connect(server.mqtt, "watcher", None);
    assert_eq!(watcher.subscribe(1, "doubt/#"), 1);
    let mut publisher = Raw::connect(server.mqtt, "publisher", None);
    confirmed(&mut publisher, &mut watcher, 1, b"before");
    (dir, server, watcher, publisher)
}

/// A publish of `payload` to `doubt/a` is confirmed and reaches the watcher.
fn confirmed(publisher: &mut Raw, watcher: &mut Raw, id: u16, payload: &[u8]) {
    assert_eq!(
        publisher.publish(id, "doubt/a", payload, false),
        (0, String::new())
    );
    assert_eq!(
        watcher.next_publish(),
        ("doubt/a".to_string(), payload.to_vec())
    );
}

#[test]
fn a_publish_the_backend_does_not_confirm_is_answered_in_doubt() {
    let Some(nats) = Nats::start() else { return };
    let (_dir, server, mut watcher, mut publisher) = serve_over(&format!(
        "nats://127.0.0.1:{}?stream=FERRY_DOUBT&prefix=doubt",
        nats.port
    ));
    let mqtt = server.mqtt;

    nats.signal("-STOP");
    let mut other = Raw::connect(mqtt, "other", None);
    let began = Instant::now();
    let (code, reason) = publisher.publish(2, "doubt/a", b"unconfirmed", false);
    let took = began.elapsed();
    assert_eq!(code, 0x80, "{reason}");
    assert!(reason.starts_with("in doubt"), "{reason}");
    assert!(reason.contains("did not confirm"), "{reason}");
    eprintln!("in doubt after {took:?}: {reason}");
    // The server itself keeps answering.
    assert!(other.ping(), "PINGRESP");

    nats.signal("-CONT");
    // The message was sent: JetStream stored it, and it reaches the subscriber.
    assert_eq!(
        watcher.next_publish(),
        ("doubt/a".to_string(), b"unconfirmed".to_vec())
    );
    confirmed(&mut publisher, &mut watcher, 3, b"after");
}

fn required() -> bool {
    std::env::var("FERRY_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// What the proxy looks for in what a client sends: a publish carrying it is the one whose
/// confirmation is withheld.
const MARKER: &[u8] = b"cut-after-this";

/// A TCP proxy to `upstream` on a free loopback port. On each connection, once the client
/// has sent bytes that contain [`MARKER`] and they were forwarded, the next bytes from the
/// upstream (the publish's confirmation) are dropped and both sides are cut.
struct CuttingProxy {
    port: u16,
    /// Connections cut so far.
    cuts: Arc<AtomicUsize>,
}

impl CuttingProxy {
    fn start(upstream: SocketAddr) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cuts = Arc::new(AtomicUsize::new(0));
        let counted = cuts.clone();
        // Lives as long as the test process; every connection ends with its peers.
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                relay(client, server, counted.clone());
            }
        });
        CuttingProxy { port, cuts }
    }
}

fn relay(client: TcpStream, server: TcpStream, cuts: Arc<AtomicUsize>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    // `armed`: a marked publish is being forwarded; `forwarded`: it was.
    let armed = Arc::new(AtomicBool::new(false));
    let forwarded = Arc::new(AtomicBool::new(false));
    let (mut from_client, mut to_server) =
        (client.try_clone().unwrap(), server.try_clone().unwrap());
    let (a, f) = (armed.clone(), forwarded.clone());
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        // The end of the previous read, so a marker split between reads is found.
        let mut tail: Vec<u8> = Vec::new();
        loop {
            let n = match from_client.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut seen = std::mem::take(&mut tail);
            seen.extend_from_slice(&buf[..n]);
            let marked = seen.windows(MARKER.len()).any(|w| w == MARKER);
            if marked {
                a.store(true, Ordering::SeqCst);
            }
            if to_server.write_all(&buf[..n]).is_err() {
                break;
            }
            if marked {
                f.store(true, Ordering::SeqCst);
            }
            tail = seen[seen.len().saturating_sub(MARKER.len())..].to_vec();
        }
        let _ = to_server.shutdown(Shutdown::Write);
    });
    let (mut from_server, mut to_client) = (server, client);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from_server.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if armed.load(Ordering::SeqCst) {
                // The upstream's answer to the marked publish (or anything after it): never
                // delivered. Cut once the publish has gone through whole.
                while !forwarded.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                cuts.fetch_add(1, Ordering::SeqCst);
                let _ = to_client.shutdown(Shutdown::Both);
                let _ = from_server.shutdown(Shutdown::Both);
                return;
            }
            if to_client.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to_client.shutdown(Shutdown::Write);
    });
}

/// The RabbitMQ to test against: `FERRY_AMQP_URL` or the local one; `None` (skip) when it is
/// unreachable, unless `FERRY_REQUIRE_SERVICES=1`.
fn rabbitmq() -> Option<(String, SocketAddr)> {
    let url = std::env::var("FERRY_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let host = url
        .rsplit('@')
        .next()
        .unwrap_or_default()
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(&host)
        .ok()
        .and_then(|mut a| a.next())
        .and_then(|a| {
            TcpStream::connect_timeout(&a, Duration::from_secs(2))
                .ok()
                .map(|_| a)
        });
    match reachable {
        Some(addr) => Some((url, addr)),
        None => {
            assert!(
                !required(),
                "RabbitMQ unreachable at {host} and FERRY_REQUIRE_SERVICES=1"
            );
            eprintln!("SKIP: RabbitMQ unreachable at {host} (set FERRY_REQUIRE_SERVICES=1 to fail instead)");
            None
        }
    }
}

/// An HTTP publish of `body` to `topic`: the status and the JSON answer.
fn http_publish(http: SocketAddr, topic: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let mut s = TcpStream::connect(http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let path = topic.replace('/', "%2F");
    write!(
        s,
        "POST /topics/{path}/messages HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let json = out
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(serde_json::Value::Null);
    (status, json)
}

#[test]
fn a_publish_whose_rabbitmq_connection_is_cut_before_the_confirm_is_in_doubt() {
    let Some((url, upstream)) = rabbitmq() else {
        return;
    };
    let proxy = CuttingProxy::start(upstream);
    // The same URL, through the proxy, on an exchange of this run.
    let (head, rest) = url.split_once('@').unwrap();
    let path = rest.split_once('/').map_or("", |(_, p)| p);
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let via_proxy = format!(
        "{head}@127.0.0.1:{}/{path}?exchange=ferry-doubt-{run:x}&queue_expires_s=60",
        proxy.port
    );
    let (_dir, server, mut watcher, mut publisher) = serve_over(&via_proxy);
    let mqtt = server.mqtt;

    // MQTT 5: the connection to RabbitMQ is cut after the publish went through, before its
    // confirmation came back.
    let mut other = Raw::connect(mqtt, "other", None);
    let payload = [MARKER, b" over mqtt"].concat();
    let (code, reason) = publisher.publish(2, "doubt/a", &payload, false);
    assert_eq!(proxy.cuts.load(Ordering::SeqCst), 1, "{reason}");
    assert_eq!(code, 0x80, "{reason}");
    assert!(reason.starts_with("in doubt"), "{reason}");
    assert!(reason.contains("did not confirm"), "{reason}");
    assert_eq!(reason.matches("in doubt").count(), 1, "said once: {reason}");
    assert!(!reason.contains("unreachable"), "it was sent: {reason}");
    eprintln!("MQTT in doubt: {reason}");
    assert!(other.ping(), "the server keeps answering");
    // RabbitMQ had it: it reaches the subscriber once the ingress is back.
    assert_eq!(watcher.next_publish(), ("doubt/a".to_string(), payload));

    // HTTP: 500 with the in-doubt error.
    let payload = [MARKER, b" over http"].concat();
    let (status, body) = http_publish(server.http, "doubt/b", &payload);
    assert_eq!(proxy.cuts.load(Ordering::SeqCst), 2, "{body}");
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"], "in_doubt", "{body}");
    assert_eq!(body["in_doubt"], true, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("did not confirm"),
        "{body}"
    );
    eprintln!("HTTP in doubt: {body}");
    assert_eq!(watcher.next_publish(), ("doubt/b".to_string(), payload));

    // And publishing works again (a new connection through the proxy).
    confirmed(&mut publisher, &mut watcher, 3, b"after");
}
