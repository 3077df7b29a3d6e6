//! Seed 002's multi-consumer queue: independent positions, start positions, lag statistics,
//! stale-consumer detection and clean-up, and bounded memory.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use ferry::{
    Broker, BrokerConfig, BrokerEvent, Message, RecvError, Retention, StartPosition, TopicConfig,
    TryRecvError,
};

fn replayable() -> TopicConfig {
    TopicConfig {
        keep_consumed: true,
        retention: Retention {
            max_messages: Some(100),
            ..Retention::default()
        },
        ..TopicConfig::default()
    }
}

async fn publish_n(broker: &Broker, topic: &str, n: u32) {
    for i in 0..n {
        broker
            .publish(topic, Message::json(&i).unwrap())
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_have_independent_positions() {
    let broker = Broker::default();
    let mut fast = broker.subscribe("q").unwrap();
    let mut slow = broker.subscribe("q").unwrap();
    publish_n(&broker, "q", 10).await;
    for i in 0..10u32 {
        assert_eq!(fast.recv().await.unwrap().decode::<u32>().unwrap(), i);
    }
    for i in 0..3u32 {
        assert_eq!(slow.recv().await.unwrap().decode::<u32>().unwrap(), i);
    }
    // Reading ahead in one does not move the other.
    assert_eq!(fast.try_recv().unwrap_err(), TryRecvError::Empty);
    assert_eq!(slow.recv().await.unwrap().decode::<u32>().unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_positions() {
    let broker = Broker::default();
    broker.create_topic("log", replayable()).unwrap();
    publish_n(&broker, "log", 5).await;
    let cut = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(5)).await;
    publish_n(&broker, "log", 5).await;

    let mut earliest = broker
        .subscription("log")
        .start(StartPosition::Earliest)
        .build()
        .unwrap();
    assert_eq!(earliest.recv().await.unwrap().offset(), 0);
    let mut at = broker
        .subscription("log")
        .start(StartPosition::Offset(7))
        .build()
        .unwrap();
    assert_eq!(at.recv().await.unwrap().offset(), 7);
    let mut since = broker
        .subscription("log")
        .start(StartPosition::Timestamp(cut))
        .build()
        .unwrap();
    assert_eq!(since.recv().await.unwrap().offset(), 5);
    let mut latest = broker.subscribe("log").unwrap();
    assert_eq!(latest.try_recv().unwrap_err(), TryRecvError::Empty);
    broker.publish("log", "new").await.unwrap();
    assert_eq!(latest.recv().await.unwrap().offset(), 10);
    // An offset beyond the tail is clamped to the tail.
    let mut future = broker
        .subscription("log")
        .start(StartPosition::Offset(1_000))
        .build()
        .unwrap();
    assert_eq!(future.try_recv().unwrap_err(), TryRecvError::Empty);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_bounds_a_replayable_topic() {
    let broker = Broker::default();
    broker.create_topic("log", replayable()).unwrap();
    publish_n(&broker, "log", 250).await;
    let s = broker.topic_stats("log").unwrap();
    assert_eq!(s.depth, 100);
    assert_eq!(s.first_offset, 150);
    assert_eq!(s.next_offset, 250);
    let mut sub = broker
        .subscription("log")
        .start(StartPosition::Earliest)
        .build()
        .unwrap();
    assert_eq!(sub.recv().await.unwrap().offset(), 150);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_statistics() {
    let broker = Broker::default();
    let mut a = broker.subscribe("q").unwrap();
    let _b = broker.subscribe("q").unwrap();
    let _g = broker.subscription("q").group("g").build().unwrap();
    publish_n(&broker, "q", 10).await;
    for _ in 0..4 {
        a.recv().await.unwrap();
    }
    // `a` took all ten into its buffer in one batch, so the broker sees it caught up;
    // `b` and the group have read nothing.
    let lag = broker.lag();
    assert_eq!(lag.consumers, 3);
    assert_eq!(lag.max_lag, 10);
    let t = broker.topic_stats("q").unwrap().lag;
    assert_eq!(t.max_lag, 10);
    assert!((lag.avg_lag - 20.0 / 3.0).abs() < 1e-9, "{lag:?}");
}

#[tokio::test(start_paused = true)]
async fn stale_consumers_are_detected_and_cleaned_up() {
    let broker = Broker::new(BrokerConfig {
        stale_after: Some(Duration::from_secs(60)),
        ..BrokerConfig::default()
    });
    let mut events = broker.events();
    let mut active = broker.subscription("q").name("active").build().unwrap();
    let mut stale = broker.subscription("q").name("stale").build().unwrap();
    publish_n(&broker, "q", 3).await;
    active.recv().await.unwrap();
    tokio::time::advance(Duration::from_secs(30)).await;
    active.recv().await.unwrap();
    assert!(broker.stale_consumers(Duration::from_secs(60)).is_empty());
    tokio::time::advance(Duration::from_secs(31)).await;
    let found = broker.stale_consumers(Duration::from_secs(60));
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].name, "stale");
    assert_eq!(found[0].lag, 3);
    // The maintenance task reports it.
    tokio::time::advance(Duration::from_secs(2)).await;
    loop {
        match events.recv().await.unwrap() {
            BrokerEvent::SubscriberStale { name, lag, .. } => {
                assert_eq!((name.as_str(), lag), ("stale", 3));
                break;
            }
            _ => continue,
        }
    }
    // Clean-up evicts it: its records are released and its recv says so.
    assert_eq!(
        broker.cleanup_stale_consumers(Duration::from_secs(60), 1),
        1
    );
    assert_eq!(stale.recv().await.unwrap_err(), RecvError::Evicted);
    assert_eq!(broker.health().subscriptions, 1);
    let depth = broker.topic_stats("q").unwrap().depth;
    assert!(
        depth <= 1,
        "only the active subscriber's unread record may remain: {depth}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_follows_the_slowest_cursor_not_the_data() {
    let broker = Broker::default();
    let mut sub = broker.subscribe("flood").unwrap();
    let payload = bytes::Bytes::from(vec![0u8; 1024]);
    for round in 0..20 {
        for _ in 0..1000 {
            broker.publish("flood", payload.clone()).await.unwrap();
        }
        for _ in 0..1000 {
            sub.recv().await.unwrap();
        }
        let s = broker.topic_stats("flood").unwrap();
        assert!(
            s.depth <= 2048,
            "round {round}: {} records retained",
            s.depth
        );
    }
    broker.maintain();
    assert_eq!(broker.topic_stats("flood").unwrap().depth, 0);
    assert_eq!(
        broker.topic_stats("flood").unwrap().counters.published,
        20_000
    );
}

#[tokio::test(start_paused = true)]
async fn memory_pressure_events() {
    let broker = Broker::new(BrokerConfig {
        memory_high_watermark: Some(100_000),
        ..BrokerConfig::default()
    });
    let mut events = broker.events();
    let mut sub = broker.subscribe("big").unwrap();
    for _ in 0..200 {
        broker.publish("big", vec![0u8; 1024]).await.unwrap();
    }
    broker.maintain();
    let mut saw = Vec::new();
    while let Ok(e) = events.try_recv() {
        saw.push(e);
    }
    assert!(
        saw.iter()
            .any(|e| matches!(e, BrokerEvent::MemoryPressure { .. })),
        "{saw:?}"
    );
    for _ in 0..200 {
        sub.recv().await.unwrap();
    }
    broker.maintain();
    let mut normal = false;
    while let Ok(e) = events.try_recv() {
        normal |= matches!(e, BrokerEvent::MemoryNormal { .. });
    }
    assert!(normal);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_bytes_and_age() {
    let broker = Broker::default();
    let by_bytes = TopicConfig {
        keep_consumed: true,
        retention: Retention {
            max_bytes: Some(10 * 1024),
            ..Retention::default()
        },
        ..TopicConfig::default()
    };
    broker.create_topic("bytes", by_bytes).unwrap();
    for _ in 0..100 {
        broker.publish("bytes", vec![0u8; 1024]).await.unwrap();
    }
    let s = broker.topic_stats("bytes").unwrap();
    assert!(s.bytes <= 10 * 1024, "{} bytes retained", s.bytes);
    assert!(s.depth >= 8 && s.depth < 10, "{} records retained", s.depth);

    let by_age = TopicConfig {
        keep_consumed: true,
        retention: Retention {
            max_age: Some(Duration::from_secs(3600)),
            ..Retention::default()
        },
        ..TopicConfig::default()
    };
    broker.create_topic("age", by_age).unwrap();
    let old = SystemTime::now() - Duration::from_secs(7200);
    for _ in 0..5 {
        broker
            .publish(
                "age",
                Message::builder().payload("old").timestamp(old).build(),
            )
            .await
            .unwrap();
    }
    broker.publish("age", "new").await.unwrap();
    broker.maintain();
    let s = broker.topic_stats("age").unwrap();
    assert_eq!((s.depth, s.first_offset), (1, 5));
    // A new subscription asking for offset 0 starts at the first retained record.
    let mut sub = broker
        .subscription("bytes")
        .start(StartPosition::Offset(0))
        .build()
        .unwrap();
    let first = sub.recv().await.unwrap().offset();
    assert!(first >= 90, "{first}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_evicted_under_a_lagging_subscriber_are_counted_as_dropped() {
    let broker = Broker::default();
    broker
        .create_topic(
            "log",
            TopicConfig {
                keep_consumed: true,
                retention: Retention {
                    max_messages: Some(10),
                    ..Retention::default()
                },
                ..TopicConfig::default()
            },
        )
        .unwrap();
    let mut sub = broker.subscribe("log").unwrap();
    publish_n(&broker, "log", 30).await;
    assert_eq!(sub.recv().await.unwrap().offset(), 20);
    let s = sub.stats();
    assert_eq!(s.counters.dropped, 20);
    assert_eq!(s.unaccounted(), 0);
}
