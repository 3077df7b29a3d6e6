//! `read` and `recovery`, on one large log: `--log-bytes` of 1 KiB payloads (1 GB; 64 MB with
//! `--quick`), one record per batch as the broker appends single publishes, written with
//! durability `never` and `LogConfig::default()` (256 MiB segments), then synced and closed.
//!
//! - `recovery`, `open`: `Log::open` of the closed log, timed: it checks the sealed segments
//!   cheaply (index well-formed, batches after the last index entry) and scans the active one
//!   fully, checking every CRC; with a cold page cache (dropped before, if possible) and again
//!   warm;
//! - `read`: from the first offset to the end with `read(from, 1000, 4 MiB)` in a loop, on a log
//!   opened beforehand, cold (page cache dropped after opening, if possible) and warm, checking
//!   that the offsets follow on;
//! - `recovery`, `rebuild`: `Log::open` after deleting every `.index` and `.timeindex` file,
//!   which makes it scan every segment in full.
//!
//! `read` also reads the same records as the engine stores them: published one by one with
//! `Publisher::publish` to a durable topic of a fresh `Broker::open_with` (default
//! `BrokerConfig`, `DiskConfig` with durability `never`: the topic is a stream of the shared
//! store, 64 MiB segments), which is then shut down. Then, each cold (page cache dropped after
//! opening, if possible) and warm:
//! - `store`: `Store::open` on the data directory's `store/`, then the topic's stream read from
//!   its start with `Stream::read(from, 256, 4 MiB)` in a loop, as the engine's
//!   `DiskTopic::read` does for a subscription taking 256 records at a time;
//! - `ferry`: the broker opened again (its topics' memory windows start empty, so every
//!   record comes from the store) and a subscription from `StartPosition::Earliest`
//!   (automatic acknowledgement, default batch of 256) taking everything with `try_recv`.
//!
//! Both check that the offsets follow on. Rows add `seconds`, `gb_per_s` and the log's layout
//! (`log_bytes`, `segments`, `active_bytes`: the segment scanned in full by a plain open);
//! reads add `vs_raw_read` (payload MB/s / raw read MB/s, same cache state), and the store and
//! engine reads `vs_log` (payload MB/s / the `Log::read` row's, same cache state).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use ferry::disk::DiskConfig;
use ferry::{Broker, BrokerConfig, Message, StartPosition, TryRecvError};
use ferry_log::{Durability, Log, LogConfig, RecordIn, Store, StoreConfig, Stream};

use super::{mb_per_s, ratio, row, Bench};
use crate::measure::{block_on, cpu_time, process_cpu_time, template, Outcome};
use crate::report::{Counts, Extra, Row};

/// Payload size of the large log's records.
const RECORD: usize = 1024;
/// Records per read.
const READ_RECORDS: usize = 1000;
/// Bytes per read.
const READ_BYTES: usize = 4 << 20;
/// Records per store read: a subscription's default batch, which the engine reads at a time.
const ENGINE_BATCH: usize = 256;
/// The durable topic holding the engine's copy of the records.
const TOPIC: &str = "bench/large";
/// How long a broker's shutdown may take.
const SHUTDOWN: Duration = Duration::from_secs(30);
/// How long a subscription may wait for a record that the store holds.
const STALL: Duration = Duration::from_secs(30);

/// The segment files of a log directory.
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// Bytes of `.log` files.
    log_bytes: u64,
    /// `.log` files.
    segments: u64,
    /// Bytes of the last (active) segment.
    active_bytes: u64,
}

impl Layout {
    fn of(dir: &Path) -> Result<Self> {
        let mut logs = files_with(dir, &["log"])?
            .into_iter()
            .map(|p| Ok((p.metadata()?.len(), p)))
            .collect::<Result<Vec<(u64, PathBuf)>>>()
            .with_context(|| format!("listing {}", dir.display()))?;
        // Segment files are named by their base offset on 20 digits: by name is by offset.
        logs.sort_by(|a, b| a.1.cmp(&b.1));
        Ok(Layout {
            log_bytes: logs.iter().map(|(len, _)| len).sum(),
            segments: logs.len() as u64,
            active_bytes: logs.last().map_or(0, |(len, _)| *len),
        })
    }

    fn add_to(&self, row: &mut Row) {
        row.add("log_bytes", Extra::Count(self.log_bytes));
        row.add("segments", Extra::Count(self.segments));
        row.add("active_bytes", Extra::Count(self.active_bytes));
    }
}

/// The files of `dir` with one of `extensions`.
fn files_with(dir: &Path, extensions: &[&str]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| extensions.contains(&e))
        {
            out.push(path);
        }
    }
    Ok(out)
}

/// The page cache state of a measurement, as a system name suffix and a note.
fn cache(cold: bool) -> (&'static str, &'static str) {
    if cold {
        ("cold", "page cache dropped before")
    } else {
        ("warm", "page cache warm")
    }
}

/// Writes the large log and runs the parts asked for on it.
pub fn run(bench: &mut Bench, read: bool, recovery: bool) -> Result<()> {
    let dir = bench.fresh_dir("large")?;
    let config = LogConfig {
        durability: Durability::Never,
        ..LogConfig::default()
    };
    let records = bench.settings.log_bytes.div_ceil(RECORD as u64);
    let started = Instant::now();
    eprintln!(
        "writing a {:.0} MB log ({records} records of {RECORD} B)",
        bench.settings.log_bytes as f64 / 1e6
    );
    {
        let log = Log::open(&dir, config.clone())
            .with_context(|| format!("opening {}", dir.display()))?;
        let batch = [RecordIn::new(Bytes::from_static(template(RECORD)))];
        for _ in 0..records {
            log.append(&batch)?;
        }
        log.sync()?;
    }
    let layout = Layout::of(&dir)?;
    eprintln!(
        "written and synced in {:.1?}: {} bytes in {} segments",
        started.elapsed(),
        layout.log_bytes,
        layout.segments
    );
    let counts = Counts {
        producers: 0,
        consumers: 1,
        published: records,
        expected: records,
    };

    let mut first_open_cold = false;
    if recovery {
        first_open_cold = bench.drop_page_cache();
        eprintln!("running recovery open ({})", cache(first_open_cold).0);
        let row = open_timed(&dir, &config, "open", first_open_cold, counts, layout)?;
        bench.add(row)?;
    }
    if read {
        let log = Log::open(&dir, config.clone())?;
        let cold = bench.drop_page_cache();
        for cold in if cold { vec![true, false] } else { vec![false] } {
            eprintln!("running read ({})", cache(cold).0);
            let row = read_all(
                &log,
                cold,
                counts,
                layout,
                bench.reference.read_mb_per_s(cold),
            )?;
            bench.add(row)?;
        }
        drop(log);
        read_stored(bench, records)?;
    }
    if recovery {
        for index in files_with(&dir, &["index", "timeindex"])? {
            std::fs::remove_file(&index)
                .with_context(|| format!("removing {}", index.display()))?;
        }
        let cold = bench.drop_page_cache();
        eprintln!("running recovery rebuild ({})", cache(cold).0);
        let row = open_timed(&dir, &config, "rebuild", cold, counts, layout)?;
        bench.add(row)?;
        if first_open_cold {
            eprintln!("running recovery open (warm)");
            let row = open_timed(&dir, &config, "open", false, counts, layout)?;
            bench.add(row)?;
        }
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))
}

/// Times `Log::open` of the log in `dir`, and checks that it recovered every record.
fn open_timed(
    dir: &Path,
    config: &LogConfig,
    what: &str,
    cold: bool,
    counts: Counts,
    layout: Layout,
) -> Result<Row> {
    let ((recovered, wall), cpu) = cpu_time(|| {
        let start = Instant::now();
        let log = Log::open(dir, config.clone())?;
        let wall = start.elapsed();
        Ok((log.next_offset() - log.start_offset(), wall))
    })
    .with_context(|| format!("opening {}", dir.display()))?;
    let mut outcome = Outcome::without_latency(recovered, None, wall)?;
    outcome.cpu = cpu;
    let (state, note) = cache(cold);
    let system = format!("{what} {state}");
    let mut row = row(
        "recovery",
        system,
        RECORD,
        counts,
        &outcome,
        layout.log_bytes,
        Some(note),
    );
    add_seconds(&mut row, wall, layout.log_bytes);
    layout.add_to(&mut row);
    Ok(row)
}

/// Reads `log` from its first offset to its end, checking that the offsets follow on.
fn read_all(
    log: &Log,
    cold: bool,
    counts: Counts,
    layout: Layout,
    raw_read_mb_per_s: f64,
) -> Result<Row> {
    let ((read, payload_bytes, wall), cpu) = cpu_time(|| {
        let start = Instant::now();
        let (mut next, end) = (log.start_offset(), log.next_offset());
        let (mut read, mut bytes) = (0_u64, 0_u64);
        while next < end {
            let records = log.read(next, READ_RECORDS, READ_BYTES)?;
            if records.is_empty() {
                bail!("read at {next} returned nothing before the end ({end})");
            }
            for r in records {
                if r.offset != next {
                    bail!(
                        "read returned offset {} where {next} was expected",
                        r.offset
                    );
                }
                next += 1;
                read += 1;
                bytes += r.payload.len() as u64;
            }
        }
        Ok((read, bytes, start.elapsed()))
    })
    .context("reading the large log")?;
    let mut outcome = Outcome::without_latency(read, None, wall)?;
    outcome.cpu = cpu;
    let (state, note) = cache(cold);
    let system = format!("ferry-log {state}");
    let mut row = row(
        "read",
        system,
        RECORD,
        counts,
        &outcome,
        payload_bytes,
        Some(note),
    );
    let disk = mb_per_s(layout.log_bytes, wall);
    row.add("disk_mb_per_s", Extra::Value(disk));
    ratio(
        &mut row,
        "vs_raw_read",
        mb_per_s(payload_bytes, wall),
        raw_read_mb_per_s,
    );
    add_seconds(&mut row, wall, layout.log_bytes);
    Ok(row)
}

/// Adds `seconds` and `gb_per_s` (`bytes` of log in `wall`).
fn add_seconds(row: &mut Row, wall: Duration, bytes: u64) {
    row.add("seconds", Extra::Value(wall.as_secs_f64()));
    row.add("gb_per_s", Extra::Value(mb_per_s(bytes, wall) / 1e3));
}

/// The engine's data directory settings: durability `never`, the rest as by default.
fn disk_never() -> DiskConfig {
    DiskConfig {
        durability: Durability::Never,
        ..DiskConfig::default()
    }
}

/// The page cache states to read in, the first one cold if `cold`.
fn states(cold: bool) -> &'static [bool] {
    if cold {
        &[true, false]
    } else {
        &[false]
    }
}

/// What one read of every record measured.
struct Pass {
    read: u64,
    payload_bytes: u64,
    wall: Duration,
    cpu: Option<Duration>,
}

/// Publishes `records` records of the large log's size to a durable topic, then reads them
/// back through the store and through the engine (see the module docs).
fn read_stored(bench: &mut Bench, records: u64) -> Result<()> {
    let dir = bench.fresh_dir("large-engine")?;
    let started = Instant::now();
    eprintln!("publishing the same records to a durable topic ({records} x {RECORD} B, never)");
    block_on(async {
        let broker = Broker::open_with(&dir, BrokerConfig::default(), disk_never())
            .with_context(|| format!("opening a broker on {}", dir.display()))?;
        let publisher = broker.publisher(TOPIC)?;
        let payload = template(RECORD);
        for _ in 0..records {
            publisher
                .publish(Message::new(Bytes::from_static(payload)))
                .await?;
        }
        let end = broker.topic_stats(TOPIC).map_or(0, |t| t.next_offset);
        broker.shutdown(SHUTDOWN).await;
        if end != records {
            bail!("the topic ends at {end} after {records} publishes");
        }
        Ok(())
    })?;
    let store_dir = dir.join("store");
    let layout = Layout::of(&store_dir)?;
    eprintln!(
        "published in {:.1?}: {} bytes in {} segments",
        started.elapsed(),
        layout.log_bytes,
        layout.segments
    );
    let counts = Counts {
        producers: 0,
        consumers: 1,
        published: records,
        expected: records,
    };

    {
        let config = StoreConfig {
            log: LogConfig {
                segment_bytes: DiskConfig::default().segment_bytes,
                durability: Durability::Never,
                ..LogConfig::default()
            },
            ..StoreConfig::default()
        };
        let store = Store::open(&store_dir, config)
            .with_context(|| format!("opening {}", store_dir.display()))?;
        let stream = store.stream(TOPIC)?;
        let cold = bench.drop_page_cache();
        for &cold in states(cold) {
            eprintln!("running read store ({})", cache(cold).0);
            let pass = read_stream(&stream).context("reading the topic's stream")?;
            let row = read_row(bench, "store", cold, counts, layout, &pass)?;
            bench.add(row)?;
        }
        store.close()?;
    }

    block_on(async {
        let broker = Broker::open_with(&dir, BrokerConfig::default(), disk_never())
            .with_context(|| format!("opening the broker on {} again", dir.display()))?;
        let cold = bench.drop_page_cache();
        for &cold in states(cold) {
            eprintln!("running read ferry ({})", cache(cold).0);
            let pass = subscribe_all(&broker, records)
                .await
                .context("reading the topic through a subscription")?;
            let row = read_row(bench, "ferry", cold, counts, layout, &pass)?;
            bench.add(row)?;
        }
        broker.shutdown(SHUTDOWN).await;
        Ok(())
    })?;
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))
}

/// Reads `stream` from its start to its end, as the engine reads it for a subscription.
fn read_stream(stream: &Stream) -> Result<Pass> {
    let ((read, payload_bytes, wall), cpu) = cpu_time(|| {
        let start = Instant::now();
        let (mut next, end) = (stream.start(), stream.next_offset());
        let (mut read, mut bytes) = (0_u64, 0_u64);
        while next < end {
            let records = stream.read(next, ENGINE_BATCH, READ_BYTES)?;
            if records.is_empty() {
                bail!("read at {next} returned nothing before the end ({end})");
            }
            for r in records {
                if r.offset != next {
                    bail!(
                        "read returned offset {} where {next} was expected",
                        r.offset
                    );
                }
                next += 1;
                read += 1;
                bytes += r.payload.len() as u64;
            }
        }
        Ok((read, bytes, start.elapsed()))
    })?;
    Ok(Pass {
        read,
        payload_bytes,
        wall,
        cpu,
    })
}

/// Subscribes to the topic from its earliest record and takes `records` deliveries.
async fn subscribe_all(broker: &Broker, records: u64) -> Result<Pass> {
    let cpu_before = process_cpu_time();
    let start = Instant::now();
    let mut sub = broker
        .subscription(TOPIC)
        .start(StartPosition::Earliest)
        .build()?;
    let (mut next, mut bytes) = (0_u64, 0_u64);
    while next < records {
        let delivery = match sub.try_recv() {
            Ok(d) => d,
            Err(TryRecvError::Empty) => tokio::time::timeout(STALL, sub.recv())
                .await
                .with_context(|| format!("nothing delivered at {next} within {STALL:?}"))??,
            Err(e) => return Err(e.into()),
        };
        if delivery.offset() != next {
            bail!(
                "delivered offset {} where {next} was expected",
                delivery.offset()
            );
        }
        bytes += delivery.message().payload().len() as u64;
        next += 1;
    }
    let wall = start.elapsed();
    let cpu = process_cpu_time()
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
    Ok(Pass {
        read: next,
        payload_bytes: bytes,
        wall,
        cpu,
    })
}

/// The row of a read of the engine's copy through `system`.
fn read_row(
    bench: &Bench,
    system: &str,
    cold: bool,
    counts: Counts,
    layout: Layout,
    pass: &Pass,
) -> Result<Row> {
    let mut outcome = Outcome::without_latency(pass.read, None, pass.wall)?;
    outcome.cpu = pass.cpu;
    let (state, note) = cache(cold);
    let mut row = row(
        "read",
        format!("{system} {state}"),
        RECORD,
        counts,
        &outcome,
        pass.payload_bytes,
        Some(note),
    );
    let mb = mb_per_s(pass.payload_bytes, pass.wall);
    row.add(
        "disk_mb_per_s",
        Extra::Value(mb_per_s(layout.log_bytes, pass.wall)),
    );
    ratio(
        &mut row,
        "vs_raw_read",
        mb,
        bench.reference.read_mb_per_s(cold),
    );
    let log_system = format!("ferry-log {state}");
    let log_mb = bench
        .report
        .rows()
        .into_iter()
        .find(|r| r.scenario == "read" && r.system == log_system)
        .and_then(|r| match r.extra("mb_per_s") {
            Some(Extra::Value(x)) => Some(x),
            _ => None,
        });
    if let Some(log_mb) = log_mb {
        ratio(&mut row, "vs_log", mb, log_mb);
    }
    add_seconds(&mut row, pass.wall, layout.log_bytes);
    Ok(row)
}
