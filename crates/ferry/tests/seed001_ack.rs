//! Seed 001's acknowledgement behaviour: at-least-once delivery, ack timeout -> redelivery,
//! max attempts -> dead letter, nack with delay, prefetch. Timeouts run on virtual time.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ferry::{AckError, Broker, BrokerConfig, DeadLetterReason, Message, TryRecvError};

async fn settle() {
    // Let spawned tasks run without advancing virtual time much.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn unacked_delivery_is_redelivered_after_the_default_timeout() {
    let broker = Broker::default();
    assert_eq!(broker.config().ack_timeout, Duration::from_secs(30));
    let mut sub = broker
        .subscription("gpu-telemetry")
        .manual_ack()
        .build()
        .unwrap();
    broker.publish("gpu-telemetry", "util 85%").await.unwrap();
    let first = sub.recv().await.unwrap();
    assert_eq!(first.attempt(), 1);
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Empty);

    tokio::time::advance(Duration::from_secs(29)).await;
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Empty);
    tokio::time::advance(Duration::from_secs(2)).await;
    let again = sub.recv().await.unwrap();
    assert_eq!(again.attempt(), 2);
    assert_eq!(again.payload(), first.payload());
    assert_eq!(again.offset(), first.offset());
    // The first delivery is stale now: acking it is refused, acking the new one works.
    assert_eq!(first.ack(), Err(AckError::Stale));
    again.ack().unwrap();
    let s = sub.stats();
    assert_eq!(
        (s.counters.acked, s.counters.redelivered, s.in_flight),
        (1, 1, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_waiting_subscriber_wakes_for_the_redelivery() {
    let broker = Broker::default();
    let mut sub = broker
        .subscription("t")
        .manual_ack()
        .ack_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    broker.publish("t", "x").await.unwrap();
    let first = sub.recv().await.unwrap();
    std::mem::forget(first);
    let start = tokio::time::Instant::now();
    // recv sleeps until the ack deadline and then returns the redelivery.
    let again = sub.recv().await.unwrap();
    assert_eq!(again.attempt(), 2);
    assert!(start.elapsed() >= Duration::from_secs(5));
    again.ack().unwrap();
}

#[tokio::test(start_paused = true)]
async fn max_attempts_then_dead_letter() {
    let broker = Broker::default();
    assert_eq!(broker.config().max_attempts, 3);
    let mut sub = broker.subscription("orders").manual_ack().build().unwrap();
    let offset = broker.publish("orders", "order-1").await.unwrap();
    for attempt in 1..=3 {
        let d = sub.recv().await.unwrap();
        assert_eq!(d.attempt(), attempt);
        d.nack().unwrap();
    }
    settle().await;
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Empty);
    let dead = broker.dead_letters("orders").unwrap().list(10);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, DeadLetterReason::MaxAttempts);
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(dead[0].source_topic, "orders");
    assert_eq!(dead[0].source_offset, offset);
    let s = sub.stats();
    assert_eq!(s.counters.nacked, 3);
    assert_eq!(s.counters.dead_lettered, 1);
    assert_eq!(s.unaccounted(), 0);
    assert_eq!(
        broker.stats().dead_letters_by_reason.get("max_attempts"),
        Some(&1)
    );
}

#[tokio::test(start_paused = true)]
async fn ack_timeouts_count_as_attempts() {
    let broker = Broker::default();
    let mut sub = broker
        .subscription("t")
        .manual_ack()
        .ack_timeout(Duration::from_secs(1))
        .max_attempts(2)
        .build()
        .unwrap();
    broker.publish("t", "x").await.unwrap();
    std::mem::forget(sub.recv().await.unwrap());
    std::mem::forget(sub.recv().await.unwrap());
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Empty);
    assert_eq!(broker.dead_letters("t").unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn nack_with_delay_redelivers_after_the_delay() {
    let broker = Broker::default();
    let mut sub = broker.subscription("t").manual_ack().build().unwrap();
    broker.publish("t", "x").await.unwrap();
    let d = sub.recv().await.unwrap();
    d.nack_after(Duration::from_secs(10)).unwrap();
    tokio::time::advance(Duration::from_secs(9)).await;
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Empty);
    assert_eq!(sub.stats().in_flight, 1);
    tokio::time::advance(Duration::from_secs(1)).await;
    let d = sub.recv().await.unwrap();
    assert_eq!(d.attempt(), 2);
    d.ack().unwrap();
}

#[tokio::test(start_paused = true)]
async fn reject_dead_letters_immediately_with_the_reason() {
    let broker = Broker::default();
    let mut sub = broker.subscription("t").manual_ack().build().unwrap();
    broker
        .publish(
            "t",
            Message::builder().payload("bad").header("k", "v").build(),
        )
        .await
        .unwrap();
    sub.recv()
        .await
        .unwrap()
        .reject("validation error")
        .unwrap();
    let dead = broker.dead_letters("t").unwrap().list(10);
    assert_eq!(
        dead[0].reason,
        DeadLetterReason::Rejected("validation error".into())
    );
    assert_eq!(dead[0].attempts, 1);
    assert_eq!(dead[0].message.header("k"), Some("v"));
    assert_eq!(
        broker.stats().dead_letters_by_reason.get("rejected"),
        Some(&1)
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_an_unsettled_delivery_nacks_it() {
    let broker = Broker::default();
    let mut sub = broker.subscription("t").manual_ack().build().unwrap();
    broker.publish("t", "x").await.unwrap();
    drop(sub.recv().await.unwrap());
    let d = sub.recv().await.unwrap();
    assert_eq!(d.attempt(), 2);
    d.ack().unwrap();
    assert_eq!(sub.stats().counters.nacked, 1);
}

#[tokio::test(start_paused = true)]
async fn prefetch_limits_unacknowledged_deliveries() {
    let broker = Broker::new(BrokerConfig {
        prefetch: 4,
        ..BrokerConfig::default()
    });
    let mut sub = broker.subscription("t").manual_ack().build().unwrap();
    for i in 0..10u32 {
        broker
            .publish("t", Message::json(&i).unwrap())
            .await
            .unwrap();
    }
    let mut held = Vec::new();
    while let Ok(d) = sub.try_recv() {
        held.push(d);
    }
    assert_eq!(held.len(), 4);
    assert_eq!(sub.stats().in_flight, 4);
    // A recv waiting at the limit wakes when something is acked.
    let first = held.remove(0);
    let waiter = tokio::spawn(async move {
        let d = sub.recv().await.unwrap();
        (d.decode::<u32>().unwrap(), sub)
    });
    settle().await;
    assert!(!waiter.is_finished());
    first.ack().unwrap();
    let (value, _sub) = waiter.await.unwrap();
    assert_eq!(value, 4);
    for d in held {
        d.ack().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn at_least_once_survives_a_consumer_that_disappears() {
    // A group member takes a message and vanishes without acking: another member gets it.
    let broker = Broker::default();
    let mut a = broker
        .subscription("jobs")
        .group("workers")
        .manual_ack()
        .build()
        .unwrap();
    let mut b = broker
        .subscription("jobs")
        .group("workers")
        .manual_ack()
        .build()
        .unwrap();
    broker.publish("jobs", "job-1").await.unwrap();
    let d = a.recv().await.unwrap();
    assert_eq!(d.payload().as_ref(), b"job-1");
    std::mem::forget(d);
    drop(a);
    let d = b.recv().await.unwrap();
    assert_eq!(d.payload().as_ref(), b"job-1");
    // The member left before processing it, so this is still its first real attempt.
    assert_eq!(d.attempt(), 1);
    d.ack().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_channel() {
    let broker = Broker::default();
    let mut payloads = broker.subscribe("gpu-telemetry").unwrap().into_payloads(16);
    broker
        .publish("gpu-telemetry", "GPU utilization: 85%")
        .await
        .unwrap();
    assert_eq!(
        payloads.recv().await.unwrap().as_ref(),
        b"GPU utilization: 85%"
    );
    // Dropping the receiver unsubscribes.
    drop(payloads);
    tokio::time::timeout(Duration::from_secs(5), async {
        while broker.health().subscriptions > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap();
}
