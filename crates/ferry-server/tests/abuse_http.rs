//! The HTTP listener under abuse, against the real `ferry serve`: slowloris heads are cut after
//! `http.header_read_timeout_secs`, a stalled body gets 408 after `http.request_timeout_secs`,
//! silent connections past `http.max_connections` / `http.max_connections_per_address` are
//! refused at once with the JSON error while MQTT and other addresses are still served, and
//! the listener serves again once they are gone.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How long a condition may take to come true.
const WAIT: Duration = Duration::from_secs(10);

/// `ferry serve` in memory with `http_toml` as its `[http]` section.
fn serve(dir: &Path, http_toml: &str) -> common::Server {
    let config = dir.join("ferry.toml");
    std::fs::write(&config, format!("[http]\n{http_toml}\n")).unwrap();
    common::serve(
        &dir.join("data"),
        &["--memory", "--config", config.to_str().unwrap()],
    )
    .unwrap()
}

/// A TCP connection from `from` (an address of the loopback network) to `to`.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{from}:0").parse().unwrap()).unwrap();
    s.connect(to).await.unwrap()
}

/// Reads until the peer closes (or resets) the connection, or `limit` passes; what was read
/// and whether it closed.
async fn read_to_close(s: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
            Ok(Ok(0) | Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// The answer to `GET /health` from `from`, if the server gives one.
async fn health_from(from: &str, http: SocketAddr) -> Option<String> {
    let mut s = connect_from(from, http).await;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: ferry\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let (text, _) = read_to_close(&mut s, Duration::from_secs(5)).await;
    (!text.is_empty()).then_some(text)
}

/// Polls `GET /health` from `from` until it answers 200.
async fn health_answers(from: &str, http: SocketAddr, what: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(a) = health_from(from, http).await {
            if a.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{what}: /health did not answer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A new connection from `from` is refused: answered 503 with the JSON error and closed.
async fn refused_from(from: &str, http: SocketAddr) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut s = connect_from(from, http).await;
        let (text, closed) = read_to_close(&mut s, Duration::from_secs(2)).await;
        if closed && text.starts_with("HTTP/1.1 503") {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "a connection past the cap was not refused: {text:?} closed={closed}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An MQTT 3.1.1 client connects and publishes QoS 1 (CONNACK accepted, PUBACK).
async fn mqtt_publishes(mqtt: SocketAddr) {
    let mut s = TcpStream::connect(mqtt).await.unwrap();
    s.write_all(&[
        0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 2, b'c', b'1',
    ])
    .await
    .unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut connack))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
    s.write_all(&[0x32, 7, 0, 1, b't', 0, 1, b'h', b'i'])
        .await
        .unwrap();
    let mut puback = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut puback))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(puback, [0x40, 2, 0, 1]);
}

fn assert_too_many(answer: &str) {
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{answer}"
    );
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["error"], "too_many_connections", "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_heads_are_cut_after_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), "header_read_timeout_secs = 1");
    // A head that never ends.
    let mut silent = TcpStream::connect(server.http).await.unwrap();
    silent
        .write_all(b"GET /health HTTP/1.1\r\nHost: ferry\r\n")
        .await
        .unwrap();
    // A head sent a byte at a time, forever.
    let mut dribble = TcpStream::connect(server.http).await.unwrap();
    dribble
        .write_all(b"GET /health HTTP/1.1\r\nX-Slow: ")
        .await
        .unwrap();
    let began = Instant::now();
    let dribbling = tokio::spawn(async move {
        let mut cut = None;
        for _ in 0..100 {
            if dribble.write_all(b"a").await.is_err() {
                cut = Some(began.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            // A closed connection shows on a read (0) before a write fails.
            let mut b = [0u8; 64];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(1), dribble.read(&mut b)).await
            {
                cut = Some(began.elapsed());
                break;
            }
        }
        cut
    });
    let (text, closed) = read_to_close(&mut silent, WAIT).await;
    assert!(closed, "a never-finished head was not cut");
    assert!(!text.starts_with("HTTP/1.1 200"), "{text}");
    let silent_cut = began.elapsed();
    assert!(silent_cut >= Duration::from_millis(900), "{silent_cut:?}");
    let cut = dribbling.await.unwrap();
    let cut = cut.expect("a head sent a byte at a time was not cut");
    assert!(cut >= Duration::from_millis(900), "{cut:?}");
    // Whole requests are still served.
    health_answers("127.0.0.1", server.http, "after slowloris").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_answered_408_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), "request_timeout_secs = 1");
    let mut s = TcpStream::connect(server.http).await.unwrap();
    s.write_all(
        b"POST /topics/t/messages HTTP/1.1\r\nHost: ferry\r\nContent-Length: 100\r\n\r\nonly part",
    )
    .await
    .unwrap();
    let (text, _) = read_to_close(&mut s, WAIT).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{text}"
    );
    assert!(text.contains("\"error\":\"request_timeout\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_past_the_cap_are_refused_and_mqtt_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(
        dir.path(),
        "max_connections = 8\nmax_connections_per_address = 100\nheader_read_timeout_secs = 60",
    );
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(connect_from("127.0.0.1", server.http).await);
    }
    let answer = refused_from("127.0.0.1", server.http).await;
    assert_too_many(&answer);
    // Another address is refused too: the cap is global.
    let answer = refused_from("127.0.0.2", server.http).await;
    assert_too_many(&answer);
    // MQTT has its own listener and handles.
    mqtt_publishes(server.mqtt).await;
    // The silent ones stay open meanwhile (nothing cut them).
    for s in &mut silent {
        let mut b = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(10), s.read(&mut b))
                .await
                .is_err(),
            "a silent connection was closed"
        );
    }
    drop(silent);
    health_answers("127.0.0.1", server.http, "after the silent ones closed").await;
    assert!(
        server
            .log_lines()
            .iter()
            .any(|l| l.contains("HTTP connection refused")),
        "{}",
        server.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_at_its_cap_leaves_others_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(
        dir.path(),
        "max_connections = 100\nmax_connections_per_address = 4\nheader_read_timeout_secs = 60",
    );
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(connect_from("127.0.0.1", server.http).await);
    }
    let answer = refused_from("127.0.0.1", server.http).await;
    assert_too_many(&answer);
    assert!(answer.contains("max_connections_per_address"), "{answer}");
    health_answers("127.0.0.2", server.http, "another address").await;
    mqtt_publishes(server.mqtt).await;
    drop(silent);
    health_answers("127.0.0.1", server.http, "the capped address, freed").await;
    let metrics = reqwest::get(format!("http://{}/metrics", server.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // At least the refusal above (polling /health while the freed slots come back may add some).
    let counted = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("ferry_refused_total{reason=\"http_connections_per_address\"} ")
        })
        .and_then(|n| n.parse::<f64>().ok());
    assert!(
        counted.is_some_and(|n| n >= 1.0),
        "the refusal is not counted in /metrics:\n{metrics}"
    );
}
