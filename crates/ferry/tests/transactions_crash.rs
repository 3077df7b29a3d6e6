//! Transactions across durable topics survive a SIGKILL whole or not at all: a child process
//! commits transactions of 3 records on `left` and 2 on `right` in a loop and is killed at a
//! random moment; after each kill the data directory is opened again and every transaction
//! found in either topic must be complete in both, and every one the child was told was
//! committed must be there.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry::disk::DiskConfig;
use ferry::{Broker, BrokerConfig, StartPosition};

const CHILD_ENV: &str = "FERRY_TX_CRASH_CHILD";

/// The child: commits transaction after transaction (printing `committed K` once `commit`
/// returned) until it is killed.
#[test]
fn tx_crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!();
    rt.block_on(async move {
        let broker =
            Broker::open_with(&dir, BrokerConfig::default(), DiskConfig::default()).unwrap();
        let start = broker.topic_stats("right").map_or(0, |s| s.next_offset / 2);
        for k in start.. {
            let tx = broker.begin().unwrap();
            for i in 0..3 {
                tx.publish("left", format!("{k}:{i}")).unwrap();
            }
            for i in 0..2 {
                tx.publish("right", format!("{k}:{i}")).unwrap();
            }
            tx.commit().unwrap();
            println!("committed {k}");
        }
    });
}

/// Every record of `topic`, as (transaction, index) pairs.
async fn records(broker: &Broker, topic: &str) -> Vec<(u64, u64)> {
    let end = broker.topic_stats(topic).map_or(0, |s| s.next_offset);
    let mut sub = broker
        .subscription(topic)
        .start(StartPosition::Earliest)
        .build()
        .unwrap();
    let mut out = Vec::new();
    while (out.len() as u64) < end {
        let d = tokio::time::timeout(Duration::from_secs(10), sub.recv())
            .await
            .expect("records missing below the topic's end")
            .unwrap();
        let text = std::str::from_utf8(d.payload()).unwrap();
        let (k, i) = text.split_once(':').unwrap();
        out.push((k.parse().unwrap(), i.parse().unwrap()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_survive_sigkill_whole_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut committed = BTreeSet::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for cycle in 0..20 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "tx_crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| {
                    l.strip_prefix("committed ")
                        .map(|k| k.parse::<u64>().unwrap())
                })
                .collect::<Vec<_>>()
        });
        std::thread::sleep(Duration::from_millis(40 + rng % 160));
        child.kill().unwrap();
        child.wait().unwrap();
        committed.extend(reader.join().unwrap());

        let broker =
            Broker::open_with(dir.path(), BrokerConfig::default(), DiskConfig::default()).unwrap();
        let mut seen: BTreeMap<u64, (BTreeSet<u64>, BTreeSet<u64>)> = BTreeMap::new();
        for (k, i) in records(&broker, "left").await {
            assert!(
                seen.entry(k).or_default().0.insert(i),
                "cycle {cycle}: duplicate {k}:{i}"
            );
        }
        for (k, i) in records(&broker, "right").await {
            assert!(
                seen.entry(k).or_default().1.insert(i),
                "cycle {cycle}: duplicate {k}:{i}"
            );
        }
        for (k, (left, right)) in &seen {
            assert_eq!(
                (left.len(), right.len()),
                (3, 2),
                "cycle {cycle}: transaction {k} is partly there"
            );
        }
        for k in &committed {
            assert!(
                seen.contains_key(k),
                "cycle {cycle}: committed transaction {k} lost"
            );
        }
        broker.shutdown(Duration::from_secs(1)).await;
    }
    assert!(!committed.is_empty(), "the child never committed");
}
