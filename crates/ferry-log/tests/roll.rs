//! Rolls do no fsync under the writer lock: the sealed segment is synced by the next sync,
//! before the active one, and the segment created by the roll carries a flag in its header
//! (`prev_unsynced`) until then. Recovery treats a torn tail of a sealed segment as a torn
//! write only while the segment after it is still flagged, i.e. when no sync covered the roll:
//! then nothing after the tear was acknowledged. Real damage (a sealed segment whose successor
//! is not flagged, or damage with valid batches after it) is reported as before.
//!
//! The crash-style tests copy the files of an open log (what the page cache holds) and cut
//! them as a machine crash could: anywhere after what the last sync made durable.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use ferry_log::{Durability, Log, LogConfig, LogError};

/// Small segments; syncs only when asked (the flusher's interval is far away), so that the
/// test decides what is durable.
fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        index_interval_bytes: 256,
        durability: Durability::Interval(Duration::from_secs(3600)),
        cache_bytes: 0,
        ..LogConfig::default()
    }
}

/// Whether the header of segment file `path` has the `prev_unsynced` flag (bit 0 of the
/// flags at byte 10).
fn flagged(path: &Path) -> bool {
    let bytes = std::fs::read(path).unwrap();
    bytes[10] & 1 == 1
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// `(position, base offset, length)` of the batches of segment file `path`.
fn batches(path: &Path) -> Vec<(u64, u64, u64)> {
    let bytes = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut pos = 32usize;
    while pos + 43 <= bytes.len() {
        let len = 4 + u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        if len < 43 || pos + len > bytes.len() {
            break;
        }
        let base = u64::from_le_bytes(bytes[pos + 11..pos + 19].try_into().unwrap());
        out.push((pos as u64, base, len as u64));
        pos += len;
    }
    out
}

#[test]
fn a_roll_syncs_nothing_and_the_next_sync_syncs_the_sealed_segment_first() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), config()).unwrap();
    append_range(&log, 0, 200, 3);
    let stats = log.stats();
    assert!(stats.segments_rolled >= 3, "{stats:?}");
    // No fsync so far: the rolls did none.
    assert_eq!(stats.fsyncs, 0, "{stats:?}");
    let logs = files(dir.path(), "log");
    assert!(!flagged(&logs[0]));
    assert!(
        logs[1..].iter().all(|p| flagged(p)),
        "every rolled-to segment is flagged"
    );
    log.sync().unwrap();
    // The sync synced every sealed segment, the active one and the directory, and cleared
    // every flag.
    assert!(
        log.stats().fsyncs > stats.segments_rolled,
        "{:?}",
        log.stats()
    );
    assert!(logs.iter().all(|p| !flagged(p)));
    // A roll after it flags only the new segment.
    let before = log.stats().segments_rolled;
    let mut n = 200;
    while log.stats().segments_rolled == before {
        append_range(&log, n, n + 1, 1);
        n += 1;
    }
    let logs = files(dir.path(), "log");
    let (last, older) = logs.split_last().unwrap();
    assert!(flagged(last));
    assert!(older.iter().all(|p| !flagged(p)));
    drop(log);
    // Closing synced: nothing flagged, and the log reopens whole.
    assert!(files(dir.path(), "log").iter().all(|p| !flagged(p)));
    let log = Log::open(dir.path(), config()).unwrap();
    assert_eq!(log.recovery_notes(), Vec::<String>::new());
    let all = read_all(&log);
    assert_eq!(all.len() as u64, n);
    for (i, r) in all.iter().enumerate() {
        assert_record(r, i as u64);
    }
}

/// A log whose records `0..acked` were synced (acknowledged), and `acked..end` appended after
/// without a sync, across a roll: returns a copy of its files as the page cache held them,
/// the sealed-but-unsynced segment's path and the durable length of that file.
struct Unsynced {
    _tmp: tempfile::TempDir,
    copy: PathBuf,
    acked: u64,
    end: u64,
    /// The sealed segment that was not synced, and how much of it is durable.
    sealed: PathBuf,
    durable_len: u64,
}

fn unsynced_log() -> Unsynced {
    let tmp = tempfile::tempdir().unwrap();
    let live = tmp.path().join("live");
    let log = Log::open(&live, config()).unwrap();
    append_range(&log, 0, 100, 2);
    log.sync().unwrap();
    let acked = log.next_offset();
    let synced_bases = log.segment_bases();
    let active_base = *synced_bases.last().unwrap();
    let sealed = files(&live, "log")
        .into_iter()
        .find(|p| {
            p.file_stem()
                .unwrap()
                .to_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
                == active_base
        })
        .unwrap();
    // What the sync made durable of the (then active) segment: its batches up to `acked`.
    let durable_len = batches(&sealed)
        .iter()
        .filter(|b| b.1 < acked)
        .map(|b| b.0 + b.2)
        .max()
        .unwrap_or(32);
    // Appended after the sync, over two rolls, never synced.
    let mut end = acked;
    while log.segment_bases().len() < synced_bases.len() + 2 {
        append_range(&log, end, end + 2, 2);
        end += 2;
    }
    append_range(&log, end, end + 3, 1);
    end += 3;
    let copy = tmp.path().join("copy");
    copy_dir(&live, &copy);
    drop(log);
    let sealed = copy.join(sealed.file_name().unwrap());
    assert!(flagged(&files(&copy, "log")[synced_bases.len()]));
    Unsynced {
        _tmp: tmp,
        copy,
        acked,
        end,
        sealed,
        durable_len,
    }
}

/// Opens `dir` and checks that every acknowledged record is there, intact, and that appends
/// go on at the end it reports, which is not below `acked`; returns that end.
fn check_acked(dir: &Path, acked: u64) -> (u64, Vec<String>) {
    let log = Log::open(dir, config()).unwrap_or_else(|e| panic!("does not open: {e}"));
    let notes = log.recovery_notes();
    let all = read_all(&log);
    let end = log.next_offset();
    assert!(
        end >= acked,
        "end {end} below the acknowledged {acked}: {notes:?}"
    );
    assert_eq!(all.len() as u64, end);
    for (i, r) in all.iter().enumerate() {
        assert_record(r, i as u64);
    }
    append_range(&log, end, end + 2, 1);
    log.sync().unwrap();
    drop(log);
    // And again, with nothing to recover.
    let log = Log::open(dir, config()).unwrap();
    assert_eq!(log.next_offset(), end + 2);
    assert_eq!(read_all(&log).len() as u64, end + 2);
    (end, notes)
}

#[test]
fn a_crash_after_a_roll_before_its_sync_loses_nothing_acknowledged() {
    let u = unsynced_log();
    // As the page cache had it (a process crash): everything is there.
    let whole = u._tmp.path().join("whole");
    copy_dir(&u.copy, &whole);
    let (end, notes) = check_acked(&whole, u.acked);
    assert_eq!(end, u.end, "{notes:?}");

    // A machine crash: the sealed segment cut anywhere after its durable part (mid-batch or
    // at a batch boundary), the segments after it whole, cut, zeroed or missing.
    let sealed_len = std::fs::metadata(&u.sealed).unwrap().len();
    let mut cuts: Vec<u64> = batches(&u.sealed)
        .iter()
        .flat_map(|b| [b.0, b.0 + b.2 / 2])
        .filter(|&p| p >= u.durable_len)
        .collect();
    cuts.push(sealed_len - 1);
    let mut cases = 0;
    for (i, &cut) in cuts.iter().enumerate() {
        for later in ["whole", "zeroed", "missing"] {
            let dir = u._tmp.path().join(format!("cut-{i}-{later}"));
            copy_dir(&u.copy, &dir);
            let sealed = dir.join(u.sealed.file_name().unwrap());
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&sealed)
                .unwrap();
            f.set_len(cut).unwrap();
            drop(f);
            for p in files(&dir, "log").into_iter().filter(|p| *p > sealed) {
                match later {
                    "zeroed" => {
                        let len = std::fs::metadata(&p).unwrap().len();
                        std::fs::write(&p, vec![0u8; len as usize]).unwrap();
                    }
                    "missing" => std::fs::remove_file(&p).unwrap(),
                    _ => {}
                }
            }
            let (end, notes) = check_acked(&dir, u.acked);
            assert!(end <= u.end);
            // Unless the crash itself left nothing to cut (the files after it gone, the cut at
            // a batch boundary), what recovery cut is in its notes.
            if later != "missing" {
                assert!(
                    notes
                        .iter()
                        .any(|n| n.contains("cut") || n.contains("torn")),
                    "cut at {cut}, later {later}: {notes:?}"
                );
            }
            std::fs::remove_dir_all(&dir).unwrap();
            cases += 1;
        }
    }
    assert!(cases >= 12, "{cases}");
}

#[test]
fn damage_in_a_synced_sealed_segment_is_still_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    {
        let log = Log::open(dir, config()).unwrap();
        append_range(&log, 0, 200, 2);
        log.sync().unwrap();
    }
    let logs = files(dir, "log");
    assert!(logs.iter().all(|p| !flagged(p)));
    // The last batch of a sealed segment damaged: as before, corruption (a synced sealed
    // segment cannot be torn), never a cut.
    let victim = &logs[logs.len() - 2];
    let last = *batches(victim).last().unwrap();
    let mut bytes = std::fs::read(victim).unwrap();
    bytes[(last.0 + last.2 - 2) as usize] ^= 0xff;
    std::fs::write(victim, &bytes).unwrap();
    match Log::open(dir, config()) {
        Err(LogError::Corrupt { segment, .. }) => assert_eq!(&segment, victim),
        other => panic!("expected Corrupt in {}, got {other:?}", victim.display()),
    }
    // Tolerated: reported, and nothing after it is removed.
    let log = Log::open(
        dir,
        LogConfig {
            tolerate_damage: true,
            ..config()
        },
    )
    .unwrap();
    assert_eq!(log.next_offset(), 200);
    let notes = log.recovery_notes();
    assert!(
        notes.len() == 1 && notes[0].contains("damaged segment"),
        "{notes:?}"
    );
}

#[test]
fn damage_in_the_middle_of_an_unsynced_sealed_segment_is_damage_not_a_tear() {
    let u = unsynced_log();
    // A byte flipped in a batch with valid batches after it, in the unsynced sealed segment.
    let bs = batches(&u.sealed);
    let victim = bs.iter().find(|b| b.0 >= u.durable_len).copied().unwrap();
    assert!(bs.last().unwrap().0 > victim.0, "valid batches follow");
    let mut bytes = std::fs::read(&u.sealed).unwrap();
    bytes[(victim.0 + victim.2 - 2) as usize] ^= 0xff;
    std::fs::write(&u.sealed, &bytes).unwrap();
    // Not a torn tail: nothing is cut or removed (a sealed segment is checked cheaply when the
    // log opens, as before; the read that meets the damage reports it).
    let log = Log::open(&u.copy, config()).unwrap();
    assert_eq!(log.next_offset(), u.end, "{:?}", log.recovery_notes());
    match log.read(0, usize::MAX, usize::MAX) {
        Err(LogError::Corrupt {
            segment, position, ..
        }) => {
            assert_eq!((segment, position), (u.sealed.clone(), victim.0));
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // The records after the damage are there.
    let after = log.read(victim.1 + 2, usize::MAX, usize::MAX).unwrap();
    assert_eq!(after.last().map(|r| r.offset), Some(u.end - 1));
}
