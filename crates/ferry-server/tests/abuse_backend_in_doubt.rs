//! `ferry serve --backend nats://...` when the backend stops confirming: a NATS server of the
//! test's own (`nats-server -js` on a free port) is paused (SIGSTOP) while a client publishes.
//! The publish was sent, but JetStream's acknowledgement never comes: the MQTT 5 PUBACK is 0x80
//! with a reason string saying "in doubt" and that the backend did not confirm (not a plain
//! refusal), within the adapter's operation timeout, and the server keeps serving (a PING is
//! answered meanwhile). Once NATS resumes (SIGCONT), the in-doubt message turns out stored: the
//! subscriber receives it, as "in doubt" warned. Skipped with a printed reason where
//! `nats-server` is not installed, unless `FERRY_REQUIRE_SERVICES=1`.
#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::raw::Raw;

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
                let required = std::env::var("FERRY_REQUIRE_SERVICES").is_ok_and(|v| v == "1");
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

#[test]
fn a_publish_the_backend_does_not_confirm_is_answered_in_doubt() {
    let Some(nats) = Nats::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            "backend = \"nats://127.0.0.1:{}?stream=FERRY_DOUBT&prefix=doubt\"\n",
            nats.port
        ),
    )
    .unwrap();
    let server = common::serve(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mqtt: SocketAddr = server.mqtt;

    let mut watcher = Raw::connect(mqtt, "watcher", None);
    assert_eq!(watcher.subscribe(1, "doubt/#"), 1);
    let mut publisher = Raw::connect(mqtt, "publisher", None);
    // Confirmed while NATS runs (and the fanout ingress carries it back).
    assert_eq!(
        publisher.publish(1, "doubt/a", b"before", false),
        (0, String::new())
    );
    assert_eq!(
        watcher.next_publish(),
        ("doubt/a".to_string(), b"before".to_vec())
    );

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
    assert_eq!(
        publisher.publish(3, "doubt/a", b"after", false),
        (0, String::new())
    );
    assert_eq!(
        watcher.next_publish(),
        ("doubt/a".to_string(), b"after".to_vec())
    );
}
