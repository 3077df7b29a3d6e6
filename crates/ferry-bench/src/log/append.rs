//! `append`: the storage engine alone. For each payload, durability policy and publisher count,
//! that many threads call `Log::append` with a batch of one record, again and again, for
//! `--seconds`, on a fresh log (`LogConfig::default()` but the durability: 256 MiB segments,
//! 4 MiB tail cache). Each append is timed (it returns once the policy holds: after the group
//! commit's fsync under `always`).
//!
//! Rows add the fsyncs the log issued (`LogStats::fsyncs`: group commit under `always`, the
//! flusher thread under `interval`), `records_per_fsync`, `disk_mb_per_s` (encoded batches,
//! headers included) and a ratio to the reference: `vs_fsync_ceiling` (records/s / raw
//! fsyncs/s) under `always`, `vs_raw_write` (payload MB/s / raw write MB/s) otherwise.
//!
//! Rows `ferry-log <policy> 1MiB-segments` (1 KiB payloads) run the same with 1 MiB segments,
//! so that the log rolls several times a second: what a roll costs the appenders waiting on
//! the writer lock shows in their rate and tail latency (`rolls`: segments rolled).

use std::path::Path;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use bytes::Bytes;
use ferry_log::{Durability, Log, LogConfig, RecordIn};

use super::{mb_per_s, policy_name, ratio, row, Bench};
use crate::measure::{cpu_time, template, OpTally, Outcome};
use crate::report::{Counts, Extra};

/// One cell of the matrix.
struct Cell {
    payload: usize,
    durability: Durability,
    publishers: usize,
    /// Segment size, if not the default (rows that roll often).
    segment_bytes: Option<u64>,
}

/// Segment size of the rows that roll often.
const ROLL_SEGMENT_BYTES: u64 = 1 << 20;
/// Payload of the rows that roll often.
const ROLL_PAYLOAD: usize = 1024;

/// What one run measured.
struct Run {
    outcome: Outcome,
    /// Fsyncs the log issued during the run.
    fsyncs: u64,
    /// Bytes of encoded batches appended.
    disk_bytes: u64,
    /// The log's next offset after the run.
    end: u64,
    /// Segments rolled during the run.
    rolls: u64,
}

/// Measures every cell and adds its row.
pub fn run(bench: &mut Bench) -> Result<()> {
    let s = bench.settings.clone();
    let mut cells = Vec::new();
    for &payload in &s.payloads {
        for durability in s.policies() {
            for &publishers in &s.publishers {
                cells.push(Cell {
                    payload,
                    durability,
                    publishers,
                    segment_bytes: None,
                });
            }
        }
    }
    for durability in s.policies() {
        for &publishers in &s.publishers {
            cells.push(Cell {
                payload: ROLL_PAYLOAD,
                durability,
                publishers,
                segment_bytes: Some(ROLL_SEGMENT_BYTES),
            });
        }
    }
    let dir = bench.fresh_dir("append")?;
    let runs = bench.rounds(
        &cells,
        |c, round| {
            eprintln!(
                "running append ferry-log {}{} {} B x{} ({:?}, round {})",
                policy_name(c.durability),
                segments_name(c),
                c.payload,
                c.publishers,
                s.run_for,
                round + 1
            );
            let run = append_for(&dir, c, s.run_for)?;
            // Deleting the log also discards what `never` left for the OS to write back, which
            // would otherwise compete with the next runs.
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
            Ok(run)
        },
        |r| r.outcome.msgs_per_s(),
    )?;
    let reference = bench.reference;
    for (c, r) in cells.iter().zip(runs) {
        let counts = Counts {
            producers: c.publishers,
            consumers: 0,
            published: r.end,
            expected: r.end,
        };
        let bytes = r.outcome.delivered * c.payload as u64;
        let system = format!(
            "ferry-log {}{}",
            policy_name(c.durability),
            segments_name(c)
        );
        let mut row = row("append", system, c.payload, counts, &r.outcome, bytes, None);
        row.add("fsyncs", Extra::Count(r.fsyncs));
        if c.segment_bytes.is_some() {
            row.add("rolls", Extra::Count(r.rolls));
        }
        if r.fsyncs > 0 {
            let per_fsync = r.outcome.delivered as f64 / r.fsyncs as f64;
            row.add("records_per_fsync", Extra::Value(per_fsync));
        }
        row.add(
            "disk_mb_per_s",
            Extra::Value(mb_per_s(r.disk_bytes, r.outcome.wall)),
        );
        if c.durability == Durability::Always {
            let rate = r.outcome.msgs_per_s();
            ratio(&mut row, "vs_fsync_ceiling", rate, reference.fsyncs_per_s);
        } else {
            let mb = mb_per_s(bytes, r.outcome.wall);
            ratio(&mut row, "vs_raw_write", mb, reference.write_mb_per_s);
        }
        bench.add(row)?;
    }
    Ok(())
}

/// `c.publishers` threads appending one record of `c.payload` bytes at a time to a fresh log in
/// `dir` for `run_for`.
fn append_for(dir: &Path, c: &Cell, run_for: Duration) -> Result<Run> {
    let mut config = LogConfig {
        durability: c.durability,
        ..LogConfig::default()
    };
    if let Some(bytes) = c.segment_bytes {
        config.segment_bytes = bytes;
    }
    let log = Log::open(dir, config).with_context(|| format!("opening {}", dir.display()))?;
    let payload = template(c.payload);
    let start = Barrier::new(c.publishers);
    let (workers, cpu) = cpu_time(|| {
        std::thread::scope(|scope| {
            let threads: Vec<_> = (0..c.publishers)
                .map(|_| {
                    scope.spawn(|| {
                        let batch = [RecordIn::new(Bytes::from_static(payload))];
                        start.wait();
                        OpTally::run_until(Instant::now() + run_for, || {
                            log.append(&batch)?;
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
    let stats = log.stats();
    let mut outcome = Outcome::from_ops(workers)?;
    outcome.cpu = cpu;
    Ok(Run {
        outcome,
        fsyncs: stats.fsyncs,
        disk_bytes: stats.bytes_appended,
        end: log.next_offset(),
        rolls: stats.segments_rolled,
    })
}

/// The suffix naming a cell's segment size when it is not the default.
fn segments_name(c: &Cell) -> &'static str {
    match c.segment_bytes {
        Some(_) => " 1MiB-segments",
        None => "",
    }
}
