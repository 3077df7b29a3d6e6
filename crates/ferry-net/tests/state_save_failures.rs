//! The server's own state saves failing (the MQTT state store's fault switch makes every save
//! round fail, as a full or broken disk would): a retained publish whose record cannot be made
//! durable is answered in doubt (MQTT 5 PUBACK 0x80 with a reason string; MQTT 3.1.1, which has
//! no refusal, closes the connection); a persistent session's SUBSCRIBE whose subscriptions
//! cannot be saved is answered 0x80 per filter and the subscription is not made (nothing is
//! delivered to it, it is not there after a restart); `/health` answers 503 "degraded" while
//! saves fail and 200 once one succeeds, other clients being served meanwhile; what was
//! acknowledged before and after survives a restart.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use ferry_mqtt::{
    Connect, Packet, ProtocolVersion, Publish, QoS, ReasonCode, Subscribe, Subscription,
};
use ferry_net::config::ServeConfig;
use ferry_net::Server;
use serde_json::Value;

async fn durable_server(dir: &Path) -> Server {
    let mut config = ServeConfig {
        memory: false,
        data_dir: dir.to_path_buf(),
        shutdown_timeout_secs: 1,
        ..ServeConfig::default()
    };
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    let broker = ferry_net::server::open_broker(&config).unwrap();
    Server::start(&config, broker).await.unwrap()
}

async fn health(base: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{base}/health")).await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Polls `/health` until it answers `status` (the once-a-second save round may be what
/// changes it).
async fn health_until(base: &str, status: u16) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (s, h) = health(base).await;
        if s == status {
            return h;
        }
        assert!(Instant::now() < deadline, "/health still answers {s} {h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn qos1(topic: &str, id: u16, payload: &str, retain: bool) -> Packet {
    let mut p = Publish::new(topic, payload.to_string());
    p.qos = QoS::AtLeastOnce;
    p.packet_id = Some(id);
    p.retain = retain;
    Packet::Publish(p)
}

fn subscribe(id: u16, filters: &[&str]) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: id,
        subscriptions: filters
            .iter()
            .map(|f| Subscription::new(*f, QoS::AtLeastOnce))
            .collect(),
        properties: Default::default(),
    })
}

async fn connect(
    addr: std::net::SocketAddr,
    version: ProtocolVersion,
    id: &str,
    persistent: bool,
) -> Raw {
    let mut c = Connect::new(version, id);
    if persistent {
        c.clean_start = false;
        if version == ProtocolVersion::V5 {
            c.properties.session_expiry_interval = Some(3600);
        }
    }
    let (raw, ack) = Raw::connect(addr, c).await;
    assert!(matches!(ack, Packet::ConnAck(_)), "{ack:?}");
    raw
}

/// The next packet that is not a PUBLISH (acknowledging nothing: QoS 1 deliveries are left).
async fn next_ack(raw: &mut Raw) -> Option<Packet> {
    loop {
        match raw.recv().await {
            Some(Packet::Publish(_)) => continue,
            other => return other,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_state_saves_refuse_what_they_cannot_keep() {
    let dir = tempfile::tempdir().unwrap();
    let server = durable_server(dir.path()).await;
    let base = format!("http://{}", server.http_addr().unwrap());
    let addr = server.mqtt_addr();
    let state = server.state_store().unwrap().clone();

    let mut p5 = connect(addr, ProtocolVersion::V5, "p5", false).await;
    p5.send(&qos1("state/kept", 1, "before", true)).await;
    assert!(
        matches!(next_ack(&mut p5).await, Some(Packet::PubAck(a)) if a.reason_code == ReasonCode::Success)
    );
    let mut persistent = connect(addr, ProtocolVersion::V5, "persistent", true).await;
    persistent.send(&subscribe(1, &["kept/#"])).await;
    match next_ack(&mut persistent).await {
        Some(Packet::SubAck(a)) => assert_eq!(a.reason_codes, vec![ReasonCode::GrantedQoS1]),
        other => panic!("{other:?}"),
    }

    state.fail_saves(true);
    // MQTT 5: the retained publish is answered in doubt.
    p5.send(&qos1("state/lamp", 2, "on", true)).await;
    match next_ack(&mut p5).await {
        Some(Packet::PubAck(a)) => {
            assert_eq!(a.reason_code, ReasonCode::UnspecifiedError);
            let reason = a.properties.reason_string.unwrap_or_default();
            assert!(reason.contains("in doubt"), "{reason}");
            assert!(reason.contains("retained"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // MQTT 3.1.1: no refusal for a PUBLISH, so the connection closes without PUBACK.
    let mut p4 = connect(addr, ProtocolVersion::V311, "p4", false).await;
    p4.send(&qos1("state/door", 1, "open", true)).await;
    let seen = p4.until_closed().await;
    assert!(
        !seen.iter().any(|p| matches!(p, Packet::PubAck(_))),
        "{seen:?}"
    );
    // A persistent session's SUBSCRIBE: 0x80 for each filter, and the subscription is not
    // made (an existing one stays as it was).
    persistent.send(&subscribe(2, &["new/#", "kept/#"])).await;
    match next_ack(&mut persistent).await {
        Some(Packet::SubAck(a)) => assert_eq!(
            a.reason_codes,
            vec![ReasonCode::UnspecifiedError, ReasonCode::UnspecifiedError]
        ),
        other => panic!("{other:?}"),
    }
    let h = health_until(&base, 503).await;
    assert_eq!(h["status"], "degraded", "{h}");
    assert!(
        h["reason"].as_str().unwrap().contains("fault injected"),
        "{h}"
    );
    // Others are served meanwhile: a plain publish, a clean session's subscription.
    p5.send(&qos1("new/plain", 3, "x", false)).await;
    assert!(
        matches!(next_ack(&mut p5).await, Some(Packet::PubAck(a)) if a.reason_code == ReasonCode::Success)
    );
    let mut clean = connect(addr, ProtocolVersion::V5, "clean", false).await;
    clean.send(&subscribe(1, &["new/#"])).await;
    assert!(
        matches!(next_ack(&mut clean).await, Some(Packet::SubAck(a)) if a.reason_codes == vec![ReasonCode::GrantedQoS1])
    );

    // Saves work again: the next round (once a second) succeeds, health recovers.
    state.fail_saves(false);
    let h = health_until(&base, 200).await;
    assert_eq!(h["status"], "running", "{h}");
    persistent.send(&subscribe(3, &["other/#"])).await;
    assert!(
        matches!(next_ack(&mut persistent).await, Some(Packet::SubAck(a)) if a.reason_codes == vec![ReasonCode::GrantedQoS1])
    );
    // The refused subscription gets nothing.
    p5.send(&qos1("new/after", 4, "y", false)).await;
    assert!(
        matches!(next_ack(&mut p5).await, Some(Packet::PubAck(a)) if a.reason_code == ReasonCode::Success)
    );
    p5.send(&qos1("other/after", 5, "z", false)).await;
    assert!(
        matches!(next_ack(&mut p5).await, Some(Packet::PubAck(a)) if a.reason_code == ReasonCode::Success)
    );
    match persistent.recv().await {
        Some(Packet::Publish(p)) => assert_eq!(p.topic, "other/after"),
        other => panic!("{other:?}"),
    }

    drop((p5, persistent, clean));
    server.shutdown().await;
    let server = durable_server(dir.path()).await;
    let addr = server.mqtt_addr();
    // The session resumes with what was acknowledged: kept/# and other/#, not new/#.
    let mut persistent = connect(addr, ProtocolVersion::V5, "persistent", true).await;
    let mut late = connect(addr, ProtocolVersion::V5, "late", false).await;
    late.send(&subscribe(1, &["state/#"])).await;
    let mut retained = Vec::new();
    loop {
        match late.recv().await {
            Some(Packet::SubAck(_)) => {}
            Some(Packet::Publish(p)) => {
                retained.push((p.topic.clone(), p.payload.clone()));
                if retained.len() == 3 {
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    retained.sort();
    // The in-doubt ones were saved by a later round, once saves worked again.
    assert_eq!(
        retained,
        vec![
            ("state/door".to_string(), bytes::Bytes::from("open")),
            ("state/kept".to_string(), bytes::Bytes::from("before")),
            ("state/lamp".to_string(), bytes::Bytes::from("on")),
        ]
    );
    let mut p = connect(addr, ProtocolVersion::V5, "p", false).await;
    for (i, t) in ["new/x", "kept/x", "other/x"].iter().enumerate() {
        p.send(&qos1(t, i as u16 + 1, t, false)).await;
        assert!(matches!(next_ack(&mut p).await, Some(Packet::PubAck(_))));
    }
    let mut got = Vec::new();
    while got.len() < 2 {
        match persistent.recv().await {
            Some(Packet::Publish(p)) if p.topic.ends_with("/x") => got.push(p.topic.clone()),
            Some(_) => {}
            None => panic!("closed"),
        }
    }
    got.sort();
    assert_eq!(got, vec!["kept/x".to_string(), "other/x".to_string()]);
    server.shutdown().await;
}
