//! Stress: 16 producers and 16 consumers (8 fanout subscribers and a group of 8 with manual
//! acks and random nacks). No loss, no duplicate beyond redelivery, per-producer order kept.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use ferry::{Broker, Message};

const PRODUCERS: u32 = 16;
const PER_PRODUCER: u32 = 2_000;
const TOTAL: usize = (PRODUCERS * PER_PRODUCER) as usize;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_producers_sixteen_consumers() {
    let broker = Broker::default();
    let mut fanout = Vec::new();
    for _ in 0..8 {
        let mut sub = broker.subscribe("stress").unwrap();
        fanout.push(tokio::spawn(async move {
            let mut last: HashMap<u32, u32> = HashMap::new();
            let mut n = 0;
            while n < TOTAL {
                let d = sub.recv().await.unwrap();
                let (p, i): (u32, u32) = d.decode().unwrap();
                if let Some(prev) = last.insert(p, i) {
                    assert_eq!(i, prev + 1, "producer {p}: order broken or duplicate");
                } else {
                    assert_eq!(i, 0, "producer {p}: first message missing");
                }
                n += 1;
            }
            n
        }));
    }
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<((u32, u32), u32)>();
    let mut group = Vec::new();
    for member in 0..8u32 {
        let mut sub = broker
            .subscription("stress")
            .group("workers")
            .manual_ack()
            .build()
            .unwrap();
        let tx = done_tx.clone();
        group.push(tokio::spawn(async move {
            let mut k = member;
            while let Ok(d) = sub.recv().await {
                k = k.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                let key: (u32, u32) = d.decode().unwrap();
                // Nack about one in 50 first attempts: they must come back.
                if d.attempt() == 1 && k % 50 == 0 {
                    d.nack().unwrap();
                    continue;
                }
                let attempt = d.attempt();
                d.ack().unwrap();
                if tx.send((key, attempt)).is_err() {
                    break;
                }
            }
        }));
    }
    drop(done_tx);
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let publisher = broker.publisher("stress").unwrap();
            tokio::spawn(async move {
                for i in 0..PER_PRODUCER {
                    publisher
                        .publish(Message::json(&(p, i)).unwrap())
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for p in producers {
        p.await.unwrap();
    }
    for f in fanout {
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(60), f)
                .await
                .unwrap()
                .unwrap(),
            TOTAL
        );
    }
    let mut acked: HashMap<(u32, u32), u32> = HashMap::new();
    while acked.len() < TOTAL {
        let (key, attempt) = tokio::time::timeout(Duration::from_secs(60), done_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(
            acked.insert(key, attempt).is_none(),
            "{key:?} acknowledged twice"
        );
    }
    let report = broker.shutdown(Duration::from_secs(10)).await;
    assert!(report.drained, "{report:?}");
    for g in group {
        g.await.unwrap();
    }
    let stats = &broker.subscription_stats();
    let g = stats.iter().find(|s| s.group).unwrap();
    let retried = acked.values().filter(|a| **a > 1).count() as u64;
    assert_eq!(
        g.counters.nacked, retried,
        "every nacked message was redelivered and acked"
    );
    assert_eq!(g.counters.redelivered, retried);
    assert_eq!(g.counters.acked, TOTAL as u64);
    assert_eq!(report.counters.dropped, 0);
    assert_eq!(report.counters.published, TOTAL as u64);
    assert_eq!(report.counters.acked, 9 * TOTAL as u64);
}
