//! Model-based test: random appends, reads, time look-ups, truncations, reopens and retention
//! against a plain vector of records, with segments small enough to roll all the time.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use ferry_log::{Compression, Durability, Log, LogConfig, RecordIn, RetentionPolicy, StoredRecord};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<RecordIn>),
    /// `from` is a fraction (/1000) of the retained range.
    Read {
        from: u16,
        max_records: usize,
        max_bytes: usize,
    },
    TimeLookup(u64),
    /// The new end is a fraction (/1000) of the retained range.
    Truncate(u16),
    Reopen,
    Retention,
}

fn record_strategy() -> impl Strategy<Value = RecordIn> {
    (
        0u64..500,
        any::<u16>(),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
        proptest::collection::vec(
            ("[a-z]{0,4}", proptest::collection::vec(any::<u8>(), 0..6)),
            0..3,
        ),
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..40),
            (0usize..300).prop_map(|n| vec![b'z'; n]),
        ],
    )
        .prop_map(|(ts, flags, key, headers, payload)| RecordIn {
            timestamp: Some(ts),
            flags,
            key: key.map(Bytes::from),
            headers: headers
                .into_iter()
                .map(|(n, v)| (n, Bytes::from(v)))
                .collect(),
            payload: Bytes::from(payload),
        })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => proptest::collection::vec(record_strategy(), 1..6).prop_map(Op::Append),
        4 => (0u16..=1000, 0usize..30, prop_oneof![Just(usize::MAX), 0usize..600])
            .prop_map(|(from, max_records, max_bytes)| Op::Read { from, max_records, max_bytes }),
        2 => (0u64..520).prop_map(Op::TimeLookup),
        1 => (0u16..=1000).prop_map(Op::Truncate),
        1 => Just(Op::Reopen),
        1 => Just(Op::Retention),
    ]
}

fn config_strategy() -> impl Strategy<Value = LogConfig> {
    (
        256u64..2048,
        32u64..512,
        prop_oneof![Just(0usize), Just(700), Just(1 << 20)],
        prop_oneof![Just(Compression::None), Just(Compression::Lz4)],
        proptest::option::of(10u64..120),
        proptest::option::of(1000u64..6000),
        prop_oneof![
            6 => Just(Durability::Never),
            1 => Just(Durability::Always),
            1 => Just(Durability::Interval(Duration::from_millis(2))),
        ],
    )
        .prop_map(
            |(
                segment_bytes,
                index_interval_bytes,
                cache_bytes,
                compression,
                records,
                bytes,
                durability,
            )| {
                LogConfig {
                    segment_bytes,
                    index_interval_bytes,
                    cache_bytes,
                    compression,
                    durability,
                    max_batch_bytes: 1 << 20,
                    retention: RetentionPolicy {
                        max_records: records,
                        max_bytes: bytes,
                        max_age: None,
                    },
                    ..LogConfig::default()
                }
            },
        )
}

/// The model: records `start..start + records.len()`.
struct Model {
    start: u64,
    records: Vec<StoredRecord>,
}

impl Model {
    fn end(&self) -> u64 {
        self.start + self.records.len() as u64
    }

    fn at_fraction(&self, f: u16) -> u64 {
        self.start + (self.end() - self.start) * u64::from(f) / 1000
    }

    fn read(&self, from: u64, max_records: usize, max_bytes: usize) -> Vec<StoredRecord> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for r in &self.records[(from - self.start) as usize..] {
            if out.len() >= max_records || (!out.is_empty() && bytes + r.size() > max_bytes) {
                break;
            }
            bytes += r.size();
            out.push(r.clone());
        }
        out
    }

    fn offset_for_timestamp(&self, ts: u64) -> Option<u64> {
        self.records
            .iter()
            .find(|r| r.timestamp >= ts)
            .map(|r| r.offset)
    }
}

fn run(config: LogConfig, ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut log = Some(Log::open(dir.path(), config.clone()).unwrap());
    let mut model = Model {
        start: 0,
        records: Vec::new(),
    };
    for op in ops {
        let l = log.as_ref().unwrap();
        match op {
            Op::Append(records) => {
                let at = l.append(&records).unwrap();
                assert_eq!(at.base_offset, model.end());
                assert_eq!(at.last_offset, model.end() + records.len() as u64 - 1);
                for (r, offset) in records.iter().zip(at.base_offset..) {
                    model.records.push(StoredRecord {
                        offset,
                        timestamp: r.timestamp.unwrap(),
                        flags: r.flags,
                        key: r.key.clone(),
                        headers: r.headers.clone(),
                        payload: r.payload.clone(),
                    });
                }
            }
            Op::Read {
                from,
                max_records,
                max_bytes,
            } => {
                let from = model.at_fraction(from);
                let got = l.read(from, max_records, max_bytes).unwrap();
                assert_eq!(
                    got,
                    model.read(from, max_records, max_bytes),
                    "read from {from}"
                );
            }
            Op::TimeLookup(ts) => {
                assert_eq!(
                    l.offset_for_timestamp(ts).unwrap(),
                    model.offset_for_timestamp(ts),
                    "timestamp {ts}"
                );
            }
            Op::Truncate(f) => {
                let new_end = model.at_fraction(f);
                l.truncate_to(new_end).unwrap();
                model.records.truncate((new_end - model.start) as usize);
            }
            Op::Reopen => {
                drop(log.take());
                log = Some(Log::open(dir.path(), config.clone()).unwrap());
            }
            Op::Retention => {
                let size_before = l.stats().size_bytes;
                l.apply_retention().unwrap();
                let start = l.start_offset();
                assert!(start >= model.start && start <= model.end());
                let policy = config.retention;
                let stats = l.stats();
                // A count or size bound alone is a floor: retention never keeps less than it
                // asks (or than there was). With several bounds, each may delete on its own.
                let bounds = [
                    policy.max_age.is_some(),
                    policy.max_records.is_some(),
                    policy.max_bytes.is_some(),
                ];
                if bounds.iter().filter(|b| **b).count() == 1 {
                    if let Some(m) = policy.max_records {
                        assert!(model.end() - start >= m.min(model.end() - model.start));
                    }
                    if let Some(m) = policy.max_bytes {
                        assert!(stats.size_bytes >= m.min(size_before));
                    }
                }
                model.records.drain(..(start - model.start) as usize);
                model.start = start;
            }
        }
        let l = log.as_ref().unwrap();
        assert_eq!(
            (l.start_offset(), l.next_offset()),
            (model.start, model.end())
        );
    }
    let l = log.as_ref().unwrap();
    let all = l.read(model.start, usize::MAX, usize::MAX).unwrap();
    assert_eq!(all, model.records);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn log_behaves_like_a_vector(
        config in config_strategy(),
        ops in proptest::collection::vec(op_strategy(), 1..60),
    ) {
        run(config, ops);
    }
}
