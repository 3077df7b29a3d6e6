//! Features above the contract, on every backend: retries with backoff, dead letters with
//! reasons and redrive, TTL, delayed delivery, priority lanes, de-duplication, handler
//! middleware (tower) and stats.
//!
//! A [`Queue`] wraps an `Arc<dyn Backend>`. It uses what the backend does natively (see the
//! rows `retries` to `stats` of [`Capabilities`]) and emulates the rest:
//!
//! - **Delayed delivery** (header [`DELIVER_AT_HEADER`](crate::DELIVER_AT_HEADER), set with
//!   [`BackendMessage::with_delay`]): a [`QueueSubscription`] that receives a message before it
//!   is due nacks it again with the time left (rounded down to a coarse grid, so that RabbitMQ
//!   reuses its delay queues; on Redis, whose nack delay is capped at the ack timeout, this loops
//!   until the message is due). These deferrals do not count as attempts: the subscription
//!   remembers them (in memory; the subscriptions of one consumer group through one [`Queue`]
//!   share the record) and subtracts them from the backend's attempt count, and asks the
//!   backend for [`DEFER_ALLOWANCE`] more attempts than `max_attempts`. The queue itself
//!   dead-letters (reason `max_attempts`) a delivery past `max_attempts`. A deferred message
//!   that moves to a group member elsewhere (another process or `Queue` handle), or survives a
//!   restart, may therefore be counted with more attempts than it had; a message deferred more
//!   than `DEFER_ALLOWANCE` times is dead-lettered with reason `delay exceeds the deferral
//!   allowance`. On the embedded engine the delay is native.
//! - **TTL** (header [`EXPIRES_AT_HEADER`](crate::EXPIRES_AT_HEADER), set with [`BackendMessage::with_ttl`]): an expired
//!   message is never handed over; the subscription acknowledges it (it is dropped, not
//!   dead-lettered, as the embedded engine does by default) and counts it in `expired`. On the
//!   embedded engine expiry is native: the engine skips expired records itself and counts them
//!   in the broker's stats.
//! - **Priority lanes** ([`Priority`], header [`PRIORITY_HEADER`](crate::PRIORITY_HEADER)): [`Queue::publish`] sends
//!   each lane to a topic of its own ([`Priority::lane_topic`]: `<topic>.prio-high`, `<topic>`,
//!   `<topic>.prio-low`), and a subscription subscribes to every lane and hands over the highest
//!   lane's delivery. It starts every lane when it is made (so that the first `next` sees what
//!   was published meanwhile), holds at most one delivery per lane (the lane's head, taken
//!   from what the lane's subscription has ready, without waiting), and hands over the highest
//!   head. When only lower lanes have a head, it waits up to
//!   [`QueueConfig::priority_look_ahead`] (default 25 ms, at most a quarter of the ack timeout)
//!   for a higher lane, counted from when the lower lane became ready: a higher message
//!   published alongside a lower one may reach its lane a little later. Heads still held when
//!   the subscription is closed or dropped, or held for a third of the ack timeout (while
//!   higher lanes keep it busy, or while nobody calls `next`), are nacked for redelivery as
//!   deferrals (not counted as attempts, as above; a returned head may lose its place in its
//!   lane). On the embedded engine priorities are native (one topic). A filter ending in `#`
//!   already covers the lane topics: it gets one subscription and no preference. The
//!   preference is strict: under a steady load of higher-priority messages, lower lanes wait.
//!   It orders what each lane's subscription has ready (its prefetch).
//! - **De-duplication**: publish side, a second [`Queue::publish`] of the same message id to the
//!   same topic within [`QueueConfig::dedup_window`] is dropped ([`Published::Duplicate`]) —
//!   natively by NATS JetStream (`Nats-Msg-Id`, across all clients), in the handle's memory
//!   elsewhere. Consumer side (when [`QueueConfig::consumer_dedup`]), each subscription
//!   remembers the ids of the last [`QueueConfig::dedup_capacity`] messages it acknowledged and
//!   acknowledges (without handing over) a message with such an id, counted in
//!   `deduplicated`.
//! - **Retries with backoff** ([`Queue::serve`]): a handler (a [`tower::Service`]) that fails is
//!   retried: its delivery is nacked with the [`Backoff`]'s delay for that attempt; after the
//!   subscription's `max_attempts` it is dead-lettered with the handler's error text as the
//!   reason. A [`Permanent`] error dead-letters at once. Where the backend cuts a nack delay
//!   short (Redis caps it at the ack timeout), the subscription that nacked defers the early
//!   redelivery like a delayed message, so the retry still waits its whole delay (a group member
//!   through another `Queue` handle or process does not know the delay and hands it over at
//!   once).
//! - **Dead letters**: [`Queue::dead_letters`] lists them with reason, attempts and source
//!   topic, [`Queue::redrive`] republishes them to their source topic, [`Queue::purge`] deletes
//!   them (over every priority lane of the topic).
//! - **Stats**: [`Queue::stats`], [`Queue::topic_stats`], [`QueueSubscription::stats`] and
//!   [`Worker::stats`] count published, delivered, acked, nacked, dead-lettered, redriven,
//!   expired, deduplicated, handler errors and deliveries in flight.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
pub use ferry::middleware::Backoff;
use futures::FutureExt;
use parking_lot::Mutex;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt};

use crate::api::{
    Acker, Backend, BackendMessage, BackendSubscription, Delivery, Priority, PublishAck,
    SubscribeOptions, DLQ_ATTEMPTS_HEADER, DLQ_REASON_HEADER, DLQ_TOPIC_HEADER, REDRIVEN_HEADER,
};
use crate::capabilities::{Capabilities, Support};
use crate::error::{BackendError, Result};

/// How many more attempts than `max_attempts` a [`QueueSubscription`] asks the backend for when
/// delayed delivery or priority lanes are emulated, for the re-nacks of messages that are not
/// due yet and of held lane heads returned to the backend.
pub const DEFER_ALLOWANCE: u32 = 1000;

/// A boxed error, as tower's layers produce.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A handler error that must not be retried: the message is dead-lettered at once with this
/// text as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Permanent(pub String);

impl Permanent {
    /// A permanent failure with this reason.
    pub fn new(reason: impl Into<String>) -> Self {
        Permanent(reason.into())
    }
}

/// Settings of a [`Queue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// Publish-side de-duplication window (emulated backends; NATS uses its stream's window).
    /// Zero turns the emulation off.
    pub dedup_window: Duration,
    /// How many ids the publish-side window and each subscription's consumer-side window hold.
    pub dedup_capacity: usize,
    /// Consumer-side de-duplication: subscriptions drop messages whose id they acknowledged.
    pub consumer_dedup: bool,
    /// Dead-letter listings, redrives and purges that drain a dead-letter subscription stop
    /// after this long without a dead letter.
    pub drain_idle: Duration,
    /// Priority lanes (emulated): how long a subscription that has only lower-priority
    /// deliveries ready waits for a higher lane before handing a lower one over. The wait runs
    /// from when the lower lane's deliveries became ready (a lane that stays ready, a backlog,
    /// waits once, not once per delivery), and ends early when a higher delivery arrives. It is
    /// clamped to a quarter of the subscription's ack timeout; zero hands over the highest lane
    /// ready at once. Unused with native priorities and with a single lane. Default 25 ms.
    pub priority_look_ahead: Duration,
    /// How many times [`Queue::publish`] sends again, with the same message id, a publish
    /// that failed in doubt ([`BackendError::InDoubt`]), where the backend de-duplicates by id
    /// natively (NATS JetStream: a resend within the duplicate window is stored once). Other
    /// backends report the in-doubt error without a resend, since one could store the message
    /// twice. Default 2.
    pub in_doubt_retries: u32,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            dedup_window: Duration::from_secs(120),
            dedup_capacity: 10_000,
            consumer_dedup: true,
            drain_idle: Duration::from_millis(500),
            priority_look_ahead: Duration::from_millis(25),
            in_doubt_retries: 2,
        }
    }
}

/// Counters, as read by [`Queue::stats`] and friends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages published (duplicates dropped by the emulated window not included).
    pub published: u64,
    /// Deliveries handed to a subscriber or handler.
    pub delivered: u64,
    /// Deliveries acknowledged.
    pub acked: u64,
    /// Deliveries nacked (redelivered later).
    pub nacked: u64,
    /// Deliveries dead-lettered (rejected, failed on the last attempt, or past `max_attempts`).
    pub dead_lettered: u64,
    /// Dead letters redriven to their source topic.
    pub redriven: u64,
    /// Expired messages dropped before hand-over.
    pub expired: u64,
    /// Duplicates dropped (on publish or on receipt).
    pub deduplicated: u64,
    /// Handler calls that failed (including time-outs of a timeout layer).
    pub handler_errors: u64,
    /// Deliveries handed over and not settled yet.
    pub in_flight: u64,
}

#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    delivered: AtomicU64,
    acked: AtomicU64,
    nacked: AtomicU64,
    dead_lettered: AtomicU64,
    redriven: AtomicU64,
    expired: AtomicU64,
    deduplicated: AtomicU64,
    handler_errors: AtomicU64,
    in_flight: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
enum Event {
    Published,
    Delivered,
    Acked,
    Nacked,
    DeadLettered,
    Redriven,
    Expired,
    Deduplicated,
    HandlerError,
    Settled,
}

impl Counters {
    fn add(&self, event: Event, n: u64) {
        let c = match event {
            Event::Published => &self.published,
            Event::Delivered => {
                self.in_flight.fetch_add(n, Ordering::Relaxed);
                &self.delivered
            }
            Event::Acked => &self.acked,
            Event::Nacked => &self.nacked,
            Event::DeadLettered => &self.dead_lettered,
            Event::Redriven => &self.redriven,
            Event::Expired => &self.expired,
            Event::Deduplicated => &self.deduplicated,
            Event::HandlerError => &self.handler_errors,
            Event::Settled => {
                let _ = self
                    .in_flight
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                        Some(v.saturating_sub(n))
                    });
                return;
            }
        };
        c.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Stats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            published: g(&self.published),
            delivered: g(&self.delivered),
            acked: g(&self.acked),
            nacked: g(&self.nacked),
            dead_lettered: g(&self.dead_lettered),
            redriven: g(&self.redriven),
            expired: g(&self.expired),
            deduplicated: g(&self.deduplicated),
            handler_errors: g(&self.handler_errors),
            in_flight: g(&self.in_flight),
        }
    }
}

/// Where counts go: the queue's totals, the topic's, and a subscription's.
#[derive(Debug, Clone)]
struct Recorder {
    total: Arc<Counters>,
    topics: Arc<Mutex<HashMap<String, Arc<Counters>>>>,
    sub: Option<Arc<Counters>>,
}

impl Recorder {
    fn record(&self, topic: &str, event: Event) {
        self.record_n(topic, event, 1);
    }

    fn record_n(&self, topic: &str, event: Event, n: u64) {
        if n == 0 {
            return;
        }
        self.total.add(event, n);
        let t = self
            .topics
            .lock()
            .entry(topic.to_string())
            .or_default()
            .clone();
        t.add(event, n);
        if let Some(s) = &self.sub {
            s.add(event, n);
        }
    }

    fn for_subscription(&self) -> Recorder {
        Recorder {
            sub: Some(Arc::default()),
            ..self.clone()
        }
    }
}

/// A bounded set of recent keys, oldest evicted first, each valid for `window`.
#[derive(Debug)]
struct IdWindow {
    window: Option<Duration>,
    capacity: usize,
    order: VecDeque<(Instant, String)>,
    set: HashSet<String>,
}

impl IdWindow {
    fn new(window: Option<Duration>, capacity: usize) -> Self {
        IdWindow {
            window,
            capacity: capacity.max(1),
            order: VecDeque::new(),
            set: HashSet::new(),
        }
    }

    fn expire(&mut self) {
        let now = Instant::now();
        while let Some((at, key)) = self.order.front() {
            let stale = self.window.is_some_and(|w| now.duration_since(*at) >= w);
            if !stale && self.order.len() <= self.capacity {
                break;
            }
            self.set.remove(key);
            self.order.pop_front();
        }
    }

    fn contains(&mut self, key: &str) -> bool {
        self.expire();
        self.set.contains(key)
    }

    /// Inserts; `false` if it was there already.
    fn insert(&mut self, key: String) -> bool {
        self.expire();
        if !self.set.insert(key.clone()) {
            return false;
        }
        self.order.push_back((Instant::now(), key));
        self.expire();
        true
    }

    fn remove(&mut self, key: &str) {
        if self.set.remove(key) {
            self.order.retain(|(_, k)| k != key);
        }
    }
}

/// The key under which a message is de-duplicated: its id, and its redrive count (a redriven
/// message is not a duplicate of its first life).
fn dedup_key(m: &BackendMessage) -> String {
    match m.header(REDRIVEN_HEADER) {
        Some(n) => format!("{}~redriven-{n}", m.id),
        None => m.id.clone(),
    }
}

/// What [`Queue::publish`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// Stored by the backend.
    Stored(PublishAck),
    /// Dropped: the same id was published to this topic within the de-duplication window.
    Duplicate {
        /// The message id.
        id: String,
    },
}

impl Published {
    /// The backend's acknowledgement, unless the message was a duplicate.
    pub fn ack(&self) -> Option<&PublishAck> {
        match self {
            Published::Stored(a) => Some(a),
            Published::Duplicate { .. } => None,
        }
    }

    /// Whether it was dropped as a duplicate.
    pub fn is_duplicate(&self) -> bool {
        matches!(self, Published::Duplicate { .. })
    }
}

/// A dead letter as listed by [`Queue::dead_letters`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterInfo {
    /// The original message (without the `ferry-dlq-*` headers).
    pub message: BackendMessage,
    /// Why it was dead-lettered (`max_attempts`, a reject reason, a handler's error text...).
    pub reason: String,
    /// How many delivery attempts were made (0 if the backend did not say).
    pub attempts: u32,
    /// The topic it came from.
    pub source_topic: String,
}

impl DeadLetterInfo {
    fn from_delivery(d: &Delivery) -> Self {
        let mut message = d.message().clone();
        let reason = message
            .headers
            .remove(DLQ_REASON_HEADER)
            .unwrap_or_default();
        let attempts = message
            .headers
            .remove(DLQ_ATTEMPTS_HEADER)
            .and_then(|a| a.parse().ok())
            .unwrap_or(0);
        let source_topic = message
            .headers
            .remove(DLQ_TOPIC_HEADER)
            .unwrap_or_else(|| d.topic().to_string());
        DeadLetterInfo {
            message,
            reason,
            attempts,
            source_topic,
        }
    }
}

const DRAIN_IDLE: Duration = Duration::from_millis(500);

/// The next dead letter, or `None` after `idle` without one.
async fn next_within(
    sub: &mut Box<dyn BackendSubscription>,
    idle: Duration,
) -> Result<Option<Delivery>> {
    match tokio::time::timeout(idle, sub.next()).await {
        Ok(Ok(d)) => Ok(Some(d)),
        Ok(Err(e)) => Err(e),
        Err(_) => Ok(None),
    }
}

/// The default [`Backend::redrive_dead_letters`]: drains the dead letters, republishing each to
/// its source topic before acknowledging it.
pub(crate) async fn drain_redrive<B: Backend + ?Sized>(
    backend: &B,
    topic: &str,
    max: usize,
) -> Result<usize> {
    let mut sub = backend.dead_letters(topic).await?;
    let mut seen = HashSet::new();
    let mut n = 0;
    while n < max {
        let Some(d) = next_within(&mut sub, DRAIN_IDLE).await? else {
            break;
        };
        if !seen.insert(d.id.clone()) {
            // Redelivered within this drain (it was acknowledged already, or is on its way).
            continue;
        }
        let info = DeadLetterInfo::from_delivery(&d);
        let mut message = info.message;
        let redrives = message
            .header(REDRIVEN_HEADER)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        message
            .headers
            .insert(REDRIVEN_HEADER.into(), (redrives + 1).to_string());
        backend.publish(&info.source_topic, message).await?;
        d.ack().await?;
        n += 1;
    }
    let _ = sub.close().await;
    Ok(n)
}

/// The default [`Backend::purge_dead_letters`]: drains the dead letters, acknowledging each.
pub(crate) async fn drain_purge<B: Backend + ?Sized>(backend: &B, topic: &str) -> Result<usize> {
    let mut sub = backend.dead_letters(topic).await?;
    let mut seen = HashSet::new();
    while let Some(d) = next_within(&mut sub, DRAIN_IDLE).await? {
        if seen.insert(d.id.clone()) {
            d.ack().await?;
        }
    }
    let _ = sub.close().await;
    Ok(seen.len())
}

/// Rounds a nack delay down to 1/8 of its power of two (at most 12.5 % less), so that backends
/// that make a queue per distinct delay (RabbitMQ) see few distinct delays.
fn coarse(delay: Duration) -> Duration {
    let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    if ms < 16 {
        return Duration::from_millis(ms.max(1));
    }
    let top = 63 - ms.leading_zeros();
    let step = 1u64 << (top - 3);
    Duration::from_millis(ms - ms % step)
}

struct Inner {
    backend: Arc<dyn Backend>,
    caps: Capabilities,
    config: QueueConfig,
    recorder: Recorder,
    published: Mutex<IdWindow>,
    /// The deferral records of each consumer group (by group and filter), shared by the group's
    /// subscriptions through this queue, so that a message deferred by one member (a held
    /// priority-lane head returned on close, a retry nacked with a delay) is counted right by
    /// the member that receives it next.
    group_deferrals: Mutex<HashMap<String, Arc<Mutex<Deferrals>>>>,
}

/// How many consumer groups' deferral records a [`Queue`] keeps once no subscription uses them.
const IDLE_GROUP_DEFERRALS: usize = 256;

/// The features above the contract over any backend (see the [module docs](self)).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), ferry_backends::BackendError> {
/// use std::time::Duration;
/// use ferry_backends::{connect, BackendMessage, Priority, Queue, SubscribeOptions};
///
/// let queue = Queue::new(connect("memory://").await?);
/// let mut sub = queue.subscribe(SubscribeOptions::new("jobs").group("workers")).await?;
/// queue
///     .publish("jobs", BackendMessage::new("urgent").with_priority(Priority::High))
///     .await?;
/// queue
///     .publish("jobs", BackendMessage::new("later").with_delay(Duration::from_millis(50)))
///     .await?;
/// let first = sub.next().await?;
/// assert_eq!(&first.payload[..], b"urgent");
/// first.ack().await?;
/// let second = sub.next().await?;
/// assert_eq!(&second.payload[..], b"later");
/// second.ack().await?;
/// assert_eq!(queue.stats().acked, 2);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("backend", &self.inner.backend)
            .field("config", &self.inner.config)
            .finish()
    }
}

impl Queue {
    /// A queue over `backend` with the default [`QueueConfig`].
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Queue::with_config(backend, QueueConfig::default())
    }

    /// A queue over `backend`.
    pub fn with_config(backend: Arc<dyn Backend>, config: QueueConfig) -> Self {
        let caps = backend.capabilities();
        let window = IdWindow::new(Some(config.dedup_window), config.dedup_capacity);
        Queue {
            inner: Arc::new(Inner {
                backend,
                caps,
                recorder: Recorder {
                    total: Arc::default(),
                    topics: Arc::default(),
                    sub: None,
                },
                published: Mutex::new(window),
                group_deferrals: Mutex::new(HashMap::new()),
                config,
            }),
        }
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.inner.backend
    }

    /// The backend's capabilities.
    pub fn capabilities(&self) -> Capabilities {
        self.inner.caps
    }

    /// The counters of everything this queue did.
    pub fn stats(&self) -> Stats {
        self.inner.recorder.total.snapshot()
    }

    /// The counters of one topic (a priority lane counts under its lane topic, dead-letter
    /// operations under the topic given to them).
    pub fn topic_stats(&self, topic: &str) -> Stats {
        self.inner
            .recorder
            .topics
            .lock()
            .get(topic)
            .map(|c| c.snapshot())
            .unwrap_or_default()
    }

    fn native_priority(&self) -> bool {
        self.inner.caps.priority == Support::Native
    }

    /// The topics of `topic`'s priority lanes, highest first (one topic with native priorities).
    pub fn lane_topics(&self, topic: &str) -> Vec<String> {
        if self.native_priority() {
            vec![topic.to_string()]
        } else {
            Priority::ALL.iter().map(|p| p.lane_topic(topic)).collect()
        }
    }

    /// Publishes `message` to `topic`: to its priority lane ([`BackendMessage::with_priority`]),
    /// unless the same id was published to this topic within the de-duplication window.
    ///
    /// A publish that failed [in doubt](BackendError::InDoubt) is sent again with the same id
    /// (up to [`QueueConfig::in_doubt_retries`]) where the backend de-duplicates natively;
    /// elsewhere the in-doubt error is returned (the message may be stored).
    pub async fn publish(&self, topic: &str, mut message: BackendMessage) -> Result<Published> {
        let inner = &self.inner;
        let target = if self.native_priority() {
            topic.to_string()
        } else {
            message.priority().lane_topic(topic)
        };
        let emulate_dedup =
            inner.caps.dedup != Support::Native && !inner.config.dedup_window.is_zero();
        let key = format!("{topic}\u{0}{}", dedup_key(&message));
        if emulate_dedup && !inner.published.lock().insert(key.clone()) {
            inner.recorder.record(&target, Event::Deduplicated);
            return Ok(Published::Duplicate { id: message.id });
        }
        // A resend of an in-doubt publish is safe only where the backend drops a second copy.
        let mut resends = if inner.caps.dedup == Support::Native {
            inner.config.in_doubt_retries
        } else {
            0
        };
        loop {
            let copy = (resends > 0).then(|| message.clone());
            match inner.backend.publish(&target, message).await {
                Ok(ack) => {
                    inner.recorder.record(&target, Event::Published);
                    return Ok(Published::Stored(ack));
                }
                Err(e) => match copy {
                    Some(copy) if e.is_in_doubt() => {
                        tracing::debug!(error = %e, topic, "publish in doubt: sending it again");
                        resends -= 1;
                        message = copy;
                    }
                    _ => {
                        // In doubt, the caller may publish it again: the id window must let
                        // that through (consumer-side de-duplication drops a second copy).
                        if emulate_dedup {
                            inner.published.lock().remove(&key);
                        }
                        return Err(e);
                    }
                },
            }
        }
    }

    /// Subscribes to every priority lane of `options.filter` (see the [module docs](self)).
    pub async fn subscribe(&self, options: SubscribeOptions) -> Result<QueueSubscription> {
        options.validate()?;
        let inner = &self.inner;
        let user_max = options.max_attempts;
        let emulated_delay = inner.caps.delayed_delivery != Support::Native;
        let filters = if self.native_priority() || options.filter.ends_with('#') {
            vec![options.filter.clone()]
        } else {
            Priority::ALL
                .iter()
                .map(|p| p.lane_topic(&options.filter))
                .collect()
        };
        // Deferrals (of messages not due yet, and of held lane heads) are nacks that must not
        // use up attempts: ask the backend for more.
        let mut backend_options = options.clone();
        if emulated_delay || filters.len() > 1 {
            backend_options.max_attempts = user_max.saturating_add(DEFER_ALLOWANCE);
        }
        let mut lanes = Vec::with_capacity(filters.len());
        let started = tokio::time::Instant::now();
        for filter in filters {
            let mut o = backend_options.clone();
            o.filter = filter;
            match inner.backend.subscribe(o).await {
                Ok(sub) => lanes.push(Lane {
                    sub,
                    head: None,
                    seen_empty: true,
                    ready_since: started,
                }),
                Err(e) => {
                    for lane in lanes {
                        let _ = lane.sub.close().await;
                    }
                    return Err(e);
                }
            }
        }
        let mut sub = QueueSubscription {
            lanes,
            recorder: inner.recorder.for_subscription(),
            max_attempts: user_max,
            backend_max_attempts: backend_options.max_attempts,
            ack_timeout: options.ack_timeout,
            look_ahead: inner
                .config
                .priority_look_ahead
                .min(options.ack_timeout / 4),
            stale_after: options.ack_timeout / STALE_DIVISOR,
            deferrals: self.deferrals_for(&options),
            handled: inner
                .config
                .consumer_dedup
                .then(|| Arc::new(Mutex::new(IdWindow::new(None, inner.config.dedup_capacity)))),
        };
        if sub.lanes.len() > 1 {
            // Start every lane now (a NATS pull consumer sends its first pull request when first
            // polled), so that the first `next` sees what was published meanwhile on each lane.
            if let Err(e) = sub.fill() {
                let _ = sub.close().await;
                return Err(e);
            }
        }
        Ok(sub)
    }

    /// The deferral records of a new subscription: its group's (shared with the group's other
    /// subscriptions through this queue), or its own for a fanout subscription.
    fn deferrals_for(&self, options: &SubscribeOptions) -> Arc<Mutex<Deferrals>> {
        let capacity = self.inner.config.dedup_capacity;
        let Some(group) = &options.group else {
            return Arc::new(Mutex::new(Deferrals::new(capacity)));
        };
        let mut groups = self.inner.group_deferrals.lock();
        let key = format!("{group}\u{0}{}", options.filter);
        if let Some(d) = groups.get(&key) {
            return d.clone();
        }
        if groups.len() >= IDLE_GROUP_DEFERRALS {
            // Forget the records of groups without a subscription (or delivery) left.
            groups.retain(|_, d| Arc::strong_count(d) > 1);
        }
        let d = Arc::new(Mutex::new(Deferrals::new(capacity)));
        groups.insert(key, d.clone());
        d
    }

    /// Runs `handler` on every delivery of a subscription (see [`Worker`]): `Ok` acknowledges,
    /// an error nacks with `backoff`'s delay for the attempt (the `n`th retry waits
    /// `backoff.delay(n - 1)`), or dead-letters with the error's text as the reason on the last
    /// attempt or when it is a [`Permanent`] error. Handlers are called concurrently (up to the
    /// subscription's prefetch); wrap them in tower layers (`TimeoutLayer`,
    /// `ConcurrencyLimitLayer`, `RateLimitLayer`...) as needed.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), ferry_backends::BackendError> {
    /// use std::time::Duration;
    /// use ferry_backends::{connect, BackendMessage, Backoff, BoxError, Job, Permanent, Queue,
    ///     SubscribeOptions};
    ///
    /// let queue = Queue::new(connect("memory://").await?);
    /// let handler = tower::ServiceBuilder::new()
    ///     .timeout(Duration::from_secs(5))
    ///     .service_fn(|job: Job| async move {
    ///         if job.payload.is_empty() {
    ///             return Err::<(), BoxError>(Permanent::new("empty order").into());
    ///         }
    ///         Ok(())
    ///     });
    /// let worker = queue
    ///     .serve(
    ///         SubscribeOptions::new("orders").group("billing").max_attempts(5),
    ///         Backoff::exponential(Duration::from_millis(100)).with_jitter(0.2),
    ///         handler,
    ///     )
    ///     .await?;
    /// queue.publish("orders", BackendMessage::new("")).await?;
    /// # for _ in 0..100 {
    /// #     if worker.stats().dead_lettered == 1 { break; }
    /// #     tokio::time::sleep(Duration::from_millis(10)).await;
    /// # }
    /// // ... later: the empty order is in the dead letters, with reason "empty order".
    /// worker.stop().await?;
    /// let letters = queue.dead_letters("orders", 10).await?;
    /// assert_eq!(letters[0].reason, "empty order");
    /// # Ok(()) }
    /// ```
    pub async fn serve<S>(
        &self,
        options: SubscribeOptions,
        backoff: Backoff,
        handler: S,
    ) -> Result<Worker>
    where
        S: Service<Job, Response = ()> + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let sub = self.subscribe(options).await?;
        let stats = sub.recorder.sub.clone().unwrap_or_default();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve_loop(sub, backoff, handler, cancel.clone()));
        Ok(Worker {
            cancel,
            task,
            stats,
        })
    }

    /// Up to `max` dead letters of `topic` (all its priority lanes), oldest first per lane, with
    /// their reasons. They stay dead letters.
    pub async fn dead_letters(&self, topic: &str, max: usize) -> Result<Vec<DeadLetterInfo>> {
        let mut out = Vec::new();
        for lane in self.lane_topics(topic) {
            if out.len() >= max {
                break;
            }
            let mut sub = self.inner.backend.dead_letters(&lane).await?;
            let mut held = Vec::new();
            let mut seen = HashSet::new();
            while out.len() < max {
                let Some(d) = next_within(&mut sub, self.inner.config.drain_idle).await? else {
                    break;
                };
                if seen.insert(d.id.clone()) {
                    out.push(DeadLetterInfo::from_delivery(&d));
                }
                // Held unsettled until the subscription is closed, so that it is not handed
                // over again in this listing.
                held.push(d);
            }
            let _ = sub.close().await;
            drop(held);
        }
        Ok(out)
    }

    /// Moves up to `max` dead letters of `topic` (all its priority lanes) back to their source
    /// topic, without the dead-letter headers and with fresh attempts. Returns how many.
    pub async fn redrive(&self, topic: &str, max: usize) -> Result<usize> {
        let mut n = 0;
        for lane in self.lane_topics(topic) {
            if n >= max {
                break;
            }
            let k = self
                .inner
                .backend
                .redrive_dead_letters(&lane, max - n)
                .await?;
            self.inner
                .recorder
                .record_n(&lane, Event::Redriven, k as u64);
            n += k;
        }
        Ok(n)
    }

    /// Deletes the dead letters of `topic` (all its priority lanes). Returns how many.
    pub async fn purge(&self, topic: &str) -> Result<usize> {
        let mut n = 0;
        for lane in self.lane_topics(topic) {
            n += self.inner.backend.purge_dead_letters(&lane).await?;
        }
        Ok(n)
    }
}

/// In-memory deferral counts of one subscription, by message key, bounded; and when messages it
/// nacked with a delay are due again.
#[derive(Debug)]
struct Deferrals {
    capacity: usize,
    counts: HashMap<String, u32>,
    order: VecDeque<String>,
    retry_at: HashMap<String, SystemTime>,
    retry_order: VecDeque<String>,
}

impl Deferrals {
    fn new(capacity: usize) -> Self {
        Deferrals {
            capacity: capacity.max(1),
            counts: HashMap::new(),
            order: VecDeque::new(),
            retry_at: HashMap::new(),
            retry_order: VecDeque::new(),
        }
    }

    /// A nack with a delay: not to be handed over again before `at`.
    fn retry_at(&mut self, key: &str, at: SystemTime) {
        if self.retry_at.insert(key.to_string(), at).is_none() {
            self.retry_order.push_back(key.to_string());
            while self.retry_order.len() > self.capacity {
                if let Some(old) = self.retry_order.pop_front() {
                    self.retry_at.remove(&old);
                }
            }
        }
    }

    /// When a message nacked with a delay is due again (`None` once it is, or nearly: timers
    /// and the wall clock differ by a few milliseconds).
    fn due(&mut self, key: &str, now: SystemTime) -> Option<SystemTime> {
        let at = *self.retry_at.get(key)?;
        if at > now + Duration::from_millis(10) {
            return Some(at);
        }
        self.retry_at.remove(key);
        self.retry_order.retain(|k| k != key);
        None
    }

    fn get(&self, key: &str) -> u32 {
        self.counts.get(key).copied().unwrap_or(0)
    }

    fn bump(&mut self, key: &str) {
        match self.counts.get_mut(key) {
            Some(c) => *c = c.saturating_add(1),
            None => {
                self.counts.insert(key.to_string(), 1);
                self.order.push_back(key.to_string());
                while self.order.len() > self.capacity {
                    if let Some(old) = self.order.pop_front() {
                        self.counts.remove(&old);
                    }
                }
            }
        }
    }
}

/// A held lane head goes stale (and is returned to the backend) after `ack_timeout /
/// STALE_DIVISOR`, well before the backend would redeliver it; more than the look-ahead (at most
/// a quarter of the ack timeout), so that a head is not returned while waiting its turn.
const STALE_DIVISOR: u32 = 3;

/// A delivery taken from a lane and not handed over yet.
struct Held {
    delivery: Delivery,
    key: String,
    attempt: u32,
    /// When it was taken from its lane (it goes stale from then).
    taken: tokio::time::Instant,
    /// Stale but out of deferrals: handed over next, whatever its lane.
    overdue: bool,
}

/// One priority lane of a [`QueueSubscription`]: the backend subscription and at most one
/// delivery taken from it.
struct Lane {
    sub: Box<dyn BackendSubscription>,
    head: Option<Held>,
    /// Whether the lane was last seen with nothing ready.
    seen_empty: bool,
    /// Since when the lane has had deliveries ready without a gap (its look-ahead runs from
    /// then).
    ready_since: tokio::time::Instant,
}

/// A lane's `next`, as [`QueueSubscription::wait`] polls it.
type LaneNext<'a> = Pin<Box<dyn Future<Output = Result<Delivery>> + Send + 'a>>;

/// Why [`QueueSubscription::wait`] returned.
enum Woken {
    /// Lane `.0` has a delivery (or failed).
    Lane(usize, Result<Delivery>),
    /// The look-ahead window is over.
    Deadline,
}

/// Returns a held lane head to the backend for redelivery (a nack without delay that does not
/// count as an attempt), or gives it back when its deferrals are used up.
fn release(
    deferrals: &Mutex<Deferrals>,
    backend_max_attempts: u32,
    held: Held,
) -> std::result::Result<impl Future<Output = Result<()>> + Send + 'static, Box<Held>> {
    // The backend dead-letters a nack on its last attempt: keep the one before it for a
    // hand-over.
    if held.delivery.attempt() >= backend_max_attempts.saturating_sub(1) {
        return Err(Box::new(held));
    }
    deferrals.lock().bump(&held.key);
    Ok(held.delivery.nack(None))
}

/// A subscription through a [`Queue`]: over every priority lane, higher lanes first, with
/// expired, early and duplicate messages held back (see the [module docs](self)). Its
/// deliveries count in the queue's stats when settled.
///
/// Over emulated priority lanes it holds at most one delivery per lane (the lane's head) until
/// it hands it over; heads still held when it is closed or dropped, or held for a third of the
/// ack timeout, are returned to the backend for redelivery without counting as an attempt.
pub struct QueueSubscription {
    lanes: Vec<Lane>,
    recorder: Recorder,
    max_attempts: u32,
    backend_max_attempts: u32,
    ack_timeout: Duration,
    look_ahead: Duration,
    stale_after: Duration,
    deferrals: Arc<Mutex<Deferrals>>,
    handled: Option<Arc<Mutex<IdWindow>>>,
}

impl std::fmt::Debug for QueueSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueSubscription")
            .field("lanes", &self.lanes.len())
            .field(
                "held",
                &self.lanes.iter().filter(|l| l.head.is_some()).count(),
            )
            .field("max_attempts", &self.max_attempts)
            .field("look_ahead", &self.look_ahead)
            .finish()
    }
}

/// Settles `d` in a task (so that [`QueueSubscription::next`] stays cancel-safe).
fn settle_in_background<F>(what: &'static str, fut: F)
where
    F: Future<Output = Result<()>> + Send + 'static,
{
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!("queue: no runtime to settle a held-back delivery ({what}) on");
        return;
    };
    runtime.spawn(async move {
        if let Err(e) = fut.await {
            tracing::warn!(error = %e, "queue: settling a held-back delivery ({what}) failed");
        }
    });
}

impl QueueSubscription {
    /// This subscription's counters.
    pub fn stats(&self) -> Stats {
        self.recorder
            .sub
            .as_ref()
            .map(|c| c.snapshot())
            .unwrap_or_default()
    }

    /// The next delivery to hand over: the highest lane's held head, once it is the top lane,
    /// or the lanes above it stayed empty for the look-ahead. Cancel-safe: what was taken from
    /// the lanes stays held.
    pub async fn next(&mut self) -> Result<Delivery> {
        if self.lanes.is_empty() {
            return Err(BackendError::Closed);
        }
        loop {
            self.return_stale();
            self.fill()?;
            let overdue = self
                .lanes
                .iter()
                .position(|l| l.head.as_ref().is_some_and(|h| h.overdue));
            let best = overdue.or_else(|| self.lanes.iter().position(|l| l.head.is_some()));
            let deadline = match best {
                None => None,
                Some(i) => {
                    let until = self.lanes[i].ready_since + self.look_ahead;
                    if i == 0 || overdue.is_some() || tokio::time::Instant::now() >= until {
                        if let Some(d) = self.hand_over(i) {
                            return Ok(d);
                        }
                        continue;
                    }
                    Some((i, until))
                }
            };
            match self.wait(deadline).await {
                Woken::Lane(i, Ok(d)) => self.take(i, d),
                Woken::Lane(_, Err(e)) => return Err(e),
                Woken::Deadline => {}
            }
        }
    }

    /// Takes a head from every lane without one, as far as deliveries are ready now.
    fn fill(&mut self) -> Result<()> {
        for i in 0..self.lanes.len() {
            while self.lanes[i].head.is_none() {
                let ready = self.lanes[i].sub.next().now_or_never();
                match ready {
                    None => {
                        self.lanes[i].seen_empty = true;
                        break;
                    }
                    Some(Ok(d)) => self.take(i, d),
                    Some(Err(e)) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Waits for a delivery on the empty lanes above `deadline`'s lane (every lane without a
    /// deadline), or for the deadline.
    async fn wait(&mut self, deadline: Option<(usize, tokio::time::Instant)>) -> Woken {
        let above = deadline.map_or(self.lanes.len(), |(i, _)| i);
        let mut pending: Vec<(usize, LaneNext<'_>)> = self.lanes[..above]
            .iter_mut()
            .enumerate()
            .filter(|(_, l)| l.head.is_none())
            .map(|(i, l)| (i, l.sub.next()))
            .collect();
        let mut sleep = deadline.map(|(_, at)| Box::pin(tokio::time::sleep_until(at)));
        std::future::poll_fn(move |cx| {
            for (i, f) in &mut pending {
                if let Poll::Ready(r) = f.as_mut().poll(cx) {
                    return Poll::Ready(Woken::Lane(*i, r));
                }
            }
            if let Some(s) = &mut sleep {
                if s.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Woken::Deadline);
                }
            }
            Poll::Pending
        })
        .await
    }

    /// A delivery from lane `i`: held as its head unless it is not to be handed over.
    fn take(&mut self, i: usize, d: Delivery) {
        let now = tokio::time::Instant::now();
        let head = self.admit(d).map(|(delivery, key, attempt)| Held {
            delivery,
            key,
            attempt,
            taken: now,
            overdue: false,
        });
        if let Some(lane) = self.lanes.get_mut(i) {
            if lane.seen_empty {
                lane.seen_empty = false;
                lane.ready_since = now;
            }
            lane.head = head;
        }
    }

    /// Checks a delivery: expired, duplicate, not due yet or past `max_attempts`, it is settled
    /// here (in the background) and `None` returned; else the delivery, its de-duplication key
    /// and its attempt (deferrals not counted).
    fn admit(&self, d: Delivery) -> Option<(Delivery, String, u32)> {
        let now = SystemTime::now();
        let topic = d.topic().to_string();
        if d.expires_at().is_some_and(|at| at <= now) {
            self.recorder.record(&topic, Event::Expired);
            settle_in_background("expired", d.ack());
            return None;
        }
        let key = dedup_key(d.message());
        if let Some(handled) = &self.handled {
            if handled.lock().contains(&key) {
                self.recorder.record(&topic, Event::Deduplicated);
                settle_in_background("duplicate", d.ack());
                return None;
            }
        }
        // Due by its delay header, and (when the backend capped a retry's nack delay, as Redis
        // does at the ack timeout) by the retry delay this subscription's group asked for.
        let retry_due = self.deferrals.lock().due(&key, now);
        let due = d.deliver_at().into_iter().chain(retry_due).max();
        if let Some(at) = due {
            if let Ok(left) = at.duration_since(now) {
                if !left.is_zero() {
                    self.defer(d, &key, left);
                    return None;
                }
            }
        }
        let deferred = self.deferrals.lock().get(&key);
        let attempt = d.attempt().saturating_sub(deferred).max(1);
        if attempt > self.max_attempts {
            // Its last attempt timed out: dead-letter it, as the backend would have.
            self.recorder.record(&topic, Event::DeadLettered);
            settle_in_background("past max_attempts", d.reject("max_attempts"));
            return None;
        }
        Some((d, key, attempt))
    }

    /// Hands lane `i`'s head over.
    fn hand_over(&mut self, i: usize) -> Option<Delivery> {
        let held = self.lanes.get_mut(i)?.head.take()?;
        let d = held.delivery;
        self.recorder.record(d.topic(), Event::Delivered);
        let (message, topic, _, acker) = d.into_parts();
        let acker = QueueAcker {
            inner: Some(acker),
            recorder: self.recorder.clone(),
            topic: topic.clone(),
            attempt: held.attempt,
            max_attempts: self.max_attempts,
            key: held.key,
            handled: self.handled.clone(),
            deferrals: self.deferrals.clone(),
            enforce_retry_delay: self.backend_max_attempts > self.max_attempts,
        };
        Some(Delivery::new(message, topic, held.attempt, Box::new(acker)))
    }

    /// Returns the heads held for too long to the backend (for redelivery, as a deferral), so
    /// that they do not reach their ack timeout here. A head out of deferrals stays, overdue.
    fn return_stale(&mut self) {
        let now = tokio::time::Instant::now();
        for lane in &mut self.lanes {
            let stale = lane
                .head
                .as_ref()
                .is_some_and(|h| !h.overdue && now.duration_since(h.taken) >= self.stale_after);
            if !stale {
                continue;
            }
            let Some(held) = lane.head.take() else {
                continue;
            };
            match release(&self.deferrals, self.backend_max_attempts, held) {
                Ok(nack) => settle_in_background("stale lane head", nack),
                Err(mut held) => {
                    held.overdue = true;
                    lane.head = Some(*held);
                }
            }
        }
    }

    /// Not due yet: nack it again with (about) the time left, without it counting as an attempt.
    fn defer(&self, d: Delivery, key: &str, left: Duration) {
        if d.attempt() >= self.backend_max_attempts.saturating_sub(1) {
            self.recorder.record(d.topic(), Event::DeadLettered);
            settle_in_background(
                "deferral allowance",
                d.reject("delay exceeds the deferral allowance"),
            );
            return;
        }
        self.deferrals.lock().bump(key);
        // Redis caps nack delays at the ack timeout; the others wait the whole delay.
        let delay = coarse(left.min(self.ack_timeout.max(Duration::from_millis(1))));
        settle_in_background("deferral", d.nack(Some(delay)));
    }

    /// Takes the held lane heads out of the lanes, as nacks that return them to the backend
    /// (a head out of deferrals is dropped here, with its delivery).
    fn release_heads(&mut self) -> Vec<impl Future<Output = Result<()>> + Send + 'static> {
        let (deferrals, backend_max_attempts) = (&self.deferrals, self.backend_max_attempts);
        self.lanes
            .iter_mut()
            .filter_map(|lane| lane.head.take())
            .filter_map(|held| release(deferrals, backend_max_attempts, held).ok())
            .collect()
    }

    /// Returns the held lane heads to the backend, then leaves every lane.
    pub async fn close(mut self) -> Result<()> {
        for nack in self.release_heads() {
            if let Err(e) = nack.await {
                tracing::warn!(error = %e, "queue: returning a held lane head failed");
            }
        }
        let mut first_error = None;
        for lane in std::mem::take(&mut self.lanes) {
            if let Err(e) = lane.sub.close().await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for QueueSubscription {
    fn drop(&mut self) {
        // Return the held lane heads before the lanes go: as far as the nack goes without
        // waiting now, the rest in the background.
        for nack in self.release_heads() {
            let mut nack = Box::pin(nack);
            match (&mut nack).now_or_never() {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "queue: returning a held lane head failed");
                }
                None => settle_in_background("held lane head", nack),
            }
        }
    }
}

/// Counts settlements and enforces `max_attempts` for deliveries of a [`QueueSubscription`].
struct QueueAcker {
    inner: Option<Box<dyn Acker>>,
    recorder: Recorder,
    topic: String,
    attempt: u32,
    max_attempts: u32,
    key: String,
    handled: Option<Arc<Mutex<IdWindow>>>,
    deferrals: Arc<Mutex<Deferrals>>,
    enforce_retry_delay: bool,
}

impl QueueAcker {
    fn take(&mut self) -> Result<Box<dyn Acker>> {
        self.recorder.record(&self.topic, Event::Settled);
        self.inner.take().ok_or(BackendError::Stale)
    }
}

impl Drop for QueueAcker {
    fn drop(&mut self) {
        if self.inner.is_some() {
            // Dropped unsettled: no longer in this process's hands.
            self.recorder.record(&self.topic, Event::Settled);
        }
    }
}

#[async_trait]
impl Acker for QueueAcker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        let inner = self.take()?;
        inner.ack().await?;
        self.recorder.record(&self.topic, Event::Acked);
        if let Some(h) = &self.handled {
            h.lock().insert(self.key.clone());
        }
        Ok(())
    }

    async fn nack(mut self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        let inner = self.take()?;
        if self.attempt >= self.max_attempts {
            inner.reject("max_attempts".into()).await?;
            self.recorder.record(&self.topic, Event::DeadLettered);
            return Ok(());
        }
        let delay = delay.map(coarse);
        // Only where deferrals are allowed for (emulated delays): the embedded engine's nack
        // delays are exact.
        if let Some(d) = delay.filter(|d| !d.is_zero() && self.enforce_retry_delay) {
            self.deferrals
                .lock()
                .retry_at(&self.key, SystemTime::now() + d);
        }
        inner.nack(delay).await?;
        self.recorder.record(&self.topic, Event::Nacked);
        Ok(())
    }

    async fn reject(mut self: Box<Self>, reason: String) -> Result<()> {
        let inner = self.take()?;
        inner.reject(reason).await?;
        self.recorder.record(&self.topic, Event::DeadLettered);
        Ok(())
    }
}

/// What a handler of [`Queue::serve`] gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The message.
    pub message: BackendMessage,
    /// The topic it was published to (its priority lane's topic).
    pub topic: String,
    /// Which attempt this is, from 1 (deferrals of delayed messages not counted).
    pub attempt: u32,
}

impl std::ops::Deref for Job {
    type Target = BackendMessage;
    fn deref(&self) -> &BackendMessage {
        &self.message
    }
}

/// A running [`Queue::serve`]: stop it with [`stop`](Self::stop).
#[derive(Debug)]
pub struct Worker {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<Result<()>>,
    stats: Arc<Counters>,
}

impl Worker {
    /// The counters of this worker's subscription.
    pub fn stats(&self) -> Stats {
        self.stats.snapshot()
    }

    /// Whether it stopped (stopped, or its subscription ended).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops taking deliveries, waits for the handler calls under way to finish and be settled,
    /// and leaves the subscription. Returns the error that ended it, if any.
    pub async fn stop(self) -> Result<()> {
        self.cancel.cancel();
        self.task
            .await
            .map_err(|e| BackendError::backend("queue", "worker", e))?
    }
}

async fn serve_loop<S>(
    mut sub: QueueSubscription,
    backoff: Backoff,
    mut handler: S,
    cancel: CancellationToken,
) -> Result<()>
where
    S: Service<Job, Response = ()> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let mut calls = JoinSet::new();
    let mut outcome = Ok(());
    let mut failures = 0u32;
    loop {
        while calls.try_join_next().is_some() {}
        let next = tokio::select! {
            () = cancel.cancelled() => break,
            d = sub.next() => d,
        };
        let d = match next {
            Ok(d) => {
                failures = 0;
                d
            }
            Err(BackendError::Closed) => break,
            Err(e) if failures < 50 => {
                failures += 1;
                tracing::warn!(error = %e, "queue worker: receiving failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => {
                outcome = Err(e);
                break;
            }
        };
        let ready = tokio::select! {
            () = cancel.cancelled() => break,
            r = handler.ready() => r.map(|_| ()).map_err(Into::into),
        };
        let topic = d.topic().to_string();
        if let Err(e) = ready {
            sub.recorder.record(&topic, Event::HandlerError);
            calls.spawn(settle(d, Err(e), backoff, sub.max_attempts));
            continue;
        }
        let job = Job {
            message: d.message().clone(),
            topic,
            attempt: d.attempt(),
        };
        let call = handler.call(job);
        let recorder = sub.recorder.clone();
        let max_attempts = sub.max_attempts;
        calls.spawn(async move {
            let result = call.await.map_err(Into::into);
            if result.is_err() {
                recorder.record(d.topic(), Event::HandlerError);
            }
            settle(d, result, backoff, max_attempts).await;
        });
    }
    while calls.join_next().await.is_some() {}
    let closed = sub.close().await;
    outcome.and(closed)
}

/// Settles one handled delivery.
async fn settle(d: Delivery, result: Result<(), BoxError>, backoff: Backoff, max_attempts: u32) {
    let id = d.id.clone();
    let attempt = d.attempt();
    let settled = match result {
        Ok(()) => d.ack().await,
        Err(e) => {
            let reason = e.to_string();
            if e.downcast_ref::<Permanent>().is_some() || attempt >= max_attempts {
                d.reject(reason).await
            } else {
                d.nack(Some(backoff.delay(attempt.saturating_sub(1)))).await
            }
        }
    };
    if let Err(e) = settled {
        tracing::warn!(error = %e, id, "queue worker: settling a delivery failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarse_delays_round_down_by_at_most_an_eighth() {
        assert_eq!(coarse(Duration::from_millis(5)), Duration::from_millis(5));
        assert_eq!(coarse(Duration::ZERO), Duration::from_millis(1));
        for ms in [16u64, 17, 100, 999, 1000, 1234, 65_000, 3_600_000] {
            let c = coarse(Duration::from_millis(ms));
            assert!(c <= Duration::from_millis(ms), "{ms}: {c:?}");
            assert!(c >= Duration::from_millis(ms - ms / 8), "{ms}: {c:?}");
        }
        // Few distinct values per octave.
        let distinct: HashSet<Duration> = (1024..2048)
            .map(|ms| coarse(Duration::from_millis(ms)))
            .collect();
        assert_eq!(distinct.len(), 8);
    }

    #[test]
    fn id_window_evicts_oldest_beyond_capacity() {
        let mut w = IdWindow::new(None, 2);
        assert!(w.insert("a".into()));
        assert!(!w.insert("a".into()));
        assert!(w.insert("b".into()));
        assert!(w.insert("c".into()));
        assert!(!w.contains("a"));
        assert!(w.contains("b") && w.contains("c"));
        w.remove("b");
        assert!(!w.contains("b"));
    }

    #[test]
    fn id_window_forgets_after_the_window() {
        let mut w = IdWindow::new(Some(Duration::ZERO), 10);
        assert!(w.insert("a".into()));
        assert!(w.insert("a".into()), "a zero window remembers nothing");
    }

    #[test]
    fn retry_delays_are_due_once_passed() {
        let mut d = Deferrals::new(2);
        let now = SystemTime::now();
        d.retry_at("a", now + Duration::from_secs(1));
        assert_eq!(d.due("a", now), Some(now + Duration::from_secs(1)));
        assert_eq!(d.due("a", now + Duration::from_secs(1)), None);
        assert_eq!(d.due("a", now), None, "forgotten once due");
        d.bump("x");
        d.bump("x");
        assert_eq!(d.get("x"), 2);
        d.bump("y");
        d.bump("z");
        assert_eq!(d.get("x"), 0, "evicted beyond capacity");
    }

    #[test]
    fn redriven_messages_are_not_duplicates_of_their_first_life() {
        let m = BackendMessage::new("x").with_id("m1");
        let r = m.clone().with_header(REDRIVEN_HEADER, "1");
        assert_ne!(dedup_key(&m), dedup_key(&r));
    }

    /// Priority-lane tests: the embedded engine (in memory) with its priorities left to the
    /// queue, so that the queue's lanes are separate topics there, as on NATS or RabbitMQ. It
    /// records the backend's own attempt count of every delivery it hands to the queue.
    mod lanes {
        use super::*;
        use crate::adapters::embedded::EmbeddedBackend;

        type Seen = Arc<Mutex<Vec<(String, u32)>>>;

        #[derive(Debug)]
        struct EmulatedLanes {
            engine: EmbeddedBackend,
            seen: Seen,
        }

        struct Recording {
            sub: Box<dyn BackendSubscription>,
            seen: Seen,
        }

        #[async_trait]
        impl BackendSubscription for Recording {
            async fn next(&mut self) -> Result<Delivery> {
                let d = self.sub.next().await?;
                self.seen.lock().push((
                    String::from_utf8_lossy(&d.payload).into_owned(),
                    d.attempt(),
                ));
                Ok(d)
            }

            async fn close(self: Box<Self>) -> Result<()> {
                self.sub.close().await
            }
        }

        #[async_trait]
        impl Backend for EmulatedLanes {
            fn name(&self) -> &'static str {
                "emulated-lanes"
            }

            fn capabilities(&self) -> Capabilities {
                Capabilities {
                    priority: Support::Emulated,
                    ..EmbeddedBackend::capabilities()
                }
            }

            async fn publish(&self, topic: &str, message: BackendMessage) -> Result<PublishAck> {
                self.engine.publish(topic, message).await
            }

            async fn publish_batch(
                &self,
                topic: &str,
                messages: Vec<BackendMessage>,
            ) -> Result<Vec<PublishAck>> {
                self.engine.publish_batch(topic, messages).await
            }

            async fn subscribe(
                &self,
                mut options: SubscribeOptions,
            ) -> Result<Box<dyn BackendSubscription>> {
                // An engine group has one filter: a group per lane, as NATS makes.
                if let Some(g) = &mut options.group {
                    *g = format!("{g}@{}", options.filter);
                }
                Ok(Box::new(Recording {
                    sub: self.engine.subscribe(options).await?,
                    seen: self.seen.clone(),
                }))
            }

            async fn dead_letters(&self, topic: &str) -> Result<Box<dyn BackendSubscription>> {
                self.engine.dead_letters(topic).await
            }

            async fn redrive_dead_letters(&self, topic: &str, max: usize) -> Result<usize> {
                self.engine.redrive_dead_letters(topic, max).await
            }

            async fn purge_dead_letters(&self, topic: &str) -> Result<usize> {
                self.engine.purge_dead_letters(topic).await
            }

            async fn delete_topic(&self, topic: &str) -> Result<()> {
                self.engine.delete_topic(topic).await
            }

            async fn close(&self) -> Result<()> {
                self.engine.close().await
            }
        }

        /// A queue over emulated lanes, and what the backend delivered to it.
        fn queue(look_ahead: Duration) -> (Queue, Seen) {
            let seen = Seen::default();
            let backend = EmulatedLanes {
                engine: EmbeddedBackend::memory(1000),
                seen: seen.clone(),
            };
            let config = QueueConfig {
                priority_look_ahead: look_ahead,
                ..QueueConfig::default()
            };
            (Queue::with_config(Arc::new(backend), config), seen)
        }

        fn msg(payload: &'static str, priority: Priority) -> BackendMessage {
            BackendMessage::new(payload).with_priority(priority)
        }

        fn text(d: &Delivery) -> String {
            String::from_utf8_lossy(&d.payload).into_owned()
        }

        /// The next delivery (a second of paused time at most), acknowledged; its payload and
        /// attempt.
        async fn take(sub: &mut QueueSubscription) -> Result<(String, u32)> {
            let d = tokio::time::timeout(Duration::from_secs(1), sub.next())
                .await
                .map_err(|_| BackendError::Invalid("no delivery within 1 s".into()))??;
            let got = (text(&d), d.attempt());
            d.ack().await?;
            Ok(got)
        }

        /// The backend's attempt counts of the deliveries of `payload` it handed to the queue.
        fn backend_attempts(seen: &Seen, payload: &str) -> Vec<u32> {
            seen.lock()
                .iter()
                .filter(|(p, _)| p == payload)
                .map(|(_, a)| *a)
                .collect()
        }

        fn publish_later(q: &Queue, after: Duration, m: BackendMessage) {
            let q = q.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                q.publish("jobs", m).await
            });
        }

        fn options() -> SubscribeOptions {
            SubscribeOptions::new("jobs").group("workers")
        }

        #[tokio::test(start_paused = true)]
        async fn higher_lanes_first_when_several_are_ready() -> Result<()> {
            // No look-ahead: the order comes from the lanes' held heads alone.
            let (q, _) = queue(Duration::ZERO);
            let mut sub = q.subscribe(options()).await?;
            for (payload, priority) in [
                ("low-1", Priority::Low),
                ("normal-1", Priority::Normal),
                ("low-2", Priority::Low),
                ("high-1", Priority::High),
                ("normal-2", Priority::Normal),
                ("high-2", Priority::High),
            ] {
                q.publish("jobs", msg(payload, priority)).await?;
            }
            let mut got = Vec::new();
            for _ in 0..6 {
                got.push(take(&mut sub).await?.0);
            }
            assert_eq!(
                got,
                ["high-1", "high-2", "normal-1", "normal-2", "low-1", "low-2"]
            );
            Ok(())
        }

        #[tokio::test(start_paused = true)]
        async fn look_ahead_waits_for_a_higher_lane_within_the_window() -> Result<()> {
            let (q, _) = queue(Duration::from_millis(25));
            let mut sub = q.subscribe(options()).await?;

            // A higher delivery 10 ms behind a lower one goes first.
            q.publish("jobs", msg("low", Priority::Low)).await?;
            publish_later(&q, Duration::from_millis(10), msg("high", Priority::High));
            let start = tokio::time::Instant::now();
            assert_eq!(take(&mut sub).await?.0, "high");
            assert_eq!(start.elapsed(), Duration::from_millis(10));
            assert_eq!(take(&mut sub).await?.0, "low");

            // One 40 ms behind does not: the lower one waits the window, no longer.
            q.publish("jobs", msg("normal", Priority::Normal)).await?;
            publish_later(&q, Duration::from_millis(40), msg("late", Priority::High));
            let start = tokio::time::Instant::now();
            assert_eq!(take(&mut sub).await?.0, "normal");
            assert_eq!(start.elapsed(), Duration::from_millis(25));
            assert_eq!(take(&mut sub).await?.0, "late");
            assert_eq!(start.elapsed(), Duration::from_millis(40));

            // A lane with a backlog waits once, not once per delivery.
            for payload in ["n1", "n2", "n3"] {
                q.publish("jobs", msg(payload, Priority::Normal)).await?;
            }
            let start = tokio::time::Instant::now();
            for payload in ["n1", "n2", "n3"] {
                assert_eq!(take(&mut sub).await?.0, payload);
            }
            assert_eq!(start.elapsed(), Duration::from_millis(25));
            Ok(())
        }

        #[tokio::test(start_paused = true)]
        async fn zero_look_ahead_hands_over_at_once() -> Result<()> {
            let (q, _) = queue(Duration::ZERO);
            let mut sub = q.subscribe(options()).await?;
            q.publish("jobs", msg("low", Priority::Low)).await?;
            publish_later(&q, Duration::from_millis(10), msg("high", Priority::High));
            let start = tokio::time::Instant::now();
            assert_eq!(take(&mut sub).await?.0, "low");
            assert_eq!(start.elapsed(), Duration::ZERO);
            assert_eq!(take(&mut sub).await?.0, "high");
            assert_eq!(start.elapsed(), Duration::from_millis(10));
            Ok(())
        }

        #[tokio::test(start_paused = true)]
        async fn look_ahead_is_clamped_to_a_quarter_of_the_ack_timeout() -> Result<()> {
            let (q, _) = queue(Duration::from_secs(10));
            let mut sub = q
                .subscribe(options().ack_timeout(Duration::from_millis(200)))
                .await?;
            q.publish("jobs", msg("low", Priority::Low)).await?;
            let start = tokio::time::Instant::now();
            assert_eq!(take(&mut sub).await?.0, "low");
            assert_eq!(start.elapsed(), Duration::from_millis(50));
            Ok(())
        }

        #[tokio::test(start_paused = true)]
        async fn held_heads_return_to_another_subscriber_when_dropped() -> Result<()> {
            let (q, seen) = queue(Duration::from_millis(25));
            let opts = options().max_attempts(1);
            let mut first = q.subscribe(opts.clone()).await?;
            q.publish("jobs", msg("high", Priority::High)).await?;
            q.publish("jobs", msg("low", Priority::Low)).await?;
            assert_eq!(take(&mut first).await?, ("high".to_string(), 1));
            // "low" was taken from its lane with "high", and is held.
            assert!(format!("{first:?}").contains("held: 1"), "{first:?}");
            drop(first);

            let mut second = q.subscribe(opts).await?;
            // Returned by the first subscriber, it is the backend's second attempt, but the
            // first one that counts: not dead-lettered with max_attempts 1.
            assert_eq!(take(&mut second).await?, ("low".to_string(), 1));
            let low = backend_attempts(&seen, "low");
            assert_eq!(low, [1, 2]);
            assert_eq!(q.stats().dead_lettered, 0);
            assert!(q.dead_letters("jobs", 10).await?.is_empty());
            Ok(())
        }

        #[tokio::test(start_paused = true)]
        async fn returning_a_stale_head_does_not_count_as_an_attempt() -> Result<()> {
            let (q, seen) = queue(Duration::from_millis(25));
            // Stale after 100 ms.
            let mut sub = q
                .subscribe(
                    options()
                        .max_attempts(1)
                        .ack_timeout(Duration::from_millis(300)),
                )
                .await?;
            q.publish("jobs", msg("high", Priority::High)).await?;
            q.publish("jobs", msg("low", Priority::Low)).await?;
            assert_eq!(take(&mut sub).await?, ("high".to_string(), 1));
            // "low" is held; it goes stale while nobody asks for it, and is returned to the
            // backend (redelivered at once) by the next `next`.
            tokio::time::sleep(Duration::from_millis(150)).await;
            assert_eq!(take(&mut sub).await?, ("low".to_string(), 1));
            let low = backend_attempts(&seen, "low");
            assert_eq!(low, [1, 2], "returned to the backend once");
            let stats = sub.stats();
            assert_eq!((stats.delivered, stats.acked), (2, 2));
            assert_eq!((stats.nacked, stats.dead_lettered), (0, 0));
            Ok(())
        }

        #[tokio::test(start_paused = true)]
        async fn close_returns_held_heads() -> Result<()> {
            let (q, _) = queue(Duration::from_millis(25));
            let mut first = q.subscribe(options()).await?;
            q.publish("jobs", msg("normal", Priority::Normal)).await?;
            q.publish("jobs", msg("high", Priority::High)).await?;
            assert_eq!(take(&mut first).await?.0, "high");
            first.close().await?;
            let mut second = q.subscribe(options()).await?;
            assert_eq!(take(&mut second).await?, ("normal".to_string(), 1));
            Ok(())
        }
    }

    mod in_doubt {
        use std::sync::atomic::AtomicU32;

        use async_trait::async_trait;

        use super::*;
        use crate::adapters::embedded::EmbeddedBackend;

        /// The engine, whose first `fail` publishes end in doubt (after storing the message,
        /// as a backend whose confirmation was lost), with the given de-duplication support.
        #[derive(Debug)]
        struct Unconfirmed {
            engine: EmbeddedBackend,
            dedup: Support,
            fail: AtomicU32,
            calls: AtomicU32,
        }

        #[async_trait]
        impl Backend for Unconfirmed {
            fn name(&self) -> &'static str {
                "unconfirmed"
            }

            fn capabilities(&self) -> Capabilities {
                Capabilities {
                    dedup: self.dedup,
                    ..EmbeddedBackend::capabilities()
                }
            }

            async fn publish(&self, topic: &str, message: BackendMessage) -> Result<PublishAck> {
                self.calls.fetch_add(1, Ordering::SeqCst);
                let ack = self.engine.publish(topic, message).await?;
                let left = self.fail.load(Ordering::SeqCst);
                if left > 0 {
                    self.fail.store(left - 1, Ordering::SeqCst);
                    return Err(BackendError::in_doubt("unconfirmed", "publish", "lost ack"));
                }
                Ok(ack)
            }

            async fn publish_batch(
                &self,
                topic: &str,
                messages: Vec<BackendMessage>,
            ) -> Result<Vec<PublishAck>> {
                self.engine.publish_batch(topic, messages).await
            }

            async fn subscribe(
                &self,
                options: SubscribeOptions,
            ) -> Result<Box<dyn BackendSubscription>> {
                self.engine.subscribe(options).await
            }

            async fn dead_letters(&self, topic: &str) -> Result<Box<dyn BackendSubscription>> {
                self.engine.dead_letters(topic).await
            }

            async fn delete_topic(&self, topic: &str) -> Result<()> {
                self.engine.delete_topic(topic).await
            }

            async fn close(&self) -> Result<()> {
                self.engine.close().await
            }
        }

        fn queue(dedup: Support, fail: u32) -> (Queue, Arc<Unconfirmed>) {
            let b = Arc::new(Unconfirmed {
                engine: EmbeddedBackend::memory(100),
                dedup,
                fail: AtomicU32::new(fail),
                calls: AtomicU32::new(0),
            });
            (Queue::new(b.clone()), b)
        }

        #[tokio::test]
        async fn is_sent_again_where_the_backend_deduplicates() {
            let (q, b) = queue(Support::Native, 1);
            let r = q.publish("t", BackendMessage::new("x")).await;
            assert!(matches!(r, Ok(Published::Stored(_))), "{r:?}");
            assert_eq!(b.calls.load(Ordering::SeqCst), 2);
            // Up to `in_doubt_retries` resends, then reported.
            let (q, b) = queue(Support::Native, 10);
            let r = q.publish("t", BackendMessage::new("x")).await;
            assert!(r.as_ref().is_err_and(BackendError::is_in_doubt), "{r:?}");
            assert_eq!(b.calls.load(Ordering::SeqCst), 3);
        }

        #[tokio::test]
        async fn is_reported_elsewhere_and_may_be_published_again() {
            let (q, b) = queue(Support::Emulated, 1);
            let m = BackendMessage::new("x");
            let r = q.publish("t", m.clone()).await;
            assert!(r.as_ref().is_err_and(BackendError::is_in_doubt), "{r:?}");
            assert_eq!(b.calls.load(Ordering::SeqCst), 1);
            // The caller's retry is not dropped by the publish-side id window.
            let r = q.publish("t", m).await;
            assert!(matches!(r, Ok(Published::Stored(_))), "{r:?}");
            assert_eq!(b.calls.load(Ordering::SeqCst), 2);
        }
    }
}
