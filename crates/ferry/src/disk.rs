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

use std::cell::Cell;
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
        for note in store.recovery_notes() {
            // Opening without the index checkpoint (after a crash) only takes longer, and one
            // that is not used says why; every other note is about data cut, skipped or
            // quarantined.
            if note.starts_with("no index checkpoint") {
                tracing::info!(dir = %store_dir.display(), "{note}");
            } else if note.contains("index checkpoint") {
                tracing::warn!(dir = %store_dir.display(), "{note}");
            } else {
                tracing::error!(dir = %store_dir.display(), "{note}");
            }
        }
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

    fn has_topic(&self, name: &TopicName) -> bool {
        self.store.find(name.as_str()).is_some()
    }

    fn forget_topic(&self, name: &TopicName) -> Result<bool, StorageError> {
        self.store
            .forget(name.as_str())
            .map_err(|e| log_error(name.as_str(), e))
    }

    fn stored_depth(&self, name: &TopicName) -> Option<(u64, u64)> {
        let stream = self.store.find(name.as_str())?;
        let records = stream.next_offset().saturating_sub(stream.start());
        Some((records, stream.size_bytes()))
    }

    fn user_topic_count(&self) -> usize {
        self.store.count_streams(|n| !crate::topic::is_reserved(n))
    }

    fn topics_from(&self, from: &str, exclusive: bool, max: usize) -> Vec<TopicName> {
        let mut names = Vec::new();
        let (mut from, mut exclusive) = (from.to_string(), exclusive);
        // Names that are not topics are skipped (and warned about by `topics`); the next
        // chunk starts after the last name seen.
        while names.len() < max {
            let chunk = self
                .store
                .stream_names_from(&from, exclusive, max - names.len());
            let Some(last) = chunk.last().cloned() else {
                break;
            };
            names.extend(chunk.iter().filter_map(|n| topic_name(n)));
            (from, exclusive) = (last, true);
        }
        names
    }

    fn stored_bounds(&self, name: &TopicName) -> Option<(u64, u64, u64)> {
        let stream = self.store.find(name.as_str())?;
        Some((stream.start(), stream.next_offset(), stream.size_bytes()))
    }

    fn for_each_stored(&self, visit: &mut dyn FnMut(&str, u64, u64)) {
        self.store
            .for_each_stream(|name, records, bytes| visit(name, records, bytes));
    }

    fn close(&self) -> Result<(), StorageError> {
        self.store.close().map_err(store_error)
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

    fn commit_parts(&self, parts: &[u64]) -> Result<(), StorageError> {
        self.store.commit_parts(parts).map_err(store_error)
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

    /// Checks that records appended at `first` go at the stream's end.
    fn check_end(&self, first: u64) -> Result<(), StorageError> {
        let end = self.stream.next_offset();
        if end != first {
            return Err(StorageError::OffsetMismatch {
                topic: self.name.clone(),
                store: end,
                engine: first,
            });
        }
        Ok(())
    }
}

impl TopicStore for DiskTopic {
    fn append(&self, first: u64, messages: &[&Message]) -> Result<(), StorageError> {
        self.check_end(first)?;
        if messages.is_empty() {
            return Ok(());
        }
        with_records(messages, |records| self.stream.append(first, records))
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn append_part(&self, first: u64, messages: &[&Message]) -> Result<u64, StorageError> {
        self.check_end(first)?;
        with_records(messages, |records| self.stream.append_part(first, records))
            .map_err(|e| self.err(e))
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
        let records = self.stream.read(from, max, 4 << 20).map_err(|e| match e {
            ferry_log::LogError::Damaged {
                from, to, reason, ..
            } => StorageError::Damaged {
                topic: self.name.clone(),
                from,
                to,
                reason,
            },
            e => self.err(e),
        })?;
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
        // The store's index checkpoint, once enough was written since the last one.
        self.store.maybe_checkpoint().map_err(store_error)?;
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
            if !entry.path().is_dir() {
                tracing::warn!(entry = ?file, "migration: ignoring a file that is not a topic");
                continue;
            }
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

/// The log record of a message (appends build it in a reused [`Scratch`]: [`with_records`]).
#[cfg(test)]
pub(crate) fn encode_message(m: &Message) -> RecordIn {
    let mut record = RecordIn::default();
    encode_into(m, &mut record, &mut BytesMut::new());
    record
}

/// Bytes reserved at once for the metadata headers that [`Scratch`] cuts from its arena.
const META_ARENA: usize = 8 << 10;

/// What a thread reuses from one append to the next (see [`with_records`]): log records whose
/// header lists keep their capacity, and an arena the metadata headers are cut from. Between
/// appends the records hold nothing (no payload is kept alive by it).
#[derive(Default)]
struct Scratch {
    records: Vec<RecordIn>,
    meta: BytesMut,
}

/// The most records [`Scratch`] keeps between appends (a larger batch allocates the rest).
const SCRATCH_RECORDS: usize = 64;

thread_local! {
    static SCRATCH: Cell<Scratch> = Cell::new(Scratch::default());
}

/// Calls `f` with the log records of `messages` ([`encode_message`]), built in this thread's
/// [`Scratch`]: an append of a message without user headers allocates nothing here.
fn with_records<R>(messages: &[&Message], f: impl FnOnce(&[RecordIn]) -> R) -> R {
    // Taken out for the call (a nested or late call finds an empty one and allocates).
    let mut scratch = SCRATCH.try_with(Cell::take).unwrap_or_default();
    let Scratch { records, meta } = &mut scratch;
    if records.len() < messages.len() {
        records.resize_with(messages.len(), RecordIn::default);
    }
    for (m, record) in messages.iter().zip(records.iter_mut()) {
        encode_into(m, record, meta);
    }
    let out = f(&records[..messages.len()]);
    records.truncate(SCRATCH_RECORDS);
    for record in records.iter_mut().take(messages.len()) {
        record.key = None;
        record.headers.clear();
        record.payload = Bytes::new();
    }
    let _ = SCRATCH.try_with(|s| s.set(scratch));
    out
}

/// Writes the log record of `m` into `record` (whose header list is reused), cutting its
/// metadata from `arena`.
fn encode_into(m: &Message, record: &mut RecordIn, arena: &mut BytesMut) {
    let producer = m.producer_id().unwrap_or("");
    let len = 41 + producer.len();
    if arena.capacity() < len {
        arena.reserve(len.max(META_ARENA));
    }
    let timestamp = nanos(m.timestamp());
    arena.put_u8(META_VERSION);
    arena.put_slice(m.id().as_uuid().as_bytes());
    arena.put_u64(timestamp);
    arena.put_u64(m.expires_at().map_or(0, nanos));
    arena.put_u64(m.deliver_at().map_or(0, nanos));
    arena.put_slice(producer.as_bytes());
    let meta = arena.split().freeze();
    let headers = m.headers();
    record.headers.clear();
    record.headers.reserve(headers.len() + 1);
    record.headers.push((String::new(), meta));
    record.headers.extend(
        headers
            .iter()
            .map(|(k, v)| (k.to_string(), Bytes::copy_from_slice(v.as_bytes()))),
    );
    record.timestamp = Some(timestamp / 1_000_000);
    record.flags = META | (m.priority() as u16 & PRIORITY_MASK);
    record.key = m.key().cloned();
    record.payload = m.payload().clone();
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
    fn appends_reusing_their_records_store_each_message_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let storage = DiskStorage::open(
            dir.path(),
            DiskConfig {
                durability: Durability::Never,
                ..DiskConfig::default()
            },
        )
        .unwrap();
        let name = TopicName::new("reuse").unwrap();
        let store = storage.open_topic(&name, &TopicConfig::default()).unwrap();
        let rich = |i: usize| {
            Message::builder()
                .payload(format!("rich {i}"))
                .key(format!("k{i}"))
                .header("a", format!("{i}"))
                .header("b", "2")
                .producer(format!("p-{i}"))
                .priority(Priority::High)
                .ttl(Duration::from_secs(60))
                .build()
        };
        // Batches larger and smaller than the records kept between appends, rich messages
        // followed by plain ones (which must not inherit their headers, key or producer).
        let batches: Vec<Vec<Message>> = vec![
            (0..3).map(rich).collect(),
            vec![Message::new("plain 0")],
            (0..SCRATCH_RECORDS + 5).map(rich).collect(),
            (0..2).map(|i| Message::new(format!("plain {i}"))).collect(),
            vec![rich(9)],
        ];
        let mut next = 0;
        for batch in &batches {
            let refs: Vec<&Message> = batch.iter().collect();
            store.append(next, &refs).unwrap();
            next += batch.len() as u64;
        }
        let expected: Vec<&Message> = batches.iter().flatten().collect();
        let read = store.read(0, expected.len() + 1).unwrap();
        assert_eq!(read.len(), expected.len());
        for (i, (got, want)) in read.iter().zip(&expected).enumerate() {
            assert_eq!(got.offset, i as u64);
            assert_eq!(got.message.id(), want.id());
            assert_eq!(got.message.payload(), want.payload());
            assert_eq!(got.message.key(), want.key());
            assert_eq!(got.message.headers(), want.headers());
            assert_eq!(got.message.producer_id(), want.producer_id());
            assert_eq!(got.message.priority(), want.priority());
            assert_eq!(got.message.timestamp(), want.timestamp());
            assert_eq!(got.message.expires_at(), want.expires_at());
        }
        // A mismatched offset is refused without writing.
        let plain = Message::new("late");
        assert!(matches!(
            store.append(next + 1, &[&plain]),
            Err(StorageError::OffsetMismatch { .. })
        ));
        assert_eq!(store.end(), next);
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

    // ---- migration of the first layout -------------------------------------------------------

    /// A topic of a data directory of the first layout, as the old code wrote it.
    struct OldTopic {
        name: &'static str,
        /// Records per appended batch (each `Log::append` is one batch).
        batches: &'static [usize],
        /// Segment size of its log: small enough to roll every few batches when set.
        segment_bytes: Option<u64>,
        /// Sealed segments holding nothing at or after this offset were deleted (retention).
        retention_below: Option<u64>,
        /// Its purge mark in `starts.json`.
        purged_below: Option<u64>,
    }

    const OLD_TOPICS: &[OldTopic] = &[
        OldTopic {
            name: "orders",
            batches: &[2, 3],
            segment_bytes: None,
            retention_below: None,
            purged_below: None,
        },
        OldTopic {
            // Escaped as `telemetry%2Fnode-1%2Fgpu%20%C3%BC%25` in the old layout.
            name: "telemetry/node-1/gpu ü%",
            batches: &[1, 1, 2],
            segment_bytes: None,
            retention_below: None,
            purged_below: None,
        },
        OldTopic {
            name: "$dlq/orders",
            batches: &[1, 1],
            segment_bytes: None,
            retention_below: None,
            purged_below: None,
        },
        OldTopic {
            // Purged in the middle of a batch.
            name: "purged",
            batches: &[3, 3, 3, 1],
            segment_bytes: None,
            retention_below: None,
            purged_below: Some(4),
        },
        OldTopic {
            // Its log starts past 0 (retention deleted segments); its stale purge mark is
            // below that start.
            name: "retained",
            batches: &[1; 12],
            segment_bytes: Some(600),
            retention_below: Some(7),
            purged_below: Some(1),
        },
        OldTopic {
            // Purged entirely: nothing to copy, but its offsets must not be reused.
            name: "emptied",
            batches: &[3],
            segment_bytes: None,
            retention_below: None,
            purged_below: Some(3),
        },
        OldTopic {
            name: "never-written",
            batches: &[],
            segment_bytes: None,
            retention_below: None,
            purged_below: None,
        },
    ];

    fn old_message(topic: &str, i: u64) -> Message {
        Message::builder()
            .payload(format!("{topic} #{i}"))
            .key(format!("k{}", i % 3))
            .header("i", i.to_string())
            .producer("old")
            .priority(if i % 2 == 0 {
                Priority::Normal
            } else {
                Priority::High
            })
            .build()
    }

    /// Writes `topics` in the first layout under `dir` (and `starts.json`, with a mark for a
    /// topic that no longer exists too). Returns, per topic, the messages at each offset and
    /// the offsets a reader should find after the migration.
    fn write_old_layout(
        dir: &Path,
        topics: &[OldTopic],
    ) -> BTreeMap<String, (Vec<Message>, std::ops::Range<u64>)> {
        let mut starts = BTreeMap::new();
        starts.insert("deleted-since".to_string(), 5u64);
        let mut out = BTreeMap::new();
        for t in topics {
            let path = dir.join("topics").join(encode_name(t.name));
            let log = Log::open(
                &path,
                LogConfig {
                    segment_bytes: t.segment_bytes.unwrap_or(64 << 20),
                    durability: Durability::Never,
                    ..LogConfig::default()
                },
            )
            .unwrap();
            let mut messages = Vec::new();
            for &n in t.batches {
                let base = messages.len() as u64;
                let batch: Vec<Message> = (base..base + n as u64)
                    .map(|i| old_message(t.name, i))
                    .collect();
                let records: Vec<RecordIn> = batch.iter().map(encode_message).collect();
                let info = log.append(&records).unwrap();
                assert_eq!(info.base_offset, messages.len() as u64);
                messages.extend(batch);
            }
            if let Some(below) = t.retention_below {
                assert!(log.delete_segments_before(below).unwrap() > 0, "{}", t.name);
            }
            let mut start = log.start_offset();
            if t.retention_below.is_some() {
                assert!(start > 0, "{}: the log should start past 0", t.name);
            }
            if let Some(mark) = t.purged_below {
                starts.insert(t.name.to_string(), mark);
                start = start.max(mark);
            }
            out.insert(t.name.to_string(), (messages, start..log.next_offset()));
            log.close().unwrap();
        }
        // A directory whose name is no topic's: ignored (and removed with `topics/`).
        fs::create_dir_all(dir.join("topics").join("%ZZ")).unwrap();
        fs::write(
            dir.join("starts.json"),
            serde_json::to_vec(&starts).unwrap(),
        )
        .unwrap();
        fs::write(dir.join("positions.json"), br#"{"group:g":{"orders":3}}"#).unwrap();
        out
    }

    fn topic_name_of(name: &str) -> TopicName {
        topic_name(name).unwrap()
    }

    /// Checks every topic of `expected` in `storage`: bounds, and each record with its offset.
    fn check_migrated(
        storage: &DiskStorage,
        expected: &BTreeMap<String, (Vec<Message>, std::ops::Range<u64>)>,
    ) {
        let listed: Vec<String> = storage
            .topics()
            .unwrap()
            .iter()
            .map(|t| t.to_string())
            .collect();
        let wanted: Vec<String> = expected.keys().cloned().collect();
        assert_eq!(listed, wanted);
        for (name, (messages, range)) in expected {
            let topic = storage
                .open_topic(&topic_name_of(name), &TopicConfig::default())
                .unwrap();
            assert_eq!(
                (topic.start(), topic.end()),
                (range.start, range.end),
                "{name}"
            );
            // Reading below the start gives what is retained, from the start.
            let read = topic.read(0, 1000).unwrap();
            let offsets: Vec<u64> = read.iter().map(|m| m.offset).collect();
            assert_eq!(offsets, range.clone().collect::<Vec<_>>(), "{name}");
            for stored in &read {
                let want = &messages[stored.offset as usize];
                let got = &stored.message;
                assert_eq!(got.id(), want.id(), "{name} @{}", stored.offset);
                assert_eq!(got.payload(), want.payload());
                assert_eq!(got.key(), want.key());
                assert_eq!(got.headers(), want.headers());
                assert_eq!(got.timestamp(), want.timestamp());
                assert_eq!(got.priority(), want.priority());
                assert_eq!(got.producer_id(), Some("old"));
            }
            // Reading from the middle starts exactly there.
            if range.end - range.start >= 2 {
                let mid = range.start + 1;
                assert_eq!(topic.read(mid, 1).unwrap()[0].offset, mid, "{name}");
            }
        }
    }

    fn assert_new_layout(dir: &Path) {
        assert!(dir.join("store").is_dir());
        assert!(!dir.join("topics").exists());
        assert!(!dir.join("starts.json").exists());
        assert!(!dir.join("store.migrating").exists());
        // Consumer positions are untouched.
        assert_eq!(
            fs::read(dir.join("positions.json")).unwrap(),
            br#"{"group:g":{"orders":3}}"#
        );
    }

    fn disk_config() -> DiskConfig {
        DiskConfig {
            durability: Durability::Never,
            ..DiskConfig::default()
        }
    }

    #[test]
    fn the_first_layout_is_migrated_with_its_offsets_and_purges() {
        let dir = tempfile::tempdir().unwrap();
        let expected = write_old_layout(dir.path(), OLD_TOPICS);
        assert_eq!(
            encode_name("telemetry/node-1/gpu ü%"),
            "telemetry%2Fnode-1%2Fgpu%20%C3%BC%25"
        );
        assert!(dir.path().join("topics/%24dlq%2Forders").is_dir());
        let retained = expected["retained"].1.clone();
        assert!(
            retained.start > 1 && retained.start < retained.end,
            "{retained:?}"
        );
        assert_eq!(expected["purged"].1, 4..10);
        assert_eq!(expected["emptied"].1, 3..3);

        let storage = DiskStorage::open(dir.path(), disk_config()).unwrap();
        assert_new_layout(dir.path());
        check_migrated(&storage, &expected);
        let positions = storage.load_positions().unwrap();
        assert_eq!(positions["group:g"]["orders"], 3);
        // Appends continue at the old ends, purged offsets included.
        let mut expected = expected;
        for (name, end) in [("emptied", 3u64), ("orders", 5)] {
            let topic = storage
                .open_topic(&topic_name_of(name), &TopicConfig::default())
                .unwrap();
            assert!(matches!(
                topic.append(0, &[&old_message(name, 0)]),
                Err(StorageError::OffsetMismatch { store, .. }) if store == end
            ));
            let m = old_message(name, end);
            topic.append(end, &[&m]).unwrap();
            let (messages, range) = expected.get_mut(name).unwrap();
            assert_eq!(messages.len() as u64, end);
            messages.push(m);
            range.end = end + 1;
        }
        storage.sync().unwrap();
        drop(storage);

        // Opening again: nothing to migrate, everything still there.
        let storage = DiskStorage::open(dir.path(), disk_config()).unwrap();
        assert_new_layout(dir.path());
        check_migrated(&storage, &expected);
    }

    #[test]
    fn a_migration_interrupted_before_its_rename_is_started_again() {
        let dir = tempfile::tempdir().unwrap();
        let expected = write_old_layout(dir.path(), OLD_TOPICS);
        // What a crash during the copy leaves: a partial store beside the old layout.
        {
            let partial =
                Store::open(dir.path().join("store.migrating"), StoreConfig::default()).unwrap();
            let junk = partial.stream("junk").unwrap();
            junk.append(0, &[encode_message(&old_message("junk", 0))])
                .unwrap();
            let orders = partial.stream("orders").unwrap();
            orders
                .append(0, &[encode_message(&old_message("orders", 0))])
                .unwrap();
            partial.close().unwrap();
        }
        fs::write(dir.path().join("store.migrating/garbage"), b"torn").unwrap();

        let storage = DiskStorage::open(dir.path(), disk_config()).unwrap();
        assert_new_layout(dir.path());
        check_migrated(&storage, &expected);
        drop(storage);
        let storage = DiskStorage::open(dir.path(), disk_config()).unwrap();
        check_migrated(&storage, &expected);
    }

    #[test]
    fn a_migration_interrupted_after_its_rename_only_removes_the_old_files() {
        let dir = tempfile::tempdir().unwrap();
        let expected = write_old_layout(dir.path(), &OLD_TOPICS[..2]);
        drop(DiskStorage::open(dir.path(), disk_config()).unwrap());
        // A crash between the rename of `store.migrating/` and the removal of `topics/` and
        // `starts.json` leaves both layouts: `store/` is complete and wins.
        let stale = write_old_layout(dir.path(), &OLD_TOPICS[2..]);
        assert!(dir.path().join("store").is_dir() && dir.path().join("topics").is_dir());
        let storage = DiskStorage::open(dir.path(), disk_config()).unwrap();
        assert_new_layout(dir.path());
        check_migrated(&storage, &expected);
        assert!(stale.keys().all(|k| !expected.contains_key(k)));
    }
}
