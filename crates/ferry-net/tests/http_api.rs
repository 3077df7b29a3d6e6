//! The HTTP API with reqwest: health, stats, metrics, publishing, dead letters, OpenAPI.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use rumqttc::v5::mqttbytes::QoS as Q5;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_stats_metrics_openapi() {
    let server = server().await;
    let base = format!("http://{}", server.http_addr().unwrap());
    let http = reqwest::Client::new();
    let h: Value = http
        .get(format!("{base}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["status"], "running");

    server
        .broker()
        .publish("a/b", ferry::Message::new("x"))
        .await
        .unwrap();
    let _c = connect5(server.mqtt_addr(), "c").await;
    let s: Value = http
        .get(format!("{base}/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s["broker"]["topics"], 1);
    assert_eq!(s["mqtt"]["active"], 1);
    assert_eq!(s["topics"][0]["topic"], "a/b");
    // Plain and percent-encoded topic paths.
    for path in ["/stats/a/b", "/stats/a%2Fb"] {
        let t: Value = http
            .get(format!("{base}{path}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(t["topic"], "a/b", "{path}");
        assert_eq!(t["next_offset"], 1);
    }
    let r = http.get(format!("{base}/stats/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "unknown_topic");

    let m = http.get(format!("{base}/metrics")).send().await.unwrap();
    assert!(m.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = m.text().await.unwrap();
    assert!(text.contains("# TYPE ferry_published_total counter"));
    assert!(text.contains("ferry_published_total{topic=\"a/b\"} 1"));
    assert!(text.contains("ferry_mqtt_connections 1"));
    // Every sample line is `name{labels} value` or `name value`.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (_, v) = line.rsplit_once(' ').unwrap();
        v.parse::<f64>().unwrap();
    }

    let api: Value = http
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(api["openapi"], "3.0.3");
    for p in [
        "/health",
        "/stats",
        "/metrics",
        "/topics/{topic}/messages",
        "/topics/{topic}/dead-letters",
    ] {
        assert!(api["paths"][p].is_object(), "{p} documented");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_over_http_reaches_mqtt_and_engine() {
    let server = server().await;
    let base = format!("http://{}", server.http_addr().unwrap());
    let http = reqwest::Client::new();
    let mut mqtt = connect5(server.mqtt_addr(), "m").await;
    mqtt.client
        .subscribe("orders/#", Q5::AtLeastOnce)
        .await
        .unwrap();
    mqtt.suback().await;
    let mut engine = server.broker().subscribe("orders/#").unwrap();

    let r = http
        .post(format!(
            "{base}/topics/orders%2Feu/messages?ttl_ms=60000&priority=high&key=k1"
        ))
        .header("Ferry-Header-Env", "prod")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["topic"], "orders/eu");
    assert_eq!(body["offset"], 0);

    let d = tokio::time::timeout(WAIT, engine.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.payload().as_ref(), b"hello");
    assert_eq!(d.header("env"), Some("prod"));
    assert_eq!(d.priority(), ferry::Priority::High);
    assert_eq!(d.key().map(|k| k.as_ref()), Some(&b"k1"[..]));
    assert!(d.expires_at().is_some());
    let m = mqtt.publish().await;
    assert_eq!(m.topic, "orders/eu");
    assert_eq!(
        m.user_properties,
        vec![("env".to_string(), "prod".to_string())]
    );

    // Errors are typed.
    let r = http
        .post(format!("{base}/topics/%24sys/messages"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_topic");
    let r = http
        .post(format!("{base}/topics/t/messages?priority=urgent"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_list_redrive_purge() {
    let server = server().await;
    let base = format!("http://{}", server.http_addr().unwrap());
    let http = reqwest::Client::new();
    let broker = server.broker().clone();
    let mut sub = broker
        .subscription("jobs")
        .group("g")
        .manual_ack()
        .build()
        .unwrap();
    for i in 0..3 {
        broker
            .publish("jobs", ferry::Message::new(format!("job{i}")))
            .await
            .unwrap();
    }
    for _ in 0..3 {
        let d = tokio::time::timeout(WAIT, sub.recv())
            .await
            .unwrap()
            .unwrap();
        d.reject("bad input").unwrap();
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    let list = loop {
        let list: Value = http
            .get(format!("{base}/topics/jobs/dead-letters?max=10"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if list["len"] == 3 || tokio::time::Instant::now() > deadline {
            break list;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(list["len"], 3);
    assert_eq!(list["dead_letters"][0]["reason"], "rejected");
    assert_eq!(list["dead_letters"][0]["detail"], "bad input");
    assert_eq!(list["dead_letters"][0]["payload"], "job0");

    let r: Value = http
        .post(format!("{base}/topics/jobs/dead-letters/redrive?max=1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["redriven"], 1);
    let d = tokio::time::timeout(WAIT, sub.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.payload().as_ref(), b"job0");
    d.ack().unwrap();

    let r: Value = http
        .delete(format!("{base}/topics/jobs/dead-letters"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["purged"], 2);
    server.shutdown().await;
}
