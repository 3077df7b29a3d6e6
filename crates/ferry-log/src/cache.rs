//! A bounded cache of recently appended batches, serving tail reads without touching the disk.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::record::StoredRecord;

/// Records of one appended batch.
#[derive(Debug)]
pub(crate) struct CachedBatch {
    pub records: Vec<StoredRecord>,
    size: usize,
}

impl CachedBatch {
    /// Offset after the batch's last record.
    pub fn next_offset(&self) -> u64 {
        self.records.last().map_or(0, |r| r.offset + 1)
    }
}

/// Batches by base offset; the oldest go first when `capacity` bytes are exceeded.
#[derive(Debug)]
pub(crate) struct BatchCache {
    capacity: usize,
    used: usize,
    batches: BTreeMap<u64, Arc<CachedBatch>>,
}

impl BatchCache {
    pub fn new(capacity: usize) -> Self {
        BatchCache {
            capacity,
            used: 0,
            batches: BTreeMap::new(),
        }
    }

    /// Adds a batch of `size` bytes (skipped if larger than the whole cache).
    pub fn insert(&mut self, records: Vec<StoredRecord>, size: usize) {
        let Some(base) = records.first().map(|r| r.offset) else {
            return;
        };
        if size > self.capacity {
            return;
        }
        while self.used + size > self.capacity {
            let Some((_, old)) = self.batches.pop_first() else {
                break;
            };
            self.used -= old.size;
        }
        self.used += size;
        self.batches
            .insert(base, Arc::new(CachedBatch { records, size }));
    }

    /// The batch holding `offset`.
    pub fn get(&self, offset: u64) -> Option<Arc<CachedBatch>> {
        let (_, batch) = self.batches.range(..=offset).next_back()?;
        (offset < batch.next_offset()).then(|| Arc::clone(batch))
    }

    /// Drops batches holding offsets at or after `offset`.
    pub fn remove_from(&mut self, offset: u64) {
        self.retain(|b| b.next_offset() <= offset);
    }

    /// Drops batches holding offsets before `offset`.
    pub fn remove_below(&mut self, offset: u64) {
        self.retain(|b| b.records.first().is_some_and(|r| r.offset >= offset));
    }

    fn retain(&mut self, keep: impl Fn(&CachedBatch) -> bool) {
        let mut used = 0;
        self.batches.retain(|_, b| {
            let k = keep(b);
            if k {
                used += b.size;
            }
            k
        });
        self.used = used;
    }
}
