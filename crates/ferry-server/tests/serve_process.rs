//! `ferry serve` as a real process: SIGTERM and SIGINT shut it down gracefully (exit status 0,
//! state flushed), and a restart on the same data directory finds the persistent session, the
//! message queued for it while it was away, and the retained message.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{ConnectProperties, Packet};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;

const BIN: &str = env!("CARGO_BIN_EXE_ferry");
const WAIT: Duration = Duration::from_secs(15);

/// A child process killed (and reaped) if a test fails before stopping it.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A running `ferry serve` and where it listens; its log lines arrive on `log`.
struct Served {
    child: Proc,
    mqtt: SocketAddr,
    http: SocketAddr,
    log: std_mpsc::Receiver<String>,
}

fn after<'a>(line: &'a str, key: &str, end: char) -> Option<&'a str> {
    let start = line.find(key)? + key.len();
    let rest = line.get(start..)?;
    Some(rest.split(end).next().unwrap_or(rest))
}

fn serve(dir: &std::path::Path) -> Served {
    let mut child = Command::new(BIN)
        .args(["serve", "--data-dir"])
        .arg(dir)
        .args([
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take();
    let child = Proc(child);
    let stderr = stderr.unwrap();
    let (tx, log) = std_mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    loop {
        let line = log.recv_timeout(WAIT).expect("ferry serve did not start");
        if line.contains("ferry serving") {
            let mqtt = after(&line, "mqtt=", ' ').unwrap().parse().unwrap();
            let http = after(&line, "http=Some(", ')').unwrap().parse().unwrap();
            return Served {
                child,
                mqtt,
                http,
                log,
            };
        }
    }
}

/// Sends `signal` and waits for a clean exit; returns the log lines written meanwhile.
fn stop(mut s: Served, signal: &str) -> Vec<String> {
    let status = Command::new("kill")
        .args([signal, &s.child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + WAIT;
    let exit = loop {
        if let Some(exit) = s.child.0.try_wait().unwrap() {
            break exit;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no exit after {signal}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let lines: Vec<String> = s.log.try_iter().collect();
    assert!(exit.success(), "exit {exit:?} after {signal}: {lines:#?}");
    lines
}

/// A v5 client whose incoming PUBLISH payloads and CONNACK session flags arrive on a channel.
fn client(
    addr: SocketAddr,
    id: &str,
    persistent: bool,
) -> (AsyncClient, mpsc::UnboundedReceiver<Packet>) {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    if persistent {
        o.set_clean_start(false);
        let mut props = ConnectProperties::new();
        props.session_expiry_interval = Some(3600);
        o.set_connect_properties(props);
    }
    let (client, mut el) = AsyncClient::new(o, 10);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            if let Event::Incoming(p) = ev {
                if tx.send(p).is_err() {
                    return;
                }
            }
        }
    });
    (client, rx)
}

async fn next_where(
    rx: &mut mpsc::UnboundedReceiver<Packet>,
    f: impl Fn(&Packet) -> bool,
) -> Packet {
    tokio::time::timeout(WAIT, async {
        loop {
            let p = rx.recv().await.expect("client ended");
            if f(&p) {
                return p;
            }
        }
    })
    .await
    .expect("timed out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_sigint_shut_down_gracefully_and_state_survives() {
    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path());

    // A persistent session subscribes, then goes away.
    let (keeper, mut rx) = client(served.mqtt, "keeper", true);
    let ack = next_where(&mut rx, |p| matches!(p, Packet::ConnAck(_))).await;
    assert!(matches!(ack, Packet::ConnAck(a) if !a.session_present));
    keeper.subscribe("jobs/#", QoS::AtLeastOnce).await.unwrap();
    next_where(&mut rx, |p| matches!(p, Packet::SubAck(_))).await;
    keeper.disconnect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Queued for it while away (over HTTP), and a retained message (over MQTT).
    let r = reqwest::Client::new()
        .post(format!("http://{}/topics/jobs%2F1/messages", served.http))
        .body("while away")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let (publisher, mut prx) = client(served.mqtt, "publisher", false);
    publisher
        .publish("status/ferry", QoS::AtLeastOnce, true, "up")
        .await
        .unwrap();
    next_where(&mut prx, |p| matches!(p, Packet::PubAck(_))).await;
    drop(publisher);

    let lines = stop(served, "-TERM");
    assert!(
        lines.iter().any(|l| l.contains("broker shut down")),
        "{lines:#?}"
    );

    // Restarted on the same data directory.
    let served = serve(dir.path());
    let (keeper, mut rx) = client(served.mqtt, "keeper", true);
    let ack = next_where(&mut rx, |p| matches!(p, Packet::ConnAck(_))).await;
    assert!(
        matches!(&ack, Packet::ConnAck(a) if a.session_present),
        "{ack:?}"
    );
    let p = next_where(&mut rx, |p| matches!(p, Packet::Publish(_))).await;
    let Packet::Publish(p) = p else {
        unreachable!()
    };
    assert_eq!(
        (&p.topic[..], &p.payload[..]),
        (&b"jobs/1"[..], &b"while away"[..])
    );
    drop(keeper);

    let (watcher, mut wrx) = client(served.mqtt, "watcher", false);
    watcher
        .subscribe("status/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let p = next_where(&mut wrx, |p| matches!(p, Packet::Publish(_))).await;
    let Packet::Publish(p) = p else {
        unreachable!()
    };
    assert!(p.retain);
    assert_eq!(&p.payload[..], b"up");
    drop(watcher);

    stop(served, "-INT");
}
