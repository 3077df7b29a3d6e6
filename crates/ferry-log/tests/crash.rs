//! Crash test with a real process: a child (this test executable re-invoked with an environment
//! variable) appends numbered records with `Durability::Always` and prints each acknowledged
//! offset; the parent SIGKILLs it at a random moment, reopens the log and checks that every
//! acknowledged record is there exactly once, in order and intact, with nothing but at most the
//! one in-flight batch beyond. The next cycle goes on appending to the same log.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use ferry_log::{Durability, Log, LogConfig, RecordIn};

/// Set in the child: the log directory.
const CHILD_ENV: &str = "FERRY_LOG_CRASH_CHILD_DIR";
/// Largest batch the child appends.
const MAX_BATCH: u64 = 5;
const CYCLES: usize = 50;

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 16 << 10,
        index_interval_bytes: 512,
        durability: Durability::Always,
        cache_bytes: 0,
        ..LogConfig::default()
    }
}

/// The child's body; a no-op in a normal test run.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let log = Log::open(&dir, config()).unwrap();
    // Straight to the file descriptor: not captured by the test harness.
    let mut out = std::io::stdout().lock();
    let mut n = log.next_offset();
    writeln!(out, "READY {n}").unwrap();
    out.flush().unwrap();
    let mut rng = Rng(u64::from(std::process::id()) | 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let k = rng.range(1, MAX_BATCH + 1);
        let records: Vec<RecordIn> = (n..n + k).map(record).collect();
        let at = log.append(&records).unwrap();
        assert_eq!(at.base_offset, n);
        n += k;
        writeln!(out, "ACK {}", at.last_offset).unwrap();
        out.flush().unwrap();
    }
}

/// Runs one child until killed after `delay` from its READY line; returns the offset it
/// reported ready at and the last acknowledged offset.
fn run_child(dir: &std::path::Path, delay: Duration) -> (u64, Option<u64>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let ready = loop {
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        // The harness may have written "test crash_child ... " on the same line.
        if let Some((_, n)) = line.split_once("READY ") {
            break n.parse::<u64>().unwrap();
        }
    };
    std::thread::sleep(delay);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap();
    let acked = rx
        .try_iter()
        .filter_map(|line| line.strip_prefix("ACK ").map(|n| n.parse::<u64>().unwrap()))
        .max();
    (ready, acked)
}

#[test]
fn killed_writer_loses_no_acknowledged_record() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x5eed);
    let mut next = 0u64; // end of the log as verified after the previous cycle
    let mut total_acked = 0;
    for cycle in 0..CYCLES {
        let delay = Duration::from_millis(rng.range(5, 50));
        let (ready, acked) = run_child(dir.path(), delay);
        assert_eq!(
            ready, next,
            "cycle {cycle}: child started at the verified end"
        );
        let log = Log::open(dir.path(), config()).unwrap();
        let end = log.next_offset();
        let last_ack_end = acked.map_or(ready, |a| a + 1);
        assert!(end >= last_ack_end, "cycle {cycle}: lost acked records");
        assert!(
            end <= last_ack_end + MAX_BATCH,
            "cycle {cycle}: {end} records, acked up to {last_ack_end}"
        );
        let all = read_all(&log);
        assert_eq!(all.len() as u64, end);
        all.iter()
            .enumerate()
            .for_each(|(i, r)| assert_record(r, i as u64));
        total_acked += last_ack_end - ready;
        next = end;
    }
    assert!(
        total_acked >= CYCLES as u64,
        "only {total_acked} acked records"
    );
    let log = Log::open(dir.path(), config()).unwrap();
    assert!(log.stats().segments > 1, "no segment roll exercised");
}
