//! The multi-stream store: names as data, interleaved streams, reopen, trims, retention and
//! segment compaction, against a plain model (a vector of payloads per stream), with segments
//! and skip distances small enough that every code path (rolls, index jumps) runs.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use bytes::Bytes;
use ferry_log::{
    Durability, LogConfig, LogError, RecordIn, RetentionPolicy, Store, StoreConfig, Stream,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

fn config(segment_bytes: u64, skip_bytes: u64) -> StoreConfig {
    StoreConfig {
        log: LogConfig {
            segment_bytes,
            durability: Durability::Never,
            ..LogConfig::default()
        },
        index_interval_bytes: 256,
        skip_bytes,
        ..StoreConfig::default()
    }
}

fn payload(stream: usize, offset: u64, len: usize) -> Bytes {
    let mut p = format!("{stream}:{offset}:").into_bytes();
    p.resize(p.len() + len, b'x');
    Bytes::from(p)
}

/// A model stream: first retained offset and every payload from offset 0.
#[derive(Debug, Default, Clone)]
struct Model {
    start: u64,
    payloads: Vec<Bytes>,
}

/// What happens to the index checkpoint before a reopen.
#[derive(Debug, Clone)]
enum Reopen {
    /// Nothing: the checkpoint written at close (if configured) or the last explicit one.
    Plain,
    /// Deleted: the whole log is scanned.
    Deleted,
    /// One byte flipped (at this index modulo its size): not used, with a note.
    Damaged(usize),
    /// Replaced by an older one of the same store (this index modulo how many were kept):
    /// used from its position, or not used if it is older than the log's first segment.
    Stale(usize),
}

#[derive(Debug, Clone)]
enum Op {
    /// Append `n` records of `len` bytes to stream `s`.
    Append {
        s: usize,
        n: usize,
        len: usize,
    },
    /// Read stream `s` from a fraction (/100) of its range.
    Read {
        s: usize,
        from: u8,
        max: usize,
    },
    /// Trim stream `s` to a fraction (/100) of its range.
    Trim {
        s: usize,
        to: u8,
    },
    /// Keep at most `keep` records of stream `s`, then compact.
    Retain {
        s: usize,
        keep: u64,
    },
    /// Forget stream `s` (done only when it is empty).
    Forget {
        s: usize,
    },
    /// Write an index checkpoint now.
    Checkpoint,
    /// A transaction of `n` records in streams `a` and `b` (one part each), with a checkpoint
    /// between its parts and its commit record if `checkpoint`; without `commit` the process
    /// dies before the commit record (the store is reopened), so the parts never count.
    Tx {
        a: usize,
        b: usize,
        n: usize,
        checkpoint: bool,
        commit: bool,
    },
    Reopen(Reopen),
}

fn op_strategy(streams: usize) -> impl Strategy<Value = Op> {
    let reopen = prop_oneof![
        3 => Just(Reopen::Plain),
        1 => Just(Reopen::Deleted),
        1 => any::<usize>().prop_map(Reopen::Damaged),
        1 => any::<usize>().prop_map(Reopen::Stale),
    ];
    prop_oneof![
        10 => (0..streams, 1usize..5, prop_oneof![0usize..40, 200usize..700])
            .prop_map(|(s, n, len)| Op::Append { s, n, len }),
        5 => (0..streams, 0u8..=100, 1usize..50).prop_map(|(s, from, max)| Op::Read { s, from, max }),
        1 => (0..streams, 0u8..=100).prop_map(|(s, to)| Op::Trim { s, to }),
        1 => (0..streams, 0u64..10).prop_map(|(s, keep)| Op::Retain { s, keep }),
        1 => Just(Op::Checkpoint),
        1 => (0..streams).prop_map(|s| Op::Forget { s }),
        1 => (0..streams, 0..streams, 1usize..4, any::<bool>(), prop::bool::weighted(0.7))
            .prop_map(|(a, b, n, checkpoint, commit)| Op::Tx { a, b, n, checkpoint, commit }),
        2 => reopen.prop_map(Op::Reopen),
    ]
}

/// Names that would be trouble as paths.
const NAMES: [&str; 6] = [".", "..", "a/b/../../c", "/", "ü/%2F\u{0}x", "$dlq/x"];

fn check_read(stream: &Stream, model: &Model, from: u64, max: usize) {
    let got = stream.read(from, max, usize::MAX).unwrap();
    let from = from.max(model.start);
    let expected: Vec<(u64, Bytes)> = (from..model.payloads.len() as u64)
        .take(max)
        .map(|o| (o, model.payloads[o as usize].clone()))
        .collect();
    let got: Vec<(u64, Bytes)> = got.into_iter().map(|r| (r.offset, r.payload)).collect();
    assert_eq!(got, expected, "stream {:?} from {from}", stream.name());
}

/// Bounds and every record of every stream against the models.
fn check_all(store: &Store, models: &[Model]) -> Result<(), TestCaseError> {
    for (s, m) in models.iter().enumerate() {
        if m.payloads.is_empty() {
            // Never written, or forgotten: absent, or defined again and still empty.
            if let Some(stream) = store.find(NAMES[s]) {
                prop_assert_eq!(
                    (stream.start(), stream.next_offset()),
                    (0, 0),
                    "{:?}",
                    NAMES[s]
                );
            }
            continue;
        }
        let stream = store.stream(NAMES[s]).unwrap();
        prop_assert_eq!(stream.start(), m.start, "start of {:?}", NAMES[s]);
        prop_assert_eq!(stream.next_offset(), m.payloads.len() as u64);
        check_read(&stream, m, 0, usize::MAX);
    }
    Ok(())
}

/// The index checkpoint of the store in `dir`.
fn checkpoint_file(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("streams.checkpoint")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn store_matches_model(ops in proptest::collection::vec(op_strategy(NAMES.len()), 1..120),
                           skip in prop_oneof![Just(64u64), Just(1 << 20)],
                           on_close in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig { checkpoint_on_close: on_close, ..config(2048, skip) };
        let mut store = Store::open(dir.path(), cfg.clone()).unwrap();
        let mut models: Vec<Model> = vec![Model::default(); NAMES.len()];
        // Checkpoints written so far, for stale ones.
        let mut saved: Vec<Vec<u8>> = Vec::new();
        for op in ops {
            match op {
                Op::Append { s, n, len } => {
                    let stream = store.stream(NAMES[s]).unwrap();
                    let m = &mut models[s];
                    let first = m.payloads.len() as u64;
                    let records: Vec<RecordIn> = (0..n as u64)
                        .map(|i| RecordIn::new(payload(s, first + i, len)))
                        .collect();
                    let at = stream.append(first, &records).unwrap();
                    prop_assert_eq!(at.base_offset, first);
                    m.payloads.extend(records.into_iter().map(|r| r.payload));
                }
                Op::Read { s, from, max } => {
                    let stream = store.stream(NAMES[s]).unwrap();
                    let m = &models[s];
                    let len = m.payloads.len() as u64;
                    let from = m.start + (len - m.start) * u64::from(from) / 100;
                    check_read(&stream, m, from, max);
                }
                Op::Trim { s, to } => {
                    let stream = store.stream(NAMES[s]).unwrap();
                    let m = &mut models[s];
                    let len = m.payloads.len() as u64;
                    let to = m.start + (len - m.start) * u64::from(to) / 100;
                    stream.trim(to).unwrap();
                    m.start = m.start.max(to);
                }
                Op::Retain { s, keep } => {
                    let stream = store.stream(NAMES[s]).unwrap();
                    stream.set_retention(RetentionPolicy { max_records: Some(keep), ..RetentionPolicy::default() });
                    stream.apply_retention().unwrap();
                    let m = &mut models[s];
                    m.start = m.start.max((m.payloads.len() as u64).saturating_sub(keep));
                    store.compact(true).unwrap();
                }
                Op::Forget { s } => {
                    let m = &mut models[s];
                    let empty = m.start == m.payloads.len() as u64;
                    let defined = store.find(NAMES[s]).is_some();
                    let forgot = store.forget(NAMES[s]).unwrap();
                    prop_assert_eq!(forgot, defined && empty, "forgetting {:?}", NAMES[s]);
                    if forgot {
                        prop_assert!(store.find(NAMES[s]).is_none());
                        // Defined again, the name is a new stream from offset 0.
                        *m = Model::default();
                    }
                }
                Op::Checkpoint => {
                    store.checkpoint().unwrap();
                    saved.push(std::fs::read(checkpoint_file(dir.path())).unwrap());
                }
                Op::Tx { a, b, n, checkpoint, commit } => {
                    let mut parts = Vec::new();
                    let mut written = Vec::new();
                    for s in if a == b { vec![a] } else { vec![a, b] } {
                        let stream = store.stream(NAMES[s]).unwrap();
                        let first = models[s].payloads.len() as u64;
                        let records: Vec<RecordIn> = (0..n as u64)
                            .map(|i| RecordIn::new(payload(s, first + i, 30)))
                            .collect();
                        parts.push(stream.append_part(first, &records).unwrap());
                        written.push((s, records));
                    }
                    if checkpoint {
                        store.checkpoint().unwrap();
                        saved.push(std::fs::read(checkpoint_file(dir.path())).unwrap());
                    }
                    if commit {
                        store.commit_parts(&parts).unwrap();
                        for (s, records) in written {
                            models[s].payloads.extend(records.into_iter().map(|r| r.payload));
                        }
                    } else {
                        // The process dies before the commit record: the parts never count.
                        drop(store);
                        store = Store::open(dir.path(), cfg.clone()).unwrap();
                        let notes = store.recovery_notes();
                        let discarded = notes.iter().filter(|n| n.contains("uncommitted")).count();
                        // (Parts discarded at earlier opens are discarded again when the log
                        // is scanned from before them.)
                        prop_assert!(discarded >= parts.len(), "{:?}", notes);
                        check_all(&store, &models)?;
                    }
                }
                Op::Reopen(how) => {
                    let written = !store.stream_names().is_empty();
                    drop(store);
                    let file = checkpoint_file(dir.path());
                    let existed = file.exists();
                    match &how {
                        Reopen::Plain => {}
                        Reopen::Deleted => {
                            if existed {
                                std::fs::remove_file(&file).unwrap();
                            }
                        }
                        Reopen::Damaged(at) => {
                            if existed {
                                let mut bytes = std::fs::read(&file).unwrap();
                                let at = at % bytes.len();
                                bytes[at] ^= 0x10;
                                std::fs::write(&file, bytes).unwrap();
                            }
                        }
                        Reopen::Stale(i) => {
                            if !saved.is_empty() {
                                std::fs::write(&file, &saved[i % saved.len()]).unwrap();
                            }
                        }
                    }
                    store = Store::open(dir.path(), cfg.clone()).unwrap();
                    let notes = store.recovery_notes().to_vec();
                    let used = store.open_scan().checkpoint.is_some();
                    match &how {
                        Reopen::Damaged(_) if existed => {
                            prop_assert!(!used);
                            prop_assert!(notes.iter().any(|n| n.contains("index checkpoint not used")), "{:?}", notes);
                        }
                        Reopen::Deleted => prop_assert!(!used),
                        // Written at close, with nothing after it: nothing to scan.
                        Reopen::Plain if on_close && written => {
                            prop_assert!(used, "{:?}", notes);
                            prop_assert_eq!(store.open_scan().scanned_bytes, 0);
                        }
                        _ => {}
                    }
                    if !used && store.stats().size_bytes > 0 && models.iter().any(|m| !m.payloads.is_empty()) {
                        // A full scan of a store holding something says why.
                        prop_assert!(notes.iter().any(|n| n.contains("checkpoint")), "{:?}", notes);
                    }
                    if used {
                        // Nothing to report, but uncommitted parts after an older checkpoint's
                        // position (restored, or the last explicit one), discarded again.
                        let fresh = matches!(how, Reopen::Plain) && on_close;
                        prop_assert!(notes.iter().all(|n| !fresh && n.contains("uncommitted")), "{:?}", notes);
                    }
                    check_all(&store, &models)?;
                }
            }
            for (s, m) in models.iter().enumerate() {
                if m.payloads.is_empty() {
                    continue;
                }
                let stream = store.stream(NAMES[s]).unwrap();
                prop_assert_eq!(stream.start(), m.start, "start of {:?}", NAMES[s]);
                prop_assert_eq!(stream.next_offset(), m.payloads.len() as u64);
            }
        }
        drop(store);
        let store = Store::open(dir.path(), cfg).unwrap();
        for (s, m) in models.iter().enumerate() {
            let stream = store.stream(NAMES[s]).unwrap();
            check_read(&stream, m, 0, usize::MAX);
        }
    }
}

#[test]
fn any_name_is_stored_and_recovered_intact() {
    let dir = tempfile::tempdir().unwrap();
    let long = "l".repeat(64 << 10);
    let names: Vec<String> = NAMES
        .iter()
        .map(|n| n.to_string())
        .chain([long, "日本/テレメトリ".into(), String::new()])
        .collect();
    {
        let store = Store::open(dir.path(), config(1 << 20, 1 << 20)).unwrap();
        for (i, n) in names.iter().enumerate() {
            let s = store.stream(n).unwrap();
            s.append(0, &[RecordIn::new(payload(i, 0, 3))]).unwrap();
        }
        store.sync().unwrap();
    }
    let store = Store::open(dir.path(), config(1 << 20, 1 << 20)).unwrap();
    let mut expected = names.clone();
    expected.sort();
    assert_eq!(store.stream_names(), expected);
    for (i, n) in names.iter().enumerate() {
        let r = store.stream(n).unwrap().read(0, 10, usize::MAX).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].payload, payload(i, 0, 3));
    }
    // The directory holds the log's segment files and nothing named after a stream.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            name.ends_with(".log") || name.ends_with("index") || name == "streams.checkpoint",
            "{name}"
        );
    }
}

#[test]
fn an_empty_stream_with_no_handle_open_is_forgotten_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(1024, 1 << 20);
    let store = Store::open(dir.path(), cfg.clone()).unwrap();
    let gone = store.stream("gone").unwrap();
    let kept = store.stream("kept").unwrap();
    for i in 0..50u64 {
        gone.append(i, &[RecordIn::new(payload(0, i, 40))]).unwrap();
        kept.append(i, &[RecordIn::new(payload(1, i, 40))]).unwrap();
    }
    // Holding records, or with a handle open: kept.
    drop(gone);
    assert!(!store.forget("gone").unwrap());
    let gone = store.stream("gone").unwrap();
    gone.trim(50).unwrap();
    assert!(!store.forget("gone").unwrap(), "a handle is open");
    drop(gone);
    assert!(store.forget("gone").unwrap());
    assert!(!store.forget("gone").unwrap(), "already forgotten");
    assert!(!store.forget("never").unwrap());
    assert!(store.find("gone").is_none());
    assert_eq!(store.stream_names(), ["kept"]);
    store.compact(true).unwrap();
    drop(kept);
    drop(store);
    // Gone after a reopen, from the checkpoint and from a scan of the whole log.
    for scan in [false, true] {
        if scan {
            std::fs::remove_file(checkpoint_file(dir.path())).unwrap();
        }
        let store = Store::open(dir.path(), cfg.clone()).unwrap();
        assert_eq!(store.stream_names(), ["kept"], "scan {scan}");
        assert_eq!(store.find("kept").unwrap().next_offset(), 50);
        drop(store);
    }
    // Its name defined again is a new stream from offset 0, which survives reopens.
    let store = Store::open(dir.path(), cfg.clone()).unwrap();
    let again = store.stream("gone").unwrap();
    assert_eq!((again.start(), again.next_offset()), (0, 0));
    again.append(0, &[RecordIn::new("new")]).unwrap();
    drop((again, store));
    std::fs::remove_file(checkpoint_file(dir.path())).unwrap();
    let store = Store::open(dir.path(), cfg).unwrap();
    let again = store.find("gone").unwrap();
    let read = again.read(0, 10, usize::MAX).unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!((read[0].offset, read[0].payload.as_ref()), (0, &b"new"[..]));
}

#[test]
fn compaction_keeps_streams_whose_definition_was_in_a_deleted_segment() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(1024, 1 << 20);
    let store = Store::open(dir.path(), cfg.clone()).unwrap();
    let quiet = store.stream("quiet").unwrap();
    quiet.append(0, &[RecordIn::new("q0")]).unwrap();
    quiet.trim(1).unwrap();
    let busy = store.stream("busy").unwrap();
    busy.set_retention(RetentionPolicy {
        max_records: Some(2),
        ..RetentionPolicy::default()
    });
    for i in 0..200u64 {
        busy.append(i, &[RecordIn::new(payload(1, i, 50))]).unwrap();
    }
    let before = store.stats().segments;
    assert!(before > 5);
    busy.apply_retention().unwrap();
    store.compact(true).unwrap();
    assert!(store.stats().segments < before);
    drop((quiet, busy, store));
    let store = Store::open(dir.path(), cfg).unwrap();
    let quiet = store.stream("quiet").unwrap();
    assert_eq!((quiet.start(), quiet.next_offset()), (1, 1));
    let busy = store.stream("busy").unwrap();
    assert_eq!((busy.start(), busy.next_offset()), (198, 200));
    let r = busy.read(0, 10, usize::MAX).unwrap();
    assert_eq!(
        r.iter().map(|r| r.offset).collect::<Vec<_>>(),
        vec![198, 199]
    );
    // Nothing reuses an offset: the next append continues at the end.
    assert!(matches!(
        quiet.append(0, &[RecordIn::new("again")]),
        Err(LogError::Inconsistent(_))
    ));
    quiet.append(1, &[RecordIn::new("q1")]).unwrap();
}

#[test]
fn time_lookup_across_interleaved_streams() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config(4096, 128)).unwrap();
    let streams: BTreeMap<usize, Stream> = (0..5)
        .map(|i| (i, store.stream(&format!("s{i}")).unwrap()))
        .collect();
    for t in 0..100u64 {
        for (i, s) in &streams {
            s.append(
                t,
                &[RecordIn::new(payload(*i, t, 30)).with_timestamp(1000 + t * 10)],
            )
            .unwrap();
        }
    }
    for s in streams.values() {
        assert_eq!(s.offset_for_timestamp(0).unwrap(), Some(0));
        assert_eq!(s.offset_for_timestamp(1000 + 455).unwrap(), Some(46));
        assert_eq!(s.offset_for_timestamp(1000 + 990).unwrap(), Some(99));
        assert_eq!(s.offset_for_timestamp(5000).unwrap(), None);
    }
}

/// The store's recovery notes but those that mention `about`.
fn notes_without<'a>(store: &'a Store, about: &str) -> Vec<&'a String> {
    store
        .recovery_notes()
        .iter()
        .filter(|n| !n.contains(about))
        .collect()
}

/// Streams "hit" and "other" in `dir`, `n` one-record batches each, interleaved, synced.
fn hit_and_other(dir: &std::path::Path, cfg: &StoreConfig, n: u64) {
    let store = Store::open(dir, cfg.clone()).unwrap();
    let hit = store.stream("hit").unwrap();
    let other = store.stream("other").unwrap();
    for i in 0..n {
        hit.append(i, &[RecordIn::new(format!("hit-{i:04}-payload"))])
            .unwrap();
        other
            .append(i, &[RecordIn::new(format!("other-{i:04}"))])
            .unwrap();
    }
    store.sync().unwrap();
}

#[test]
fn a_damaged_batch_in_a_sealed_segment_is_reported_as_a_range_and_the_rest_stays_readable() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments: the damaged batch is in a sealed one.
    let cfg = config(4096, 1 << 20);
    hit_and_other(dir.path(), &cfg, 200);
    // Flip a byte inside the payload of record 5 of "hit".
    let (seg, mut bytes, at) = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .find_map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            let at = bytes.windows(8).position(|w| w == b"hit-0005")?;
            Some((p, bytes, at))
        })
        .unwrap();
    bytes[at + 9] ^= 0xff;
    std::fs::write(&seg, &bytes).unwrap();

    let store = Store::open(dir.path(), cfg).unwrap();
    let hit = store.stream("hit").unwrap();
    // Records before the damage come back; the read that meets it says which range to skip.
    let before = hit.read(0, 100, usize::MAX).unwrap();
    assert_eq!(before.len(), 5);
    let Err(LogError::Damaged { from, to, .. }) = hit.read(5, 100, usize::MAX) else {
        panic!("damage not reported");
    };
    assert_eq!(from, 5);
    assert!(to > 5 && to <= 200, "{to}");
    let after = hit.read(to, 1000, usize::MAX).unwrap();
    assert_eq!(after.first().map(|r| r.offset), Some(to));
    assert_eq!(after.last().map(|r| r.offset), Some(199));
    // The damage is reported once, with the segment and position; the rest of that segment
    // is quarantined, so another stream loses what it had there and nothing else: it reads up
    // to the damage, is told the range it lost, and reads on after it.
    let notes = store.recovery_notes();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].contains("CRC"), "{notes:?}");
    let other = store.stream("other").unwrap();
    let first = other.read(0, 1000, usize::MAX).unwrap();
    let next = first.last().map_or(0, |r| r.offset + 1);
    let Err(LogError::Damaged { from, to, .. }) = other.read(next, 1000, usize::MAX) else {
        panic!("lost range not reported");
    };
    assert_eq!(from, next);
    let rest = other.read(to, 1000, usize::MAX).unwrap();
    assert_eq!(rest.last().map(|r| r.offset), Some(199));
    // Offsets are never reused: appends go on after the end.
    assert_eq!(hit.next_offset(), 200);
    hit.append(200, &[RecordIn::new("after")]).unwrap();
}

/// Reads every record of `stream`, skipping the ranges reported damaged; returns the offsets
/// read and the ranges skipped.
fn read_around_damage(stream: &Stream) -> (Vec<u64>, Vec<(u64, u64)>) {
    let (mut offsets, mut skipped) = (Vec::new(), Vec::new());
    let mut next = stream.start();
    while next < stream.next_offset() {
        match stream.read(next, 1000, usize::MAX) {
            Ok(records) => {
                let last = records
                    .last()
                    .expect("a read below the end returns records");
                next = last.offset + 1;
                offsets.extend(records.iter().map(|r| r.offset));
            }
            Err(LogError::Damaged { from, to, .. }) => {
                assert!(from == next && to > from, "{from}..{to} read at {next}");
                skipped.push((from, to));
                next = to;
            }
            Err(e) => panic!("reading {}: {e}", stream.name()),
        }
    }
    (offsets, skipped)
}

#[test]
fn a_damaged_batch_header_in_a_sealed_segment_is_damage_not_a_broken_store() {
    // The CRC covers the header fields after it, but opening the store once read a header
    // without checking it: a flipped stream offset, stream id or record count in a sealed
    // segment (before its last index entry, where recovery does not look) made the store
    // refuse to open ("batch ... below its end", "batches but no definition").
    const STREAM_ID: usize = 43;
    const STREAM_OFFSET: usize = 47;
    const COUNT: usize = 19;
    for field in [STREAM_OFFSET, STREAM_ID, COUNT] {
        let dir = tempfile::tempdir().unwrap();
        // No index checkpoint (as after a crash before the first): opening scans every
        // segment, where the damage is met (from a checkpoint, a read meets it).
        let cfg = StoreConfig {
            checkpoint_on_close: false,
            ..config(16 << 10, 1 << 20)
        };
        hit_and_other(dir.path(), &cfg, 400);
        // The second batch of "hit" in the second segment (far from the segment's end).
        let mut logs: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        logs.sort();
        assert!(logs.len() >= 3, "{logs:?}");
        let mut bytes = std::fs::read(&logs[1]).unwrap();
        let mut pos = 32;
        let mut hits = 0;
        let batch = loop {
            let len = 4 + u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
            if bytes[pos..pos + len].windows(4).any(|w| w == b"hit-") {
                hits += 1;
                if hits == 2 {
                    break pos;
                }
            }
            pos += len;
        };
        bytes[batch + field] ^= 0xff;
        std::fs::write(&logs[1], &bytes).unwrap();

        let store = Store::open(dir.path(), cfg)
            .unwrap_or_else(|e| panic!("field at {field}: the store does not open: {e}"));
        // Reported once, naming the segment.
        let segment = logs[1].file_name().unwrap().to_str().unwrap();
        let notes = notes_without(&store, "index checkpoint");
        assert!(
            notes.len() == 1 && notes[0].contains(segment),
            "field at {field}: {notes:?}"
        );
        for name in ["hit", "other"] {
            let s = store.find(name).unwrap();
            // Everything before the damaged segment and after it is read; what is skipped is
            // reported as ranges; the end stays where it was, and the next append goes there.
            let (offsets, skipped) = read_around_damage(&s);
            assert_eq!(s.next_offset(), 400, "field at {field}: {name}");
            assert_eq!(offsets.first(), Some(&0), "field at {field}: {name}");
            assert_eq!(offsets.last(), Some(&399), "field at {field}: {name}");
            assert!(
                offsets.windows(2).all(|w| w[0] < w[1]),
                "field at {field}: {name}"
            );
            let lost: u64 = skipped.iter().map(|(f, t)| t - f).sum();
            assert_eq!(offsets.len() as u64 + lost, 400, "field at {field}: {name}");
            assert!(lost < 200, "field at {field}: {name} lost {lost}");
            if field == COUNT {
                // Out of range: the header does not parse, nothing after it in its segment
                // can be trusted.
                assert!(notes[0].contains("the rest of that segment is skipped"));
            } else {
                // The batch after it follows on: that batch alone is lost.
                assert!(notes[0].contains("that batch is skipped"), "{notes:?}");
                assert_eq!(lost, u64::from(name == "hit"), "field at {field}: {name}");
            }
            s.append(400, &[RecordIn::new("after")]).unwrap();
        }
    }
}

#[test]
fn a_transaction_across_streams_survives_whole_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(1 << 20, 1 << 20);
    {
        let store = Store::open(dir.path(), cfg.clone()).unwrap();
        let (a, b) = (store.stream("a").unwrap(), store.stream("b").unwrap());
        a.append(0, &[RecordIn::new("a0")]).unwrap();
        // Committed: both parts count.
        let p1 = a.append_part(1, &[RecordIn::new("a1")]).unwrap();
        let p2 = b
            .append_part(0, &[RecordIn::new("b0"), RecordIn::new("b1")])
            .unwrap();
        store.commit_parts(&[p1, p2]).unwrap();
        // Not committed (a crash before the commit record): neither part counts.
        a.append_part(2, &[RecordIn::new("a2-lost")]).unwrap();
        b.append_part(2, &[RecordIn::new("b2-lost")]).unwrap();
        store.sync().unwrap();
    }
    let payloads = |s: &Stream| -> Vec<Bytes> {
        s.read(0, 100, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|r| r.payload)
            .collect()
    };
    {
        let store = Store::open(dir.path(), cfg.clone()).unwrap();
        // No checkpoint was written at close (a part waits for its commit record): the whole
        // log is scanned, and the two parts are discarded.
        let notes = store.recovery_notes();
        assert_eq!(store.open_scan().checkpoint, None);
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert!(notes[0].contains("no index checkpoint"), "{notes:?}");
        assert!(
            notes[1..].iter().all(|n| n.contains("uncommitted")),
            "{notes:?}"
        );
        let (a, b) = (store.stream("a").unwrap(), store.stream("b").unwrap());
        assert_eq!(payloads(&a), vec![Bytes::from("a0"), Bytes::from("a1")]);
        assert_eq!(payloads(&b), vec![Bytes::from("b0"), Bytes::from("b1")]);
        // The offsets of the discarded parts were never visible: they are given again.
        assert_eq!((a.next_offset(), b.next_offset()), (2, 2));
        a.append(2, &[RecordIn::new("a2")]).unwrap();
        store.sync().unwrap();
    }
    // From the checkpoint written at close, which remembers the discarded parts: readers
    // still skip them.
    let store = Store::open(dir.path(), cfg).unwrap();
    assert!(store.open_scan().checkpoint.is_some());
    assert!(
        store.recovery_notes().is_empty(),
        "{:?}",
        store.recovery_notes()
    );
    let (a, b) = (store.stream("a").unwrap(), store.stream("b").unwrap());
    assert_eq!(
        payloads(&a),
        vec![Bytes::from("a0"), Bytes::from("a1"), Bytes::from("a2")]
    );
    assert_eq!(payloads(&b), vec![Bytes::from("b0"), Bytes::from("b1")]);
}

/// The `.log` files of `dir`, sorted.
fn segment_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut logs: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs
}

/// Flips a byte in the payload of the record that contains `needle` (in the only segment).
fn damage_record(dir: &std::path::Path, needle: &[u8]) -> (std::path::PathBuf, usize) {
    let logs = segment_files(dir);
    assert_eq!(logs.len(), 1, "{logs:?}");
    let mut bytes = std::fs::read(&logs[0]).unwrap();
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    bytes[at + needle.len()] ^= 0xff;
    std::fs::write(&logs[0], &bytes).unwrap();
    (logs[0].clone(), at)
}

const DAMAGE_STREAMS: [&str; 4] = ["hit", "a", "b", "c"];

fn damage_payload(name: &str, i: u64) -> Bytes {
    Bytes::from(format!("{name}-{i:04}-payload"))
}

/// Records read (offset, payload) and damaged ranges met.
type ReadAround = (Vec<(u64, Bytes)>, Vec<(u64, u64)>);

/// The records of `stream` from `from` on, reading past damage; the damaged ranges met.
fn read_around(stream: &Stream, mut from: u64) -> ReadAround {
    let (mut got, mut damaged) = (Vec::new(), Vec::new());
    while from < stream.next_offset() {
        match stream.read(from, 1000, usize::MAX) {
            Ok(records) => {
                assert!(!records.is_empty(), "empty read at {from}");
                from = records.last().unwrap().offset + 1;
                got.extend(records.into_iter().map(|r| (r.offset, r.payload)));
            }
            Err(LogError::Damaged { from: f, to, .. }) => {
                assert_eq!(f, from);
                damaged.push((f, to));
                from = to;
            }
            Err(e) => panic!("{e}"),
        }
    }
    (got, damaged)
}

#[test]
fn a_damaged_batch_in_the_middle_of_the_active_segment_is_contained() {
    for checkpoint in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        // One large segment: the damage is in the active one. Small skips: index jumps.
        let cfg = StoreConfig {
            checkpoint_on_close: checkpoint,
            ..config(1 << 20, 2048)
        };
        {
            let store = Store::open(dir.path(), cfg.clone()).unwrap();
            for i in 0..100u64 {
                for name in DAMAGE_STREAMS {
                    let s = store.stream(name).unwrap();
                    s.append(i, &[RecordIn::new(damage_payload(name, i))])
                        .unwrap();
                }
            }
        }
        let (damaged, at) = damage_record(dir.path(), b"hit-0050");
        let check = |store: &Store, end: u64| {
            for name in &DAMAGE_STREAMS[1..] {
                // Other streams: whole.
                let (got, lost) = read_around(&store.stream(name).unwrap(), 0);
                let want: Vec<(u64, Bytes)> =
                    (0..end).map(|i| (i, damage_payload(name, i))).collect();
                assert_eq!((got, lost), (want, vec![]), "{name}");
            }
            // The damaged stream: readable around the one record lost.
            let hit = store.stream("hit").unwrap();
            let (got, lost) = read_around(&hit, 0);
            assert_eq!(lost, vec![(50, 51)]);
            let want: Vec<(u64, Bytes)> = (0..end)
                .filter(|&i| i != 50)
                .map(|i| (i, damage_payload("hit", i)))
                .collect();
            assert_eq!(got, want);
            // A read from the middle of the damaged range is told it too.
            assert!(matches!(
                hit.read(50, 10, usize::MAX),
                Err(LogError::Damaged {
                    from: 50,
                    to: 51,
                    ..
                })
            ));
        };
        let store = Store::open(dir.path(), cfg.clone()).unwrap();
        // Reported once, with its segment and position.
        let notes = notes_without(&store, "no index checkpoint");
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].contains(&damaged.display().to_string()),
            "{notes:?}"
        );
        assert!(notes[0].contains("at position"), "{notes:?}");
        assert_eq!(store.open_scan().checkpoint.is_some(), checkpoint);
        check(&store, 100);
        // Appends go on at every stream's end, into a new segment after the damaged one,
        // which stays as it is (with the damage, quarantined).
        let logs = segment_files(dir.path());
        assert_eq!(logs.len(), 2);
        let damaged_len = std::fs::metadata(&damaged).unwrap().len();
        assert!(damaged_len > at as u64);
        for name in DAMAGE_STREAMS {
            let s = store.stream(name).unwrap();
            assert_eq!(s.next_offset(), 100);
            s.append(100, &[RecordIn::new(damage_payload(name, 100))])
                .unwrap();
        }
        check(&store, 101);
        drop(store);
        assert_eq!(segment_files(dir.path()), logs);
        assert_eq!(std::fs::metadata(&damaged).unwrap().len(), damaged_len);
        // Stable: opening again gives the same.
        for _ in 0..2 {
            let store = Store::open(dir.path(), cfg.clone()).unwrap();
            let notes = notes_without(&store, "no index checkpoint");
            assert_eq!(notes.len(), 1, "{notes:?}");
            check(&store, 101);
        }
    }
}

#[test]
fn a_stream_whose_last_records_were_lost_keeps_its_end_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(1 << 20, 2048);
    {
        let store = Store::open(dir.path(), cfg.clone()).unwrap();
        let (hit, other) = (store.stream("hit").unwrap(), store.stream("other").unwrap());
        for i in 0..10u64 {
            hit.append(i, &[RecordIn::new(damage_payload("hit", i))])
                .unwrap();
        }
        for i in 0..10u64 {
            other
                .append(i, &[RecordIn::new(damage_payload("other", i))])
                .unwrap();
        }
        store.close().unwrap();
    }
    damage_record(dir.path(), b"hit-0009");
    let store = Store::open(dir.path(), cfg).unwrap();
    assert!(store.open_scan().checkpoint.is_some());
    let hit = store.stream("hit").unwrap();
    // The checkpoint remembers where the stream ends: its offsets are never given again.
    assert_eq!(hit.next_offset(), 10);
    let (got, lost) = read_around(&hit, 0);
    assert_eq!(got.len(), 9);
    assert_eq!(lost, vec![(9, 10)]);
    assert!(hit.append(9, &[RecordIn::new("again")]).is_err());
    hit.append(10, &[RecordIn::new(damage_payload("hit", 10))])
        .unwrap();
    assert_eq!(
        read_around(&hit, 9),
        (vec![(10, damage_payload("hit", 10))], vec![(9, 10)])
    );
    let (got, lost) = read_around(&store.stream("other").unwrap(), 0);
    assert_eq!((got.len(), lost.len()), (10, 0));
}

#[test]
fn last_records_gives_each_streams_last_record_in_one_pass() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), config(4096, 1 << 20)).unwrap();
        for round in 0..50u64 {
            for s in 0..20 {
                let stream = store.stream(&format!("v/{s}")).unwrap();
                let at = stream.next_offset();
                stream
                    .append(at, &[RecordIn::new(format!("{s}:{round}"))])
                    .unwrap();
                stream.trim(at).unwrap();
            }
        }
        // Other prefixes and an empty stream are not reported.
        let other = store.stream("w/0").unwrap();
        other.append(0, &[RecordIn::new("w")]).unwrap();
        store.stream("v/empty").unwrap();
        store.sync().unwrap();
        store.compact(true).unwrap();
    }
    let store = Store::open(dir.path(), config(4096, 1 << 20)).unwrap();
    let (found, damaged) = store.last_records("v/").unwrap();
    assert!(damaged.is_empty(), "{damaged:?}");
    assert_eq!(found.len(), 20);
    for s in 0..20 {
        let r = &found[&format!("v/{s}")];
        assert_eq!(r.payload, format!("{s}:49"));
        assert_eq!(r.offset, 49);
    }
}
