//! Property test: transaction atomicity under a concurrent reader. Random transactions over
//! random topics are committed or rolled back while a reader on `tx/#` runs; whenever the reader
//! first sees a record of a transaction, every record of that transaction, on every topic, is
//! already visible (each topic's tail is past the transaction's range there), and a rolled-back
//! transaction is never seen.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use ferry::{Broker, Message};
use parking_lot::Mutex;
use proptest::prelude::*;

const TOPICS: [&str; 3] = ["tx/a", "tx/b", "tx/c"];

/// One transaction: how many records for each topic (0: none), and whether it commits.
#[derive(Debug, Clone)]
struct Tx {
    counts: [usize; 3],
    commit: bool,
}

fn tx() -> impl Strategy<Value = Tx> {
    (
        [0usize..4, 0usize..4, 0usize..4],
        proptest::bool::weighted(0.75),
    )
        .prop_filter("a transaction publishes something", |(c, _)| {
            c.iter().sum::<usize>() > 0
        })
        .prop_map(|(counts, commit)| Tx { counts, commit })
}

type Ranges = Arc<Mutex<HashMap<u32, Option<BTreeMap<String, Range<u64>>>>>>;

fn run(txs: Vec<Tx>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let broker = Broker::default();
        for t in TOPICS {
            broker
                .create_topic(t, ferry::TopicConfig::default())
                .unwrap();
        }
        let mut reader = broker.subscribe("tx/#").unwrap();
        // For each transaction: its ranges once committed (None: rolled back).
        let outcome: Ranges = Arc::default();
        let expected: usize = txs
            .iter()
            .filter(|t| t.commit)
            .map(|t| t.counts.iter().sum::<usize>())
            .sum();
        let committer = {
            let (broker, outcome) = (broker.clone(), outcome.clone());
            tokio::spawn(async move {
                for (k, t) in txs.iter().enumerate() {
                    let k = k as u32;
                    let tx = broker.begin().unwrap();
                    for (topic, n) in TOPICS.iter().zip(t.counts) {
                        for i in 0..n {
                            tx.publish(topic, Message::json(&(k, i)).unwrap()).unwrap();
                        }
                    }
                    if t.commit {
                        let ranges = tx.commit().unwrap();
                        let ranges = ranges
                            .into_iter()
                            .map(|(name, r)| (name.to_string(), r))
                            .collect();
                        outcome.lock().insert(k, Some(ranges));
                    } else {
                        tx.rollback().unwrap();
                        outcome.lock().insert(k, None);
                    }
                    if k % 3 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        };
        // At the first sight of each transaction: the tails of every topic at that moment.
        let mut first_sight: BTreeMap<u32, BTreeMap<String, u64>> = BTreeMap::new();
        let mut seen = 0;
        while seen < expected {
            let d = tokio::time::timeout(Duration::from_secs(10), reader.recv())
                .await
                .unwrap()
                .unwrap();
            let (k, _): (u32, usize) = d.decode().unwrap();
            seen += 1;
            first_sight.entry(k).or_insert_with(|| {
                TOPICS
                    .iter()
                    .map(|t| {
                        (
                            t.to_string(),
                            broker.topic_stats(t).map_or(0, |s| s.next_offset),
                        )
                    })
                    .collect()
            });
        }
        committer.await.unwrap();
        let outcome = outcome.lock();
        for (k, tails) in &first_sight {
            let ranges = outcome[k]
                .as_ref()
                .expect("a rolled-back transaction was seen");
            for (topic, range) in ranges {
                assert!(
                    tails[topic] >= range.end,
                    "transaction {k} seen before all of it was visible on {topic}: tail {} < {}",
                    tails[topic],
                    range.end
                );
            }
        }
        assert!(
            reader.try_recv().is_err(),
            "nothing beyond the committed records"
        );
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn a_reader_sees_all_of_a_transaction_or_none(txs in proptest::collection::vec(tx(), 1..40)) {
        run(txs);
    }
}
