//! The engine's storage trait: where a durable topic keeps its log, and where the broker keeps
//! consumer positions across restarts.
//!
//! The engine stays the source of truth for offsets: it assigns them under the topic's lock and
//! hands records to [`TopicStore::append`] in offset order, under that lock, so the stored log
//! and the in-memory log agree. Durability is a separate step, [`TopicStore::sync`], taken
//! outside the lock so that concurrent publishers share one flush (group commit); a durable
//! topic makes records visible to subscribers, and acknowledges them to their publisher, only
//! once their sync returned.
//!
//! Implementations block (disk I/O). The engine calls `append`, `append_part` and
//! [`Storage::commit_parts`] under the topic lock (so they must be buffered writes, not
//! flushes), from whatever thread publishes. Every other method that may wait for the disk
//! (`read`, `sync`, `offset_at`, `apply_retention`, `truncate_before`, and the [`Storage`]
//! methods) runs on the broker's own storage threads, with no engine lock held: its I/O
//! threads (`ferry-io-N`) and its commit thread (`ferry-commit`), or, before the broker
//! exists, the thread that opens it. [`on_storage_thread`] tells them apart from a runtime's
//! threads, and [`engine_locks_held`] counts the engine locks a thread holds (debug builds),
//! for a storage that wants to check where it is called. `start`, `end`, `size_bytes` and
//! `waits_for_sync` answer from memory and may be called anywhere.
//!
//! A topic's store may be opened more than once (two threads making the same topic at once
//! both open it before one of them registers it): [`Storage::open_topic`] must then return a
//! store over the same log.
//!
//! [`crate::disk::DiskStorage`] implements it over the `ferry-log` segmented log.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use crate::config::TopicConfig;
use crate::message::Message;
use crate::topic::TopicName;

pub use crate::io::{engine_locks_held, on_storage_thread};

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An I/O error on a path.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The log of a topic failed (corruption is reported with its position).
    #[error("topic {topic}: {reason}")]
    Log {
        /// The topic.
        topic: String,
        /// What went wrong, with the file and position where it applies.
        reason: String,
    },
    /// The engine and the store disagree on the next offset (the store was changed behind the
    /// broker's back).
    #[error("topic {topic}: the store expected offset {store} but the engine appends at {engine}")]
    OffsetMismatch {
        /// The topic.
        topic: String,
        /// The store's next offset.
        store: u64,
        /// The engine's next offset.
        engine: u64,
    },
    /// A stored message could not be decoded.
    #[error("topic {topic}: record {offset} is not a Ferry message: {reason}")]
    BadRecord {
        /// The topic.
        topic: String,
        /// Its offset.
        offset: u64,
        /// Why.
        reason: String,
    },
    /// Records of a topic are damaged on disk; readers skip `from..to` (reported, counted).
    #[error("topic {topic}: records {from}..{to} are damaged: {reason}")]
    Damaged {
        /// The topic.
        topic: String,
        /// First damaged offset.
        from: u64,
        /// Offset after the damaged range.
        to: u64,
        /// What is wrong, with the file and position.
        reason: String,
    },
    /// The positions file could not be read or written.
    #[error("consumer positions: {0}")]
    Positions(String),
}

/// A record read back from a store.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    /// Its offset.
    pub offset: u64,
    /// The message, as published (id, payload, headers, key, producer, times, priority).
    pub message: Message,
}

/// One topic's durable log.
pub trait TopicStore: Send + Sync + std::fmt::Debug {
    /// Appends `messages` at offsets `first..first + messages.len()`, all or none. Called under
    /// the topic lock, in offset order: a buffered write, durable only after [`sync`](Self::sync).
    fn append(&self, first: u64, messages: &[&Message]) -> Result<(), StorageError>;

    /// Appends like [`append`](Self::append) one topic's part of a transaction across topics;
    /// it survives a crash only if [`Storage::commit_parts`] then named it (with the id returned
    /// here) and that was synced. The default appends plainly (no atomicity across topics).
    fn append_part(&self, first: u64, messages: &[&Message]) -> Result<u64, StorageError> {
        self.append(first, messages).map(|()| 0)
    }

    /// Returns once everything appended below `end` meets the store's durability policy
    /// (an fsync shared with concurrent callers, or nothing to wait for).
    fn sync(&self, end: u64) -> Result<(), StorageError>;

    /// Whether [`sync`](Self::sync) has to wait for the disk (an fsync-always policy); if not,
    /// records are visible as soon as they are appended. Fixed for the store's lifetime (the
    /// topic reads it once).
    fn waits_for_sync(&self) -> bool;

    /// Up to `max` records from offset `from` (fewer at the end of the log).
    fn read(&self, from: u64, max: usize) -> Result<Vec<StoredMessage>, StorageError>;

    /// The first retained offset.
    fn start(&self) -> u64;

    /// The next offset to be appended.
    fn end(&self) -> u64;

    /// The first offset whose message was published at or after `time` (the end if none).
    fn offset_at(&self, time: SystemTime) -> Result<u64, StorageError>;

    /// Releases what the topic's retention no longer keeps (whole segments).
    fn apply_retention(&self) -> Result<(), StorageError>;

    /// Forgets every record below `offset` (purging a dead-letter queue).
    fn truncate_before(&self, offset: u64) -> Result<(), StorageError>;

    /// Bytes the log takes on disk.
    fn size_bytes(&self) -> u64;
}

/// Consumer positions: for each durable consumer (a consumer group, or a named fanout
/// subscription), the first offset of each topic it has not settled.
pub type Positions = BTreeMap<String, BTreeMap<String, u64>>;

/// Durable storage for a broker: topic logs and consumer positions.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Opens (or creates) the log of topic `name`.
    fn open_topic(
        &self,
        name: &TopicName,
        config: &TopicConfig,
    ) -> Result<Arc<dyn TopicStore>, StorageError>;

    /// The topics that have a log. This and the other catalog methods below (`has_topic`,
    /// `stored_depth`, `user_topic_count`) are answered from memory: the engine calls them on
    /// any thread, without waiting for the disk (the broker loads stored topics lazily and
    /// asks the catalog on publish and stats paths).
    fn topics(&self) -> Result<Vec<TopicName>, StorageError>;

    /// Whether topic `name` has a log (nothing is created).
    fn has_topic(&self, name: &TopicName) -> bool {
        self.topics().is_ok_and(|t| t.contains(name))
    }

    /// The records and bytes in topic `name`'s log, if it has one (nothing is opened).
    fn stored_depth(&self, name: &TopicName) -> Option<(u64, u64)> {
        let _ = name;
        None
    }

    /// At most `max` topics that have a log, in name order, from `from` (after it when
    /// `exclusive`). A catalog method like [`topics`](Self::topics); the default lists every
    /// topic, a store with an ordered catalog does only the work of the names returned.
    fn topics_from(&self, from: &str, exclusive: bool, max: usize) -> Vec<TopicName> {
        let mut names: Vec<TopicName> = self
            .topics()
            .unwrap_or_default()
            .into_iter()
            .filter(|t| {
                if exclusive {
                    t.as_str() > from
                } else {
                    t.as_str() >= from
                }
            })
            .collect();
        names.sort_unstable();
        names.truncate(max);
        names
    }

    /// The first offset, next offset and bytes of topic `name`'s log, if it has one (nothing
    /// is opened). The default knows only the depth ([`stored_depth`](Self::stored_depth)).
    fn stored_bounds(&self, name: &TopicName) -> Option<(u64, u64, u64)> {
        self.stored_depth(name)
            .map(|(records, bytes)| (0, records, bytes))
    }

    /// Calls `visit` with the name, records and bytes of every stored topic (a catalog
    /// method: from memory, without copying every name where the store allows).
    fn for_each_stored(&self, visit: &mut dyn FnMut(&str, u64, u64)) {
        for name in self.topics().unwrap_or_default() {
            if let Some((records, bytes)) = self.stored_depth(&name) {
                visit(name.as_str(), records, bytes);
            }
        }
    }

    /// How many user topics (not `$`-prefixed system topics) have a log.
    fn user_topic_count(&self) -> usize {
        self.topics()
            .map_or(0, |t| t.iter().filter(|t| !t.is_system()).count())
    }

    /// Forgets topic `name`'s log if it holds no record and nothing has it open (a catalog
    /// change, durable with the next sync): the name leaves the catalog, and opening it again
    /// makes a new log from offset 0. Returns whether it was forgotten. The default keeps
    /// every log.
    fn forget_topic(&self, name: &TopicName) -> Result<bool, StorageError> {
        let _ = name;
        Ok(false)
    }

    /// Closes the storage at the end of the broker's shutdown: what it has is made durable and
    /// its directory may be opened again at once (later calls fail). The default does nothing.
    fn close(&self) -> Result<(), StorageError> {
        Ok(())
    }

    /// The positions saved last.
    fn load_positions(&self) -> Result<Positions, StorageError>;

    /// Saves positions atomically (all of them or, after a crash, the previous set).
    fn save_positions(&self, positions: &Positions) -> Result<(), StorageError>;

    /// Records that the transaction parts `parts` (ids from [`TopicStore::append_part`]) are
    /// committed: after a crash they survive together, durable with the next sync. The default
    /// does nothing.
    fn commit_parts(&self, parts: &[u64]) -> Result<(), StorageError> {
        let _ = parts;
        Ok(())
    }

    /// Makes everything appended to any topic so far durable (before consumer positions that
    /// point into it are saved).
    fn sync(&self) -> Result<(), StorageError>;
}
