//! The machine's own limits on the data directory, measured in the same run as Ferry, so that
//! Ferry's figures can be read as ratios to them:
//! - `raw-write`: sequential write bandwidth: `--quick` 64 MiB, else 256 MiB in 1 MiB
//!   `write`s to a new file, then `sync_all`; timed to the end of the sync (`cached_mb_per_s`:
//!   up to the last write, what the page cache absorbs);
//! - `raw-read cold` / `raw-read warm`: that file read back in 1 MiB `read`s, after dropping the
//!   page cache (if possible), then again from the cache;
//! - `raw-fsync`: one writer appending 100 B (`pwrite` at the end of a new file, which grows as
//!   a log segment does) and calling `sync_data` after each, for 2 s (0.5 s quick): the ceiling
//!   of fsync-always with one publisher and no group commit;
//! - `raw-pwrite`: the same 100 B appends without fsync, for 1 s (0.2 s quick): the system-call
//!   ceiling of one writer.
//!
//! The loops are repeated with `--repeat` (median by rate).

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use super::{mb_per_s, row, Bench};
use crate::measure::{chunks, cpu_time, OpTally, Outcome};
use crate::report::{Counts, Extra, Row};

/// Size of the raw sequential writes and reads.
const CHUNK: usize = 1 << 20;
/// Size of the raw small writes, with and without fsync.
const SMALL: usize = 100;

/// The reference figures (0 where not measured).
#[derive(Debug, Clone, Copy, Default)]
pub struct Reference {
    /// Sequential write bandwidth to stable storage, MB/s.
    pub write_mb_per_s: f64,
    /// Sequential read bandwidth with a cold page cache, MB/s (0 if the cache could not be
    /// dropped).
    pub cold_read_mb_per_s: f64,
    /// Sequential read bandwidth from the page cache, MB/s.
    pub warm_read_mb_per_s: f64,
    /// 100 B write + `sync_data` pairs per second, one writer.
    pub fsyncs_per_s: f64,
    /// 100 B writes per second, one writer, no fsync.
    pub pwrites_per_s: f64,
}

impl Reference {
    /// The read bandwidth with a cold or warm page cache.
    pub fn read_mb_per_s(&self, cold: bool) -> f64 {
        if cold {
            self.cold_read_mb_per_s
        } else {
            self.warm_read_mb_per_s
        }
    }
}

/// What one sequential pass over the raw file measured.
struct Pass {
    outcome: Outcome,
    bytes: u64,
    /// Up to the last write, before the sync (writes only).
    cached: Duration,
}

/// Measures the reference figures and adds their rows.
pub fn reference(bench: &mut Bench) -> Result<()> {
    let dir = bench.fresh_dir("reference")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let s = bench.settings.clone();
    let file = dir.join("raw");

    eprintln!("running reference raw-write ({} MiB)", s.raw_bytes >> 20);
    let write = bench.repeated(
        |_| raw_write(&file, s.raw_bytes),
        |p| p.outcome.msgs_per_s(),
    )?;
    bench.reference.write_mb_per_s = mb_per_s(write.bytes, write.outcome.wall);
    let mut r = pass_row("raw-write", &write, "1 MiB writes, then sync_all");
    r.add(
        "cached_mb_per_s",
        Extra::Value(mb_per_s(write.bytes, write.cached)),
    );
    bench.add(r)?;

    eprintln!("running reference raw-read");
    if bench.drop_page_cache() {
        let cold = raw_read(&file)?;
        bench.reference.cold_read_mb_per_s = mb_per_s(cold.bytes, cold.outcome.wall);
        bench.add(pass_row(
            "raw-read cold",
            &cold,
            "1 MiB reads, page cache dropped before",
        ))?;
    }
    let warm = raw_read(&file)?;
    bench.reference.warm_read_mb_per_s = mb_per_s(warm.bytes, warm.outcome.wall);
    bench.add(pass_row(
        "raw-read warm",
        &warm,
        "1 MiB reads from the page cache",
    ))?;
    std::fs::remove_file(&file).with_context(|| format!("removing {}", file.display()))?;

    eprintln!("running reference raw-fsync ({:?})", s.fsync_for);
    let fsync = small_writes(bench, &dir, s.fsync_for, true)?;
    bench.reference.fsyncs_per_s = fsync.msgs_per_s();
    bench.add(small_row(
        "raw-fsync",
        &fsync,
        "100 B appended + sync_data, one writer: the fsync ceiling",
    ))?;

    eprintln!("running reference raw-pwrite ({:?})", s.pwrite_for);
    let pwrite = small_writes(bench, &dir, s.pwrite_for, false)?;
    bench.reference.pwrites_per_s = pwrite.msgs_per_s();
    bench.add(small_row(
        "raw-pwrite",
        &pwrite,
        "100 B appended, no fsync, one writer",
    ))?;
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))
}

/// The row of a sequential pass of 1 MiB operations.
fn pass_row(system: &str, pass: &Pass, note: &'static str) -> Row {
    reference_row(system, CHUNK, &pass.outcome, pass.bytes, note)
}

/// The row of a small-write loop.
fn small_row(system: &str, outcome: &Outcome, note: &'static str) -> Row {
    let bytes = outcome.delivered * SMALL as u64;
    reference_row(system, SMALL, outcome, bytes, note)
}

/// The row of a reference measurement: one writer or reader, `outcome.delivered` operations of
/// `size` bytes, `bytes` in all.
fn reference_row(
    system: &str,
    size: usize,
    outcome: &Outcome,
    bytes: u64,
    note: &'static str,
) -> Row {
    let ops = outcome.delivered;
    let counts = Counts {
        producers: 1,
        consumers: 0,
        published: ops,
        expected: ops,
    };
    row(
        "reference",
        system.to_string(),
        size,
        counts,
        outcome,
        bytes,
        Some(note),
    )
}

/// Writes `bytes` to a new file at `path` in 1 MiB writes, then syncs it.
fn raw_write(path: &Path, bytes: u64) -> Result<Pass> {
    let chunk = vec![0x5a_u8; CHUNK];
    let mut file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let ((ops, cached, wall), cpu) = cpu_time(|| {
        let start = Instant::now();
        let mut ops = 0;
        for len in chunks(bytes, CHUNK as u64) {
            file.write_all(chunk.get(..len as usize).unwrap_or(&chunk))?;
            ops += 1;
        }
        let cached = start.elapsed();
        file.sync_all()?;
        Ok((ops, cached, start.elapsed()))
    })
    .with_context(|| format!("writing {}", path.display()))?;
    let mut outcome = Outcome::without_latency(ops, None, wall)?;
    outcome.cpu = cpu;
    Ok(Pass {
        outcome,
        bytes,
        cached,
    })
}

/// Reads the file at `path` in 1 MiB reads.
fn raw_read(path: &Path) -> Result<Pass> {
    let mut buf = vec![0_u8; CHUNK];
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let ((ops, bytes, wall), cpu) = cpu_time(|| {
        let start = Instant::now();
        let (mut ops, mut bytes) = (0, 0);
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            ops += 1;
            bytes += n as u64;
        }
        Ok((ops, bytes, start.elapsed()))
    })
    .with_context(|| format!("reading {}", path.display()))?;
    let mut outcome = Outcome::without_latency(ops, None, wall)?;
    outcome.cpu = cpu;
    Ok(Pass {
        outcome,
        bytes,
        cached: wall,
    })
}

/// Appends 100 B at a time to a new file for `run_for`, with `sync_data` after each write if
/// `fsync`; median of `--repeat` runs by rate.
fn small_writes(bench: &Bench, dir: &Path, run_for: Duration, fsync: bool) -> Result<Outcome> {
    let path = dir.join(if fsync { "fsync" } else { "pwrite" });
    bench.repeated(
        |_| {
            let file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            let buf = [0x5a_u8; SMALL];
            let mut pos = 0;
            let (tally, cpu) = cpu_time(|| {
                OpTally::run_until(Instant::now() + run_for, || {
                    file.write_all_at(&buf, pos)?;
                    pos += SMALL as u64;
                    if fsync {
                        file.sync_data()?;
                    }
                    Ok(())
                })
            })
            .with_context(|| format!("writing {}", path.display()))?;
            let mut outcome = Outcome::from_ops(vec![tally])?;
            outcome.cpu = cpu;
            Ok(outcome)
        },
        Outcome::msgs_per_s,
    )
}
