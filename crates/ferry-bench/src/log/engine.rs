//! `engine`: the broker on durable storage. For fsync-always and never and each publisher
//! count, a fresh `Broker::open_with` (default `BrokerConfig`, `DiskConfig` with the policy:
//! 64 MiB segments, 1 MiB tail cache), one durable topic, no subscriber, and that many tasks on
//! a two-worker Tokio runtime awaiting `Publisher::publish(Message::new(payload))` in a loop for
//! `--seconds`, with the first `--payloads` size. Each publish is timed: under `always` it
//! returns after the group-committed fsync that covers it (publish -> acknowledgement).
//!
//! Beside each `never` run, with the same payload and publisher count, the raw store the
//! engine writes to (`store never`): `ferry_log::Store::open` with the engine's settings
//! (`DiskConfig::default()`'s 64 MiB segments, durability `never`) and that many threads, each
//! appending one-record batches (`Stream::append`, the payload as the record's only content)
//! to a stream of its own, for `--seconds`. Runs alternate (store, then engine, per publisher
//! count) so that both meet the same write-back state.
//!
//! Rows add `vs_log` (records/s over the `append` row of the same policy, payload and publisher
//! count, where measured: the share of the raw log's throughput), engine `never` rows
//! `vs_store` (records/s over the `store never` row of the same publisher count: the engine's
//! share of the store's append rate), and the same ratio to the reference as `append`. The
//! broker does not expose its logs' fsync counts.

use std::path::Path;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use bytes::Bytes;
use ferry::disk::DiskConfig;
use ferry::{Broker, BrokerConfig, Message, TopicConfig};
use ferry_log::{Durability, LogConfig, RecordIn, Store, StoreConfig};

use super::{mb_per_s, policy_name, ratio, row, Bench};
use crate::measure::{block_on, cpu_time, join_all, template, OpTally, Outcome};
use crate::report::Counts;

/// The durable topic of every run.
const TOPIC: &str = "bench/log";
/// How long the broker's shutdown may take.
const SHUTDOWN: Duration = Duration::from_secs(10);

/// What a cell measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The broker: `Publisher::publish` on a durable topic.
    Engine,
    /// The raw store: `Stream::append`, a stream per thread.
    Store,
}

/// One cell of the matrix.
struct Cell {
    target: Target,
    durability: Durability,
    publishers: usize,
}

impl Cell {
    fn system(&self) -> String {
        let policy = policy_name(self.durability);
        match self.target {
            Target::Engine => format!("ferry {policy}"),
            Target::Store => format!("store {policy}"),
        }
    }
}

/// Measures every cell and adds its row.
pub fn run(bench: &mut Bench) -> Result<()> {
    let s = bench.settings.clone();
    let payload = s.payloads.first().copied().unwrap_or(100);
    let mut cells: Vec<Cell> = Vec::new();
    for &publishers in &s.publishers {
        cells.push(Cell {
            target: Target::Engine,
            durability: Durability::Always,
            publishers,
        });
    }
    for &publishers in &s.publishers {
        for target in [Target::Store, Target::Engine] {
            cells.push(Cell {
                target,
                durability: Durability::Never,
                publishers,
            });
        }
    }
    let dir = bench.fresh_dir("engine")?;
    let runs = bench.rounds(
        &cells,
        |c, round| {
            eprintln!(
                "running engine {} {payload} B x{} ({:?}, round {})",
                c.system(),
                c.publishers,
                s.run_for,
                round + 1
            );
            let run = match c.target {
                Target::Engine => publish_for(&dir, c, payload, s.run_for)?,
                Target::Store => store_append_for(&dir, c, payload, s.run_for)?,
            };
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
            Ok(run)
        },
        |(outcome, _)| outcome.msgs_per_s(),
    )?;
    let reference = bench.reference;
    // The store's rate per publisher count, for the engine's `vs_store`.
    let store_rates: Vec<(usize, f64)> = cells
        .iter()
        .zip(&runs)
        .filter(|(c, _)| c.target == Target::Store)
        .map(|(c, (outcome, _))| (c.publishers, outcome.msgs_per_s()))
        .collect();
    for (c, (outcome, end)) in cells.iter().zip(runs) {
        let counts = Counts {
            producers: c.publishers,
            consumers: 0,
            published: end,
            expected: end,
        };
        let bytes = outcome.delivered * payload as u64;
        let policy = policy_name(c.durability);
        let note = match c.target {
            Target::Engine => None,
            Target::Store => Some("raw store: Stream::append, a stream per thread"),
        };
        let mut row = row("engine", c.system(), payload, counts, &outcome, bytes, note);
        let log_system = format!("ferry-log {policy}");
        let log_rate = bench.report.rows().into_iter().find(|r| {
            r.scenario == "append"
                && r.payload_bytes == payload
                && r.producers == c.publishers
                && r.system == log_system
        });
        if let Some(log) = log_rate {
            ratio(
                &mut row,
                "vs_log",
                outcome.msgs_per_s(),
                log.msgs_per_s as f64,
            );
        }
        let store_rate = store_rates
            .iter()
            .find(|(publishers, _)| *publishers == c.publishers)
            .map(|(_, rate)| *rate);
        if let (Target::Engine, Some(store)) = (c.target, store_rate) {
            if c.durability == Durability::Never {
                ratio(&mut row, "vs_store", outcome.msgs_per_s(), store);
            }
        }
        if c.durability == Durability::Always {
            let rate = outcome.msgs_per_s();
            ratio(&mut row, "vs_fsync_ceiling", rate, reference.fsyncs_per_s);
        } else {
            let mb = mb_per_s(bytes, outcome.wall);
            ratio(&mut row, "vs_raw_write", mb, reference.write_mb_per_s);
        }
        bench.add(row)?;
    }
    Ok(())
}

/// Publishes to a fresh durable broker in `dir` from `c.publishers` tasks for `run_for`; returns
/// the outcome and the topic's next offset at the end.
fn publish_for(dir: &Path, c: &Cell, payload: usize, run_for: Duration) -> Result<(Outcome, u64)> {
    let payload = template(payload);
    let durability = c.durability;
    let publishers = c.publishers;
    let ((workers, end), cpu) = cpu_time(|| {
        block_on(async move {
            let disk = DiskConfig {
                durability,
                ..DiskConfig::default()
            };
            let broker = Broker::open_with(dir, BrokerConfig::default(), disk)
                .with_context(|| format!("opening a broker on {}", dir.display()))?;
            broker.create_topic(TOPIC, TopicConfig::default())?;
            let mut tasks = Vec::with_capacity(publishers);
            for _ in 0..publishers {
                let publisher = broker.publisher(TOPIC)?;
                tasks.push(tokio::spawn(async move {
                    let mut tally = OpTally::new()?;
                    let deadline = tally.first + run_for;
                    let mut at = tally.first;
                    while at < deadline {
                        publisher
                            .publish(Message::new(Bytes::from_static(payload)))
                            .await?;
                        at = tally.record(at);
                    }
                    Ok(tally)
                }));
            }
            let workers = join_all(tasks).await?;
            let end = broker.topic_stats(TOPIC).map_or(0, |t| t.next_offset);
            broker.shutdown(SHUTDOWN).await;
            Ok((workers, end))
        })
    })?;
    let mut outcome = Outcome::from_ops(workers)?;
    outcome.cpu = cpu;
    Ok((outcome, end))
}

/// Appends one-record batches of `payload` bytes to a fresh store in `dir` from `c.publishers`
/// threads, each on a stream of its own, for `run_for`; returns the outcome and the records the
/// streams hold at the end.
fn store_append_for(
    dir: &Path,
    c: &Cell,
    payload: usize,
    run_for: Duration,
) -> Result<(Outcome, u64)> {
    let config = StoreConfig {
        log: LogConfig {
            segment_bytes: DiskConfig::default().segment_bytes,
            durability: c.durability,
            ..LogConfig::default()
        },
        ..StoreConfig::default()
    };
    let store = Store::open(dir, config).with_context(|| format!("opening {}", dir.display()))?;
    let streams = (0..c.publishers)
        .map(|i| store.stream(&format!("{TOPIC}/{i}")))
        .collect::<Result<Vec<_>, _>>()?;
    let payload = template(payload);
    let start = Barrier::new(c.publishers);
    let (workers, cpu) = cpu_time(|| {
        std::thread::scope(|scope| {
            let threads: Vec<_> = streams
                .iter()
                .map(|stream| {
                    let start = &start;
                    scope.spawn(move || {
                        let batch = [RecordIn::new(Bytes::from_static(payload))];
                        let mut next = stream.next_offset();
                        start.wait();
                        OpTally::run_until(Instant::now() + run_for, || {
                            stream.append(next, &batch)?;
                            next += 1;
                            Ok(())
                        })
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().map_err(|_| anyhow!("an appender panicked"))?)
                .collect::<Result<Vec<_>>>()
        })
    })?;
    let end = streams.iter().map(|s| s.next_offset() - s.start()).sum();
    store.close()?;
    let mut outcome = Outcome::from_ops(workers)?;
    outcome.cpu = cpu;
    Ok((outcome, end))
}
