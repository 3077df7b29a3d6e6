//! Property: under any sequence of publish / receive / ack / nack / reject / unsubscribe /
//! subscribe / time passing, every subscription's accounting balances (nothing silently
//! disappears), and after shutdown every published record is acknowledged, dead-lettered or
//! counted as dropped.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use ferry::{Broker, BrokerConfig, Delivery, Subscription, TopicConfig};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Publish(u8),
    Subscribe { manual: bool, group: Option<u8> },
    Recv(usize),
    Ack(usize),
    Nack(usize),
    NackLater(usize),
    Reject(usize),
    DropDelivery(usize),
    Unsubscribe(usize),
    Advance(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u8..8).prop_map(Op::Publish),
        1 => (any::<bool>(), proptest::option::of(0u8..2))
            .prop_map(|(manual, group)| Op::Subscribe { manual, group }),
        6 => (0usize..8).prop_map(Op::Recv),
        3 => (0usize..8).prop_map(Op::Ack),
        1 => (0usize..8).prop_map(Op::Nack),
        1 => (0usize..8).prop_map(Op::NackLater),
        1 => (0usize..8).prop_map(Op::Reject),
        1 => (0usize..8).prop_map(Op::DropDelivery),
        1 => (0usize..8).prop_map(Op::Unsubscribe),
        1 => (1u8..40).prop_map(Op::Advance),
    ]
}

fn check(broker: &Broker) -> Result<(), TestCaseError> {
    for s in broker.subscription_stats() {
        prop_assert_eq!(s.unaccounted(), 0, "{:?}", s);
    }
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    common::paused_runtime().block_on(async move {
        let broker = Broker::new(BrokerConfig {
            ack_timeout: Duration::from_secs(10),
            topic_defaults: TopicConfig {
                capacity: 20,
                ..TopicConfig::default()
            },
            ..BrokerConfig::default()
        });
        let mut subs: Vec<Subscription> = Vec::new();
        let mut held: Vec<Delivery> = Vec::new();
        let mut published = 0u64;
        for op in ops {
            match op {
                Op::Publish(n) => {
                    for _ in 0..n {
                        if broker.try_publish("t", "m").is_ok() {
                            published += 1;
                        }
                    }
                }
                Op::Subscribe { manual, group } => {
                    let mut b = broker.subscription("t").batch_size(3);
                    if manual {
                        b = b.manual_ack();
                    }
                    if let Some(g) = group {
                        // Group options are fixed by their creator: name groups by mode.
                        b = b.group(format!("g{g}-{manual}"));
                    }
                    subs.push(b.build().unwrap());
                }
                Op::Recv(i) if !subs.is_empty() => {
                    let n = subs.len();
                    if let Ok(d) = subs[i % n].try_recv() {
                        held.push(d);
                    }
                }
                Op::Ack(i)
                | Op::Nack(i)
                | Op::NackLater(i)
                | Op::Reject(i)
                | Op::DropDelivery(i)
                    if !held.is_empty() =>
                {
                    let n = held.len();
                    let d = held.swap_remove(i % n);
                    let _ = match op {
                        Op::Ack(_) => d.ack(),
                        Op::Nack(_) => d.nack(),
                        Op::NackLater(_) => d.nack_after(Duration::from_secs(5)),
                        Op::Reject(_) => d.reject("prop"),
                        _ => {
                            drop(d);
                            Ok(())
                        }
                    };
                }
                Op::Unsubscribe(i) if !subs.is_empty() => {
                    let n = subs.len();
                    drop(subs.swap_remove(i % n));
                }
                Op::Advance(s) => tokio::time::advance(Duration::from_secs(u64::from(s))).await,
                _ => {}
            }
            check(&broker)?;
        }
        // Settle what is held, then shut down: everything must be accounted for.
        for d in held.drain(..) {
            let _ = d.ack();
        }
        let report = broker.shutdown(Duration::from_millis(10)).await;
        for s in broker.subscription_stats() {
            prop_assert_eq!(s.unaccounted(), 0, "{:?}", s);
            prop_assert_eq!(s.lag, 0);
            prop_assert_eq!(s.in_flight, 0);
            prop_assert_eq!(
                s.assigned,
                s.counters.acked + s.counters.dead_lettered + s.counters.dropped
            );
        }
        prop_assert_eq!(report.counters.published, published);
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    #[test]
    fn accounting_balances(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops)?;
    }
}
