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

fn config(segment_bytes: u64, skip_bytes: u64) -> StoreConfig {
    StoreConfig {
        log: LogConfig {
            segment_bytes,
            durability: Durability::Never,
            ..LogConfig::default()
        },
        index_interval_bytes: 256,
        skip_bytes,
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
    Reopen,
}

fn op_strategy(streams: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (0..streams, 1usize..5, prop_oneof![0usize..40, 200usize..700])
            .prop_map(|(s, n, len)| Op::Append { s, n, len }),
        5 => (0..streams, 0u8..=100, 1usize..50).prop_map(|(s, from, max)| Op::Read { s, from, max }),
        1 => (0..streams, 0u8..=100).prop_map(|(s, to)| Op::Trim { s, to }),
        1 => (0..streams, 0u64..10).prop_map(|(s, keep)| Op::Retain { s, keep }),
        1 => Just(Op::Reopen),
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn store_matches_model(ops in proptest::collection::vec(op_strategy(NAMES.len()), 1..120),
                           skip in prop_oneof![Just(64u64), Just(1 << 20)]) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(2048, skip);
        let mut store = Store::open(dir.path(), cfg.clone()).unwrap();
        let mut models: Vec<Model> = vec![Model::default(); NAMES.len()];
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
                Op::Reopen => {
                    drop(store);
                    store = Store::open(dir.path(), cfg.clone()).unwrap();
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
        assert!(name.ends_with(".log") || name.ends_with("index"), "{name}");
    }
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
