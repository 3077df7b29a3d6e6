//! A real full disk: `ferry serve` on a 3 MiB tmpfs mounted in a user and mount namespace
//! (`unshare -r -m`, unprivileged; the test is skipped with a printed reason where the system
//! does not allow it). Publishing until the disk is full: the first refused MQTT 5 publish is
//! answered 0x80 with a reason string saying "in doubt" and "No space left on device", no
//! subscriber ever gets a refused message, `/health` answers 503 `"degraded"` with the reason,
//! HTTP publishing answers 5xx with the JSON error, and the server keeps answering and stops
//! cleanly. (A failed write closes the commit log, so on a real disk the server stays degraded
//! until it is restarted; that it turns healthy again once a write succeeds is tested with a
//! fault-injecting storage in `ferry-net/tests/storage_failures.rs`.)
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

mod common;
use common::raw::Raw;

const WAIT: Duration = Duration::from_secs(15);

fn namespaces_allowed() -> bool {
    Command::new("unshare")
        .args(["-r", "-m", "true"])
        .status()
        .is_ok_and(|s| s.success())
}

/// A raw MQTT 5 connection: CONNECT, then QoS 1 PUBLISHes whose PUBACK (code, reason string)
/// it reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_in_doubt_and_health_says_degraded() {
    if !namespaces_allowed() {
        eprintln!(
            "skipped: unprivileged user and mount namespaces (unshare -r -m) are not allowed here"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mnt_s = mnt.to_str().unwrap();
    let data = mnt.join("data");
    let script = "mount -t tmpfs -o size=3m none \"$1\" || exit 9; shift; exec \"$@\"";
    let mut server = common::serve_via(
        &["unshare", "-r", "-m", "sh", "-c", script, "sh", mnt_s],
        &data,
        &["--segment-bytes", "1048576"],
    )
    .unwrap_or_else(|e| panic!("{e}"));

    // A subscriber that counts what it gets.
    let mut o = MqttOptions::new("counter", "127.0.0.1", server.mqtt.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(Some(1 << 20));
    let (sub, mut el) = AsyncClient::new(o, 100);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            if let Event::Incoming(p) = ev {
                if tx.send(p).is_err() {
                    return;
                }
            }
        }
    });
    sub.subscribe("big", QoS::AtLeastOnce).await.unwrap();
    tokio::time::timeout(WAIT, async {
        while !matches!(rx.recv().await, Some(Packet::SubAck(_))) {}
    })
    .await
    .unwrap();

    // Fill the disk: 20 KiB messages until one is refused (3 MiB cannot take 200).
    let mqtt = server.mqtt;
    let (accepted, code, reason) = tokio::task::spawn_blocking(move || {
        let mut raw = Raw::connect(mqtt, "filler", None);
        let payload = vec![b'x'; 20 * 1024];
        for id in 1..=200u16 {
            let (code, reason) = raw.publish(id, "big", &payload, false);
            if code != 0 {
                return (id - 1, code, reason);
            }
        }
        panic!("200 messages of 20 KiB fit on a 3 MiB disk");
    })
    .await
    .unwrap();
    assert!(
        accepted > 10,
        "{accepted} accepted before the disk was full"
    );
    assert_eq!(code, 0x80, "PUBACK code {code:#x}: {reason}");
    assert!(reason.contains("in doubt"), "{reason:?}");
    assert!(reason.contains("storage write failed"), "{reason:?}");
    assert!(reason.contains("No space left on device"), "{reason:?}");

    let http = reqwest::Client::new();
    let r = http
        .get(format!("http://{}/health", server.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let h: serde_json::Value = r.json().await.unwrap();
    assert_eq!(h["status"], "degraded", "{h}");
    assert!(
        h["reason"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "{h}"
    );
    let r = http
        .post(format!("http://{}/topics/big/messages", server.http))
        .body("more")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_server_error(), "{}", r.status());
    let e: serde_json::Value = r.json().await.unwrap();
    assert!(e["error"].is_string() && e["message"].is_string(), "{e}");

    // The subscriber got exactly the accepted messages.
    let mut got = 0;
    while got < accepted {
        match tokio::time::timeout(WAIT, rx.recv()).await.unwrap() {
            Some(Packet::Publish(_)) => got += 1,
            Some(_) => {}
            None => panic!("subscriber ended"),
        }
    }
    let extra = tokio::time::timeout(Duration::from_millis(300), async {
        loop {
            if let Some(Packet::Publish(p)) = rx.recv().await {
                return p;
            }
        }
    })
    .await;
    assert!(extra.is_err(), "a refused message was delivered: {extra:?}");

    // Still answering.
    let r = http
        .get(format!("http://{}/stats", server.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    drop(sub);
    server.stop("ferry serve on a full disk");
}
