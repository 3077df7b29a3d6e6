//! Publishing: offsets, batches, backpressure, typed errors.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ferry::{Broker, BrokerConfig, Message, PublishError, TopicConfig, TopicError};

fn small(capacity: usize) -> Broker {
    Broker::new(BrokerConfig {
        topic_defaults: TopicConfig {
            capacity,
            ..TopicConfig::default()
        },
        ..BrokerConfig::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_increase_per_topic() {
    let broker = Broker::default();
    let _s = broker.subscribe("a").unwrap();
    for i in 0..5 {
        assert_eq!(broker.publish("a", "x").await.unwrap(), i);
    }
    assert_eq!(broker.try_publish("a", "x").unwrap(), 5);
    let p = broker.publisher("a").unwrap().with_producer_id("p1");
    assert_eq!(p.publish("y").await.unwrap(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_contiguous_and_all_or_nothing() {
    let broker = small(10);
    let mut sub = broker.subscribe("t").unwrap();
    broker.publish("t", "first").await.unwrap();
    let range = broker
        .publish_batch("t", (0..5u32).map(|i| Message::json(&i).unwrap()))
        .await
        .unwrap();
    assert_eq!(range, 1..6);
    let p = broker.publisher("t").unwrap();
    // 6 unread + 5 > 10: refused whole, nothing stored.
    let err = p
        .try_publish_batch((0..5u32).map(|i| Message::json(&i).unwrap()))
        .unwrap_err();
    assert!(matches!(err, PublishError::Full { .. }));
    assert_eq!(broker.topic_stats("t").unwrap().next_offset, 6);
    let err = broker
        .publish_batch("t", (0..11u32).map(|i| Message::json(&i).unwrap()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "batch_too_large");
    let mut offsets = Vec::new();
    while let Ok(d) = sub.try_recv() {
        offsets.push(d.offset());
    }
    assert_eq!(offsets, (0..6).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_waits_for_space_and_resumes() {
    let broker = small(4);
    let mut sub = broker.subscribe("t").unwrap();
    let p = broker.publisher("t").unwrap();
    let producer = tokio::spawn(async move {
        for i in 0..100u32 {
            p.publish(Message::json(&i).unwrap()).await.unwrap();
        }
    });
    for i in 0..100u32 {
        let d = tokio::time::timeout(Duration::from_secs(10), sub.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.decode::<u32>().unwrap(), i);
        let depth = broker.topic_stats("t").unwrap().depth;
        assert!(depth <= 4 + 1, "capacity exceeded: {depth}");
    }
    producer.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_topics_are_typed_errors() {
    let broker = Broker::default();
    for bad in ["", "a/+", "a/#", "$SYS/x", "with\0nul"] {
        let err = broker.publish(bad, "x").await.unwrap_err();
        assert!(
            matches!(err, PublishError::InvalidTopic(_)),
            "{bad:?}: {err}"
        );
        assert_eq!(err.code(), "invalid_topic");
    }
    let long = "x".repeat(ferry::topic::MAX_TOPIC_LEN + 1);
    assert!(matches!(
        broker.try_publish(&long, "x"),
        Err(PublishError::InvalidTopic(TopicError::TooLong { .. }))
    ));
    assert!(broker.publisher("a+b").is_err());
    assert!(broker.subscribe("a/#/b").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_broker_refuses_work_without_panicking() {
    let broker = Broker::default();
    let p = broker.publisher("t").unwrap();
    let mut sub = broker.subscribe("t").unwrap();
    p.publish("before").await.unwrap();
    let report = broker.shutdown(Duration::from_millis(200)).await;
    assert!(
        !report.drained,
        "the subscriber never read: it cannot drain"
    );
    assert_eq!(report.dropped_at_close, 1);
    assert_eq!(p.publish("after").await, Err(PublishError::Closed));
    assert_eq!(p.try_publish("after"), Err(PublishError::Closed));
    assert_eq!(broker.try_publish("t", "after"), Err(PublishError::Closed));
    assert!(broker.subscribe("t").is_err());
    assert_eq!(sub.recv().await.unwrap_err(), ferry::RecvError::Closed);
    // A second shutdown returns the same report.
    assert_eq!(broker.shutdown(Duration::from_secs(1)).await, report);
    assert_eq!(broker.health().status, "closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_published_to_nobody_are_counted_and_skipped() {
    let broker = Broker::default();
    for _ in 0..2000 {
        broker.publish("quiet", "x").await.unwrap();
    }
    // Releasing offsets that were never stored must terminate.
    tokio::time::timeout(Duration::from_secs(5), async { broker.maintain() })
        .await
        .unwrap();
    let mut sub = broker
        .subscription("quiet")
        .start(ferry::StartPosition::Earliest)
        .build()
        .unwrap();
    assert_eq!(broker.publish("quiet", "heard").await.unwrap(), 2000);
    let d = sub.recv().await.unwrap();
    assert_eq!((d.offset(), d.payload().as_ref()), (2000, &b"heard"[..]));
    let s = broker.topic_stats("quiet").unwrap();
    assert_eq!(s.counters.dropped, 2000);
    assert_eq!(s.counters.published, 2001);
    assert_eq!(s.lag.max_lag, 0);
}

/// Clones of a publisher are publishers of their own (each keeps its own copy of the topic
/// name): used from several threads at once they still stamp the right topic and producer on
/// every record and share the topic's one sequence of offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloned_publishers_on_several_threads_share_one_offset_sequence() {
    const THREADS: usize = 4;
    const EACH: usize = 1_000;
    let broker = Broker::default();
    let mut sub = broker.subscribe("fleet/+/gpu").unwrap();
    let publisher = broker
        .publisher("fleet/a/gpu")
        .unwrap()
        .with_producer_id("p");
    let mut offsets: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let p = publisher.clone();
                s.spawn(move || {
                    assert_eq!(p.topic().as_str(), "fleet/a/gpu");
                    (0..EACH)
                        .map(|_| p.try_publish("x").unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    offsets.sort_unstable();
    assert_eq!(offsets, (0..(THREADS * EACH) as u64).collect::<Vec<_>>());
    for expected in 0..(THREADS * EACH) as u64 {
        let d = sub.recv().await.unwrap();
        assert_eq!(d.offset(), expected);
        assert_eq!(d.topic().as_str(), "fleet/a/gpu");
        assert_eq!(d.message().producer_id(), Some("p"));
    }
}
