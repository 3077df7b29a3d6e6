//! Bounded topics: overflow policies (block, reject, drop oldest), byte bounds, the broker-wide
//! memory limit; and a property: a bounded topic never holds more than its bounds.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ferry::{Broker, BrokerConfig, Message, Overflow, PublishError, TopicConfig};
use proptest::prelude::*;

fn bounded(capacity: usize, max_bytes: Option<usize>, overflow: Overflow) -> TopicConfig {
    TopicConfig {
        capacity,
        max_bytes,
        overflow,
        ..TopicConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_refuses_at_once() {
    let broker = Broker::default();
    broker
        .create_topic("t", bounded(3, None, Overflow::Reject))
        .unwrap();
    let _sub = broker.subscribe("t").unwrap();
    for _ in 0..3 {
        broker.publish("t", "x").await.unwrap();
    }
    // `publish` does not wait under Reject.
    let err = tokio::time::timeout(Duration::from_secs(5), broker.publish("t", "x"))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(err, PublishError::Full { capacity: 3, .. }),
        "{err}"
    );
    assert_eq!(err.code(), "queue_full");
    assert_eq!(broker.topic_stats("t").unwrap().next_offset, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_makes_room_and_counts_what_it_dropped() {
    let broker = Broker::default();
    broker
        .create_topic("t", bounded(5, None, Overflow::DropOldest))
        .unwrap();
    let mut sub = broker.subscribe("t").unwrap();
    for i in 0..20u32 {
        broker
            .publish("t", Message::json(&i).unwrap())
            .await
            .unwrap();
        assert!(broker.topic_stats("t").unwrap().depth <= 5);
    }
    let mut got = Vec::new();
    while let Ok(d) = sub.try_recv() {
        got.push(d.decode::<u32>().unwrap());
    }
    assert_eq!(got, (15..20).collect::<Vec<_>>());
    let s = sub.stats();
    assert_eq!(s.counters.dropped, 15);
    assert_eq!(s.unaccounted(), 0);
}

#[tokio::test(start_paused = true)]
async fn block_honours_a_timeout_and_stores_nothing() {
    let broker = Broker::default();
    broker
        .create_topic("t", bounded(2, None, Overflow::Block))
        .unwrap();
    let mut sub = broker.subscribe("t").unwrap();
    let p = broker.publisher("t").unwrap();
    p.publish("1").await.unwrap();
    p.publish("2").await.unwrap();
    let err = p
        .publish_timeout("3", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(err, PublishError::Timeout("t".into()));
    assert_eq!(broker.topic_stats("t").unwrap().next_offset, 2);
    // Once the subscriber reads, the same call goes through.
    sub.recv().await.unwrap();
    assert_eq!(
        p.publish_timeout("3", Duration::from_secs(1))
            .await
            .unwrap(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_bound_blocks_until_space_is_freed() {
    let broker = Broker::default();
    broker
        .create_topic("t", bounded(1000, Some(8 * 1024), Overflow::Block))
        .unwrap();
    let mut sub = broker.subscribe("t").unwrap();
    let p = broker.publisher("t").unwrap();
    let mut accepted = 0;
    while p.try_publish(vec![0u8; 1024]).is_ok() {
        accepted += 1;
    }
    assert!(
        (5..8).contains(&accepted),
        "{accepted} records of 1 KiB fit in 8 KiB"
    );
    assert!(broker.topic_stats("t").unwrap().bytes <= 8 * 1024);
    let producer = tokio::spawn(async move {
        for _ in 0..50 {
            p.publish(vec![0u8; 1024]).await.unwrap();
        }
    });
    for _ in 0..(accepted + 50) {
        tokio::time::timeout(Duration::from_secs(10), sub.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(broker.topic_stats("t").unwrap().bytes <= 8 * 1024);
    }
    producer.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_memory_limit_is_a_typed_error() {
    let broker = Broker::new(BrokerConfig {
        memory_limit: Some(20 * 1024),
        ..BrokerConfig::default()
    });
    let mut a = broker.subscribe("a").unwrap();
    let _b = broker.subscribe("b").unwrap();
    let mut refused = None;
    for i in 0..100 {
        let topic = if i % 2 == 0 { "a" } else { "b" };
        if let Err(e) = broker.try_publish(topic, vec![0u8; 1024]) {
            refused = Some(e);
            break;
        }
    }
    let err = refused.expect("the limit must be reached");
    assert!(
        matches!(err, PublishError::MemoryLimit { limit: 20480, .. }),
        "{err}"
    );
    assert_eq!(err.code(), "memory_limit");
    // Reading frees memory across the broker.
    while a.try_recv().is_ok() {}
    broker.maintain();
    broker.try_publish("b", vec![0u8; 1024]).unwrap();
}

#[derive(Debug, Clone)]
enum Op {
    Publish(u16),
    Read(u8),
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn bounded_topics_never_exceed_their_bounds(
        capacity in 1usize..16,
        max_bytes in proptest::option::of(300usize..4000),
        drop_oldest in any::<bool>(),
        ops in proptest::collection::vec(
            prop_oneof![(0u16..600).prop_map(Op::Publish), (0u8..6).prop_map(Op::Read)],
            1..120,
        ),
    ) {
        let broker = Broker::default();
        let overflow = if drop_oldest { Overflow::DropOldest } else { Overflow::Reject };
        broker.create_topic("t", bounded(capacity, max_bytes, overflow)).unwrap();
        let mut sub = broker.subscription("t").batch_size(1).build().unwrap();
        for op in ops {
            match op {
                Op::Publish(size) => {
                    let r = broker.try_publish("t", vec![0u8; size as usize]);
                    if drop_oldest && Message::new(vec![0u8; size as usize]).size() <= max_bytes.unwrap_or(usize::MAX) {
                        prop_assert!(r.is_ok(), "{:?}", r);
                    }
                }
                Op::Read(n) => {
                    for _ in 0..n {
                        let _ = sub.try_recv();
                    }
                }
            }
            let s = broker.topic_stats("t").unwrap();
            prop_assert!(s.depth <= capacity, "{} records > capacity {}", s.depth, capacity);
            if let Some(max) = max_bytes {
                prop_assert!(s.bytes <= max, "{} bytes > {}", s.bytes, max);
            }
            prop_assert_eq!(sub.stats().unaccounted(), 0);
        }
    }
}

/// On a data directory the memory limit bounds the in-memory windows instead of refusing: every
/// publish is taken, the windows give up their oldest records (which are on disk), and a
/// subscriber that never read still gets everything, in order, from the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_windows_stay_under_the_memory_limit_and_nothing_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 64 * 1024;
    let broker = Broker::open_with(
        dir.path(),
        BrokerConfig {
            memory_limit: Some(limit),
            memory_high_watermark: Some(limit),
            ..BrokerConfig::default()
        },
        ferry::disk::DiskConfig::default(),
    )
    .unwrap();
    let mut events = broker.events();
    let mut all = broker.subscribe("mem/#").unwrap();
    for i in 0..1000u32 {
        let topic = format!("mem/{}", i % 20);
        let mut payload = vec![0u8; 1024];
        payload[..4].copy_from_slice(&i.to_be_bytes());
        broker.publish(&topic, payload).await.unwrap();
    }
    broker.maintain();
    while let Ok(e) = events.try_recv() {
        assert!(
            !matches!(e, ferry::BrokerEvent::MemoryPressure { .. }),
            "the windows grew past the limit: {e:?}"
        );
    }
    let mut seen = [0u32; 20];
    for _ in 0..1000 {
        let d = tokio::time::timeout(Duration::from_secs(10), all.recv())
            .await
            .unwrap()
            .unwrap();
        let i = u32::from_be_bytes(d.message().payload()[..4].try_into().unwrap());
        let t = (i % 20) as usize;
        assert_eq!(i / 20, seen[t], "topic {t} out of order");
        seen[t] += 1;
    }
    broker.shutdown(Duration::from_secs(5)).await;
}
