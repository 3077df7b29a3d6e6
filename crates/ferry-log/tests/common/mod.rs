//! Helpers shared by the integration tests.
#![allow(clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};

use bytes::Bytes;
use ferry_log::{Durability, Log, LogConfig, RecordIn, StoredRecord};

/// A config with small segments and indexes so that rolling and index look-ups happen.
pub fn small_config() -> LogConfig {
    LogConfig {
        segment_bytes: 2048,
        index_interval_bytes: 128,
        durability: Durability::Never,
        cache_bytes: 0,
        ..LogConfig::default()
    }
}

/// Deterministic payload of record `n`: length and bytes derived from `n`.
pub fn payload(n: u64) -> Bytes {
    let len = (n.wrapping_mul(2654435761) % 97 + 1) as usize;
    (0..len)
        .map(|i| (n.wrapping_mul(31).wrapping_add(i as u64 * 7) ^ (n >> 8)) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// Record `n`: key `k<n>`, timestamp `1000 + n`, deterministic payload, one header.
pub fn record(n: u64) -> RecordIn {
    RecordIn::new(payload(n))
        .with_key(format!("k{n}"))
        .with_timestamp(1000 + n)
        .with_flags((n % 7) as u16)
        .with_header("n", n.to_string())
}

/// Checks that `r` is record `n` as made by [`record`].
pub fn assert_record(r: &StoredRecord, n: u64) {
    assert_eq!(r.offset, n);
    assert_eq!(r.payload, payload(n), "payload of {n}");
    assert_eq!(r.key.as_deref(), Some(format!("k{n}").as_bytes()));
    assert_eq!(r.timestamp, 1000 + n);
    assert_eq!(r.flags, (n % 7) as u16);
    assert_eq!(
        r.headers,
        vec![("n".to_string(), Bytes::from(n.to_string()))]
    );
}

/// Appends records `from..to` in batches of `batch`.
pub fn append_range(log: &Log, from: u64, to: u64, batch: u64) {
    let mut n = from;
    while n < to {
        let end = (n + batch).min(to);
        let records: Vec<RecordIn> = (n..end).map(record).collect();
        let at = log.append(&records).unwrap();
        assert_eq!((at.base_offset, at.last_offset), (n, end - 1));
        n = end;
    }
}

/// Reads the whole log.
pub fn read_all(log: &Log) -> Vec<StoredRecord> {
    log.read(log.start_offset(), usize::MAX, usize::MAX)
        .unwrap()
}

/// Files of `dir` with extension `ext`, sorted.
pub fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    out.sort();
    out
}

/// A small deterministic PRNG (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}
