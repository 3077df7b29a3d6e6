//! `log`: durable topics. The storage engine (`ferry-log`) and the broker on it, measured against
//! the machine's own limits on the same data directory, in the same run.
//!
//! Parts, in order:
//! - `reference` (always): raw sequential write bandwidth (1 MiB writes, then `sync_all`), raw
//!   sequential read bandwidth, fsyncs/s (100 B append + `sync_data`, one writer) and small
//!   writes/s (100 B `pwrite`, no fsync). See [`disk`].
//! - `topics`: `--topics` topics (100,000) created on one data directory by a first publish
//!   each, with the RSS and open files they cost, then the broker's restart time, from the
//!   store's index checkpoint and without it (the whole log scanned), and the RSS of an idle
//!   and of a loaded topic, measured in a fresh process (the hidden subcommand `log-probe`).
//!   See [`topics`].
//! - `append`: `Log::append` of single-record batches by 1, 4 and 16 threads for a fixed time,
//!   for each payload and durability policy. See [`append`].
//! - `engine`: the same through `Broker::open_with` and `Publisher::publish` on a durable topic,
//!   fsync-always and never, with publish -> acknowledgement latency, beside the raw store
//!   (`Store` + `Stream::append`, never) that the engine writes to. See [`engine`].
//! - `read` and `recovery`: a 1 GB log read from the start, and opened again (recovery), also
//!   without its index files (rebuild); the same records read through the store
//!   (`Stream::read`) and through the engine (a subscription from the earliest offset). See
//!   [`scan`].
//!
//! Everything happens in a fresh temporary directory (under `--dir` if given), deleted at the
//! end. Throughput runs can be repeated (`--repeat`) in rounds; each reports its median run.

mod append;
mod disk;
mod engine;
mod scan;
mod topics;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::{Args as ClapArgs, Subcommand, ValueEnum};
use ferry_log::Durability;

use crate::measure::{load_average, median_by, Outcome};
use crate::report::{Counts, Extra, ExtraColumn, Report, Row, Table};

/// Options of `log`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// A smoke test (under a minute): shorter runs, a 64 MB log instead of 1 GB.
    #[arg(long)]
    pub quick: bool,
    /// Where to put the data directory: a fresh temporary directory is made in it and deleted
    /// afterwards. Default: the system's temporary directory.
    #[arg(long, value_name = "PATH")]
    pub dir: Option<PathBuf>,
    /// Parts to run (the reference figures always run).
    #[arg(
        long,
        value_delimiter = ',',
        default_values = ["topics", "append", "engine", "read", "recovery"]
    )]
    pub scenarios: Vec<Part>,
    /// Payload sizes in bytes of the append runs (the engine runs use the first).
    #[arg(long, value_delimiter = ',', default_values_t = [100, 1024])]
    pub payloads: Vec<usize>,
    /// Concurrent publishers of the append and engine runs.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 4, 16])]
    pub publishers: Vec<usize>,
    /// Seconds each append or engine run lasts (default 2; 0.25 with --quick).
    #[arg(long, value_name = "SECONDS")]
    pub seconds: Option<f64>,
    /// The interval of the `interval` durability policy, in milliseconds.
    #[arg(long, default_value_t = 10)]
    pub interval_ms: u64,
    /// Payload bytes of the log that `read` and `recovery` use (default 1,000,000,000;
    /// 64,000,000 with --quick).
    #[arg(long, value_name = "BYTES")]
    pub log_bytes: Option<u64>,
    /// Topics the `topics` part creates (default 100,000; 10,000 with --quick).
    #[arg(long, value_name = "N")]
    pub topics: Option<usize>,
    /// Measure each append and engine run, and the reference loops, this many times, in rounds,
    /// and report the median.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,
    /// Never try to drop the page cache (`/proc/sys/vm/drop_caches`, needs root): reads and
    /// recovery then run with a warm cache only.
    #[arg(long)]
    pub warm_only: bool,
}

/// Options of the hidden `log-probe`: a measurement of `log` that needs a process of its own,
/// which `log` runs as a child process of its own executable.
#[derive(Debug, ClapArgs)]
pub struct ProbeArgs {
    #[command(subcommand)]
    probe: Probe,
}

/// A measurement in a process of its own.
#[derive(Debug, Subcommand)]
enum Probe {
    /// `topics`: opens its data directory again, with no topic loaded, then loads every topic;
    /// prints the `VmRSS` measured as one JSON line.
    Restart(topics::RestartProbeArgs),
}

/// Runs `log-probe`.
pub fn probe(args: &ProbeArgs) -> Result<()> {
    match &args.probe {
        Probe::Restart(args) => topics::run_restart_probe(args),
    }
}

/// A part of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Part {
    /// Many topics on one data directory: creation rate, RSS and open files, restart time.
    Topics,
    /// `Log::append` throughput per payload, durability and publisher count.
    Append,
    /// `Publisher::publish` on a durable topic: throughput and publish -> ack latency.
    Engine,
    /// Sequential read throughput of a large log.
    Read,
    /// Recovery time of a large log (open, and open without its index files).
    Recovery,
}

/// Sizes and durations of a run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Parts to run.
    pub parts: Vec<Part>,
    /// Payload sizes of the append runs; the engine uses the first.
    pub payloads: Vec<usize>,
    /// Publisher counts.
    pub publishers: Vec<usize>,
    /// How long each append or engine run lasts.
    pub run_for: Duration,
    /// The interval of [`Durability::Interval`].
    pub interval: Duration,
    /// Bytes written for the raw write bandwidth.
    pub raw_bytes: u64,
    /// How long the fsync loop runs.
    pub fsync_for: Duration,
    /// How long the small-write loop runs.
    pub pwrite_for: Duration,
    /// Payload bytes of the large log.
    pub log_bytes: u64,
    /// Topics of the `topics` part.
    pub topics: usize,
    /// Rounds of the repeated measurements.
    pub repeat: u32,
    /// Whether to try dropping the page cache.
    pub drop_caches: bool,
}

impl Settings {
    fn from_args(args: &Args) -> Result<Self> {
        let (run_for, raw_mib, fsync_for, pwrite_for, log_bytes, topics) = if args.quick {
            (0.25, 64, 0.5, 0.2, 64_000_000, 10_000)
        } else {
            (2.0, 256, 2.0, 1.0, 1_000_000_000, 100_000)
        };
        let run_for = args.seconds.unwrap_or(run_for);
        if args.payloads.is_empty() || args.publishers.is_empty() {
            bail!("--payloads and --publishers need at least one value");
        }
        if args.publishers.contains(&0) || args.interval_ms == 0 || args.topics == Some(0) {
            bail!("--publishers, --interval-ms and --topics must be positive");
        }
        Ok(Settings {
            parts: args.scenarios.clone(),
            payloads: args.payloads.clone(),
            publishers: args.publishers.clone(),
            run_for: Duration::try_from_secs_f64(run_for).context("--seconds")?,
            interval: Duration::from_millis(args.interval_ms),
            raw_bytes: raw_mib << 20,
            fsync_for: Duration::from_secs_f64(fsync_for),
            pwrite_for: Duration::from_secs_f64(pwrite_for),
            log_bytes: args.log_bytes.unwrap_or(log_bytes).max(1),
            topics: args.topics.unwrap_or(topics),
            repeat: args.repeat,
            drop_caches: !args.warm_only,
        })
    }

    /// The durability policies of the append runs.
    fn policies(&self) -> [Durability; 3] {
        [
            Durability::Always,
            Durability::Interval(self.interval),
            Durability::Never,
        ]
    }
}

/// The name of a durability policy in reports.
fn policy_name(d: Durability) -> String {
    match d {
        Durability::Always => "always".to_string(),
        Durability::Interval(every) => format!("interval-{}ms", every.as_millis()),
        Durability::Never => "never".to_string(),
    }
}

/// The table of `log`.
const TABLE: Table = Table {
    rate: "records/s",
    producers: true,
    ratio: false,
    after_rate: &[ExtraColumn {
        title: "MB/s",
        fields: &["mb_per_s"],
    }],
    after_latency: &[
        ExtraColumn {
            title: "max us",
            fields: &["max_us"],
        },
        ExtraColumn {
            title: "vs ref",
            fields: &["vs_fsync_ceiling", "vs_raw_write", "vs_raw_read"],
        },
    ],
    legend: "records/s: records appended, published, read or recovered per second (reference: \
             operations per second: 1 MiB writes or reads, 100 B writes, write + fsync pairs).\n\
             MB/s: payload bytes per second, 10^6 B (recovery, restart and reference: bytes of \
             file).\n\
             Latency: of each append, publish -> acknowledgement, or write + fsync, closed loop \
             (each publisher starts its next one when the previous returns).\n\
             vs ref: ratio to the machine's own limit, measured on the same directory in this \
             run: always -> records/s / raw fsyncs/s (vs_fsync_ceiling; group commit can pass 1 \
             with several publishers); interval, never -> MB/s / raw write MB/s (vs_raw_write); \
             read -> MB/s / raw read MB/s with the same cache state (vs_raw_read).\n\
             vs_log: to the raw log (Log::append or Log::read row of the same policy, payload, \
             publishers or cache state); vs_store (engine never): to the raw store (store \
             never: Stream::append, same payload and publishers): the engine's share of the \
             store's append rate. read store/ferry: the engine's copy of the records read \
             with Stream::read as the engine does, and through a subscription from the \
             earliest offset.\n\
             topics: records/s is topics per second: created by a first publish each \
             (create), recovered by a restart (restart: Broker::open_with again and one \
             message read back; from the index checkpoint written at shutdown, or with no \
             checkpoint: the checkpoint file deleted, the whole log scanned; fresh process: \
             the same in a process of its own, then a subscription to every topic reads each \
             one's message); rss_per_topic: growth of VmRSS per topic created, bytes; \
             rss_per_idle_topic: growth of the fresh process's VmRSS over the open (no topic \
             loaded), per topic; rss_per_loaded_topic: from before the open to every topic \
             loaded and read; fds: open files of the process (fds_before: before the broker \
             opened); checkpoint_bytes: the checkpoint's size.\n\
             cpu ns: process CPU time (all threads, 10 ms resolution) per record.",
};

/// A run of `log`: the settings, the data directory, the reference figures and the report.
pub struct Bench {
    settings: Settings,
    /// The data directory, deleted when the bench is dropped.
    dir: tempfile::TempDir,
    reference: disk::Reference,
    /// Whether the page cache can be dropped (false once an attempt failed).
    can_drop: bool,
    report: Report,
}

impl Bench {
    /// A fresh directory `name` in the data directory.
    fn fresh_dir(&self, name: &str) -> Result<PathBuf> {
        let path = self.dir.path().join(name);
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(path)
    }

    /// Drops the page cache if allowed and possible (clean pages only: sync first); returns
    /// whether the next reads are cold.
    fn drop_page_cache(&mut self) -> bool {
        if !self.settings.drop_caches || !self.can_drop {
            return false;
        }
        match std::fs::write("/proc/sys/vm/drop_caches", "1") {
            Ok(()) => true,
            Err(e) => {
                eprintln!(
                    "note: cannot drop the page cache ({e}): reads and recovery run with a warm \
                     cache only"
                );
                self.can_drop = false;
                false
            }
        }
    }

    /// Adds `row`.
    fn add(&mut self, row: Row) -> Result<()> {
        self.report.row(row)
    }

    /// `run` once per round of `--repeat`; returns the median run by `key`.
    fn repeated<R>(
        &self,
        mut run: impl FnMut(u32) -> Result<R>,
        key: impl Fn(&R) -> f64,
    ) -> Result<R> {
        let runs = self.rounds(&[()], |(), round| run(round), key)?;
        runs.into_iter().next().context("not run")
    }

    /// Rounds of `--repeat`: runs every cell of `cells` once per round, then returns each
    /// cell's median run by `key`.
    fn rounds<C, R>(
        &self,
        cells: &[C],
        mut run: impl FnMut(&C, u32) -> Result<R>,
        key: impl Fn(&R) -> f64,
    ) -> Result<Vec<R>> {
        let mut runs: Vec<Vec<R>> = cells.iter().map(|_| Vec::new()).collect();
        for round in 0..self.settings.repeat {
            for (cell, runs) in cells.iter().zip(&mut runs) {
                runs.push(run(cell, round)?);
            }
        }
        runs.into_iter()
            .map(|r| median_by(r, &key).context("a cell was not run"))
            .collect()
    }
}

/// A row for a run that moved `outcome.delivered` records of `payload` bytes (`bytes` in all)
/// in `outcome.wall`, with its MB/s and, if it has latency samples, the largest one.
fn row(
    scenario: &'static str,
    system: String,
    payload: usize,
    counts: Counts,
    outcome: &Outcome,
    bytes: u64,
    note: Option<&'static str>,
) -> Row {
    let mut row = Row::new(scenario, system, payload, counts, outcome, note);
    row.add("mb_per_s", Extra::Value(mb_per_s(bytes, outcome.wall)));
    if !outcome.latency.is_empty() {
        let max = outcome.latency.max() as f64 / 1_000.0;
        row.add("max_us", Extra::Value(max));
    }
    row
}

/// Adds the ratio `name` = `value / reference` to `row`, if the reference is known.
fn ratio(row: &mut Row, name: &'static str, value: f64, reference: f64) {
    if reference > 0.0 {
        row.add(name, Extra::Value(value / reference));
    }
}

/// Millions of bytes per second.
fn mb_per_s(bytes: u64, wall: Duration) -> f64 {
    let secs = wall.as_secs_f64();
    if secs > 0.0 {
        bytes as f64 / secs / 1e6
    } else {
        0.0
    }
}

/// Runs `log` and prints its report.
pub fn run(args: &Args) -> Result<()> {
    let settings = Settings::from_args(args)?;
    if let Some(load) = load_average().filter(|l| *l >= 1.0) {
        eprintln!(
            "note: load average {load:.2} before starting: other processes compete for the CPUs \
             and the disk, figures will be lower and noisier"
        );
    }
    let dir = match &args.dir {
        Some(parent) => {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
            tempfile::Builder::new()
                .prefix("ferry-bench-log-")
                .tempdir_in(parent)
        }
        None => tempfile::Builder::new()
            .prefix("ferry-bench-log-")
            .tempdir(),
    }
    .context("creating the data directory")?;
    eprintln!("data directory: {}", dir.path().display());
    let mut bench = Bench {
        settings,
        dir,
        reference: disk::Reference::default(),
        can_drop: true,
        report: Report::new(args.json, TABLE),
    };
    measure(&mut bench)?;
    let Bench { report, dir, .. } = bench;
    dir.close().context("deleting the data directory")?;
    report.finish()
}

/// Runs every part of `bench.settings`.
fn measure(bench: &mut Bench) -> Result<()> {
    disk::reference(bench)?;
    let parts = bench.settings.parts.clone();
    // First, while the process is small: its RSS growth is measured.
    if parts.contains(&Part::Topics) {
        topics::run(bench)?;
    }
    if parts.contains(&Part::Append) {
        append::run(bench)?;
    }
    if parts.contains(&Part::Engine) {
        engine::run(bench)?;
    }
    let (read, recovery) = (parts.contains(&Part::Read), parts.contains(&Part::Recovery));
    if read || recovery {
        scan::run(bench, read, recovery)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::ensure;

    /// Every part runs on a tiny scale and accounts for every record (no timing is checked).
    #[test]
    fn every_part_accounts_for_every_record() -> Result<()> {
        let settings = Settings {
            parts: vec![
                Part::Topics,
                Part::Append,
                Part::Engine,
                Part::Read,
                Part::Recovery,
            ],
            payloads: vec![100],
            publishers: vec![1, 3],
            run_for: Duration::from_millis(30),
            interval: Duration::from_millis(5),
            raw_bytes: 2 << 20,
            fsync_for: Duration::from_millis(20),
            pwrite_for: Duration::from_millis(10),
            log_bytes: 3 << 20,
            topics: 50,
            repeat: 2,
            drop_caches: false,
        };
        let mut bench = Bench {
            settings,
            dir: tempfile::tempdir()?,
            reference: disk::Reference::default(),
            can_drop: true,
            report: Report::new(false, TABLE),
        };
        measure(&mut bench)?;
        let rows = bench.report.rows();
        // 4 reference rows (raw read warm only), 4 topics rows (create, restart warm with and
        // without checkpoint, restart in a fresh process), 3 policies x 2 publisher counts
        // with default and with 1 MiB segments, 2 x 2 engine rows and 2 store rows, 3 read
        // rows (log, store, ferry; warm only) and 2 recovery rows.
        ensure!(
            rows.len() == 4 + 4 + 6 + 6 + 6 + 3 + 2,
            "{} rows",
            rows.len()
        );
        for r in rows {
            ensure!(
                r.delivered > 0 && r.lost == 0 && r.delivered == r.expected,
                "{} {}: delivered {} of {}",
                r.scenario,
                r.system,
                r.delivered,
                r.expected
            );
        }
        ensure!(bench.dir.path().read_dir()?.next().is_none(), "files left");
        Ok(())
    }
}
