//! Content-based routing: header conditions on subscriptions, and seed 004's topic router with
//! its `game.*`, `player.*.joined` and `#` catch-all examples.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ferry::{Broker, HandlerOptions, HeaderMatch, Message, Router, SubscribeError, TryRecvError};

fn msg(payload: &str, headers: &[(&str, &str)]) -> Message {
    let mut b = Message::builder().payload(payload.to_string());
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_conditions_select_what_a_subscription_receives() {
    let broker = Broker::default();
    let mut eu = broker
        .subscription("orders")
        .where_header(HeaderMatch::equals("region", "eu"))
        .build()
        .unwrap();
    let mut urgent_emea = broker
        .subscription("orders")
        .manual_ack()
        .where_header(HeaderMatch::exists("urgent"))
        .where_header(HeaderMatch::one_of("region", ["eu", "africa"]))
        .build()
        .unwrap();
    broker
        .publish("orders", msg("1", &[("region", "eu")]))
        .await
        .unwrap();
    broker
        .publish("orders", msg("2", &[("region", "us"), ("urgent", "yes")]))
        .await
        .unwrap();
    broker
        .publish("orders", msg("3", &[("region", "africa"), ("urgent", "")]))
        .await
        .unwrap();
    broker
        .publish("orders", msg("4", &[("region", "eu"), ("urgent", "1")]))
        .await
        .unwrap();
    let got = |s: &mut ferry::Subscription| {
        std::iter::from_fn(|| s.try_recv().ok())
            .map(|d| {
                let p = std::str::from_utf8(d.payload()).unwrap().to_string();
                let _ = d.ack();
                p
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(got(&mut eu), vec!["1", "4"]);
    assert_eq!(got(&mut urgent_emea), vec!["3", "4"]);
    let s = eu.stats();
    assert_eq!(
        (s.counters.filtered, s.counters.acked, s.unaccounted()),
        (2, 2, 0)
    );
    assert_eq!(urgent_emea.stats().unaccounted(), 0);
    // Nothing filtered out is held: the topic keeps no record nobody needs.
    assert_eq!(broker.topic_stats("orders").unwrap().depth, 0);
    // A group's conditions are part of its identity.
    let _g = broker
        .subscription("orders")
        .group("g")
        .where_header(HeaderMatch::exists("urgent"))
        .build()
        .unwrap();
    let err = broker
        .subscription("orders")
        .group("g")
        .build()
        .unwrap_err();
    assert!(matches!(err, SubscribeError::GroupMismatch { .. }));
}

fn seed_router() -> Router {
    Router::new()
        .route("game.*", "game_events")
        .unwrap()
        .route("player.*.joined", "player_events")
        .unwrap()
        .route("#", "all_events")
        .unwrap()
}

#[test]
fn seed_004_routes() {
    let router = seed_router();
    let m = Message::new("x");
    let names = |topic: &str| -> Vec<String> {
        router
            .destinations(topic, &m)
            .iter()
            .map(|t| t.to_string())
            .collect()
    };
    assert_eq!(names("game.started"), vec!["game_events", "all_events"]);
    assert_eq!(
        names("player.42.joined"),
        vec!["player_events", "all_events"]
    );
    assert_eq!(names("player.42.left"), vec!["all_events"]);
    assert_eq!(names("game.a.b"), vec!["all_events"]);
    // A router's own targets are never routed again.
    assert!(names("all_events").is_empty());
    // Predicates route on content.
    let vip = Router::new()
        .route_if(|_, m| m.header("tier") == Some("vip"), "vip")
        .unwrap();
    assert_eq!(
        vip.destinations("orders", &msg("o", &[("tier", "vip")]))
            .len(),
        1
    );
    assert!(vip
        .destinations("orders", &msg("o", &[("tier", "std")]))
        .is_empty());
    assert!(Router::new().route("a/#/b", "x").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_router_forwards_without_looping() {
    let broker = Broker::default();
    let mut games = broker.subscribe("game_events").unwrap();
    let mut players = broker.subscribe("player_events").unwrap();
    let mut all = broker.subscribe("all_events").unwrap();
    let handle = seed_router()
        .start(&broker, "#", "router", HandlerOptions::default())
        .unwrap();
    for topic in ["game.started", "player.7.joined", "chat.hello"] {
        broker.publish(topic, topic.to_string()).await.unwrap();
    }
    let mut seen = Vec::new();
    for _ in 0..3 {
        let d = tokio::time::timeout(Duration::from_secs(10), all.recv())
            .await
            .unwrap()
            .unwrap();
        seen.push(std::str::from_utf8(d.payload()).unwrap().to_string());
    }
    seen.sort();
    assert_eq!(seen, vec!["chat.hello", "game.started", "player.7.joined"]);
    let g = tokio::time::timeout(Duration::from_secs(10), games.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(g.payload().as_ref(), b"game.started");
    let p = tokio::time::timeout(Duration::from_secs(10), players.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.payload().as_ref(), b"player.7.joined");
    let report = broker.shutdown(Duration::from_secs(5)).await;
    assert!(report.drained);
    assert_eq!(
        all.try_recv().unwrap_err(),
        TryRecvError::Closed,
        "no loop: nothing more"
    );
    assert_eq!(handle.join().await.failed, 0);
}
