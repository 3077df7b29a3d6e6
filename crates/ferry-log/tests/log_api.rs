//! Behaviour of the public API: appends and reads across segments, limits, rolling, compression,
//! the time index, retention, truncation, durability and group commit.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ferry_log::{Compression, Durability, Log, LogConfig, LogError, RecordIn, RetentionPolicy};

#[test]
fn log_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Log>();
}

#[test]
fn append_and_read_across_segments_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    assert_eq!((log.start_offset(), log.next_offset()), (0, 0));
    append_range(&log, 0, 300, 4);
    assert_eq!(log.next_offset(), 300);
    assert!(log.stats().segments > 3, "{:?}", log.stats());
    let all = read_all(&log);
    assert_eq!(all.len(), 300);
    all.iter()
        .enumerate()
        .for_each(|(i, r)| assert_record(r, i as u64));
    // Reads from the middle of a batch and of a segment, bounded by count.
    let some = log.read(137, 10, usize::MAX).unwrap();
    assert_eq!(some.len(), 10);
    some.iter()
        .zip(137..)
        .for_each(|(r, n)| assert_record(r, n));
    drop(log);
    let log = Log::open(dir.path(), small_config()).unwrap();
    assert_eq!(log.next_offset(), 300);
    let all = read_all(&log);
    all.iter()
        .enumerate()
        .for_each(|(i, r)| assert_record(r, i as u64));
    append_range(&log, 300, 310, 3);
    assert_record(&log.read(305, 1, 0).unwrap()[0], 305);
}

#[test]
fn read_limits_and_range() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    append_range(&log, 0, 20, 5);
    assert!(log.read(20, 10, 1000).unwrap().is_empty());
    assert!(log.read(0, 0, 1000).unwrap().is_empty());
    assert!(matches!(
        log.read(21, 1, 1),
        Err(LogError::OffsetOutOfRange {
            offset: 21,
            start: 0,
            end: 20
        })
    ));
    // max_bytes = 0 still returns the first record; then stops before exceeding the budget.
    assert_eq!(log.read(3, 10, 0).unwrap().len(), 1);
    let budget: usize = log
        .read(0, 4, usize::MAX)
        .unwrap()
        .iter()
        .map(|r| r.size())
        .sum();
    let got = log.read(0, 100, budget).unwrap();
    assert_eq!(got.len(), 4);
    assert_eq!(log.read(0, 100, budget - 1).unwrap().len(), 3);
}

#[test]
fn empty_and_too_large_batches_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        max_batch_bytes: 1024,
        ..small_config()
    };
    let log = Log::open(dir.path(), config).unwrap();
    assert!(matches!(log.append(&[]), Err(LogError::EmptyBatch)));
    let big = RecordIn::new(vec![1u8; 2000]);
    assert!(matches!(
        log.append(&[big]),
        Err(LogError::RecordTooLarge { max: 1024, .. })
    ));
    assert_eq!(log.next_offset(), 0);
    append_range(&log, 0, 1, 1);
}

#[test]
fn segments_roll_by_size() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config();
    let log = Log::open(dir.path(), config.clone()).unwrap();
    append_range(&log, 0, 200, 3);
    let logs = files(dir.path(), "log");
    assert_eq!(logs.len(), log.stats().segments);
    assert_eq!(log.stats().segments_rolled as usize, logs.len() - 1);
    for f in &logs {
        assert!(std::fs::metadata(f).unwrap().len() <= config.segment_bytes);
    }
    // Files are named by base offset; the first is 0.
    assert!(logs[0].ends_with("00000000000000000000.log"));
    assert_eq!(files(dir.path(), "index").len(), logs.len());
    assert_eq!(files(dir.path(), "timeindex").len(), logs.len());
}

#[test]
fn a_batch_larger_than_a_segment_gets_a_segment_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    append_range(&log, 0, 2, 1);
    log.append(&[RecordIn::new(vec![9u8; 5000])]).unwrap();
    append_range(&log, 3, 4, 1);
    assert_eq!(log.stats().segments, 3);
    assert_eq!(log.read(2, 1, 0).unwrap()[0].payload.len(), 5000);
}

#[test]
fn segments_roll_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_max_age: Some(Duration::from_millis(60)),
        ..small_config()
    };
    let log = Log::open(dir.path(), config).unwrap();
    append_range(&log, 0, 1, 1);
    append_range(&log, 1, 2, 1);
    assert_eq!(log.stats().segments, 1);
    std::thread::sleep(Duration::from_millis(100));
    append_range(&log, 2, 3, 1);
    assert_eq!(log.stats().segments, 2);
    append_range(&log, 3, 4, 1);
    assert_eq!(log.stats().segments, 2);
    read_all(&log)
        .iter()
        .enumerate()
        .for_each(|(i, r)| assert_record(r, i as u64));
}

#[test]
fn lz4_batches_round_trip_and_are_smaller() {
    let size_with = |compression| {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            compression,
            ..small_config()
        };
        let log = Log::open(dir.path(), config.clone()).unwrap();
        let text = "the quick brown fox jumps over the lazy dog ".repeat(8);
        let batch: Vec<RecordIn> = (0..10)
            .map(|i| RecordIn::new(format!("{i} {text}")).with_timestamp(i))
            .collect();
        for _ in 0..5 {
            log.append(&batch).unwrap();
        }
        drop(log);
        let log = Log::open(dir.path(), config).unwrap();
        let all = read_all(&log);
        assert_eq!(all.len(), 50);
        for (i, r) in all.iter().enumerate() {
            assert_eq!(r.payload, format!("{} {text}", i % 10).as_bytes());
            assert_eq!(r.timestamp, (i % 10) as u64);
        }
        log.stats().size_bytes
    };
    let plain = size_with(Compression::None);
    let packed = size_with(Compression::Lz4);
    assert!(packed * 3 < plain, "lz4 {packed} vs none {plain}");
}

/// First offset with timestamp >= t, by brute force.
fn brute_force(timestamps: &[u64], start: u64, t: u64) -> Option<u64> {
    timestamps
        .iter()
        .position(|&ts| ts >= t)
        .map(|i| i as u64 + start)
}

#[test]
fn offset_for_timestamp_matches_a_scan() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    let mut rng = Rng(7);
    // Mostly increasing timestamps with jitter, including going backwards.
    let mut timestamps = Vec::new();
    let mut clock = 10_000u64;
    while timestamps.len() < 400 {
        let n = rng.range(1, 6);
        let batch: Vec<RecordIn> = (0..n)
            .map(|_| {
                clock += rng.range(0, 20);
                let ts = clock - rng.range(0, 50);
                timestamps.push(ts);
                RecordIn::new(vec![0u8; rng.range(0, 60) as usize]).with_timestamp(ts)
            })
            .collect();
        log.append(&batch).unwrap();
    }
    let check = |log: &Log| {
        for t in (9_900..clock + 30).step_by(7) {
            assert_eq!(
                log.offset_for_timestamp(t).unwrap(),
                brute_force(&timestamps, 0, t),
                "t = {t}"
            );
        }
    };
    check(&log);
    drop(log);
    // Without index files: rebuilt on open, same answers.
    for f in files(dir.path(), "timeindex")
        .into_iter()
        .chain(files(dir.path(), "index"))
    {
        std::fs::remove_file(f).unwrap();
    }
    let log = Log::open(dir.path(), small_config()).unwrap();
    check(&log);
}

#[test]
fn retention_by_record_count_deletes_whole_segments() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        retention: RetentionPolicy {
            max_records: Some(100),
            ..RetentionPolicy::default()
        },
        ..small_config()
    };
    let log = Log::open(dir.path(), config.clone()).unwrap();
    append_range(&log, 0, 300, 5);
    let before = log.stats().segments;
    let deleted = log.apply_retention().unwrap();
    assert!(deleted > 0);
    assert_eq!(log.stats().segments as u64, before as u64 - deleted);
    let start = log.start_offset();
    // At least the 100 asked for, at most one segment more.
    assert!(
        start > 0 && 300 - start >= 100 && 300 - start <= 100 + 40,
        "start {start}"
    );
    // The start is a segment boundary: a file is named after it.
    assert!(dir.path().join(format!("{start:020}.log")).exists());
    assert!(matches!(
        log.read(start - 1, 1, 1),
        Err(LogError::OffsetOutOfRange { .. })
    ));
    assert!(matches!(
        log.read(0, 1, 1),
        Err(LogError::OffsetOutOfRange { .. })
    ));
    read_all(&log)
        .iter()
        .zip(start..)
        .for_each(|(r, n)| assert_record(r, n));
    // Nothing more to delete; the start survives a reopen.
    assert_eq!(log.apply_retention().unwrap(), 0);
    drop(log);
    let log = Log::open(dir.path(), config).unwrap();
    assert_eq!((log.start_offset(), log.next_offset()), (start, 300));
}

#[test]
fn retention_by_size_and_age_keeps_the_active_segment() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        retention: RetentionPolicy {
            max_bytes: Some(5000),
            ..RetentionPolicy::default()
        },
        ..small_config()
    };
    let log = Log::open(dir.path(), config).unwrap();
    append_range(&log, 0, 300, 5);
    log.apply_retention().unwrap();
    // A floor: at least 5000 bytes stay, and no more than one segment beyond.
    let size = log.stats().size_bytes;
    assert!((5000..5000 + 4096).contains(&size), "{:?}", log.stats());
    let start = log.start_offset();
    assert!(start > 0);
    drop(log);
    // Record timestamps are 1000 + n ms after the epoch: older than an hour.
    let config = LogConfig {
        retention: RetentionPolicy {
            max_age: Some(Duration::from_secs(3600)),
            ..RetentionPolicy::default()
        },
        ..small_config()
    };
    let log = Log::open(dir.path(), config).unwrap();
    log.apply_retention().unwrap();
    let stats = log.stats();
    assert_eq!(stats.segments, 1);
    assert!(log.start_offset() > start);
    assert_eq!(log.next_offset(), 300);
    // A segment's age is that of its newest record: one fresh record keeps it.
    let old_start = log.start_offset();
    log.append(&[RecordIn::new("now")]).unwrap();
    log.append(&[RecordIn::new(vec![0u8; 3000])]).unwrap(); // rolls
    assert_eq!(log.stats().segments, 2);
    assert_eq!(log.apply_retention().unwrap(), 0);
    assert_eq!(log.start_offset(), old_start);
    assert_eq!(log.read(300, 1, 0).unwrap()[0].payload, "now".as_bytes());
}

#[test]
fn truncate_after_cuts_batches_and_segments() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    append_range(&log, 0, 200, 5);
    let segments = log.stats().segments;
    log.truncate_after(117).unwrap(); // in the middle of a batch, several segments back
    assert_eq!(log.next_offset(), 118);
    assert!(log.stats().segments < segments);
    let all = read_all(&log);
    assert_eq!(all.len(), 118);
    all.iter()
        .enumerate()
        .for_each(|(i, r)| assert_record(r, i as u64));
    append_range(&log, 118, 130, 4);
    drop(log);
    let log = Log::open(dir.path(), small_config()).unwrap();
    read_all(&log)
        .iter()
        .enumerate()
        .for_each(|(i, r)| assert_record(r, i as u64));
    assert_eq!(log.offset_for_timestamp(1000 + 120).unwrap(), Some(120));
    // Past the end: no-op; to the start: empty; below the start: error.
    log.truncate_after(500).unwrap();
    assert_eq!(log.next_offset(), 130);
    log.truncate_to(0).unwrap();
    assert_eq!((log.start_offset(), log.next_offset()), (0, 0));
    assert!(read_all(&log).is_empty());
    assert_eq!(log.offset_for_timestamp(0).unwrap(), None);
    append_range(&log, 0, 3, 3);
}

#[test]
fn cache_serves_tail_reads() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        cache_bytes: 1 << 20,
        ..small_config()
    };
    let log = Log::open(dir.path(), config).unwrap();
    append_range(&log, 0, 50, 5);
    let all = read_all(&log);
    all.iter()
        .enumerate()
        .for_each(|(i, r)| assert_record(r, i as u64));
    let stats = log.stats();
    assert_eq!((stats.cache_hits, stats.cache_misses), (10, 0));
    // A small cache keeps only the newest batches; older ones come from disk.
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        cache_bytes: 600,
        ..small_config()
    };
    let log = Log::open(dir.path(), config).unwrap();
    append_range(&log, 0, 50, 5);
    read_all(&log)
        .iter()
        .enumerate()
        .for_each(|(i, r)| assert_record(r, i as u64));
    let stats = log.stats();
    assert!(stats.cache_hits > 0 && stats.cache_misses > 0, "{stats:?}");
    // Truncation drops cached batches past the cut.
    log.truncate_after(42).unwrap();
    append_range(&log, 43, 50, 7);
    read_all(&log)
        .iter()
        .enumerate()
        .for_each(|(i, r)| assert_record(r, i as u64));
}

#[test]
fn group_commit_shares_fsyncs_between_concurrent_appenders() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        durability: Durability::Always,
        segment_bytes: 64 << 10,
        ..small_config()
    };
    let log = Arc::new(Log::open(dir.path(), config).unwrap());
    let threads = 8;
    let per_thread = 40;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                (0..per_thread)
                    .map(|i| {
                        let r = RecordIn::new(format!("{t}-{i}"));
                        log.append(&[r.clone(), r]).unwrap()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut infos: Vec<_> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    infos.sort_by_key(|i| i.base_offset);
    for (k, info) in infos.iter().enumerate() {
        assert_eq!(
            (info.base_offset, info.last_offset),
            (2 * k as u64, 2 * k as u64 + 1)
        );
    }
    let stats = log.stats();
    assert_eq!(stats.appends, threads * per_thread);
    assert!(
        stats.fsyncs < stats.appends,
        "{} fsyncs for {} appends",
        stats.fsyncs,
        stats.appends
    );
    // Each batch's two records are contiguous and identical.
    let all = read_all(&log);
    assert_eq!(all.len() as u64, 2 * threads * per_thread);
    for pair in all.chunks(2) {
        assert_eq!(pair[0].payload, pair[1].payload);
    }
}

#[test]
fn interval_durability_syncs_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        durability: Durability::Interval(Duration::from_millis(10)),
        ..small_config()
    };
    let log = Log::open(dir.path(), config).unwrap();
    append_range(&log, 0, 10, 2);
    assert_eq!(log.stats().fsyncs, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while log.stats().fsyncs == 0 {
        assert!(std::time::Instant::now() < deadline, "no background sync");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Idle: no more fsyncs.
    let synced = log.stats().fsyncs;
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(log.stats().fsyncs, synced);
}

#[test]
fn readers_run_alongside_appenders() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        cache_bytes: 2048,
        ..small_config()
    };
    let log = Arc::new(Log::open(dir.path(), config).unwrap());
    let writer = {
        let log = Arc::clone(&log);
        std::thread::spawn(move || append_range(&log, 0, 600, 3))
    };
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut next = 0;
                while next < 600 {
                    for r in log.read(next, 50, usize::MAX).unwrap() {
                        assert_record(&r, next);
                        next += 1;
                    }
                }
            })
        })
        .collect();
    writer.join().unwrap();
    readers.into_iter().for_each(|r| r.join().unwrap());
}

#[test]
fn one_log_per_directory_and_closed_logs_refuse_work() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    assert!(matches!(
        Log::open(dir.path(), small_config()),
        Err(LogError::AlreadyOpen(_))
    ));
    append_range(&log, 0, 3, 3);
    log.close().unwrap();
    assert!(matches!(
        log.append(&[RecordIn::new("x")]),
        Err(LogError::Closed)
    ));
    assert!(matches!(log.read(0, 1, 1), Err(LogError::Closed)));
    drop(log);
    let log = Log::open(dir.path(), small_config()).unwrap();
    assert_eq!(log.next_offset(), 3);
}

#[test]
fn invalid_configs_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    for config in [
        LogConfig {
            segment_bytes: 10,
            ..LogConfig::default()
        },
        LogConfig {
            index_interval_bytes: 0,
            ..LogConfig::default()
        },
        LogConfig {
            max_batch_bytes: u32::MAX,
            ..LogConfig::default()
        },
        LogConfig {
            durability: Durability::Interval(Duration::ZERO),
            ..LogConfig::default()
        },
    ] {
        assert!(matches!(
            Log::open(dir.path(), config),
            Err(LogError::InvalidConfig(_))
        ));
    }
}

/// Durability `Always`: batches appended between two syncs are written to the file together,
/// at the sync (or at a read, which sees them all); `Never` writes each append at once.
#[test]
fn always_gathers_the_batches_between_syncs_into_one_write() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        durability: Durability::Always,
        segment_bytes: 1 << 20,
        ..small_config()
    };
    let log = Log::open(dir.path(), config.clone()).unwrap();
    for n in 0..100 {
        log.append_buffered(&[record(n)]).unwrap();
    }
    log.sync().unwrap();
    let stats = log.stats();
    assert_eq!((stats.appends, stats.batch_writes), (100, 1), "{stats:?}");
    // A read sees batches appended since, writing them first.
    log.append_buffered(&[record(100)]).unwrap();
    assert_record(&log.read(100, 1, usize::MAX).unwrap()[0], 100);
    assert_eq!(log.stats().batch_writes, 2);
    // So does every other look at the log.
    log.append_buffered(&[record(101)]).unwrap();
    assert_eq!(log.next_offset(), 102);
    // Rolling writes what was gathered into the segment it belongs to.
    let big = vec![b'x'; 600 << 10];
    for n in 102..104 {
        log.append_buffered(&[RecordIn::new(big.clone()).with_timestamp(1000 + n)])
            .unwrap();
    }
    log.sync().unwrap();
    assert!(log.stats().segments >= 2);
    // Dropping the log syncs what was gathered.
    log.append_buffered(&[record(104)]).unwrap();
    drop(log);
    let log = Log::open(dir.path(), config).unwrap();
    assert_eq!(log.next_offset(), 105);
    let all = read_all(&log);
    for r in all.iter().filter(|r| r.offset < 102 || r.offset == 104) {
        assert_record(r, r.offset);
    }
    assert_eq!(all[102].payload.len(), 600 << 10);

    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    for n in 0..10 {
        log.append_buffered(&[record(n)]).unwrap();
    }
    assert_eq!(
        log.stats().batch_writes,
        10,
        "durability never writes at once"
    );
}

/// Concurrent `append`s with durability `Always` share writes as they share fsyncs, and every
/// acknowledged record is read back in order.
#[test]
fn concurrent_always_appends_share_writes() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        durability: Durability::Always,
        ..small_config()
    };
    let log = Arc::new(Log::open(dir.path(), config).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                for i in 0..200 {
                    log.append(&[RecordIn::new(format!("{t}:{i}"))]).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stats = log.stats();
    assert_eq!(stats.appends, 800);
    assert!(
        stats.batch_writes <= stats.fsyncs + stats.segments_rolled,
        "{stats:?}"
    );
    let all = read_all(&log);
    assert_eq!(all.len(), 800);
    let mut next = [0u32; 4];
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r.offset, i as u64);
        let text = std::str::from_utf8(&r.payload).unwrap();
        let (t, n) = text.split_once(':').unwrap();
        let t: usize = t.parse().unwrap();
        assert_eq!(n.parse::<u32>().unwrap(), next[t], "per-thread order");
        next[t] += 1;
    }
}
