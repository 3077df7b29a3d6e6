//! Time to live: per message (`ttl`, `expires_at`) and per topic; an expired message is never
//! delivered, is counted, and optionally dead-lettered with reason `expired`. On virtual time.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, SystemTime};

use ferry::{Broker, DeadLetterReason, Message, TopicConfig, TryRecvError};
use proptest::prelude::*;

#[tokio::test(start_paused = true)]
async fn expired_messages_are_never_delivered_and_are_counted() {
    let broker = Broker::default();
    let mut sub = broker.subscribe("t").unwrap();
    let short = Message::builder()
        .payload("short")
        .ttl(Duration::from_secs(5))
        .build();
    assert!(short.expires_at().is_some());
    broker.publish("t", short).await.unwrap();
    broker
        .publish(
            "t",
            Message::builder()
                .payload("long")
                .ttl(Duration::from_secs(60))
                .build(),
        )
        .await
        .unwrap();
    broker.publish("t", "forever").await.unwrap();
    tokio::time::advance(Duration::from_secs(6)).await;
    assert_eq!(sub.recv().await.unwrap().payload().as_ref(), b"long");
    assert_eq!(sub.recv().await.unwrap().payload().as_ref(), b"forever");
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Empty);
    let s = sub.stats();
    assert_eq!((s.counters.expired, s.counters.acked), (1, 2));
    assert_eq!(s.unaccounted(), 0);
    assert_eq!(broker.topic_stats("t").unwrap().counters.expired, 1);
}

#[tokio::test(start_paused = true)]
async fn a_stream_of_expired_records_does_not_stall_the_reader() {
    let broker = Broker::default();
    let mut sub = broker.subscription("t").batch_size(8).build().unwrap();
    for _ in 0..100 {
        broker
            .publish(
                "t",
                Message::builder()
                    .payload("old")
                    .ttl(Duration::from_secs(1))
                    .build(),
            )
            .await
            .unwrap();
    }
    broker.publish("t", "fresh").await.unwrap();
    tokio::time::advance(Duration::from_secs(2)).await;
    let d = tokio::time::timeout(Duration::from_secs(1), sub.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.payload().as_ref(), b"fresh");
    assert_eq!(sub.stats().counters.expired, 100);
}

#[tokio::test(start_paused = true)]
async fn topic_default_ttl_and_dead_lettering_expired_messages() {
    let broker = Broker::default();
    broker
        .create_topic(
            "t",
            TopicConfig {
                default_ttl: Some(Duration::from_secs(10)),
                dead_letter_expired: true,
                ..TopicConfig::default()
            },
        )
        .unwrap();
    let mut sub = broker.subscription("t").manual_ack().build().unwrap();
    broker.publish("t", "a").await.unwrap();
    // An absolute expiry beyond the default wins for this message.
    let later = SystemTime::now() + Duration::from_secs(100);
    broker
        .publish(
            "t",
            Message::builder().payload("b").expires_at(later).build(),
        )
        .await
        .unwrap();
    // A delivery nacked with a delay that outlives the message expires before redelivery.
    broker.publish("t", "c").await.unwrap();
    let a = sub.recv().await.unwrap();
    assert_eq!(a.payload().as_ref(), b"a");
    a.nack_after(Duration::from_secs(30)).unwrap();
    tokio::time::advance(Duration::from_secs(31)).await;
    let b = sub.recv().await.unwrap();
    assert_eq!(b.payload().as_ref(), b"b");
    b.ack().unwrap();
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Empty);
    let dead = broker.dead_letters("t").unwrap().list(10);
    let mut reasons: Vec<_> = dead
        .iter()
        .map(|d| (d.message.payload().clone(), d.reason.clone()))
        .collect();
    reasons.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        reasons,
        vec![
            ("a".into(), DeadLetterReason::Expired),
            ("c".into(), DeadLetterReason::Expired),
        ]
    );
    assert_eq!(
        broker.stats().dead_letters_by_reason.get("expired"),
        Some(&2)
    );
    assert_eq!(sub.stats().unaccounted(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    /// Publish messages with random TTLs, let random amounts of virtual time pass, receive and
    /// settle at random moments: nothing handed to the subscriber has expired, and everything is
    /// accounted for.
    #[test]
    fn no_expired_message_is_ever_delivered(
        ops in proptest::collection::vec((0u8..4, 1u64..20), 1..100),
        manual in any::<bool>(),
    ) {
        common::paused_runtime().block_on(async move {
            use std::collections::HashMap;
            use tokio::time::Instant;
            let broker = Broker::default();
            let mut b = broker.subscription("t").batch_size(2);
            if manual {
                b = b.manual_ack().ack_timeout(Duration::from_secs(7));
            }
            let mut sub = b.build().unwrap();
            let mut expires: HashMap<u64, Instant> = HashMap::new();
            let mut held = Vec::new();
            for (op, n) in ops {
                match op {
                    0 => {
                        let m = Message::builder().payload("m").ttl(Duration::from_secs(n)).build();
                        let offset = broker.try_publish("t", m).unwrap();
                        expires.insert(offset, Instant::now() + Duration::from_secs(n));
                    }
                    1 => tokio::time::advance(Duration::from_secs(n)).await,
                    2 => {
                        for _ in 0..n {
                            let Ok(d) = sub.try_recv() else { break };
                            prop_assert!(Instant::now() < expires[&d.offset()], "offset {} delivered after expiry", d.offset());
                            held.push(d);
                        }
                    }
                    _ => {
                        for d in held.drain(..) {
                            let _ = d.ack();
                        }
                    }
                }
                let s = sub.stats();
                prop_assert_eq!(s.unaccounted(), 0, "{:?}", s);
            }
            Ok(())
        })?;
    }
}
