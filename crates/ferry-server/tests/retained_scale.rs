//! A measurement, not a test of behaviour (ignored by default): `ferry serve` on a fresh data
//! directory gets `RETAINED_N` (default 100,000) retained QoS 1 messages of 1 KiB, each to a
//! topic of its own, from `RETAINED_CONNS` (default 32) connections that each keep
//! `RETAINED_WINDOW` (default 16) publishes in flight; then it is stopped (SIGTERM) and
//! started again. Prints the publishing time and rate, the server's peak and current RSS, the
//! restart time (spawn to serving) and RSS after it, and the size of the state on disk; checks
//! that every retained message is there after the restart.
//!
//! `FERRY_BIN=<binary> cargo test -p ferry-server --test retained_scale -- --ignored --nocapture`
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

mod common;

use common::raw::{frame, read, str_bytes};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `VmHWM` and `VmRSS` of `pid`, KiB.
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let m = e.metadata().unwrap();
            total += if m.is_dir() {
                dir_bytes(&e.path())
            } else {
                m.len()
            };
        }
    }
    total
}

fn connect(addr: SocketAddr, client: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(600))).unwrap();
    let body = [
        &[0, 4][..],
        b"MQTT",
        &[5, 0x02, 0, 0],
        &[0],
        &str_bytes(client),
    ]
    .concat();
    s.write_all(&frame(0x10, &body)).unwrap();
    let (kind, ack) = read(&mut s);
    assert_eq!((kind, ack[1]), (0x20, 0), "CONNACK");
    s
}

fn publish_frame(id: u16, topic: &str, payload: &[u8]) -> Vec<u8> {
    let body = [&str_bytes(topic)[..], &id.to_be_bytes(), &[0], payload].concat();
    frame(0x33, &body)
}

/// Publishes retained messages to `topics` with `window` in flight; returns how many were
/// refused (a PUBACK code other than 0).
fn publish_all(addr: SocketAddr, client: &str, topics: Vec<String>, window: usize) -> usize {
    let mut refused = 0;
    let mut s = connect(addr, client);
    let payload = vec![b'x'; 1024];
    let mut in_flight = 0;
    for (i, topic) in topics.iter().enumerate() {
        let id = (i % 60_000) as u16 + 1;
        s.write_all(&publish_frame(id, topic, &payload)).unwrap();
        in_flight += 1;
        if in_flight == window {
            let (kind, ack) = read(&mut s);
            assert_eq!(kind, 0x40);
            refused += usize::from(ack.get(2).copied().unwrap_or(0) != 0);
            in_flight -= 1;
        }
    }
    while in_flight > 0 {
        let (kind, ack) = read(&mut s);
        assert_eq!(kind, 0x40);
        refused += usize::from(ack.get(2).copied().unwrap_or(0) != 0);
        in_flight -= 1;
    }
    refused
}

async fn retained_count(http: SocketAddr) -> u64 {
    let v: serde_json::Value = reqwest::get(format!("http://{http}/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["mqtt"]["retained"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run it with --ignored --nocapture"]
async fn retained_messages_at_scale() {
    let n = env("RETAINED_N", 100_000);
    let conns = env("RETAINED_CONNS", 32);
    let window = env("RETAINED_WINDOW", 16);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = common::serve(&data, &[]).unwrap_or_else(|e| panic!("{e}"));
    let addr = server.mqtt;
    let began = Instant::now();
    let threads: Vec<_> = (0..conns)
        .map(|c| {
            let topics: Vec<String> = (c..n)
                .step_by(conns)
                .map(|i| format!("scale/{:03}/{i}", i % 1000))
                .collect();
            std::thread::spawn(move || publish_all(addr, &format!("p{c}"), topics, window))
        })
        .collect();
    let refused: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let publish = began.elapsed();
    let (hwm, now) = rss(server.child.id());
    let kept = retained_count(server.http).await;
    let stop = server.stop("after publishing");
    let on_disk = dir_bytes(&data);
    let state_on_disk = dir_bytes(&data.join("mqtt-state"))
        + ["mqtt-retained.json", "mqtt-sessions.json"]
            .iter()
            .map(|f| std::fs::metadata(data.join(f)).map_or(0, |m| m.len()))
            .sum::<u64>();
    let began = Instant::now();
    let server = common::serve(&data, &[]).unwrap_or_else(|e| panic!("{e}"));
    let restart = began.elapsed();
    let (r_hwm, r_now) = rss(server.child.id());
    let restored = retained_count(server.http).await;
    println!(
        "retained messages: {n} x 1 KiB over {conns} connections ({window} in flight each)\n\
         refused (PUBACK not 0): {refused}; retained after publishing: {kept}, after the \
         restart: {restored}\n\
         publish: {:.2} s ({:.0}/s); server RSS peak {} MiB, after {} MiB\n\
         stop (SIGTERM): {:.2} s; data directory {} MiB, of which MQTT state {} MiB\n\
         restart (spawn to serving): {:.2} s; RSS peak {} MiB, after {} MiB",
        publish.as_secs_f64(),
        n as f64 / publish.as_secs_f64(),
        hwm / 1024,
        now / 1024,
        stop.as_secs_f64(),
        on_disk >> 20,
        state_on_disk >> 20,
        restart.as_secs_f64(),
        r_hwm / 1024,
        r_now / 1024,
    );
    assert_eq!((refused, kept, restored), (0, n as u64, n as u64));
}
