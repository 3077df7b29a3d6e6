//! `ferry serve` as a real process: SIGTERM and SIGINT shut it down gracefully (exit status 0,
//! state flushed), and a restart on the same data directory finds the persistent session, the
//! message queued for it while it was away, and the retained message.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;

mod common;
use common::{client, next_where, Server};

/// Starts `ferry serve` on `dir` and waits until it serves.
fn serve(dir: &std::path::Path) -> Server {
    common::serve(dir, &[]).unwrap_or_else(|e| panic!("{e}"))
}

/// Sends `signal` and waits for a clean exit; returns the log lines written meanwhile.
fn stop(mut s: Server, signal: &str) -> Vec<String> {
    let before = s.log_lines().len();
    s.stop_with(signal, "ferry serve");
    s.log_lines().split_off(before)
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
