//! The server over a failing disk (a storage whose appends fail with ENOSPC): a failed publish
//! is answered "in doubt" with what failed (MQTT 5 PUBACK/PUBREC 0x80 and a reason string, HTTP
//! 500 `{"error": "in_doubt", "in_doubt": true, ...}`), reaches no subscriber, is not kept as
//! the retained message, `/health` answers 503 "degraded" with the reason while writes fail and
//! 200 "running" once one succeeds; other clients keep being served.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use ferry::fault::{Faults, FaultyStorage};
use ferry_mqtt::{Connect, Packet, ProtocolVersion, Publish, QoS, ReasonCode};
use ferry_net::config::ServeConfig;
use ferry_net::Server;
use rumqttc::v5::mqttbytes::QoS as Q5;
use serde_json::Value;

async fn faulty_server(dir: &std::path::Path) -> (Server, Faults) {
    let mut config = ServeConfig {
        memory: true,
        shutdown_timeout_secs: 1,
        ..ServeConfig::default()
    };
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    let disk = ferry::disk::DiskStorage::open(dir, Default::default()).unwrap();
    let faults = Faults::default();
    let storage = FaultyStorage::new(Arc::new(disk), faults.clone());
    let broker =
        ferry::Broker::with_storage(ferry_net::server::broker_config(&config), Arc::new(storage))
            .unwrap();
    (Server::start(&config, broker).await.unwrap(), faults)
}

async fn health(base: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{base}/health")).await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn http_publish(base: &str, topic: &str, body: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}/topics/{topic}/messages"))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn qos1(topic: &str, id: u16, payload: &str, retain: bool) -> Packet {
    let mut p = Publish::new(topic, payload.to_string());
    p.qos = QoS::AtLeastOnce;
    p.packet_id = Some(id);
    p.retain = retain;
    Packet::Publish(p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_answered_in_doubt_and_visible_in_health() {
    let dir = tempfile::tempdir().unwrap();
    let (server, faults) = faulty_server(dir.path()).await;
    let base = format!("http://{}", server.http_addr().unwrap());
    let addr = server.mqtt_addr();
    let mut watcher = connect5(addr, "watcher").await;
    watcher
        .client
        .subscribe("t/#", Q5::AtLeastOnce)
        .await
        .unwrap();
    watcher.suback().await;
    let (mut raw, _) = Raw::connect(addr, Connect::new(ProtocolVersion::V5, "raw")).await;
    raw.send(&qos1("t/ok", 1, "before", false)).await;
    assert!(
        matches!(raw.recv().await, Some(Packet::PubAck(a)) if a.reason_code == ReasonCode::Success)
    );
    assert_eq!(watcher.publish().await.payload, "before");
    assert_eq!(health(&base).await.0, 200);

    faults.fail_appends(true);
    // MQTT 5: 0x80 with a reason string that says in doubt and what failed.
    raw.send(&qos1("t/lost", 2, "lost", false)).await;
    match raw.recv().await {
        Some(Packet::PubAck(a)) => {
            assert_eq!(
                (a.packet_id, a.reason_code),
                (2, ReasonCode::UnspecifiedError)
            );
            let reason = a.properties.reason_string.unwrap_or_default();
            assert!(reason.contains("in doubt"), "{reason}");
            assert!(reason.contains("storage write failed"), "{reason}");
            assert!(reason.contains("No space left on device"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // A retained publish that fails is not kept as the retained message.
    raw.send(&qos1("t/status", 3, "retained but lost", true))
        .await;
    assert!(
        matches!(raw.recv().await, Some(Packet::PubAck(a)) if a.reason_code == ReasonCode::UnspecifiedError)
    );
    // HTTP: 500 in_doubt.
    let (status, body) = http_publish(&base, "t%2Fhttp", "lost too").await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"], "in_doubt", "{body}");
    assert_eq!(body["in_doubt"], true, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "{body}"
    );
    // Health: 503 degraded, saying why.
    let (status, h) = health(&base).await;
    assert_eq!(status, 503, "{h}");
    assert_eq!(h["status"], "degraded", "{h}");
    assert!(
        h["reason"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "{h}"
    );
    // The connection stays and is served.
    raw.send(&Packet::PingReq).await;
    assert!(matches!(raw.recv().await, Some(Packet::PingResp)));

    faults.fail_appends(false);
    raw.send(&qos1("t/ok", 4, "after", false)).await;
    assert!(
        matches!(raw.recv().await, Some(Packet::PubAck(a)) if a.reason_code == ReasonCode::Success)
    );
    // The watcher got nothing of what failed: the next message is the one after.
    assert_eq!(watcher.publish().await.payload, "after");
    let (status, h) = health(&base).await;
    assert_eq!(
        (status, &h["status"]),
        (200, &Value::from("running")),
        "{h}"
    );
    assert!(h.get("reason").is_none(), "{h}");
    // No retained message was kept for the failed retained publish.
    let mut late = connect5(addr, "late").await;
    late.client.subscribe("t/#", Q5::AtLeastOnce).await.unwrap();
    late.suback().await;
    late.nothing_for(std::time::Duration::from_millis(300))
        .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_publish_whose_sync_outlasts_the_timeout_is_in_doubt() {
    let dir = tempfile::tempdir().unwrap();
    let (server, faults) = faulty_server(dir.path()).await;
    let base = format!("http://{}", server.http_addr().unwrap());
    let mut watcher = connect5(server.mqtt_addr(), "watcher").await;
    watcher
        .client
        .subscribe("slow", Q5::AtLeastOnce)
        .await
        .unwrap();
    watcher.suback().await;
    // The server waits 5 s for a publish's fsync; this disk takes 5.5 s.
    faults.delay_syncs(std::time::Duration::from_millis(5_500));
    let (status, body) = http_publish(&base, "slow", "late").await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(
        (&body["error"], &body["in_doubt"]),
        (&Value::from("in_doubt"), &Value::from(true)),
        "{body}"
    );
    // Rightly in doubt: the sync ends and the message is delivered.
    assert_eq!(watcher.publish().await.payload, "late");
    faults.delay_syncs(std::time::Duration::ZERO);
    server.shutdown().await;
}
