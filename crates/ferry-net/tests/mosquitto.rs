//! Interoperability with the system's `mosquitto_pub` / `mosquitto_sub` (MQTT 3.1.1 and 5).
//! Skipped with a message when they are not installed, unless `FERRY_REQUIRE_SERVICES=1`.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use tokio::process::Command;

fn available(bin: &str) -> bool {
    let found = std::process::Command::new(bin)
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        if std::env::var("FERRY_REQUIRE_SERVICES").as_deref() == Ok("1") {
            panic!("{bin} is required (FERRY_REQUIRE_SERVICES=1) but not installed");
        }
        eprintln!("skipping: {bin} is not installed");
    }
    found
}

async fn round_trip(version: &str) {
    if !available("mosquitto_pub") || !available("mosquitto_sub") {
        return;
    }
    let server = server().await;
    let port = server.mqtt_addr().port().to_string();
    let topic = format!("interop/{version}");
    // A retained message first, then a live one: the subscriber gets both.
    let status = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-V",
            version,
            "-q",
            "1",
            "-r",
        ])
        .args(["-t", &topic, "-m", "retained"])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-V",
            version,
            "-q",
            "2",
            "-v",
        ])
        .args(["-t", "interop/#", "-C", "2", "-W", "10"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the subscription exists.
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.broker().stats().subscriptions == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "mosquitto_sub never subscribed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-V", version, "-q", "2"])
        .args(["-t", &topic, "-m", "live"])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let out = tokio::time::timeout(Duration::from_secs(15), sub.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text, format!("{topic} retained\n{topic} live\n"));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_v311() {
    round_trip("mqttv311").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_v5() {
    round_trip("mqttv5").await;
}
