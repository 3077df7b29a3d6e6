//! Persistent sessions survive a server restart on the same data directory.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use ferry_net::Server;
use rumqttc::v5::mqttbytes::v5::ConnectProperties;
use rumqttc::v5::mqttbytes::QoS as Q5;

async fn durable_server(dir: &Path) -> Server {
    let dir = dir.to_path_buf();
    server_with(move |c| {
        c.memory = false;
        c.data_dir = dir;
    })
    .await
}

fn persistent5(addr: std::net::SocketAddr, id: &str) -> rumqttc::v5::MqttOptions {
    let mut o = options5(addr, id);
    o.set_clean_start(false);
    let mut props = ConnectProperties::new();
    props.session_expiry_interval = Some(3600);
    o.set_connect_properties(props);
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_session_and_queued_messages_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = durable_server(dir.path()).await;
    let mut c = spawn5(persistent5(server.mqtt_addr(), "keeper"));
    assert!(!c.connected().await);
    c.client
        .subscribe_with_properties(
            "jobs/#",
            Q5::AtLeastOnce,
            rumqttc::v5::mqttbytes::v5::SubscribeProperties {
                id: Some(42),
                user_properties: vec![],
            },
        )
        .await
        .unwrap();
    c.suback().await;
    c.client.disconnect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Published while the client is away.
    let p = connect5(server.mqtt_addr(), "producer").await;
    p.client
        .publish("jobs/1", Q5::AtLeastOnce, false, "while away")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.shutdown().await;
    assert!(dir.path().join("mqtt-state").is_dir());

    let server = durable_server(dir.path()).await;
    assert_eq!(server.mqtt().stats().sessions_offline, 1);
    let mut c = spawn5(persistent5(server.mqtt_addr(), "keeper"));
    assert!(c.connected().await, "session present after the restart");
    let m = c.publish().await;
    assert_eq!(
        (m.topic.as_str(), m.payload.as_ref(), m.qos),
        ("jobs/1", &b"while away"[..], 1)
    );
    assert_eq!(m.subscription_ids, vec![42]);
    // Still subscribed without subscribing again.
    let p = connect5(server.mqtt_addr(), "producer2").await;
    p.client
        .publish("jobs/2", Q5::AtLeastOnce, false, "after")
        .await
        .unwrap();
    assert_eq!(c.publish().await.topic, "jobs/2");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_session_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = durable_server(dir.path()).await;
    let mut o = options4(server.mqtt_addr(), "keeper4");
    o.set_clean_session(false);
    let mut c = spawn4(o.clone());
    c.connected().await;
    c.client
        .subscribe("jobs4/#", rumqttc::QoS::ExactlyOnce)
        .await
        .unwrap();
    c.suback().await;
    c.client.disconnect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let p = connect5(server.mqtt_addr(), "producer4").await;
    p.client
        .publish("jobs4/a", Q5::ExactlyOnce, false, "queued")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.shutdown().await;

    let server = durable_server(dir.path()).await;
    let mut o = options4(server.mqtt_addr(), "keeper4");
    o.set_clean_session(false);
    let mut c = spawn4(o);
    assert!(c.connected().await, "session present after the restart");
    let m = c.publish().await;
    assert_eq!((m.topic.as_str(), m.qos), ("jobs4/a", 2));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_start_after_a_restart_discards_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let server = durable_server(dir.path()).await;
    let mut c = spawn5(persistent5(server.mqtt_addr(), "fresh"));
    c.connected().await;
    c.client.subscribe("x/#", Q5::AtLeastOnce).await.unwrap();
    c.suback().await;
    c.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.shutdown().await;

    let server = durable_server(dir.path()).await;
    let mut o = persistent5(server.mqtt_addr(), "fresh");
    o.set_clean_start(true);
    let mut c = spawn5(o);
    assert!(!c.connected().await);
    let p = connect5(server.mqtt_addr(), "p").await;
    p.client
        .publish("x/1", Q5::AtLeastOnce, false, "no")
        .await
        .unwrap();
    c.nothing_for(Duration::from_millis(400)).await;
    server.shutdown().await;
}
