//! Durable topics: what survives a restart (retained records, group and named-subscription
//! positions, unacknowledged deliveries, dead letters, delayed messages), what does not
//! (uncommitted transactions), replay, bounded memory, retention, and a crash test that kills a
//! real process publishing and consuming with acknowledgements.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use ferry::disk::DiskConfig;
use ferry::{
    Broker, BrokerConfig, DeadLetterReason, HotWindow, Message, Retention, StartPosition,
    TopicConfig,
};

fn numbered(i: u32) -> Message {
    Message::builder()
        .payload(payload_of(i))
        .header("n", i.to_string())
        .build()
}

/// A payload that identifies its sequence number and is damaged by any flipped byte.
fn payload_of(i: u32) -> Vec<u8> {
    let mut p = format!("message {i:08} ").into_bytes();
    p.extend((0..(i % 200)).map(|k| (i.wrapping_mul(31).wrapping_add(k) % 251) as u8));
    p
}

fn number(d: &ferry::Envelope) -> u32 {
    d.header("n").unwrap().parse().unwrap()
}

async fn publish_range(broker: &Broker, topic: &str, range: std::ops::Range<u32>) {
    for i in range {
        broker.publish(topic, numbered(i)).await.unwrap();
    }
}

/// A member of the `billing` group on `orders`, acknowledging by hand.
fn billing(broker: &Broker) -> ferry::Subscription {
    broker
        .subscription("orders")
        .group("billing")
        .manual_ack()
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_and_group_positions_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let broker = Broker::open(dir.path()).unwrap();
        assert!(broker.is_durable());
        let mut sub = billing(&broker);
        publish_range(&broker, "orders", 0..10).await;
        let mut unacked = Vec::new();
        for i in 0..6 {
            let d = sub.recv().await.unwrap();
            assert_eq!(number(&d), i);
            // 0..4 acked; 4 and 5 received but never acknowledged.
            if i < 4 {
                d.ack().unwrap();
            } else {
                unacked.push(d);
            }
        }
        broker.flush().unwrap();
        // The process "dies" holding them: nothing settles them on disk.
        drop(unacked);
        // No shutdown: the process "dies" here.
    }
    let broker = Broker::open(dir.path()).unwrap();
    assert_eq!(broker.topics().len(), 1);
    let mut sub = billing(&broker);
    let mut got = Vec::new();
    for _ in 4..10 {
        let d = sub.recv().await.unwrap();
        assert_eq!(d.payload().as_ref(), payload_of(number(&d)).as_slice());
        got.push(number(&d));
        d.ack().unwrap();
    }
    assert_eq!(
        got,
        (4..10).collect::<Vec<_>>(),
        "unacknowledged deliveries come again"
    );
    assert!(sub.try_recv().is_err());
    broker.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_subscriptions_resume_and_anonymous_ones_start_fresh() {
    let dir = tempfile::tempdir().unwrap();
    {
        let broker = Broker::open(dir.path()).unwrap();
        let mut named = broker.subscription("events").name("audit").build().unwrap();
        publish_range(&broker, "events", 0..5).await;
        // Auto-ack: what the subscription fetched (all 5, in one batch) counts as delivered.
        for i in 0..3 {
            assert_eq!(number(&named.recv().await.unwrap()), i);
        }
        broker.shutdown(Duration::from_millis(1)).await;
    }
    let broker = Broker::open(dir.path()).unwrap();
    publish_range(&broker, "events", 5..7).await;
    let mut named = broker.subscription("events").name("audit").build().unwrap();
    let mut fresh = broker.subscribe("events").unwrap();
    broker.publish("events", numbered(7)).await.unwrap();
    let mut seen = Vec::new();
    for _ in 5..8 {
        seen.push(number(&named.recv().await.unwrap()));
    }
    assert_eq!(seen, vec![5, 6, 7]);
    assert_eq!(number(&fresh.recv().await.unwrap()), 7);
    broker.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_earliest_offset_and_time_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let middle;
    {
        let broker = Broker::open(dir.path()).unwrap();
        publish_range(&broker, "log", 0..20).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        middle = SystemTime::now();
        tokio::time::sleep(Duration::from_millis(20)).await;
        publish_range(&broker, "log", 20..30).await;
    }
    let broker = Broker::open(dir.path()).unwrap();
    let stats = broker.topic_stats("log").unwrap();
    assert_eq!((stats.first_offset, stats.next_offset), (0, 30));
    for (start, first) in [
        (StartPosition::Earliest, 0),
        (StartPosition::Offset(12), 12),
        (StartPosition::Timestamp(middle), 20),
    ] {
        let mut sub = broker.subscription("log").start(start).build().unwrap();
        let d = sub.recv().await.unwrap();
        assert_eq!((d.offset(), number(&d)), (first as u64, first), "{start:?}");
        let rest = sub
            .recv_batch(100, Duration::from_millis(200))
            .await
            .unwrap();
        assert_eq!(rest.len(), 30 - first as usize - 1);
    }
    broker.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_and_their_reasons_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let broker = Broker::open(dir.path()).unwrap();
        let mut sub = broker.subscription("jobs").manual_ack().build().unwrap();
        publish_range(&broker, "jobs", 0..3).await;
        sub.recv().await.unwrap().reject("bad input").unwrap();
        sub.recv().await.unwrap().ack().unwrap();
        sub.recv().await.unwrap().reject("worse input").unwrap();
        // Visible at once, before any restart.
        assert_eq!(broker.dead_letters("jobs").unwrap().list(10).len(), 2);
        broker.shutdown(Duration::from_secs(1)).await;
    }
    let broker = Broker::open(dir.path()).unwrap();
    let dlq = broker.dead_letters("jobs").unwrap();
    let letters = dlq.list(10);
    assert_eq!(letters.len(), 2);
    assert_eq!(
        letters[0].reason,
        DeadLetterReason::Rejected("bad input".into())
    );
    assert_eq!(letters[1].source_offset, 2);
    assert_eq!(
        letters[1].message.payload().as_ref(),
        payload_of(2).as_slice()
    );
    assert_eq!(dlq.purge(), 2);
    drop((dlq, broker));
    // The purge is durable too.
    let broker = Broker::open(dir.path()).unwrap();
    assert!(broker.dead_letters("jobs").unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_wait_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let due = SystemTime::now() + Duration::from_millis(600);
    {
        let broker = Broker::open(dir.path()).unwrap();
        let _group = broker.subscription("later").group("g").build().unwrap();
        let m = Message::builder()
            .payload("wake up")
            .deliver_at(due)
            .build();
        broker.publish("later", m).await.unwrap();
        broker.flush().unwrap();
    }
    let broker = Broker::open(dir.path()).unwrap();
    let mut sub = broker.subscription("later").group("g").build().unwrap();
    let d = sub.recv().await.unwrap();
    assert!(SystemTime::now() >= due, "not delivered before its time");
    assert_eq!(d.payload().as_ref(), b"wake up");
    broker.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncommitted_transactions_are_discarded() {
    let dir = tempfile::tempdir().unwrap();
    {
        let broker = Broker::open(dir.path()).unwrap();
        let committed = broker.begin().unwrap();
        committed.publish("a", "one").unwrap();
        committed.publish("b", "two").unwrap();
        committed.commit().unwrap();
        let open = broker.begin().unwrap();
        open.publish("a", "never").unwrap();
        open.publish("c", "never").unwrap();
        // Dropped uncommitted: the process ends here.
    }
    let broker = Broker::open(dir.path()).unwrap();
    for (topic, n) in [("a", 1), ("b", 1)] {
        let s = broker.topic_stats(topic).unwrap();
        assert_eq!(s.next_offset, n, "{topic}");
    }
    assert!(broker.topic_stats("c").is_none_or(|s| s.next_offset == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_is_bounded_by_the_hot_window_and_old_records_come_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let config = BrokerConfig {
        hot_window: HotWindow {
            records: 100,
            bytes: 64 << 10,
        },
        ..BrokerConfig::default()
    };
    let disk = DiskConfig {
        durability: ferry::disk::Durability::Never,
        segment_bytes: 256 << 10,
        ..DiskConfig::default()
    };
    let broker = Broker::open_with(dir.path(), config, disk).unwrap();
    // A subscriber that never reads holds everything: memory must still stay bounded.
    let _idle = broker.subscription("big").group("idle").build().unwrap();
    let body = vec![7u8; 1024];
    for i in 0..5000u32 {
        let m = Message::builder()
            .payload(body.clone())
            .header("n", i.to_string())
            .build();
        broker.publish("big", m).await.unwrap();
    }
    let stats = broker.stats();
    assert!(
        stats.bytes <= 8 << 20,
        "disk bytes reported: {}",
        stats.bytes
    );
    broker.maintain();
    let mut reader = broker
        .subscription("big")
        .start(StartPosition::Earliest)
        .build()
        .unwrap();
    let mut next = 0;
    while next < 5000 {
        let batch = reader
            .recv_batch(1000, Duration::from_secs(2))
            .await
            .unwrap();
        for d in batch {
            assert_eq!(number(&d), next);
            assert_eq!(d.payload().len(), 1024);
            next += 1;
        }
    }
    broker.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_whole_segments() {
    let dir = tempfile::tempdir().unwrap();
    let disk = DiskConfig {
        durability: ferry::disk::Durability::Never,
        segment_bytes: 16 << 10,
        ..DiskConfig::default()
    };
    let broker = Broker::open_with(dir.path(), BrokerConfig::default(), disk).unwrap();
    broker
        .create_topic(
            "metrics",
            TopicConfig {
                retention: Retention {
                    max_messages: Some(500),
                    ..Retention::default()
                },
                ..TopicConfig::default()
            },
        )
        .unwrap();
    publish_range(&broker, "metrics", 0..3000).await;
    broker.maintain();
    let s = broker.topic_stats("metrics").unwrap();
    assert_eq!(s.next_offset, 3000);
    assert!(
        s.first_offset >= 2000 && s.first_offset <= 2500,
        "whole segments go, keeping at least 500: first offset {}",
        s.first_offset
    );
    let mut sub = broker
        .subscription("metrics")
        .start(StartPosition::Earliest)
        .build()
        .unwrap();
    assert_eq!(sub.recv().await.unwrap().offset(), s.first_offset);
}

/// A byte flipped on disk in an older segment: the broker still opens, reports the damage,
/// skips the damaged records (counted as dropped) instead of retrying them forever, and serves
/// everything after them and every other topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_records_are_skipped_and_the_rest_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let disk = DiskConfig {
        durability: ferry::disk::Durability::Never,
        segment_bytes: 16 << 10,
        ..DiskConfig::default()
    };
    {
        let broker = Broker::open_with(dir.path(), BrokerConfig::default(), disk.clone()).unwrap();
        publish_range(&broker, "hit", 0..300).await;
        publish_range(&broker, "other", 0..10).await;
        broker.shutdown(Duration::from_secs(1)).await;
    }
    let (path, mut bytes, at) = std::fs::read_dir(dir.path().join("store"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .find_map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            let at = bytes.windows(16).position(|w| w == b"message 00000010")?;
            Some((p, bytes, at))
        })
        .unwrap();
    bytes[at + 17] ^= 0x55;
    std::fs::write(&path, &bytes).unwrap();

    let broker = Broker::open_with(dir.path(), BrokerConfig::default(), disk).unwrap();
    let mut sub = broker
        .subscription("hit")
        .start(StartPosition::Earliest)
        .build()
        .unwrap();
    let mut seen = Vec::new();
    while seen.last() != Some(&299) {
        let d = tokio::time::timeout(Duration::from_secs(10), sub.recv())
            .await
            .expect("the reader is stuck at the damage")
            .unwrap();
        assert_eq!(d.payload().as_ref(), payload_of(number(&d)).as_slice());
        seen.push(number(&d));
    }
    assert!(seen.starts_with(&(0..10).collect::<Vec<_>>()), "{seen:?}");
    assert!(!seen.contains(&10), "a damaged record was delivered");
    let lost = 300 - seen.len() as u64;
    assert!(lost > 0);
    assert_eq!(sub.stats().counters.dropped, lost);
    // Another topic, in a later segment, is served whole.
    let mut other = broker
        .subscription("other")
        .start(StartPosition::Earliest)
        .build()
        .unwrap();
    for i in 0..10 {
        assert_eq!(number(&other.recv().await.unwrap()), i);
    }
    broker.shutdown(Duration::from_secs(1)).await;
}

// ---- crash test ------------------------------------------------------------------------------

const CHILD_ENV: &str = "FERRY_DURABLE_CRASH_CHILD";

/// The child: publishes numbered messages from where the log ends (printing `acked N` once a
/// publish returned) while a group consumer acknowledges them (printing `acking N` before each
/// ack), until it is killed.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // libtest has printed "test crash_child ... " without a line end: start a fresh line.
    println!();
    rt.block_on(async move {
        let config = BrokerConfig {
            maintenance_interval: Duration::from_millis(5),
            ..BrokerConfig::default()
        };
        let broker = Broker::open_with(&dir, config, DiskConfig::default()).unwrap();
        let start = broker.topic_stats("crash").map_or(0, |s| s.next_offset) as u32;
        let mut sub = broker
            .subscription("crash")
            .group("workers")
            .manual_ack()
            .build()
            .unwrap();
        tokio::spawn(async move {
            loop {
                let d = sub.recv().await.unwrap();
                println!("acking {}", d.offset());
                d.ack().unwrap();
            }
        });
        for i in start.. {
            let offset = broker.publish("crash", numbered(i)).await.unwrap();
            assert_eq!(offset, u64::from(i));
            println!("acked {i}");
        }
    });
}

fn saved_position(dir: &Path) -> u64 {
    let text = std::fs::read(dir.join("positions.json")).unwrap_or_default();
    let positions: BTreeMap<String, BTreeMap<String, u64>> =
        serde_json::from_slice(&text).unwrap_or_default();
    positions
        .get("group:workers")
        .and_then(|p| p.get("crash"))
        .copied()
        .unwrap_or(0)
}

#[test]
fn acknowledged_messages_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acked_total: i64 = -1;
    // The log's end at the last reopen: the next child continues there (records written but
    // not acknowledged before a kill may survive; they are part of the log, in order).
    let mut log_end: i64 = 0;
    let mut highest_acking: i64 = -1;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for cycle in 0..50 {
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let run_for = Duration::from_millis(30 + rng % 120);
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut acking = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("acked ") {
                    acked.push(n.parse::<i64>().unwrap());
                } else if let Some(n) = line.strip_prefix("acking ") {
                    acking.push(n.parse::<i64>().unwrap());
                }
            }
            (acked, acking)
        });
        std::thread::sleep(run_for);
        child.kill().unwrap();
        child.wait().unwrap();
        let (acked, acking) = reader.join().unwrap();
        if let Some(&last) = acked.last() {
            assert_eq!(
                acked[0], log_end,
                "cycle {cycle}: publishing resumes at the end"
            );
            acked_total = last;
        }
        if let Some(&last) = acking.iter().max() {
            highest_acking = highest_acking.max(last);
        }

        // Reopen (in this process, with the child dead) and check the log.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let broker = Broker::open(dir.path()).unwrap();
            let stats = broker.topic_stats("crash");
            let end = stats.map_or(0, |s| s.next_offset) as i64;
            assert!(
                end > acked_total,
                "cycle {cycle}: every acknowledged message is stored ({end} <= {acked_total})"
            );
            if end > 0 {
                let mut sub = broker
                    .subscription("crash")
                    .start(StartPosition::Earliest)
                    .build()
                    .unwrap();
                let mut expected = 0u32;
                while i64::from(expected) < end {
                    let batch = sub
                        .recv_batch(10_000, Duration::from_secs(5))
                        .await
                        .unwrap();
                    assert!(!batch.is_empty(), "cycle {cycle}: records missing at {expected}");
                    for d in batch {
                        assert_eq!(d.offset(), u64::from(expected), "cycle {cycle}: in order, once");
                        assert_eq!(number(&d), expected);
                        assert_eq!(d.payload().as_ref(), payload_of(expected).as_slice());
                        expected += 1;
                    }
                }
            }
            log_end = end;
            let position = saved_position(dir.path()) as i64;
            assert!(
                position <= highest_acking + 1,
                "cycle {cycle}: the group position {position} is ahead of its acks ({highest_acking})"
            );
            drop(broker);
        });
    }
    assert!(
        acked_total > 50,
        "the children made progress: {acked_total}"
    );
}

/// Shutdown closes the storage: the data directory opens again at once, even while a handle
/// on the old broker remains (a clone kept by a task, a maintenance pass running).
#[tokio::test]
async fn a_shut_down_broker_frees_its_data_directory_at_once() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..3u64 {
        let broker =
            Broker::open_with(dir.path(), BrokerConfig::default(), DiskConfig::default()).unwrap();
        let offset = broker
            .publish("kept", Message::from(format!("m{round}")))
            .await
            .unwrap();
        assert_eq!(offset, round);
        let held = broker.clone();
        broker.shutdown(Duration::from_secs(5)).await;
        assert!(held.publish("kept", Message::from("late")).await.is_err());
        // `held` is still alive here.
        let again =
            Broker::open_with(dir.path(), BrokerConfig::default(), DiskConfig::default()).unwrap();
        let stats = again.topic_stats("kept").unwrap();
        assert_eq!(stats.next_offset, round + 1);
        again.shutdown(Duration::from_secs(5)).await;
        drop((held, again));
    }
}
