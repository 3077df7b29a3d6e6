//! MQTT basics with rumqttc (v5 and v4): authentication, QoS 0/1/2 round trips, retained
//! messages, MQTT <-> engine, user properties and expiry, subscription ids, no local.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use ferry::Message;
use ferry_net::config::UserConfig;
use rumqttc::v5::mqttbytes::v5::{
    Filter, PublishProperties, RetainForwardRule, SubscribeProperties,
};
use rumqttc::v5::mqttbytes::QoS as Q5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failures_are_refused_with_reason_codes() {
    let hash = ferry_net::auth::hash_password("right").unwrap();
    let server = server_with(|c| {
        c.mqtt.allow_anonymous = false;
        c.mqtt.users = vec![UserConfig {
            username: "alice".into(),
            password_hash: hash,
            publish: None,
            subscribe: None,
            admin: false,
        }];
    })
    .await;
    let addr = server.mqtt_addr();

    // v5: wrong password -> 0x86, anonymous -> 0x87, right password -> success.
    let mut o = options5(addr, "bad5");
    o.set_credentials("alice", "wrong");
    let mut c = spawn5(o);
    match c.next().await {
        Seen::Error(e) => assert!(e.contains("BadUserNamePassword"), "{e}"),
        other => panic!("{other:?}"),
    }
    let mut c = spawn5(options5(addr, "anon5"));
    match c.next().await {
        Seen::Error(e) => assert!(e.contains("NotAuthorized"), "{e}"),
        other => panic!("{other:?}"),
    }
    let mut o = options5(addr, "good5");
    o.set_credentials("alice", "right");
    let mut c = spawn5(o);
    c.connected().await;

    // v4: wrong password -> return code 4.
    let mut o = options4(addr, "bad4");
    o.set_credentials("alice", "wrong");
    let mut c = spawn4(o);
    match c.next().await {
        Seen::Error(e) => assert!(e.contains("BadUserNamePassword"), "{e}"),
        other => panic!("{other:?}"),
    }
    let mut o = options4(addr, "good4");
    o.set_credentials("alice", "right");
    let mut c = spawn4(o);
    c.connected().await;
    assert!(server.mqtt().stats().refused >= 3);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_round_trips_v5() {
    let server = server().await;
    let addr = server.mqtt_addr();
    let mut sub = connect5(addr, "sub").await;
    sub.client.subscribe("rt/#", Q5::ExactlyOnce).await.unwrap();
    assert_eq!(sub.suback().await, vec!["Success(ExactlyOnce)"]);
    let publisher = connect5(addr, "pub").await;
    for (i, qos) in [Q5::AtMostOnce, Q5::AtLeastOnce, Q5::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        publisher
            .client
            .publish(format!("rt/{i}"), qos, false, format!("m{i}"))
            .await
            .unwrap();
        let m = sub.publish().await;
        assert_eq!(m.topic, format!("rt/{i}"));
        assert_eq!(m.payload.as_ref(), format!("m{i}").as_bytes());
        assert_eq!(m.qos, i as u8, "delivered at the published QoS");
    }
    // QoS granted = min(requested, published): a QoS 1 subscriber gets QoS 2 messages at 1.
    let mut sub1 = connect5(addr, "sub1").await;
    sub1.client.subscribe("rt2", Q5::AtLeastOnce).await.unwrap();
    sub1.suback().await;
    publisher
        .client
        .publish("rt2", Q5::ExactlyOnce, false, "x")
        .await
        .unwrap();
    assert_eq!(sub1.publish().await.qos, 1);
    // Many QoS 2 messages in a row (beyond the in-flight window) all arrive, in order.
    sub1.client
        .subscribe("many", Q5::ExactlyOnce)
        .await
        .unwrap();
    sub1.suback().await;
    for i in 0..200 {
        publisher
            .client
            .publish("many", Q5::ExactlyOnce, false, i.to_string())
            .await
            .unwrap();
    }
    for i in 0..200 {
        let m = sub1.publish().await;
        assert_eq!(m.payload.as_ref(), i.to_string().as_bytes());
        assert_eq!(m.qos, 2);
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_round_trips_v311() {
    let server = server().await;
    let addr = server.mqtt_addr();
    let mut sub = connect4(addr, "sub4").await;
    sub.client
        .subscribe("v4/+", rumqttc::QoS::ExactlyOnce)
        .await
        .unwrap();
    assert_eq!(sub.suback().await, vec!["Success(ExactlyOnce)"]);
    let publisher = connect4(addr, "pub4").await;
    for (i, qos) in [
        rumqttc::QoS::AtMostOnce,
        rumqttc::QoS::AtLeastOnce,
        rumqttc::QoS::ExactlyOnce,
    ]
    .into_iter()
    .enumerate()
    {
        publisher
            .client
            .publish(format!("v4/{i}"), qos, false, format!("m{i}"))
            .await
            .unwrap();
        let m = sub.publish().await;
        assert_eq!(m.topic, format!("v4/{i}"));
        assert_eq!(m.qos, i as u8);
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_and_retain_handling() {
    let server = server().await;
    let addr = server.mqtt_addr();
    let publisher = connect5(addr, "pub").await;
    publisher
        .client
        .publish("ret/a", Q5::AtLeastOnce, true, "A")
        .await
        .unwrap();
    publisher
        .client
        .publish("ret/b", Q5::AtMostOnce, true, "B")
        .await
        .unwrap();
    // Wait until both are stored.
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.mqtt().stats().retained < 2 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut sub = connect5(addr, "sub").await;
    sub.client
        .subscribe("ret/#", Q5::AtLeastOnce)
        .await
        .unwrap();
    sub.suback().await;
    let mut got = [sub.publish().await, sub.publish().await];
    got.sort_by(|a, b| a.topic.cmp(&b.topic));
    assert_eq!(got[0].payload.as_ref(), b"A");
    assert!(got[0].retain && got[1].retain);
    assert_eq!((got[0].qos, got[1].qos), (1, 0));
    // A live message is not flagged retained (retain-as-published is off).
    publisher
        .client
        .publish("ret/a", Q5::AtLeastOnce, true, "A2")
        .await
        .unwrap();
    let live = sub.publish().await;
    assert_eq!(live.payload.as_ref(), b"A2");
    assert!(!live.retain);

    // Retain handling 2 (do not send) and retain-as-published.
    let mut sub2 = connect5(addr, "sub2").await;
    let mut f = Filter::new("ret/#", Q5::AtLeastOnce);
    f.retain_forward_rule = RetainForwardRule::Never;
    f.preserve_retain = true;
    sub2.client.subscribe_many(vec![f]).await.unwrap();
    sub2.suback().await;
    sub2.nothing_for(Duration::from_millis(300)).await;
    publisher
        .client
        .publish("ret/b", Q5::AtLeastOnce, true, "B2")
        .await
        .unwrap();
    let m = sub2.publish().await;
    assert!(m.retain, "retain as published");

    // An empty retained payload clears the topic.
    publisher
        .client
        .publish("ret/a", Q5::AtLeastOnce, true, "")
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.mqtt().stats().retained != 1 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let durable = |c: &mut ferry_net::ServeConfig| {
        c.memory = false;
        c.data_dir = dir.path().to_path_buf();
    };
    let server = server_with(durable).await;
    let publisher = connect5(server.mqtt_addr(), "pub").await;
    publisher
        .client
        .publish("keep/me", Q5::AtLeastOnce, true, "kept")
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.mqtt().stats().retained < 1 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.shutdown().await;
    let server = server_with(durable).await;
    let mut sub = connect5(server.mqtt_addr(), "sub").await;
    sub.client
        .subscribe("keep/#", Q5::AtLeastOnce)
        .await
        .unwrap();
    let m = sub.publish().await;
    assert_eq!(
        (m.topic.as_str(), m.payload.as_ref()),
        ("keep/me", &b"kept"[..])
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_to_engine_and_engine_to_mqtt() {
    let server = server().await;
    let broker = broker_of(&server);
    let addr = server.mqtt_addr();
    let mut engine_sub = broker.subscribe("sensors/+/temp").unwrap();
    let mut mqtt_sub = connect5(addr, "mqtt-sub").await;
    mqtt_sub
        .client
        .subscribe_with_properties(
            "cmd/#",
            Q5::AtLeastOnce,
            SubscribeProperties {
                id: Some(7),
                user_properties: vec![],
            },
        )
        .await
        .unwrap();
    mqtt_sub.suback().await;

    // MQTT -> engine, user properties -> headers, expiry -> TTL.
    let publisher = connect5(addr, "pub").await;
    let props = PublishProperties {
        user_properties: vec![("unit".into(), "C".into())],
        message_expiry_interval: Some(60),
        ..Default::default()
    };
    publisher
        .client
        .publish_with_properties("sensors/1/temp", Q5::AtLeastOnce, false, "21.5", props)
        .await
        .unwrap();
    let d = tokio::time::timeout(WAIT, engine_sub.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.payload().as_ref(), b"21.5");
    assert_eq!(d.header("unit"), Some("C"));
    assert_eq!(d.producer_id(), Some("pub"));
    assert!(d.expires_at().is_some());

    // Engine -> MQTT, headers -> user properties, TTL -> expiry, subscription id.
    broker
        .publish(
            "cmd/reboot",
            Message::builder()
                .payload("now")
                .header("by", "ops")
                .ttl(Duration::from_secs(30))
                .build(),
        )
        .await
        .unwrap();
    let m = mqtt_sub.publish().await;
    assert_eq!(m.topic, "cmd/reboot");
    assert_eq!(m.payload.as_ref(), b"now");
    assert_eq!(
        m.user_properties,
        vec![("by".to_string(), "ops".to_string())]
    );
    assert_eq!(m.subscription_ids, vec![7]);
    assert!(m.expiry.is_some_and(|e| (29..=30).contains(&e)), "{m:?}");
    assert_eq!(m.qos, 1, "engine messages go out at the granted QoS");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_topics_get_reason_codes_and_no_local_works() {
    let server = server().await;
    let addr = server.mqtt_addr();
    let mut bad = connect5(addr, "bad").await;
    // Reserved `$`-topics (`$SYS`, `$share`, `$dlq`): QoS 1 publish answered with 0x90 Topic Name invalid
    // (which rumqttc turns into an error of its event loop).
    bad.client
        .publish("$sys/x", Q5::AtLeastOnce, false, "x")
        .await
        .unwrap();
    loop {
        match bad.next().await {
            Seen::PubAck(reason) => {
                assert_eq!(reason, "TopicNameInvalid");
                break;
            }
            Seen::Error(e) => {
                assert!(e.contains("TopicNameInvalid"), "{e}");
                break;
            }
            _ => {}
        }
    }
    let mut c = connect5(addr, "c").await;
    // No local: our own messages do not come back; others' do.
    let mut f = Filter::new("nl", Q5::AtLeastOnce);
    f.nolocal = true;
    c.client.subscribe_many(vec![f]).await.unwrap();
    c.suback().await;
    c.client
        .publish("nl", Q5::AtLeastOnce, false, "mine")
        .await
        .unwrap();
    let other = connect5(addr, "other").await;
    other
        .client
        .publish("nl", Q5::AtLeastOnce, false, "theirs")
        .await
        .unwrap();
    let m = c.publish().await;
    assert_eq!(m.payload.as_ref(), b"theirs");
    server.shutdown().await;
}
