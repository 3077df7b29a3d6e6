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
//! - `restart (fresh process)`: what an idle topic costs, measured where no earlier broker left
//!   memory to the allocator: the process runs its own executable again (the hidden
//!   subcommand `log-probe restart`, see [`restart_probe`]), which opens the broker on the same
//!   directory (from the checkpoint the last restart wrote, page cache warm), with no topic
//!   loaded, and prints what it measured as one JSON line. `rss_per_idle_topic`: the growth of
//!   the child's `VmRSS` over `Broker::open_with`, per topic (every topic stored, none loaded:
//!   the store's entry for its stream, what an idle topic costs, plus the open's fixed cost
//!   spread over the topics); `open_s` the open. Then a subscription to `bench/topics/#` from
//!   `StartPosition::Earliest` loads every topic (`subscribe_s`) and reads every topic's
//!   message (`load_s`, the subscription included; `seconds` is `open_s` + `load_s` and
//!   records/s topics recovered and read per second); `rss_per_loaded_topic`: the child's
//!   `VmRSS` growth from before the open to then, per topic (store entry, loaded topic and the
//!   subscription's cursor on it). Then the subscription is dropped and one maintenance pass
//!   unloads every topic (`loaded_after_unload`, 0; `rss_after_unload` is reported only: the
//!   allocator keeps most of what was freed). `rss_before`, `rss_after_open` and `rss_loaded`
//!   are the child's `VmRSS` before the open, after it, and with every topic loaded.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use bytes::Bytes;
use clap::Args as ClapArgs;
use ferry::disk::DiskConfig;
use ferry::{Broker, BrokerConfig, Message, StartPosition};
use ferry_log::Durability;
use serde::{Deserialize, Serialize};

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

/// The filter that matches every topic.
const EVERY_TOPIC: &str = "bench/topics/#";

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
    // The last restart's shutdown wrote the checkpoint again.
    eprintln!("running topics restart (fresh process)");
    let fresh = fresh_restart(&dir, n)?;
    bench.add(fresh_row(n, store_bytes, &fresh)?)?;
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))
}

/// What a restart row reads back: every topic's one message, by one reader.
fn restart_counts(n: usize) -> Counts {
    Counts {
        producers: 0,
        consumers: 1,
        published: n as u64,
        expected: n as u64,
    }
}

/// The row of the restart in a fresh process.
fn fresh_row(n: usize, store_bytes: u64, fresh: &FreshRestart) -> Result<Row> {
    let load = Duration::try_from_secs_f64(fresh.load_s).context("load_s")?;
    let open = Duration::try_from_secs_f64(fresh.open_s).context("open_s")?;
    let mut outcome = Outcome::without_latency(fresh.delivered, None, open + load)?;
    outcome.cpu = fresh
        .cpu_s
        .and_then(|s| Duration::try_from_secs_f64(s).ok());
    let counts = restart_counts(n);
    let mut r = row(
        "topics",
        "ferry never restart (fresh process)".to_string(),
        PAYLOAD,
        counts,
        &outcome,
        store_bytes,
        Some("a process of its own, index checkpoint, page cache warm; then every topic read"),
    );
    let per_topic = |after: Option<u64>| {
        after
            .zip(fresh.rss_before)
            .map(|(after, before)| after.saturating_sub(before) as f64 / n as f64)
    };
    if let Some(idle) = per_topic(fresh.rss_after_open) {
        r.add("rss_per_idle_topic", Extra::Value(idle));
    }
    if let Some(loaded) = per_topic(fresh.rss_loaded) {
        r.add("rss_per_loaded_topic", Extra::Value(loaded));
    }
    r.add("seconds", Extra::Value((open + load).as_secs_f64()));
    r.add("open_s", Extra::Value(fresh.open_s));
    r.add("load_s", Extra::Value(fresh.load_s));
    r.add("subscribe_s", Extra::Value(fresh.subscribe_s));
    add_count(&mut r, "fds", fresh.fds);
    add_count(&mut r, "rss_before", fresh.rss_before);
    add_count(&mut r, "rss_after_open", fresh.rss_after_open);
    add_count(&mut r, "rss_loaded", fresh.rss_loaded);
    add_count(&mut r, "rss_after_unload", fresh.rss_after_unload);
    r.add(
        "loaded_after_unload",
        Extra::Count(fresh.loaded_after_unload),
    );
    Ok(r)
}

/// What the restart in a fresh process measured: printed by the child as one JSON line.
#[derive(Debug, Serialize, Deserialize)]
pub struct FreshRestart {
    /// `VmRSS` before `Broker::open_with` (the Tokio runtime built).
    rss_before: Option<u64>,
    /// `VmRSS` just after it.
    rss_after_open: Option<u64>,
    /// `Broker::open_with`, seconds.
    open_s: f64,
    /// Topics the broker lists (`BrokerStats::topics`) after the open.
    topics: u64,
    /// Topics loaded (`BrokerStats::loaded_topics`) after the open: none.
    loaded: u64,
    /// Open files after the open.
    fds: Option<u64>,
    /// The subscription to every topic from the earliest offset, until every topic's message
    /// arrived, seconds.
    load_s: f64,
    /// Of which building the subscription (which loads every topic), seconds.
    subscribe_s: f64,
    /// Messages it received (one per topic).
    delivered: u64,
    /// Topics loaded then.
    loaded_all: u64,
    /// `VmRSS` then.
    rss_loaded: Option<u64>,
    /// Topics loaded after the subscription was dropped and a maintenance pass ran.
    loaded_after_unload: u64,
    /// `VmRSS` then.
    rss_after_unload: Option<u64>,
    /// Process CPU time of the open and the subscription, seconds.
    cpu_s: Option<f64>,
}

/// Options of `log-probe restart`.
#[derive(Debug, ClapArgs)]
pub struct RestartProbeArgs {
    /// The data directory of the `topics` part.
    #[arg(long, value_name = "PATH")]
    dir: PathBuf,
    /// Topics it holds.
    #[arg(long, value_name = "N")]
    topics: usize,
}

/// `log-probe restart`: [`restart_probe`], printed as one JSON line.
pub fn run_restart_probe(args: &RestartProbeArgs) -> Result<()> {
    let measured = restart_probe(&args.dir, args.topics)?;
    println!("{}", serde_json::to_string(&measured)?);
    Ok(())
}

/// The command that runs [`restart_probe`] in a fresh process: this executable again.
#[cfg(not(test))]
fn probe_command(dir: &Path, n: usize) -> Result<Command> {
    let exe = std::env::current_exe().context("finding the executable")?;
    let mut command = Command::new(exe);
    command
        .args(["log-probe", "restart", "--dir"])
        .arg(dir)
        .arg("--topics")
        .arg(n.to_string());
    Ok(command)
}

/// The command that runs [`restart_probe`] in a fresh process: the test executable has no
/// subcommands, it runs the test `restart_probe_child`, which measures if told to.
#[cfg(test)]
fn probe_command(dir: &Path, n: usize) -> Result<Command> {
    let exe = std::env::current_exe().context("finding the executable")?;
    let mut command = Command::new(exe);
    command
        .args([
            "--exact",
            "log::topics::tests::restart_probe_child",
            "--nocapture",
            "--quiet",
            "--test-threads=1",
        ])
        .env(tests::PROBE_DIR, dir)
        .env(tests::PROBE_TOPICS, n.to_string());
    Ok(command)
}

/// Runs [`restart_probe`] on `dir` in a fresh process and reads what it measured.
fn fresh_restart(dir: &Path, n: usize) -> Result<FreshRestart> {
    let output = probe_command(dir, n)?
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running the restart probe")?;
    ensure!(
        output.status.success(),
        "the restart probe failed ({}; its error above)",
        output.status
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.find("{\"").map(|at| &l[at..]))
        .with_context(|| format!("no measurement in the restart probe's output: {stdout:?}"))?;
    let fresh: FreshRestart = serde_json::from_str(line)
        .with_context(|| format!("reading the restart probe's measurement {line:?}"))?;
    ensure!(
        fresh.topics == n as u64 && fresh.delivered == n as u64,
        "the restart probe found {} topics and read {} messages, expected {n}",
        fresh.topics,
        fresh.delivered
    );
    Ok(fresh)
}

/// Opens the broker on the `topics` part's `dir` (`n` topics of one message each) with no topic
/// loaded and measures the process's `VmRSS` over the open; then loads every topic with a
/// subscription that reads each one's message, measures again, drops it and unloads them with
/// one maintenance pass. Meant for a fresh process.
///
/// The broker's settings are the default but for the maintenance (which the open does not
/// use): `unload_idle_topics_after` zero, so that the pass unloads every topic nothing holds,
/// and no periodic pass (`maintenance_interval` of an hour): one running at the same time
/// holds every loaded topic for a moment (it lists them), and the topics it holds when this
/// pass looks stay loaded.
pub fn restart_probe(dir: &Path, n: usize) -> Result<FreshRestart> {
    // Opening a broker makes a missing data directory.
    let store = dir.join("store");
    ensure!(store.is_dir(), "no store in {}", dir.display());
    let config = BrokerConfig {
        unload_idle_topics_after: Some(Duration::ZERO),
        maintenance_interval: Duration::from_secs(3600),
        ..BrokerConfig::default()
    };
    block_on(async move {
        let rss_before = resident_bytes();
        let cpu_before = process_cpu_time();
        let start = Instant::now();
        let broker = Broker::open_with(dir, config, disk())
            .with_context(|| format!("opening the broker on {}", dir.display()))?;
        let open = start.elapsed();
        let rss_after_open = resident_bytes();
        let fds = open_files();
        let stats = broker.stats();
        let (topics, loaded) = (stats.topics as u64, stats.loaded_topics as u64);
        ensure!(
            topics == n as u64 && loaded == 0,
            "after the open: {topics} topics ({loaded} loaded), expected {n} (none loaded)"
        );

        let start = Instant::now();
        let mut sub = broker
            .subscription(EVERY_TOPIC)
            .start(StartPosition::Earliest)
            .build()
            .with_context(|| format!("subscribing to {EVERY_TOPIC}"))?;
        let subscribe = start.elapsed();
        let mut delivered = 0;
        while delivered < n as u64 {
            let delivery = tokio::time::timeout(READ_BACK, sub.recv())
                .await
                .with_context(|| {
                    format!("{delivered} of {n} messages from {EVERY_TOPIC} within {READ_BACK:?}")
                })?
                .with_context(|| format!("reading {EVERY_TOPIC}"))?;
            let (offset, len) = (delivery.offset(), delivery.message().payload().len());
            ensure!(
                (offset, len) == (0, PAYLOAD),
                "{}: read offset {offset} of {len} B, expected offset 0 of {PAYLOAD} B",
                delivery.topic()
            );
            delivered += 1;
        }
        let load = start.elapsed();
        let cpu = process_cpu_time()
            .zip(cpu_before)
            .map(|(after, before)| after.saturating_sub(before).as_secs_f64());
        let rss_loaded = resident_bytes();
        let loaded_all = broker.stats().loaded_topics as u64;
        ensure!(
            loaded_all >= n as u64,
            "{loaded_all} topics loaded with the subscription to every topic, expected {n}"
        );

        drop(sub);
        // A read the subscription started on an I/O thread may still hold its topic for a
        // moment: maintenance passes until none is loaded (a few seconds at most).
        let unload_by = Instant::now() + Duration::from_secs(5);
        let loaded_after_unload = loop {
            broker.maintain();
            let loaded = broker.stats().loaded_topics as u64;
            if loaded == 0 || Instant::now() >= unload_by {
                break loaded;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let rss_after_unload = resident_bytes();
        ensure!(
            loaded_after_unload == 0,
            "{loaded_after_unload} topics still loaded 5 s after the subscription was dropped, \
             maintenance passes running"
        );
        broker.shutdown(SHUTDOWN).await;
        drop(broker);
        Ok(FreshRestart {
            rss_before,
            rss_after_open,
            open_s: open.as_secs_f64(),
            topics,
            loaded,
            fds,
            load_s: load.as_secs_f64(),
            subscribe_s: subscribe.as_secs_f64(),
            delivered,
            loaded_all,
            rss_loaded,
            loaded_after_unload,
            rss_after_unload,
            cpu_s: cpu,
        })
    })
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
    let counts = restart_counts(n);
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The environment variables that make [`restart_probe_child`] measure: the data
    /// directory and its topics.
    pub(crate) const PROBE_DIR: &str = "FERRY_BENCH_PROBE_DIR";
    pub(crate) const PROBE_TOPICS: &str = "FERRY_BENCH_PROBE_TOPICS";

    /// The restart probe in the fresh process that the test executable runs (see
    /// `probe_command`); does nothing in a normal test run.
    #[test]
    fn restart_probe_child() -> Result<()> {
        let (Some(dir), Some(n)) = (std::env::var_os(PROBE_DIR), std::env::var_os(PROBE_TOPICS))
        else {
            return Ok(());
        };
        let n = n
            .to_str()
            .and_then(|n| n.parse().ok())
            .context(PROBE_TOPICS)?;
        let measured = restart_probe(Path::new(&dir), n)?;
        println!("{}", serde_json::to_string(&measured)?);
        Ok(())
    }
}
