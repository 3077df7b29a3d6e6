//! Per-user topic ACLs: denied PUBLISH and SUBSCRIBE in MQTT 5 and 3.1.1, `%u` substitution,
//! the anonymous ACL and will topics.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use ferry_mqtt::{
    Connect, Packet, ProtocolVersion, PubRel, Publish, QoS, ReasonCode, Subscribe, Subscription,
};
use ferry_net::config::UserConfig;
use ferry_net::Server;
use rumqttc::v5::mqttbytes::QoS as Q5;

fn user(name: &str, hash: &str, publish: &[&str], subscribe: &[&str]) -> UserConfig {
    UserConfig {
        username: name.into(),
        password_hash: hash.into(),
        publish: Some(publish.iter().map(|s| s.to_string()).collect()),
        subscribe: Some(subscribe.iter().map(|s| s.to_string()).collect()),
        admin: false,
    }
}

/// alice and bob may publish under `users/<self>/` and read it and `public/`; admin has no
/// lists (everything); anonymous clients may only read `public/#` and publish nothing.
async fn acl_server() -> Server {
    let hash = ferry_net::auth::hash_password("pw").unwrap();
    server_with(|c| {
        c.mqtt.users = vec![
            user("alice", &hash, &["users/%u/#"], &["users/%u/#", "public/#"]),
            user("bob", &hash, &["users/%u/#"], &["users/%u/#", "public/#"]),
            UserConfig {
                username: "admin".into(),
                password_hash: hash.clone(),
                publish: None,
                subscribe: None,
                admin: false,
            },
        ];
        c.mqtt.anonymous.publish = Some(vec![]);
        c.mqtt.anonymous.subscribe = Some(vec!["public/#".into()]);
    })
    .await
}

async fn admin_watcher(server: &Server) -> Client5 {
    let mut o = options5(server.mqtt_addr(), "admin-watch");
    o.set_credentials("admin", "pw");
    let mut w = spawn5(o);
    w.connected().await;
    w.client.subscribe("#", Q5::AtLeastOnce).await.unwrap();
    w.suback().await;
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_denied_publish_gets_0x87_and_is_not_delivered() {
    let server = acl_server().await;
    let mut watcher = admin_watcher(&server).await;
    let alice5 = |id: &str| {
        let mut o = options5(server.mqtt_addr(), id);
        o.set_credentials("alice", "pw");
        o
    };
    // %u: alice may not publish under users/bob (rumqttc reports the 0x87 PUBACK as an error).
    let mut alice = spawn5(alice5("alice-5"));
    alice.connected().await;
    alice
        .client
        .publish("users/bob/inbox", Q5::AtLeastOnce, false, "nope")
        .await
        .unwrap();
    loop {
        match alice.next().await {
            Seen::Error(e) => {
                assert!(e.contains("NotAuthorized"), "{e}");
                break;
            }
            Seen::PubAck(code) => panic!("PUBACK {code}"),
            _ => {}
        }
    }
    // ... but under users/alice.
    let mut alice = spawn5(alice5("alice-5b"));
    alice.connected().await;
    alice
        .client
        .publish("users/alice/outbox", Q5::AtLeastOnce, false, "yes")
        .await
        .unwrap();
    let m = watcher.publish().await;
    assert_eq!(m.topic, "users/alice/outbox");
    watcher.nothing_for(Duration::from_millis(300)).await;
    assert_eq!(server.mqtt().stats().acl_denied, 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_denied_subscribe_gets_0x87_per_filter() {
    let server = acl_server().await;
    let mut connect = Connect::new(ProtocolVersion::V5, "bob-raw");
    connect.username = Some("bob".into());
    connect.password = Some("pw".into());
    let (mut bob, ack) = Raw::connect(server.mqtt_addr(), connect).await;
    assert!(matches!(ack, Packet::ConnAck(a) if a.reason_code == ReasonCode::Success));
    let filters = [
        ("users/bob/#", QoS::AtLeastOnce),
        ("users/alice/#", QoS::AtLeastOnce),
        ("public/news", QoS::AtMostOnce),
        ("#", QoS::AtMostOnce),
        ("$share/g/users/bob/jobs", QoS::AtLeastOnce),
    ];
    bob.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        subscriptions: filters
            .iter()
            .map(|(f, q)| Subscription::new(*f, *q))
            .collect(),
        properties: Default::default(),
    }))
    .await;
    match bob.recv().await {
        Some(Packet::SubAck(s)) => assert_eq!(
            s.reason_codes,
            vec![
                ReasonCode::GrantedQoS1,
                ReasonCode::NotAuthorized,
                ReasonCode::GRANTED_QOS_0,
                ReasonCode::NotAuthorized,
                ReasonCode::GrantedQoS1,
            ]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // The denied filters deliver nothing; the allowed ones do.
    let mut o = options5(server.mqtt_addr(), "admin-pub");
    o.set_credentials("admin", "pw");
    let mut admin = spawn5(o);
    admin.connected().await;
    admin
        .client
        .publish("users/alice/x", Q5::AtLeastOnce, false, "a")
        .await
        .unwrap();
    admin
        .client
        .publish("users/bob/x", Q5::AtLeastOnce, false, "b")
        .await
        .unwrap();
    match bob.recv().await {
        Some(Packet::Publish(p)) => assert_eq!(p.topic, "users/bob/x"),
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_denied_qos2_publish_gets_pubrec_0x87() {
    let server = acl_server().await;
    let (mut raw, ack) = Raw::connect(
        server.mqtt_addr(),
        Connect::new(ProtocolVersion::V5, "anon-raw"),
    )
    .await;
    assert!(matches!(ack, Packet::ConnAck(a) if a.reason_code == ReasonCode::Success));
    let mut p = Publish::new("public/x", "nope");
    p.qos = QoS::ExactlyOnce;
    p.packet_id = Some(7);
    raw.send(&Packet::Publish(p)).await;
    match raw.recv().await {
        Some(Packet::PubRec(r)) => {
            assert_eq!((r.packet_id, r.reason_code), (7, ReasonCode::NotAuthorized))
        }
        other => panic!("expected PUBREC, got {other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_denied_publish_is_acked_but_dropped_and_denied_subscribe_fails() {
    let server = acl_server().await;
    let mut watcher = admin_watcher(&server).await;
    let mut o = options4(server.mqtt_addr(), "alice-4");
    o.set_credentials("alice", "pw");
    let mut alice = spawn4(o);
    alice.connected().await;

    alice
        .client
        .subscribe("users/bob/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(alice.suback().await, vec!["Failure"]);
    alice
        .client
        .subscribe("users/alice/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(alice.suback().await, vec!["Success(AtLeastOnce)"]);

    // QoS 0, 1 and 2 to a denied topic: the connection stays up, nothing is delivered.
    for qos in [
        rumqttc::QoS::AtMostOnce,
        rumqttc::QoS::AtLeastOnce,
        rumqttc::QoS::ExactlyOnce,
    ] {
        alice
            .client
            .publish("users/bob/inbox", qos, false, "nope")
            .await
            .unwrap();
    }
    alice
        .client
        .publish("users/alice/inbox", rumqttc::QoS::ExactlyOnce, false, "yes")
        .await
        .unwrap();
    let m = watcher.publish().await;
    assert_eq!(
        (m.topic.as_str(), m.payload.as_ref()),
        ("users/alice/inbox", &b"yes"[..])
    );
    // Alice's own subscription gets it too, and the connection survived the denials.
    let m = alice.publish().await;
    assert_eq!(m.topic, "users/alice/inbox");
    watcher.nothing_for(Duration::from_millis(300)).await;
    assert_eq!(server.mqtt().stats().acl_denied, 4);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_qos2_denied_flow_completes() {
    let server = acl_server().await;
    let (mut raw, _) = Raw::connect(
        server.mqtt_addr(),
        Connect::new(ProtocolVersion::V311, "anon-raw4"),
    )
    .await;
    let mut p = Publish::new("private/x", "nope");
    p.qos = QoS::ExactlyOnce;
    p.packet_id = Some(9);
    raw.send(&Packet::Publish(p)).await;
    assert!(matches!(raw.recv().await, Some(Packet::PubRec(r)) if r.packet_id == 9));
    raw.send(&Packet::PubRel(PubRel::new(9))).await;
    assert!(matches!(raw.recv().await, Some(Packet::PubComp(c)) if c.packet_id == 9));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_on_a_denied_topic_refuses_the_connection() {
    let server = acl_server().await;
    let mut o = options5(server.mqtt_addr(), "alice-will");
    o.set_credentials("alice", "pw");
    o.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
        "users/bob/will",
        "x",
        Q5::AtLeastOnce,
        false,
        None,
    ));
    let mut c = spawn5(o);
    match c.next().await {
        Seen::Error(e) => assert!(e.contains("NotAuthorized"), "{e}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    server.shutdown().await;
}
