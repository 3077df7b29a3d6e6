//! Consumer groups: each message to exactly one member; members join and leave at any time and
//! the group keeps its position.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry::{Broker, Message, SubscribeError, TryRecvError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_message_goes_to_exactly_one_member() {
    let broker = Broker::default();
    let members: Vec<_> = (0..4)
        .map(|_| {
            broker
                .subscription("jobs")
                .group("workers")
                .build()
                .unwrap()
        })
        .collect();
    let received = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for mut m in members {
        let received = received.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            // Ends when the broker closes.
            while let Ok(d) = m.recv().await {
                got.push(d.decode::<u32>().unwrap());
                received.fetch_add(1, Ordering::SeqCst);
            }
            got
        }));
    }
    for i in 0..2000u32 {
        broker
            .publish("jobs", Message::json(&i).unwrap())
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(30), async {
        while received.load(Ordering::SeqCst) < 2000 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap();
    let s = broker.subscription_stats();
    broker.shutdown(Duration::from_secs(5)).await;
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (0..2000).collect::<Vec<_>>());
    assert_eq!(s.len(), 1, "a group is one consumer");
    assert_eq!(s[0].counters.delivered, 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_keeps_its_position_while_members_come_and_go() {
    let broker = Broker::default();
    let mut m1 = broker
        .subscription("jobs")
        .group("g")
        .batch_size(1)
        .build()
        .unwrap();
    for i in 0..10u32 {
        broker
            .publish("jobs", Message::json(&i).unwrap())
            .await
            .unwrap();
    }
    for i in 0..3u32 {
        assert_eq!(m1.recv().await.unwrap().decode::<u32>().unwrap(), i);
    }
    drop(m1);
    // No members: the group still exists and still holds its unread records.
    assert_eq!(broker.health().subscriptions, 1);
    broker
        .publish("jobs", Message::json(&10u32).unwrap())
        .await
        .unwrap();
    let mut m2 = broker.subscription("jobs").group("g").build().unwrap();
    let mut rest = Vec::new();
    while let Ok(d) = m2.try_recv() {
        rest.push(d.decode::<u32>().unwrap());
    }
    assert_eq!(rest, (3..=10).collect::<Vec<_>>());
    assert!(broker.delete_group("g"));
    assert_eq!(m2.try_recv().unwrap_err(), TryRecvError::Evicted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_and_fanout_side_by_side() {
    let broker = Broker::default();
    let mut fan = broker.subscribe("t").unwrap();
    let mut g1 = broker.subscription("t").group("a").build().unwrap();
    let mut g2 = broker.subscription("t").group("b").build().unwrap();
    broker.publish("t", "x").await.unwrap();
    for s in [&mut fan, &mut g1, &mut g2] {
        assert_eq!(s.recv().await.unwrap().payload().as_ref(), b"x");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_with_other_options_is_refused() {
    let broker = Broker::default();
    let _a = broker.subscription("t").group("g").build().unwrap();
    let err = broker.subscription("u").group("g").build().unwrap_err();
    assert!(matches!(err, SubscribeError::GroupMismatch { .. }), "{err}");
    let err = broker
        .subscription("t")
        .group("g")
        .manual_ack()
        .build()
        .unwrap_err();
    assert_eq!(err.code(), "group_mismatch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_ack_group_redelivers_to_another_member() {
    let broker = Broker::default();
    let mut a = broker
        .subscription("t")
        .group("g")
        .manual_ack()
        .batch_size(1)
        .build()
        .unwrap();
    let mut b = broker
        .subscription("t")
        .group("g")
        .manual_ack()
        .batch_size(1)
        .build()
        .unwrap();
    broker.publish("t", "1").await.unwrap();
    broker.publish("t", "2").await.unwrap();
    let d1 = a.recv().await.unwrap();
    let d2 = b.recv().await.unwrap();
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    seen.insert(d1.payload().to_vec());
    seen.insert(d2.payload().to_vec());
    assert_eq!(seen.len(), 2);
    d1.nack().unwrap();
    // Either member may get the redelivery; it has attempt 2.
    let r = tokio::select! {
        d = a.recv() => d.unwrap(),
        d = b.recv() => d.unwrap(),
    };
    assert_eq!(r.attempt(), 2);
    r.ack().unwrap();
    d2.ack().unwrap();
    let s = &broker.subscription_stats()[0];
    assert_eq!((s.counters.acked, s.in_flight, s.unaccounted()), (2, 0, 0));
}
