//! SIGKILL crash test of a real `ferry serve` process on one data directory.
//!
//! Each cycle publishes over MQTT (QoS 1) to topics created in that cycle and to one topic that
//! exists from before the first cycle, publishes over HTTP to a topic read by an HTTP consumer
//! group created in that cycle, and in some cycles publishes a retained message just before the
//! kill. After a random delay the server gets SIGKILL, is started again on the same data
//! directory, and the test checks, each property on its own (see the `P_*` constants):
//! - every acknowledged MQTT message reaches the persistent session subscribed to `crash/#`
//!   before the first cycle (split: the topic that existed before the cycle / topics created in
//!   the cycle), duplicates allowed and counted;
//! - every payload delivered anywhere parses, matches its topic and was published by the test;
//! - persistent sessions are still there after the restart (the one made before the first
//!   cycle, and one made in the cycle, which must also get the cycle's messages);
//! - the HTTP consumer group made in the cycle fetches every acknowledged HTTP publish;
//! - the retained message acknowledged just before the kill is there after the restart, and
//!   retained messages seen after earlier restarts are still there.
//!
//! It also checks that the server answers at all while a cycle creates its topics and group.
//!
//! Cycles: `FERRY_CRASH_CYCLES` (default 20). Seed: `FERRY_CRASH_SEED` (printed). Run with
//! `-- --nocapture` to see the per-cycle lines and the summary table.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{ConnectProperties, Packet, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

mod common;
use common::{Server, START_WAIT};

/// Waiting for deliveries after a restart: give up after this long without any progress...
const QUIET: Duration = Duration::from_millis(1500);
/// ...or after this long in all.
const LIMIT: Duration = Duration::from_secs(10);
/// The longest pause between the topics appearing and the kill.
const MAX_DELAY_MS: u64 = 1500;
/// The persistent session subscribed to `crash/#` before the first cycle.
const MAIN_SESSION: &str = "crash-main-session";
/// The topic that exists from before the first cycle.
const EXISTING: &str = "crash/existing";

// The properties, each checked and reported on its own.
const P_EXISTING: &str = "mqtt-existing-topic";
const P_NEW: &str = "mqtt-new-topics";
const P_INTEGRITY: &str = "payload-integrity";
const P_MAIN_SESSION: &str = "main-session-present";
const P_CYCLE_SESSION: &str = "cycle-session-present";
const P_CYCLE_SESSION_DELIVERY: &str = "cycle-session-delivery";
const P_HTTP: &str = "http-group";
const P_RETAINED: &str = "retained";
const P_RETAINED_KEPT: &str = "retained-kept";
const P_LIVENESS: &str = "server-responsive";
/// How long the server may take to acknowledge the first publish of every publisher of a cycle
/// and to create its HTTP group (it takes milliseconds).
const LIVENESS_WAIT: Duration = Duration::from_secs(5);
const PROPERTIES: [(&str, &str); 10] = [
    (
        P_LIVENESS,
        "the server answers: each cycle's first publishes are acked and its HTTP group made within 5 s",
    ),
    (
        P_EXISTING,
        "the session made before cycle 0 gets every acked MQTT message on the topic that existed before the cycle",
    ),
    (
        P_NEW,
        "the session made before cycle 0 gets every acked MQTT message on the topics created in the cycle",
    ),
    (
        P_INTEGRITY,
        "every delivered payload parses, has its checksum, matches its topic and was published by the test",
    ),
    (
        P_MAIN_SESSION,
        "the session made before cycle 0 is present (session present) after each restart",
    ),
    (
        P_CYCLE_SESSION,
        "a persistent session subscribed in the cycle (just before publishing) is present after the restart",
    ),
    (
        P_CYCLE_SESSION_DELIVERY,
        "that session gets every acked MQTT message on the cycle's new topics",
    ),
    (
        P_HTTP,
        "an HTTP consumer group created in the cycle fetches every HTTP publish acked with 201",
    ),
    (
        P_RETAINED,
        "a retained message acked (PUBACK) just before the kill is retained after the restart",
    ),
    (
        P_RETAINED_KEPT,
        "retained messages seen after earlier restarts are still retained",
    ),
];

// ---------------------------------------------------------------------------------------------
// The server process

/// Starts `ferry serve` on `dir` (ephemeral ports) and waits until it serves.
fn serve(dir: &Path) -> Server {
    common::serve(dir, &[]).unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------------------------------------
// Payloads: `c<cycle>|<source>|<seq>|<topic>|<fnv-1a of the rest>`, unique per message.

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn payload(cycle: usize, source: &str, seq: u64, topic: &str) -> String {
    let body = format!("c{cycle}|{source}|{seq}|{topic}");
    format!("{body}|{:016x}", fnv(&body))
}

/// Checks that `payload` parses and was published to `topic`.
fn check_payload(topic: &str, payload: &[u8]) -> Result<String, String> {
    let s = std::str::from_utf8(payload).map_err(|_| format!("not UTF-8: {payload:?}"))?;
    let (body, hash) = s
        .rsplit_once('|')
        .ok_or_else(|| format!("no checksum: {s:?}"))?;
    if format!("{:016x}", fnv(body)) != hash {
        return Err(format!("bad checksum: {s:?}"));
    }
    let fields: Vec<&str> = body.splitn(4, '|').collect();
    if fields.len() != 4 || !fields[0].starts_with('c') || fields[2].parse::<u64>().is_err() {
        return Err(format!("bad fields: {s:?}"));
    }
    if fields[3] != topic {
        return Err(format!(
            "published to {} but delivered on {topic}",
            fields[3]
        ));
    }
    Ok(s.to_string())
}

// ---------------------------------------------------------------------------------------------
// A minimal blocking MQTT 3.1.1 publisher: one QoS 1 PUBLISH at a time, so that the PUBACK read
// is the acknowledgement of exactly that message.

struct RawPublisher {
    s: TcpStream,
    next_id: u16,
}

fn put_len(buf: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        buf.push(b);
        if n == 0 {
            return;
        }
    }
}

fn put_str(buf: &mut Vec<u8>, s: &[u8]) {
    buf.extend_from_slice(&(s.len() as u16).to_be_bytes());
    buf.extend_from_slice(s);
}

impl RawPublisher {
    fn connect(addr: SocketAddr, client_id: &str) -> std::io::Result<RawPublisher> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut body = Vec::new();
        put_str(&mut body, b"MQTT");
        body.extend_from_slice(&[4, 0x02, 0, 60]); // 3.1.1, clean session, keep-alive 60 s
        put_str(&mut body, client_id.as_bytes());
        let mut packet = vec![0x10];
        put_len(&mut packet, body.len());
        packet.extend_from_slice(&body);
        s.write_all(&packet)?;
        let mut connack = [0u8; 4];
        s.read_exact(&mut connack)?;
        if connack[0] != 0x20 || connack[3] != 0 {
            return Err(std::io::Error::other(format!("CONNACK {connack:?}")));
        }
        Ok(RawPublisher { s, next_id: 1 })
    }

    /// Publishes with QoS 1 and returns once the PUBACK arrived.
    fn publish(&mut self, topic: &str, payload: &[u8], retain: bool) -> std::io::Result<()> {
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        let mut packet = vec![0x32 | u8::from(retain)];
        put_len(&mut packet, 2 + topic.len() + 2 + payload.len());
        put_str(&mut packet, topic.as_bytes());
        packet.extend_from_slice(&id.to_be_bytes());
        packet.extend_from_slice(payload);
        self.s.write_all(&packet)?;
        let mut puback = [0u8; 4];
        self.s.read_exact(&mut puback)?;
        let [hi, lo] = id.to_be_bytes();
        if puback != [0x40, 0x02, hi, lo] {
            return Err(std::io::Error::other(format!(
                "expected PUBACK {id}, got {puback:?}"
            )));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// What was published

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// MQTT, to the topic that exists from before the first cycle.
    Existing,
    /// MQTT, to a topic created in the cycle.
    New,
    /// HTTP, to the HTTP group's topic.
    Http,
}

/// One cycle's publishes.
#[derive(Default)]
struct Ledger {
    /// Every payload written to a socket (acknowledged or not).
    sent: HashSet<String>,
    /// Acknowledged payloads and their kind.
    acked: Vec<(String, Kind)>,
    /// Sources that got their first acknowledgement on a topic new in this cycle.
    appeared: HashSet<String>,
}

impl Ledger {
    fn acked(&self, kinds: &[Kind]) -> Vec<String> {
        self.acked
            .iter()
            .filter(|(_, k)| kinds.contains(k))
            .map(|(p, _)| p.clone())
            .collect()
    }
}

/// Publisher `n` of `cycle`: alternates between its own new topic and [`EXISTING`] until the
/// connection breaks (the kill) or `stop`.
fn mqtt_publisher(
    addr: SocketAddr,
    cycle: usize,
    n: usize,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
) {
    let source = format!("p{n}");
    let new_topic = format!("crash/c{cycle}/p{n}");
    let Ok(mut c) = RawPublisher::connect(addr, &format!("crash-pub-c{cycle}-p{n}")) else {
        return;
    };
    for seq in 0.. {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let (topic, kind) = if seq % 2 == 0 {
            (new_topic.as_str(), Kind::New)
        } else {
            (EXISTING, Kind::Existing)
        };
        let p = payload(cycle, &source, seq, topic);
        ledger.lock().unwrap().sent.insert(p.clone());
        if c.publish(topic, p.as_bytes(), false).is_err() {
            return;
        }
        let mut l = ledger.lock().unwrap();
        l.acked.push((p, kind));
        l.appeared.insert(source.clone());
        drop(l);
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn http_topic(cycle: usize) -> String {
    format!("crashhttp/c{cycle}")
}

fn http_group(cycle: usize) -> String {
    format!("g{cycle}")
}

fn http_url(server: SocketAddr, topic: &str, rest: &str) -> String {
    format!(
        "http://{server}/topics/{}/{rest}",
        topic.replace('/', "%2F")
    )
}

/// Creates the cycle's HTTP consumer group (a first fetch on its new topic), then publishes to
/// that topic over HTTP until the server goes away or `stop`.
async fn http_publisher(
    http: reqwest::Client,
    server: SocketAddr,
    cycle: usize,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
) {
    let topic = http_topic(cycle);
    let group = http_group(cycle);
    let url = http_url(
        server,
        &topic,
        &format!("groups/{group}/fetch?max=1&wait_ms=0"),
    );
    // A server that does not answer is reported by the cycle (see P_LIVENESS).
    let Ok(r) = http.post(url).send().await else {
        return;
    };
    assert_eq!(r.status(), 200, "creating group {group}: {r:?}");
    let Ok(v) = r.json::<serde_json::Value>().await else {
        return;
    };
    assert_eq!(v["messages"].as_array().map(Vec::len), Some(0), "{v}");
    for seq in 0.. {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let p = payload(cycle, "http", seq, &topic);
        ledger.lock().unwrap().sent.insert(p.clone());
        let sent = http
            .post(http_url(server, &topic, "messages"))
            .body(p.clone())
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                let mut l = ledger.lock().unwrap();
                l.acked.push((p, Kind::Http));
                l.appeared.insert("http".into());
            }
            _ => return,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Subscribers (rumqttc, MQTT 5)

/// What a subscriber received.
#[derive(Default)]
struct Inbox {
    /// Valid payloads and how often each came.
    counts: HashMap<String, u32>,
    /// Deliveries of a payload already received.
    dups: u64,
    /// Payloads that failed [`check_payload`], with the reason.
    corrupt: Vec<String>,
    /// Deliveries so far (progress).
    total: u64,
    /// Retained deliveries: topic -> payload.
    retained: HashMap<String, String>,
}

type SharedInbox = Arc<Mutex<Inbox>>;

struct Sub {
    client: AsyncClient,
    task: JoinHandle<()>,
    acks: mpsc::UnboundedReceiver<Vec<SubscribeReasonCode>>,
    session_present: bool,
}

/// Connects a v5 client (persistent: clean start off, session expiry one hour) and waits for
/// its CONNACK; the PUBLISHes it gets go to `inbox`.
async fn connect(addr: SocketAddr, id: &str, persistent: bool, inbox: SharedInbox) -> Sub {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_start(!persistent);
    if persistent {
        let mut props = ConnectProperties::new();
        props.session_expiry_interval = Some(3600);
        o.set_connect_properties(props);
    }
    let (client, mut el) = AsyncClient::new(o, 16);
    let (conn_tx, mut conn_rx) = mpsc::unbounded_channel();
    let (ack_tx, acks) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        // Ends at the first error (the server was killed): no reconnection to a dead address.
        while let Ok(ev) = el.poll().await {
            match ev {
                Event::Incoming(Packet::ConnAck(a)) => {
                    let _ = conn_tx.send(a.session_present);
                }
                Event::Incoming(Packet::SubAck(a)) => {
                    let _ = ack_tx.send(a.return_codes);
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    let mut i = inbox.lock().unwrap();
                    i.total += 1;
                    match check_payload(&topic, &p.payload) {
                        Ok(s) => {
                            if p.retain {
                                i.retained.insert(topic, s.clone());
                            }
                            let n = i.counts.entry(s).or_insert(0);
                            *n += 1;
                            if *n > 1 {
                                i.dups += 1;
                            }
                        }
                        Err(why) => i.corrupt.push(why),
                    }
                }
                _ => {}
            }
        }
    });
    let session_present = tokio::time::timeout(START_WAIT, conn_rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no CONNACK for {id}"))
        .unwrap_or_else(|| panic!("{id}: connection ended before CONNACK"));
    Sub {
        client,
        task,
        acks,
        session_present,
    }
}

impl Sub {
    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        let codes = tokio::time::timeout(START_WAIT, self.acks.recv())
            .await
            .unwrap_or_else(|_| panic!("no SUBACK for {filter}"))
            .unwrap();
        assert_eq!(
            codes,
            vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)],
            "{filter}"
        );
    }

    async fn close(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }
}

/// Waits until `inbox` holds every payload of `expected`, giving up after [`QUIET`] without new
/// deliveries or [`LIMIT`] in all; returns the payloads still missing.
async fn missing_from(inbox: &SharedInbox, expected: &[String]) -> Vec<String> {
    let start = Instant::now();
    let mut last_total = u64::MAX;
    let mut last_progress = start;
    loop {
        let (missing, total) = {
            let i = inbox.lock().unwrap();
            let missing: Vec<String> = expected
                .iter()
                .filter(|p| !i.counts.contains_key(*p))
                .cloned()
                .collect();
            (missing, i.total)
        };
        if missing.is_empty() {
            return missing;
        }
        let now = Instant::now();
        if total != last_total {
            last_total = total;
            last_progress = now;
        }
        if now - last_progress > QUIET || now - start > LIMIT {
            return missing;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Fetches (and acks) from the cycle's HTTP group until every `expected` payload came, or
/// nothing came for a while; returns (missing, duplicates, corrupt, receipts not settled).
async fn drain_http_group(
    http: &reqwest::Client,
    server: SocketAddr,
    cycle: usize,
    expected: &[String],
) -> (Vec<String>, u64, Vec<String>, usize) {
    let topic = http_topic(cycle);
    let group = http_group(cycle);
    let mut got: HashMap<String, u32> = HashMap::new();
    let (mut dups, mut corrupt, mut unsettled) = (0, Vec::new(), 0);
    let start = Instant::now();
    let mut empty = 0;
    loop {
        let missing: Vec<String> = expected
            .iter()
            .filter(|p| !got.contains_key(*p))
            .cloned()
            .collect();
        if missing.is_empty() || empty >= 4 || start.elapsed() > LIMIT {
            return (missing, dups, corrupt, unsettled);
        }
        let url = http_url(
            server,
            &topic,
            &format!("groups/{group}/fetch?max=1000&wait_ms=300"),
        );
        let r = http.post(url).send().await.unwrap();
        assert_eq!(r.status(), 200, "fetch from {group} after the restart");
        let v: serde_json::Value = r.json().await.unwrap();
        let messages = v["messages"].as_array().cloned().unwrap_or_default();
        if messages.is_empty() {
            empty += 1;
            continue;
        }
        empty = 0;
        let mut receipts = Vec::new();
        for m in &messages {
            receipts.push(m["receipt"].as_str().unwrap().to_string());
            let p = m["payload"].as_str().unwrap_or_default();
            match check_payload(m["topic"].as_str().unwrap_or_default(), p.as_bytes()) {
                Ok(p) => {
                    let n = got.entry(p).or_insert(0);
                    *n += 1;
                    if *n > 1 {
                        dups += 1;
                    }
                }
                Err(why) => corrupt.push(why),
            }
        }
        let r = http
            .post(http_url(server, &topic, &format!("groups/{group}/ack")))
            .json(&serde_json::json!({ "receipts": receipts }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "ack on {group}");
        let v: serde_json::Value = r.json().await.unwrap();
        let settled = v["settled"].as_u64().unwrap_or(0) as usize;
        unsettled += receipts.len().saturating_sub(settled);
    }
}

/// A fresh clean subscriber to `crash/retained/#`: returns the topics of `expected` whose
/// retained message did not come (or came with another payload).
async fn missing_retained(
    addr: SocketAddr,
    cycle: usize,
    expected: &BTreeMap<String, String>,
) -> Vec<String> {
    let inbox = SharedInbox::default();
    let mut sub = connect(
        addr,
        &format!("crash-retained-c{cycle}"),
        false,
        inbox.clone(),
    )
    .await;
    sub.subscribe("crash/retained/#").await;
    let start = Instant::now();
    let missing = loop {
        let missing: Vec<String> = {
            let i = inbox.lock().unwrap();
            expected
                .iter()
                .filter(|(t, p)| i.retained.get(*t) != Some(*p))
                .map(|(t, p)| match i.retained.get(t) {
                    Some(other) => format!("{t}: got {other:?} instead of {p:?}"),
                    None => format!("{t}: none (published {p:?})"),
                })
                .collect()
        };
        if missing.is_empty() || start.elapsed() > QUIET {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    sub.close().await;
    missing
}

// ---------------------------------------------------------------------------------------------
// Reporting

struct Failure {
    property: &'static str,
    cycle: usize,
    detail: String,
}

#[derive(Default)]
struct Report {
    checked: BTreeMap<&'static str, usize>,
    failures: Vec<Failure>,
}

fn sample(items: &[String]) -> String {
    let shown: Vec<&str> = items.iter().take(8).map(String::as_str).collect();
    let more = items.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{shown:?} and {more} more")
    } else {
        format!("{shown:?}")
    }
}

impl Report {
    fn check(
        &mut self,
        property: &'static str,
        cycle: usize,
        ok: bool,
        detail: impl FnOnce() -> String,
    ) {
        *self.checked.entry(property).or_default() += 1;
        if !ok {
            let detail = detail();
            eprintln!("  FAILED {property} in cycle {cycle}: {detail}");
            self.failures.push(Failure {
                property,
                cycle,
                detail,
            });
        }
    }

    fn failed(&self, property: &str) -> Vec<&Failure> {
        self.failures
            .iter()
            .filter(|f| f.property == property)
            .collect()
    }

    fn summary(&self) -> String {
        let mut s = String::from("property                 failed/checked  failed cycles\n");
        for (p, what) in PROPERTIES {
            let failed = self.failed(p);
            let cycles: Vec<usize> = failed.iter().map(|f| f.cycle).collect();
            s.push_str(&format!(
                "{p:<24} {:>3}/{:<3}         {cycles:?}   ({what})\n",
                failed.len(),
                self.checked.get(p).copied().unwrap_or(0),
            ));
        }
        s
    }

    /// Fails the test if `property` failed in any cycle.
    fn require(&self, property: &str) {
        let failed = self.failed(property);
        let details: Vec<String> = failed
            .iter()
            .map(|f| format!("cycle {}: {}", f.cycle, f.detail))
            .collect();
        assert!(
            failed.is_empty(),
            "property {property} failed in {} of {} cycles:\n{}\n\n{}",
            failed.len(),
            self.checked.get(property).copied().unwrap_or(0),
            details.join("\n"),
            self.summary()
        );
    }
}

/// xorshift64*: the test's random choices, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Polls until `f` holds, or panics with `what` after `limit`.
async fn until(what: &str, limit: Duration, f: impl FnMut() -> bool) {
    assert!(poll_until(limit, f).await, "timed out waiting for {what}");
}

/// Polls until `f` holds (true) or `limit` passed (false).
async fn poll_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// The threads of process `pid`: name and kernel wait channel (`futex_wait_queue`... for a
/// thread blocked on a lock), and the CPU time the process used within 200 ms: tells a
/// deadlock (no CPU) from a busy server.
async fn threads_of(pid: u32) -> String {
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // utime and stime: fields 14 and 15, counted after the ")" that ends the name.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
    };
    let before = cpu();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let used = cpu().saturating_sub(before);
    let mut threads = Vec::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in dir.flatten() {
            let read = |f: &str| {
                std::fs::read_to_string(t.path().join(f))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_else(|_| "?".into())
            };
            threads.push(format!("{}:{}", read("comm"), read("wchan")));
        }
    }
    threads.sort();
    format!("CPU ticks used in 200 ms: {used}; threads (name:wait channel): {threads:?}")
}

fn file_contains(path: &Path, needle: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle))
}

/// The bytes of the MQTT state store's segments (retained messages and sessions are records
/// there, their names and payloads stored as they are), as text, for searching.
fn state_store_text(dir: &Path) -> String {
    let mut text = String::new();
    if let Ok(entries) = std::fs::read_dir(dir.join("mqtt-state")) {
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                let bytes = std::fs::read(e.path()).unwrap_or_default();
                text.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
    }
    text
}

/// The state files of the data directory as the kill left them (for failure reports).
struct StateAtKill {
    /// `positions.json`: positions key -> topic -> offset.
    positions: serde_json::Value,
    sessions: String,
    retained: String,
}

impl StateAtKill {
    fn read(dir: &Path) -> StateAtKill {
        let text = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        StateAtKill {
            positions: serde_json::from_str(&text("positions.json")).unwrap_or_default(),
            sessions: state_store_text(dir),
            retained: state_store_text(dir),
        }
    }

    /// The saved position of consumer group `group` on `topic`.
    fn position(&self, group: &str, topic: &str) -> String {
        match self.positions[format!("group:{group}")][topic].as_u64() {
            Some(o) => format!("saved position {o}"),
            None => "no saved position".into(),
        }
    }

    fn group_saved(&self, group: &str) -> bool {
        self.positions.get(format!("group:{group}")).is_some()
    }
}

/// The next offset of `topic` (from `/stats/{topic}`).
async fn next_offset(http: &reqwest::Client, server: SocketAddr, topic: &str) -> String {
    let url = format!("http://{server}/stats/{}", topic.replace('/', "%2F"));
    match http.get(url).send().await {
        Ok(r) if r.status().is_success() => {
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            format!("log next_offset {}", v["next_offset"])
        }
        Ok(r) => format!("/stats: {}", r.status()),
        Err(e) => format!("/stats: {e}"),
    }
}

/// Where the missing MQTT messages of a cycle's new topics were: each is the message of offset
/// seq / 2 of its publisher's topic (even sequence numbers go there, one at a time).
async fn explain_new(
    http: &reqwest::Client,
    server: SocketAddr,
    state: &StateAtKill,
    group: &str,
    missing: &[String],
) -> String {
    let mut by_topic: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for p in missing {
        let f: Vec<&str> = p.split('|').collect();
        by_topic
            .entry(f[3].to_string())
            .or_default()
            .push(f[2].parse::<u64>().unwrap() / 2);
    }
    let mut out = Vec::new();
    for (topic, offsets) in by_topic {
        out.push(format!(
            "{topic}: offsets {offsets:?} missing; at the kill {} of {group}; after the restart {}",
            state.position(group, &topic),
            next_offset(http, server, &topic).await
        ));
    }
    out.join("; ")
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_cycles_lose_no_acknowledged_message() {
    let cycles = env_u64("FERRY_CRASH_CYCLES").unwrap_or(20) as usize;
    let seed = env_u64("FERRY_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    eprintln!("crash test: {cycles} cycles, FERRY_CRASH_SEED={seed}");
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    let mut rng = Rng((z ^ (z >> 31)) | 1);
    let began = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();

    // Setup: the main persistent session on crash/#, and the topic that exists from before the
    // first cycle; both saved (the session file and the group's position) before cycle 0.
    let mut server = serve(dir.path());
    let main_inbox = SharedInbox::default();
    let mut main = connect(server.mqtt, MAIN_SESSION, true, main_inbox.clone()).await;
    assert!(!main.session_present);
    main.subscribe("crash/#").await;
    let setup = payload(0, "setup", 0, EXISTING);
    RawPublisher::connect(server.mqtt, "crash-setup")
        .unwrap()
        .publish(EXISTING, setup.as_bytes(), false)
        .unwrap();
    let setup_retained = payload(0, "setup", 0, "crash/retained/setup");
    RawPublisher::connect(server.mqtt, "crash-setup-retained")
        .unwrap()
        .publish("crash/retained/setup", setup_retained.as_bytes(), true)
        .unwrap();
    let mut all_sent: HashSet<String> = HashSet::from([setup.clone(), setup_retained.clone()]);
    let expected = [setup, setup_retained.clone()];
    assert!(missing_from(&main_inbox, &expected).await.is_empty());
    until(
        "the main session and its position on the existing topic to be saved",
        Duration::from_secs(10),
        || {
            let state = state_store_text(dir.path());
            state.contains(MAIN_SESSION)
                && file_contains(&dir.path().join("positions.json"), EXISTING)
                && state.contains("crash/retained/setup")
        },
    )
    .await;

    let mut report = Report::default();
    // Retained messages published so far that were seen after a restart: topic -> payload.
    let mut retained_kept = BTreeMap::from([("crash/retained/setup".to_string(), setup_retained)]);
    let (mut total_acked, mut total_dups, mut total_http_dups) = (0usize, 0u64, 0u64);

    for cycle in 0..cycles {
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let stop = Arc::new(AtomicBool::new(false));

        // A persistent session subscribed now, before this cycle's topics exist.
        let cycle_session = format!("crash-cycle-session-c{cycle}");
        let cycle_inbox = SharedInbox::default();
        let mut cs = connect(server.mqtt, &cycle_session, true, cycle_inbox.clone()).await;
        cs.subscribe(&format!("crash/c{cycle}/#")).await;

        // Publishers: MQTT (2-4) and HTTP.
        let publishers = 2 + rng.below(3) as usize;
        let threads: Vec<_> = (0..publishers)
            .map(|n| {
                let (ledger, stop, addr) = (ledger.clone(), stop.clone(), server.mqtt);
                std::thread::spawn(move || mqtt_publisher(addr, cycle, n, ledger, stop))
            })
            .collect();
        let http_task = tokio::spawn(http_publisher(
            http.clone(),
            server.http,
            cycle,
            ledger.clone(),
            stop.clone(),
        ));
        let answered = poll_until(LIVENESS_WAIT, || {
            ledger.lock().unwrap().appeared.len() == publishers + 1
        })
        .await;
        // What the server did not answer in time (P_LIVENESS).
        let mut unanswered = Vec::new();
        if !answered {
            let appeared = ledger.lock().unwrap().appeared.clone();
            unanswered.push(format!(
                "after {LIVENESS_WAIT:?} only {appeared:?} of {publishers} MQTT publishers (p*) \
                 and the HTTP group (http) had their first acknowledgement, so the server is \
                 killed now; {}",
                threads_of(server.child.id()).await
            ));
        }

        let delay = Duration::from_millis(rng.below(MAX_DELAY_MS + 1));
        let delay = if answered { delay } else { Duration::ZERO };
        let retained_cycle = cycle % 2 == 0 && answered;
        let mut retained_publisher = retained_cycle.then(|| {
            let r = RawPublisher::connect(server.mqtt, &format!("crash-ret-pub-c{cycle}"));
            let r = r.unwrap();
            r.s.set_read_timeout(Some(LIVENESS_WAIT)).unwrap();
            r
        });
        tokio::time::sleep(delay).await;
        let mut retained_now = None;
        if let Some(r) = &mut retained_publisher {
            let topic = format!("crash/retained/c{cycle}");
            let p = payload(cycle, "retained", 0, &topic);
            ledger.lock().unwrap().sent.insert(p.clone());
            match r.publish(&topic, p.as_bytes(), true) {
                Ok(()) => retained_now = Some((topic, p)),
                Err(e) => unanswered.push(format!(
                    "the retained publish to {topic} got no PUBACK ({e}); {}",
                    threads_of(server.child.id()).await
                )),
            }
        }

        // SIGKILL.
        server.crash();
        report.check(P_LIVENESS, cycle, unanswered.is_empty(), || {
            unanswered.join("; ")
        });
        let at_kill = StateAtKill::read(dir.path());
        stop.store(true, Ordering::Release);
        for t in threads {
            t.join().unwrap();
        }
        http_task.await.unwrap();
        drop(retained_publisher);
        main.task.abort();
        cs.task.abort();

        let (acked_existing, acked_new, acked_http, sent) = {
            let l = ledger.lock().unwrap();
            (
                l.acked(&[Kind::Existing]),
                l.acked(&[Kind::New]),
                l.acked(&[Kind::Http]),
                l.sent.clone(),
            )
        };
        all_sent.extend(sent.iter().cloned());
        total_acked += acked_existing.len() + acked_new.len() + acked_http.len();

        // Restart on the same data directory.
        let restart = Instant::now();
        server = serve(dir.path());
        let restart = restart.elapsed();

        // The main session.
        let dups_before = main_inbox.lock().unwrap().dups;
        main = connect(server.mqtt, MAIN_SESSION, true, main_inbox.clone()).await;
        report.check(P_MAIN_SESSION, cycle, main.session_present, || {
            "CONNACK session present = false after the restart (resubscribed to go on)".into()
        });
        if !main.session_present {
            main.subscribe("crash/#").await;
        }
        let main_group = format!("mqtt/session/{MAIN_SESSION}/crash/#");
        let missing_existing = missing_from(&main_inbox, &acked_existing).await;
        report.check(P_EXISTING, cycle, missing_existing.is_empty(), || {
            format!(
                "{} of {} acked messages on {EXISTING} never delivered ({} at the kill): {}",
                missing_existing.len(),
                acked_existing.len(),
                at_kill.position(&main_group, EXISTING),
                sample(&missing_existing)
            )
        });
        let missing_new = missing_from(&main_inbox, &acked_new).await;
        let why = if missing_new.is_empty() {
            String::new()
        } else {
            explain_new(&http, server.http, &at_kill, &main_group, &missing_new).await
        };
        report.check(P_NEW, cycle, missing_new.is_empty(), || {
            format!(
                "{} of {} acked messages on crash/c{cycle}/p* never delivered: {} [{why}]",
                missing_new.len(),
                acked_new.len(),
                sample(&missing_new)
            )
        });
        let dups = main_inbox.lock().unwrap().dups - dups_before;
        total_dups += dups;

        // The session made in this cycle.
        let cs_inbox_dups = cycle_inbox.lock().unwrap().dups;
        cs = connect(server.mqtt, &cycle_session, true, cycle_inbox.clone()).await;
        report.check(P_CYCLE_SESSION, cycle, cs.session_present, || {
            format!(
                "{cycle_session} (subscribed to crash/c{cycle}/# before publishing): CONNACK \
                 session present = false; in the MQTT state store at the kill: {}",
                at_kill.sessions.contains(&cycle_session)
            )
        });
        let missing_cs = missing_from(&cycle_inbox, &acked_new).await;
        report.check(P_CYCLE_SESSION_DELIVERY, cycle, missing_cs.is_empty(), || {
            format!(
                "{cycle_session}: {} of {} acked messages on crash/c{cycle}/p* never delivered{}: {}",
                missing_cs.len(),
                acked_new.len(),
                if cs.session_present { "" } else { " (session lost)" },
                sample(&missing_cs)
            )
        });
        let cs_dups = cycle_inbox.lock().unwrap().dups - cs_inbox_dups;
        cs.task.abort();
        // Ends the session (clean start, no session expiry) so that its group goes away.
        connect(server.mqtt, &cycle_session, false, SharedInbox::default())
            .await
            .close()
            .await;

        // The HTTP group made in this cycle.
        let (missing_http, http_dups, http_corrupt, unsettled) =
            drain_http_group(&http, server.http, cycle, &acked_http).await;
        total_http_dups += http_dups;
        let http_next = next_offset(&http, server.http, &http_topic(cycle)).await;
        report.check(P_HTTP, cycle, missing_http.is_empty(), || {
            format!(
                "group {} on {}: {} of {} acked messages never fetched (group in positions.json \
                 at the kill: {}; {} after the restart): {}",
                http_group(cycle),
                http_topic(cycle),
                missing_http.len(),
                acked_http.len(),
                at_kill.group_saved(&format!(
                    "mqtt/share/{}/{}",
                    http_group(cycle),
                    http_topic(cycle)
                )),
                http_next,
                sample(&missing_http)
            )
        });

        // Retained messages.
        let mut expected_retained = retained_kept.clone();
        if let Some((t, p)) = &retained_now {
            expected_retained.insert(t.clone(), p.clone());
        }
        let missing = missing_retained(server.mqtt, cycle, &expected_retained).await;
        if let Some((t, _)) = &retained_now {
            let lost: Vec<String> = missing
                .iter()
                .filter(|m| m.starts_with(&format!("{t}:")))
                .cloned()
                .collect();
            report.check(P_RETAINED, cycle, lost.is_empty(), || {
                format!(
                    "{} (in the MQTT state store at the kill: {})",
                    lost.join("; "),
                    at_kill.retained.contains(t.as_str())
                )
            });
            if lost.is_empty() {
                retained_kept.insert(t.clone(), retained_now.clone().unwrap().1);
            }
        }
        if !retained_kept.is_empty() {
            let earlier: Vec<String> = missing
                .iter()
                .filter(|m| {
                    retained_kept
                        .keys()
                        .any(|t| m.starts_with(&format!("{t}:")))
                })
                .cloned()
                .collect();
            report.check(P_RETAINED_KEPT, cycle, earlier.is_empty(), || {
                format!(
                    "retained messages seen after earlier restarts are gone: {}",
                    earlier.join("; ")
                )
            });
            for m in &earlier {
                retained_kept.retain(|t, _| !m.starts_with(&format!("{t}:")));
            }
        }

        // Integrity of everything delivered so far in this cycle.
        let mut bad: Vec<String> = Vec::new();
        for inbox in [&main_inbox, &cycle_inbox] {
            let mut i = inbox.lock().unwrap();
            bad.append(&mut i.corrupt);
            bad.extend(
                i.counts
                    .keys()
                    .filter(|p| !all_sent.contains(*p))
                    .map(|p| format!("never published: {p:?}")),
            );
        }
        bad.extend(http_corrupt);
        report.check(P_INTEGRITY, cycle, bad.is_empty(), || sample(&bad));

        let in_doubt = sent.len()
            - acked_existing.len()
            - acked_new.len()
            - acked_http.len()
            - usize::from(retained_now.is_some());
        let complaints = server.complaints();
        eprintln!(
            "cycle {cycle:>2}: {publishers} publishers, kill {:>4} ms after the topics appeared{}, \
             acked {} on {EXISTING} + {} on new topics + {} over HTTP, {in_doubt} unacked at the kill; \
             duplicates: main session {dups}, cycle session {cs_dups}, HTTP group {http_dups}; \
             unsettled HTTP receipts {unsettled}; restart {} ms{}",
            delay.as_millis(),
            if retained_cycle { " (+ retained)" } else { "" },
            acked_existing.len(),
            acked_new.len(),
            acked_http.len(),
            restart.as_millis(),
            if complaints.is_empty() {
                String::new()
            } else {
                format!("; server WARN/ERROR after restart: {complaints:?}")
            }
        );
    }
    drop(server);

    eprintln!(
        "\n{cycles} cycles in {:.1} s, {total_acked} acknowledged messages; duplicates \
         delivered: {total_dups} to the main session, {total_http_dups} by HTTP groups\n{}",
        began.elapsed().as_secs_f64(),
        report.summary()
    );

    report.require(P_EXISTING);
    report.require(P_NEW);
    report.require(P_INTEGRITY);
    report.require(P_MAIN_SESSION);
    report.require(P_CYCLE_SESSION);
    report.require(P_CYCLE_SESSION_DELIVERY);
    report.require(P_HTTP);
    report.require(P_RETAINED);
    report.require(P_RETAINED_KEPT);
    // The server answers throughout: saving consumer positions and creating a topic once took
    // the registry and the saved positions in opposite orders and deadlocked about one cycle in
    // ten.
    report.require(P_LIVENESS);
}
