//! [`LogConfig`], [`Durability`] and [`RetentionPolicy`].

use std::time::Duration;

use crate::codec::{Compression, BATCH_HEADER_LEN, MAX_BATCH_BYTES, SEGMENT_HEADER_LEN};
use crate::error::LogError;

/// When `append` may return relative to fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `append` returns once its batch is on stable storage (`File::sync_data`). Concurrent
    /// appenders share fsyncs (group commit).
    Always,
    /// `append` returns once its batch is written to the OS; a background thread syncs every
    /// interval (and on drop).
    Interval(Duration),
    /// Data reaches the disk when the OS writes its cache back (survives a process crash, not a
    /// power loss).
    Never,
}

/// Which sealed segments [`crate::Log::apply_retention`] deletes. Each limit is checked
/// independently; the oldest segments go first and the active segment is never deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetentionPolicy {
    /// Delete the oldest segment while what would remain is still at least this many bytes on
    /// disk: a floor, as in Kafka (the log keeps between this and one segment more).
    pub max_bytes: Option<u64>,
    /// Delete segments whose newest record timestamp is older than this.
    pub max_age: Option<Duration>,
    /// Delete the oldest segment while the records that would remain are still at least this
    /// many (a floor, like `max_bytes`).
    pub max_records: Option<u64>,
}

/// Configuration of a [`crate::Log`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// Roll to a new segment when appending a batch would make the active one larger than this
    /// (a segment holds at least one batch whatever its size). Default 256 MiB.
    pub segment_bytes: u64,
    /// Roll when the active segment is non-empty and was created longer ago than this. Default
    /// none.
    pub segment_max_age: Option<Duration>,
    /// One offset-index and time-index entry at most every this many bytes of segment. Default
    /// 4 KiB.
    pub index_interval_bytes: u64,
    /// Largest encoded batch `append` accepts ([`LogError::RecordTooLarge`] beyond). Default
    /// 16 MiB, at most [`MAX_BATCH_BYTES`].
    pub max_batch_bytes: u32,
    /// Fsync policy. Default [`Durability::Always`].
    pub durability: Durability,
    /// Codec for appended batches. Default none.
    pub compression: Compression,
    /// Bytes of recently appended records kept in memory to serve tail reads. Default 4 MiB; 0
    /// disables the cache.
    pub cache_bytes: usize,
    /// Retention limits applied by `apply_retention`. Default none.
    pub retention: RetentionPolicy,
    /// Open even when a segment is damaged: the damage is reported by
    /// [`crate::Log::recovery_notes`], the rest of that segment from the damage on is skipped by
    /// [`crate::Log::scan`], and reads that meet it are [`crate::LogError::Corrupt`]. Damage in
    /// the middle of the active segment is contained the same way: the valid batches after it
    /// move to a new segment starting at their offset, where appends go on (see the crate
    /// docs, RECOVERY). Without it (the default) such damage fails the open.
    pub tolerate_damage: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 256 << 20,
            segment_max_age: None,
            index_interval_bytes: 4096,
            max_batch_bytes: 16 << 20,
            durability: Durability::Always,
            compression: Compression::None,
            cache_bytes: 4 << 20,
            retention: RetentionPolicy::default(),
            tolerate_damage: false,
        }
    }
}

impl LogConfig {
    pub(crate) fn validate(&self) -> Result<(), LogError> {
        let invalid = |m: &str| Err(LogError::InvalidConfig(m.into()));
        if self.segment_bytes < SEGMENT_HEADER_LEN + BATCH_HEADER_LEN as u64 {
            return invalid("segment_bytes is smaller than one header");
        }
        if self.index_interval_bytes == 0 {
            return invalid("index_interval_bytes must be positive");
        }
        if self.max_batch_bytes > MAX_BATCH_BYTES
            || (self.max_batch_bytes as usize) < BATCH_HEADER_LEN
        {
            return invalid("max_batch_bytes outside the format limits");
        }
        if self.durability == Durability::Interval(Duration::ZERO) {
            return invalid("durability interval must be positive");
        }
        Ok(())
    }
}
