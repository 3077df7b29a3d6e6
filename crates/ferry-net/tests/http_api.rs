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
        .starts_with("application/openmetrics-text"));
    let text = m.text().await.unwrap();
    // Totals and per-topic series under different names: summing either counts once.
    assert!(text.contains("# TYPE ferry_published counter"), "{text}");
    assert!(text.contains("\nferry_published_total 1\n"), "{text}");
    assert!(
        text.contains("ferry_topic_published_total{topic=\"a/b\"} 1"),
        "{text}"
    );
    assert!(!text.contains("ferry_published_total{"), "{text}");
    assert!(text.contains("ferry_mqtt_connections 1"), "{text}");
    assert!(
        text.contains("# TYPE ferry_publish_ack_seconds histogram"),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"));
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

async fn post_json(http: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let r = http.post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn receipts(v: &Value) -> Vec<String> {
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["receipt"].as_str().unwrap().to_string())
        .collect()
}

fn payloads(v: &Value) -> Vec<String> {
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["payload"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_group_fetch_ack_nack_reject() {
    let server = server().await;
    let base = format!("http://{}", server.http_addr().unwrap());
    let http = reqwest::Client::new();
    let group = format!("{base}/topics/jobs%2Fhttp/groups/workers");
    // The member joins at its first fetch; the group starts at the tail, so join first.
    let (st, v) = post_json(&http, format!("{group}/fetch?max=5"), Value::Null).await;
    assert_eq!(st, 200, "{v}");
    assert!(v["messages"].as_array().unwrap().is_empty());
    for i in 0..5 {
        let r = http
            .post(format!("{base}/topics/jobs%2Fhttp/messages"))
            .header("ferry-header-trace", format!("t{i}"))
            .body(format!("job {i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }

    let (_, v) = post_json(
        &http,
        format!("{group}/fetch?max=3&wait_ms=2000"),
        Value::Null,
    )
    .await;
    assert_eq!(payloads(&v), vec!["job 0", "job 1", "job 2"]);
    assert_eq!(v["messages"][0]["attempt"], 1);
    assert_eq!(v["messages"][0]["topic"], "jobs/http");
    assert_eq!(
        v["messages"][1]["headers"][0],
        serde_json::json!(["trace", "t1"])
    );
    let first = receipts(&v);
    let (st, s) = post_json(
        &http,
        format!("{group}/ack"),
        serde_json::json!({"receipts": first[..2]}),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(s["settled"], 2);
    // Acking again: no longer in flight.
    let (_, s) = post_json(
        &http,
        format!("{group}/ack"),
        serde_json::json!({"receipts": [first[0], "nope"]}),
    )
    .await;
    assert_eq!(s["settled"], 0);
    assert_eq!(s["unknown"].as_array().unwrap().len(), 2);
    // A nack brings "job 2" back, with its second attempt.
    let (_, s) = post_json(
        &http,
        format!("{group}/nack"),
        serde_json::json!({"receipts": [first[2]]}),
    )
    .await;
    assert_eq!(s["settled"], 1);
    let mut got: Vec<(String, u64, String)> = Vec::new();
    for _ in 0..5 {
        let (_, v) = post_json(
            &http,
            format!("{group}/fetch?max=10&wait_ms=2000"),
            Value::Null,
        )
        .await;
        got.extend(v["messages"].as_array().unwrap().iter().map(|m| {
            (
                m["payload"].as_str().unwrap().to_string(),
                m["attempt"].as_u64().unwrap(),
                m["receipt"].as_str().unwrap().to_string(),
            )
        }));
        if got.len() >= 3 {
            break;
        }
    }
    got.sort();
    let seen: Vec<(&str, u64)> = got.iter().map(|(p, a, _)| (p.as_str(), *a)).collect();
    assert_eq!(seen, vec![("job 2", 2), ("job 3", 1), ("job 4", 1)]);
    // Reject "job 3" (dead letter with the reason), ack the others.
    let (_, s) = post_json(
        &http,
        format!("{group}/reject"),
        serde_json::json!({"receipts": [got[1].2], "reason": "bad job"}),
    )
    .await;
    assert_eq!(s["settled"], 1);
    let (_, s) = post_json(
        &http,
        format!("{group}/ack"),
        serde_json::json!({"receipts": [got[0].2, got[2].2]}),
    )
    .await;
    assert_eq!(s["settled"], 2);
    let (_, v) = post_json(
        &http,
        format!("{group}/fetch?max=10&wait_ms=300"),
        Value::Null,
    )
    .await;
    assert!(v["messages"].as_array().unwrap().is_empty(), "{v}");
    let dl: Value = http
        .get(format!("{base}/topics/jobs%2Fhttp/dead-letters"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(dl["len"], 1, "{dl}");
    assert_eq!(dl["dead_letters"][0]["detail"], "bad job");
    assert_eq!(dl["dead_letters"][0]["payload"], "job 3");

    // Bad requests are typed errors.
    let (st, e) = post_json(&http, format!("{group}/fetch?max=0"), Value::Null).await;
    assert_eq!((st, e["error"].as_str()), (400, Some("invalid_request")));
    let (st, _) = post_json(
        &http,
        format!("{base}/topics/jobs%2Fhttp/groups/a%2Fb/fetch"),
        Value::Null,
    )
    .await;
    assert_eq!(st, 400);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsettled_fetches_come_back_after_the_ack_timeout() {
    let server = server().await;
    let base = format!("http://{}", server.http_addr().unwrap());
    let http = reqwest::Client::new();
    let group = format!("{base}/topics/slow/groups/g");
    let (st, _) = post_json(
        &http,
        format!("{group}/fetch?ack_timeout_ms=300"),
        Value::Null,
    )
    .await;
    assert_eq!(st, 200);
    server
        .broker()
        .publish("slow", ferry::Message::new("once"))
        .await
        .unwrap();
    let (_, v) = post_json(&http, format!("{group}/fetch?wait_ms=2000"), Value::Null).await;
    assert_eq!(payloads(&v), vec!["once"]);
    let stale = receipts(&v);
    // Not settled: after 300 ms it is redelivered, and the old receipt is dead.
    let (_, v) = post_json(&http, format!("{group}/fetch?wait_ms=5000"), Value::Null).await;
    assert_eq!(payloads(&v), vec!["once"]);
    assert_eq!(v["messages"][0]["attempt"], 2);
    let (_, s) = post_json(
        &http,
        format!("{group}/ack"),
        serde_json::json!({"receipts": stale}),
    )
    .await;
    assert_eq!(s["settled"], 0);
    let (_, s) = post_json(
        &http,
        format!("{group}/ack"),
        serde_json::json!({"receipts": receipts(&v)}),
    )
    .await;
    assert_eq!(s["settled"], 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_basic_auth_and_acls() {
    let hash = ferry_net::auth::hash_password("pw").unwrap();
    let server = server_with(move |c| {
        c.mqtt.allow_anonymous = false;
        c.mqtt.users = vec![ferry_net::config::UserConfig {
            username: "alice".into(),
            password_hash: hash,
            publish: Some(vec!["alice/#".into()]),
            subscribe: Some(vec!["alice/#".into()]),
            admin: false,
        }];
    })
    .await;
    let base = format!("http://{}", server.http_addr().unwrap());
    let http = reqwest::Client::new();
    // The status of `method path` as `user` (with password "pw"; "mallory" has a wrong one).
    let status = |method: reqwest::Method, path: &str, user: Option<&str>| {
        let mut r = http.request(method, format!("{base}{path}")).body("x");
        if let Some(u) = user {
            r = r.basic_auth(u, Some(if u == "alice" { "pw" } else { "wrong" }));
        }
        async move { r.send().await.unwrap().status().as_u16() }
    };
    use reqwest::Method as M;
    // Health is open; the rest needs credentials.
    assert_eq!(status(M::GET, "/health", None).await, 200);
    let r = http.get(format!("{base}/stats")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"].to_str().unwrap(),
        "Basic realm=\"ferry\""
    );
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "unauthenticated");
    assert_eq!(status(M::GET, "/stats", Some("mallory")).await, 401);
    assert_eq!(status(M::GET, "/metrics", Some("alice")).await, 200);
    // Publishing, consuming and dead letters follow the user's ACL.
    assert_eq!(
        status(M::POST, "/topics/alice%2Fin/messages", Some("alice")).await,
        201
    );
    assert_eq!(
        status(M::POST, "/topics/bob%2Fin/messages", Some("alice")).await,
        403
    );
    assert_eq!(
        server.broker().topic_stats("bob/in").map(|t| t.next_offset),
        None,
        "a refused publish stores nothing"
    );
    assert_eq!(
        status(M::POST, "/topics/bob%2Fin/groups/g/fetch", Some("alice")).await,
        403
    );
    assert_eq!(
        status(M::POST, "/topics/alice%2Fin/groups/g/fetch", Some("alice")).await,
        200
    );
    assert_eq!(
        status(M::DELETE, "/topics/bob%2Fin/dead-letters", Some("alice")).await,
        403
    );
    assert_eq!(
        status(M::GET, "/topics/alice%2Fin/dead-letters", Some("alice")).await,
        200
    );
    server.shutdown().await;
}
