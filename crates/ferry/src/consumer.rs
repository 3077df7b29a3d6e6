//! Consumers: the state behind a fanout subscription or a consumer group.
//!
//! A consumer owns one cursor per topic its filter matches, and, in manual-ack mode, the in-flight
//! table that drives acknowledgement, redelivery and dead-lettering. A fanout subscription is a
//! consumer with one member; a consumer group is a consumer shared by all its members, so each
//! record goes to exactly one member and the group keeps its position while members come and go.
//!
//! Invariants:
//! - a cursor's hold is `min(lowest unsettled offset, next)`, so the topic keeps every record
//!   that is unread or unacknowledged (unless retention bounds evict it, counted as dropped);
//! - every delivery tag is in exactly one phase: delivered to a member (with a deadline),
//!   delayed (nack with delay), or ready for redelivery;
//! - no timer task per message: ack deadlines and nack delays sit in one heap, processed when a
//!   member fetches; a waiting member sleeps until the earliest deadline;
//! - lock order: broker registry -> consumer state -> topic log. Dead letters are published only
//!   after the consumer state lock is released;
//! - a cursor behind a durable topic's memory window never reads the store itself: it asks the
//!   broker's I/O threads for the next batch and takes it on a later fetch, under the state
//!   lock, only if the cursor is still where the read began (so `try_recv` never waits for the
//!   disk, and no lock is held while the disk is read).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::broker::BrokerInner;
use crate::dlq::DeadLetterReason;
use crate::error::{AckError, RecvError};
use crate::filter::TopicFilter;
use crate::headers_filter::{all_match, HeaderMatch};
use crate::io::{Completer, EngineMutex, Slot};
use crate::log::{Hold, Hot, Seek, StoreRead, Topic};
use crate::message::Record;
use crate::signal::Signal;
use crate::stats::{Counters, SubscriptionStats};
use crate::subscription::Delivery;
use crate::timers::TimerQueue;
use crate::topic::TopicName;

/// How deliveries are acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// At-most-once: a record counts as acknowledged when it is handed to the subscription.
    Auto,
    /// At-least-once: each delivery must be acked; nacked or timed-out deliveries are
    /// redelivered until `max_attempts`, then dead-lettered.
    Manual,
}

/// Acknowledgement settings of a consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AckPolicy {
    pub(crate) mode: AckMode,
    pub(crate) ack_timeout: Duration,
    pub(crate) max_attempts: u32,
    pub(crate) prefetch: usize,
}

const OPEN: u8 = 0;
const CLOSED: u8 = 1;
const EVICTED: u8 = 2;

struct Cursor {
    topic: Arc<Topic>,
    /// The topic's name, in an allocation of this consumer's own (see
    /// [`TopicName::private_copy`]).
    name: TopicName,
    start: u64,
    next: u64,
    hold: Arc<Hold>,
    /// Offsets delivered but not yet settled (manual mode).
    unsettled: BTreeSet<u64>,
    /// Reads behind a durable topic's memory window (made on first use).
    stored: Option<Box<StoreReads>>,
}

/// How many records an I/O thread reads from the store at a time for a cursor behind its
/// topic's memory window.
const STORE_READ: usize = 1024;

/// A cursor's reads behind its topic's memory window: the I/O threads read the store, the
/// cursor takes what they read under the consumer's lock afterwards (no lock is held while
/// they read). At most one read is on its way; it continues where the records ready end, so
/// a cursor reading through the store sequentially finds the next batch read ahead.
#[derive(Default)]
struct StoreReads {
    /// Records read for the cursor, valid while the cursor is where they start.
    ready: Option<StoreRead>,
    /// The read on its way (`None` inside: it failed, and is asked for again on a later fetch).
    pending: Option<Arc<Slot<Option<StoreRead>>>>,
}

impl Cursor {
    /// Offset `offset` is settled (acked, dead-lettered, expired, or handed over for good):
    /// it no longer holds the topic.
    fn settle(&mut self, offset: u64) {
        self.unsettled.remove(&offset);
        self.update_hold();
    }

    /// For a cursor behind its topic's memory window (which starts at `base`): takes up to
    /// `max` records from what the I/O threads read for it, and asks for the next read (whose
    /// end wakes `signal`). Returns how many offsets it skipped (released by retention, or
    /// damaged), or `None` if nothing was ready: a read is on its way.
    fn read_behind(
        &mut self,
        max: usize,
        base: u64,
        signal: &Arc<Signal>,
        broker: &Weak<BrokerInner>,
        out: &mut impl FnMut(Arc<Record>),
    ) -> Option<u64> {
        let reads = self.stored.get_or_insert_with(Box::default);
        let mut progress = None;
        // The records ready, then those of the read that continues them.
        for _ in 0..2 {
            if reads.ready.is_none() {
                if !reads.pending.as_ref().is_some_and(|p| p.is_done()) {
                    break;
                }
                reads.ready = reads.pending.take().and_then(|p| p.try_take()).flatten();
            }
            let Some(r) = reads.ready.as_mut() else {
                continue;
            };
            if r.from != self.next {
                // Read for a position the cursor has left.
                reads.ready = None;
                continue;
            }
            let mut skipped = 0;
            let mut taken = 0;
            while taken < max {
                let Some(s) = r.records.pop_front() else {
                    break;
                };
                skipped += s.offset - self.next;
                self.next = s.offset + 1;
                out(self.topic.revive(s));
                taken += 1;
            }
            if r.records.is_empty() {
                skipped += r.end.saturating_sub(self.next);
                self.next = self.next.max(r.end);
                reads.ready = None;
            } else {
                r.from = self.next;
            }
            if taken > 0 || skipped > 0 {
                progress = Some(skipped);
                break;
            }
        }
        // Read on (ahead of the consumer, while it handles what it just took).
        let resume = reads.ready.as_ref().map_or(self.next, |r| r.end);
        if reads.pending.is_none() && resume < base && resume < self.topic.tail() {
            if let Some(b) = broker.upgrade() {
                if let Some(io) = b.io() {
                    let slot = Arc::new(Slot::default());
                    let done = Completer::new(slot.clone());
                    let topic = self.topic.clone();
                    let signal = signal.clone();
                    io.spawn(move || {
                        let read = topic.read_stored(resume, STORE_READ).ok();
                        // A read that found nothing (or failed) wakes nobody: the cursor asks
                        // again when it is woken for another reason, not in a loop.
                        let found = read
                            .as_ref()
                            .is_some_and(|r| !r.records.is_empty() || r.end > r.from);
                        done.complete(read);
                        if found {
                            signal.notify_one();
                        }
                    });
                    reads.pending = Some(slot);
                }
            }
        }
        progress
    }

    fn update_hold(&self) {
        let low = self
            .unsettled
            .first()
            .copied()
            .unwrap_or(self.next)
            .min(self.next);
        self.hold.set(low);
        self.topic.hold_advanced(low);
    }
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Delivered { member: u64, deadline: Instant },
    Delayed { due: Instant },
    Ready,
}

impl Phase {
    /// When this phase's timer falls due (an ack deadline or a delivery time); a timer of the
    /// delivery due at any other time is stale.
    fn timer(&self) -> Option<Instant> {
        match *self {
            Phase::Delivered { deadline, .. } => Some(deadline),
            Phase::Delayed { due } => Some(due),
            Phase::Ready => None,
        }
    }
}

struct Inflight {
    record: Arc<Record>,
    cursor: usize,
    /// The attempt number of the last delivery.
    attempt: u32,
    /// Returned by a leaving member: the next delivery keeps the same attempt number.
    returned: bool,
    /// Waiting for its delivery time (never delivered yet).
    scheduled: bool,
    phase: Phase,
}

/// A record read from a prioritized topic, waiting in its priority lane.
struct Laned {
    record: Arc<Record>,
    cursor: usize,
    since: Instant,
}

/// How many records a consumer reads ahead of delivery on prioritized topics, so that it can
/// deliver the highest-priority waiting record first.
const LOOKAHEAD: usize = 4096;

#[derive(Default)]
struct State {
    /// Priority lanes (index = level): records read but not yet delivered.
    lanes: [VecDeque<Laned>; 5],
    cursors: Vec<Cursor>,
    /// The topics of `cursors` (by address: each cursor holds its topic), so that attaching
    /// a subscription to many topics does not search the cursors for each.
    attached: HashSet<usize>,
    rr: usize,
    inflight: HashMap<u64, Inflight>,
    timers: TimerQueue,
    ready: VecDeque<u64>,
    next_tag: u64,
    member_inflight: HashMap<u64, usize>,
}

/// Timers beyond twice the unsettled deliveries (plus this many) are compacted away.
const STALE_TIMER_SLACK: usize = 4096;

impl State {
    /// Adds a timer (an ack deadline or a delivery time) for delivery `tag`.
    ///
    /// A settled delivery's timer is not removed when it is settled but dropped when it falls
    /// due; at a high rate and a long ack timeout (a million acks a second, 30 s) those stale
    /// timers would pile up by the ten million. So once the queue holds more than twice the
    /// unsettled deliveries (plus a slack), it drops every stale timer: each compaction follows
    /// at least as many pushes as timers it keeps, so the cost stays constant per push, and the
    /// queue stays within a small multiple of what is unsettled.
    fn push_timer(&mut self, due: Instant, tag: u64) {
        self.timers.push(due, tag);
        if self.timers.len() > 2 * self.inflight.len() + STALE_TIMER_SLACK {
            let inflight = &self.inflight;
            self.timers.retain(|t, tag| {
                inflight
                    .get(&tag)
                    .is_some_and(|e| e.phase.timer() == Some(t))
            });
        }
    }
}

/// A record to be dead-lettered once the state lock is released.
pub(crate) struct DeadJob {
    pub(crate) topic: TopicName,
    pub(crate) record: Arc<Record>,
    pub(crate) reason: DeadLetterReason,
    pub(crate) attempts: u32,
}

/// How a delivery was settled.
#[derive(Debug)]
pub(crate) enum Settle {
    Ack,
    Nack(Option<Duration>),
    Reject(String),
    /// Given back by a member that left without processing it.
    Returned,
    /// It expired in the member's buffer before the subscriber received it.
    Expired,
}

/// The result of a fetch.
pub(crate) struct Fetch {
    pub(crate) got: usize,
    /// When the next ack deadline or nack delay falls due.
    pub(crate) next_wake: Option<Instant>,
    pub(crate) closed: Option<RecvError>,
    /// The member holds `prefetch` unsettled deliveries: it must wait for its own settlements.
    pub(crate) throttled: bool,
    /// Some delivered record has an expiry (or a redelivery may): the member must check
    /// expiry again when it hands a buffered delivery over.
    pub(crate) expiring: bool,
}

/// Identity and options of a consumer, fixed at creation.
pub(crate) struct ConsumerSpec {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) filter: TopicFilter,
    pub(crate) group: bool,
    pub(crate) policy: AckPolicy,
    pub(crate) headers: Vec<HeaderMatch>,
    /// The key its positions are saved under (durable brokers; groups and named subscriptions).
    pub(crate) durable_key: Option<String>,
}

pub(crate) struct Consumer {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) filter: TopicFilter,
    pub(crate) group: bool,
    pub(crate) policy: AckPolicy,
    /// Header conditions every delivered record satisfies.
    pub(crate) headers: Vec<HeaderMatch>,
    /// The key its positions are saved under, if they are.
    pub(crate) durable_key: Option<String>,
    state: EngineMutex<State>,
    /// Members waiting for records (topics notify it on append).
    pub(crate) signal: Arc<Signal>,
    /// Members waiting because they hold `prefetch` unsettled deliveries (settling wakes them).
    /// Kept apart so that a throttled member never swallows a wake-up meant for one that can
    /// take the record.
    pub(crate) acks: Signal,
    pub(crate) counters: Counters,
    pub(crate) members: AtomicUsize,
    /// Milliseconds since the broker's epoch of the last read.
    last_active: AtomicU64,
    status: AtomicU8,
    broker: Weak<BrokerInner>,
    epoch: Instant,
}

impl Consumer {
    pub(crate) fn new(spec: ConsumerSpec, broker: Weak<BrokerInner>, epoch: Instant) -> Self {
        let c = Consumer {
            id: spec.id,
            name: spec.name,
            filter: spec.filter,
            group: spec.group,
            policy: spec.policy,
            headers: spec.headers,
            durable_key: spec.durable_key,
            state: EngineMutex::new(State::default()),
            signal: Arc::new(Signal::new()),
            acks: Signal::new(),
            counters: Counters::default(),
            members: AtomicUsize::new(0),
            last_active: AtomicU64::new(0),
            status: AtomicU8::new(OPEN),
            broker,
            epoch,
        };
        c.touch();
        c
    }

    fn manual(&self) -> bool {
        self.policy.mode == AckMode::Manual
    }

    fn touch(&self) {
        self.touch_at(Instant::now());
    }

    /// Records a read at `now` (a fetch passes the time it already read, saving a clock read).
    fn touch_at(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        self.last_active.store(ms, Ordering::Relaxed);
    }

    /// Time since the last read.
    pub(crate) fn idle(&self) -> Duration {
        let now = Instant::now().saturating_duration_since(self.epoch);
        now.saturating_sub(Duration::from_millis(
            self.last_active.load(Ordering::Relaxed),
        ))
    }

    /// For each topic, the first offset not settled yet (where a restart resumes).
    pub(crate) fn saved_positions(&self) -> Vec<(String, u64)> {
        let st = self.state.lock();
        st.cursors
            .iter()
            .map(|c| (c.topic.name.to_string(), c.hold.get()))
            .collect()
    }

    /// Adds a cursor on `topic`.
    pub(crate) fn attach(&self, topic: &Arc<Topic>, seek: Seek) {
        let mut st = self.state.lock();
        if !st.attached.insert(Arc::as_ptr(topic) as usize) {
            return;
        }
        let (hold, start) = topic.attach(self.id, &self.signal, seek);
        st.cursors.push(Cursor {
            topic: topic.clone(),
            name: topic.name.private_copy(),
            start,
            next: start,
            hold,
            unsettled: BTreeSet::new(),
            stored: None,
        });
        drop(st);
        // Records may already be waiting (an earliest or offset start).
        self.signal.notify_one();
    }

    /// Hands `member` up to `budget` deliveries from the ready queue (redeliveries and delayed
    /// records that fell due). Returns how many.
    #[allow(clippy::too_many_arguments)]
    fn take_ready(
        self: &Arc<Self>,
        st: &mut State,
        now: Instant,
        member: u64,
        budget: usize,
        out: &mut VecDeque<Delivery>,
        dead: &mut Vec<DeadJob>,
        expiring: &mut bool,
    ) -> usize {
        let mut got = 0;
        while got < budget {
            let Some(tag) = st.ready.pop_front() else {
                break;
            };
            if st.inflight.get(&tag).is_some_and(|e| e.record.expired(now)) {
                self.expire(st, tag, dead);
                continue;
            }
            let Some(e) = st.inflight.remove(&tag) else {
                continue;
            };
            let attempt = if e.returned { e.attempt } else { e.attempt + 1 };
            *expiring |= e.record.expires.is_some();
            let topic = st.cursors[e.cursor].topic.clone();
            self.count(&topic, |c| {
                c.add_delivered(1);
                if !e.scheduled {
                    c.add_redelivered(1);
                }
            });
            out.push_back(self.hand_over(st, now, member, e.record, e.cursor, attempt));
            got += 1;
        }
        got
    }

    /// Moves up to `max` deliveries for `member` into `out`.
    pub(crate) fn fetch(
        self: &Arc<Self>,
        member: u64,
        max: usize,
        out: &mut VecDeque<Delivery>,
    ) -> Fetch {
        let status = self.status.load(Ordering::Acquire);
        if status != OPEN {
            return Fetch {
                got: 0,
                next_wake: None,
                closed: Some(status_error(status)),
                throttled: false,
                expiring: false,
            };
        }
        let now = Instant::now();
        let mut dead = Vec::new();
        let mut st = self.state.lock();
        let manual = self.manual();
        self.fire_timers(&mut st, now, &mut dead);
        let mut budget = max;
        if manual {
            let used = st.member_inflight.get(&member).copied().unwrap_or(0);
            budget = budget.min(self.policy.prefetch.saturating_sub(used));
        }
        let mut expiring = false;
        let mut got = self.take_ready(&mut st, now, member, budget, out, &mut dead, &mut expiring);
        let n = st.cursors.len();
        let mut scratch = Vec::new();
        let mut kept = Vec::new();
        let mut expired = Vec::new();
        let mut delayed = Vec::new();
        // Expired records are skipped, so a pass may deliver nothing while records remain:
        // keep reading until something is delivered or nothing is left.
        loop {
            let mut progressed = false;
            for i in 0..n {
                if got >= budget {
                    break;
                }
                let idx = (st.rr + i) % n;
                let laned: usize = st.lanes.iter().map(VecDeque::len).sum();
                let c = &mut st.cursors[idx];
                if c.topic.tail() <= c.next {
                    continue;
                }
                // On a prioritized topic, read ahead into the priority lanes (delivered below,
                // highest first); elsewhere read just what can be delivered.
                let prio = c.topic.prioritized();
                let want = if prio {
                    LOOKAHEAD.saturating_sub(laned)
                } else {
                    budget - got
                };
                if want == 0 {
                    continue;
                }
                // Under the topic lock, only collect the records; deliveries are made after it is
                // released, so that readers and publishers hold the lock as briefly as possible.
                let push = &mut |r| scratch.push(r);
                let skipped = match c.topic.read(&mut c.next, want, push) {
                    Hot::Read(skipped) => skipped,
                    Hot::Behind { base } => {
                        match c.read_behind(want, base, &self.signal, &self.broker, push) {
                            Some(skipped) => skipped,
                            // Only on disk: an I/O thread reads it and wakes the consumer.
                            None => continue,
                        }
                    }
                };
                progressed = true;
                // The flags are read after the read: a publisher sets them before its append, so
                // every record just read that expires, is delayed or has a priority is covered
                // (read before it, a record appended in between would slip through unchecked).
                if c.topic.timed() {
                    kept.extend(scratch.drain(..).filter_map(|r| {
                        if r.expires.is_some() {
                            expiring = true;
                            if r.expired(now) {
                                expired.push(r);
                                return None;
                            }
                        }
                        if r.not_before.is_some_and(|t| t > now) {
                            delayed.push(r);
                            return None;
                        }
                        Some(r)
                    }));
                    std::mem::swap(&mut scratch, &mut kept);
                }
                let prio = prio || c.topic.prioritized();
                let topic = c.topic.clone();
                let name = c.name.clone();
                if !self.headers.is_empty() {
                    let before = scratch.len();
                    scratch.retain(|r| all_match(&self.headers, &r.message));
                    let filtered = (before - scratch.len()) as u64;
                    self.count(&topic, |c| c.add_filtered(filtered));
                }
                let lapsed = expired.len() as u64;
                self.count(&topic, |c| c.add_dropped(skipped));
                if topic.config.dead_letter_expired {
                    // Counted once, as dead-lettered.
                    self.count(&topic, |c| c.add_dead_lettered(lapsed));
                    dead.extend(expired.drain(..).map(|record| DeadJob {
                        topic: name.clone(),
                        record,
                        reason: DeadLetterReason::Expired,
                        attempts: 0,
                    }));
                } else {
                    self.count(&topic, |c| c.add_expired(lapsed));
                    expired.clear();
                }
                // Delayed records wait in the timer heap, holding their place in the topic, and
                // become ready when due (one heap per consumer, no task or timer per message).
                for r in delayed.drain(..) {
                    let due = r.not_before.unwrap_or(now);
                    let tag = st.next_tag;
                    st.next_tag += 1;
                    st.cursors[idx].unsettled.insert(r.offset());
                    st.inflight.insert(
                        tag,
                        Inflight {
                            record: r,
                            cursor: idx,
                            attempt: 0,
                            returned: false,
                            scheduled: true,
                            phase: Phase::Delayed { due },
                        },
                    );
                    st.push_timer(due, tag);
                }
                if prio {
                    for r in scratch.drain(..) {
                        st.cursors[idx].unsettled.insert(r.offset());
                        let lane = r.message.priority() as usize;
                        st.lanes[lane].push_back(Laned {
                            record: r,
                            cursor: idx,
                            since: now,
                        });
                    }
                    st.cursors[idx].update_hold();
                    continue;
                }
                let k = scratch.len();
                got += k;
                if manual {
                    self.count(&topic, |c| c.add_delivered(k as u64));
                    for r in scratch.drain(..) {
                        st.cursors[idx].unsettled.insert(r.offset());
                        let d = self.deliver(&mut st, now, member, r, idx, 1);
                        out.push_back(d);
                    }
                } else {
                    out.extend(scratch.drain(..).map(Delivery::auto));
                    self.count(&topic, |c| {
                        c.add_delivered(k as u64);
                        c.add_acked(k as u64);
                    });
                }
                st.cursors[idx].update_hold();
            }
            got += self.deliver_lanes(&mut st, now, member, budget - got, out);
            if got == 0 && progressed && !st.timers.is_empty() {
                // This pass only scheduled delayed records (or skipped expired ones): before
                // reading on, hand over what fell due meanwhile, so that a fast stream of delayed
                // publishes cannot hold back the records already due.
                let now = Instant::now();
                self.fire_timers(&mut st, now, &mut dead);
                got += self.take_ready(&mut st, now, member, budget, out, &mut dead, &mut expiring);
            }
            if got > 0 || !progressed {
                break;
            }
        }
        if n > 0 {
            st.rr = (st.rr + 1) % n;
        }
        let next_wake = st.timers.next_due();
        let more = !st.ready.is_empty()
            || st.lanes.iter().any(|l| !l.is_empty())
            || st.cursors.iter().any(|c| c.topic.tail() > c.next);
        drop(st);
        self.bury(dead);
        if got > 0 {
            self.touch_at(now);
            if more {
                // Another member of the group may take the rest.
                self.signal.notify_one();
            }
        }
        Fetch {
            got,
            next_wake,
            closed: None,
            throttled: got == 0 && budget == 0,
            expiring,
        }
    }

    /// Delivers up to `max` records from the priority lanes: the highest non-empty lane first,
    /// except that a record that has waited `priority_aging` goes before all others.
    fn deliver_lanes(
        self: &Arc<Self>,
        st: &mut State,
        now: Instant,
        member: u64,
        max: usize,
        out: &mut VecDeque<Delivery>,
    ) -> usize {
        let mut got = 0;
        while got < max {
            let aged = st
                .lanes
                .iter()
                .enumerate()
                .filter_map(|(i, l)| l.front().map(|f| (i, f)))
                .filter(|(_, f)| {
                    let aging = st.cursors[f.cursor].topic.config.priority_aging;
                    aging.is_some_and(|a| now.saturating_duration_since(f.since) >= a)
                })
                .min_by_key(|(_, f)| f.since)
                .map(|(i, _)| i);
            let Some(lane) = aged.or_else(|| st.lanes.iter().rposition(|l| !l.is_empty())) else {
                break;
            };
            let Some(Laned { record, cursor, .. }) = st.lanes[lane].pop_front() else {
                break;
            };
            let topic = st.cursors[cursor].topic.clone();
            self.count(&topic, |c| c.add_delivered(1));
            out.push_back(self.hand_over(st, now, member, record, cursor, 1));
            got += 1;
        }
        got
    }

    /// Hands over a record that waited in the consumer (a redelivery, a delayed record, or one
    /// from a priority lane): in flight with manual acks; acknowledged at once with auto acks.
    fn hand_over(
        self: &Arc<Self>,
        st: &mut State,
        now: Instant,
        member: u64,
        record: Arc<Record>,
        cursor: usize,
        attempt: u32,
    ) -> Delivery {
        if self.manual() {
            return self.deliver(st, now, member, record, cursor, attempt);
        }
        let c = &mut st.cursors[cursor];
        c.settle(record.offset());
        let topic = c.topic.clone();
        self.count(&topic, |c| c.add_acked(1));
        Delivery::auto(record)
    }

    fn deliver(
        self: &Arc<Self>,
        st: &mut State,
        now: Instant,
        member: u64,
        record: Arc<Record>,
        cursor: usize,
        attempt: u32,
    ) -> Delivery {
        let tag = st.next_tag;
        st.next_tag += 1;
        let deadline = now + self.policy.ack_timeout;
        st.inflight.insert(
            tag,
            Inflight {
                record: record.clone(),
                cursor,
                attempt,
                returned: false,
                scheduled: false,
                phase: Phase::Delivered { member, deadline },
            },
        );
        st.push_timer(deadline, tag);
        *st.member_inflight.entry(member).or_default() += 1;
        Delivery::manual(record, attempt, self.clone(), tag)
    }

    /// Handles due ack deadlines and nack delays.
    fn fire_timers(&self, st: &mut State, now: Instant, dead: &mut Vec<DeadJob>) {
        while let Some(due) = st.timers.pop_due(now) {
            for (t, tag) in due {
                let Some(e) = st.inflight.get_mut(&tag) else {
                    continue;
                };
                if e.phase.timer() != Some(t) {
                    continue; // stale: settled, or re-armed for another time
                }
                match e.phase {
                    Phase::Delivered { member, .. } => {
                        dec(&mut st.member_inflight, member);
                        self.fail(st, tag, dead);
                    }
                    Phase::Delayed { .. } => {
                        e.phase = Phase::Ready;
                        st.ready.push_back(tag);
                    }
                    Phase::Ready => {}
                }
            }
        }
    }

    /// An unsettled delivery's record expired before it could be redelivered.
    fn expire(&self, st: &mut State, tag: u64, dead: &mut Vec<DeadJob>) {
        let Some(e) = st.inflight.get(&tag) else {
            return;
        };
        let topic = st.cursors[e.cursor].topic.clone();
        if topic.config.dead_letter_expired {
            self.to_dead(st, tag, DeadLetterReason::Expired, dead);
        } else if let Some(e) = st.inflight.remove(&tag) {
            let c = &mut st.cursors[e.cursor];
            c.settle(e.record.offset());
            self.count(&topic, |c| c.add_expired(1));
        }
    }

    /// A delivery failed (nack without delay, or ack timeout): redeliver or dead-letter.
    fn fail(&self, st: &mut State, tag: u64, dead: &mut Vec<DeadJob>) {
        let Some(e) = st.inflight.get_mut(&tag) else {
            return;
        };
        if e.attempt >= self.policy.max_attempts {
            let reason = DeadLetterReason::MaxAttempts;
            self.to_dead(st, tag, reason, dead);
        } else {
            e.phase = Phase::Ready;
            st.ready.push_back(tag);
        }
    }

    fn to_dead(&self, st: &mut State, tag: u64, reason: DeadLetterReason, dead: &mut Vec<DeadJob>) {
        if let Some(e) = st.inflight.remove(&tag) {
            let c = &mut st.cursors[e.cursor];
            c.settle(e.record.offset());
            let topic = c.topic.clone();
            let name = c.name.clone();
            self.count(&topic, |c| c.add_dead_lettered(1));
            dead.push(DeadJob {
                topic: name,
                record: e.record,
                reason,
                attempts: e.attempt,
            });
        }
    }

    /// Settles delivery `tag`.
    pub(crate) fn settle(&self, tag: u64, how: Settle) -> Result<(), AckError> {
        let mut dead = Vec::new();
        let mut st = self.state.lock();
        let (member, record_topic) = match st.inflight.get(&tag) {
            Some(Inflight {
                phase: Phase::Delivered { member, .. },
                cursor,
                ..
            }) => (*member, st.cursors[*cursor].topic.clone()),
            _ => {
                return Err(if self.status.load(Ordering::Acquire) == OPEN {
                    AckError::Stale
                } else {
                    AckError::Gone
                })
            }
        };
        let before = st.member_inflight.get(&member).copied().unwrap_or(0);
        dec(&mut st.member_inflight, member);
        let mut rearm = false;
        match how {
            Settle::Ack => {
                if let Some(e) = st.inflight.remove(&tag) {
                    let c = &mut st.cursors[e.cursor];
                    c.settle(e.record.offset());
                }
                self.count(&record_topic, |c| c.add_acked(1));
            }
            Settle::Nack(delay) => {
                self.count(&record_topic, |c| c.add_nacked(1));
                let exhausted = st
                    .inflight
                    .get(&tag)
                    .is_some_and(|e| e.attempt >= self.policy.max_attempts);
                match delay {
                    Some(d) if !d.is_zero() && !exhausted => {
                        let due = Instant::now() + d;
                        if let Some(e) = st.inflight.get_mut(&tag) {
                            e.phase = Phase::Delayed { due };
                        }
                        st.push_timer(due, tag);
                        // A member waiting for the next timer must see this earlier one.
                        rearm = true;
                    }
                    _ => self.fail(&mut st, tag, &mut dead),
                }
            }
            Settle::Reject(reason) => {
                self.count(&record_topic, |c| c.add_nacked(1));
                self.to_dead(&mut st, tag, DeadLetterReason::Rejected(reason), &mut dead);
            }
            Settle::Expired => self.expire(&mut st, tag, &mut dead),
            Settle::Returned => {
                if let Some(e) = st.inflight.get_mut(&tag) {
                    e.returned = true;
                    e.phase = Phase::Ready;
                }
                st.ready.push_front(tag);
            }
        }
        let redeliver = rearm || !st.ready.is_empty();
        drop(st);
        self.bury(dead);
        if redeliver {
            self.signal.notify_one();
        }
        if before >= self.policy.prefetch {
            self.acks.notify_all();
        }
        Ok(())
    }

    /// A member leaves: its unsettled deliveries go back to the consumer for redelivery.
    pub(crate) fn leave(&self, member: u64) -> usize {
        let mut st = self.state.lock();
        let tags: Vec<u64> = st
            .inflight
            .iter()
            .filter(|(_, e)| matches!(e.phase, Phase::Delivered { member: m, .. } if m == member))
            .map(|(t, _)| *t)
            .collect();
        for tag in tags.iter().copied() {
            if let Some(e) = st.inflight.get_mut(&tag) {
                e.returned = true;
                e.phase = Phase::Ready;
            }
            st.ready.push_back(tag);
        }
        st.member_inflight.remove(&member);
        drop(st);
        self.signal.unregister(member);
        self.acks.unregister(member);
        if !tags.is_empty() {
            self.signal.notify_all();
        }
        self.members
            .fetch_sub(1, Ordering::AcqRel)
            .saturating_sub(1)
    }

    /// The topic of the cursor whose name is `name`.
    fn topic_named(st: &State, name: &TopicName) -> Option<Arc<Topic>> {
        st.cursors
            .iter()
            .find(|c| c.name == *name)
            .map(|c| c.topic.clone())
    }

    /// Auto-ack records that were handed over but never received (the subscription dropped
    /// them): they are re-counted from acknowledged to dropped.
    pub(crate) fn forget_buffered(&self, topics: &[TopicName]) {
        let st = self.state.lock();
        for t in topics {
            if let Some(topic) = Self::topic_named(&st, t) {
                self.count(&topic, |c| {
                    c.acked.fetch_sub(1, Ordering::Relaxed);
                    c.add_dropped(1);
                });
            }
        }
    }

    /// An auto-ack record expired in a member's buffer: re-counted from acknowledged to expired
    /// (or dead-lettered, if the topic says so).
    pub(crate) fn expire_buffered(&self, topic: &TopicName, record: &Arc<Record>) {
        let Some(t) = Self::topic_named(&self.state.lock(), topic) else {
            return;
        };
        self.count(&t, |c| {
            c.acked.fetch_sub(1, Ordering::Relaxed);
        });
        if t.config.dead_letter_expired {
            self.count(&t, |c| c.add_dead_lettered(1));
            self.bury(vec![DeadJob {
                topic: topic.clone(),
                record: record.clone(),
                reason: DeadLetterReason::Expired,
                attempts: 0,
            }]);
        } else {
            self.count(&t, |c| c.add_expired(1));
        }
    }

    /// Counts a handler error against the record's topic and this consumer.
    pub(crate) fn count_error(&self, topic: &TopicName) {
        if let Some(t) = Self::topic_named(&self.state.lock(), topic) {
            self.count(&t, |c| c.add_errors(1));
        }
    }

    /// Closes (shutdown) or evicts the consumer: what it has not settled is counted as dropped,
    /// its cursors are detached, and its members wake to find it closed.
    pub(crate) fn close(&self, evicted: bool) {
        let prev = self
            .status
            .swap(if evicted { EVICTED } else { CLOSED }, Ordering::AcqRel);
        if prev != OPEN {
            return;
        }
        let mut st = self.state.lock();
        for lane in std::mem::take(&mut st.lanes) {
            for l in lane {
                let topic = st.cursors[l.cursor].topic.clone();
                self.count(&topic, |c| c.add_dropped(1));
            }
        }
        let inflight = std::mem::take(&mut st.inflight);
        for e in inflight.into_values() {
            let topic = st.cursors[e.cursor].topic.clone();
            self.count(&topic, |c| c.add_dropped(1));
        }
        st.ready.clear();
        st.timers.clear();
        st.member_inflight.clear();
        for c in &mut st.cursors {
            let tail = c.topic.tail();
            let lag = tail.saturating_sub(c.next);
            c.next = tail;
            c.unsettled.clear();
            c.stored = None;
            c.hold.set(tail);
            self.counters.add_dropped(lag);
            c.topic.counters.add_dropped(lag);
            c.topic.detach(self.id);
        }
        drop(st);
        self.signal.notify_all();
        self.acks.notify_all();
    }

    /// Whether the consumer has nothing left to deliver or settle.
    pub(crate) fn drained(&self) -> bool {
        let st = self.state.lock();
        st.inflight.is_empty()
            && st.lanes.iter().all(VecDeque::is_empty)
            && st.cursors.iter().all(|c| c.topic.tail() <= c.next)
    }

    /// (lag, in flight, assigned).
    fn positions(&self) -> (u64, u64, u64) {
        let st = self.state.lock();
        let mut lag = 0;
        let mut assigned = 0;
        for c in &st.cursors {
            let tail = c.topic.tail();
            lag += tail.saturating_sub(c.next);
            assigned += tail.saturating_sub(c.start);
        }
        let laned: usize = st.lanes.iter().map(VecDeque::len).sum();
        (lag, (st.inflight.len() + laned) as u64, assigned)
    }

    pub(crate) fn lag(&self) -> u64 {
        self.positions().0
    }

    /// Lag on one topic, if the consumer reads it.
    pub(crate) fn lag_on(&self, topic: &Topic) -> Option<u64> {
        let st = self.state.lock();
        st.cursors
            .iter()
            .find(|c| std::ptr::eq(Arc::as_ptr(&c.topic), topic))
            .map(|c| topic.lag_from(c.next))
    }

    pub(crate) fn stats(&self) -> SubscriptionStats {
        let (lag, in_flight, assigned) = self.positions();
        SubscriptionStats {
            id: self.id,
            name: self.name.clone(),
            filter: self.filter.to_string(),
            group: self.group,
            members: self.members.load(Ordering::Relaxed),
            counters: self.counters.snapshot(),
            in_flight,
            lag,
            assigned,
            idle: self.idle(),
        }
    }

    fn count(&self, topic: &Topic, f: impl Fn(&Counters)) {
        f(&self.counters);
        f(&topic.counters);
    }

    fn bury(&self, dead: Vec<DeadJob>) {
        if dead.is_empty() {
            return;
        }
        if let Some(b) = self.broker.upgrade() {
            for job in dead {
                b.dead_letter(job);
            }
        }
    }
}

fn dec(m: &mut HashMap<u64, usize>, member: u64) {
    if let Some(n) = m.get_mut(&member) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            m.remove(&member);
        }
    }
}

fn status_error(status: u8) -> RecvError {
    if status == EVICTED {
        RecvError::Evicted
    } else {
        RecvError::Closed
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use crate::{Broker, Message};

    /// Acknowledged deliveries leave no ack-deadline timers behind beyond a bounded slack: with a
    /// one-hour ack timeout none of them falls due, so without compaction every one would stay.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acknowledged_deliveries_do_not_pile_up_timers() {
        const N: usize = 50_000;
        let broker = Broker::default();
        let mut sub = broker
            .subscription("timers/t")
            .manual_ack()
            .ack_timeout(Duration::from_secs(3600))
            .build()
            .unwrap();
        let publisher = broker.publisher("timers/t").unwrap();
        let mut most = 0;
        for i in 0..N {
            publisher.publish(Message::new(vec![1u8; 8])).await.unwrap();
            let d = sub.recv().await.unwrap();
            assert_eq!(d.offset(), i as u64);
            if i % 3 == 0 {
                // Some deliveries stay unsettled for a while: their timers must survive.
                d.nack_after(Duration::from_secs(3600)).unwrap();
            } else {
                d.ack().unwrap();
            }
            most = most.max(sub.consumer.state.lock().timers.len());
        }
        let st = sub.consumer.state.lock();
        let unsettled = st.inflight.len();
        assert_eq!(
            unsettled,
            N.div_ceil(3),
            "the nacked deliveries wait for their delay"
        );
        // The queue never held more than the compaction bound (+1 for the push that triggers
        // it), and every unsettled delivery still has its timer.
        assert!(
            most <= 2 * unsettled + super::STALE_TIMER_SLACK + 1,
            "{most} timers for {unsettled} unsettled deliveries"
        );
        assert!(st.timers.len() >= unsettled);
    }
}
