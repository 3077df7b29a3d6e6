//! Sessions and connection lifecycle: wills, persistent sessions, shared subscriptions, keep
//! alive, takeover.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use ferry_mqtt::{Connect, Packet, ProtocolVersion, ReasonCode};
use rumqttc::v5::mqttbytes::v5::{ConnectProperties, LastWill, LastWillProperties};
use rumqttc::v5::mqttbytes::QoS as Q5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_published_on_abnormal_disconnect_only() {
    let server = server().await;
    let addr = server.mqtt_addr();
    let mut watcher = connect5(addr, "watcher").await;
    watcher
        .client
        .subscribe("wills/#", Q5::AtLeastOnce)
        .await
        .unwrap();
    watcher.suback().await;

    // Abnormal: the TCP connection just goes away.
    let mut o = options5(addr, "dies");
    o.set_last_will(LastWill::new(
        "wills/dies",
        "gone",
        Q5::AtLeastOnce,
        false,
        None,
    ));
    let mut dies = spawn5(o);
    dies.connected().await;
    dies.kill();
    let m = watcher.publish().await;
    assert_eq!(
        (m.topic.as_str(), m.payload.as_ref()),
        ("wills/dies", &b"gone"[..])
    );

    // Normal DISCONNECT: no will.
    let mut o = options5(addr, "polite");
    o.set_last_will(LastWill::new(
        "wills/polite",
        "x",
        Q5::AtLeastOnce,
        false,
        None,
    ));
    let mut polite = spawn5(o);
    polite.connected().await;
    polite.client.disconnect().await.unwrap();
    watcher.nothing_for(Duration::from_millis(500)).await;

    // v3.1.1 too.
    let mut o = options4(addr, "dies4");
    o.set_last_will(rumqttc::LastWill::new(
        "wills/dies4",
        "gone4",
        rumqttc::QoS::AtLeastOnce,
        false,
    ));
    let mut dies4 = spawn4(o);
    dies4.connected().await;
    dies4.task.abort();
    let m = watcher.publish().await;
    assert_eq!(m.topic, "wills/dies4");
    assert_eq!(server.mqtt().stats().wills_published, 2);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_delay_is_cancelled_by_a_reconnect() {
    let server = server().await;
    let addr = server.mqtt_addr();
    let mut watcher = connect5(addr, "watcher").await;
    watcher
        .client
        .subscribe("wills/#", Q5::AtLeastOnce)
        .await
        .unwrap();
    watcher.suback().await;
    let with_delay = |delay: u32| {
        let mut o = options5(addr, "delayed");
        let mut props = ConnectProperties::new();
        props.session_expiry_interval = Some(60);
        o.set_connect_properties(props);
        o.set_clean_start(false);
        let will_props = LastWillProperties {
            delay_interval: Some(delay),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: vec![],
        };
        o.set_last_will(LastWill::new(
            "wills/delayed",
            "late",
            Q5::AtLeastOnce,
            false,
            Some(will_props),
        ));
        o
    };
    // Dies, comes back within the delay: no will.
    let mut c = spawn5(with_delay(1));
    c.connected().await;
    c.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = spawn5(with_delay(1));
    c.connected().await;
    watcher.nothing_for(Duration::from_millis(1500)).await;
    // Dies for good: the will comes after the delay.
    c.kill();
    let m = watcher.publish().await;
    assert_eq!(m.payload.as_ref(), b"late");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_gets_messages_published_while_offline_v5() {
    let server = server().await;
    let addr = server.mqtt_addr();
    let persistent = || {
        let mut o = options5(addr, "durable-client");
        o.set_clean_start(false);
        let mut props = ConnectProperties::new();
        props.session_expiry_interval = Some(300);
        o.set_connect_properties(props);
        o
    };
    let mut c = spawn5(persistent());
    assert!(!c.connected().await, "no session yet");
    c.client
        .subscribe("orders/#", Q5::AtLeastOnce)
        .await
        .unwrap();
    c.suback().await;
    c.client.disconnect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let publisher = connect5(addr, "pub").await;
    for i in 0..5 {
        publisher
            .client
            .publish(format!("orders/{i}"), Q5::AtLeastOnce, false, i.to_string())
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server.mqtt().stats().sessions_offline, 1);

    let mut c = spawn5(persistent());
    assert!(c.connected().await, "session present");
    for i in 0..5 {
        let m = c.publish().await;
        assert_eq!(m.payload.as_ref(), i.to_string().as_bytes());
    }
    // Clean start discards the session.
    c.client.disconnect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut o = persistent();
    o.set_clean_start(true);
    let mut c = spawn5(o);
    assert!(!c.connected().await);
    publisher
        .client
        .publish("orders/x", Q5::AtLeastOnce, false, "x")
        .await
        .unwrap();
    c.nothing_for(Duration::from_millis(300)).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_v311_and_unacked_redelivery() {
    let server = server().await;
    let addr = server.mqtt_addr();
    let persistent = || {
        let mut o = options4(addr, "p4");
        o.set_clean_session(false);
        o
    };
    let mut c = spawn4(persistent());
    c.connected().await;
    c.client
        .subscribe("jobs", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    c.suback().await;
    c.task.abort(); // gone without DISCONNECT
    tokio::time::sleep(Duration::from_millis(200)).await;
    let broker = broker_of(&server);
    for i in 0..3 {
        broker
            .publish("jobs", ferry::Message::new(format!("j{i}")))
            .await
            .unwrap();
    }
    let mut c = spawn4(persistent());
    assert!(c.connected().await);
    for i in 0..3 {
        let m = c.publish().await;
        assert_eq!(m.payload.as_ref(), format!("j{i}").as_bytes());
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_splits_messages() {
    // A window of one unacknowledged message per member keeps the split fair.
    let server = server_with(|c| c.mqtt.max_inflight = 1).await;
    let addr = server.mqtt_addr();
    let mut a = connect5(addr, "worker-a").await;
    let mut b = connect5(addr, "worker-b").await;
    for w in [&a, &b] {
        w.client
            .subscribe("$share/workers/tasks/#", Q5::AtLeastOnce)
            .await
            .unwrap();
    }
    a.suback().await;
    b.suback().await;
    let publisher = connect5(addr, "pub").await;
    let n = 40;
    for i in 0..n {
        publisher
            .client
            .publish(format!("tasks/{i}"), Q5::AtLeastOnce, false, i.to_string())
            .await
            .unwrap();
    }
    let mut seen = std::collections::BTreeSet::new();
    let (mut from_a, mut from_b) = (0, 0);
    while seen.len() < n {
        tokio::select! {
            m = a.publish() => { from_a += 1; assert!(seen.insert(m.payload.clone())); }
            m = b.publish() => { from_b += 1; assert!(seen.insert(m.payload.clone())); }
        }
    }
    assert_eq!(from_a + from_b, n);
    assert!(from_a > 0 && from_b > 0, "split: a {from_a}, b {from_b}");
    a.nothing_for(Duration::from_millis(200)).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_expiry_closes_a_half_open_connection() {
    let server = server().await;
    let addr = server.mqtt_addr();
    let mut connect = Connect::new(ProtocolVersion::V5, "silent");
    connect.keep_alive = 1;
    let start = tokio::time::Instant::now();
    let (mut raw, ack) = Raw::connect(addr, connect).await;
    assert!(matches!(ack, Packet::ConnAck(a) if a.reason_code == ReasonCode::Success));
    // Say nothing: after 1.5 s the server sends DISCONNECT 0x8D and closes.
    let seen = raw.until_closed().await;
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(1400), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
    assert!(
        matches!(seen.as_slice(), [Packet::Disconnect(d)] if d.reason_code == ReasonCode::KeepAliveTimeout),
        "{seen:?}"
    );
    assert_eq!(server.mqtt().stats().keep_alive_timeouts, 1);

    // A client that pings stays connected.
    let mut connect = Connect::new(ProtocolVersion::V311, "pinger");
    connect.keep_alive = 1;
    let (mut raw, _) = Raw::connect(addr, connect).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        raw.send(&Packet::PingReq).await;
        assert_eq!(raw.recv().await, Some(Packet::PingResp));
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_takeover_disconnects_the_old_connection() {
    let server = server().await;
    let addr = server.mqtt_addr();
    let (mut old, _) = Raw::connect(addr, Connect::new(ProtocolVersion::V5, "same")).await;
    let mut new = connect5(addr, "same").await;
    let seen = old.until_closed().await;
    assert!(
        matches!(seen.as_slice(), [Packet::Disconnect(d)] if d.reason_code == ReasonCode::SessionTakenOver),
        "{seen:?}"
    );
    new.client.subscribe("t", Q5::AtMostOnce).await.unwrap();
    new.suback().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_tells_v5_clients() {
    let server = server().await;
    let (mut raw, _) =
        Raw::connect(server.mqtt_addr(), Connect::new(ProtocolVersion::V5, "c")).await;
    let report = server.shutdown().await;
    assert!(report.drained);
    let seen = raw.until_closed().await;
    assert!(
        matches!(seen.as_slice(), [Packet::Disconnect(d)] if d.reason_code == ReasonCode::ServerShuttingDown),
        "{seen:?}"
    );
}

/// MQTT-4.4.0-1: a persistent session's unacknowledged QoS 1/2 messages are resent with their
/// original packet identifiers, so that a QoS 2 receiver that already holds one recognises it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_messages_are_resent_with_their_packet_ids() {
    use ferry_mqtt::{PubRec, QoS, Subscribe, Subscription as Sub};
    let server = server().await;
    let connect = || {
        let mut c = Connect::new(ProtocolVersion::V5, "resender");
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(300);
        c
    };
    let (mut raw, _) = Raw::connect(server.mqtt_addr(), connect()).await;
    raw.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        subscriptions: vec![
            Sub::new("resend/q1", QoS::AtLeastOnce),
            Sub::new("resend/q2", QoS::ExactlyOnce),
        ],
        properties: Default::default(),
    }))
    .await;
    assert!(matches!(raw.recv().await, Some(Packet::SubAck(_))));
    let broker = broker_of(&server);
    // Something sent and acknowledged first, so that the ids are not simply 1 and 2 again.
    broker
        .publish("resend/q1", ferry::Message::new("warm-up"))
        .await
        .unwrap();
    let warm = match raw.recv().await {
        Some(Packet::Publish(p)) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    };
    raw.send(&Packet::PubAck(ferry_mqtt::PubAck::new(
        warm.packet_id.unwrap(),
    )))
    .await;
    broker
        .publish("resend/q1", ferry::Message::new("one"))
        .await
        .unwrap();
    broker
        .publish("resend/q2", ferry::Message::new("two"))
        .await
        .unwrap();
    let mut first = std::collections::HashMap::new();
    for _ in 0..2 {
        match raw.recv().await {
            Some(Packet::Publish(p)) => {
                assert!(!p.dup);
                first.insert(p.payload.clone(), p.packet_id.unwrap());
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    // No PUBACK, no PUBREC: the connection drops.
    drop(raw);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (mut raw, ack) = Raw::connect(server.mqtt_addr(), connect()).await;
    assert!(matches!(ack, Packet::ConnAck(a) if a.session_present));
    let mut again = std::collections::HashMap::new();
    for _ in 0..2 {
        match raw.recv().await {
            Some(Packet::Publish(p)) => {
                assert!(p.dup, "a resent message carries DUP");
                again.insert(p.payload.clone(), p.packet_id.unwrap());
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    assert_eq!(again, first, "resent under the same packet ids");
    // The QoS 2 flow completes under that id.
    let id = first[&bytes::Bytes::from_static(b"two")];
    raw.send(&Packet::PubRec(PubRec::new(id))).await;
    assert!(matches!(raw.recv().await, Some(Packet::PubRel(r)) if r.packet_id == id));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_spreads_a_steady_stream_over_every_member() {
    // Default window, prefetch and batching: a steady stream (one message at a time) must reach
    // every member of the share, not only the first one woken.
    let server = server().await;
    let addr = server.mqtt_addr();
    for qos in [Q5::AtMostOnce, Q5::AtLeastOnce] {
        let q = qos as u8;
        let topic = format!("steady/{q}");
        let mut members = Vec::new();
        for i in 0..4 {
            let m = connect5(addr, &format!("spread-{q}-{i}")).await;
            m.client
                .subscribe(format!("$share/spread/{topic}"), qos)
                .await
                .unwrap();
            members.push(m);
        }
        for m in &mut members {
            m.suback().await;
        }
        let publisher = connect5(addr, &format!("spread-pub-{q}")).await;
        let n = 200;
        let mut counts = vec![0usize; members.len()];
        for i in 0..n {
            publisher
                .client
                .publish(topic.clone(), qos, false, i.to_string())
                .await
                .unwrap();
            let (msg, member, _) =
                futures::future::select_all(members.iter_mut().map(|m| Box::pin(m.publish())))
                    .await;
            assert_eq!(msg.payload.as_ref(), i.to_string().as_bytes());
            counts[member] += 1;
        }
        assert_eq!(counts.iter().sum::<usize>(), n);
        assert!(
            counts.iter().all(|&c| c > 0),
            "QoS {q}: messages per member {counts:?}"
        );
    }
    server.shutdown().await;
}
