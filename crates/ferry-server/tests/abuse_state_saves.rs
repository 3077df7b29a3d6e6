//! The server's own state saves failing, for real: `ferry serve` on a data directory where the
//! temporary file of an atomic replace (`mqtt-retained.json.tmp`, `mqtt-sessions.json.tmp`) is
//! a directory, so that every save of that file fails (EISDIR) without privileges (the tests
//! may run as root, where permissions would not stop a write). A retained publish is then
//! answered in doubt (MQTT 5 PUBACK 0x80, reason string "in doubt ... retained ..."): it was
//! delivered, but whether it stays the retained message across a restart is not known.
//! `/health` answers 503 `"degraded"` with what failed (retained messages, MQTT sessions)
//! while those saves fail, other clients keep being served, and once the obstacle is gone the
//! next save (the once-a-second one) succeeds and `/health` answers 200 `"running"` again; the
//! retained message is then on disk and survives a crash.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

const WAIT: Duration = Duration::from_secs(15);

/// A raw MQTT 5 connection.
struct Raw(TcpStream);

impl Raw {
    /// CONNECT v5 as `client`; with `expiry` a persistent session (clean start off, that
    /// session expiry interval in seconds).
    fn connect(addr: SocketAddr, client: &str, expiry: Option<u32>) -> Raw {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let (flags, props) = match expiry {
            Some(secs) => (0x00, [&[5u8, 0x11][..], &secs.to_be_bytes()].concat()),
            None => (0x02, vec![0u8]),
        };
        let body = [
            &[0, 4][..],
            b"MQTT",
            &[5, flags, 0, 60],
            &props,
            &str_bytes(client),
        ]
        .concat();
        s.write_all(&frame(0x10, &body)).unwrap();
        let (kind, ack) = read(&mut s);
        assert_eq!((kind, ack[1]), (0x20, 0), "CONNACK");
        Raw(s)
    }

    /// A QoS 1 PUBLISH; its PUBACK's reason code and reason string.
    fn publish(&mut self, id: u16, topic: &str, payload: &[u8], retain: bool) -> (u8, String) {
        let first = 0x32 | u8::from(retain);
        let body = [&str_bytes(topic)[..], &id.to_be_bytes(), &[0], payload].concat();
        self.0.write_all(&frame(first, &body)).unwrap();
        let (kind, ack) = read(&mut self.0);
        assert_eq!(kind, 0x40, "PUBACK");
        assert_eq!(u16::from_be_bytes([ack[0], ack[1]]), id);
        let code = ack.get(2).copied().unwrap_or(0);
        let mut reason = String::new();
        if ack.len() > 4 {
            let at = if ack[3] & 0x80 != 0 { 5 } else { 4 };
            if ack[at] == 0x1F {
                let n = usize::from(u16::from_be_bytes([ack[at + 1], ack[at + 2]]));
                reason = String::from_utf8(ack[at + 3..at + 3 + n].to_vec()).unwrap();
            }
        }
        (code, reason)
    }

    /// SUBSCRIBE to `filter` at QoS 1; the SUBACK's reason code.
    fn subscribe(&mut self, id: u16, filter: &str) -> u8 {
        let body = [&id.to_be_bytes()[..], &[0], &str_bytes(filter), &[1]].concat();
        self.0.write_all(&frame(0x82, &body)).unwrap();
        loop {
            let (kind, ack) = read(&mut self.0);
            if kind == 0x90 {
                assert_eq!(u16::from_be_bytes([ack[0], ack[1]]), id);
                let props = usize::from(ack[2]);
                return ack[3 + props];
            }
        }
    }

    /// The next PUBLISH's topic and payload (acknowledging QoS 1 ones).
    fn next_publish(&mut self) -> (String, Vec<u8>) {
        loop {
            let (kind, body) = read(&mut self.0);
            if kind & 0xF0 != 0x30 {
                continue;
            }
            let n = usize::from(u16::from_be_bytes([body[0], body[1]]));
            let topic = String::from_utf8(body[2..2 + n].to_vec()).unwrap();
            let mut at = 2 + n;
            if kind & 0x06 != 0 {
                let id = [body[at], body[at + 1]];
                at += 2;
                let ack = [&id[..], &[0]].concat();
                self.0.write_all(&frame(0x40, &ack)).unwrap();
            }
            // Properties: a one-byte length suffices for what the server sends here.
            let props = usize::from(body[at]);
            at += 1 + props;
            return (topic, body[at..].to_vec());
        }
    }
}

fn str_bytes(s: &str) -> Vec<u8> {
    let n = u16::try_from(s.len()).unwrap();
    [&n.to_be_bytes()[..], s.as_bytes()].concat()
}

fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn read(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut first = [0u8; 1];
    s.read_exact(&mut first).unwrap();
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        len |= usize::from(b[0] & 0x7f) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (first[0], body)
}

async fn health(http: SocketAddr) -> (u16, Value) {
    let r = reqwest::get(format!("http://{http}/health")).await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Polls `/health` until `done` holds for it; panics with the last answer after [`WAIT`].
async fn health_until(http: SocketAddr, what: &str, done: impl Fn(u16, &Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, h) = health(http).await;
        if done(status, &h) {
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: /health still answers {status} {h}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Makes every save of `file` in `dir` fail: its temporary file is a directory.
fn block_saves(dir: &Path, file: &str) -> std::path::PathBuf {
    let tmp = dir.join(format!("{file}.tmp"));
    std::fs::create_dir_all(tmp.join("obstacle")).unwrap();
    tmp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_state_saves_are_in_doubt_and_degrade_health_until_a_save_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = common::serve(&data, &[]).unwrap_or_else(|e| panic!("{e}"));
    let (mqtt, http) = (server.mqtt, server.http);
    assert_eq!(health(http).await.0, 200);

    let mut watcher = Raw::connect(mqtt, "watcher", None);
    assert_eq!(watcher.subscribe(1, "state/#"), 1);
    let mut publisher = Raw::connect(mqtt, "publisher", None);

    let retained_tmp = block_saves(&data, "mqtt-retained.json");
    let sessions_tmp = block_saves(&data, "mqtt-sessions.json");

    // The retained publish is delivered, but answered in doubt: not known to be kept.
    let (code, reason) = publisher.publish(1, "state/lamp", b"on", true);
    assert_eq!(code, 0x80, "{reason}");
    assert!(reason.starts_with("in doubt"), "{reason}");
    assert!(reason.contains("retained"), "{reason}");
    assert_eq!(
        watcher.next_publish(),
        ("state/lamp".to_string(), b"on".to_vec())
    );
    // A persistent session's subscription cannot be saved either (its SUBACK still comes:
    // MQTT has no refusal for it), and health says so.
    let mut persistent = Raw::connect(mqtt, "persistent", Some(3600));
    assert_eq!(persistent.subscribe(1, "other/#"), 1);

    let h = health_until(http, "saves failing", |status, h| {
        status == 503
            && h["reason"]
                .as_str()
                .is_some_and(|r| r.contains("MQTT sessions"))
    })
    .await;
    assert_eq!(h["status"], "degraded", "{h}");
    let why = h["reason"].as_str().unwrap();
    assert!(why.contains("saving retained messages failed"), "{h}");
    assert!(why.contains("mqtt-retained.json"), "{h}");

    // Everything else is served meanwhile.
    let (code, reason) = publisher.publish(2, "state/plain", b"x", false);
    assert_eq!((code, reason.as_str()), (0, ""));
    assert_eq!(
        watcher.next_publish(),
        ("state/plain".to_string(), b"x".to_vec())
    );

    // The obstacle goes: the next once-a-second save succeeds, and health recovers.
    std::fs::remove_dir_all(&retained_tmp).unwrap();
    std::fs::remove_dir_all(&sessions_tmp).unwrap();
    let h = health_until(http, "saves working again", |status, _| status == 200).await;
    assert_eq!(h["status"], "running", "{h}");
    assert!(h.get("reason").is_none(), "{h}");

    // The retained message is on disk now (saved by the server while running): it survives
    // a crash.
    server.crash();
    let server = common::serve(&data, &[]).unwrap_or_else(|e| panic!("{e}"));
    let mut late = Raw::connect(server.mqtt, "late", None);
    assert_eq!(late.subscribe(1, "state/#"), 1);
    assert_eq!(
        late.next_publish(),
        ("state/lamp".to_string(), b"on".to_vec())
    );
}
