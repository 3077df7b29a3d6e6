//! Recovery from damaged files: torn tails are cut, damage in the middle is a typed error,
//! indexes are rebuilt.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use common::*;
use ferry_log::{decode_batches, Log, LogConfig, LogError, SEGMENT_HEADER_LEN};

/// One segment big enough for everything.
fn one_segment() -> LogConfig {
    LogConfig {
        segment_bytes: 1 << 20,
        ..small_config()
    }
}

/// `(position, length, base offset)` of every batch of a segment file.
fn batches(path: &Path) -> Vec<(u64, u64, u64)> {
    let bytes = fs::read(path).unwrap();
    let mut pos = SEGMENT_HEADER_LEN;
    decode_batches(&bytes[SEGMENT_HEADER_LEN as usize..])
        .map(|b| {
            let b = b.unwrap();
            let len = b.header.total_len();
            pos += len;
            (pos - len, len, b.header.base_offset)
        })
        .collect()
}

fn flip_byte(path: &Path, at: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[at as usize] ^= 0x5a;
    fs::write(path, bytes).unwrap();
}

/// A log of 20 batches of 3 records (offsets 0..60) in one segment; returns its `.log` path.
fn sixty_records(dir: &Path) -> PathBuf {
    let log = Log::open(dir, one_segment()).unwrap();
    append_range(&log, 0, 60, 3);
    drop(log);
    dir.join(format!("{:020}.log", 0))
}

fn assert_records(log: &Log, count: u64) {
    assert_eq!(log.next_offset(), count);
    let all = read_all(log);
    assert_eq!(all.len() as u64, count);
    all.iter()
        .enumerate()
        .for_each(|(i, r)| assert_record(r, i as u64));
}

fn assert_corrupt_at(result: Result<Log, LogError>, segment: &Path, at: u64) {
    match result {
        Err(LogError::Corrupt {
            segment: s,
            position,
            ..
        }) => {
            assert_eq!((s.as_path(), position), (segment, at));
        }
        other => panic!("expected Corrupt at {at}, got {other:?}"),
    }
}

#[test]
fn flipped_byte_in_the_last_batch_cuts_the_tail() {
    for delta in [0, 3, 5, 20, 40] {
        let dir = tempfile::tempdir().unwrap();
        let path = sixty_records(dir.path());
        let (pos, len, _) = *batches(&path).last().unwrap();
        flip_byte(&path, pos + delta.min(len - 1));
        let log = Log::open(dir.path(), one_segment()).unwrap();
        assert_records(&log, 57);
        assert_eq!(fs::metadata(&path).unwrap().len(), pos);
        append_range(&log, 57, 63, 2);
        assert_records(&log, 63);
    }
}

#[test]
fn flipped_byte_in_a_middle_batch_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let path = sixty_records(dir.path());
    let pristine = fs::read(&path).unwrap();
    let (pos, len, _) = batches(&path)[10];
    // In the length field, the CRC, the header fields and the records.
    for delta in [0, 1, 4, 9, 12, 20, 30, 42, 43, len / 2, len - 1] {
        fs::write(&path, &pristine).unwrap();
        flip_byte(&path, pos + delta);
        assert_corrupt_at(Log::open(dir.path(), one_segment()), &path, pos);
    }
    // The error is not sticky: repaired data opens.
    fs::write(&path, &pristine).unwrap();
    assert_records(&Log::open(dir.path(), one_segment()).unwrap(), 60);
}

#[test]
fn a_valid_batch_with_the_wrong_offset_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let path = sixty_records(dir.path());
    let (pos, len, _) = batches(&path)[4];
    let bytes = fs::read(&path).unwrap();
    let copy = bytes[pos as usize..(pos + len) as usize].to_vec();
    OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(&copy)
        .unwrap();
    let end = bytes.len() as u64;
    assert_corrupt_at(Log::open(dir.path(), one_segment()), &path, end);
}

#[test]
fn truncation_at_any_point_recovers_the_whole_batches_before_it() {
    let src = tempfile::tempdir().unwrap();
    let path = sixty_records(src.path());
    let pristine = fs::read(&path).unwrap();
    let spans = batches(&path);
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join(path.file_name().unwrap());
    for cut in (0..=pristine.len()).step_by(5).chain([pristine.len() - 1]) {
        for f in fs::read_dir(dir.path()).unwrap() {
            fs::remove_file(f.unwrap().path()).unwrap();
        }
        fs::write(&copy, &pristine[..cut]).unwrap();
        let whole = spans
            .iter()
            .filter(|(pos, len, _)| pos + len <= cut as u64)
            .count() as u64;
        let log = Log::open(dir.path(), one_segment()).unwrap();
        assert_records(&log, whole * 3);
        // The log goes on from there.
        append_range(&log, whole * 3, whole * 3 + 1, 1);
    }
}

#[test]
fn zero_filled_tail_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let path = sixty_records(dir.path());
    let len = fs::metadata(&path).unwrap().len();
    OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(&[0u8; 4096])
        .unwrap();
    let log = Log::open(dir.path(), one_segment()).unwrap();
    assert_records(&log, 60);
    assert_eq!(fs::metadata(&path).unwrap().len(), len);
    append_range(&log, 60, 66, 3);
    drop(log);
    assert_records(&Log::open(dir.path(), one_segment()).unwrap(), 66);
}

/// A log of 300 records over many small segments.
fn many_segments(dir: &Path) -> Vec<PathBuf> {
    let log = Log::open(dir, small_config()).unwrap();
    append_range(&log, 0, 300, 3);
    drop(log);
    let logs = files(dir, "log");
    assert!(logs.len() > 5);
    logs
}

#[test]
fn deleted_or_damaged_indexes_are_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let logs = many_segments(dir.path());
    let index_of = |p: &Path, ext: &str| p.with_extension(ext);
    let original: Vec<Vec<u8>> = logs
        .iter()
        .map(|p| fs::read(index_of(p, "index")).unwrap())
        .collect();
    assert!(original.iter().all(|i| !i.is_empty()));
    // Deleted: every index of every segment.
    for p in &logs {
        fs::remove_file(index_of(p, "index")).unwrap();
        fs::remove_file(index_of(p, "timeindex")).unwrap();
    }
    let log = Log::open(dir.path(), small_config()).unwrap();
    assert_records(&log, 300);
    assert_eq!(log.offset_for_timestamp(1000 + 123).unwrap(), Some(123));
    drop(log);
    let rebuilt: Vec<Vec<u8>> = logs
        .iter()
        .map(|p| fs::read(index_of(p, "index")).unwrap())
        .collect();
    assert_eq!(rebuilt, original);
    // Damaged: a partial entry, entries out of order, an entry pointing mid-batch.
    fs::write(index_of(&logs[0], "index"), [1u8; 10]).unwrap();
    fs::write(index_of(&logs[1], "timeindex"), [0xffu8; 32]).unwrap();
    let mut bad = fs::read(index_of(&logs[2], "index")).unwrap();
    bad[8] = bad[8].wrapping_add(1);
    fs::write(index_of(&logs[2], "index"), bad).unwrap();
    let active = logs.last().unwrap();
    fs::write(index_of(active, "index"), [7u8; 48]).unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    assert_records(&log, 300);
    for n in [0, 5, 77, 150, 299] {
        assert_eq!(log.offset_for_timestamp(1000 + n).unwrap(), Some(n));
        assert_record(&log.read(n, 1, 0).unwrap()[0], n);
    }
    assert_eq!(log.offset_for_timestamp(1000 + 300).unwrap(), None);
}

#[test]
fn damage_in_a_sealed_segment_is_corruption() {
    // Near its end (checked at open).
    let dir = tempfile::tempdir().unwrap();
    let logs = many_segments(dir.path());
    let (pos, _, _) = *batches(&logs[1]).last().unwrap();
    flip_byte(&logs[1], pos + 30);
    assert_corrupt_at(Log::open(dir.path(), small_config()), &logs[1], pos);

    // At its start: found by the read that gets there, and by open once its index is gone.
    let dir = tempfile::tempdir().unwrap();
    let logs = many_segments(dir.path());
    let (pos, _, base) = batches(&logs[1])[0];
    flip_byte(&logs[1], pos + 30);
    let log = Log::open(dir.path(), small_config()).unwrap();
    assert_record(&log.read(base - 1, 1, 0).unwrap()[0], base - 1);
    match log.read(0, usize::MAX, usize::MAX) {
        Err(LogError::Corrupt {
            segment, position, ..
        }) => assert_eq!((segment.as_path(), position), (logs[1].as_path(), pos)),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    drop(log);
    fs::remove_file(logs[1].with_extension("index")).unwrap();
    assert_corrupt_at(Log::open(dir.path(), small_config()), &logs[1], pos);
}

#[test]
fn a_missing_middle_segment_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let logs = many_segments(dir.path());
    fs::remove_file(&logs[2]).unwrap();
    let err = Log::open(dir.path(), small_config()).unwrap_err();
    assert!(
        matches!(&err, LogError::Corrupt { segment, .. } if segment == &logs[1]),
        "{err:?}"
    );
}

#[test]
fn a_segment_torn_while_created_is_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let logs = many_segments(dir.path());
    let log = Log::open(dir.path(), small_config()).unwrap();
    let next = log.next_offset();
    drop(log);
    // The active segment's header was half written when the process died.
    let torn = dir.path().join(format!("{next:020}.log"));
    fs::write(&torn, b"FERRYL").unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    assert_records(&log, 300);
    assert_eq!(log.stats().segments, logs.len() + 1);
    append_range(&log, 300, 305, 5);
    assert_records(&log, 305);
}

#[test]
fn reads_report_corruption_that_appears_while_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = sixty_records(dir.path());
    let log = Log::open(dir.path(), one_segment()).unwrap();
    let (pos, _, base) = batches(&path)[7];
    flip_byte(&path, pos + 45);
    assert_eq!(log.read(0, 21, usize::MAX).unwrap().len(), 21);
    match log.read(base, 1, 0) {
        Err(LogError::Corrupt { position, .. }) => assert_eq!(position, pos),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn damage_is_told_from_a_torn_tail_across_a_big_batch() {
    // The bad batch is 1.5 MiB: the next valid batch is found past the first search window.
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes: 8 << 20,
        ..small_config()
    };
    let log = Log::open(dir.path(), config.clone()).unwrap();
    append_range(&log, 0, 3, 3);
    log.append(&[ferry_log::RecordIn::new(vec![3u8; 3 << 19])])
        .unwrap();
    append_range(&log, 4, 7, 3);
    drop(log);
    let path = dir.path().join(format!("{:020}.log", 0));
    let spans = batches(&path);
    let (pos, len, _) = spans[1];
    let pristine = fs::read(&path).unwrap();
    flip_byte(&path, pos + len - 10);
    assert_corrupt_at(Log::open(dir.path(), config.clone()), &path, pos);
    // Without the batch after it, the same damage is a torn tail.
    fs::write(&path, &pristine[..(pos + len) as usize]).unwrap();
    flip_byte(&path, pos + len - 10);
    let log = Log::open(dir.path(), config).unwrap();
    assert_records(&log, 3);
}

/// `tolerate_damage`, as a store opens its log.
fn tolerant() -> LogConfig {
    LogConfig {
        tolerate_damage: true,
        ..one_segment()
    }
}

#[test]
fn damage_in_the_middle_of_the_active_segment_is_quarantined_with_tolerate_damage() {
    let src = tempfile::tempdir().unwrap();
    let path = sixty_records(src.path());
    let pristine = fs::read(&path).unwrap();
    let (pos, len, base) = batches(&path)[10];
    assert_eq!(base, 30);
    // In the length field, the CRC, the header fields and the records.
    for delta in [0, 1, 4, 9, 12, 20, 30, 42, 43, len / 2, len - 1] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(path.file_name().unwrap());
        fs::write(&path, &pristine).unwrap();
        flip_byte(&path, pos + delta);
        let log = Log::open(dir.path(), tolerant()).unwrap();
        // Reported once, with the segment and the position of the damage.
        let notes = log.recovery_notes();
        assert_eq!(notes.len(), 1, "{delta}: {notes:?}");
        let at = format!("{} at position {pos}", path.display());
        assert!(notes[0].contains(&at), "{delta}: {notes:?}");
        assert!(
            notes[0].contains("log offsets 30..33 are lost"),
            "{notes:?}"
        );
        // Everything before and after the damaged batch is there; the batches after it were
        // moved to a new segment starting at their offset, where appends go on.
        let tail = dir.path().join(format!("{:020}.log", 33));
        assert_eq!(files(dir.path(), "log"), vec![path.clone(), tail.clone()]);
        assert_eq!(fs::metadata(&path).unwrap().len(), pos + len);
        let before = log.read(0, 30, usize::MAX).unwrap();
        (0..30).for_each(|n| assert_record(&before[n as usize], n));
        assert!(matches!(
            log.read(30, 1, 0),
            Err(LogError::Corrupt { position, .. }) if position == pos
        ));
        let after = log.read(33, usize::MAX, usize::MAX).unwrap();
        assert_eq!(after.len(), 27);
        after.iter().for_each(|r| assert_record(r, r.offset));
        assert_eq!(log.next_offset(), 60);
        append_range(&log, 60, 66, 3);
        drop(log);
        // Opening again finds the same: the damaged segment (now sealed) quarantined from the
        // damage on, the rest intact.
        for _ in 0..2 {
            let log = Log::open(dir.path(), tolerant()).unwrap();
            let notes = log.recovery_notes();
            assert!(
                notes.len() == 1 && notes[0].contains(&at) && notes[0].contains("skipped"),
                "{notes:?}"
            );
            assert_eq!(files(dir.path(), "log"), vec![path.clone(), tail.clone()]);
            assert_eq!(log.read(0, 30, usize::MAX).unwrap().len(), 30);
            let after = log.read(33, usize::MAX, usize::MAX).unwrap();
            assert_eq!(after.len(), 33);
            after.iter().for_each(|r| assert_record(r, r.offset));
        }
    }
}

#[test]
fn damage_in_several_places_of_the_active_segment_splits_it_each_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = sixty_records(dir.path());
    let spans = batches(&path);
    flip_byte(&path, spans[4].0 + 30);
    flip_byte(&path, spans[12].0 + 30);
    // And a torn tail: the last batch half written.
    let (last, last_len, _) = spans[19];
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..(last + last_len / 2) as usize]).unwrap();
    let log = Log::open(dir.path(), tolerant()).unwrap();
    let notes = log.recovery_notes();
    assert_eq!(notes.len(), 3, "{notes:?}");
    assert!(
        notes[0].contains("log offsets 12..15 are lost"),
        "{notes:?}"
    );
    assert!(
        notes[1].contains("log offsets 36..39 are lost"),
        "{notes:?}"
    );
    assert!(notes[2].contains("torn tail"), "{notes:?}");
    assert_eq!(files(dir.path(), "log").len(), 3);
    assert_eq!(log.next_offset(), 57);
    for (from, to) in [(0, 12), (15, 36), (39, 57)] {
        let got = log.read(from, (to - from) as usize, usize::MAX).unwrap();
        assert_eq!(got.len() as u64, to - from);
        got.iter().for_each(|r| assert_record(r, r.offset));
    }
    append_range(&log, 57, 60, 3);
}

#[test]
fn an_interrupted_split_starts_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = sixty_records(dir.path());
    let (pos, _, _) = batches(&path)[10];
    flip_byte(&path, pos + 30);
    // A copy of the tail that was never renamed into place.
    let leftover = dir.path().join(format!("{:020}.split", 33));
    fs::write(&leftover, b"half a copy").unwrap();
    let log = Log::open(dir.path(), tolerant()).unwrap();
    assert!(!leftover.exists());
    assert_eq!(log.recovery_notes().len(), 1);
    assert_eq!(log.read(33, usize::MAX, usize::MAX).unwrap().len(), 27);
}
