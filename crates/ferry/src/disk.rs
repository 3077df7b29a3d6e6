//! Durable storage on a data directory, over the `ferry-log` multi-stream [`Store`].
//!
//! Layout of the data directory:
//! - `store/`: one `ferry-log` store, a single segmented commit log that holds the records of
//!   every topic (each topic is a stream of the store, its name stored as data inside a control
//!   record, never as a file name), so the open files do not depend on the number of topics
//!   and one fsync covers the appends of every topic waiting for it (group commit);
//! - `positions.json`: consumer positions, replaced atomically (write, fsync, rename, fsync of
//!   the directory).
//!
//! A data directory of the first layout (`topics/<name>/`, a segmented log per topic, and
//! `starts.json`) is migrated when it is first opened: every topic's records are copied into
//! `store.migrating/` with their offsets, which is synced and renamed to `store/`; only then
//! are `topics/` and `starts.json` removed. A crash during the migration leaves the old layout
//! in place and the next open starts it again.
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
use ferry_log::{
    Log, LogConfig, RecordIn, RetentionPolicy, Store, StoreConfig, StoredRecord, Stream,
};

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
    /// concurrent publishes (on any topics) sharing one fsync.
    pub durability: Durability,
    /// Segment files of the commit log roll at this size. Default 64 MiB.
    pub segment_bytes: u64,
    /// Segment files roll at this age, if set.
    pub segment_max_age: Option<Duration>,
    /// Unused since the shared commit log (recent records are the engine's hot window); kept
    /// so that existing configurations still build.
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

/// A data directory holding the commit log of every topic and the consumer positions.
#[derive(Debug)]
pub struct DiskStorage {
    dir: PathBuf,
    config: DiskConfig,
    store: Store,
}

impl DiskStorage {
    /// Opens (creating if needed) the data directory `dir`, migrating the first layout (see
    /// the module docs).
    pub fn open(dir: impl AsRef<Path>, config: DiskConfig) -> Result<DiskStorage, StorageError> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|source| StorageError::Io {
            path: dir.clone(),
            source,
        })?;
        let store_dir = dir.join("store");
        if dir.join("topics").is_dir() {
            migrate_v1(&dir, &config)?;
        }
        let store = Store::open(&store_dir, store_config(&config)).map_err(store_error)?;
        Ok(DiskStorage { dir, config, store })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn retention(&self, topic: &TopicConfig) -> RetentionPolicy {
        let r = &topic.retention;
        let r = if r.max_age.is_none() && r.max_bytes.is_none() && r.max_messages.is_none() {
            &self.config.default_retention
        } else {
            r
        };
        RetentionPolicy {
            max_bytes: r.max_bytes.map(|b| b as u64),
            max_age: r.max_age,
            max_records: r.max_messages.map(|m| m as u64),
        }
    }
}

fn store_config(config: &DiskConfig) -> StoreConfig {
    StoreConfig {
        log: LogConfig {
            segment_bytes: config.segment_bytes,
            segment_max_age: config.segment_max_age,
            durability: config.durability,
            compression: if config.compress {
                ferry_log::Compression::Lz4
            } else {
                ferry_log::Compression::None
            },
            ..LogConfig::default()
        },
        ..StoreConfig::default()
    }
}

fn store_error(e: ferry_log::LogError) -> StorageError {
    StorageError::Log {
        topic: "(commit log)".into(),
        reason: e.to_string(),
    }
}

/// A topic name read back from the store (dead-letter queues are system names over a valid
/// topic name).
fn topic_name(n: &str) -> Option<TopicName> {
    match n.strip_prefix("$dlq/") {
        Some(source) => TopicName::new(source)
            .ok()
            .map(|_| TopicName::system(n.to_string())),
        None => TopicName::new(n).ok(),
    }
}

impl Storage for DiskStorage {
    fn open_topic(
        &self,
        name: &TopicName,
        config: &TopicConfig,
    ) -> Result<Arc<dyn TopicStore>, StorageError> {
        let stream = self
            .store
            .stream(name.as_str())
            .map_err(|e| log_error(name.as_str(), e))?;
        stream.set_retention(self.retention(config));
        Ok(Arc::new(DiskTopic {
            name: name.to_string(),
            stream,
            store: self.store.clone(),
            always: self.config.durability == Durability::Always,
        }))
    }

    fn topics(&self) -> Result<Vec<TopicName>, StorageError> {
        let mut names = Vec::new();
        for n in self.store.stream_names() {
            match topic_name(&n) {
                Some(name) => names.push(name),
                None => tracing::warn!(stream = ?n, "ignoring a stream that is not a topic"),
            }
        }
        Ok(names)
    }

    fn load_positions(&self) -> Result<Positions, StorageError> {
        Ok(read_json(&self.dir.join("positions.json"))?.unwrap_or_default())
    }

    fn save_positions(&self, positions: &Positions) -> Result<(), StorageError> {
        write_json_atomic(&self.dir.join("positions.json"), positions)
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.store.sync().map_err(store_error)
    }
}

/// One topic: a stream of the shared store.
#[derive(Debug)]
struct DiskTopic {
    name: String,
    stream: Stream,
    store: Store,
    always: bool,
}

impl DiskTopic {
    fn err(&self, e: ferry_log::LogError) -> StorageError {
        log_error(&self.name, e)
    }
}

impl TopicStore for DiskTopic {
    fn append(&self, first: u64, messages: &[&Message]) -> Result<(), StorageError> {
        let end = self.stream.next_offset();
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
        self.stream
            .append(first, &records)
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn sync(&self, _end: u64) -> Result<(), StorageError> {
        if self.always {
            self.store.sync().map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    fn waits_for_sync(&self) -> bool {
        self.always
    }

    fn read(&self, from: u64, max: usize) -> Result<Vec<StoredMessage>, StorageError> {
        let from = from.max(self.start());
        if from >= self.stream.next_offset() || max == 0 {
            return Ok(Vec::new());
        }
        let records = self
            .stream
            .read(from, max, 4 << 20)
            .map_err(|e| self.err(e))?;
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
        self.stream.start()
    }

    fn end(&self) -> u64 {
        self.stream.next_offset()
    }

    fn offset_at(&self, time: SystemTime) -> Result<u64, StorageError> {
        let ms = time
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let found = self
            .stream
            .offset_for_timestamp(ms)
            .map_err(|e| self.err(e))?;
        Ok(found.unwrap_or_else(|| self.end()).max(self.start()))
    }

    fn apply_retention(&self) -> Result<(), StorageError> {
        self.stream.apply_retention().map_err(|e| self.err(e))?;
        Ok(())
    }

    fn truncate_before(&self, offset: u64) -> Result<(), StorageError> {
        if self.stream.trim(offset).map_err(|e| self.err(e))? {
            // A purge is durable when it returns, as it was with its own file.
            self.store.sync().map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    fn size_bytes(&self) -> u64 {
        self.stream.size_bytes()
    }
}

/// Copies a data directory of the first layout (a log per topic under `topics/`, purge marks
/// in `starts.json`) into a new store, keeping every offset, then removes the old files.
fn migrate_v1(dir: &Path, config: &DiskConfig) -> Result<(), StorageError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StorageError::Io { path, source }
    };
    let topics = dir.join("topics");
    let target = dir.join("store");
    if !target.exists() {
        let tmp = dir.join("store.migrating");
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        let starts: BTreeMap<String, u64> =
            read_json(&dir.join("starts.json"))?.unwrap_or_default();
        let store = Store::open(
            &tmp,
            store_config(&DiskConfig {
                durability: Durability::Never,
                ..config.clone()
            }),
        )
        .map_err(store_error)?;
        let mut migrated = 0usize;
        for entry in fs::read_dir(&topics).map_err(io(&topics))? {
            let entry = entry.map_err(io(&topics))?;
            let file = entry.file_name();
            let Some(name) = file.to_str().and_then(decode_name) else {
                tracing::warn!(entry = ?file, "migration: ignoring a directory that is not a topic");
                continue;
            };
            let log = Log::open(
                entry.path(),
                LogConfig {
                    durability: Durability::Never,
                    cache_bytes: 0,
                    ..LogConfig::default()
                },
            )
            .map_err(|e| log_error(&name, e))?;
            let stream = store.stream(&name).map_err(|e| log_error(&name, e))?;
            let purged = starts.get(&name).copied().unwrap_or(0);
            let mut next = log.start_offset().max(purged).min(log.next_offset());
            if next == log.next_offset() {
                stream.advance_to(next).map_err(|e| log_error(&name, e))?;
            }
            while next < log.next_offset() {
                let batch = log
                    .read(next, 4096, 4 << 20)
                    .map_err(|e| log_error(&name, e))?;
                let Some(first) = batch.first().map(|r| r.offset) else {
                    break;
                };
                let records: Vec<RecordIn> = batch
                    .into_iter()
                    .map(|r| RecordIn {
                        timestamp: Some(r.timestamp),
                        flags: r.flags,
                        key: r.key,
                        headers: r.headers,
                        payload: r.payload,
                    })
                    .collect();
                next = first + records.len() as u64;
                stream
                    .append(first, &records)
                    .map_err(|e| log_error(&name, e))?;
            }
            migrated += 1;
        }
        store.close().map_err(store_error)?;
        drop(store);
        fs::rename(&tmp, &target).map_err(io(&tmp))?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
        tracing::warn!(
            topics = migrated,
            "migrated the data directory to the shared commit log (store/)"
        );
    }
    fs::remove_dir_all(&topics).map_err(io(&topics))?;
    let starts = dir.join("starts.json");
    if starts.exists() {
        fs::remove_file(&starts).map_err(io(&starts))?;
    }
    Ok(())
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

/// A topic name as a directory name of the first layout.
#[cfg(test)]
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
