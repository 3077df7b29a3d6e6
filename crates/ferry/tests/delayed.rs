//! Delayed and scheduled delivery: a message with `delay` or `deliver_at` is appended (and gets
//! its offset) at once, but no subscription receives it before its time. Timers live in one heap
//! per subscription, not in a task per message. On virtual time.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use ferry::{Broker, Message, TryRecvError};

#[tokio::test(start_paused = true)]
async fn a_delayed_message_waits_for_its_time() {
    let broker = Broker::default();
    let mut fan = broker.subscribe("t").unwrap();
    let mut group = broker
        .subscription("t")
        .group("g")
        .manual_ack()
        .build()
        .unwrap();
    let delayed = Message::builder()
        .payload("later")
        .delay(Duration::from_secs(10))
        .build();
    assert!(delayed.deliver_at().is_some());
    assert_eq!(broker.publish("t", delayed).await.unwrap(), 0);
    assert_eq!(broker.publish("t", "now").await.unwrap(), 1);
    // The immediate message overtakes the delayed one.
    assert_eq!(fan.recv().await.unwrap().payload().as_ref(), b"now");
    let now = group.recv().await.unwrap();
    assert_eq!(now.payload().as_ref(), b"now");
    now.ack().unwrap();
    assert_eq!(fan.try_recv().unwrap_err(), TryRecvError::Empty);
    assert_eq!(
        fan.stats().in_flight,
        1,
        "the scheduled message is held, not lost"
    );
    assert_eq!(fan.stats().unaccounted(), 0);
    tokio::time::advance(Duration::from_secs(9)).await;
    assert_eq!(fan.try_recv().unwrap_err(), TryRecvError::Empty);
    tokio::time::advance(Duration::from_secs(1)).await;
    let d = fan.recv().await.unwrap();
    assert_eq!(
        (d.payload().as_ref(), d.offset(), d.attempt()),
        (&b"later"[..], 0, 1)
    );
    let g = group.recv().await.unwrap();
    assert_eq!((g.offset(), g.attempt()), (0, 1));
    g.ack().unwrap();
    for s in broker.subscription_stats() {
        assert_eq!(
            (s.in_flight, s.counters.redelivered, s.unaccounted()),
            (0, 0, 0),
            "{s:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_waiting_subscriber_wakes_exactly_when_due() {
    let broker = Broker::default();
    let mut sub = broker.subscribe("t").unwrap();
    let start = tokio::time::Instant::now();
    let at = SystemTime::now() + Duration::from_secs(30);
    broker
        .publish("t", Message::builder().payload("x").deliver_at(at).build())
        .await
        .unwrap();
    let d = sub.recv().await.unwrap();
    let waited = start.elapsed();
    assert_eq!(d.payload().as_ref(), b"x");
    assert!(
        waited >= Duration::from_millis(29_900) && waited <= Duration::from_secs(31),
        "{waited:?}"
    );
}

/// Real time: the due times are wall-clock times, which paused Tokio time does not follow.
#[tokio::test]
async fn messages_come_out_in_due_order() {
    let broker = Broker::default();
    let mut sub = broker.subscribe("t").unwrap();
    // Publish with delays in a scrambled order; they must arrive sorted by due time.
    // Due times from one base: a delay counts from the moment its message is built, so on a
    // loaded machine delays alone would not fix the order. They are 3 ms apart: a wall-clock
    // time is put on the broker's monotonic clock by reading both clocks, and a thread
    // preempted between the two reads (a busy machine) shifts that one message by as much.
    let delays: Vec<u64> = (0..1000u64).map(|i| (i * 7919) % 1000 + 1).collect();
    let base = SystemTime::now() + Duration::from_millis(300);
    for d in &delays {
        let m = Message::builder()
            .payload(d.to_string())
            .deliver_at(base + Duration::from_millis(*d * 3))
            .build();
        broker.publish("t", m).await.unwrap();
    }
    let alive = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    assert!(alive <= 2, "no task per delayed message: {alive} alive");
    let mut got = Vec::new();
    while got.len() < delays.len() {
        let d = sub.recv().await.unwrap();
        got.push(
            std::str::from_utf8(d.payload())
                .unwrap()
                .parse::<u64>()
                .unwrap(),
        );
    }
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(got, sorted);
}

#[tokio::test(start_paused = true)]
async fn a_message_that_expires_before_its_delivery_time_is_never_delivered() {
    let broker = Broker::default();
    let mut sub = broker.subscribe("t").unwrap();
    let m = Message::builder()
        .payload("too late")
        .delay(Duration::from_secs(10))
        .ttl(Duration::from_secs(5))
        .build();
    broker.publish("t", m).await.unwrap();
    broker.publish("t", "fine").await.unwrap();
    assert_eq!(sub.recv().await.unwrap().payload().as_ref(), b"fine");
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Empty);
    let s = sub.stats();
    assert_eq!(
        (s.counters.expired, s.in_flight, s.unaccounted()),
        (1, 0, 0)
    );
}
