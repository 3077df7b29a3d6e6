//! Priority: among the messages waiting for a subscription, higher priority first and FIFO
//! within a level; aging as the option against starvation.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::VecDeque;
use std::time::Duration;

use ferry::{Broker, Message, Priority, TopicConfig, TryRecvError};
use proptest::prelude::*;

fn msg(p: Priority, n: u32) -> Message {
    Message::builder()
        .payload(n.to_string())
        .priority(p)
        .build()
}

fn num(d: &ferry::Delivery) -> u32 {
    std::str::from_utf8(d.payload()).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_first_fifo_within_a_level() {
    let broker = Broker::default();
    let mut fan = broker.subscription("tasks").batch_size(1).build().unwrap();
    let mut group = broker
        .subscription("tasks")
        .group("w")
        .manual_ack()
        .batch_size(1)
        .build()
        .unwrap();
    let plan = [
        (Priority::Low, 1),
        (Priority::Normal, 2),
        (Priority::Highest, 3),
        (Priority::Low, 4),
        (Priority::High, 5),
        (Priority::Highest, 6),
        (Priority::Lowest, 7),
    ];
    for (p, n) in plan {
        broker.publish("tasks", msg(p, n)).await.unwrap();
    }
    let expected = vec![3, 6, 5, 2, 1, 4, 7];
    let got: Vec<u32> = std::iter::from_fn(|| fan.try_recv().ok())
        .map(|d| num(&d))
        .collect();
    assert_eq!(got, expected);
    let mut got = Vec::new();
    while let Ok(d) = group.try_recv() {
        got.push(num(&d));
        d.ack().unwrap();
    }
    assert_eq!(got, expected);
    for s in broker.subscription_stats() {
        assert_eq!((s.in_flight, s.unaccounted()), (0, 0), "{s:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn aging_lets_a_starved_message_through() {
    let broker = Broker::default();
    broker
        .create_topic(
            "t",
            TopicConfig {
                priority_aging: Some(Duration::from_secs(5)),
                ..TopicConfig::default()
            },
        )
        .unwrap();
    let mut sub = broker.subscription("t").batch_size(1).build().unwrap();
    broker.publish("t", msg(Priority::Lowest, 0)).await.unwrap();
    // A steady stream of high-priority work: without aging the low one would wait for all of it.
    let mut order = Vec::new();
    for i in 1..=20u32 {
        broker.publish("t", msg(Priority::High, i)).await.unwrap();
        order.push(num(&sub.recv().await.unwrap()));
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    let pos = order
        .iter()
        .position(|n| *n == 0)
        .expect("the low-priority message got through");
    assert!(
        pos <= 7,
        "delivered after about 5 s of waiting, at position {pos}: {order:?}"
    );
}

#[derive(Debug, Clone)]
enum Op {
    Publish(u8),
    Recv,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    /// Every delivered message has the highest priority among those waiting, and FIFO holds
    /// within a level: priority order is never inverted within a subscription.
    #[test]
    fn priority_is_never_inverted(
        ops in proptest::collection::vec(
            prop_oneof![(0u8..5).prop_map(Op::Publish), Just(Op::Recv)],
            1..200,
        ),
    ) {
        common::paused_runtime().block_on(async move {
            let broker = Broker::default();
            let mut sub = broker.subscription("t").batch_size(1).build().unwrap();
            let mut waiting: Vec<VecDeque<u32>> = vec![VecDeque::new(); 5];
            let mut n = 0u32;
            for op in ops {
                match op {
                    Op::Publish(p) => {
                        broker.try_publish("t", msg(Priority::ALL[p as usize], n)).unwrap();
                        waiting[p as usize].push_back(n);
                        n += 1;
                    }
                    Op::Recv => {
                        let expected = waiting.iter_mut().rev().find_map(|l| l.pop_front());
                        match sub.try_recv() {
                            Ok(d) => prop_assert_eq!(Some(num(&d)), expected),
                            Err(e) => {
                                prop_assert_eq!(e, TryRecvError::Empty);
                                prop_assert_eq!(expected, None);
                            }
                        }
                    }
                }
            }
            Ok(())
        })?;
    }
}
