//! `topics`: many topics on one data directory, what the shared commit log (`ferry_log::Store`,
//! every topic a stream of it) is for. On a fresh data directory, `Broker::open_with` (default
//! `BrokerConfig`, `DiskConfig` with durability `never`) on a two-worker Tokio runtime, then
//! `--topics` topics (100,000; 10,000 with `--quick`) created by publishing one 100 B message
//! to each with `Broker::try_publish` (which creates the topic: each publish is a topic's
//! first), one after the other, each timed. Then:
//!
//! - `create`: first publishes per second (topics/s) and their latency; `rss_per_topic`: the
//!   growth of the process's `VmRSS` (`/proc/self/status`) from just after the broker opened
//!   to after the last publish, per topic; `fds`: the open files of the process
//!   (`/proc/self/fd`) after the last publish, `fds_before` before the broker opened (the same
//!   runtime); the store's size and segment files. Every topic must exist with one record.
//! - the broker is shut down and dropped, which writes the store's index checkpoint (every
//!   stream's state at the end of the log); `restart cold` (page cache dropped before, if
//!   possible) and `restart warm`: `Broker::open_with` on the same directory, then a
//!   subscription from `StartPosition::Earliest` to the last topic created, until its one
//!   message arrives, timed together (`seconds`; `open_s` is the open alone, `first_read_ms`
//!   the subscription and the read). records/s is topics recovered per second; `fds` is
//!   counted with the broker open again, `rss` is the process's `VmRSS` then;
//!   `checkpoint_bytes` is the checkpoint's size. The store loads the checkpoint and scans
//!   only the log after it (nothing here).
//! - `restart cold, no checkpoint` and `restart warm, no checkpoint`: the same after deleting
//!   the checkpoint file (`store/streams.checkpoint`), so that opening scans the whole log to
//!   rebuild the streams' indexes, as after a crash before the first checkpoint.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use ferry::disk::DiskConfig;
use ferry::{Broker, BrokerConfig, Message, StartPosition};
use ferry_log::Durability;

use super::{row, Bench};
use crate::measure::{block_on, process_cpu_time, resident_bytes, template, OpTally, Outcome};
use crate::report::{Counts, Extra, Row};

/// Payload of each topic's one message.
const PAYLOAD: usize = 100;
/// How long the broker's shutdown may take.
const SHUTDOWN: Duration = Duration::from_secs(30);
/// How long reading the message back after a restart may take.
const READ_BACK: Duration = Duration::from_secs(30);
/// The store's index checkpoint, in the data directory's `store/`.
const CHECKPOINT: &str = "streams.checkpoint";

/// The name of topic `i`.
fn topic(i: usize) -> String {
    format!("bench/topics/{i}")
}

/// The data directory's settings: durability `never`, the rest as `DiskConfig::default()`.
fn disk() -> DiskConfig {
    DiskConfig {
        durability: Durability::Never,
        ..DiskConfig::default()
    }
}

/// The open files of the process: the entries of `/proc/self/fd`, but the one listing them
/// (Linux; `None` elsewhere).
fn open_files() -> Option<u64> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(entries.saturating_sub(1))
}

/// What creating the topics measured.
struct Created {
    outcome: Outcome,
    /// Topics that exist with exactly one record at the end.
    complete: u64,
    rss_before: Option<u64>,
    rss_after: Option<u64>,
    fds_before: Option<u64>,
    fds_after: Option<u64>,
}

/// What one restart measured.
struct Restart {
    /// `Broker::open_with`.
    open: Duration,
    /// The open, then subscribing and receiving the message.
    total: Duration,
    /// Topics the reopened broker lists.
    topics: u64,
    fds: Option<u64>,
    rss: Option<u64>,
    cpu: Option<Duration>,
}

/// Creates the topics, restarts, and adds the rows.
pub fn run(bench: &mut Bench) -> Result<()> {
    let n = bench.settings.topics;
    let dir = bench.fresh_dir("topics")?;
    eprintln!("running topics create ({n} topics, one {PAYLOAD} B message each)");
    let created = create(&dir, n)?;
    let store = dir.join("store");
    let (store_bytes, segments) = store_files(&store)?;
    let counts = Counts {
        producers: 1,
        consumers: 0,
        published: n as u64,
        expected: n as u64,
    };
    let mut outcome = created.outcome;
    outcome.delivered = created.complete;
    let bytes = created.complete * PAYLOAD as u64;
    let mut r = row(
        "topics",
        "ferry never create".to_string(),
        PAYLOAD,
        counts,
        &outcome,
        bytes,
        Some("one first publish per topic, one publisher"),
    );
    r.add("topics", Extra::Count(n as u64));
    if let (Some(before), Some(after)) = (created.rss_before, created.rss_after) {
        let per_topic = after.saturating_sub(before) as f64 / n as f64;
        r.add("rss_per_topic", Extra::Value(per_topic));
        r.add("rss_before", Extra::Count(before));
        r.add("rss_after", Extra::Count(after));
    }
    add_count(&mut r, "fds", created.fds_after);
    add_count(&mut r, "fds_before", created.fds_before);
    r.add("store_bytes", Extra::Count(store_bytes));
    r.add("segments", Extra::Count(segments));
    bench.add(r)?;

    let last = topic(n - 1);
    let checkpoint = store.join(CHECKPOINT);
    let checkpoint_bytes = std::fs::metadata(&checkpoint)
        .with_context(|| {
            format!(
                "no index checkpoint after the shutdown: {}",
                checkpoint.display()
            )
        })?
        .len();
    for with_checkpoint in [true, false] {
        let cold = bench.drop_page_cache();
        let states: &[bool] = if cold { &[true, false] } else { &[false] };
        for &cold in states {
            let state = match (cold, with_checkpoint) {
                (true, true) => "cold",
                (false, true) => "warm",
                (true, false) => "cold, no checkpoint",
                (false, false) => "warm, no checkpoint",
            };
            eprintln!("running topics restart ({state})");
            if !with_checkpoint {
                // The previous restart's shutdown wrote one again.
                std::fs::remove_file(&checkpoint)
                    .with_context(|| format!("removing {}", checkpoint.display()))?;
            }
            let restart = restart(&dir, &last)?;
            let note = match (cold, with_checkpoint) {
                (true, true) => "page cache dropped before, index checkpoint",
                (false, true) => "page cache warm, index checkpoint",
                (true, false) => "page cache dropped before, whole log scanned",
                (false, false) => "page cache warm, whole log scanned",
            };
            let mut r = restart_row(n, store_bytes, &restart, state, note)?;
            if with_checkpoint {
                r.add("checkpoint_bytes", Extra::Count(checkpoint_bytes));
            }
            bench.add(r)?;
        }
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))
}

/// The row of one restart (`state`: cold or warm, with or without checkpoint).
fn restart_row(
    n: usize,
    store_bytes: u64,
    restart: &Restart,
    state: &str,
    note: &'static str,
) -> Result<Row> {
    let mut outcome = Outcome::without_latency(restart.topics, None, restart.total)?;
    outcome.cpu = restart.cpu;
    let counts = Counts {
        producers: 0,
        consumers: 1,
        published: n as u64,
        expected: n as u64,
    };
    let mut r = row(
        "topics",
        format!("ferry never restart {state}"),
        PAYLOAD,
        counts,
        &outcome,
        store_bytes,
        Some(note),
    );
    r.add("seconds", Extra::Value(restart.total.as_secs_f64()));
    r.add("open_s", Extra::Value(restart.open.as_secs_f64()));
    let read = restart.total.saturating_sub(restart.open);
    r.add("first_read_ms", Extra::Value(read.as_secs_f64() * 1e3));
    add_count(&mut r, "fds", restart.fds);
    add_count(&mut r, "rss", restart.rss);
    Ok(r)
}

fn add_count(row: &mut Row, name: &'static str, value: Option<u64>) {
    if let Some(v) = value {
        row.add(name, Extra::Count(v));
    }
}

/// Opens a broker on the fresh `dir` and creates `n` topics with one message each.
fn create(dir: &Path, n: usize) -> Result<Created> {
    let names: Vec<String> = (0..n).map(topic).collect();
    let payload = template(PAYLOAD);
    block_on(async move {
        let fds_before = open_files();
        let broker = Broker::open_with(dir, BrokerConfig::default(), disk())
            .with_context(|| format!("opening a broker on {}", dir.display()))?;
        let rss_before = resident_bytes();
        let cpu_before = process_cpu_time();
        let mut tally = OpTally::new()?;
        let mut at = tally.first;
        for name in &names {
            broker
                .try_publish(name, Message::new(Bytes::from_static(payload)))
                .with_context(|| format!("publishing to {name}"))?;
            at = tally.record(at);
        }
        let cpu = process_cpu_time()
            .zip(cpu_before)
            .map(|(after, before)| after.saturating_sub(before));
        let rss_after = resident_bytes();
        let fds_after = open_files();
        let complete = names
            .iter()
            .filter(|name| broker.topic_stats(name).is_some_and(|t| t.next_offset == 1))
            .count() as u64;
        broker.shutdown(SHUTDOWN).await;
        drop(broker);
        let mut outcome = Outcome::from_ops(vec![tally])?;
        outcome.cpu = cpu;
        Ok(Created {
            outcome,
            complete,
            rss_before,
            rss_after,
            fds_before,
            fds_after,
        })
    })
}

/// Opens the broker on `dir` again and reads the one message of `topic` back.
fn restart(dir: &Path, topic: &str) -> Result<Restart> {
    block_on(async move {
        let cpu_before = process_cpu_time();
        let start = Instant::now();
        let broker = Broker::open_with(dir, BrokerConfig::default(), disk())
            .with_context(|| format!("opening the broker on {} again", dir.display()))?;
        let open = start.elapsed();
        let mut sub = broker
            .subscription(topic)
            .start(StartPosition::Earliest)
            .build()
            .with_context(|| format!("subscribing to {topic}"))?;
        let delivery = tokio::time::timeout(READ_BACK, sub.recv())
            .await
            .with_context(|| format!("no message from {topic} within {READ_BACK:?}"))?
            .with_context(|| format!("reading {topic}"))?;
        let total = start.elapsed();
        let cpu = process_cpu_time()
            .zip(cpu_before)
            .map(|(after, before)| after.saturating_sub(before));
        let (offset, len) = (delivery.offset(), delivery.message().payload().len());
        if (offset, len) != (0, PAYLOAD) {
            bail!(
                "{topic}: read back offset {offset} of {len} B, expected offset 0 of {PAYLOAD} B"
            );
        }
        drop(delivery);
        let fds = open_files();
        let rss = resident_bytes();
        let topics = broker.topics().len() as u64;
        drop(sub);
        broker.shutdown(SHUTDOWN).await;
        Ok(Restart {
            open,
            total,
            topics,
            fds,
            rss,
            cpu,
        })
    })
}

/// Bytes and count of the segment files (`.log`) of the store in `dir`.
fn store_files(dir: &Path) -> Result<(u64, u64)> {
    let mut bytes = 0;
    let mut segments = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path: PathBuf = entry?.path();
        if path.extension().and_then(|e| e.to_str()) == Some("log") {
            bytes += path
                .metadata()
                .with_context(|| format!("reading {}", path.display()))?
                .len();
            segments += 1;
        }
    }
    Ok((bytes, segments))
}
