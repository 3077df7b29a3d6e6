//! A storage that fails on demand, for testing what a broker (and a server over it) answers
//! when the disk fails: [`FaultyStorage`] wraps any [`Storage`] and, while a [`Faults`] switch
//! is on, makes topic appends or topic syncs fail with "No space left on device" (`ENOSPC`),
//! as a full disk does, without writing anything, or makes syncs slow.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use ferry::fault::{Faults, FaultyStorage};
//! let dir = tempfile::tempdir()?;
//! let disk = ferry::disk::DiskStorage::open(dir.path(), Default::default())?;
//! let faults = Faults::default();
//! let storage = FaultyStorage::new(Arc::new(disk), faults.clone());
//! let broker = ferry::Broker::with_storage(Default::default(), Arc::new(storage))?;
//! faults.fail_appends(true);
//! assert!(broker.try_publish("t", "x").unwrap_err().is_in_doubt());
//! faults.fail_appends(false);
//! broker.try_publish("t", "x")?;
//! # Ok(()) }
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use crate::config::TopicConfig;
use crate::message::Message;
use crate::storage::{Positions, Storage, StorageError, StoredMessage, TopicStore};
use crate::topic::TopicName;

/// The switches of a [`FaultyStorage`] (cheap to clone: clones share them).
#[derive(Debug, Clone, Default)]
pub struct Faults(Arc<Switches>);

#[derive(Debug, Default)]
struct Switches {
    appends: AtomicBool,
    syncs: AtomicBool,
    /// Milliseconds each topic sync waits before it runs (a slow disk).
    sync_delay_ms: AtomicU64,
    failed: AtomicU64,
}

impl Faults {
    /// While on, every topic append fails (nothing is written).
    pub fn fail_appends(&self, on: bool) {
        self.0.appends.store(on, Ordering::SeqCst);
    }

    /// While on, every topic sync fails (what was appended stays written but not synced).
    pub fn fail_syncs(&self, on: bool) {
        self.0.syncs.store(on, Ordering::SeqCst);
    }

    /// Makes every topic sync wait `delay` first (a slow disk; zero: none).
    pub fn delay_syncs(&self, delay: std::time::Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.0.sync_delay_ms.store(ms, Ordering::SeqCst);
    }

    /// How many calls failed so far.
    pub fn failed(&self) -> u64 {
        self.0.failed.load(Ordering::SeqCst)
    }

    fn check(&self, switch: &AtomicBool, what: &str) -> Result<(), StorageError> {
        if !switch.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.0.failed.fetch_add(1, Ordering::SeqCst);
        Err(StorageError::Io {
            path: PathBuf::from(format!("(injected {what} fault)")),
            source: std::io::Error::from_raw_os_error(28),
        })
    }
}

/// A [`Storage`] over another whose topic appends and syncs fail while its [`Faults`] say so.
#[derive(Debug)]
pub struct FaultyStorage {
    inner: Arc<dyn Storage>,
    faults: Faults,
}

impl FaultyStorage {
    /// Wraps `inner`, failing as `faults` says.
    pub fn new(inner: Arc<dyn Storage>, faults: Faults) -> FaultyStorage {
        FaultyStorage { inner, faults }
    }
}

#[derive(Debug)]
struct FaultyTopic {
    inner: Arc<dyn TopicStore>,
    faults: Faults,
}

impl Storage for FaultyStorage {
    fn open_topic(
        &self,
        name: &TopicName,
        config: &TopicConfig,
    ) -> Result<Arc<dyn TopicStore>, StorageError> {
        Ok(Arc::new(FaultyTopic {
            inner: self.inner.open_topic(name, config)?,
            faults: self.faults.clone(),
        }))
    }

    fn topics(&self) -> Result<Vec<TopicName>, StorageError> {
        self.inner.topics()
    }

    fn has_topic(&self, name: &TopicName) -> bool {
        self.inner.has_topic(name)
    }

    fn forget_topic(&self, name: &TopicName) -> Result<bool, StorageError> {
        self.inner.forget_topic(name)
    }

    fn stored_depth(&self, name: &TopicName) -> Option<(u64, u64)> {
        self.inner.stored_depth(name)
    }

    fn user_topic_count(&self) -> usize {
        self.inner.user_topic_count()
    }

    fn close(&self) -> Result<(), StorageError> {
        self.inner.close()
    }

    fn load_positions(&self) -> Result<Positions, StorageError> {
        self.inner.load_positions()
    }

    fn save_positions(&self, positions: &Positions) -> Result<(), StorageError> {
        self.inner.save_positions(positions)
    }

    fn commit_parts(&self, parts: &[u64]) -> Result<(), StorageError> {
        self.inner.commit_parts(parts)
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.faults.check(&self.faults.0.syncs, "sync")?;
        self.inner.sync()
    }
}

impl TopicStore for FaultyTopic {
    fn append(&self, first: u64, messages: &[&Message]) -> Result<(), StorageError> {
        self.faults.check(&self.faults.0.appends, "append")?;
        self.inner.append(first, messages)
    }

    fn append_part(&self, first: u64, messages: &[&Message]) -> Result<u64, StorageError> {
        self.faults.check(&self.faults.0.appends, "append")?;
        self.inner.append_part(first, messages)
    }

    fn sync(&self, end: u64) -> Result<(), StorageError> {
        let delay = self.faults.0.sync_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(std::time::Duration::from_millis(delay));
        }
        self.faults.check(&self.faults.0.syncs, "sync")?;
        self.inner.sync(end)
    }

    fn waits_for_sync(&self) -> bool {
        self.inner.waits_for_sync()
    }

    fn read(&self, from: u64, max: usize) -> Result<Vec<StoredMessage>, StorageError> {
        self.inner.read(from, max)
    }

    fn start(&self) -> u64 {
        self.inner.start()
    }

    fn end(&self) -> u64 {
        self.inner.end()
    }

    fn offset_at(&self, time: SystemTime) -> Result<u64, StorageError> {
        self.inner.offset_at(time)
    }

    fn apply_retention(&self) -> Result<(), StorageError> {
        self.inner.apply_retention()
    }

    fn truncate_before(&self, offset: u64) -> Result<(), StorageError> {
        self.inner.truncate_before(offset)
    }

    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
}
