//! HTTP edge cases: every error is the API's JSON error, topics with plain slashes in
//! `/topics/...` paths, group fetches with a small `max`, and MQTT over WebSocket under the
//! HTTP listener's timeouts and connection cap.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Status, content type and JSON body of a response (the body `Null` if it is not JSON).
async fn answer(r: reqwest::Response) -> (u16, String, Value) {
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let text = r.text().await.unwrap();
    (
        status,
        ct,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn assert_json_error(what: &str, got: &(u16, String, Value), status: u16, code: &str) {
    let (s, ct, v) = got;
    assert_eq!(*s, status, "{what}: {got:?}");
    assert!(ct.starts_with("application/json"), "{what}: {got:?}");
    assert_eq!(v["error"], code, "{what}: {got:?}");
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_the_json_error() {
    let server = server_with(|c| c.http.max_body_bytes = 1024).await;
    let base = format!("http://{}", server.http_addr().unwrap());
    let http = reqwest::Client::new();
    let got = answer(
        http.post(format!("{base}/topics/t/messages"))
            .body(vec![b'x'; 4096])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_json_error("body too large", &got, 413, "payload_too_large");
    let got = answer(
        http.post(format!("{base}/topics/t/groups/g/ack"))
            .body("{}")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_json_error("no JSON content type", &got, 415, "unsupported_media_type");
    let got = answer(
        http.post(format!("{base}/topics/t/groups/g/ack"))
            .json(&json!({"receipts": 5}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_json_error("wrong JSON shape", &got, 422, "invalid_body");
    let got = answer(
        http.post(format!("{base}/topics/t/groups/g/ack"))
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_json_error("not JSON", &got, 400, "bad_request");
    let got = answer(
        http.post(format!("{base}/topics/t/messages?ttl_ms=soon"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_json_error("bad query", &got, 400, "bad_request");
    let got = answer(http.get(format!("{base}/nowhere")).send().await.unwrap()).await;
    assert_json_error("unknown route", &got, 404, "not_found");
    let got = answer(
        http.get(format!("{base}/topics/t/messages"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_json_error("wrong method", &got, 405, "method_not_allowed");
    let got = answer(http.get(format!("{base}/mqtt")).send().await.unwrap()).await;
    assert!(got.0 >= 400, "{got:?}");
    assert!(got.1.starts_with("application/json"), "{got:?}");
    // The API's own errors keep their codes; successes and metrics are untouched.
    let got = answer(
        http.post(format!("{base}/topics/t/messages?priority=urgent"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_json_error("own error", &got, 400, "invalid_priority");
    let got = answer(http.get(format!("{base}/metrics")).send().await.unwrap()).await;
    assert_eq!(got.0, 200);
    assert!(got.1.starts_with("text/plain"), "{got:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_with_slashes_work_plain_and_encoded_on_every_route() {
    let server = server().await;
    let base = format!("http://{}", server.http_addr().unwrap());
    let http = reqwest::Client::new();
    for (form, topic_in_path) in [("plain", "a/b/c"), ("encoded", "a%2Fb%2Fc")] {
        let t = format!("{base}/topics/{topic_in_path}");
        let g = format!("{t}/groups/w");
        // Join the group (it starts at the tail), then publish.
        let (st, _, v) = answer(http.post(format!("{g}/fetch")).send().await.unwrap()).await;
        assert_eq!(st, 200, "{form}: {v}");
        for p in ["one", "two", "three"] {
            let (st, _, v) = answer(
                http.post(format!("{t}/messages"))
                    .body(p)
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            assert_eq!(st, 201, "{form}: {v}");
            assert_eq!(v["topic"], "a/b/c", "{form}: {v}");
        }
        let (st, _, v) = answer(
            http.post(format!("{g}/fetch?max=3&wait_ms=2000"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(st, 200, "{form}: {v}");
        assert_eq!(v["topic"], "a/b/c");
        let ms = v["messages"].as_array().unwrap();
        assert_eq!(ms.len(), 3, "{form}: {v}");
        let r = |i: usize| ms[i]["receipt"].as_str().unwrap().to_string();
        let (_, _, s) = answer(
            http.post(format!("{g}/ack"))
                .json(&json!({"receipts": [r(0)]}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(s["settled"], 1, "{form} ack: {s}");
        let (_, _, s) = answer(
            http.post(format!("{g}/reject"))
                .json(&json!({"receipts": [r(1)], "reason": "bad"}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(s["settled"], 1, "{form} reject: {s}");
        let (_, _, s) = answer(
            http.post(format!("{g}/nack"))
                .json(&json!({"receipts": [r(2)]}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(s["settled"], 1, "{form} nack: {s}");
        let (st, _, v) = answer(http.get(format!("{t}/dead-letters")).send().await.unwrap()).await;
        assert_eq!(st, 200, "{form}: {v}");
        assert_eq!(v["topic"], "a/b/c");
        assert_eq!(v["len"], 1, "{form}: {v}");
        let (st, _, v) = answer(
            http.post(format!("{t}/dead-letters/redrive"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(st, 200, "{form}: {v}");
        assert_eq!(v["redriven"], 1, "{form}: {v}");
        let (st, _, v) = answer(
            http.delete(format!("{t}/dead-letters"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(st, 200, "{form}: {v}");
        // The nacked and the redriven one come again; settle them so the next form starts clean.
        let (_, _, v) = answer(
            http.post(format!("{g}/fetch?max=10&wait_ms=2000"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        let mut got: Vec<String> = v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["payload"].as_str().unwrap().to_string())
            .collect();
        if got.len() < 2 {
            let (_, _, more) = answer(
                http.post(format!("{g}/fetch?max=10&wait_ms=2000"))
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            got.extend(
                more["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m["payload"].as_str().unwrap().to_string()),
            );
        }
        got.sort();
        assert_eq!(got, vec!["three", "two"], "{form}");
    }
    // A topic whose own name ends like a route suffix: only the last suffix is the route's.
    let (st, _, v) = answer(
        http.post(format!("{base}/topics/x/messages/messages"))
            .body("m")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["topic"], "x/messages");
    // The OpenAPI document says both forms work.
    let (_, _, doc) = answer(
        http.get(format!("{base}/openapi.json"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let d = doc["paths"]["/topics/{topic}/messages"]["post"]["parameters"][0]["description"]
        .as_str()
        .unwrap();
    assert!(d.contains("a/b") && d.contains("a%2Fb"), "{d}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_fetch_leaves_nothing_to_come_back_twice() {
    let server = server().await;
    let base = format!("http://{}", server.http_addr().unwrap());
    let http = reqwest::Client::new();
    let g = format!("{base}/topics/small/groups/g");
    let (st, _, _) = answer(
        http.post(format!("{g}/fetch?ack_timeout_ms=300"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, 200);
    for i in 0..10 {
        server
            .broker()
            .publish("small", ferry::Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    let (_, _, first) = answer(
        http.post(format!("{g}/fetch?max=2&wait_ms=2000"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(first["messages"].as_array().unwrap().len(), 2, "{first}");
    // Let the two fetched ones time out (300 ms), then take everything.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let deadline = Instant::now() + WAIT;
    let mut seen: Vec<(u64, u64)> = Vec::new();
    let mut receipts: Vec<String> = Vec::new();
    while seen.len() < 10 && Instant::now() < deadline {
        let (_, _, v) = answer(
            http.post(format!("{g}/fetch?max=100&wait_ms=500"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        let ms = v["messages"].as_array().unwrap();
        let offsets: Vec<u64> = ms.iter().map(|m| m["offset"].as_u64().unwrap()).collect();
        let unique: HashSet<u64> = offsets.iter().copied().collect();
        assert_eq!(unique.len(), offsets.len(), "a duplicate in one fetch: {v}");
        for m in ms {
            seen.push((
                m["offset"].as_u64().unwrap(),
                m["attempt"].as_u64().unwrap(),
            ));
            receipts.push(m["receipt"].as_str().unwrap().to_string());
        }
        // Ack at once, so nothing times out again meanwhile.
        let (_, _, s) = answer(
            http.post(format!("{g}/ack"))
                .json(&json!({"receipts": receipts}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(s["unknown"], json!([]), "{s}");
        receipts.clear();
    }
    let mut offsets: Vec<u64> = seen.iter().map(|(o, _)| *o).collect();
    offsets.sort_unstable();
    assert_eq!(offsets, (0..10).collect::<Vec<_>>(), "{seen:?}");
    // The two first fetched came again as second attempts; the rest once, first attempts.
    let first_offsets: HashSet<u64> = first["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    for (o, attempt) in &seen {
        let want = if first_offsets.contains(o) { 2 } else { 1 };
        assert_eq!(*attempt, want, "offset {o}: {seen:?}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_websocket_outlives_the_http_timeouts_and_counts() {
    let server = server_with(|c| {
        c.http.header_read_timeout_secs = 1;
        c.http.request_timeout_secs = 1;
        c.http.max_connections = 1;
    })
    .await;
    let port = server.http_addr().unwrap().port();
    let url = format!("ws://127.0.0.1:{port}/mqtt");
    let mut o = rumqttc::v5::MqttOptions::new("ws-long", &url, port);
    o.set_transport(rumqttc::Transport::Ws);
    o.set_keep_alive(Duration::from_secs(30));
    let mut c = spawn5(o);
    c.connected().await;
    c.client
        .subscribe("ws/long", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    c.suback().await;
    // Past both HTTP timeouts, the WebSocket connection still carries MQTT.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    server
        .broker()
        .publish("ws/long", ferry::Message::new("late"))
        .await
        .unwrap();
    assert_eq!(c.publish().await.payload, "late");
    // It holds the listener's only connection: a plain request is refused meanwhile.
    let r = reqwest::get(format!("http://127.0.0.1:{port}/health")).await;
    match r {
        Ok(r) => assert_eq!(r.status().as_u16(), 503),
        Err(e) => assert!(e.is_connect() || e.is_request(), "{e}"),
    }
    c.kill();
    // Closed, its place is free again.
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/health")).await {
            if r.status().is_success() {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the WebSocket's place was not freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await;
}
