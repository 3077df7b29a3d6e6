//! The store's index checkpoint: opening from it scans only the log after it; a damaged,
//! foreign or outdated checkpoint is not used (the whole log is scanned, with a note); when
//! `maybe_checkpoint` writes one.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use ferry_log::{Durability, LogConfig, RecordIn, Store, StoreConfig, Stream};

/// Small segments, no checkpoint at close (the tests say when one is written).
fn config() -> StoreConfig {
    StoreConfig {
        log: LogConfig {
            segment_bytes: 64 << 10,
            durability: Durability::Never,
            ..LogConfig::default()
        },
        index_interval_bytes: 1024,
        skip_bytes: 16 << 10,
        checkpoint_bytes: None,
        checkpoint_interval: None,
        checkpoint_on_close: false,
    }
}

fn payload(stream: usize, offset: u64) -> Bytes {
    Bytes::from(format!("{stream}:{offset}:{}", "x".repeat(100)))
}

const STREAMS: usize = 50;
const ROUNDS: u64 = 40;

/// `STREAMS` streams of `ROUNDS` records each, one record per batch, interleaved.
fn fill(store: &Store) -> Vec<Stream> {
    let streams: Vec<Stream> = (0..STREAMS)
        .map(|i| store.stream(&format!("topic/{i}")).unwrap())
        .collect();
    for round in 0..ROUNDS {
        for (i, s) in streams.iter().enumerate() {
            s.append(round, &[RecordIn::new(payload(i, round))])
                .unwrap();
        }
    }
    streams
}

/// Every stream holds `ROUNDS` records, plus one for the first `extra` streams.
fn check(store: &Store, extra: usize) {
    assert_eq!(store.stream_names().len(), STREAMS);
    for i in 0..STREAMS {
        let s = store.stream(&format!("topic/{i}")).unwrap();
        let end = ROUNDS + u64::from(i < extra);
        assert_eq!((s.start(), s.next_offset()), (0, end));
        let records = s.read(0, usize::MAX, usize::MAX).unwrap();
        let got: Vec<(u64, Bytes)> = records.into_iter().map(|r| (r.offset, r.payload)).collect();
        let want: Vec<(u64, Bytes)> = (0..end).map(|o| (o, payload(i, o))).collect();
        assert_eq!(got, want, "stream {i}");
        // Time look-ups and index jumps work from the loaded index.
        assert_eq!(s.offset_for_timestamp(0).unwrap(), Some(0));
    }
}

fn checkpoint_file(dir: &Path) -> std::path::PathBuf {
    dir.join("streams.checkpoint")
}

#[test]
fn opening_from_a_checkpoint_scans_only_the_log_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (at, after) = {
        let store = Store::open(dir.path(), config()).unwrap();
        let streams = fill(&store);
        assert!(store.stats().segments > 2);
        let at = store.checkpoint().unwrap();
        // Written after the checkpoint: three batches and a new stream's definition.
        let before = store.stats().bytes_appended;
        for (i, s) in streams.iter().enumerate().take(3) {
            s.append(ROUNDS, &[RecordIn::new(payload(i, ROUNDS))])
                .unwrap();
        }
        store.stream("late").unwrap();
        (at, store.stats().bytes_appended - before)
    };
    let store = Store::open(dir.path(), config()).unwrap();
    let scan = store.open_scan();
    assert_eq!(scan.checkpoint, Some(at));
    assert_eq!(scan.scanned_bytes, after);
    assert!(after < 1024, "{after}");
    assert!(
        store.recovery_notes().is_empty(),
        "{:?}",
        store.recovery_notes()
    );
    assert!(store.stream_names().contains(&"late".to_string()));
    let late = store.stream("late").unwrap();
    assert_eq!(late.next_offset(), 0);
    late.append(0, &[RecordIn::new("l0")]).unwrap();
    drop(late);
    // The same store scanned in full, for comparison.
    drop(store);
    std::fs::remove_file(checkpoint_file(dir.path())).unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let full = store.open_scan();
    assert_eq!(full.checkpoint, None);
    assert!(
        full.scanned_bytes > 100 * after,
        "{} vs {after}",
        full.scanned_bytes
    );
    assert_eq!(store.recovery_notes().len(), 1);
    assert!(store.recovery_notes()[0].contains("no index checkpoint"));
    assert_eq!(store.stream_names().len(), STREAMS + 1);
}

#[test]
fn a_checkpoint_written_at_close_leaves_nothing_to_scan() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        checkpoint_on_close: true,
        ..config()
    };
    {
        let store = Store::open(dir.path(), cfg.clone()).unwrap();
        fill(&store);
        store.close().unwrap();
    }
    let store = Store::open(dir.path(), cfg.clone()).unwrap();
    assert!(store.open_scan().checkpoint.is_some());
    assert_eq!(store.open_scan().scanned_bytes, 0);
    assert!(store.recovery_notes().is_empty());
    check(&store, 0);
    // Appends go on at every stream's end, and the next close (here: dropping the last
    // handle) writes a new checkpoint.
    for i in 0..5 {
        let s = store.stream(&format!("topic/{i}")).unwrap();
        assert!(s.append(ROUNDS - 1, &[RecordIn::new("again")]).is_err());
        s.append(ROUNDS, &[RecordIn::new(payload(i, ROUNDS))])
            .unwrap();
    }
    drop(store);
    let store = Store::open(dir.path(), cfg).unwrap();
    assert_eq!(store.open_scan().scanned_bytes, 0);
    check(&store, 5);
}

/// Writes a store with a checkpoint and a few batches after it; returns the checkpoint's
/// bytes.
fn store_with_checkpoint(dir: &Path) -> Vec<u8> {
    let store = Store::open(dir, config()).unwrap();
    let streams = fill(&store);
    store.checkpoint().unwrap();
    for (i, s) in streams.iter().enumerate().take(2) {
        s.append(ROUNDS, &[RecordIn::new(payload(i, ROUNDS))])
            .unwrap();
    }
    std::fs::read(checkpoint_file(dir)).unwrap()
}

#[test]
fn a_damaged_checkpoint_is_not_used_and_the_whole_log_is_scanned() {
    let dir = tempfile::tempdir().unwrap();
    let good = store_with_checkpoint(dir.path());
    let mut wrong_version = good.clone();
    wrong_version[8] = 9;
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x01;
    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("a flipped byte", flipped, "CRC32C mismatch"),
        (
            "cut short",
            good[..good.len() - 10].to_vec(),
            "CRC32C mismatch",
        ),
        ("empty", Vec::new(), "shorter than a header"),
        ("another format version", wrong_version, "format version 9"),
        (
            "not a checkpoint",
            b"FERRYLOG and so on".to_vec(),
            "bad magic",
        ),
    ];
    for (what, bytes, reason) in cases {
        std::fs::write(checkpoint_file(dir.path()), &bytes).unwrap();
        let store = Store::open(dir.path(), config()).unwrap();
        let notes = store.recovery_notes();
        assert_eq!(notes.len(), 1, "{what}: {notes:?}");
        assert!(
            notes[0].contains("index checkpoint not used") && notes[0].contains(reason),
            "{what}: {notes:?}"
        );
        assert_eq!(store.open_scan().checkpoint, None, "{what}");
        check(&store, 2);
        // It is gone: never to be read again, when the log may have grown past it.
        assert!(!checkpoint_file(dir.path()).exists(), "{what}");
    }
    // The good one is used again.
    std::fs::write(checkpoint_file(dir.path()), &good).unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    assert!(store.open_scan().checkpoint.is_some());
    assert!(store.recovery_notes().is_empty());
    check(&store, 2);
}

#[test]
fn a_checkpoint_of_other_segments_or_ahead_of_the_log_is_not_used() {
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    store_with_checkpoint(ours.path());
    // Another store with the same offsets but other segment files (created later).
    std::thread::sleep(Duration::from_millis(5));
    let foreign = store_with_checkpoint(theirs.path());
    std::fs::write(checkpoint_file(ours.path()), &foreign).unwrap();
    let store = Store::open(ours.path(), config()).unwrap();
    let notes = store.recovery_notes();
    assert!(
        notes.len() == 1 && notes[0].contains("is not one it was written with"),
        "{notes:?}"
    );
    check(&store, 2);
    drop(store);

    // A checkpoint ahead of the log (the log lost its end, for instance to a power loss with
    // durability `never`).
    let short = tempfile::tempdir().unwrap();
    {
        let store = Store::open(short.path(), config()).unwrap();
        store.stream("only").unwrap();
    }
    let ahead = std::fs::read(checkpoint_file(theirs.path())).unwrap();
    std::fs::write(checkpoint_file(short.path()), ahead).unwrap();
    let store = Store::open(short.path(), config()).unwrap();
    let notes = store.recovery_notes();
    assert!(
        notes.len() == 1 && notes[0].contains("but the log ends at"),
        "{notes:?}"
    );
    assert_eq!(store.stream_names(), vec!["only".to_string()]);
}

#[test]
fn maybe_checkpoint_writes_after_enough_bytes_or_time() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        checkpoint_bytes: Some(20 << 10),
        ..config()
    };
    let store = Store::open(dir.path(), cfg).unwrap();
    assert!(!store.maybe_checkpoint().unwrap(), "nothing written yet");
    let s = store.stream("s").unwrap();
    let mut next = 0;
    let append = |next: &mut u64, n: u64| {
        for _ in 0..n {
            s.append(*next, &[RecordIn::new(vec![7u8; 1000])]).unwrap();
            *next += 1;
        }
    };
    append(&mut next, 10);
    assert!(!store.maybe_checkpoint().unwrap(), "10 KiB of 20");
    append(&mut next, 12);
    assert!(store.maybe_checkpoint().unwrap(), "22 KiB of 20");
    assert!(checkpoint_file(dir.path()).exists());
    assert!(!store.maybe_checkpoint().unwrap(), "nothing since");
    append(&mut next, 5);
    assert!(!store.maybe_checkpoint().unwrap(), "5 KiB since");
    // A transaction part waiting for its commit record holds checkpoints back.
    let part = s
        .append_part(next, &[RecordIn::new(vec![1u8; 30 << 10])])
        .unwrap();
    assert!(!store.maybe_checkpoint().unwrap(), "a part waits");
    store.commit_parts(&[part]).unwrap();
    assert!(store.maybe_checkpoint().unwrap());
    drop((s, store));

    // By time: anything appended once the interval passed.
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        checkpoint_interval: Some(Duration::from_millis(50)),
        ..config()
    };
    let store = Store::open(dir.path(), cfg).unwrap();
    let s = store.stream("s").unwrap();
    s.append(0, &[RecordIn::new("a")]).unwrap();
    assert!(!store.maybe_checkpoint().unwrap(), "too early");
    std::thread::sleep(Duration::from_millis(60));
    assert!(store.maybe_checkpoint().unwrap());
    std::thread::sleep(Duration::from_millis(60));
    assert!(!store.maybe_checkpoint().unwrap(), "nothing since");
}

/// The log lost its tail after the checkpoint (acknowledged records, which only damage can
/// take): the checkpoint is not used, but the stream ends it knows are kept, so the lost
/// offsets are a damaged range and never given out again.
#[test]
fn offsets_lost_with_the_tail_after_a_checkpoint_are_not_given_out_again() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        log: LogConfig {
            segment_bytes: 1 << 20,
            ..config().log
        },
        ..config()
    };
    {
        let store = Store::open(dir.path(), cfg.clone()).unwrap();
        let (cut, whole) = (store.stream("cut").unwrap(), store.stream("whole").unwrap());
        whole.append(0, &[RecordIn::new("w0")]).unwrap();
        for i in 0..20u64 {
            cut.append(i, &[RecordIn::new(format!("c{i:02}"))]).unwrap();
        }
        store.checkpoint().unwrap();
    }
    let log = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .unwrap();
    let bytes = std::fs::read(&log).unwrap();
    let at = bytes.windows(3).position(|w| w == b"c10").unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&log).unwrap();
    file.set_len(at as u64).unwrap();
    drop(file);

    let store = Store::open(dir.path(), cfg).unwrap();
    let notes = store.recovery_notes();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("\"cut\"") && n.contains("10..20")),
        "{notes:?}"
    );
    let cut = store.find("cut").unwrap();
    assert_eq!(cut.next_offset(), 20, "the end stays where it was");
    assert_eq!(cut.read(0, 100, usize::MAX).unwrap().len(), 10);
    let Err(ferry_log::LogError::Damaged { from, to, .. }) = cut.read(10, 100, usize::MAX) else {
        panic!("the lost range is not reported");
    };
    assert_eq!((from, to), (10, 20));
    assert!(cut.append(10, &[RecordIn::new("reused")]).is_err());
    cut.append(20, &[RecordIn::new("c20")]).unwrap();
    assert_eq!(store.find("whole").unwrap().next_offset(), 1);
}
