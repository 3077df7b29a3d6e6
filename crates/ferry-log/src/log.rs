//! [`Log`]: appends, reads, time look-ups, truncation, retention and durability.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use crate::cache::{BatchCache, CachedBatch};
use crate::codec::{
    decode_frame, encode_views, set_base_offset, BatchHeader, DecodedBatch, RecordView, StreamTag,
    SEGMENT_HEADER_LEN, STREAM_BATCH_HEADER_LEN,
};
use crate::config::{Durability, LogConfig};
use crate::error::LogError;
use crate::record::{record_size, AppendInfo, RecordIn, StoredRecord};
use crate::recovery::{open_active, recover, SegmentState};
use crate::segment::{sync_dir, BatchSpan, DueEntries, Segment};
use crate::sync::{Flusher, GroupCommit};

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Directories open in this process: a second `Log` on the same directory would corrupt it.
static OPEN_DIRS: Mutex<BTreeSet<PathBuf>> = parking_lot::const_mutex(BTreeSet::new());

/// Holds a directory in [`OPEN_DIRS`] until dropped.
#[derive(Debug)]
struct DirClaim(PathBuf);

impl DirClaim {
    fn claim(dir: &Path) -> Result<Self, LogError> {
        let dir = dir
            .canonicalize()
            .map_err(|e| LogError::io("resolve", dir, e))?;
        if !OPEN_DIRS.lock().insert(dir.clone()) {
            return Err(LogError::AlreadyOpen(dir));
        }
        Ok(DirClaim(dir))
    }
}

impl Drop for DirClaim {
    fn drop(&mut self) {
        OPEN_DIRS.lock().remove(&self.0);
    }
}

/// The segments and write progress, published to readers.
#[derive(Debug)]
pub(crate) struct State {
    /// By base offset; never empty; the last one is active.
    pub segments: Vec<SegmentState>,
    /// Number of batches written since open (group commit sequence numbers).
    pub written_seq: u64,
    /// Sealed segments not fsynced since they were rolled, oldest first: the sync after a
    /// roll fsyncs them before the active segment (a roll does no fsync under the writer lock).
    pub unsynced: Vec<Arc<Segment>>,
    /// Segments whose header says that the segment before them may not be synced
    /// ([`crate::SegmentHeader::prev_unsynced`]), oldest first, with their creation time: the
    /// next sync clears the flag once it synced the segment before each, then syncs the
    /// directory (which holds their new names).
    pub flagged: Vec<(Arc<Segment>, u64)>,
    /// What recovery cut or skipped (see [`Log::recovery_notes`]).
    pub notes: Vec<String>,
}

impl State {
    fn active(&self) -> &SegmentState {
        &self.segments[self.segments.len() - 1]
    }

    fn active_mut(&mut self) -> &mut SegmentState {
        let last = self.segments.len() - 1;
        &mut self.segments[last]
    }

    fn start_offset(&self) -> u64 {
        self.segments[0].seg.base
    }

    fn next_offset(&self) -> u64 {
        self.active().meta.next_offset
    }

    fn size_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.meta.len).sum()
    }

    /// The segment holding `offset` (or starting at it, for the end of the log).
    fn find(&self, offset: u64) -> Option<&SegmentState> {
        let after = self.segments.partition_point(|s| s.seg.base <= offset);
        after.checked_sub(1).map(|i| &self.segments[i])
    }
}

/// Counters of a [`Log`], see [`Log::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Batches appended.
    pub appends: u64,
    /// Records appended.
    pub records_appended: u64,
    /// Bytes appended (encoded batches).
    pub bytes_appended: u64,
    /// Data fsyncs issued by group commit, the flusher, `sync` and `close`.
    pub fsyncs: u64,
    /// Writes of appended batches to segment files: one per append, but with durability
    /// `Always`, where the batches appended between two syncs are written together.
    pub batch_writes: u64,
    /// Batches served from the cache by `read`.
    pub cache_hits: u64,
    /// Batches read from disk by `read`.
    pub cache_misses: u64,
    /// Segments rolled.
    pub segments_rolled: u64,
    /// Segments deleted by retention.
    pub segments_deleted: u64,
    /// Segments now on disk.
    pub segments: usize,
    /// Bytes now on disk in segment files.
    pub size_bytes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    appends: AtomicU64,
    records: AtomicU64,
    bytes: AtomicU64,
    fsyncs: AtomicU64,
    writes: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    rolled: AtomicU64,
    deleted: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// Collects records for `read` within its limits.
struct Collector {
    records: Vec<StoredRecord>,
    bytes: usize,
    max_records: usize,
    max_bytes: usize,
    end: u64,
}

impl Collector {
    fn full(&self) -> bool {
        self.records.len() >= self.max_records
    }

    /// Adds the records of a batch from `from` on; stops when a limit is reached. The first
    /// record is taken whatever its size, so a large record cannot block a reader.
    fn extend(&mut self, batch: &[StoredRecord], from: u64) {
        for r in batch
            .iter()
            .filter(|r| r.offset >= from && r.offset < self.end)
        {
            let size = r.size();
            if self.full() || (!self.records.is_empty() && self.bytes + size > self.max_bytes) {
                self.max_records = self.records.len(); // done
                return;
            }
            self.bytes += size;
            self.records.push(r.clone());
        }
    }
}

/// Where a disk read is: the next batch of `seg` starts at `pos` with offset `next`.
struct Cursor {
    seg: SegmentState,
    pos: u64,
    next: u64,
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    config: LogConfig,
    /// Serialises appends, rolls, truncation and retention (I/O happens under it, not under
    /// `state`), and holds the batches gathered for one write.
    writer: Mutex<Writer>,
    /// Whether the writer holds gathered batches (see [`Writer::buf`]).
    gathered: AtomicBool,
    state: RwLock<State>,
    /// Held shared by readers and exclusively by truncation, which shrinks files under them.
    readers: RwLock<()>,
    cache: Mutex<BatchCache>,
    commit: GroupCommit,
    counters: Counters,
    closed: AtomicBool,
    /// The directory's claim, released when the log closes.
    claim: Mutex<Option<DirClaim>>,
}

/// The writer's state, under [`Shared::writer`].
#[derive(Debug)]
struct Writer {
    /// The preallocated end of the active segment's file: `(segment base, file length)`.
    alloc: (u64, u64),
    /// With durability `Always`, batches are gathered here and written to the file with one
    /// write when a sync begins (the one that acknowledges them), when anything reads the log
    /// (so readers see every appended batch), before a roll, truncation or close, or once
    /// [`GATHER_BYTES`] are held. Nothing is acknowledged before its sync, so a crash loses
    /// nothing it promised; each append costs a copy instead of a system call.
    buf: Vec<u8>,
    /// The active segment as it is once `buf` is written (`Some` while `buf` holds batches).
    pending: Option<SegmentState>,
    /// Batches in `buf`.
    batches: u64,
}

/// The most bytes of batches gathered before they are written.
const GATHER_BYTES: usize = 256 << 10;

/// A segmented, crash-safe append-only log in one directory. `Send + Sync`: share it with an
/// `Arc`; appends are serialised, reads run concurrently with them.
#[derive(Debug)]
pub struct Log {
    shared: Arc<Shared>,
    flusher: Mutex<Option<Flusher>>,
}

impl Log {
    /// Opens the log in `dir`, creating the directory if missing and recovering existing data
    /// (see the crate docs, RECOVERY).
    pub fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<Log, LogError> {
        config.validate()?;
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| LogError::io("create directory", dir, e))?;
        let claim = DirClaim::claim(dir)?;
        let state = recover(dir, &config, now_ms())?;
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            cache: Mutex::new(BatchCache::new(config.cache_bytes)),
            config,
            writer: Mutex::new(Writer {
                alloc: (u64::MAX, 0),
                buf: Vec::new(),
                pending: None,
                batches: 0,
            }),
            gathered: AtomicBool::new(false),
            state: RwLock::new(state),
            readers: RwLock::new(()),
            commit: GroupCommit::default(),
            counters: Counters::default(),
            closed: AtomicBool::new(false),
            claim: Mutex::new(Some(claim)),
        });
        let flusher = match shared.config.durability {
            Durability::Interval(every) => {
                let weak: Weak<Shared> = Arc::downgrade(&shared);
                let tick = move || {
                    weak.upgrade()
                        .is_some_and(|s| s.check_open().is_ok() && s.sync_written().is_ok())
                };
                Some(
                    Flusher::spawn(every, tick)
                        .map_err(|e| LogError::io("spawn flusher", dir, e))?,
                )
            }
            _ => None,
        };
        Ok(Log {
            shared,
            flusher: Mutex::new(flusher),
        })
    }

    /// What recovery did to the data when the log opened, one line each: torn tails cut (with
    /// the bytes and offset), and damaged sealed segments skipped with `tolerate_damage`.
    pub fn recovery_notes(&self) -> Vec<String> {
        self.shared.state.read().notes.clone()
    }

    /// The directory of the log.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The configuration the log was opened with.
    pub fn config(&self) -> &LogConfig {
        &self.shared.config
    }

    /// Appends `records` as one batch with contiguous offsets, all or nothing. Returns once the
    /// configured [`Durability`] holds.
    pub fn append(&self, records: &[RecordIn]) -> Result<AppendInfo, LogError> {
        let (info, seq) = self.write_batch(records, None, |_, _| ())?;
        let s = &*self.shared;
        if s.config.durability == Durability::Always {
            s.commit.wait_synced(seq, || s.sync_all_written())?;
        }
        Ok(info)
    }

    /// Appends like [`append`](Self::append) but returns once the batch is written to the OS,
    /// whatever the [`Durability`]: for callers that order appends under a lock of their own and
    /// then wait for durability outside it with [`sync`](Self::sync), which concurrent callers
    /// share (group commit).
    pub fn append_buffered(&self, records: &[RecordIn]) -> Result<AppendInfo, LogError> {
        self.write_batch(records, None, |_, _| ())
            .map(|(info, _)| info)
    }

    /// Appends `records` as one batch of `stream` (a [`crate::STREAM_BATCH_VERSION`] batch),
    /// buffered like [`append_buffered`](Self::append_buffered). `written` runs once the batch
    /// is written, still under the log's write lock (so calls see batches in log order), with
    /// the log offset of its first record and its size in bytes.
    pub fn append_stream_buffered(
        &self,
        stream: StreamTag,
        records: &[RecordIn],
        written: impl FnOnce(u64, u64),
    ) -> Result<AppendInfo, LogError> {
        self.write_batch(records, Some(stream), written)
            .map(|(info, _)| info)
    }

    /// Writes one batch; returns where it went and its write sequence number.
    fn write_batch(
        &self,
        records: &[RecordIn],
        stream: Option<StreamTag>,
        on_written: impl FnOnce(u64, u64),
    ) -> Result<(AppendInfo, u64), LogError> {
        let s = &*self.shared;
        s.check_open()?;
        if records.is_empty() {
            return Err(LogError::EmptyBatch);
        }
        let now = now_ms();
        let views: Vec<RecordView<'_>> = records.iter().map(|r| r.view(now)).collect();
        let max = u64::from(s.config.max_batch_bytes);
        let too_large = |size| LogError::RecordTooLarge { size, max };
        let mut frame =
            encode_views(0, &views, s.config.compression, stream).map_err(|e| too_large(e.size))?;
        if frame.len() as u64 > max {
            return Err(too_large(frame.len() as u64));
        }
        let count = records.len() as u64;
        let max_ts = views.iter().map(|v| v.timestamp).max().unwrap_or(now);
        let (info, seq) = {
            let mut w = s.writer.lock();
            s.check_open()?;
            let mut active = match w.pending.take() {
                Some(pending) => pending,
                None => s.state.read().active().clone(),
            };
            let base = active.meta.next_offset;
            set_base_offset(&mut frame, base);
            if s.should_roll(&active, frame.len() as u64, now) {
                w.pending = Some(active);
                s.write_gathered(&mut w)?;
                active = s.state.read().active().clone();
                active = s.roll(active, now)?;
            }
            s.preallocate(&mut w.alloc, &active, frame.len() as u64)?;
            let span = BatchSpan {
                base_offset: base,
                next_offset: base + count,
                len: frame.len() as u64,
                max_ts,
            };
            let pos = active.meta.len;
            let seq = if s.config.durability == Durability::Always {
                // Gathered: written with the batches around it (see `Writer::buf`).
                w.buf.extend_from_slice(&frame);
                let due = active.meta.push_batch(span, s.config.index_interval_bytes);
                let entries = write_entries(&active, due);
                w.batches += 1;
                let seq = s.state.read().written_seq + w.batches;
                w.pending = Some(active);
                s.gathered.store(true, Ordering::Release);
                if let Err(e) = entries {
                    // The index no longer matches the data: like a failed write, this closes
                    // the log (nothing gathered was acknowledged; reopening recovers).
                    s.closed.store(true, Ordering::SeqCst);
                    return Err(e);
                }
                seq
            } else {
                bump(&s.counters.writes, 1);
                let written = active.seg.write_at(&frame, pos).and_then(|()| {
                    let due = active.meta.push_batch(span, s.config.index_interval_bytes);
                    write_entries(&active, due)
                });
                if let Err(e) = written {
                    // Leave no partial batch behind the published end (best effort).
                    let _ = active.seg.set_len(pos);
                    return Err(e);
                }
                let mut st = s.state.write();
                st.written_seq += 1;
                st.active_mut().meta = active.meta;
                st.written_seq
            };
            on_written(base, frame.len() as u64);
            if w.buf.len() >= GATHER_BYTES {
                s.write_gathered(&mut w)?;
            }
            if s.config.cache_bytes > 0 {
                let stored = records
                    .iter()
                    .zip(&views)
                    .zip(base..)
                    .map(|((r, v), offset)| r.to_stored(offset, v.timestamp))
                    .collect();
                let size = views
                    .iter()
                    .map(|v| record_size(v.key, v.headers, v.payload))
                    .sum();
                s.cache.lock().insert(stored, size);
            }
            (
                AppendInfo {
                    base_offset: base,
                    last_offset: base + count - 1,
                },
                seq,
            )
        };
        bump(&s.counters.appends, 1);
        bump(&s.counters.records, count);
        bump(&s.counters.bytes, frame.len() as u64);
        Ok((info, seq))
    }

    /// Reads records from `from_offset` on: at most `max_records`, and stopping before the
    /// record that would bring the total [`StoredRecord::size`] over `max_bytes` (the first
    /// record is returned whatever its size). Reading at the end gives an empty vector; outside
    /// `[start_offset, next_offset]` is [`LogError::OffsetOutOfRange`].
    pub fn read(
        &self,
        from_offset: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>, LogError> {
        let s = &*self.shared;
        s.check_open()?;
        s.settle()?;
        let _readers = s.readers.read();
        let end = s.check_range(from_offset)?;
        let mut out = Collector {
            records: Vec::new(),
            bytes: 0,
            max_records,
            max_bytes,
            end,
        };
        let mut offset = from_offset;
        let mut cursor: Option<Cursor> = None;
        while offset < end && !out.full() {
            if let Some(batch) = s.cached(offset) {
                out.extend(&batch.records, offset);
                offset = batch.next_offset();
                cursor = None;
                continue;
            }
            let c = match cursor.take() {
                Some(c) if c.pos < c.seg.meta.len => c,
                _ => s.locate(offset)?,
            };
            let h = c.seg.seg.header_at(c.pos, c.seg.meta.len, c.next)?;
            if h.next_offset() > offset {
                let batch = c.seg.seg.decode_at(c.pos, h)?;
                bump(&s.counters.cache_misses, 1);
                out.extend(&batch.records, offset);
                offset = h.next_offset();
            }
            cursor = Some(Cursor {
                pos: c.pos + h.total_len(),
                next: h.next_offset(),
                seg: c.seg,
            });
        }
        Ok(out.records)
    }

    /// The first offset whose record timestamp is `>= timestamp_ms`, or `None` if every record
    /// is older. Timestamps need not be monotonic: the time index records, per segment, the
    /// largest timestamp before each indexed batch.
    pub fn offset_for_timestamp(&self, timestamp_ms: u64) -> Result<Option<u64>, LogError> {
        let s = &*self.shared;
        s.check_open()?;
        s.settle()?;
        let _readers = s.readers.read();
        let segments = s.state.read().segments.clone();
        for sg in segments
            .iter()
            .filter(|sg| sg.meta.max_ts.is_some_and(|m| m >= timestamp_ms))
        {
            if let Some(offset) = first_at_or_after(sg, timestamp_ms)? {
                return Ok(Some(offset));
            }
        }
        Ok(None)
    }

    /// The first retained offset.
    pub fn start_offset(&self) -> u64 {
        self.shared.state.read().start_offset()
    }

    /// The offset the next appended record will get (the end of the log).
    pub fn next_offset(&self) -> u64 {
        // A failure closes the log, which every later call reports.
        let _ = self.shared.settle();
        self.shared.state.read().next_offset()
    }

    /// Fsyncs everything appended so far (whatever the [`Durability`]).
    pub fn sync(&self) -> Result<(), LogError> {
        self.shared.check_open()?;
        self.shared.sync_written()
    }

    /// Drops every record after `offset` (keeps `..=offset`); a no-op at or past the end.
    pub fn truncate_after(&self, offset: u64) -> Result<(), LogError> {
        self.truncate_to(offset.saturating_add(1))
    }

    /// Drops every record at or after `new_end`, which becomes the next offset; `new_end` may
    /// be `start_offset()` (drops everything). Later segments are deleted newest first and the
    /// batch holding `new_end` is cut (its first records rewritten as a batch of their own), so
    /// a crash during truncation leaves a valid log that may keep the truncated records, or lose
    /// that one cut batch. If cutting the last segment fails, the log closes itself (reopen it
    /// to recover).
    pub fn truncate_to(&self, new_end: u64) -> Result<(), LogError> {
        let s = &*self.shared;
        s.check_open()?;
        let mut writer = s.writer.lock();
        s.write_gathered(&mut writer)?;
        let _readers = s.readers.write();
        let (start, end) = {
            let st = s.state.read();
            (st.start_offset(), st.next_offset())
        };
        if new_end >= end {
            return Ok(());
        }
        if new_end < start {
            return Err(LogError::OffsetOutOfRange {
                offset: new_end,
                start,
                end,
            });
        }
        s.cache.lock().remove_from(new_end);
        // Newest first, so that a crash leaves a contiguous prefix of segments.
        let target = loop {
            let mut st = s.state.write();
            if st.segments.len() == 1 || st.active().seg.base <= new_end {
                break st.active().clone();
            }
            if let Some(later) = st.segments.pop() {
                drop(st);
                later.seg.delete()?;
            }
        };
        let meta = s.cut_segment(&target, new_end).inspect_err(|_| {
            // The active segment's metadata no longer matches its file: reopen to recover.
            s.closed.store(true, Ordering::SeqCst);
        })?;
        // The cut file ends with its data again.
        writer.alloc = (target.seg.base, meta.len);
        s.state.write().active_mut().meta = meta;
        if s.durable_meta() {
            sync_dir(&s.dir)?;
        }
        Ok(())
    }

    /// Deletes the oldest sealed segments while a [`crate::RetentionPolicy`] limit is exceeded
    /// (total size, record count, or newest timestamp older than the maximum age). Returns how
    /// many segments were deleted. The active segment is never deleted.
    pub fn apply_retention(&self) -> Result<u64, LogError> {
        let policy = self.shared.config.retention;
        let now = now_ms();
        self.shared.delete_oldest(|st| {
            // Size and count bounds are floors, as in Kafka: a segment goes only if what
            // stays still meets the bound, so the log never keeps less than asked.
            let first = &st.segments[0].meta;
            let first_records = first.next_offset - st.start_offset();
            policy
                .max_bytes
                .is_some_and(|m| st.size_bytes().saturating_sub(first.len) >= m)
                || policy.max_records.is_some_and(|m| {
                    (st.next_offset() - st.start_offset()).saturating_sub(first_records) >= m
                })
                || policy.max_age.is_some_and(|age| {
                    first
                        .max_ts
                        .is_some_and(|ts| now.saturating_sub(ts) > millis(age))
                })
        })
    }

    /// Deletes the oldest sealed segments that hold nothing at or after `offset` (every record
    /// of theirs is below it). The active segment is never deleted. Returns how many were.
    pub fn delete_segments_before(&self, offset: u64) -> Result<u64, LogError> {
        self.shared
            .delete_oldest(|st| st.segments[0].meta.next_offset <= offset)
    }

    /// The log offsets where each segment starts, oldest first (the last one is active).
    pub fn segment_bases(&self) -> Vec<u64> {
        let _ = self.shared.settle();
        let st = self.shared.state.read();
        st.segments.iter().map(|sg| sg.seg.base).collect()
    }

    /// [`LogError::Closed`] once the log is closed (by `close`, or by an fsync failure).
    pub(crate) fn check_open(&self) -> Result<(), LogError> {
        self.shared.check_open()
    }

    /// `(base offset, creation time)` of each segment, oldest first: the creation time is the
    /// one in the segment's file header, which tells a segment file from another one with the
    /// same base offset.
    pub(crate) fn segment_info(&self) -> Vec<(u64, u64)> {
        let st = self.shared.state.read();
        st.segments
            .iter()
            .map(|sg| (sg.seg.base, sg.meta.created_ms))
            .collect()
    }

    /// Counters and sizes.
    pub fn stats(&self) -> LogStats {
        let s = &*self.shared;
        let c = &s.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = s.settle();
        let st = s.state.read();
        LogStats {
            appends: get(&c.appends),
            records_appended: get(&c.records),
            bytes_appended: get(&c.bytes),
            fsyncs: get(&c.fsyncs),
            batch_writes: get(&c.writes),
            cache_hits: get(&c.cache_hits),
            cache_misses: get(&c.cache_misses),
            segments_rolled: get(&c.rolled),
            segments_deleted: get(&c.deleted),
            segments: st.segments.len(),
            size_bytes: st.size_bytes(),
        }
    }

    /// Syncs everything and closes the log: later calls return [`LogError::Closed`].
    pub fn close(&self) -> Result<(), LogError> {
        let result = self.sync();
        self.shutdown();
        result
    }

    fn shutdown(&self) {
        {
            // A closed log's active segment ends with its data (no preallocated zeros).
            let mut writer = self.shared.writer.lock();
            if self.shared.write_gathered(&mut writer).is_ok()
                && !self.shared.closed.load(Ordering::SeqCst)
            {
                let active = self.shared.state.read().active().clone();
                if active.seg.file_len().is_ok_and(|l| l > active.meta.len) {
                    let _ = active.seg.set_len(active.meta.len);
                }
            }
        }
        self.shared.closed.store(true, Ordering::SeqCst);
        if let Some(mut flusher) = self.flusher.lock().take() {
            flusher.stop();
        }
        // Closed, it writes nothing more: the directory may be opened again, even while
        // handles on this log remain.
        self.shared.claim.lock().take();
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        let s = &*self.shared;
        if s.config.durability != Durability::Never && s.check_open().is_ok() {
            let _ = s.sync_written();
        }
        self.shutdown();
    }
}

/// Writes the index entries due after a batch (their slots are the last counted ones).
fn write_entries(sg: &SegmentState, (index, time): DueEntries) -> Result<(), LogError> {
    if let Some(entry) = index {
        sg.seg.index.put(sg.meta.index_count - 1, entry)?;
    }
    if let Some(entry) = time {
        sg.seg.time.put(sg.meta.time_count - 1, entry)?;
    }
    Ok(())
}

/// The first offset of `sg` with a timestamp `>= ts`.
fn first_at_or_after(sg: &SegmentState, ts: u64) -> Result<Option<u64>, LogError> {
    // Every record before the last entry with a smaller running maximum is older than `ts`.
    let from = sg
        .seg
        .time
        .search_last(sg.meta.time_count, |(t, _)| t < ts)?
        .map_or(sg.seg.base, |(_, o)| o);
    let (mut pos, mut next) = sg.seg.seek(&sg.meta, from)?;
    while pos < sg.meta.len {
        let h = sg.seg.header_at(pos, sg.meta.len, next)?;
        if h.next_offset() > from && h.max_timestamp >= ts {
            let batch = sg.seg.decode_at(pos, h)?;
            let found = batch
                .records
                .iter()
                .find(|r| r.offset >= from && r.timestamp >= ts);
            if let Some(r) = found {
                return Ok(Some(r.offset));
            }
        }
        pos += h.total_len();
        next = h.next_offset();
    }
    Ok(None)
}

impl Shared {
    /// Writes the gathered batches, if any (see [`Writer::buf`]): after it, the published
    /// state holds every batch appended before it began.
    fn settle(&self) -> Result<(), LogError> {
        if !self.gathered.load(Ordering::Acquire) {
            return Ok(());
        }
        self.write_gathered(&mut self.writer.lock())
    }

    /// Writes the gathered batches with one write and publishes the active segment's new
    /// state. A failed write closes the log: those batches were given offsets (reopen to
    /// recover; none of them was acknowledged).
    fn write_gathered(&self, w: &mut Writer) -> Result<(), LogError> {
        let Some(active) = w.pending.take() else {
            return Ok(());
        };
        let buf = std::mem::take(&mut w.buf);
        let pos = active.meta.len - buf.len() as u64;
        let written = active.seg.write_at(&buf, pos);
        bump(&self.counters.writes, 1);
        // The buffer's allocation is kept for the next batches.
        w.buf = buf;
        w.buf.clear();
        let batches = std::mem::take(&mut w.batches);
        self.gathered.store(false, Ordering::Release);
        if let Err(e) = written {
            self.closed.store(true, Ordering::SeqCst);
            return Err(e);
        }
        let mut st = self.state.write();
        st.written_seq += batches;
        st.active_mut().meta = active.meta;
        Ok(())
    }

    fn check_open(&self) -> Result<(), LogError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(LogError::Closed);
        }
        Ok(())
    }

    /// Deletes the oldest sealed segment while `expired` says so of the state (never the
    /// active one), then syncs the directory. Returns how many were deleted.
    fn delete_oldest(&self, mut expired: impl FnMut(&State) -> bool) -> Result<u64, LogError> {
        self.check_open()?;
        let mut writer = self.writer.lock();
        self.write_gathered(&mut writer)?;
        let mut deleted = 0;
        loop {
            let victim = {
                let mut st = self.state.write();
                if st.segments.len() < 2 || !expired(&st) {
                    break;
                }
                st.segments.remove(0)
            };
            self.cache.lock().remove_below(victim.meta.next_offset);
            victim.seg.delete()?;
            bump(&self.counters.deleted, 1);
            deleted += 1;
        }
        if deleted > 0 && self.durable_meta() {
            sync_dir(&self.dir)?;
        }
        Ok(deleted)
    }

    /// Whether segment creation, deletion and truncation are fsynced (with their directory).
    fn durable_meta(&self) -> bool {
        self.config.durability != Durability::Never
    }

    /// The end of the log if `offset` is within `[start, end]`.
    fn check_range(&self, offset: u64) -> Result<u64, LogError> {
        let st = self.state.read();
        let (start, end) = (st.start_offset(), st.next_offset());
        if offset < start || offset > end {
            return Err(LogError::OffsetOutOfRange { offset, start, end });
        }
        Ok(end)
    }

    fn cached(&self, offset: u64) -> Option<Arc<CachedBatch>> {
        let batch = self.cache.lock().get(offset)?;
        bump(&self.counters.cache_hits, 1);
        Some(batch)
    }

    /// A disk cursor at the batch holding `offset` (or one before it).
    fn locate(&self, offset: u64) -> Result<Cursor, LogError> {
        let found = {
            let st = self.state.read();
            st.find(offset).cloned().ok_or(LogError::OffsetOutOfRange {
                offset,
                start: st.start_offset(),
                end: st.next_offset(),
            })?
        };
        let (pos, next) = found.seg.seek(&found.meta, offset)?;
        Ok(Cursor {
            seg: found,
            pos,
            next,
        })
    }

    fn should_roll(&self, active: &SegmentState, batch_len: u64, now: u64) -> bool {
        let meta = &active.meta;
        !meta.is_empty()
            && (meta.len.saturating_add(batch_len) > self.config.segment_bytes
                || self
                    .config
                    .segment_max_age
                    .is_some_and(|age| now.saturating_sub(meta.created_ms) >= millis(age)))
    }

    /// Seals `old` (closing its time index) and starts a new active segment after it, under
    /// the writer lock but with no fsync: the old segment goes to [`State::unsynced`] and
    /// (unless durability is `Never`) the new one's header says so
    /// ([`crate::SegmentHeader::prev_unsynced`]); the next sync
    /// fsyncs the old segment, then clears the flag, syncs the new one and the directory,
    /// before it acknowledges anything. So a sealed segment may be torn on disk only while
    /// the segment after it still carries the flag, and then nothing after its tear was
    /// acknowledged (see the crate docs, RECOVERY).
    fn roll(&self, mut old: SegmentState, now: u64) -> Result<SegmentState, LogError> {
        // A sealed segment ends with its data: drop what was preallocated after it.
        if old.seg.file_len()? > old.meta.len {
            old.seg.set_len(old.meta.len)?;
        }
        if let Some(seal) = old.meta.seal_entry() {
            old.seg.time.put(old.meta.time_count, seal)?;
            old.meta.time_count += 1;
        }
        // With durability `Never` nothing is ever promised on disk: no flag, and a torn sealed
        // segment is damage, as it always was.
        let flag = self.durable_meta();
        let (seg, meta) = Segment::create(&self.dir, old.meta.next_offset, now, flag, false)?;
        let new = SegmentState {
            seg: Arc::new(seg),
            meta,
            damaged_at: None,
        };
        {
            let mut st = self.state.write();
            st.unsynced.push(Arc::clone(&old.seg));
            if flag {
                st.flagged.push((Arc::clone(&new.seg), now));
            }
            *st.active_mut() = old;
            st.segments.push(new.clone());
        }
        bump(&self.counters.rolled, 1);
        Ok(new)
    }

    /// Makes room for `len` more bytes at the end of the active segment's data by extending its
    /// file with zeros ahead of the writes ([`PREALLOCATE`] at a time): writes then overwrite
    /// initialised blocks of a file whose size does not change, so an fdatasync has no
    /// metadata to write (the inode's size, new extents), only the data. Recovery cuts a tail
    /// of zeros silently.
    fn preallocate(
        &self,
        alloc: &mut (u64, u64),
        active: &SegmentState,
        len: u64,
    ) -> Result<(), LogError> {
        if alloc.0 != active.seg.base {
            // A segment new to this writer ends with its data (created, rolled or recovered).
            *alloc = (active.seg.base, active.meta.len);
        }
        let need = active.meta.len + len;
        if need <= alloc.1 {
            return Ok(());
        }
        let target = need
            .saturating_add(PREALLOCATE)
            .min(self.config.segment_bytes.max(need));
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let mut at = alloc.1;
        while at < target {
            let n = (target - at).min(ZEROS.len() as u64);
            active.seg.write_at(&ZEROS[..n as usize], at)?;
            at += n;
        }
        alloc.1 = target;
        Ok(())
    }

    /// Fsyncs everything written so far; returns the write sequence number covered. A failure
    /// closes the log.
    fn sync_all_written(&self) -> Result<u64, LogError> {
        self.settle()?;
        let (sealed, flagged, active, seq) = {
            let mut st = self.state.write();
            let sealed = std::mem::take(&mut st.unsynced);
            let flagged = std::mem::take(&mut st.flagged);
            (
                sealed,
                flagged,
                Arc::clone(&st.active().seg),
                st.written_seq,
            )
        };
        // Oldest first: a segment's flag is cleared only once the segment before it is synced
        // (by this sync, just before, or by an earlier one), and written before its own sync.
        // By identity, not base offset: a truncation may delete a segment and a later roll
        // create another at the same base.
        let clear = |seg: &Arc<Segment>| -> Result<(), LogError> {
            match flagged.iter().find(|(f, _)| Arc::ptr_eq(f, seg)) {
                Some((f, created_ms)) => f.clear_prev_unsynced(*created_ms),
                None => Ok(()),
            }
        };
        let mut fsyncs = 0;
        let result = sealed
            .iter()
            .try_for_each(|seg| {
                fsyncs += 1;
                clear(seg).and_then(|()| seg.sync_all())
            })
            .and_then(|()| {
                fsyncs += 1;
                clear(&active).and_then(|()| active.sync_data())
            })
            .and_then(|()| {
                if flagged.is_empty() {
                    return Ok(());
                }
                fsyncs += 1;
                sync_dir(&self.dir)
            });
        bump(&self.counters.fsyncs, fsyncs);
        if result.is_err() {
            self.closed.store(true, Ordering::SeqCst);
        }
        result.map(|()| seq)
    }

    /// Group-commit sync of everything written so far.
    fn sync_written(&self) -> Result<(), LogError> {
        self.settle()?;
        let seq = self.state.read().written_seq;
        self.commit.wait_synced(seq, || self.sync_all_written())
    }

    /// Cuts `target` (now the last segment) so that its data ends before `new_end`, then
    /// rebuilds its metadata and indexes.
    fn cut_segment(
        &self,
        target: &SegmentState,
        new_end: u64,
    ) -> Result<crate::segment::SegmentMeta, LogError> {
        let seg = &target.seg;
        let (mut pos, mut next) = seg.seek(&target.meta, new_end)?;
        let header = loop {
            let h = seg.header_at(pos, target.meta.len, next)?;
            if h.next_offset() > new_end {
                break h;
            }
            pos += h.total_len();
            next = h.next_offset();
        };
        let kept = (new_end - header.base_offset) as usize;
        let prefix = if kept > 0 {
            let mut batch = seg.decode_at(pos, header)?;
            batch.records.truncate(kept);
            let views: Vec<RecordView<'_>> = batch.records.iter().map(RecordView::from).collect();
            Some(
                encode_views(
                    header.base_offset,
                    &views,
                    header.compression,
                    header.stream,
                )
                .map_err(|e| LogError::RecordTooLarge {
                    size: e.size,
                    max: u64::from(self.config.max_batch_bytes),
                })?,
            )
        } else {
            None
        };
        seg.set_len(pos)?;
        if let Some(frame) = prefix {
            seg.write_at(&frame, pos)?;
        }
        if self.durable_meta() {
            seg.sync_data()?;
        }
        open_active(seg, &self.config, now_ms(), &mut Vec::new())
    }
}

/// What [`Log::scan`] does with a batch it visits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visit {
    /// Goes on to the next batch without decoding this one.
    Skip,
    /// Decodes this batch (checking its CRC) and hands it over.
    Take,
    /// Ends the scan.
    Stop,
}

/// Bytes of zeros the active segment's file is extended by ahead of its writes.
const PREALLOCATE: u64 = 4 << 20;

/// Bytes a scan reads at a time.
const SCAN_CHUNK: u64 = 256 << 10;

/// A window of a segment file held in memory by a scan.
#[derive(Default)]
struct Window {
    buf: Vec<u8>,
    at: u64,
}

impl Window {
    /// The bytes `[pos, pos + len)` of `seg`, reading a chunk from `pos` if they are not held.
    fn get(&mut self, seg: &SegmentState, pos: u64, len: u64) -> Result<&[u8], LogError> {
        let held = pos >= self.at && pos + len <= self.at + self.buf.len() as u64;
        if !held {
            let want = len.max(SCAN_CHUNK).min(seg.meta.len.saturating_sub(pos));
            if want < len {
                return Err(LogError::corrupt(
                    &seg.seg.path,
                    pos,
                    "batch runs past the end of the segment",
                ));
            }
            self.buf.resize(want as usize, 0);
            seg.seg.read_at(&mut self.buf, pos)?;
            self.at = pos;
        }
        let from = (pos - self.at) as usize;
        Ok(&self.buf[from..from + len as usize])
    }
}

impl Log {
    /// Visits, in log order, every batch holding records at or after log offset `from` (from
    /// the start if `from` is below it) that was written when the scan began, reading the
    /// files sequentially in large chunks. `visit` sees each header; the batches it answers
    /// [`Visit::Take`] are decoded and passed to `take`, which returns whether to go on. Damage
    /// met on the way is [`LogError::Corrupt`].
    pub fn scan(
        &self,
        from: u64,
        mut visit: impl FnMut(&BatchHeader) -> Visit,
        mut take: impl FnMut(DecodedBatch) -> bool,
    ) -> Result<(), LogError> {
        self.scan_inner(from, &mut visit, &mut take, None)
    }

    /// Like [`scan`](Self::scan), but damage met in a sealed segment is handed to `damaged` and
    /// the scan goes on: for rebuilding what can be rebuilt around damage. The CRC of every
    /// batch of a sealed segment is checked before `visit` sees its header, so that no damaged
    /// header (stream, offsets, record count) is taken for true (recovery checks only the tail
    /// of a sealed segment, and the active one in full). A batch whose CRC fails while the next
    /// batch (or the segment's end) follows it is skipped alone; other damage skips the rest of
    /// its segment. Each is reported once, saying which. Damage in the active segment is still
    /// an error.
    pub fn scan_around_damage(
        &self,
        from: u64,
        mut visit: impl FnMut(&BatchHeader) -> Visit,
        mut take: impl FnMut(DecodedBatch) -> bool,
        mut damaged: impl FnMut(LogError),
    ) -> Result<(), LogError> {
        self.scan_inner(from, &mut visit, &mut take, Some(&mut damaged))
    }

    fn scan_inner(
        &self,
        from: u64,
        visit: &mut dyn FnMut(&BatchHeader) -> Visit,
        take: &mut dyn FnMut(DecodedBatch) -> bool,
        mut damaged: Option<&mut dyn FnMut(LogError)>,
    ) -> Result<(), LogError> {
        let s = &*self.shared;
        s.check_open()?;
        s.settle()?;
        let _readers = s.readers.read();
        let segments = s.state.read().segments.clone();
        let first = segments
            .partition_point(|sg| sg.seg.base <= from)
            .saturating_sub(1);
        let last = segments.len() - 1;
        for (i, sg) in segments.iter().enumerate().skip(first) {
            // Only sealed segments are verified: the active one was, in full, when opened.
            let bad_batch = damaged.as_deref_mut().filter(|_| i < last);
            match scan_segment(sg, from, visit, take, bad_batch) {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(LogError::Corrupt {
                    segment,
                    position,
                    reason,
                }) if i < last && damaged.is_some() => {
                    if let Some(report) = damaged.as_mut() {
                        report(LogError::Corrupt {
                            segment,
                            position,
                            reason: format!("{reason}; the rest of that segment is skipped"),
                        });
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Scans one segment for [`Log::scan`]; `Ok(false)` when the scan is to end. With `bad_batch`,
/// every batch's CRC is checked before `visit` sees its header, and a batch whose CRC fails is
/// handed to `bad_batch` and skipped if the next batch follows it (else it is an error: the
/// damage may be in its length, and what follows cannot be trusted).
fn scan_segment(
    sg: &SegmentState,
    from: u64,
    visit: &mut dyn FnMut(&BatchHeader) -> Visit,
    take: &mut dyn FnMut(DecodedBatch) -> bool,
    mut bad_batch: Option<&mut (dyn FnMut(LogError) + '_)>,
) -> Result<bool, LogError> {
    let (mut pos, mut next) = if sg.seg.base <= from {
        sg.seg.seek(&sg.meta, from)?
    } else {
        (SEGMENT_HEADER_LEN, sg.seg.base)
    };
    let mut window = Window::default();
    let end = sg.damaged_at.unwrap_or(sg.meta.len);
    let corrupt = |pos, reason: String| LogError::corrupt(&sg.seg.path, pos, reason);
    let header_at = |window: &mut Window, pos: u64| -> Result<BatchHeader, LogError> {
        let avail = (sg.meta.len - pos).min(STREAM_BATCH_HEADER_LEN as u64);
        BatchHeader::parse(window.get(sg, pos, avail)?).map_err(|e| corrupt(pos, e.to_string()))
    };
    while pos < end {
        let h = header_at(&mut window, pos)?;
        if h.base_offset != next {
            return Err(corrupt(
                pos,
                format!("batch at offset {}, expected {next}", h.base_offset),
            ));
        }
        if let Some(report) = bad_batch.as_mut() {
            if let Err(e) = h.verify_crc(window.get(sg, pos, h.total_len())?) {
                let after = pos + h.total_len();
                let follows = after == end
                    || header_at(&mut window, after)
                        .is_ok_and(|n| n.base_offset == h.next_offset());
                if !follows {
                    return Err(corrupt(pos, e.to_string()));
                }
                report(corrupt(pos, format!("{e}; that batch is skipped")));
                pos = after;
                next = h.next_offset();
                continue;
            }
        }
        if h.next_offset() > from {
            match visit(&h) {
                Visit::Stop => return Ok(false),
                Visit::Skip => {}
                Visit::Take => {
                    let frame = Bytes::copy_from_slice(window.get(sg, pos, h.total_len())?);
                    let batch = decode_frame(h, frame).map_err(|e| corrupt(pos, e.to_string()))?;
                    if !take(batch) {
                        return Ok(false);
                    }
                }
            }
        }
        pos += h.total_len();
        next = h.next_offset();
    }
    Ok(true)
}
