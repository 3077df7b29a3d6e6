//! Durable storage on a data directory, over the `ferry-log` segmented log.
//!
//! Layout of the data directory:
//! - `topics/<name>/`: one `ferry-log` log per topic (segments, offset and time indexes). The
//!   directory name is the topic name with every byte outside `[A-Za-z0-9._-]` written as
//!   `%XX`, so any valid topic name maps to one directory and back;
//! - `positions.json`: consumer positions, replaced atomically (write, fsync, rename, fsync of
//!   the directory);
//! - `starts.json`: per topic, the offset below which records were purged (dead-letter purges),
//!   replaced the same way.
//!
//! A message is stored as a log record: payload, key and headers as they are, the timestamp in
//! milliseconds, the priority in the flags, and the rest of what Ferry knows about it (id,
//! timestamp in nanoseconds, producer, expiry and delivery times) in a first header that the
//! flag [`META`] marks as Ferry's own, so no user header can be mistaken for it.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
pub use ferry_log::Durability;
use ferry_log::{Log, LogConfig, RecordIn, RetentionPolicy, StoredRecord};
use parking_lot::Mutex;

use crate::config::{Retention, TopicConfig};
use crate::message::{Message, MessageId, Priority};
use crate::storage::{Positions, Storage, StorageError, StoredMessage, TopicStore};
use crate::topic::TopicName;

/// Flag: the record's first header is Ferry's metadata.
pub const META: u16 = 0x8000;
const PRIORITY_MASK: u16 = 0x0007;
const META_VERSION: u8 = 1;

/// Settings of a data directory.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// When a publish is acknowledged relative to fsync. Default: fsync before acknowledging,
    /// concurrent publishes sharing one fsync.
    pub durability: Durability,
    /// Segment files roll at this size. Default 64 MiB.
    pub segment_bytes: u64,
    /// Segment files roll at this age, if set.
    pub segment_max_age: Option<Duration>,
    /// Per topic, bytes of recently written records that the log keeps for tail reads.
    /// Default 1 MiB.
    pub cache_bytes: usize,
    /// Compress batches with lz4.
    pub compress: bool,
    /// Retention of topics whose configuration sets none (every bound `None`). Default: 7 days.
    pub default_retention: Retention,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            durability: Durability::Always,
            segment_bytes: 64 << 20,
            segment_max_age: None,
            cache_bytes: 1 << 20,
            compress: false,
            default_retention: Retention {
                max_age: Some(Duration::from_secs(7 * 24 * 3600)),
                ..Retention::default()
            },
        }
    }
}

/// A data directory holding topic logs and consumer positions.
#[derive(Debug)]
pub struct DiskStorage {
    dir: PathBuf,
    config: DiskConfig,
    /// Purge marks, shared with the topics (see `starts.json`).
    starts: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl DiskStorage {
    /// Opens (creating if needed) the data directory `dir`.
    pub fn open(dir: impl AsRef<Path>, config: DiskConfig) -> Result<DiskStorage, StorageError> {
        let dir = dir.as_ref().to_path_buf();
        let topics = dir.join("topics");
        fs::create_dir_all(&topics).map_err(|source| StorageError::Io {
            path: topics.clone(),
            source,
        })?;
        let starts = read_json(&dir.join("starts.json"))?.unwrap_or_default();
        Ok(DiskStorage {
            dir,
            config,
            starts: Arc::new(Mutex::new(starts)),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn log_config(&self, topic: &TopicConfig) -> LogConfig {
        let r = &topic.retention;
        let r = if r.max_age.is_none() && r.max_bytes.is_none() && r.max_messages.is_none() {
            &self.config.default_retention
        } else {
            r
        };
        LogConfig {
            segment_bytes: self.config.segment_bytes,
            segment_max_age: self.config.segment_max_age,
            durability: self.config.durability,
            cache_bytes: self.config.cache_bytes,
            compression: if self.config.compress {
                ferry_log::Compression::Lz4
            } else {
                ferry_log::Compression::None
            },
            retention: RetentionPolicy {
                max_bytes: r.max_bytes.map(|b| b as u64),
                max_age: r.max_age,
                max_records: r.max_messages.map(|m| m as u64),
            },
            ..LogConfig::default()
        }
    }
}

impl Storage for DiskStorage {
    fn open_topic(
        &self,
        name: &TopicName,
        config: &TopicConfig,
    ) -> Result<Arc<dyn TopicStore>, StorageError> {
        let dir = self.dir.join("topics").join(encode_name(name.as_str()));
        let log =
            Log::open(&dir, self.log_config(config)).map_err(|e| log_error(name.as_str(), e))?;
        Ok(Arc::new(DiskTopic {
            name: name.to_string(),
            log,
            always: self.config.durability == Durability::Always,
            starts: self.starts.clone(),
            starts_file: self.dir.join("starts.json"),
        }))
    }

    fn topics(&self) -> Result<Vec<TopicName>, StorageError> {
        let topics = self.dir.join("topics");
        let entries = fs::read_dir(&topics).map_err(|source| StorageError::Io {
            path: topics.clone(),
            source,
        })?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| StorageError::Io {
                path: topics.clone(),
                source,
            })?;
            let file = entry.file_name();
            let decoded = file.to_str().and_then(decode_name).and_then(|n| {
                match n.strip_prefix("$dlq/") {
                    // A dead-letter queue: a system name over a valid topic name.
                    Some(source) => TopicName::new(source).ok().map(|_| TopicName::system(n)),
                    None => TopicName::new(n).ok(),
                }
            });
            match decoded {
                Some(name) => names.push(name),
                None => tracing::warn!(entry = ?file, "ignoring a directory that is not a topic"),
            }
        }
        names.sort();
        Ok(names)
    }

    fn load_positions(&self) -> Result<Positions, StorageError> {
        Ok(read_json(&self.dir.join("positions.json"))?.unwrap_or_default())
    }

    fn save_positions(&self, positions: &Positions) -> Result<(), StorageError> {
        write_json_atomic(&self.dir.join("positions.json"), positions)
    }
}

/// One topic's log.
#[derive(Debug)]
struct DiskTopic {
    name: String,
    log: Log,
    always: bool,
    starts: Arc<Mutex<BTreeMap<String, u64>>>,
    starts_file: PathBuf,
}

impl DiskTopic {
    fn purged_below(&self) -> u64 {
        self.starts.lock().get(&self.name).copied().unwrap_or(0)
    }

    fn err(&self, e: ferry_log::LogError) -> StorageError {
        log_error(&self.name, e)
    }
}

impl TopicStore for DiskTopic {
    fn append(&self, first: u64, messages: &[&Message]) -> Result<(), StorageError> {
        let end = self.log.next_offset();
        if end != first {
            return Err(StorageError::OffsetMismatch {
                topic: self.name.clone(),
                store: end,
                engine: first,
            });
        }
        if messages.is_empty() {
            return Ok(());
        }
        let records: Vec<RecordIn> = messages.iter().map(|m| encode_message(m)).collect();
        self.log
            .append_buffered(&records)
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn sync(&self, _end: u64) -> Result<(), StorageError> {
        if self.always {
            self.log.sync().map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    fn waits_for_sync(&self) -> bool {
        self.always
    }

    fn read(&self, from: u64, max: usize) -> Result<Vec<StoredMessage>, StorageError> {
        let from = from.max(self.start());
        if from >= self.log.next_offset() || max == 0 {
            return Ok(Vec::new());
        }
        let records = self.log.read(from, max, 4 << 20).map_err(|e| self.err(e))?;
        records
            .into_iter()
            .map(|r| {
                let offset = r.offset;
                decode_record(r)
                    .map(|message| StoredMessage { offset, message })
                    .map_err(|reason| StorageError::BadRecord {
                        topic: self.name.clone(),
                        offset,
                        reason,
                    })
            })
            .collect()
    }

    fn start(&self) -> u64 {
        self.log
            .start_offset()
            .max(self.purged_below())
            .min(self.log.next_offset())
    }

    fn end(&self) -> u64 {
        self.log.next_offset()
    }

    fn offset_at(&self, time: SystemTime) -> Result<u64, StorageError> {
        let ms = time
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let found = self.log.offset_for_timestamp(ms).map_err(|e| self.err(e))?;
        Ok(found.unwrap_or_else(|| self.end()).max(self.start()))
    }

    fn apply_retention(&self) -> Result<(), StorageError> {
        self.log.apply_retention().map_err(|e| self.err(e))?;
        Ok(())
    }

    fn truncate_before(&self, offset: u64) -> Result<(), StorageError> {
        let offset = offset.min(self.end());
        let snapshot = {
            let mut starts = self.starts.lock();
            let entry = starts.entry(self.name.clone()).or_insert(0);
            if *entry >= offset {
                return Ok(());
            }
            *entry = offset;
            starts.clone()
        };
        write_json_atomic(&self.starts_file, &snapshot)
    }

    fn size_bytes(&self) -> u64 {
        self.log.stats().size_bytes
    }
}

fn log_error(topic: &str, e: ferry_log::LogError) -> StorageError {
    StorageError::Log {
        topic: topic.to_string(),
        reason: e.to_string(),
    }
}

/// Nanoseconds since the Unix epoch (0 for earlier times).
fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn from_nanos(n: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(n)
}

/// The log record of a message.
pub(crate) fn encode_message(m: &Message) -> RecordIn {
    let producer = m.producer_id().unwrap_or("");
    let mut meta = BytesMut::with_capacity(41 + producer.len());
    meta.put_u8(META_VERSION);
    meta.put_slice(m.id().as_uuid().as_bytes());
    meta.put_u64(nanos(m.timestamp()));
    meta.put_u64(m.expires_at().map_or(0, nanos));
    meta.put_u64(m.deliver_at().map_or(0, nanos));
    meta.put_slice(producer.as_bytes());
    let mut headers = Vec::with_capacity(m.headers().len() + 1);
    headers.push((String::new(), meta.freeze()));
    headers.extend(
        m.headers()
            .iter()
            .map(|(k, v)| (k.to_string(), Bytes::copy_from_slice(v.as_bytes()))),
    );
    RecordIn {
        timestamp: Some(nanos(m.timestamp()) / 1_000_000),
        flags: META | (m.priority() as u16 & PRIORITY_MASK),
        key: m.key().cloned(),
        headers,
        payload: m.payload().clone(),
    }
}

/// The message of a log record written by [`encode_message`].
pub(crate) fn decode_record(r: StoredRecord) -> Result<Message, String> {
    if r.flags & META == 0 {
        return Err("no Ferry metadata".into());
    }
    let mut headers = r.headers.into_iter();
    let (_, meta) = headers.next().ok_or("metadata header missing")?;
    let mut meta = meta;
    if meta.len() < 41 || meta.get_u8() != META_VERSION {
        return Err("unknown metadata version or truncated metadata".into());
    }
    let mut id = [0u8; 16];
    meta.copy_to_slice(&mut id);
    let timestamp = from_nanos(meta.get_u64());
    let expires = meta.get_u64();
    let deliver = meta.get_u64();
    let producer = std::str::from_utf8(&meta).map_err(|_| "producer id is not UTF-8")?;
    let priority = match r.flags & PRIORITY_MASK {
        0 => Priority::Lowest,
        1 => Priority::Low,
        2 => Priority::Normal,
        3 => Priority::High,
        4 => Priority::Highest,
        p => return Err(format!("unknown priority {p}")),
    };
    let mut b = Message::builder()
        .id(MessageId::from_uuid(uuid::Uuid::from_bytes(id)))
        .timestamp(timestamp)
        .payload(r.payload)
        .priority(priority);
    if let Some(key) = r.key {
        b = b.key(key);
    }
    if !producer.is_empty() {
        b = b.producer(producer);
    }
    if expires != 0 {
        b = b.expires_at(from_nanos(expires));
    }
    if deliver != 0 {
        b = b.deliver_at(from_nanos(deliver));
    }
    let mut message = b.build();
    for (k, v) in headers {
        let v = String::from_utf8(v.to_vec()).map_err(|_| format!("header {k:?} is not UTF-8"))?;
        message.headers_mut().append(k, v);
    }
    Ok(message)
}

/// A topic name as a directory name (see the module docs).
fn encode_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode_name(dir: &str) -> Option<String> {
    let bytes = dir.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = dir.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StorageError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StorageError::Positions(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StorageError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Replaces `path` with `value` so that a crash leaves the old or the new file, whole.
fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), StorageError> {
    let io = |source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bytes = serde_json::to_vec(value).map_err(|e| StorageError::Positions(e.to_string()))?;
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp).map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for name in [
            "a",
            "telemetry/node-1/gpu",
            "$dlq/orders",
            "game.player.*",
            "ü/%",
        ] {
            let enc = encode_name(name);
            assert!(enc
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-%".contains(&b)));
            assert_eq!(decode_name(&enc).as_deref(), Some(name));
        }
        assert_eq!(decode_name("%G1"), None);
        assert_eq!(decode_name("%4"), None);
    }

    #[test]
    fn messages_round_trip_through_records() {
        let m = Message::builder()
            .payload("payload")
            .key("k")
            .header("a", "1")
            .header("b", "2")
            .producer("p-1")
            .priority(Priority::High)
            .ttl(Duration::from_secs(60))
            .delay(Duration::from_secs(5))
            .build();
        let r = encode_message(&m);
        let stored = StoredRecord {
            offset: 7,
            timestamp: r.timestamp.unwrap(),
            flags: r.flags,
            key: r.key.clone(),
            headers: r.headers.clone(),
            payload: r.payload.clone(),
        };
        let back = decode_record(stored).unwrap();
        assert_eq!(back.id(), m.id());
        assert_eq!(back.payload(), m.payload());
        assert_eq!(back.key(), m.key());
        assert_eq!(back.headers(), m.headers());
        assert_eq!(back.timestamp(), m.timestamp());
        assert_eq!(back.producer_id(), Some("p-1"));
        assert_eq!(back.priority(), Priority::High);
        assert_eq!(back.expires_at(), m.expires_at());
        assert_eq!(back.deliver_at(), m.deliver_at());
    }

    #[test]
    fn foreign_or_damaged_records_are_errors() {
        let plain = StoredRecord {
            offset: 0,
            timestamp: 0,
            flags: 0,
            key: None,
            headers: vec![],
            payload: Bytes::new(),
        };
        assert!(decode_record(plain.clone()).is_err());
        let short = StoredRecord {
            flags: META,
            headers: vec![(String::new(), Bytes::from_static(&[1, 2, 3]))],
            ..plain
        };
        assert!(decode_record(short).is_err());
    }
}
