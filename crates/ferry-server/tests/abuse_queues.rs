//! Abuse: subscribers that never read their socket, and the global topic limit, against the
//! real `ferry serve` with small limits set by a config file. A never-reading subscriber is
//! closed (or, by policy, has its QoS 0 messages dropped) once `mqtt.max_queued_bytes` wait for
//! its socket, the server's memory stays bounded, and another subscriber meanwhile gets every
//! message; past `broker.max_topics` a publish to a new topic is refused (MQTT 5 PUBACK 0x97,
//! MQTT 3.1.1 connection closed, HTTP 507) while existing topics keep working.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;
use common::Server;

const WAIT: Duration = Duration::from_secs(30);
const PAYLOAD: usize = 500_000;
const MIB: u64 = 1 << 20;
/// The Receive Maximum of the subscribers that read: 8 x 500 KB in flight, within the 8 MiB
/// `max_queued_bytes` of these tests (a QoS 1 subscriber may be behind by its whole window).
const READER_WINDOW: u16 = 8;
/// Messages of 500 KB published while a subscriber never reads (400 MB).
const COUNT: u64 = 800;
/// How much the server's RSS may grow while they pass through it: the bounded queues, the
/// readers' windows and what the allocator keeps of the buffers freed meanwhile (measured
/// 110 to 125 MiB; without the bound, every message would stay: 400 MB).
const RSS_GROWTH: u64 = 192 * MIB;

/// Starts `ferry serve` on `dir` with `toml` as its config file (and `extra` flags).
fn serve_with(dir: &Path, toml: &str, extra: &[&str]) -> Server {
    let config = dir.join("abuse.toml");
    std::fs::write(&config, toml).unwrap();
    let data = dir.join("data");
    let mut args = vec!["--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    common::serve(&data, &args).unwrap_or_else(|e| panic!("{e}"))
}

/// The server's resident memory (bytes).
fn rss(server: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// One HTTP/1.1 request; the status and the body.
fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split(' ').nth(1).unwrap().parse().unwrap();
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (status, body.to_string())
}

/// The MQTT counters of `/stats`.
fn mqtt_stats(server: &Server) -> serde_json::Value {
    let (status, body) = http(server.http, "GET", "/stats", b"");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["mqtt"].clone()
}

/// Polls `f` until it holds, or fails with `what`.
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- a raw MQTT client, enough for these tests -------------------------------------------

fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let b = (n % 128) as u8;
        n /= 128;
        out.push(if n > 0 { b | 0x80 } else { b });
        if n == 0 {
            return;
        }
    }
}

fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    varint(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

/// A fixed header byte and the packet's body; `None` at the end of the stream.
fn read_packet(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut first = [0u8; 1];
    s.read_exact(&mut first).ok()?;
    let (mut len, mut mult) = (0usize, 1usize);
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).ok()?;
        len += usize::from(b[0] & 0x7f) * mult;
        mult *= 128;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some((first[0], body))
}

/// Reads a variable byte integer at `body[*at..]`.
fn read_varint(body: &[u8], at: &mut usize) -> usize {
    let (mut n, mut mult) = (0usize, 1usize);
    loop {
        let b = body[*at];
        *at += 1;
        n += usize::from(b & 0x7f) * mult;
        mult *= 128;
        if b & 0x80 == 0 {
            return n;
        }
    }
}

/// Connects with `version` (4: 3.1.1, 5) and returns the socket after a successful CONNACK.
/// `expiry`: a persistent session (clean start off) with that session expiry.
fn connect(addr: SocketAddr, id: &str, version: u8, expiry: Option<u32>) -> TcpStream {
    connect_with(addr, id, version, expiry, None)
}

/// [`connect`] with an MQTT 5 Receive Maximum: a reader keeps at most that many QoS 1
/// messages in flight, so that what it may be behind by stays within `max_queued_bytes`.
fn connect_with(
    addr: SocketAddr,
    id: &str,
    version: u8,
    expiry: Option<u32>,
    receive_maximum: Option<u16>,
) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut body = Vec::new();
    string(b"MQTT", &mut body);
    body.push(version);
    body.push(if expiry.is_some() { 0 } else { 0x02 });
    body.extend_from_slice(&60u16.to_be_bytes());
    if version == 5 {
        let mut props = Vec::new();
        if let Some(e) = expiry {
            props.push(0x11);
            props.extend_from_slice(&e.to_be_bytes());
        }
        if let Some(r) = receive_maximum {
            props.push(0x21);
            props.extend_from_slice(&r.to_be_bytes());
        }
        varint(props.len(), &mut body);
        body.extend_from_slice(&props);
    }
    string(id.as_bytes(), &mut body);
    s.write_all(&packet(0x10, &body)).unwrap();
    let (first, ack) = read_packet(&mut s).unwrap();
    assert_eq!(first >> 4, 2, "CONNACK");
    assert_eq!(ack[1], 0, "CONNACK refused");
    s
}

fn subscribe(s: &mut TcpStream, version: u8, filter: &str, qos: u8) {
    let mut body = 1u16.to_be_bytes().to_vec();
    if version == 5 {
        body.push(0);
    }
    string(filter.as_bytes(), &mut body);
    body.push(qos);
    s.write_all(&packet(0x82, &body)).unwrap();
    let (first, ack) = read_packet(s).unwrap();
    assert_eq!(first >> 4, 9, "SUBACK");
    assert!(*ack.last().unwrap() < 0x80, "subscription refused: {ack:?}");
}

/// Sends a QoS 1 PUBLISH; the PUBACK's reason code and reason string (MQTT 5), or `None` if
/// the server closed the connection instead.
fn publish(
    s: &mut TcpStream,
    version: u8,
    topic: &str,
    payload: &[u8],
    id: u16,
) -> Option<(u8, Option<String>)> {
    let mut body = Vec::new();
    string(topic.as_bytes(), &mut body);
    body.extend_from_slice(&id.to_be_bytes());
    if version == 5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    s.write_all(&packet(0x32, &body)).ok()?;
    let (first, ack) = read_packet(s)?;
    assert_eq!(first >> 4, 4, "PUBACK expected");
    assert_eq!(u16::from_be_bytes([ack[0], ack[1]]), id);
    let code = ack.get(2).copied().unwrap_or(0);
    let mut reason = None;
    if ack.len() > 3 {
        let mut at = 3;
        let end = at + read_varint(&ack, &mut at);
        while at < end {
            let prop = ack[at];
            let len = usize::from(u16::from_be_bytes([ack[at + 1], ack[at + 2]]));
            if prop == 0x1f {
                reason = Some(String::from_utf8_lossy(&ack[at + 3..at + 3 + len]).to_string());
            }
            at += 3 + len;
        }
    }
    Some((code, reason))
}

/// A message's payload: its number, then filler.
fn payload(n: u64) -> Vec<u8> {
    let mut p = vec![b'x'; PAYLOAD];
    p[..8].copy_from_slice(&n.to_be_bytes());
    p
}

/// Reads an MQTT 5 subscriber's socket on a thread, acknowledging QoS 1 messages; sends the
/// number of each message received.
fn reader(mut s: TcpStream) -> mpsc::Receiver<u64> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        while let Some((first, body)) = read_packet(&mut s) {
            if first >> 4 != 3 {
                continue;
            }
            let qos = (first >> 1) & 3;
            let mut at = 2 + usize::from(u16::from_be_bytes([body[0], body[1]]));
            if qos > 0 {
                let id = [body[at], body[at + 1]];
                at += 2;
                if s.write_all(&packet(0x40, &id)).is_err() {
                    return;
                }
            }
            let props = read_varint(&body, &mut at);
            at += props;
            // Payloads that are not numbered read as u64::MAX.
            let n = body
                .get(at..at + 8)
                .map_or(u64::MAX, |b| u64::from_be_bytes(b.try_into().unwrap()));
            if tx.send(n).is_err() {
                return;
            }
        }
    });
    rx
}

/// Receives `count` message numbers from `rx`; every one of `0..count` must come (in order).
fn receive_all(rx: &mpsc::Receiver<u64>, count: u64) {
    for want in 0..count {
        let got = rx
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("message {want} of {count} did not arrive"));
        assert_eq!(got, want, "messages arrive in order, none lost");
    }
}

// ---- slow consumers ------------------------------------------------------------------------

/// A subscriber that never reads, with `max_queued_bytes` at 8 MiB: it is closed and counted,
/// the server's memory stays bounded (in memory, where every byte held would be resident), and
/// another subscriber gets all of 800 x 500 KB messages meanwhile.
#[test]
fn a_subscriber_that_never_reads_is_closed_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_with(
        dir.path(),
        "[mqtt]\nmax_queued_bytes = 8388608\n",
        &["--memory"],
    );
    let before = rss(&server);

    // QoS 0 and QoS 1, MQTT 5, never reading.
    let mut slow = connect(server.mqtt, "slow", 5, None);
    subscribe(&mut slow, 5, "#", 0);
    let mut slow1 = connect(server.mqtt, "slow1", 5, None);
    subscribe(&mut slow1, 5, "q/#", 1);
    let mut fast = connect_with(server.mqtt, "fast", 5, None, Some(READER_WINDOW));
    subscribe(&mut fast, 5, "q/#", 1);
    let received = reader(fast);

    let mut publisher = connect(server.mqtt, "publisher", 5, None);
    let count = COUNT;
    let mut peak = before;
    for n in 0..count {
        let ack = publish(
            &mut publisher,
            5,
            "q/big",
            &payload(n),
            (n % 60_000 + 1) as u16,
        );
        assert_eq!(ack.map(|a| a.0), Some(0), "publish {n} acknowledged");
        peak = peak.max(rss(&server));
    }
    receive_all(&received, count);
    wait_until("both slow consumers are closed and counted", || {
        mqtt_stats(&server)["slow_consumer_disconnects"] == 2
    });
    peak = peak.max(rss(&server));
    // 800 x 500 KB = 400 MB went through; without the bound the never-reading subscribers
    // would hold all of it. With it: 8 MiB queued per slow subscriber, what the kernel socket
    // buffers hold is not the server's, plus the fast subscriber's window.
    let grown = peak.saturating_sub(before);
    eprintln!("RSS {} MiB -> peak {} MiB", before / MIB, peak / MIB);
    assert!(
        grown < RSS_GROWTH,
        "RSS grew by {} MiB (from {} MiB)",
        grown / MIB,
        before / MIB
    );
    // The slow sockets end (whatever the kernel held is readable first).
    for s in [&mut slow, &mut slow1] {
        let mut sink = vec![0u8; 1 << 20];
        loop {
            match s.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("slow socket did not end: {e}"),
            }
        }
    }
    assert!(
        server
            .log_lines()
            .iter()
            .any(|l| l.contains("slow consumer")),
        "a slow consumer is logged"
    );
    let stats = mqtt_stats(&server);
    assert_eq!(stats["slow_consumer_dropped"], 0);
}

/// A persistent session (durable data directory) that never reads is closed once 8 MiB wait
/// for its socket; it keeps its position: on reconnecting it gets every message, none lost.
#[test]
fn a_closed_slow_persistent_session_keeps_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_with(dir.path(), "[mqtt]\nmax_queued_bytes = 8388608\n", &[]);
    let mut slow = connect(server.mqtt, "keeper", 5, Some(600));
    subscribe(&mut slow, 5, "p/#", 1);
    let mut publisher = connect(server.mqtt, "publisher", 5, None);
    let count = 100u64;
    for n in 0..count {
        let ack = publish(&mut publisher, 5, "p/big", &payload(n), (n + 1) as u16);
        assert_eq!(ack.map(|a| a.0), Some(0), "publish {n} acknowledged");
    }
    wait_until("the slow session is closed", || {
        mqtt_stats(&server)["slow_consumer_disconnects"] == 1
    });
    drop(slow);
    wait_until("the session is offline", || {
        mqtt_stats(&server)["sessions_offline"] == 1
    });
    let back = connect_with(server.mqtt, "keeper", 5, Some(600), Some(READER_WINDOW));
    let rx = reader(back);
    let mut got = std::collections::BTreeSet::new();
    let mut order = Vec::new();
    while got.len() < count as usize {
        let n = rx
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("only {} of {count} came back: {order:?}", got.len()));
        got.insert(n);
        order.push(n);
    }
    assert_eq!(got, (0..count).collect(), "every message, none lost");
}

/// `slow_consumer = "drop_oldest"`: a QoS 0 subscriber that never reads stays connected while
/// its oldest queued messages are dropped and counted; another subscriber gets every message.
#[test]
fn drop_oldest_drops_queued_qos0_messages_and_keeps_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_with(
        dir.path(),
        "[mqtt]\nmax_queued_bytes = 8388608\nslow_consumer = \"drop_oldest\"\n",
        &["--memory"],
    );
    let before = rss(&server);
    let mut slow = connect(server.mqtt, "slow", 5, None);
    subscribe(&mut slow, 5, "d/#", 0);
    let mut fast = connect_with(server.mqtt, "fast", 5, None, Some(READER_WINDOW));
    subscribe(&mut fast, 5, "d/#", 1);
    let received = reader(fast);
    let mut publisher = connect(server.mqtt, "publisher", 5, None);
    let count = COUNT;
    let mut peak = before;
    for n in 0..count {
        let ack = publish(&mut publisher, 5, "d/big", &payload(n), (n + 1) as u16);
        assert_eq!(ack.map(|a| a.0), Some(0), "publish {n} acknowledged");
        peak = peak.max(rss(&server));
    }
    receive_all(&received, count);
    wait_until("QoS 0 messages of the slow consumer are dropped", || {
        mqtt_stats(&server)["slow_consumer_dropped"].as_u64() > Some(0)
    });
    let grown = peak.saturating_sub(before);
    eprintln!("RSS {} MiB -> peak {} MiB", before / MIB, peak / MIB);
    assert!(grown < RSS_GROWTH, "RSS grew by {} MiB", grown / MIB);
    let stats = mqtt_stats(&server);
    assert_eq!(stats["slow_consumer_disconnects"], 0, "{stats}");
    // Still connected: it reads what was kept, and a PINGREQ is answered after it.
    slow.write_all(&[0xc0, 0]).unwrap();
    let mut kept = 0u64;
    loop {
        let (first, _) = read_packet(&mut slow).expect("still connected");
        match first >> 4 {
            3 => kept += 1,
            13 => break,
            _ => {}
        }
    }
    let dropped = mqtt_stats(&server)["slow_consumer_dropped"]
        .as_u64()
        .unwrap();
    assert!(kept < count, "some were dropped ({kept} kept)");
    assert_eq!(
        kept + dropped,
        count,
        "every message is either sent or counted as dropped"
    );
}

// ---- the topic limit -----------------------------------------------------------------------

/// `broker.max_topics = 3`: a publish to a fourth topic is refused over MQTT 5 (PUBACK 0x97
/// with a reason string), MQTT 3.1.1 (the connection is closed) and HTTP (507 with the JSON
/// error), nothing of it is stored, existing topics keep working, and the stored topics still
/// count after a restart.
#[test]
fn the_topic_limit_refuses_new_topics_and_existing_ones_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let toml = "[broker]\nmax_topics = 3\n";
    let mut server = serve_with(dir.path(), toml, &[]);
    let mut sub = connect(server.mqtt, "watcher", 5, None);
    subscribe(&mut sub, 5, "#", 1);
    let seen = reader(sub);
    let mut c = connect(server.mqtt, "maker", 5, None);
    for (i, t) in ["t/0", "t/1", "t/2"].iter().enumerate() {
        assert_eq!(
            publish(&mut c, 5, t, &(i as u64).to_be_bytes(), 1).map(|a| a.0),
            Some(0)
        );
    }
    let (code, reason) = publish(&mut c, 5, "t/3", &9u64.to_be_bytes(), 2).unwrap();
    assert_eq!(code, 0x97, "Quota exceeded");
    assert!(
        reason
            .as_deref()
            .is_some_and(|r| r.contains("limit of 3 topics")),
        "{reason:?}"
    );
    // The connection goes on: an existing topic still takes messages.
    assert_eq!(
        publish(&mut c, 5, "t/0", &3u64.to_be_bytes(), 3).map(|a| a.0),
        Some(0)
    );
    let (status, body) = http(server.http, "POST", "/topics/t%2F4/messages", b"x");
    assert_eq!(status, 507, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "topic_limit", "{body}");
    let (status, body) = http(server.http, "POST", "/topics/t%2F1/messages", b"x");
    assert!(status < 300, "an existing topic over HTTP: {status} {body}");
    // MQTT 3.1.1 cannot refuse a publish: the connection is closed.
    let mut old = connect(server.mqtt, "old", 4, None);
    assert_eq!(publish(&mut old, 4, "t/5", b"x", 1), None, "3.1.1: closed");
    // The watcher got the four accepted MQTT messages, then the HTTP one, nothing else.
    for want in [0u64, 1, 2, 3] {
        assert_eq!(seen.recv_timeout(WAIT).unwrap(), want);
    }
    let topics = |s: &Server| {
        let (_, body) = http(s.http, "GET", "/stats", b"");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let mut names: Vec<String> = v["topics"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t["topic"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    };
    assert_eq!(
        topics(&server),
        ["t/0", "t/1", "t/2"],
        "nothing of the refused ones"
    );
    server.stop("ferry serve");

    // After a restart the stored topics (not loaded yet) still count.
    let server = serve_with(dir.path(), toml, &[]);
    let mut c = connect(server.mqtt, "maker", 5, None);
    assert_eq!(
        publish(&mut c, 5, "t/9", b"x", 1).map(|a| a.0),
        Some(0x97),
        "stored topics count"
    );
    assert_eq!(publish(&mut c, 5, "t/2", b"x", 2).map(|a| a.0), Some(0));
}

// ---- measurements (run by hand) -----------------------------------------------------------

/// The figure of the issue: a `#` subscriber (QoS 0 and QoS 1) that never reads while
/// 1,000 x 500 KB are published to one topic, with the default bounds; prints the server's RSS
/// before, at its peak and 3 s after, in memory and on a data directory.
#[test]
#[ignore = "a measurement: cargo test -p ferry-server --test abuse_queues -- --ignored --nocapture"]
fn measure_never_reading_subscribers_with_the_default_bounds() {
    for memory in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let extra: &[&str] = if memory { &["--memory"] } else { &[] };
        let server = serve_with(dir.path(), "", extra);
        let before = rss(&server);
        let mut slow0 = connect(server.mqtt, "slow0", 5, None);
        subscribe(&mut slow0, 5, "#", 0);
        let mut slow1 = connect(server.mqtt, "slow1", 5, None);
        subscribe(&mut slow1, 5, "#", 1);
        let mut publisher = connect(server.mqtt, "publisher", 5, None);
        let mut peak = before;
        for n in 0..1000u64 {
            let ack = publish(&mut publisher, 5, "m/big", &payload(n), (n + 1) as u16);
            assert_eq!(ack.map(|a| a.0), Some(0));
            peak = peak.max(rss(&server));
        }
        std::thread::sleep(Duration::from_secs(3));
        let after = rss(&server);
        let stats = mqtt_stats(&server);
        eprintln!(
            "{}: RSS {} MiB before, {} MiB peak, {} MiB 3 s after; slow consumers closed: {}",
            if memory { "--memory" } else { "data directory" },
            before / MIB,
            peak / MIB,
            after / MIB,
            stats["slow_consumer_disconnects"]
        );
        drop((slow0, slow1));
    }
}

/// RSS per topic: 100,000 topics (`FERRY_MEASURE_TOPICS` to change it) made by one small QoS 1
/// message each, pipelined over 4 connections, in memory and on a data directory.
#[test]
#[ignore = "a measurement: cargo test -p ferry-server --test abuse_queues -- --ignored --nocapture"]
fn measure_memory_per_topic() {
    let topics: u64 = std::env::var("FERRY_MEASURE_TOPICS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    for memory in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let extra: &[&str] = if memory { &["--memory"] } else { &[] };
        let server = serve_with(dir.path(), "", extra);
        std::thread::sleep(Duration::from_secs(1));
        let before = rss(&server);
        let started = Instant::now();
        let per = topics / 4;
        let workers: Vec<_> = (0..4u64)
            .map(|c| {
                let addr = server.mqtt;
                std::thread::spawn(move || {
                    let mut s = connect(addr, &format!("loader{c}"), 5, None);
                    let mut reader = s.try_clone().unwrap();
                    let acks = std::thread::spawn(move || {
                        for _ in 0..per {
                            let (first, body) = read_packet(&mut reader).unwrap();
                            assert_eq!(first >> 4, 4);
                            assert_eq!(body.get(2).copied().unwrap_or(0), 0, "refused");
                        }
                    });
                    let mut out = Vec::new();
                    for i in 0..per {
                        let n = c * per + i;
                        let mut body = Vec::new();
                        string(format!("fleet/{}/dev-{n}", n % 100).as_bytes(), &mut body);
                        body.extend_from_slice(&((i % 60_000 + 1) as u16).to_be_bytes());
                        body.push(0);
                        body.extend_from_slice(b"hello");
                        out.extend_from_slice(&packet(0x32, &body));
                        if out.len() > 32 * 1024 {
                            s.write_all(&out).unwrap();
                            out.clear();
                        }
                    }
                    s.write_all(&out).unwrap();
                    acks.join().unwrap();
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        let elapsed = started.elapsed();
        std::thread::sleep(Duration::from_secs(3));
        let after = rss(&server);
        eprintln!(
            "{}: {topics} topics in {:.1} s; RSS {} MiB -> {} MiB: {} B per topic",
            if memory { "--memory" } else { "data directory" },
            elapsed.as_secs_f64(),
            before / MIB,
            after / MIB,
            after.saturating_sub(before) / topics
        );
    }
}
