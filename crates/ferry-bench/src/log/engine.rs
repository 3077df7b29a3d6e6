//! `engine`: the broker on durable storage. For fsync-always and never and each publisher
//! count, a fresh `Broker::open_with` (default `BrokerConfig`, `DiskConfig` with the policy:
//! 64 MiB segments, 1 MiB tail cache), one durable topic, no subscriber, and that many tasks on
//! a two-worker Tokio runtime awaiting `Publisher::publish(Message::new(payload))` in a loop for
//! `--seconds`, with the first `--payloads` size. Each publish is timed: under `always` it
//! returns after the group-committed fsync that covers it (publish -> acknowledgement).
//!
//! Rows add `vs_log` (records/s over the `append` row of the same policy, payload and publisher
//! count, where measured: the engine's share of the raw log's throughput) and the same ratio to
//! the reference as `append`. The broker does not expose its logs' fsync counts.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use ferry::disk::DiskConfig;
use ferry::{Broker, BrokerConfig, Message, TopicConfig};
use ferry_log::Durability;

use super::{mb_per_s, policy_name, ratio, row, Bench};
use crate::measure::{block_on, cpu_time, join_all, template, OpTally, Outcome};
use crate::report::Counts;

/// The durable topic of every run.
const TOPIC: &str = "bench/log";
/// How long the broker's shutdown may take.
const SHUTDOWN: Duration = Duration::from_secs(10);

/// One cell of the matrix.
struct Cell {
    durability: Durability,
    publishers: usize,
}

/// Measures every cell and adds its row.
pub fn run(bench: &mut Bench) -> Result<()> {
    let s = bench.settings.clone();
    let payload = s.payloads.first().copied().unwrap_or(100);
    let cells: Vec<Cell> = [Durability::Always, Durability::Never]
        .into_iter()
        .flat_map(|durability| {
            s.publishers.iter().map(move |&publishers| Cell {
                durability,
                publishers,
            })
        })
        .collect();
    let dir = bench.fresh_dir("engine")?;
    let runs = bench.rounds(
        &cells,
        |c, round| {
            eprintln!(
                "running engine ferry {} {payload} B x{} ({:?}, round {})",
                policy_name(c.durability),
                c.publishers,
                s.run_for,
                round + 1
            );
            let run = publish_for(&dir, c, payload, s.run_for)?;
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
            Ok(run)
        },
        |(outcome, _)| outcome.msgs_per_s(),
    )?;
    let reference = bench.reference;
    for (c, (outcome, end)) in cells.iter().zip(runs) {
        let counts = Counts {
            producers: c.publishers,
            consumers: 0,
            published: end,
            expected: end,
        };
        let bytes = outcome.delivered * payload as u64;
        let policy = policy_name(c.durability);
        let mut row = row(
            "engine",
            format!("ferry {policy}"),
            payload,
            counts,
            &outcome,
            bytes,
            None,
        );
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
