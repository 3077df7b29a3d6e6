//! `$` topics against a real `ferry serve` (MQTT §4.7.2): a user `$` topic is accepted over MQTT
//! and HTTP, kept away from subscriptions whose first level is a wildcard, delivered to exact
//! and `$foo/#` subscriptions, and survives a restart as a user topic (persistent session,
//! retained message, stats); the reserved first levels (`$SYS`, `$share`, `$dlq`) are refused
//! (MQTT 5: PUBACK 0x90 with a reason string, the connection stays; MQTT 3.1.1: the connection
//! closes; HTTP: 400 `invalid_topic`) while other clients keep being served.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use tokio::sync::mpsc;

mod common;
use common::raw::Raw;
use common::{client, next_where, Server};

fn serve(dir: &std::path::Path) -> Server {
    common::serve(dir, &[]).unwrap_or_else(|e| panic!("{e}"))
}

/// The next PUBLISH's (topic, payload).
async fn next_publish(rx: &mut mpsc::UnboundedReceiver<Packet>) -> (String, String) {
    match next_where(rx, |p| matches!(p, Packet::Publish(_))).await {
        Packet::Publish(p) => (
            String::from_utf8(p.topic.to_vec()).unwrap(),
            String::from_utf8(p.payload.to_vec()).unwrap(),
        ),
        _ => unreachable!(),
    }
}

async fn subscribe(c: &AsyncClient, rx: &mut mpsc::UnboundedReceiver<Packet>, filter: &str) {
    c.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    next_where(rx, |p| matches!(p, Packet::SubAck(_))).await;
}

async fn http_publish(http: SocketAddr, topic: &str, body: &str) -> (u16, serde_json::Value) {
    let topic = topic.replace('/', "%2F").replace('$', "%24");
    let r = reqwest::Client::new()
        .post(format!("http://{http}/topics/{topic}/messages"))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_dollar_topics_are_served_apart_from_leading_wildcards() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path());
    let (all, mut all_rx) = client(server.mqtt, "all", false);
    subscribe(&all, &mut all_rx, "#").await;
    let (plus, mut plus_rx) = client(server.mqtt, "plus", false);
    subscribe(&plus, &mut plus_rx, "+/bar").await;
    let (named, mut named_rx) = client(server.mqtt, "named", false);
    subscribe(&named, &mut named_rx, "$foo/#").await;
    let (exact, mut exact_rx) = client(server.mqtt, "exact", false);
    subscribe(&exact, &mut exact_rx, "$foo/bar").await;

    let (publisher, mut pub_rx) = client(server.mqtt, "publisher", false);
    publisher
        .publish("$foo/bar", QoS::AtLeastOnce, false, "over mqtt")
        .await
        .unwrap();
    let ack = next_where(&mut pub_rx, |p| matches!(p, Packet::PubAck(_))).await;
    assert!(
        matches!(&ack, Packet::PubAck(a) if a.reason == rumqttc::v5::mqttbytes::v5::PubAckReason::Success),
        "{ack:?}"
    );
    let (status, body) = http_publish(server.http, "$foo/bar", "over http").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["topic"], "$foo/bar");

    for rx in [&mut named_rx, &mut exact_rx] {
        assert_eq!(
            next_publish(rx).await,
            ("$foo/bar".into(), "over mqtt".into())
        );
        assert_eq!(
            next_publish(rx).await,
            ("$foo/bar".into(), "over http".into())
        );
    }
    // The leading wildcards see only the plain topic published after the `$` ones.
    let (status, _) = http_publish(server.http, "plain/bar", "marker").await;
    assert_eq!(status, 201);
    for rx in [&mut all_rx, &mut plus_rx] {
        assert_eq!(
            next_publish(rx).await,
            ("plain/bar".into(), "marker".into())
        );
    }
    // And nothing else comes to them.
    for rx in [&mut all_rx, &mut plus_rx] {
        let more = tokio::time::timeout(Duration::from_millis(300), async {
            loop {
                if let Some(Packet::Publish(p)) = rx.recv().await {
                    return p;
                }
            }
        })
        .await;
        assert!(more.is_err(), "{more:?}");
    }

    // A user `$` topic is a user topic in the stats.
    let stats: serde_json::Value = reqwest::get(format!("http://{}/stats", server.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["broker"]["topics"], 2, "{stats}");
    let names: Vec<&str> = stats["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["topic"].as_str().unwrap_or_default())
        .collect();
    assert!(names.contains(&"$foo/bar"), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_dollar_topics_are_refused_and_others_keep_being_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path());
    let (watcher, mut watch_rx) = client(server.mqtt, "watcher", false);
    subscribe(&watcher, &mut watch_rx, "ok/#").await;

    // MQTT 5: PUBACK 0x90 Topic Name invalid, saying why; the connection stays.
    let mut v5 = Raw::connect(server.mqtt, "raw5", None);
    for (i, topic) in ["$SYS/broker/x", "$share/g/t", "$dlq/orders", "$sys/x"]
        .into_iter()
        .enumerate()
    {
        let id = i as u16 + 1;
        let (code, reason) = v5.publish(id, topic, b"x", false);
        assert_eq!(code, 0x90, "{topic}");
        assert!(reason.contains("reserved"), "{topic}: {reason:?}");
    }
    assert!(v5.ping(), "the MQTT 5 connection stays open");
    assert_eq!(
        v5.publish(9, "$ok", b"y", false),
        (0, String::new()),
        "a user $ topic is accepted"
    );

    // MQTT 3.1.1 has no way to refuse a PUBLISH: the connection closes.
    let mut v4 = Raw::connect_v311(server.mqtt, "raw4");
    v4.send_publish(1, "$SYS/x", b"x", false);
    assert_eq!(v4.read().map(|(k, _)| k), None, "closed without a PUBACK");
    let mut v4 = Raw::connect_v311(server.mqtt, "raw4b");
    v4.send_publish(1, "$user/x", b"x", false);
    let (kind, body) = v4.read().expect("PUBACK");
    assert_eq!((kind, &body[..]), (0x40, &[0u8, 1][..]));

    // HTTP: 400 with the API's JSON error.
    for topic in ["$SYS/x", "$dlq/orders", "$share/g/t"] {
        let (status, body) = http_publish(server.http, topic, "x").await;
        assert_eq!(status, 400, "{topic}: {body}");
        assert_eq!(body["error"], "invalid_topic", "{body}");
        assert!(
            body["message"].as_str().unwrap().contains("reserved"),
            "{body}"
        );
    }

    // Everyone else is still served.
    let (status, _) = http_publish(server.http, "ok/1", "still here").await;
    assert_eq!(status, 201);
    assert_eq!(
        next_publish(&mut watch_rx).await,
        ("ok/1".into(), "still here".into())
    );
    let stats: serde_json::Value = reqwest::get(format!("http://{}/stats", server.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        stats["broker"]["topics"], 3,
        "$ok, $user/x and ok/1, nothing reserved: {stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_dollar_topic_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = serve(dir.path());
    let (keeper, mut rx) = client(server.mqtt, "keeper", true);
    next_where(&mut rx, |p| matches!(p, Packet::ConnAck(_))).await;
    subscribe(&keeper, &mut rx, "$jobs/#").await;
    keeper.disconnect().await.unwrap();
    // Queued for it while away, and a retained message.
    let (status, _) = http_publish(server.http, "$jobs/1", "while away").await;
    assert_eq!(status, 201);
    let (publisher, mut prx) = client(server.mqtt, "publisher", false);
    publisher
        .publish("$jobs/status", QoS::AtLeastOnce, true, "up")
        .await
        .unwrap();
    next_where(&mut prx, |p| matches!(p, Packet::PubAck(_))).await;
    drop(publisher);
    server.stop("ferry serve");

    let server = serve(dir.path());
    let stats: serde_json::Value = reqwest::get(format!("http://{}/stats", server.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["broker"]["topics"], 2, "{stats}");
    let (keeper, mut rx) = client(server.mqtt, "keeper", true);
    let ack = next_where(&mut rx, |p| matches!(p, Packet::ConnAck(_))).await;
    assert!(
        matches!(&ack, Packet::ConnAck(a) if a.session_present),
        "{ack:?}"
    );
    let mut got = vec![next_publish(&mut rx).await, next_publish(&mut rx).await];
    got.sort();
    assert_eq!(
        got,
        [
            ("$jobs/1".to_string(), "while away".to_string()),
            ("$jobs/status".to_string(), "up".to_string())
        ]
    );
    drop(keeper);
    // The retained `$` message goes to `$jobs/#`, not to `#`.
    let (all, mut all_rx) = client(server.mqtt, "all", false);
    subscribe(&all, &mut all_rx, "#").await;
    let (named, mut named_rx) = client(server.mqtt, "named", false);
    subscribe(&named, &mut named_rx, "$jobs/#").await;
    assert_eq!(
        next_publish(&mut named_rx).await,
        ("$jobs/status".into(), "up".into())
    );
    let (status, _) = http_publish(server.http, "plain", "marker").await;
    assert_eq!(status, 201);
    assert_eq!(
        next_publish(&mut all_rx).await,
        ("plain".into(), "marker".into())
    );
}
