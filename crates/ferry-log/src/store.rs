//! [`Store`]: many named streams in one log.
//!
//! A store is one [`Log`] whose batches each belong to a stream (a
//! [`crate::STREAM_BATCH_VERSION`] batch carries the stream id and the stream offset of its
//! first record). Stream 0 is the store's own control stream: its records define streams
//! (id, name, first and next offset) and move their start (purge, retention). A stream's name
//! is data inside a record, never a file name, and the number of open files does not depend on
//! the number of streams: every stream shares the log's segments, its group commit and its
//! recovery.
//!
//! In memory each stream keeps its bounds and a sparse index of `(stream offset, log offset)`
//! entries: one at its first batch, then one whenever [`StoreConfig::index_interval_bytes`] of
//! its own batches were written since the last entry, or when more than
//! [`StoreConfig::skip_bytes`] of other streams' batches lie between two of its batches. A read
//! starts at the entry at or before the wanted offset and scans forward, skipping other
//! streams' batches by their headers; after `skip_bytes` of them it jumps to the next entry
//! (the next batch of the stream is known to have one), so a read never scans more than that
//! between two of its batches.
//!
//! The index lives in memory only. A checkpoint of it (every stream's state at a log
//! position `P`, see [`Store::checkpoint`]) is written at [`Store::close`] (and when the last
//! handle is dropped), and by [`Store::maybe_checkpoint`] once enough was written since the
//! last one; opening the store loads it and scans only the log from `P` on. Without a usable
//! checkpoint (none, damaged, of another format version, or not matching the segments on
//! disk) opening scans the whole log, and [`Store::recovery_notes`] says why.
//!
//! Retention is per stream and logical (its start moves); a segment is deleted once no stream
//! needs anything in it, after the definitions of the streams it holds were written again at
//! the end of the log.
//!
//! Damaged data (in a sealed segment, or in the middle of the active one, see the crate docs,
//! RECOVERY) does not stop the store from opening: the log quarantines it, and a read that
//! meets damaged or lost records of its stream gets [`LogError::Damaged`] with the range to
//! skip: up to the stream's next batch whose CRC checks (a scan checking every batch of a sealed
//! segment from the index entry before the damage finds it), else up to its next index entry.
//! A read that finds nothing where the stream has records (a damaged header, which the plain
//! scan does not check, hid them) reads again with the checking scan. Opened from a checkpoint
//! written before the damage, every stream keeps the end the checkpoint knows, so a stream
//! whose last records were lost does not give their offsets again (a scan of the whole log
//! cannot know them). Damage that loses a stream's definition (its name) leaves its records
//! unreachable and its id taken; every stream defined from then on starts above the offsets
//! the streams with lost definitions gave out, since any of them may be a lost one under its
//! old name.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use parking_lot::{Mutex, RwLock};

use crate::codec::{BatchHeader, DecodedBatch, StreamTag};
use crate::config::{Durability, LogConfig, RetentionPolicy};
use crate::error::LogError;
use crate::log::{now_ms, Log, LogStats, Visit};
use crate::record::{AppendInfo, RecordIn, StoredRecord};

mod checkpoint;

use checkpoint::Checkpoint;

/// The control stream's id.
const CONTROL: u32 = 0;
/// Control record: a stream's definition.
const OP_DEFINE: u8 = 1;
/// Control record: a stream's new start.
const OP_TRIM: u8 = 2;
/// Control record: the transaction parts (by log offset) that are now valid.
const OP_COMMIT: u8 = 3;
/// Control record: an empty stream forgotten (see [`Store::forget`]).
const OP_FORGET: u8 = 4;
/// Compaction (deleting segments no stream needs) runs at most this often.
const COMPACT_EVERY: Duration = Duration::from_secs(1);
/// Settings of a [`Store`].
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The log's settings: segment size and age, durability, compression, batch size limit.
    /// Its `retention` and `cache_bytes` are ignored (retention is per stream, and reads of
    /// recent records are the caller's to cache).
    pub log: LogConfig,
    /// A stream gets an index entry after this many bytes of its own batches. Default 4 KiB.
    pub index_interval_bytes: u64,
    /// A stream gets an index entry when more than this many bytes of other streams' batches
    /// were written since its previous batch; a read skips at most this much before jumping.
    /// Default 256 KiB.
    pub skip_bytes: u64,
    /// [`Store::maybe_checkpoint`] writes a checkpoint once this many bytes of batches were
    /// appended since the last one, and at least as many as the last checkpoint's size (so
    /// that checkpoints never write more than the log does). `None`: never by size. Default
    /// 64 MiB: opening the store then scans at most about that much of the log.
    pub checkpoint_bytes: Option<u64>,
    /// [`Store::maybe_checkpoint`] also writes a checkpoint when anything was appended and
    /// this long passed since the last one (or since the store opened). `None`: never by
    /// time. Default 10 minutes.
    pub checkpoint_interval: Option<Duration>,
    /// Write a checkpoint at [`Store::close`] and when the last handle to the store is dropped,
    /// unless nothing was appended since the last one. Default true.
    pub checkpoint_on_close: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            log: LogConfig::default(),
            index_interval_bytes: 4 << 10,
            skip_bytes: 256 << 10,
            checkpoint_bytes: Some(64 << 20),
            checkpoint_interval: Some(Duration::from_secs(600)),
            checkpoint_on_close: true,
        }
    }
}

/// An index entry: the batch of a stream starting at `offset` is at log offset `seq`.
#[derive(Debug, Clone, Copy)]
struct Entry {
    offset: u64,
    seq: u64,
    /// Largest record timestamp of the stream before this batch.
    ts_before: u64,
    /// Bytes of the stream's batches before this one (from an arbitrary origin).
    bytes_before: u64,
}

#[derive(Debug)]
struct StreamState {
    name: Arc<str>,
    start: u64,
    next: u64,
    entries: Vec<Entry>,
    /// Byte clock at the end of the stream's last batch.
    last_end: u64,
    /// Bytes of the stream's batches since its last index entry.
    since_entry: u64,
    /// Bytes of the stream's batches so far (same origin as `Entry::bytes_before`).
    bytes: u64,
    max_ts: u64,
    /// Log offset of the stream's latest definition record.
    define_seq: u64,
    /// Whether a definition was seen: while a store opens, the batches of a stream that was
    /// defined again at the end of the log (see [`Store::compact`]) come before its
    /// definition.
    defined: bool,
    /// `None`: the default (keep everything). Out of line: most streams of a store with many
    /// have the default, and an idle stream's entry stays small.
    retention: Option<Box<RetentionPolicy>>,
    /// Being forgotten ([`Store::forget`]): no new handle is given out.
    forgetting: bool,
}

impl StreamState {
    fn new(name: Arc<str>, start: u64, clock: u64) -> Self {
        StreamState {
            name,
            start,
            next: start,
            entries: Vec::new(),
            last_end: clock,
            since_entry: 0,
            bytes: 0,
            max_ts: 0,
            define_seq: 0,
            defined: false,
            retention: None,
            forgetting: false,
        }
    }

    /// Index of the entry to start reading `offset` from.
    fn entry_for(&self, offset: u64) -> Option<usize> {
        if self.entries.is_empty() {
            return None;
        }
        Some(
            self.entries
                .partition_point(|e| e.offset <= offset)
                .saturating_sub(1),
        )
    }

    /// Moves the start to `start` (never back, never past the end) and forgets index entries
    /// no longer needed. Returns whether it moved.
    fn trim(&mut self, start: u64) -> bool {
        let start = start.min(self.next);
        if start <= self.start {
            return false;
        }
        self.start = start;
        if start == self.next {
            self.entries.clear();
        } else if let Some(i) = self.entry_for(start) {
            self.entries.drain(..i);
        }
        true
    }

    /// The start retention allows at `now_ms` (floors, as in Kafka: never less than asked).
    fn retention_start(&self, now_ms: u64) -> u64 {
        let p = self.retention.as_deref().copied().unwrap_or_default();
        let mut start = self.start;
        if let Some(max) = p.max_records {
            start = start.max(self.next.saturating_sub(max));
        }
        if let Some(max) = p.max_bytes {
            let keep = self
                .entries
                .iter()
                .rev()
                .find(|e| self.bytes - e.bytes_before >= max);
            if let Some(e) = keep {
                start = start.max(e.offset);
            }
        }
        if let Some(age) = p.max_age {
            let cutoff = now_ms.saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
            if self.max_ts < cutoff && !self.entries.is_empty() {
                start = self.next;
            } else if let Some(e) = self.entries.iter().rev().find(|e| e.ts_before < cutoff) {
                start = start.max(e.offset);
            }
        }
        start
    }
}

#[derive(Debug, Default)]
struct Streams {
    /// Ordered, so that a page of names (by prefix, after a name) costs its own length.
    by_name: BTreeMap<Arc<str>, u32>,
    by_id: HashMap<u32, StreamState>,
    next_id: u32,
    /// Next offset of the control stream.
    control_next: u64,
    /// Bytes of batches in log order since the store opened (from the first retained batch).
    clock: u64,
    /// While the store opens: transaction parts read but not yet named by a commit record, by
    /// log offset (a crash between a transaction's parts and its commit leaves them here).
    pending: HashMap<u64, PendingPart>,
    /// The log offset after the last batch accounted for: where a checkpoint of this state
    /// stands.
    end: u64,
    /// Transaction parts counted already (written while the store is open, or counted by the
    /// checkpoint it opened from) that no commit record named yet, by log offset.
    open_parts: BTreeSet<u64>,
    /// Where a stream defined from now on starts: above every offset given out by a stream
    /// whose definition was lost to damage (its name is unknown, so any new stream may be it
    /// under its old name); 0 when none was lost.
    lost_floor: u64,
}

/// A transaction part waiting for its commit record while the store opens.
#[derive(Debug, Clone, Copy)]
struct PendingPart {
    tag: StreamTag,
    count: u64,
    len: u64,
    max_ts: u64,
    /// The byte clock before it.
    before: u64,
}

/// A control record.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Define {
        id: u32,
        start: u64,
        next: u64,
        name: String,
    },
    Trim {
        id: u32,
        start: u64,
    },
    Commit {
        parts: Vec<u64>,
    },
    /// The stream is gone (it was empty at `next`); its name may be defined again as a new
    /// stream, its id never is.
    Forget {
        id: u32,
        next: u64,
    },
}

impl Op {
    fn encode(&self) -> RecordIn {
        let mut b = BytesMut::new();
        match self {
            Op::Define {
                id,
                start,
                next,
                name,
            } => {
                b.put_u8(OP_DEFINE);
                b.put_u32_le(*id);
                b.put_u64_le(*start);
                b.put_u64_le(*next);
                b.put_slice(name.as_bytes());
            }
            Op::Trim { id, start } => {
                b.put_u8(OP_TRIM);
                b.put_u32_le(*id);
                b.put_u64_le(*start);
            }
            Op::Commit { parts } => {
                b.put_u8(OP_COMMIT);
                for p in parts {
                    b.put_u64_le(*p);
                }
            }
            Op::Forget { id, next } => {
                b.put_u8(OP_FORGET);
                b.put_u32_le(*id);
                b.put_u64_le(*next);
            }
        }
        RecordIn::new(b.freeze())
    }

    fn decode(mut b: Bytes) -> Result<Op, String> {
        let short = || "control record too short".to_string();
        if b.remaining() < 1 {
            return Err(short());
        }
        let op = b.get_u8();
        if op == OP_COMMIT {
            if b.remaining() % 8 != 0 {
                return Err("commit record of a partial offset".into());
            }
            let parts = (0..b.remaining() / 8).map(|_| b.get_u64_le()).collect();
            return Ok(Op::Commit { parts });
        }
        if b.remaining() < 12 {
            return Err(short());
        }
        let id = b.get_u32_le();
        let start = b.get_u64_le();
        match op {
            OP_DEFINE => {
                if b.remaining() < 8 {
                    return Err(short());
                }
                let next = b.get_u64_le();
                let name = String::from_utf8(b.to_vec())
                    .map_err(|_| "stream name is not UTF-8".to_string())?;
                Ok(Op::Define {
                    id,
                    start,
                    next,
                    name,
                })
            }
            OP_TRIM => Ok(Op::Trim { id, start }),
            OP_FORGET => Ok(Op::Forget { id, next: start }),
            op => Err(format!("unknown control record {op}")),
        }
    }
}

impl Streams {
    /// Applies a control record found at log offset `seq`.
    fn apply(&mut self, op: Op, seq: u64, config: &StoreConfig) -> Result<(), String> {
        match op {
            Op::Define {
                id,
                start,
                next,
                name,
            } => {
                if id == CONTROL || start > next {
                    return Err(format!("bad definition of stream {id}"));
                }
                let name: Arc<str> = Arc::from(name);
                if let Some(other) = self.by_name.get(&name) {
                    if *other != id {
                        return Err(format!("stream {name:?} defined as {other} and {id}"));
                    }
                }
                self.next_id = self.next_id.max(id + 1);
                let st = self.state_mut(id, start);
                if st.defined && st.name != name {
                    return Err(format!("stream {id} renamed"));
                }
                let first = !st.defined;
                st.name = name.clone();
                st.defined = true;
                st.define_seq = seq;
                if st.entries.is_empty() && next > st.next {
                    st.start = st.start.max(next);
                }
                st.next = st.next.max(next);
                st.trim(start);
                if first {
                    self.by_name.insert(name, id);
                }
            }
            Op::Commit { parts } => {
                // While opening: the parts it names become valid, in log order. At run time
                // (and for a checkpoint's open parts) they were accounted for when written.
                for seq in parts {
                    self.open_parts.remove(&seq);
                    if let Some(p) = self.pending.remove(&seq) {
                        self.apply_batch(p.tag, p.count, seq, p.len, p.max_ts, p.before, config)?;
                    }
                }
            }
            Op::Trim { id, start } => {
                self.state_mut(id, start).trim(start);
            }
            Op::Forget { id, .. } => {
                if id == CONTROL {
                    return Err("the control stream cannot be forgotten".into());
                }
                self.next_id = self.next_id.max(id + 1);
                if let Some(st) = self.by_id.remove(&id) {
                    if self.by_name.get(&st.name) == Some(&id) {
                        self.by_name.remove(&st.name);
                    }
                }
            }
        }
        Ok(())
    }

    /// The state of stream `id`, a placeholder starting at `start` if it has none yet: while a
    /// store opens, a stream's trims and batches can come before its definition (see
    /// `StreamState::defined`).
    fn state_mut(&mut self, id: u32, start: u64) -> &mut StreamState {
        let clock = self.clock;
        self.by_id
            .entry(id)
            .or_insert_with(|| StreamState::new(Arc::from(""), start, clock))
    }

    /// Accounts for the batch `h` read while the store opens: a transaction part waits for its
    /// commit record, any other batch counts at once.
    fn on_header(&mut self, h: &BatchHeader, config: &StoreConfig) -> Result<(), String> {
        let tag = h
            .stream
            .ok_or_else(|| "a batch that belongs to no stream".to_string())?;
        let count = h.record_count.into();
        if tag.tx_part {
            self.defer_part(tag, count, h.base_offset, h.total_len(), h.max_timestamp);
            return Ok(());
        }
        self.on_batch(
            tag,
            count,
            h.base_offset,
            h.total_len(),
            h.max_timestamp,
            config,
        )
    }

    /// Accounts for a batch of stream `tag.id` written at log offset `seq`.
    fn on_batch(
        &mut self,
        tag: StreamTag,
        count: u64,
        seq: u64,
        len: u64,
        max_ts: u64,
        config: &StoreConfig,
    ) -> Result<(), String> {
        let before = self.clock;
        self.clock += len;
        self.end = self.end.max(seq + count);
        if tag.id == CONTROL {
            self.control_next = tag.base + count;
            return Ok(());
        }
        if tag.tx_part {
            // Written while the store is open (parts read while it opens are deferred).
            self.open_parts.insert(seq);
        }
        self.apply_batch(tag, count, seq, len, max_ts, before, config)
    }

    /// Notes a transaction part read while opening, valid once its commit record is read.
    fn defer_part(&mut self, tag: StreamTag, count: u64, seq: u64, len: u64, max_ts: u64) {
        let before = self.clock;
        self.clock += len;
        self.end = self.end.max(seq + count);
        self.pending.insert(
            seq,
            PendingPart {
                tag,
                count,
                len,
                max_ts,
                before,
            },
        );
    }

    /// Accounts for a data batch written when the byte clock stood at `before`.
    #[allow(clippy::too_many_arguments)]
    fn apply_batch(
        &mut self,
        tag: StreamTag,
        count: u64,
        seq: u64,
        len: u64,
        max_ts: u64,
        before: u64,
        config: &StoreConfig,
    ) -> Result<(), String> {
        let st = self.state_mut(tag.id, tag.base);
        if tag.base < st.next {
            return Err(format!(
                "batch of stream {:?} at offset {}, below its end {}",
                st.name, tag.base, st.next
            ));
        }
        let gap = before.saturating_sub(st.last_end);
        if st.entries.is_empty()
            || tag.base > st.next
            || st.since_entry >= config.index_interval_bytes
            || gap >= config.skip_bytes
        {
            if st.entries.is_empty() {
                // Most streams of a store with many have one entry: no room for more yet.
                st.entries.reserve_exact(1);
            }
            st.entries.push(Entry {
                offset: tag.base,
                seq,
                ts_before: st.max_ts,
                bytes_before: st.bytes,
            });
            st.since_entry = 0;
        }
        if st.start == st.next && tag.base > st.next {
            st.start = tag.base;
        }
        st.since_entry += len;
        st.bytes += len;
        st.max_ts = st.max_ts.max(max_ts);
        st.next = tag.base + count;
        st.last_end = before + len;
        Ok(())
    }
}

#[derive(Debug)]
struct Inner {
    log: Log,
    config: StoreConfig,
    streams: RwLock<Streams>,
    /// Serialises control records (so the next stream id is stable while one is written).
    control: Mutex<()>,
    last_compact: Mutex<Option<Instant>>,
    /// What recovery cut or skipped when the store opened.
    notes: Vec<String>,
    /// Log offsets of transaction parts found uncommitted when the store opened: readers skip
    /// them (their stream offsets may since have been given to other records).
    dead: HashSet<u64>,
    /// The last checkpoint; held while one is written.
    mark: Mutex<Mark>,
    /// Set by [`Store::close`]: no checkpoint when the last handle is dropped.
    closed: AtomicBool,
    opened: OpenScan,
}

/// When the last checkpoint was written (or the store opened), and what it covered.
#[derive(Debug, Clone, Copy)]
struct Mark {
    /// The byte clock it covered up to (0: none covers anything).
    clock: u64,
    at: Instant,
    /// Its size.
    bytes: u64,
}

/// How the store rebuilt its streams when it opened (for tests and diagnostics).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenScan {
    /// The log offset of the checkpoint the streams were loaded from, if one was used.
    pub checkpoint: Option<u64>,
    /// Bytes of batches the open visited in the log (from the checkpoint's position on, or
    /// the whole log).
    pub scanned_bytes: u64,
}

/// Many named streams in one crash-safe segmented log (see the module docs). `Send + Sync`;
/// cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// One stream of a [`Store`]: appends, reads, bounds, retention. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Stream {
    inner: Arc<Inner>,
    id: u32,
    name: Arc<str>,
}

/// The streams as opening the store rebuilt them.
struct Rebuilt {
    streams: Streams,
    dead: HashSet<u64>,
    notes: Vec<String>,
    scanned: u64,
}

/// Rebuilds the streams by scanning `log` from the start, or from the position of the
/// checkpoint `ck` with its state. `damaged`: the log reported damage when it opened.
fn rebuild(
    log: &Log,
    config: &StoreConfig,
    ck: Option<Checkpoint>,
    damaged: bool,
) -> Result<Rebuilt, LogError> {
    let checkpointed = ck.is_some();
    let (from, streams, mut dead) = match ck {
        Some(ck) => (ck.position, ck.streams, ck.dead),
        None => (0, Streams::default(), HashSet::new()),
    };
    let streams = RefCell::new(streams);
    let failure = RefCell::new(None::<String>);
    let fail = |seq: u64, reason: String| {
        failure
            .borrow_mut()
            .get_or_insert(format!("log offset {seq}: {reason}"));
        Visit::Stop
    };
    let scanned = Cell::new(0u64);
    let damage = RefCell::new(Vec::new());
    log.scan_around_damage(
        from,
        |h| {
            let first = scanned.get() == 0;
            scanned.set(scanned.get() + h.total_len());
            if first && checkpointed && h.base_offset != from {
                // A checkpoint stands at a batch boundary of the log it was written for.
                return fail(
                    h.base_offset,
                    format!("no batch starts at log offset {from}, where the checkpoint stands"),
                );
            }
            if h.stream.is_some_and(|t| t.id == CONTROL) {
                // Applied, then counted, once decoded.
                return Visit::Take;
            }
            match streams.borrow_mut().on_header(h, config) {
                Ok(()) => Visit::Skip,
                Err(e) => fail(h.base_offset, e),
            }
        },
        |batch| {
            let mut s = streams.borrow_mut();
            for r in batch.records {
                let seq = r.offset;
                if let Err(e) = Op::decode(r.payload).and_then(|op| s.apply(op, seq, config)) {
                    fail(seq, e);
                    return false;
                }
            }
            s.on_header(&batch.header, config).is_ok()
        },
        |e| {
            damage
                .borrow_mut()
                .push(format!("{e}; the rest of that segment is skipped"))
        },
    )?;
    if let Some(reason) = failure.into_inner() {
        return Err(LogError::Inconsistent(reason));
    }
    let mut streams = streams.into_inner();
    let mut notes = damage.into_inner();
    if !streams.open_parts.is_empty() {
        // Counted by the checkpoint, never committed: the checkpoint cannot take them back.
        return Err(LogError::Inconsistent(format!(
            "it counts transaction parts that no commit record names (log offsets {:?})",
            streams.open_parts
        )));
    }
    let mut discarded: Vec<(u64, PendingPart)> = streams.pending.drain().collect();
    discarded.sort_by_key(|(seq, _)| *seq);
    for (seq, p) in discarded {
        // Written, never committed, so never made visible: as if never written.
        dead.insert(seq);
        let name = streams
            .by_id
            .get(&p.tag.id)
            .map_or("?".to_string(), |st| st.name.to_string());
        notes.push(format!(
            "uncommitted transaction part discarded: stream {name:?} offsets {}..{}",
            p.tag.base,
            p.tag.base + p.count
        ));
    }
    if checkpointed {
        // Segments deleted since the checkpoint (by compaction) held nothing a stream needs:
        // the entries pointing into them are forgotten.
        let log_start = log.start_offset();
        dead.retain(|&seq| seq >= log_start);
        for st in streams.by_id.values_mut() {
            let Some(first) = st.entries.first().map(|e| e.seq) else {
                continue;
            };
            if first >= log_start {
                continue;
            }
            if st.defined && st.start < st.next {
                return Err(LogError::Inconsistent(format!(
                    "stream {:?} needs log offset {first}, below the log's start {log_start}",
                    st.name
                )));
            }
            st.entries.retain(|e| e.seq >= log_start);
            if st.entries.is_empty() {
                st.start = st.next;
            }
        }
    }
    let lost: Vec<u32> = streams
        .by_id
        .iter()
        .filter(|(_, st)| !st.defined)
        .map(|(id, _)| *id)
        .collect();
    if !lost.is_empty() && !damaged && notes.is_empty() {
        return Err(LogError::Inconsistent(format!(
            "streams {lost:?} have batches but no definition"
        )));
    }
    for id in lost {
        // Its definition was in the damaged data: its name is unknown, so its records
        // cannot be reached; the id stays taken, so it is never reused, and since any stream
        // defined from now on may be the lost one under its old name, those start above
        // every offset it gave out.
        let next = streams.by_id.get(&id).map_or(0, |st| st.next);
        streams.lost_floor = streams.lost_floor.max(next);
        notes.push(format!(
            "stream {id} lost its definition to the damage: its records (offsets below {next}) \
             are unreachable; streams defined from now on start at offset {} or above",
            streams.lost_floor
        ));
    }
    streams.next_id = streams.next_id.max(1);
    streams.end = log.next_offset();
    Ok(Rebuilt {
        streams,
        dead,
        notes,
        scanned: scanned.get(),
    })
}

/// Rebuilds the streams from checkpoint `ck` and the log after it, if it matches the log;
/// otherwise says why not.
fn rebuild_from(
    log: &Log,
    config: &StoreConfig,
    ck: Checkpoint,
    damaged: bool,
) -> Result<Rebuilt, String> {
    let (start, end) = (log.start_offset(), log.next_offset());
    let p = ck.position;
    if p > end {
        return Err(format!(
            "it stands at log offset {p}, but the log ends at {end}"
        ));
    }
    if p < start {
        return Err(format!(
            "it stands at log offset {p}, before the log's first segment ({start})"
        ));
    }
    // It was written for these files: the segments it lists that are still there (compaction
    // deletes the oldest) must be the same files, as their creation time (in their header)
    // says. A segment it does not know below `p` was split from a damaged one when the log
    // opened, keeping every batch at its log offset.
    let mut known = 0;
    for (base, created) in log.segment_info() {
        match ck.segments.iter().find(|&&(b, _)| b == base) {
            Some(&(_, c)) if c == created => known += 1,
            Some(_) => return Err(format!("segment {base} is not one it was written with")),
            None => {}
        }
    }
    if known == 0 {
        return Err("none of the segments it was written with is left".into());
    }
    rebuild(log, config, Some(ck), damaged).map_err(|e| match e {
        LogError::Inconsistent(reason) => reason,
        e => e.to_string(),
    })
}

impl Store {
    /// Opens the store in `dir` (created if missing), recovering the log (see the crate docs,
    /// RECOVERY) and rebuilding every stream's index: from the checkpoint and the log after
    /// it, or with one sequential scan of the whole log when there is no usable checkpoint.
    pub fn open(dir: impl AsRef<Path>, config: StoreConfig) -> Result<Store, LogError> {
        let log_config = LogConfig {
            cache_bytes: 0,
            retention: RetentionPolicy::default(),
            tolerate_damage: true,
            ..config.log.clone()
        };
        let log = Log::open(dir.as_ref(), log_config)?;
        let dir = log.dir().to_path_buf();
        let log_notes = log.recovery_notes();
        let damaged = !log_notes.is_empty();
        let mut notes = log_notes;
        let mut mark = Mark {
            clock: 0,
            at: Instant::now(),
            bytes: 0,
        };
        let mut opened = OpenScan::default();
        // The stream ends of a checkpoint that is not used: floors, since ends only grow.
        let mut floors: Vec<(u32, Arc<str>, u64)> = Vec::new();
        let loaded = match checkpoint::read(&dir)? {
            None => {
                if log.start_offset() < log.next_offset() {
                    notes.push(
                        "no index checkpoint: the whole log was scanned to rebuild the streams"
                            .into(),
                    );
                }
                None
            }
            Some(bytes) => {
                let tried = checkpoint::decode(&bytes).and_then(|ck| {
                    if ck.position > log.next_offset() {
                        // The log lost batches the checkpoint counted.
                        floors = ck
                            .streams
                            .by_id
                            .iter()
                            .map(|(&id, st)| (id, st.name.clone(), st.next))
                            .collect();
                    }
                    let (position, clock) = (ck.position, ck.streams.clock);
                    rebuild_from(&log, &config, ck, damaged).map(|r| (r, position, clock))
                });
                match tried {
                    Ok((r, position, clock)) => {
                        floors.clear();
                        mark.clock = clock;
                        mark.bytes = bytes.len() as u64;
                        opened.checkpoint = Some(position);
                        Some(r)
                    }
                    Err(reason) => {
                        notes.push(format!(
                            "index checkpoint not used ({reason}): the whole log was scanned \
                             to rebuild the streams"
                        ));
                        // Never to be used later, when the log may have grown past it.
                        checkpoint::remove(&dir)?;
                        None
                    }
                }
            }
        };
        let mut rebuilt = match loaded {
            Some(r) => r,
            None => rebuild(&log, &config, None, damaged)?,
        };
        raise_ends(&mut rebuilt.streams, &floors, &mut notes);
        opened.scanned_bytes = rebuilt.scanned;
        notes.extend(rebuilt.notes);
        Ok(Store {
            inner: Arc::new(Inner {
                log,
                config,
                streams: RwLock::new(rebuilt.streams),
                control: Mutex::new(()),
                last_compact: Mutex::new(None),
                notes,
                dead: rebuilt.dead,
                mark: Mutex::new(mark),
                closed: AtomicBool::new(false),
                opened,
            }),
        })
    }

    /// The stream named `name`, defined (a buffered control record, durable with the next
    /// [`sync`](Self::sync) or with any later batch's sync) if it does not exist yet.
    pub fn stream(&self, name: &str) -> Result<Stream, LogError> {
        if let Some(s) = self.existing(name) {
            return Ok(s);
        }
        let _control = self.inner.control.lock();
        if let Some(s) = self.existing(name) {
            return Ok(s);
        }
        let (id, floor) = {
            let streams = self.inner.streams.read();
            (streams.next_id, streams.lost_floor)
        };
        let op = Op::Define {
            id,
            start: floor,
            next: floor,
            name: name.to_string(),
        };
        self.inner.write_control(&[op])?;
        Ok(Stream {
            inner: self.inner.clone(),
            id,
            name: Arc::from(name),
        })
    }

    /// The stream named `name`, if it is defined (nothing is written).
    pub fn find(&self, name: &str) -> Option<Stream> {
        self.existing(name)
    }

    /// Forgets stream `name` if it is empty (every record it had is gone: retention or
    /// purge) and no handle on it is open ([`Stream`] values, from [`stream`](Self::stream)
    /// or [`find`](Self::find)): a control record, buffered like a trim. Its entry leaves the
    /// store's memory and its name the catalog; defining the name again makes a new stream
    /// whose offsets start at 0 (a stream id is never given twice). Returns whether it was
    /// forgotten: `false` when it does not exist, holds records or has a handle open.
    pub fn forget(&self, name: &str) -> Result<bool, LogError> {
        let _control = self.inner.control.lock();
        // Marked under the write lock: no handle is given out from here on (one asked for
        // meanwhile waits for the control lock, then defines the name anew).
        let (id, next) = {
            let mut streams = self.inner.streams.write();
            let Some((key, &id)) = streams.by_name.get_key_value(name) else {
                return Ok(false);
            };
            // The references to its name a stream has with no handle open: its state's, and
            // the name map's key when that is the same allocation.
            let shared_key = streams
                .by_id
                .get(&id)
                .is_some_and(|st| Arc::ptr_eq(key, &st.name));
            let unheld = 1 + usize::from(shared_key);
            let Some(st) = streams.by_id.get_mut(&id) else {
                return Ok(false);
            };
            if st.start < st.next || Arc::strong_count(&st.name) > unheld {
                return Ok(false);
            }
            st.forgetting = true;
            (id, st.next)
        };
        let written = self.inner.write_control(&[Op::Forget { id, next }]);
        if written.is_err() {
            if let Some(st) = self.inner.streams.write().by_id.get_mut(&id) {
                st.forgetting = false;
            }
        }
        written.map(|()| true)
    }

    /// How many streams have a name for which `keep` is true.
    pub fn count_streams(&self, keep: impl Fn(&str) -> bool) -> usize {
        let streams = self.inner.streams.read();
        streams.by_name.keys().filter(|n| keep(n)).count()
    }

    fn existing(&self, name: &str) -> Option<Stream> {
        let streams = self.inner.streams.read();
        let id = *streams.by_name.get(name)?;
        let st = streams.by_id.get(&id)?;
        if st.forgetting {
            return None;
        }
        let name = st.name.clone();
        Some(Stream {
            inner: self.inner.clone(),
            id,
            name,
        })
    }

    /// What opening the store cut or skipped, one line each: torn tails cut (with the bytes
    /// and the offset where they were cut), damaged segments whose rest was skipped, streams
    /// whose definition was lost to damage. Empty after a clean shutdown.
    pub fn recovery_notes(&self) -> &[String] {
        &self.inner.notes
    }

    /// The names of every stream, sorted.
    pub fn stream_names(&self) -> Vec<String> {
        let streams = self.inner.streams.read();
        streams.by_name.keys().map(|n| n.to_string()).collect()
    }

    /// At most `max` stream names, in name order, starting with `from` (or after it when
    /// `exclusive`); the work is that of the names returned, not of every stream.
    pub fn stream_names_from(&self, from: &str, exclusive: bool, max: usize) -> Vec<String> {
        use std::ops::Bound;
        let streams = self.inner.streams.read();
        let lower = if exclusive {
            Bound::Excluded(from)
        } else {
            Bound::Included(from)
        };
        streams
            .by_name
            .range::<str, _>((lower, Bound::Unbounded))
            .take(max)
            .map(|(n, _)| n.to_string())
            .collect()
    }

    /// The last record of every stream whose name starts with `prefix` and that holds one,
    /// by name, read in one sequential scan of the log from the oldest of them (for a store
    /// whose streams each keep their latest value: opening it costs one pass, not a read per
    /// stream). The records' `offset` is the stream offset. A stream whose last record is in
    /// damaged data is left out, and named in the second list with what was wrong.
    #[allow(clippy::type_complexity)]
    pub fn last_records(
        &self,
        prefix: &str,
    ) -> Result<(BTreeMap<String, StoredRecord>, Vec<(String, String)>), LogError> {
        use std::ops::Bound;
        // id -> (name, the stream offset of its last record)
        let mut wanted: HashMap<u32, (Arc<str>, u64)> = HashMap::new();
        let mut from = u64::MAX;
        {
            let streams = self.inner.streams.read();
            let range = streams
                .by_name
                .range::<str, _>((Bound::Included(prefix), Bound::Unbounded));
            for (name, id) in range.take_while(|(n, _)| n.starts_with(prefix)) {
                let Some(st) = streams.by_id.get(id) else {
                    continue;
                };
                if st.start >= st.next {
                    continue;
                }
                let last = st.next - 1;
                if let Some(i) = st.entry_for(last) {
                    from = from.min(st.entries[i].seq);
                    wanted.insert(*id, (name.clone(), last));
                }
            }
        }
        let mut found = BTreeMap::new();
        if wanted.is_empty() {
            return Ok((found, Vec::new()));
        }
        let mut damage: Vec<String> = Vec::new();
        let dead = &self.inner.dead;
        let taken = RefCell::new(Vec::new());
        self.inner.log.scan_around_damage(
            from,
            |h| match h.stream {
                Some(t) if !(t.tx_part && dead.contains(&h.base_offset)) => {
                    match wanted.get(&t.id) {
                        Some(&(_, last))
                            if t.base <= last && h.stream_next().is_some_and(|n| last < n) =>
                        {
                            Visit::Take
                        }
                        _ => Visit::Skip,
                    }
                }
                _ => Visit::Skip,
            },
            |batch| {
                if let Some(t) = batch.header.stream {
                    if let Some(&(_, last)) = wanted.get(&t.id) {
                        let i = (last - t.base) as usize;
                        if let Some(mut r) = batch.records.into_iter().nth(i) {
                            r.offset = last;
                            taken.borrow_mut().push((t.id, r));
                        }
                    }
                }
                true
            },
            |e| damage.push(e.to_string()),
        )?;
        for (id, r) in taken.into_inner() {
            if let Some((name, _)) = wanted.remove(&id) {
                found.insert(name.to_string(), r);
            }
        }
        let why = if damage.is_empty() {
            "records lost to damage".to_string()
        } else {
            damage.join("; ")
        };
        let mut missing: Vec<(String, String)> = wanted
            .into_values()
            .map(|(name, _)| (name.to_string(), why.clone()))
            .collect();
        missing.sort();
        Ok((found, missing))
    }

    /// Calls `visit` with the name, records and bytes (as [`Stream::size_bytes`] counts them)
    /// of every defined stream, in no particular order, without copying any name.
    pub fn for_each_stream(&self, mut visit: impl FnMut(&str, u64, u64)) {
        let streams = self.inner.streams.read();
        for st in streams.by_id.values().filter(|st| st.defined) {
            let bytes = st
                .entry_for(st.start)
                .map_or(0, |i| st.bytes - st.entries[i].bytes_before);
            visit(&st.name, st.next.saturating_sub(st.start), bytes);
        }
    }

    /// Writes the commit record of a transaction whose parts were appended with
    /// [`Stream::append_part`] (by their log offsets): once it is synced, the parts survive a
    /// crash together; before, none of them does. Buffered like an append.
    pub fn commit_parts(&self, parts: &[u64]) -> Result<(), LogError> {
        if parts.is_empty() {
            return Ok(());
        }
        let _control = self.inner.control.lock();
        self.inner.write_control(&[Op::Commit {
            parts: parts.to_vec(),
        }])
    }

    /// Makes everything appended so far durable (one fsync shared by concurrent callers).
    pub fn sync(&self) -> Result<(), LogError> {
        self.inner.log.sync()
    }

    /// Deletes the segments no stream needs any more (at most once a second unless `force`):
    /// the definitions of the streams they hold are first written again at the end of the log
    /// and synced. Returns how many segments were deleted.
    pub fn compact(&self, force: bool) -> Result<u64, LogError> {
        self.inner.compact(force)
    }

    /// The underlying log's counters (appends, fsyncs, segments, bytes on disk).
    pub fn stats(&self) -> LogStats {
        self.inner.log.stats()
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        self.inner.log.dir()
    }

    /// Writes the index checkpoint now (see [`StoreConfig::checkpoint_bytes`] for when
    /// [`maybe_checkpoint`](Self::maybe_checkpoint) does it): every stream's state at the end
    /// of the log as it stands, so that the next open scans only what is appended after it.
    /// Blocking: syncs the log (the checkpoint never covers what a crash could take back), then
    /// writes the checkpoint file atomically. Appends wait while the streams' state is copied
    /// (a few bytes per stream and index entry); reads do not. Returns the log offset it
    /// stands at.
    ///
    /// A transaction part written and not yet committed is counted by the checkpoint and
    /// listed in it: the checkpoint is used at the next open only if a commit record after
    /// it names the part (otherwise the store is rebuilt from the whole log, which discards
    /// the part).
    pub fn checkpoint(&self) -> Result<u64, LogError> {
        let mut mark = self.inner.mark.lock();
        self.inner
            .write_checkpoint(&mut mark, true)
            .map(|p| p.unwrap_or_default())
    }

    /// Writes a checkpoint if one is due: at least [`StoreConfig::checkpoint_bytes`] (and
    /// at least the last checkpoint's size) appended since the last one, or anything appended
    /// and [`StoreConfig::checkpoint_interval`] passed. Not while a transaction part waits for
    /// its commit record, nor while another checkpoint is being written: a later call does
    /// it. For a maintenance thread (blocking, like [`checkpoint`](Self::checkpoint)); cheap
    /// when nothing is due. Returns whether it wrote one.
    pub fn maybe_checkpoint(&self) -> Result<bool, LogError> {
        let inner = &*self.inner;
        let Some(mut mark) = inner.mark.try_lock() else {
            return Ok(false);
        };
        let since = inner.streams.read().clock.saturating_sub(mark.clock);
        let config = &inner.config;
        let due = since > 0
            && (config
                .checkpoint_bytes
                .is_some_and(|b| since >= b.max(mark.bytes))
                || config
                    .checkpoint_interval
                    .is_some_and(|i| mark.at.elapsed() >= i));
        if !due {
            return Ok(false);
        }
        inner
            .write_checkpoint(&mut mark, false)
            .map(|p| p.is_some())
    }

    /// How the store rebuilt its streams when it opened: from which checkpoint, scanning how
    /// many bytes of the log.
    #[doc(hidden)]
    pub fn open_scan(&self) -> OpenScan {
        self.inner.opened
    }

    /// Writes a checkpoint (with [`StoreConfig::checkpoint_on_close`], if anything was
    /// appended since the last one and no transaction part waits for its commit record), then
    /// syncs and closes the store: later calls return [`LogError::Closed`].
    pub fn close(&self) -> Result<(), LogError> {
        let checkpointed = self.inner.checkpoint_on_close();
        self.inner.closed.store(true, Ordering::SeqCst);
        let closed = self.inner.log.close();
        checkpointed.and(closed)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if !self.closed.load(Ordering::SeqCst) {
            // Best effort: without it the next open scans more of the log.
            let _ = self.checkpoint_on_close();
        }
    }
}

/// Raises the end of every stream that ended further on in a checkpoint that could not be used
/// (it stands past the end of the log: the log lost its tail after the checkpoint was written,
/// which an fsync before each checkpoint rules out for a crash; damage does not): the offsets
/// in between were lost, and are never given out again (a read of them is
/// [`LogError::Damaged`]). Each raise is a note.
fn raise_ends(streams: &mut Streams, floors: &[(u32, Arc<str>, u64)], notes: &mut Vec<String>) {
    for (id, name, end) in floors {
        let Some(st) = streams.by_id.get_mut(id) else {
            continue;
        };
        if st.name != *name || *end <= st.next {
            continue;
        }
        notes.push(format!(
            "stream {name:?} ended at {end} when last checkpointed, but its records end at {}: \
             offsets {}..{end} were lost and are not given out again",
            st.next, st.next
        ));
        if st.start == st.next {
            // Nothing left to read: the stream starts where it ended.
            st.start = *end;
            st.entries.clear();
        }
        st.next = *end;
    }
}

impl Inner {
    /// The checkpoint written when the store closes, if configured and anything changed.
    fn checkpoint_on_close(&self) -> Result<(), LogError> {
        if !self.config.checkpoint_on_close {
            return Ok(());
        }
        let mut mark = self.mark.lock();
        if self.streams.read().clock == mark.clock {
            return Ok(());
        }
        self.write_checkpoint(&mut mark, false).map(|_| ())
    }

    /// Writes a checkpoint of the streams as they are (see [`Store::checkpoint`]), unless
    /// transaction parts wait for their commit record and `with_open_parts` is false
    /// (`Ok(None)`). The caller holds `mark`.
    fn write_checkpoint(
        &self,
        mark: &mut Mark,
        with_open_parts: bool,
    ) -> Result<Option<u64>, LogError> {
        // After an fsync failure what the files hold is unknown: nothing to vouch for.
        self.log.check_open()?;
        let (position, clock, state) = {
            let s = self.streams.read();
            if !with_open_parts && !s.open_parts.is_empty() {
                return Ok(None);
            }
            (s.end, s.clock, checkpoint::encode_state(&s))
        };
        // Taken after the state: a segment created since starts at or after `position`.
        let segments = self.log.segment_info();
        let start = segments.first().map_or(0, |&(base, _)| base);
        let mut dead: Vec<u64> = self.dead.iter().copied().filter(|&s| s >= start).collect();
        dead.sort_unstable();
        let bytes = checkpoint::assemble(&segments, &dead, &state);
        // What it covers is on disk before it is (as far as the durability asks for disks).
        let durable = self.config.log.durability != Durability::Never;
        if durable {
            self.log.sync()?;
        }
        checkpoint::write(self.log.dir(), &bytes, durable)?;
        *mark = Mark {
            clock,
            at: Instant::now(),
            bytes: bytes.len() as u64,
        };
        Ok(Some(position))
    }

    /// Appends control records and applies them (under the log's write lock, in log order).
    /// The caller holds `control`.
    fn write_control(&self, ops: &[Op]) -> Result<(), LogError> {
        if ops.is_empty() {
            return Ok(());
        }
        let records: Vec<RecordIn> = ops.iter().map(Op::encode).collect();
        let base = self.streams.read().control_next;
        let tag = StreamTag {
            id: CONTROL,
            base,
            tx_part: false,
        };
        let mut failed = None;
        self.log.append_stream_buffered(tag, &records, |seq, len| {
            let mut s = self.streams.write();
            for (i, op) in ops.iter().enumerate() {
                if let Err(e) = s.apply(op.clone(), seq + i as u64, &self.config) {
                    failed = Some(e);
                }
            }
            let _ = s.on_batch(tag, ops.len() as u64, seq, len, 0, &self.config);
        })?;
        match failed {
            Some(reason) => Err(LogError::Inconsistent(reason)),
            None => Ok(()),
        }
    }

    fn compact(&self, force: bool) -> Result<u64, LogError> {
        {
            let mut last = self.last_compact.lock();
            if !force && last.is_some_and(|t| t.elapsed() < COMPACT_EVERY) {
                return Ok(0);
            }
            *last = Some(Instant::now());
        }
        let bases = self.log.segment_bases();
        if bases.len() < 2 {
            return Ok(0);
        }
        let _control = self.control.lock();
        let needed = {
            let s = self.streams.read();
            s.by_id
                .values()
                .filter(|st| st.defined && st.start < st.next)
                .filter_map(|st| st.entry_for(st.start).map(|i| st.entries[i].seq))
                .min()
                .unwrap_or(u64::MAX)
        };
        // The newest segment boundary below which nothing is needed (never the active segment).
        let Some(&cut) = bases[1..].iter().rev().find(|&&b| b <= needed) else {
            return Ok(0);
        };
        let redefine: Vec<Op> = {
            let s = self.streams.read();
            s.by_id
                .iter()
                .filter(|(_, st)| st.defined && st.define_seq < cut)
                .map(|(&id, st)| Op::Define {
                    id,
                    start: st.start,
                    next: st.next,
                    name: st.name.to_string(),
                })
                .collect()
        };
        for chunk in redefine.chunks(1024) {
            self.write_control(chunk)?;
        }
        self.log.sync()?;
        self.log.delete_segments_before(cut)
    }

    /// Calls `take` with each batch of stream `id` holding records at or after `*want` (which
    /// `take` advances), until `take` returns false or the stream's end as of the call.
    fn scan_stream(
        &self,
        id: u32,
        want: &std::cell::Cell<u64>,
        mut select: impl FnMut(&BatchHeader) -> bool,
        mut take: impl FnMut(DecodedBatch) -> bool,
    ) -> Result<(), LogError> {
        let skip = self.config.skip_bytes;
        let mut first = true;
        loop {
            let (seq, end) = {
                let s = self.streams.read();
                let Some(st) = s.by_id.get(&id) else {
                    return Ok(());
                };
                if want.get() >= st.next {
                    return Ok(());
                }
                let entry = if first {
                    st.entry_for(want.get())
                } else {
                    let i = st.entries.partition_point(|e| e.offset < want.get());
                    (i < st.entries.len()).then_some(i)
                };
                match entry {
                    Some(i) => (st.entries[i].seq, st.next),
                    None => return Ok(()),
                }
            };
            first = false;
            let mut gap = 0u64;
            let mut jumped = false;
            let taken_all = std::cell::Cell::new(false);
            self.log.scan(
                seq,
                |h| match h.stream {
                    Some(t) if t.id == id && !(t.tx_part && self.dead.contains(&h.base_offset)) => {
                        gap = 0;
                        if t.base >= end {
                            taken_all.set(true);
                            Visit::Stop
                        } else if h.stream_next().unwrap_or(0) <= want.get() {
                            Visit::Skip
                        } else if !select(h) {
                            // Nothing wanted in it: the scan has passed it.
                            want.set(h.stream_next().unwrap_or(0));
                            Visit::Skip
                        } else {
                            Visit::Take
                        }
                    }
                    _ => {
                        gap += h.total_len();
                        if gap >= skip {
                            jumped = true;
                            Visit::Stop
                        } else {
                            Visit::Skip
                        }
                    }
                },
                |batch| {
                    let go_on = take(batch);
                    taken_all.set(!go_on);
                    go_on
                },
            )?;
            if !jumped || taken_all.get() {
                return Ok(());
            }
        }
    }
}

impl Stream {
    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn state<T>(&self, f: impl FnOnce(&StreamState) -> T) -> Option<T> {
        self.inner.streams.read().by_id.get(&self.id).map(f)
    }

    /// The first retained offset.
    pub fn start(&self) -> u64 {
        self.state(|st| st.start).unwrap_or(0)
    }

    /// The offset the next appended record gets.
    pub fn next_offset(&self) -> u64 {
        self.state(|st| st.next).unwrap_or(0)
    }

    /// Bytes of the stream's retained batches (counted from its index entries: at most one
    /// index interval more than exact).
    pub fn size_bytes(&self) -> u64 {
        self.state(|st| {
            st.entry_for(st.start)
                .map_or(0, |i| st.bytes - st.entries[i].bytes_before)
        })
        .unwrap_or(0)
    }

    /// Appends `records` at stream offsets `first..`, as one batch, buffered: durable after
    /// [`Store::sync`]. `first` must be the stream's next offset, or beyond it (the offsets in
    /// between are skipped for good).
    pub fn append(&self, first: u64, records: &[RecordIn]) -> Result<AppendInfo, LogError> {
        self.write(first, records, false).map(|(info, _)| info)
    }

    /// Appends like [`append`](Self::append) a part of a transaction across streams: after a
    /// crash it counts only if [`Store::commit_parts`] named it (with the log offset returned
    /// here) and that commit record was synced. Returns the part's log offset.
    pub fn append_part(&self, first: u64, records: &[RecordIn]) -> Result<u64, LogError> {
        self.write(first, records, true).map(|(_, seq)| seq)
    }

    fn write(
        &self,
        first: u64,
        records: &[RecordIn],
        tx_part: bool,
    ) -> Result<(AppendInfo, u64), LogError> {
        let next = self.next_offset();
        if first < next {
            return Err(LogError::Inconsistent(format!(
                "stream {:?}: append at offset {first}, below its end {next}",
                self.name
            )));
        }
        let tag = StreamTag {
            id: self.id,
            base: first,
            tx_part,
        };
        let mut failed = None;
        let mut at = 0;
        let inner = &*self.inner;
        inner.log.append_stream_buffered(tag, records, |seq, len| {
            at = seq;
            let max_ts = records
                .iter()
                .map(|r| r.timestamp.unwrap_or(0))
                .max()
                .unwrap_or(0);
            let mut s = inner.streams.write();
            if let Err(e) = s.on_batch(tag, records.len() as u64, seq, len, max_ts, &inner.config) {
                failed = Some(e);
            }
        })?;
        if let Some(reason) = failed {
            return Err(LogError::Inconsistent(reason));
        }
        let info = AppendInfo {
            base_offset: first,
            last_offset: first + records.len() as u64 - 1,
        };
        Ok((info, at))
    }

    /// Reads records from `from` on (from the start if below it): at most `max_records`, and
    /// stopping before the record that would bring their total size over `max_bytes` (the
    /// first is returned whatever its size). Their `offset` is the stream offset.
    pub fn read(
        &self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>, LogError> {
        let want = std::cell::Cell::new(from.max(self.start()));
        let mut taken = Taken::new(max_records, max_bytes);
        if max_records == 0 {
            return Ok(Vec::new());
        }
        // Every batch below this end was written before the scan starts, so the scan sees it.
        let end = self.next_offset();
        let mut gap_to = None;
        let scanned = self.inner.scan_stream(
            self.id,
            &want,
            |_| true,
            |batch| {
                let base = batch.header.stream.map_or(0, |t| t.base);
                for (i, r) in batch.records.into_iter().enumerate() {
                    let offset = base + i as u64;
                    if offset < want.get() {
                        continue;
                    }
                    if offset > want.get() {
                        // Records lost to damage: what came before first, then the gap.
                        if taken.out.is_empty() {
                            gap_to = Some((offset, batch.header.base_offset));
                        }
                        return false;
                    }
                    if !taken.push(r, offset) {
                        return false;
                    }
                    want.set(offset + 1);
                }
                taken.wants_more()
            },
        );
        let out = taken.out;
        if let (Some((to, seq)), Ok(())) = (gap_to, &scanned) {
            // Where: the segment holding the first batch after the gap (the lost batches are
            // before it, in it or in the segment before).
            let bases = self.inner.log.segment_bases();
            let segment = bases[bases.partition_point(|&b| b <= seq).saturating_sub(1)];
            return Err(LogError::Damaged {
                stream: self.name.to_string(),
                from: want.get(),
                to,
                reason: format!(
                    "records lost to damage before the batch at log offset {seq} \
                     (segment {segment:020}.log)"
                ),
            });
        }
        if out.is_empty() && scanned.is_ok() && want.get() < end {
            // The stream's last records (counted by the checkpoint the store opened from) were
            // in data lost to damage since, or a damaged header (not checked by this scan)
            // hid them: a scan that checks every batch reads them, or tells where reading
            // can go on.
            let checked = self.read_checked(want.get(), end, max_records, max_bytes);
            if !checked.is_empty() {
                return Ok(checked);
            }
            return Err(self.damaged(want.get(), "records lost to damage".into()));
        }
        match scanned {
            Ok(()) => Ok(out),
            // What was read before the damage first; the next read reports it.
            Err(LogError::Corrupt { .. }) if !out.is_empty() => Ok(out),
            Err(LogError::Corrupt {
                segment,
                position,
                reason,
            }) => Err(self.damaged(
                want.get(),
                format!("{}: {position}: {reason}", segment.display()),
            )),
            Err(e) => Err(e),
        }
    }

    /// The damaged range starting at `from`, which a reader skips to get past the damage: up to
    /// the first whole, CRC-checked batch of the stream after it, found by scanning from the
    /// index entry at or before `from` around damage (a damaged batch whose neighbours still
    /// chain is skipped alone), or, where that cannot be told (damage in the active segment,
    /// or nothing checked before the next index entry), up to the stream's next index entry
    /// after it (or its end).
    fn damaged(&self, from: u64, reason: String) -> LogError {
        let bounds = self.state(|st| {
            let at = st.entry_for(from).map(|i| st.entries[i].seq);
            let next = st
                .entries
                .iter()
                .find(|e| e.offset > from)
                .map_or(st.next, |e| e.offset);
            (at, next)
        });
        let (at, coarse) = bounds.unwrap_or((None, from + 1));
        let coarse = coarse.max(from + 1);
        let (resume, found) = at.map_or((None, None), |seq| {
            self.resume_after_damage(seq, from, coarse)
        });
        let to = resume.map_or(coarse, |to| to.clamp(from + 1, coarse));
        // Where the damage is, if the caller did not say.
        let reason = match found {
            Some(found) if !reason.contains(".log") => format!("{reason}: {found}"),
            _ => reason,
        };
        LogError::Damaged {
            stream: self.name.to_string(),
            from,
            to,
            reason,
        }
    }

    /// Reads like [`read`](Self::read), from `from` (below `end`), with a scan that checks the
    /// CRC of every batch of a sealed segment before it trusts its header, so that a damaged
    /// header of another batch cannot hide records: for a read that found nothing where the
    /// stream has records. Empty if the records at `from` are not there.
    fn read_checked(
        &self,
        from: u64,
        end: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Vec<StoredRecord> {
        let seq = self.state(|st| st.entry_for(from).map(|i| st.entries[i].seq));
        let Some(Some(seq)) = seq else {
            return Vec::new();
        };
        let mut taken = Taken::new(max_records, max_bytes);
        let want = Cell::new(from);
        let _ = self.inner.log.scan_around_damage(
            seq,
            |h| match h.stream {
                Some(t) if t.id == self.id && !self.inner.dead.contains(&h.base_offset) => {
                    if t.base >= end || t.base > want.get() {
                        return Visit::Stop;
                    }
                    if t.base.saturating_add(h.record_count.into()) > want.get() {
                        Visit::Take
                    } else {
                        Visit::Skip
                    }
                }
                _ => Visit::Skip,
            },
            |batch| {
                let base = batch.header.stream.map_or(0, |t| t.base);
                for (i, r) in batch.records.into_iter().enumerate() {
                    let offset = base + i as u64;
                    if offset < want.get() {
                        continue;
                    }
                    if !taken.push(r, offset) {
                        return false;
                    }
                    want.set(offset + 1);
                }
                taken.wants_more()
            },
            |_| {},
        );
        taken.out
    }

    /// The stream offset of the first CRC-checked batch of this stream starting after `from`,
    /// scanning the log from log offset `seq` around damage in sealed segments, if one starts
    /// below `limit` and no checked batch holds `from` itself (then the damage is not where
    /// this tells); and the first damage the scan met, as text naming the segment and position.
    fn resume_after_damage(
        &self,
        seq: u64,
        from: u64,
        limit: u64,
    ) -> (Option<u64>, Option<String>) {
        let mut found = None;
        let mut damage = None;
        let scanned = self.inner.log.scan_around_damage(
            seq,
            |h| match h.stream {
                Some(t) if t.id == self.id && !self.inner.dead.contains(&h.base_offset) => {
                    let end = t.base.saturating_add(h.record_count.into());
                    if t.base >= limit || (t.base <= from && from < end) {
                        return Visit::Stop;
                    }
                    if t.base > from {
                        found = Some(t.base);
                        return Visit::Stop;
                    }
                    Visit::Skip
                }
                _ => Visit::Skip,
            },
            |_| false,
            |e| {
                if damage.is_none() {
                    damage = Some(e.to_string());
                }
            },
        );
        match scanned {
            Ok(()) => (found, damage),
            Err(e) => (None, Some(e.to_string())),
        }
    }

    /// The first offset whose record timestamp is `>= timestamp_ms`, or `None` if every
    /// retained record is older.
    pub fn offset_for_timestamp(&self, timestamp_ms: u64) -> Result<Option<u64>, LogError> {
        let from = self.state(|st| {
            let i = st
                .entries
                .iter()
                .rposition(|e| e.ts_before < timestamp_ms)
                .unwrap_or(0);
            st.entries
                .get(i)
                .map_or(st.start, |e| e.offset.max(st.start))
        });
        let Some(from) = from else { return Ok(None) };
        let want = std::cell::Cell::new(from);
        let mut found = None;
        self.inner.scan_stream(
            self.id,
            &want,
            |h| h.max_timestamp >= timestamp_ms,
            |batch| {
                let base = batch.header.stream.map_or(0, |t| t.base);
                let hit = batch
                    .records
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (base + i as u64, r.timestamp))
                    .find(|&(o, ts)| o >= want.get() && ts >= timestamp_ms);
                want.set(base + batch.records.len() as u64);
                found = hit.map(|(o, _)| o);
                found.is_none()
            },
        )?;
        Ok(found)
    }

    /// Moves the stream's start to `start` (records below it are gone for readers; their
    /// space is reclaimed once no stream needs their segment). A control record, buffered:
    /// durable after [`Store::sync`]. Returns whether the start moved.
    pub fn trim(&self, start: u64) -> Result<bool, LogError> {
        let _control = self.inner.control.lock();
        let moves = self
            .state(|st| start.min(st.next) > st.start)
            .unwrap_or(false);
        if !moves {
            return Ok(false);
        }
        self.inner
            .write_control(&[Op::Trim { id: self.id, start }])?;
        Ok(true)
    }

    /// Moves an empty stream's start and end to `offset` (never back), so that its next record
    /// gets that offset: for streams whose earlier records are gone (an imported log whose
    /// records retention deleted, or offsets handed out that must never be reused). A control
    /// record, buffered like [`trim`](Self::trim).
    pub fn advance_to(&self, offset: u64) -> Result<(), LogError> {
        let _control = self.inner.control.lock();
        let Some((start, next)) = self.state(|st| (st.start, st.next)) else {
            return Ok(());
        };
        if offset <= next {
            return Ok(());
        }
        if start < next {
            return Err(LogError::Inconsistent(format!(
                "stream {:?} holds records: it cannot skip from {next} to {offset}",
                self.name
            )));
        }
        self.inner.write_control(&[Op::Define {
            id: self.id,
            start: offset,
            next: offset,
            name: self.name.to_string(),
        }])
    }

    /// Sets the stream's retention (in memory: the caller sets it again after reopening).
    pub fn set_retention(&self, retention: RetentionPolicy) {
        if let Some(st) = self.inner.streams.write().by_id.get_mut(&self.id) {
            st.retention = (retention != RetentionPolicy::default()).then(|| Box::new(retention));
        }
    }

    /// Applies the stream's retention (moving its start), then deletes the segments no stream
    /// needs (at most once a second). Returns whether the start moved.
    pub fn apply_retention(&self) -> Result<bool, LogError> {
        let now = now_ms();
        let start = self.state(|st| st.retention_start(now)).unwrap_or(0);
        let moved = self.trim(start)?;
        self.inner.compact(false)?;
        Ok(moved)
    }
}

/// The records a read takes: at most `max_records`, and none that would bring their total size
/// over `max_bytes` (the first is taken whatever its size).
struct Taken {
    out: Vec<StoredRecord>,
    bytes: usize,
    max_records: usize,
    max_bytes: usize,
}

impl Taken {
    fn new(max_records: usize, max_bytes: usize) -> Self {
        Taken {
            out: Vec::new(),
            bytes: 0,
            max_records,
            max_bytes,
        }
    }

    /// Takes `r` as the record at stream offset `offset`; false if it does not fit (the read
    /// ends before it).
    fn push(&mut self, mut r: StoredRecord, offset: u64) -> bool {
        let size = r.size();
        if self.out.len() >= self.max_records
            || (!self.out.is_empty() && self.bytes + size > self.max_bytes)
        {
            return false;
        }
        r.offset = offset;
        self.bytes += size;
        self.out.push(r);
        true
    }

    /// Whether another record would be taken.
    fn wants_more(&self) -> bool {
        self.out.len() < self.max_records
    }
}
