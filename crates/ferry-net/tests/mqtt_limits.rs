//! Malformed input and limits: each closes only the offending connection.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use ferry_mqtt::{Connect, Packet, ProtocolVersion, ReasonCode};
use rumqttc::v5::mqttbytes::QoS as Q5;

/// A healthy client keeps working while others misbehave.
async fn healthy_round_trip(c: &mut Client5, topic: &str) {
    c.client
        .publish(topic, Q5::AtLeastOnce, false, "ok")
        .await
        .unwrap();
    let m = c.publish().await;
    assert_eq!(m.payload.as_ref(), b"ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_packet_gets_0x95_and_only_that_connection_closes() {
    let server = server_with(|c| c.mqtt.max_packet_size = 1024).await;
    let addr = server.mqtt_addr();
    let mut healthy = connect5(addr, "healthy").await;
    healthy
        .client
        .subscribe("h", Q5::AtLeastOnce)
        .await
        .unwrap();
    healthy.suback().await;

    let (mut raw, ack) = Raw::connect(addr, Connect::new(ProtocolVersion::V5, "big")).await;
    match ack {
        Packet::ConnAck(a) => assert_eq!(a.properties.maximum_packet_size, Some(1024)),
        other => panic!("{other:?}"),
    }
    // A PUBLISH announcing 2000 bytes: refused from its fixed header.
    raw.send_bytes(&[0x30, 0xD0, 0x0F]).await;
    let seen = raw.until_closed().await;
    assert!(
        matches!(seen.as_slice(), [Packet::Disconnect(d)] if d.reason_code == ReasonCode::PacketTooLarge),
        "{seen:?}"
    );
    // 3.1.1: just closed.
    let (mut raw4, _) = Raw::connect(addr, Connect::new(ProtocolVersion::V311, "big4")).await;
    let mut p = ferry_mqtt::Publish::new("h", vec![0u8; 2000]);
    p.retain = false;
    raw4.send(&Packet::Publish(p)).await;
    assert!(raw4.until_closed().await.is_empty());

    healthy_round_trip(&mut healthy, "h").await;
    assert!(server.mqtt().stats().protocol_errors >= 2);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_close_only_that_connection() {
    let server = server().await;
    let addr = server.mqtt_addr();
    let mut healthy = connect5(addr, "healthy").await;
    healthy
        .client
        .subscribe("h", Q5::AtLeastOnce)
        .await
        .unwrap();
    healthy.suback().await;

    // Garbage instead of CONNECT.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, b"GET / HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut s, &mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");

    // Garbage after CONNECT, v5: DISCONNECT with the codec's reason code (packet type 0).
    let (mut raw, _) = Raw::connect(addr, Connect::new(ProtocolVersion::V5, "g5")).await;
    raw.send_bytes(&[0x00, 0x02, 0xde, 0xad]).await;
    let seen = raw.until_closed().await;
    assert!(
        matches!(seen.as_slice(), [Packet::Disconnect(d)] if d.reason_code == ReasonCode::MalformedPacket),
        "{seen:?}"
    );
    // Garbage after CONNECT, 3.1.1: closed.
    let (mut raw, _) = Raw::connect(addr, Connect::new(ProtocolVersion::V311, "g4")).await;
    raw.send_bytes(&[0xff, 0xff, 0xff, 0xff, 0xff]).await;
    assert!(raw.until_closed().await.is_empty());
    // A SUBSCRIBE with bad flags (v5): 0x81.
    let (mut raw, _) = Raw::connect(addr, Connect::new(ProtocolVersion::V5, "g6")).await;
    raw.send_bytes(&[0x80, 0x05, 0x00, 0x01, 0x00, 0x00, 0x00])
        .await;
    let seen = raw.until_closed().await;
    assert!(
        matches!(seen.as_slice(), [Packet::Disconnect(d)] if d.reason_code.is_error()),
        "{seen:?}"
    );

    healthy_round_trip(&mut healthy, "h").await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_is_enforced_with_a_reason_code() {
    let server = server_with(|c| c.mqtt.max_connections = 2).await;
    let addr = server.mqtt_addr();
    let _a = connect5(addr, "a").await;
    let _b = connect5(addr, "b").await;
    let (_, ack) = Raw::connect(addr, Connect::new(ProtocolVersion::V5, "c")).await;
    assert!(
        matches!(ack, Packet::ConnAck(ref a) if a.reason_code == ReasonCode::ServerBusy),
        "{ack:?}"
    );
    let (_, ack) = Raw::connect(addr, Connect::new(ProtocolVersion::V311, "d")).await;
    assert!(
        matches!(ack, Packet::ConnAck(ref a) if a.reason_code == ReasonCode::ServerUnavailable),
        "{ack:?}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inflight_window_limits_unacknowledged_messages() {
    let server = server_with(|c| c.mqtt.max_inflight = 3).await;
    let addr = server.mqtt_addr();
    // A raw subscriber that never acknowledges gets exactly 3 QoS 1 messages.
    let (mut raw, ack) = Raw::connect(addr, Connect::new(ProtocolVersion::V5, "slow")).await;
    assert!(matches!(ack, Packet::ConnAck(ref a) if a.properties.receive_maximum == Some(3)));
    raw.send(&Packet::Subscribe(ferry_mqtt::Subscribe {
        packet_id: 1,
        subscriptions: vec![ferry_mqtt::Subscription::new(
            "w",
            ferry_mqtt::QoS::AtLeastOnce,
        )],
        properties: Default::default(),
    }))
    .await;
    assert!(matches!(raw.recv().await, Some(Packet::SubAck(_))));
    let broker = broker_of(&server);
    for i in 0..10 {
        broker
            .publish("w", ferry::Message::new(format!("{i}")))
            .await
            .unwrap();
    }
    let mut ids = Vec::new();
    for _ in 0..3 {
        match raw.recv().await {
            Some(Packet::Publish(p)) => ids.push(p.packet_id.unwrap()),
            other => panic!("{other:?}"),
        }
    }
    // Nothing more until an ack.
    let more = tokio::time::timeout(Duration::from_millis(300), raw.recv()).await;
    assert!(more.is_err(), "window exceeded: {more:?}");
    raw.send(&Packet::PubAck(ferry_mqtt::PubAck::new(ids[0])))
        .await;
    match raw.recv().await {
        Some(Packet::Publish(p)) => assert_eq!(p.payload.as_ref(), b"3"),
        other => panic!("{other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_alias_and_bad_alias() {
    let server = server_with(|c| c.mqtt.topic_alias_maximum = 2).await;
    let addr = server.mqtt_addr();
    let mut engine = broker_of(&server).subscribe("aliased/topic").unwrap();
    let (mut raw, _) = Raw::connect(addr, Connect::new(ProtocolVersion::V5, "al")).await;
    let mut p = ferry_mqtt::Publish::new("aliased/topic", "1");
    p.properties.topic_alias = Some(1);
    raw.send(&Packet::Publish(p)).await;
    let mut p = ferry_mqtt::Publish::new("", "2");
    p.properties.topic_alias = Some(1);
    raw.send(&Packet::Publish(p)).await;
    for want in ["1", "2"] {
        let d = tokio::time::timeout(WAIT, engine.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.payload().as_ref(), want.as_bytes());
    }
    let mut p = ferry_mqtt::Publish::new("x", "3");
    p.properties.topic_alias = Some(3);
    raw.send(&Packet::Publish(p)).await;
    let seen = raw.until_closed().await;
    assert!(
        matches!(seen.as_slice(), [Packet::Disconnect(d)] if d.reason_code == ReasonCode::TopicAliasInvalid),
        "{seen:?}"
    );
    server.shutdown().await;
}
