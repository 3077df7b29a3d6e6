//! A topic and its in-memory log.
//!
//! A topic is an append-only log of shared records (`Arc<Record>`) with increasing offsets.
//! Subscriptions read it through cursors; each attached cursor registers a [`Hold`], the lowest
//! offset it still needs. Records below every hold are released (unless the topic keeps consumed
//! records for replay), so memory follows the slowest cursor, bounded by `capacity`.
//!
//! Invariants:
//! - offsets are assigned under the log lock, contiguously; `tail` (SeqCst) is stored after the
//!   records are visible, and watchers are notified after that (see [`crate::signal`]);
//! - a record is never released while a hold below its offset exists, except by the topic's
//!   retention bounds, and then the cursor that skips it counts it as `dropped`;
//! - with no hold and `keep_consumed == false`, a published record is counted as dropped
//!   (no subscriber) instead of being stored.
//!
//! A durable topic also has a [`TopicStore`]: records are appended to it under the lock, in
//! offset order, before they enter the in-memory log, which then is only a bounded window of
//! recent records (`hot`). A cursor behind that window reads from the store, on the broker's
//! I/O threads and without the lock ([`Topic::read_stored`]). When the store waits for its sync
//! (fsync-always), `tail` moves only after the sync, on the commit thread, so subscribers never
//! see a record that a crash could still take away.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::config::{Overflow, Retention, TopicConfig};
use crate::io::{EngineMutex, EngineMutexGuard};
use crate::message::{Message, Record};
use crate::signal::Signal;
use crate::stats::{Counters, Padded};
use crate::storage::{StorageError, StoredMessage, TopicStore};
use crate::topic::TopicName;

/// The lowest offset a cursor still needs. Only ever increases.
#[derive(Debug)]
pub(crate) struct Hold {
    pos: AtomicU64,
}

impl Hold {
    // SeqCst: a consumer's advance and a blocked publisher's re-check pair like the wake-up
    // hand-off (see `Topic::hold_advanced`).
    pub(crate) fn get(&self) -> u64 {
        self.pos.load(Ordering::SeqCst)
    }

    pub(crate) fn set(&self, pos: u64) {
        self.pos.fetch_max(pos, Ordering::SeqCst);
    }
}

/// Why an append did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AppendError {
    Full,
    TooLarge(usize),
    Closed,
    MemoryLimit { used: usize, limit: usize },
    Storage(String),
}

/// Bytes of records stored across the broker, against its memory limit.
#[derive(Debug)]
pub(crate) struct MemoryGauge {
    pub(crate) limit: usize,
    used: AtomicUsize,
}

impl MemoryGauge {
    pub(crate) fn new(limit: usize) -> Self {
        MemoryGauge {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// Records waiting to be appended: one (the common case, no allocation) or a batch. An append
/// takes all of them or none.
pub(crate) trait Pending {
    fn count(&self) -> usize;
    fn bytes(&self) -> usize;
    fn take_all(&mut self, f: impl FnMut(Arc<Record>));
    /// Calls `f` with the messages, in order (a single record needs no allocation).
    fn with_messages<R>(&self, f: impl FnOnce(&[&Message]) -> R) -> R;
}

impl Pending for Option<Arc<Record>> {
    fn count(&self) -> usize {
        usize::from(self.is_some())
    }
    fn bytes(&self) -> usize {
        self.as_ref().map_or(0, |r| r.message.size())
    }
    fn take_all(&mut self, mut f: impl FnMut(Arc<Record>)) {
        if let Some(r) = self.take() {
            f(r);
        }
    }
    fn with_messages<R>(&self, f: impl FnOnce(&[&Message]) -> R) -> R {
        match self {
            Some(r) => f(&[&r.message]),
            None => f(&[]),
        }
    }
}

impl Pending for Vec<Arc<Record>> {
    fn count(&self) -> usize {
        self.len()
    }
    fn bytes(&self) -> usize {
        self.iter().map(|r| r.message.size()).sum()
    }
    fn take_all(&mut self, f: impl FnMut(Arc<Record>)) {
        self.drain(..).for_each(f);
    }
    fn with_messages<R>(&self, f: impl FnOnce(&[&Message]) -> R) -> R {
        let messages: Vec<&Message> = self.iter().map(|r| &r.message).collect();
        f(&messages)
    }
}

#[derive(Debug)]
pub(crate) struct Log {
    /// Offset of `records[0]`.
    base: u64,
    records: VecDeque<Arc<Record>>,
    bytes: usize,
    /// Next offset to assign.
    next: u64,
    watchers: Vec<(u64, Arc<Signal>)>,
    holds: Vec<(u64, Arc<Hold>)>,
    /// A lower bound of the lowest hold (holds only increase), refreshed lazily.
    min_hold: u64,
    appends_since_gc: usize,
    closed: bool,
    gauge: Option<Arc<MemoryGauge>>,
}

/// A topic: its name, configuration, log and counters.
#[derive(Debug)]
pub(crate) struct Topic {
    pub(crate) name: TopicName,
    pub(crate) config: TopicConfig,
    pub(crate) log: EngineMutex<Log>,
    /// Next offset to assign, readable without the lock.
    tail: AtomicU64,
    pub(crate) counters: Padded<Counters>,
    /// Publishers waiting for space.
    pub(crate) space: tokio::sync::Notify,
    pub(crate) blocked: AtomicUsize,
    /// The hold a cursor must reach before waiting publishers are worth waking (`u64::MAX`:
    /// none). Set by a publisher that found the topic full, with some slack, so that a blocked
    /// publisher wakes once per stretch of freed space rather than once per consumer batch.
    space_target: AtomicU64,
    /// Whether any record ever appended has an expiry or a delivery time. Until one does,
    /// readers skip those per-record checks (and the cache line they would touch).
    timed: AtomicBool,
    /// Whether any record ever appended has a priority other than normal; until one does,
    /// readers deliver in log order without sorting into priority lanes.
    prioritized: AtomicBool,
    /// The durable log, if the topic has one.
    durable: Option<Durable>,
    /// Whether the store waits for its sync (read once from it: asked on every publish).
    waits: bool,
    /// The tail when the topic was opened (0 unless it was reopened from its store).
    opened_at: u64,
    /// The tail the maintenance pass saw last and when it saw it change (see
    /// [`Topic::unused_for`]).
    idle: parking_lot::Mutex<(u64, Instant)>,
}

/// A durable topic's store and the bounds of its in-memory window.
#[derive(Debug, Clone)]
pub(crate) struct Durable {
    pub(crate) store: Arc<dyn TopicStore>,
    /// The most records kept in memory for fast reads.
    pub(crate) hot_records: usize,
    /// The most bytes of records kept in memory.
    pub(crate) hot_bytes: usize,
}

/// How to find the first offset of a new cursor.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Seek {
    Tail,
    Earliest,
    Offset(u64),
    /// A time looked up in the store beforehand (on an I/O thread): the offset found.
    Found(u64),
    /// A time, looked up in the memory window.
    Time(SystemTime),
}

/// Where a cursor's next records are (see [`Topic::read`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hot {
    /// Read from memory; the number of records retention released before the cursor read
    /// them (it jumped over them).
    Read(u64),
    /// Behind the memory window of a durable topic, which starts at `base`: only in the
    /// store, read on an I/O thread ([`Topic::read_stored`]).
    Behind {
        /// The first offset in memory.
        base: u64,
    },
}

/// Records read from a durable topic's store for a cursor at `from`: what it reads next,
/// until `end`. Offsets between `from` and `end` that no record has were released by
/// retention or are damaged: the cursor skips them (counted as dropped).
#[derive(Debug)]
pub(crate) struct StoreRead {
    /// Where the cursor was when the read was asked for.
    pub(crate) from: u64,
    /// The records, in offset order (decoded, not yet records of the topic; see
    /// [`Topic::revive`]).
    pub(crate) records: VecDeque<StoredMessage>,
    /// Where the cursor goes on once it has taken every record.
    pub(crate) end: u64,
}

const GC_EVERY: usize = 1024;

impl Topic {
    pub(crate) fn new(
        name: TopicName,
        config: TopicConfig,
        gauge: Option<Arc<MemoryGauge>>,
        durable: Option<Durable>,
    ) -> Self {
        // A durable topic continues where its store ends; its memory window starts empty.
        let next = durable.as_ref().map_or(0, |d| d.store.end());
        // Records read back from the store may be timed or prioritized: readers must check.
        let stored = durable.as_ref().is_some_and(|d| d.store.start() < next);
        let waits = durable.as_ref().is_some_and(|d| d.store.waits_for_sync());
        Topic {
            name,
            config,
            log: EngineMutex::new(Log {
                base: next,
                records: VecDeque::new(),
                bytes: 0,
                next,
                watchers: Vec::new(),
                holds: Vec::new(),
                min_hold: 0,
                appends_since_gc: 0,
                closed: false,
                gauge,
            }),
            tail: AtomicU64::new(next),
            counters: Padded::default(),
            space: tokio::sync::Notify::new(),
            blocked: AtomicUsize::new(0),
            space_target: AtomicU64::new(u64::MAX),
            timed: AtomicBool::new(stored),
            prioritized: AtomicBool::new(stored),
            durable,
            waits,
            opened_at: next,
            idle: parking_lot::Mutex::new((next, Instant::now())),
        }
    }

    /// How long nothing was published to the topic, as seen by the maintenance passes that
    /// call this (each call notes the tail, at `now`, if it moved since the last).
    pub(crate) fn unused_for(&self, now: Instant) -> Duration {
        let tail = self.tail();
        let mut idle = self.idle.lock();
        if idle.0 != tail {
            *idle = (tail, now);
        }
        now.saturating_duration_since(idle.1)
    }

    /// Whether unloading the topic loses nothing: a durable topic's records are in its store;
    /// an in-memory topic must hold none (and no cursor or waiting publisher may use it: the
    /// caller checks that nothing else holds the topic).
    pub(crate) fn can_unload(&self) -> bool {
        if self.durable.is_some() {
            return true;
        }
        let log = self.log.lock();
        log.records.is_empty() && log.holds.is_empty() && log.watchers.is_empty()
    }

    /// The durable store, if the topic has one.
    /// Whether the topic has a store.
    pub(crate) fn is_durable(&self) -> bool {
        self.durable.is_some()
    }

    pub(crate) fn store(&self) -> Option<&Arc<dyn TopicStore>> {
        self.durable.as_ref().map(|d| &d.store)
    }

    /// The topic's counters; `published` counts the offsets assigned since the topic was
    /// opened (a durable topic's earlier runs are not counted again).
    pub(crate) fn counters(&self) -> crate::stats::CounterSnapshot {
        let mut c = self.counters.snapshot();
        c.published = self.tail() - self.opened_at;
        c
    }

    /// Wraps `message` for this topic (outside the log lock): stamps the producer id and works
    /// out the expiry.
    pub(crate) fn wrap(&self, message: Message, producer: &Option<Arc<str>>) -> Arc<Record> {
        self.wrap_as(&self.name, message, producer)
    }

    /// [`wrap`](Self::wrap) with the record carrying `name` (this topic's name, in the caller's
    /// own allocation: a publisher keeps a private copy so that publishers on several threads
    /// do not all count references on one shared string).
    pub(crate) fn wrap_as(
        &self,
        name: &TopicName,
        mut message: Message,
        producer: &Option<Arc<str>>,
    ) -> Arc<Record> {
        debug_assert_eq!(name, &self.name);
        message.set_producer_if_missing(producer);
        let expires = expiry(&message, self.config.default_ttl);
        let not_before = message.deliver_at().map(on_broker_clock);
        if expires.is_some() || not_before.is_some() {
            self.timed.store(true, Ordering::Relaxed);
        }
        if message.priority() != crate::message::Priority::Normal {
            self.prioritized.store(true, Ordering::Relaxed);
        }
        Record::pending(name.clone(), message, expires, not_before)
    }

    /// Whether records of this topic may carry priorities (see `timed` for the ordering).
    pub(crate) fn prioritized(&self) -> bool {
        self.prioritized.load(Ordering::Relaxed)
    }

    /// Whether records of this topic may expire or be delayed (read under or after the log
    /// lock, which orders it after the appends that set it).
    pub(crate) fn timed(&self) -> bool {
        self.timed.load(Ordering::Relaxed)
    }

    /// Next offset to be assigned (SeqCst: pairs with [`Signal`]).
    pub(crate) fn tail(&self) -> u64 {
        self.tail.load(Ordering::SeqCst)
    }

    /// Appends `pending` (records made by [`Record::pending`], so not shared yet) atomically:
    /// all of them, with contiguous offsets, or none; on failure `pending` is left as it was.
    /// The records are allocated by the caller, outside the lock.
    /// On a store that waits for its sync, the records are not visible yet: call
    /// [`sync_and_reveal`](Self::sync_and_reveal) (or let the broker do it).
    pub(crate) fn append(&self, pending: &mut impl Pending) -> Result<Range<u64>, AppendError> {
        let mut log = self.log.lock();
        let store = self.check(&mut log, pending)?;
        self.commit(&mut log, pending, store)
    }

    /// Whether appended records become visible only after a sync of the store.
    pub(crate) fn waits_for_sync(&self) -> bool {
        self.waits
    }

    /// Waits (blocking) until the store has made everything below `end` durable, then makes it
    /// visible to subscribers. A no-op for topics without a store that waits.
    pub(crate) fn sync_and_reveal(&self, end: u64) -> Result<(), AppendError> {
        match self.store() {
            Some(store) if store.waits_for_sync() => {
                store.sync(end).map_err(|e| self.storage_failed(e))?;
                self.reveal(end);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Appends and makes the records visible at once, even on a store that waits for its sync:
    /// for dead letters, which are appended on a consumer's settle path (no fsync there). They
    /// become durable with the next sync; positions are saved only after one, so a crash cannot
    /// lose a dead letter whose source was settled on disk.
    pub(crate) fn append_visible(
        &self,
        pending: &mut impl Pending,
    ) -> Result<Range<u64>, AppendError> {
        let range = self.append(pending)?;
        self.reveal(range.end);
        Ok(range)
    }

    /// Moves the visible tail up to `end` and wakes the consumers watching the topic.
    fn reveal(&self, end: u64) {
        if self.tail.fetch_max(end, Ordering::SeqCst) < end {
            self.log.lock().wake_watchers();
        }
    }

    fn storage_failed(&self, e: StorageError) -> AppendError {
        tracing::error!(topic = %self.name, error = %e, "topic storage failed");
        AppendError::Storage(e.to_string())
    }

    /// Locks the log (for appends to several topics at once: lock them in name order).
    pub(crate) fn lock(&self) -> EngineMutexGuard<'_, Log> {
        self.log.lock()
    }

    /// Checks that `pending` can be appended now (making room under `DropOldest`); returns
    /// whether the records will be stored (`false`: nobody listens, they are counted as dropped).
    pub(crate) fn check(&self, log: &mut Log, pending: &impl Pending) -> Result<bool, AppendError> {
        let n = pending.count();
        if n > self.config.capacity {
            return Err(AppendError::TooLarge(n));
        }
        let weigh = self.config.max_bytes.is_some() || log.gauge.is_some();
        let add_bytes = if weigh { pending.bytes() } else { 0 };
        if add_bytes > self.config.max_bytes.unwrap_or(usize::MAX) {
            // It could never fit: refuse rather than wait (or evict) forever.
            return Err(AppendError::TooLarge(n));
        }
        if log.closed {
            return Err(AppendError::Closed);
        }
        let store = !log.holds.is_empty() || self.config.keep_consumed || self.durable.is_some();
        if store {
            self.make_room(log, n, add_bytes)?;
            if let Some(limit) = log.gauge.as_ref().map(|g| g.limit) {
                let used = |log: &Log| log.gauge.as_ref().map_or(0, |g| g.used());
                if self.durable.is_some() {
                    // A durable topic's window only caches what the store holds: over the
                    // broker's memory limit it gives up its oldest records (cursors behind it
                    // read the store) rather than refuse the publish.
                    while used(log) + add_bytes > limit && !log.records.is_empty() {
                        log.pop_front();
                    }
                    if log.records.is_empty() {
                        log.base = log.next;
                    }
                } else if used(log) + add_bytes > limit {
                    return Err(AppendError::MemoryLimit {
                        used: used(log),
                        limit,
                    });
                }
            }
        }
        Ok(store)
    }

    /// Appends what [`check`](Self::check) accepted, publishes the new tail and wakes waiting
    /// consumers.
    pub(crate) fn commit(
        &self,
        log: &mut Log,
        pending: &mut impl Pending,
        store: bool,
    ) -> Result<Range<u64>, AppendError> {
        self.commit_part(log, pending, store, None)
    }

    /// [`commit`](Self::commit), the store's write being a transaction part whose id goes to
    /// `parts` when given.
    pub(crate) fn commit_part(
        &self,
        log: &mut Log,
        pending: &mut impl Pending,
        store: bool,
        parts: Option<&mut Vec<u64>>,
    ) -> Result<Range<u64>, AppendError> {
        let n = pending.count();
        let capacity = self.config.capacity;
        let start = log.next;
        if let Some(d) = &self.durable {
            pending
                .with_messages(|messages| match parts {
                    Some(parts) => {
                        parts.push(d.store.append_part(start, messages)?);
                        Ok(())
                    }
                    None => d.store.append(start, messages),
                })
                .map_err(|e| self.storage_failed(e))?;
        }
        if store {
            pending.take_all(|record| {
                let offset = log.next;
                log.next += 1;
                record.set_offset(offset);
                log.push_back(record);
            });
        } else {
            pending.take_all(drop);
            log.next += n as u64;
            if log.records.is_empty() {
                log.base = log.next;
            }
            self.counters.add_dropped(n as u64);
        }
        let end = log.next;
        log.appends_since_gc += n;
        // Release consumed records every so often: at most a quarter of the capacity (and at
        // most GC_EVERY appends) linger after every cursor has passed them.
        let gc_every = GC_EVERY.min(capacity / 4).max(1);
        if log.appends_since_gc >= gc_every || self.config.keep_consumed {
            log.appends_since_gc = 0;
            log.refresh_min_hold();
            self.release(log);
        }
        if self.waits_for_sync() {
            // Visible once durable (`sync_and_reveal`).
            return Ok(start..end);
        }
        self.tail.store(end, Ordering::SeqCst);
        log.wake_watchers();
        Ok(start..end)
    }

    /// Applies the overflow policy so that `n` more records of `bytes` fit, or says `Full`.
    fn make_room(&self, log: &mut Log, n: usize, bytes: usize) -> Result<(), AppendError> {
        let capacity = self.config.capacity;
        let max_bytes = self.config.max_bytes.unwrap_or(usize::MAX);
        if self.fits(log, n, bytes) {
            return Ok(());
        }
        log.refresh_min_hold();
        self.release(log);
        if self.fits(log, n, bytes) {
            return Ok(());
        }
        if self.config.overflow == Overflow::DropOldest {
            // Release the oldest records, read or not; lagging cursors skip them (and count them
            // as dropped) on their next read.
            while (log.records.len() + n > capacity || log.bytes.saturating_add(bytes) > max_bytes)
                && !log.records.is_empty()
            {
                log.pop_front();
            }
            log.min_hold = log.min_hold.max(log.base);
            return Ok(());
        }
        // Wake waiting publishers once the slowest cursor passes the offset that frees what this
        // append needs, plus a sixteenth of the capacity.
        let slack = (capacity / 16) as u64;
        let mut target = (log.next + n as u64 + slack).saturating_sub(capacity as u64);
        if log.bytes.saturating_add(bytes) > max_bytes {
            let mut excess = log.bytes.saturating_add(bytes) - max_bytes;
            let mut offset = log.base;
            for r in &log.records {
                if excess == 0 {
                    break;
                }
                excess = excess.saturating_sub(r.message.size());
                offset += 1;
            }
            target = target.max(offset + slack);
        }
        self.space_target
            .fetch_min(target.min(log.next), Ordering::SeqCst);
        Err(AppendError::Full)
    }

    /// Whether `n` more records of `bytes` fit within the capacity and the byte bound.
    fn fits(&self, log: &Log, n: usize, bytes: usize) -> bool {
        let unconsumed = if log.holds.is_empty() {
            0
        } else {
            (log.next - log.min_hold) as usize
        };
        unconsumed + n <= self.config.capacity
            && log.bytes.saturating_add(bytes) <= self.config.max_bytes.unwrap_or(usize::MAX)
    }

    /// Releases what no hold needs (or what retention evicts). Called with the lock held.
    fn release(&self, log: &mut Log) {
        if let Some(d) = &self.durable {
            // The store keeps what retention keeps; memory keeps what cursors still need, within
            // the hot window. Cursors behind the window read from the store.
            let keep_from = log.min_hold.max(log.base);
            log.pop_front_while(|log| {
                log.base < keep_from || log.records.len() > d.hot_records || log.bytes > d.hot_bytes
            });
            if log.records.is_empty() {
                log.base = log.next;
            }
            return;
        }
        let keep_from = if self.config.keep_consumed {
            log.base
        } else {
            log.min_hold.max(log.base)
        };
        while log.base < keep_from && !log.records.is_empty() {
            log.pop_front();
        }
        if log.records.is_empty() {
            // Offsets that were never stored (published while nobody listened) or all released.
            log.base = log.next;
        }
        let mut r = self.config.retention.clone();
        if self.config.keep_consumed && r.max_messages.is_none() {
            // Kept records are bounded by the capacity when no count bound is set.
            r.max_messages = Some(self.config.capacity);
        }
        log.evict_by(&r, SystemTime::now());
    }

    /// Releases what no hold needs and applies age retention (maintenance).
    pub(crate) fn collect(&self) {
        let mut log = self.log.lock();
        log.refresh_min_hold();
        self.release(&mut log);
        drop(log);
        if let Some(store) = self.store() {
            if let Err(e) = store.apply_retention() {
                tracing::warn!(topic = %self.name, error = %e, "retention of the topic log failed");
            }
        }
        self.wake_publishers();
    }

    /// Wakes every waiting publisher.
    pub(crate) fn wake_publishers(&self) {
        if self.blocked.load(Ordering::SeqCst) > 0 {
            self.space_target.store(u64::MAX, Ordering::SeqCst);
            self.space.notify_waiters();
        }
    }

    /// A cursor's hold moved up to `low`: wake waiting publishers if that may free what they
    /// wait for. Pairs with [`Topic::has_space`]: each side writes, fences, then reads the
    /// other's variable, so a publisher never sleeps through the advance that frees it.
    pub(crate) fn hold_advanced(&self, low: u64) {
        crate::signal::fence();
        if self.blocked.load(Ordering::SeqCst) > 0
            && low >= self.space_target.load(Ordering::SeqCst)
        {
            self.wake_publishers();
        }
    }

    /// Whether `n` records fit now (a blocked publisher's re-check after setting its target).
    pub(crate) fn has_space(&self, n: usize, bytes: usize) -> bool {
        crate::signal::fence();
        let mut log = self.log.lock();
        log.refresh_min_hold();
        self.release(&mut log);
        self.fits(&log, n, bytes)
    }

    /// Attaches a cursor: registers its hold and its consumer's signal, and resolves where it
    /// starts. Returns the hold and the first offset.
    pub(crate) fn attach(
        &self,
        consumer: u64,
        signal: &Arc<Signal>,
        seek: Seek,
    ) -> (Arc<Hold>, u64) {
        let mut log = self.log.lock();
        let tail = self.tail();
        let first = self.store().map_or(log.base, |s| s.start());
        let pos = match seek {
            Seek::Tail => tail,
            Seek::Earliest => first,
            Seek::Offset(o) => o.clamp(first, tail),
            // The store's time index is looked up beforehand, on an I/O thread; a time seek
            // here looks in memory only.
            Seek::Found(o) => o.max(first),
            Seek::Time(t) => {
                let i = log.records.partition_point(|r| r.message.timestamp() < t);
                log.base + i as u64
            }
        };
        let hold = Arc::new(Hold {
            pos: AtomicU64::new(pos),
        });
        if log.holds.is_empty() || pos < log.min_hold {
            log.min_hold = pos;
        }
        log.holds.push((consumer, hold.clone()));
        log.watchers.push((consumer, signal.clone()));
        (hold, pos)
    }

    /// Detaches every cursor of `consumer`.
    pub(crate) fn detach(&self, consumer: u64) {
        let mut log = self.log.lock();
        log.holds.retain(|(c, _)| *c != consumer);
        log.watchers.retain(|(c, _)| *c != consumer);
        log.refresh_min_hold();
        self.release(&mut log);
        drop(log);
        self.wake_publishers();
    }

    /// Reads up to `max` records from `*next` into `out`, advancing `*next`, from memory. If
    /// retention released records the cursor had not read, it jumps over them and returns how
    /// many. A cursor behind the memory window of a durable topic gets [`Hot::Behind`]: its
    /// records are only in the store, read on an I/O thread ([`read_stored`](Self::read_stored)).
    pub(crate) fn read(
        &self,
        next: &mut u64,
        max: usize,
        out: &mut impl FnMut(Arc<Record>),
    ) -> Hot {
        let log = self.log.lock();
        if *next < log.base && self.durable.is_some() {
            return Hot::Behind { base: log.base };
        }
        let skipped = skip_to(next, log.base);
        let visible = self.tail().saturating_sub(*next) as usize;
        let start = (*next - log.base) as usize;
        let n = max
            .min(visible)
            .min(log.records.len().saturating_sub(start));
        for r in log.records.range(start..start + n) {
            out(r.clone());
        }
        *next += n as u64;
        Hot::Read(skipped)
    }

    /// Reads up to `max` records from offset `from` from the store (blocking: on an I/O
    /// thread, with no lock held). Records that retention deleted, or that are damaged, are
    /// left out: the result's records start later or it ends further on. A failed read
    /// returns no records and no progress (the cursor tries again on a later fetch).
    pub(crate) fn read_stored(&self, from: u64, max: usize) -> Result<StoreRead, StorageError> {
        let mut read = StoreRead {
            from,
            records: VecDeque::new(),
            end: from,
        };
        let Some(store) = self.store() else {
            return Ok(read);
        };
        let mut next = from;
        skip_to(&mut next, store.start());
        read.end = next;
        // Only what is visible: records past the tail may still wait for their sync.
        let max = max.min(self.tail().saturating_sub(next) as usize);
        if max == 0 {
            return Ok(read);
        }
        match store.read(next, max) {
            Ok(stored) => {
                for s in stored {
                    if s.offset != next {
                        tracing::error!(topic = %self.name, expected = next, found = s.offset, "store returned records out of order");
                        break;
                    }
                    next += 1;
                    read.records.push_back(s);
                }
                read.end = next;
                Ok(read)
            }
            Err(StorageError::Damaged {
                from, to, reason, ..
            }) if from == next => {
                // Quarantined: the cursor skips the damaged range, which counts as dropped;
                // every reader reports it (once per reader and range).
                tracing::error!(topic = %self.name, from, to, reason, "damaged records skipped");
                read.end = to;
                Ok(read)
            }
            Err(e) => {
                tracing::error!(topic = %self.name, offset = next, error = %e, "reading the topic log failed");
                Err(e)
            }
        }
    }

    /// The record of this topic for a message read back from its store.
    pub(crate) fn revive(&self, stored: StoredMessage) -> Arc<Record> {
        let record = self.wrap(stored.message, &None);
        record.set_offset(stored.offset);
        record
    }

    /// Records between `next` and the tail (what a cursor at `next` still has to read).
    pub(crate) fn lag_from(&self, next: u64) -> u64 {
        self.tail().saturating_sub(next)
    }

    /// Stored records and their bytes, after releasing what no cursor needs.
    pub(crate) fn depth(&self) -> (usize, usize) {
        if let Some(store) = self.store() {
            let records = self.tail().saturating_sub(store.start());
            return (records as usize, store.size_bytes() as usize);
        }
        let mut log = self.log.lock();
        log.refresh_min_hold();
        self.release(&mut log);
        (log.records.len(), log.bytes)
    }

    /// Bytes of records held in memory.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.log.lock().bytes
    }

    /// The first retained offset and the next offset.
    pub(crate) fn bounds(&self) -> (u64, u64) {
        match self.store() {
            Some(store) => (store.start(), self.tail()),
            None => {
                let log = self.log.lock();
                (log.base, log.next)
            }
        }
    }

    /// A copy of the retained records from `from`, at most `max`, if they are in memory
    /// (`Err` with what to read from the store otherwise).
    pub(crate) fn snapshot(&self, from: u64, max: usize) -> Result<Vec<Arc<Record>>, (u64, usize)> {
        let mut next = from;
        let mut out = Vec::new();
        match self.read(&mut next, max, &mut |r| out.push(r)) {
            Hot::Read(_) => Ok(out),
            Hot::Behind { .. } => Err((from, max)),
        }
    }

    /// Releases every record below `until` regardless of holds (purging a dead-letter topic).
    /// Returns how many were released. A durable topic's store is trimmed first, without the
    /// lock (blocking: on an I/O thread).
    pub(crate) fn truncate_before(&self, until: u64) -> u64 {
        let from_store = match self.store() {
            Some(store) => {
                let before = store.start();
                if let Err(e) = store.truncate_before(until) {
                    tracing::error!(topic = %self.name, error = %e, "truncating the topic log failed");
                    return 0;
                }
                Some((store, before))
            }
            None => None,
        };
        let mut log = self.log.lock();
        let mut n = 0;
        while log.base < until && !log.records.is_empty() {
            log.pop_front();
            n += 1;
        }
        // A durable topic counts what left the store (its memory window holds only part of it).
        from_store.map_or(n, |(store, before)| store.start().saturating_sub(before))
    }

    /// Stops appends (shutdown) and wakes everything waiting on the topic.
    pub(crate) fn close(&self) {
        let mut log = self.log.lock();
        log.closed = true;
        for (_, w) in &log.watchers {
            w.notify_all();
        }
        drop(log);
        self.space.notify_waiters();
    }

    pub(crate) fn subscriber_count(&self) -> usize {
        self.log.lock().holds.len()
    }
}

impl Drop for Log {
    /// An unloaded topic's window no longer counts against the broker's memory limit.
    fn drop(&mut self) {
        if let Some(g) = &self.gauge {
            g.used.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

/// Moves a read position up to the first retained offset; returns how many it skipped.
fn skip_to(next: &mut u64, first: u64) -> u64 {
    let skipped = first.saturating_sub(*next);
    *next = (*next).max(first);
    skipped
}

/// When a message expires on the broker's clock (tokio's, so that tests can run on virtual
/// time): its own expiry converted from wall-clock time, or the topic's default time to live.
fn expiry(message: &Message, default_ttl: Option<Duration>) -> Option<tokio::time::Instant> {
    match message.expires_at() {
        Some(at) => Some(on_broker_clock(at)),
        None => default_ttl.map(|ttl| tokio::time::Instant::now() + ttl),
    }
}

/// A wall-clock time on the broker's clock (now, if it is in the past).
fn on_broker_clock(at: SystemTime) -> tokio::time::Instant {
    let left = at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    tokio::time::Instant::now() + left
}

impl Log {
    /// Wakes each consumer watching the topic (after the tail moved).
    fn wake_watchers(&self) {
        if !self.watchers.is_empty() {
            crate::signal::fence();
            for (_, w) in &self.watchers {
                w.notify_one();
            }
        }
    }

    fn push_back(&mut self, record: Arc<Record>) {
        let size = record.message.size();
        self.bytes += size;
        if let Some(g) = &self.gauge {
            g.used.fetch_add(size, Ordering::Relaxed);
        }
        self.records.push_back(record);
    }

    fn pop_front(&mut self) {
        if let Some(r) = self.records.pop_front() {
            let size = r.message.size();
            self.bytes = self.bytes.saturating_sub(size);
            if let Some(g) = &self.gauge {
                g.used.fetch_sub(size, Ordering::Relaxed);
            }
            self.base += 1;
        }
    }

    /// [`pop_front`](Self::pop_front) while `more` holds (and records remain), settling the
    /// memory gauge once at the end rather than per record.
    fn pop_front_while(&mut self, mut more: impl FnMut(&Log) -> bool) {
        let mut freed = 0;
        while more(self) {
            let Some(r) = self.records.pop_front() else {
                break;
            };
            let size = r.message.size();
            self.bytes = self.bytes.saturating_sub(size);
            freed += size;
            self.base += 1;
        }
        if freed > 0 {
            if let Some(g) = &self.gauge {
                g.used.fetch_sub(freed, Ordering::Relaxed);
            }
        }
    }

    fn refresh_min_hold(&mut self) {
        self.min_hold = self
            .holds
            .iter()
            .map(|(_, h)| h.get())
            .min()
            .unwrap_or(self.next);
    }

    fn evict_by(&mut self, r: &Retention, now: SystemTime) {
        if let Some(max) = r.max_messages {
            while self.records.len() > max {
                self.pop_front();
            }
        }
        if let Some(max) = r.max_bytes {
            while self.bytes > max && !self.records.is_empty() {
                self.pop_front();
            }
        }
        if let Some(age) = r.max_age {
            if let Some(cutoff) = now.checked_sub(age) {
                while self
                    .records
                    .front()
                    .is_some_and(|f| f.message.timestamp() < cutoff)
                {
                    self.pop_front();
                }
            }
        }
    }
}
