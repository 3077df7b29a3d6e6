//! The broker: topics, the subscription registry, publishing, stats and shutdown.
//!
//! [`Broker`] is a cheap handle (`Arc`) to shared state. The registry maps topic names to topics
//! and keeps every consumer's filter in a [`FilterIndex`]; filters are matched when a topic is
//! created or a subscription is made, never per publish: a publish appends to one topic's log
//! and wakes that topic's waiting consumers.
//!
//! Invariants:
//! - lock order: registry -> consumer state -> topic log;
//! - a durable broker's storage work other than buffered appends runs on its storage threads
//!   (see [`crate::io`]), never on the caller's thread nor under an engine lock: a topic's
//!   store is opened before the registry lock is taken, a time seek is looked up before the
//!   subscription takes it, and maintenance, flushes and reads behind a topic's memory window
//!   run on the I/O threads;
//! - the state only moves forward: running -> draining (no new publishes or subscriptions;
//!   subscribers keep receiving) -> closed (what is left is counted as dropped);
//! - after shutdown, for every subscription, `assigned == acked + dead_lettered + dropped`;
//! - with storage, consumer positions are saved only after the topic logs they point into
//!   were synced, and a position is never ahead of what its consumer settled.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::commit::Committer;
use crate::config::{BrokerConfig, Overflow, TopicConfig};
use crate::consumer::{AckMode, AckPolicy, Consumer, ConsumerSpec, DeadJob};
use crate::dlq::{dead_letter_message, dlq_name, DeadLetterQueue};
use crate::error::{PublishError, SubscribeError};
use crate::events::{BrokerEvent, EventReceiver};
use crate::filter::{Scope, TopicFilter};
use crate::filter_index::FilterIndex;
use crate::io::{EngineMutex, EngineRwLock, IoPool};
use crate::loaded::Loaded;
use crate::log::{AppendError, Durable, MemoryGauge, Pending, Seek, Topic};
use crate::message::{Message, Record};
use crate::stats::{
    BrokerStats, CounterSnapshot, Health, LagStats, SubscriptionStats, TopicPage, TopicStats,
};
use crate::storage::{Positions, Storage, StorageError, TopicStore};
use crate::subscription::{StartPosition, Subscription, SubscriptionBuilder};
use crate::topic::{TopicError, TopicName};
use crate::tx::{Transaction, TxError, TxState};

/// How long a finished transaction stays known by id (so that a late commit by id reports what
/// happened to it instead of "unknown").
const FORGET_FINISHED_TX: Duration = Duration::from_secs(600);

/// How many transactions are tracked before finished ones are forgotten early.
const TRACKED_TX: usize = 65_536;

/// Retention of stored topics that are not loaded runs every this many maintenance passes.
const STORED_RETENTION_EVERY: u64 = 10;
/// The most topic names a page of topic stats looks at (those the caller may not see
/// included) before it returns what it found with a cursor to go on from.
pub const PAGE_SCAN_BUDGET: usize = 50_000;

const RUNNING: u8 = 0;
const DRAINING: u8 = 1;
const CLOSED: u8 = 2;

#[derive(Default)]
struct Registry {
    topics: Loaded<Arc<Topic>>,
    configs: HashMap<TopicName, TopicConfig>,
    consumers: HashMap<u64, Arc<Consumer>>,
    groups: HashMap<String, u64>,
    index: FilterIndex<()>,
    /// The counters of topics unloaded since the broker started (their totals stay counted).
    retired: CounterSnapshot,
}

pub(crate) struct BrokerInner {
    pub(crate) config: BrokerConfig,
    registry: EngineRwLock<Registry>,
    state: AtomicU8,
    next_id: AtomicU64,
    events: broadcast::Sender<BrokerEvent>,
    epoch: Instant,
    dead_reasons: Mutex<HashMap<TopicName, BTreeMap<String, u64>>>,
    memory_pressure: AtomicBool,
    pub(crate) active_handlers: AtomicUsize,
    report: Mutex<Option<ShutdownReport>>,
    weak: Weak<BrokerInner>,
    memory: Option<Arc<MemoryGauge>>,
    transactions: Mutex<HashMap<u64, Arc<TxState>>>,
    storage: Option<Arc<dyn Storage>>,
    /// Consumer positions: those loaded at open, updated from live consumers when saved.
    positions: EngineMutex<Positions>,
    /// What was saved last (to skip writing an unchanged set). Taken only by savers, around
    /// the write, so that an older set never replaces a newer one.
    saved_positions: Mutex<Positions>,
    /// Where publishes on topics that wait for their sync wait for it (durable brokers).
    committer: Option<Committer>,
    /// Maintenance passes run so far.
    passes: AtomicU64,
    /// Held by a maintenance pass: passes run one at a time (a pass holds every topic while it
    /// collects them, which would keep another pass from unloading any).
    maintaining: Mutex<()>,
    /// Where every other storage operation that may wait for the disk runs (durable brokers).
    io: Option<IoPool>,
    /// User topics that exist (loaded, or stored for a durable broker), against
    /// `config.max_topics`: a creation reserves its place before anything is opened or written.
    user_topics: AtomicUsize,
}

/// What a durable broker runs on.
struct Durability {
    storage: Arc<dyn Storage>,
    committer: Committer,
    io: IoPool,
}

/// What shutdown found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShutdownReport {
    /// Whether every subscriber caught up (and every handler finished) before the deadline.
    pub drained: bool,
    /// Broker-wide counters after shutdown.
    #[serde(flatten)]
    pub counters: CounterSnapshot,
    /// Records that were still unread or unsettled at the deadline, counted as dropped.
    pub dropped_at_close: u64,
    /// How long shutdown took.
    #[serde(serialize_with = "crate::stats::ser_secs")]
    pub elapsed: Duration,
}

/// An in-process message broker. Clone it freely: clones share one broker.
#[derive(Clone)]
pub struct Broker {
    pub(crate) inner: Arc<BrokerInner>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("status", &self.health().status)
            .finish()
    }
}

impl Default for Broker {
    fn default() -> Self {
        Broker::new(BrokerConfig::default())
    }
}

impl Broker {
    /// A broker with `config`. Inside a Tokio runtime it also starts its maintenance task
    /// (age retention, stale-consumer detection, memory events); outside one those run only
    /// when [`Broker::maintain`] is called.
    pub fn new(config: BrokerConfig) -> Self {
        Broker::build_with(config, None, Positions::new(), 0)
    }

    /// A durable broker on the data directory `dir` with the default configuration: topics are
    /// segmented logs on disk (fsync per publish, with group commit), consumer positions and
    /// dead letters survive restarts. See [`Broker::open_with`].
    pub fn open(dir: impl AsRef<std::path::Path>) -> Result<Broker, StorageError> {
        Broker::open_with(
            dir,
            BrokerConfig::default(),
            crate::disk::DiskConfig::default(),
        )
    }

    /// A durable broker on `dir` with these settings. The data directory is opened (and its
    /// commit log scanned) on the broker's I/O threads while the calling thread waits.
    pub fn open_with(
        dir: impl AsRef<std::path::Path>,
        config: BrokerConfig,
        disk: crate::disk::DiskConfig,
    ) -> Result<Broker, StorageError> {
        let dir = dir.as_ref().to_path_buf();
        Broker::start_durable(config, move || {
            let storage = crate::disk::DiskStorage::open(dir, disk)?;
            Ok(Arc::new(storage))
        })
    }

    /// A durable broker over any [`Storage`]: loads the saved consumer positions (a consumer
    /// group or named subscription made again resumes there). Stored topics are loaded on
    /// their first use (a publish, a subscription matching them, their stats), so opening
    /// costs nothing per topic.
    ///
    /// The broker starts its storage threads (see [`crate::storage`]); opening runs on them
    /// while the calling thread waits.
    pub fn with_storage(
        config: BrokerConfig,
        storage: Arc<dyn Storage>,
    ) -> Result<Broker, StorageError> {
        Broker::start_durable(config, move || Ok(storage))
    }

    /// Starts the storage threads, then opens the storage with `open` and loads the saved
    /// positions on an I/O thread (stored topics are loaded on their first use).
    fn start_durable(
        config: BrokerConfig,
        open: impl FnOnce() -> Result<Arc<dyn Storage>, StorageError> + Send + 'static,
    ) -> Result<Broker, StorageError> {
        let thread_error = |what: &str, e: std::io::Error| StorageError::Log {
            topic: format!("({what})"),
            reason: format!("cannot start: {e}"),
        };
        let io =
            IoPool::start(crate::io::IO_THREADS).map_err(|e| thread_error("I/O threads", e))?;
        let committer = Committer::start().map_err(|e| thread_error("commit thread", e))?;
        let (storage, positions, topics) = io.call(move || -> Result<_, StorageError> {
            let storage = open()?;
            let positions = storage.load_positions()?;
            // Stored topics exist, loaded or not: they count against `max_topics` from the
            // start.
            let topics = storage.user_topic_count();
            Ok((storage, positions, topics))
        })?;
        Ok(Broker::build_with(
            config,
            Some(Durability {
                storage,
                committer,
                io,
            }),
            positions,
            topics,
        ))
    }

    fn build_with(
        config: BrokerConfig,
        durability: Option<Durability>,
        positions: Positions,
        user_topics: usize,
    ) -> Self {
        let (events, _) = broadcast::channel(config.event_capacity.max(1));
        let memory = config.memory_limit.map(|l| Arc::new(MemoryGauge::new(l)));
        let (storage, committer, io) = match durability {
            Some(d) => (Some(d.storage), Some(d.committer), Some(d.io)),
            None => (None, None, None),
        };
        let inner = Arc::new_cyclic(|weak| BrokerInner {
            config,
            registry: EngineRwLock::new(Registry::default()),
            state: AtomicU8::new(RUNNING),
            next_id: AtomicU64::new(1),
            events,
            epoch: Instant::now(),
            dead_reasons: Mutex::new(HashMap::new()),
            memory_pressure: AtomicBool::new(false),
            active_handlers: AtomicUsize::new(0),
            report: Mutex::new(None),
            weak: weak.clone(),
            memory,
            transactions: Mutex::new(HashMap::new()),
            storage,
            saved_positions: Mutex::new(positions.clone()),
            positions: EngineMutex::new(positions),
            committer,
            passes: AtomicU64::new(0),
            maintaining: Mutex::new(()),
            io,
            user_topics: AtomicUsize::new(user_topics),
        });
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(maintenance(Arc::downgrade(&inner)));
        }
        Broker { inner }
    }

    /// The configuration.
    pub fn config(&self) -> &BrokerConfig {
        &self.inner.config
    }

    /// Creates `topic` with its own settings (before anything is published to it). Returns
    /// `false` if the topic already exists (its settings are then unchanged).
    pub fn create_topic(&self, topic: &str, config: TopicConfig) -> Result<bool, PublishError> {
        let name = TopicName::new(topic)?;
        if self.inner.existing_topic(&name).is_some() {
            return Ok(false);
        }
        let slot = self.inner.reserve_topic(&name)?;
        // The store is opened before the registry is locked (on an I/O thread).
        let store = match self.inner.open_store(&name, &config) {
            Ok(store) => store,
            Err(e) => {
                self.inner.release_topic(slot);
                return Err(PublishError::Storage(e.to_string()));
            }
        };
        let mut reg = self.inner.registry.write();
        if reg.topics.contains_key(&name) {
            // Made meanwhile by someone else, with the settings it had then.
            self.inner.release_topic(slot);
            return Ok(false);
        }
        reg.configs.insert(name.clone(), config.clone());
        self.inner
            .insert_topic_locked(&mut reg, name, config, store);
        Ok(true)
    }

    /// Names of the user topics (loaded or stored).
    pub fn topics(&self) -> Vec<TopicName> {
        let mut v: Vec<TopicName> = self
            .inner
            .topic_names()
            .into_iter()
            .filter(|t| !t.is_system())
            .collect();
        v.sort();
        v
    }

    /// A publisher bound to `topic` (no topic lookup per message).
    pub fn publisher(&self, topic: &str) -> Result<Publisher, PublishError> {
        let name = TopicName::new(topic)?;
        let topic = self.inner.topic(&name)?;
        Ok(Publisher {
            broker: self.clone(),
            name: topic.name.private_copy(),
            topic,
            producer: None,
        })
    }

    /// Publishes `message` to `topic`, waiting while the topic is full. Returns its offset.
    pub async fn publish(
        &self,
        topic: &str,
        message: impl Into<Message>,
    ) -> Result<u64, PublishError> {
        let topic = self.inner.user_topic_async(topic).await?;
        let record = topic.wrap(message.into(), &None);
        self.inner.publish_one(&topic, record).await
    }

    /// Publishes, waiting at most `timeout` (see [`Publisher::publish_timeout`]): a timeout
    /// before the append is [`PublishError::Timeout`] (nothing stored), one while waiting for
    /// the sync is [`PublishError::InDoubt`].
    pub async fn publish_timeout(
        &self,
        topic: &str,
        message: impl Into<Message>,
        timeout: Duration,
    ) -> Result<u64, PublishError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let topic =
            match tokio::time::timeout_at(deadline, self.inner.user_topic_async(topic)).await {
                Ok(t) => t?,
                Err(_) => return Err(PublishError::Timeout(topic.to_string())),
            };
        let record = topic.wrap(message.into(), &None);
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        self.inner.publish_one_timeout(&topic, record, left).await
    }

    /// Publishes without waiting: [`PublishError::Full`] if the topic is full.
    pub fn try_publish(
        &self,
        topic: &str,
        message: impl Into<Message>,
    ) -> Result<u64, PublishError> {
        let topic = self.inner.user_topic(topic)?;
        let record = topic.wrap(message.into(), &None);
        let range = self.inner.append(&topic, &mut Some(record))?;
        Ok(range.start)
    }

    /// Publishes every message of `messages` atomically (all or none) with contiguous offsets,
    /// waiting while the topic is full. Returns the offsets.
    pub async fn publish_batch(
        &self,
        topic: &str,
        messages: impl IntoIterator<Item = Message>,
    ) -> Result<Range<u64>, PublishError> {
        let topic = self.inner.user_topic_async(topic).await?;
        let records = messages.into_iter().map(|m| topic.wrap(m, &None)).collect();
        self.inner.append_wait(&topic, records).await
    }

    /// A subscription builder for `filter` (exact topic, MQTT wildcard, glob; see
    /// [`TopicFilter::parse`]).
    pub fn subscription(&self, filter: &str) -> SubscriptionBuilder {
        self.builder(TopicFilter::parse(filter))
    }

    /// A subscription builder for a ready-made filter (for example a regex filter).
    pub fn subscription_to(&self, filter: &TopicFilter) -> SubscriptionBuilder {
        self.builder(Ok(filter.clone()))
    }

    pub(crate) fn builder(&self, filter: Result<TopicFilter, TopicError>) -> SubscriptionBuilder {
        SubscriptionBuilder {
            broker: self.clone(),
            filter,
            name: None,
            group: None,
            mode: AckMode::Auto,
            mode_set: false,
            ack_timeout: None,
            max_attempts: None,
            prefetch: None,
            start: StartPosition::Latest,
            batch: 256,
            headers: Vec::new(),
        }
    }

    /// Subscribes to `filter` with the defaults: fanout, auto-ack, from the latest record.
    pub fn subscribe(&self, filter: &str) -> Result<Subscription, SubscribeError> {
        self.subscription(filter).build()
    }

    /// The dead-letter queue of `topic`.
    pub fn dead_letters(&self, topic: &str) -> Result<DeadLetterQueue, TopicError> {
        let source = TopicName::new(topic)?;
        Ok(DeadLetterQueue {
            broker: self.clone(),
            name: dlq_name(&source),
            source,
        })
    }

    /// Begins a transaction with the configured timeout.
    pub fn begin(&self) -> Result<Transaction, PublishError> {
        self.begin_with_timeout(self.inner.config.transaction_timeout)
    }

    /// Begins a transaction that is rolled back if not committed within `timeout`.
    pub fn begin_with_timeout(&self, timeout: Duration) -> Result<Transaction, PublishError> {
        if !self.inner.running() {
            return Err(PublishError::Closed);
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(TxState::new(id, timeout));
        let mut txs = self.inner.transactions.lock();
        if txs.len() >= TRACKED_TX {
            // Bounded memory at any transaction rate: forget finished ones early (a late lookup
            // by id then reports "unknown" rather than how it ended).
            let now = Instant::now();
            txs.retain(|_, tx| !tx.expire_if_due(now, Duration::ZERO));
        }
        txs.insert(id, state.clone());
        drop(txs);
        Ok(Transaction {
            broker: self.clone(),
            state,
        })
    }

    /// The transaction with this id, if it is still known (open, or finished recently).
    pub fn transaction(&self, id: u64) -> Result<Transaction, TxError> {
        let state = self
            .inner
            .transactions
            .lock()
            .get(&id)
            .cloned()
            .ok_or(TxError::Unknown(id))?;
        Ok(Transaction {
            broker: self.clone(),
            state,
        })
    }

    /// Removes a consumer group (its members' `recv` return `Evicted`).
    pub fn delete_group(&self, group: &str) -> bool {
        self.inner.positions.lock().remove(&group_key(group));
        let id = self.inner.registry.read().groups.get(group).copied();
        match id {
            Some(id) => self.inner.evict(id),
            None => false,
        }
    }

    /// Broker-wide stats.
    pub fn stats(&self) -> BrokerStats {
        self.inner.stats()
    }

    /// Stats of one topic.
    pub fn topic_stats(&self, topic: &str) -> Option<TopicStats> {
        let name = TopicName::new(topic).ok()?;
        let t = self.inner.existing_topic(&name)?;
        Some(self.inner.topic_stats(&t))
    }

    /// A page of at most `limit` user topics' stats, in name order: topics whose name starts
    /// with `prefix`, after the name `after` (the previous page's `next`), for which `visible`
    /// is true (it is called with the registry locked: it must not call the broker). A durable
    /// broker reads the page from its store's ordered catalog, so the work is that of the page,
    /// plus the names `visible` refuses, at most [`PAGE_SCAN_BUDGET`] of them per call (then the
    /// page may be short, with a `next` to go on from); an in-memory broker scans its
    /// registry once, keeping only `limit + 1` names. Stored topics that are not loaded are
    /// not loaded: their counters are zero (what they counted is in the broker's totals) and
    /// their depth, bytes and offsets are the store's.
    pub fn topic_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        visible: &dyn Fn(&str) -> bool,
    ) -> TopicPage {
        self.inner.topic_page(prefix, after, limit, visible)
    }

    /// The loaded user topics (those in use) whose name starts with `prefix` and for which
    /// `visible` is true (called with no lock held), at most `limit`, with the most records
    /// stored first (then the most published). Bounded memory whatever the topic count; the
    /// work is one look at each loaded topic.
    pub fn top_topics(
        &self,
        prefix: &str,
        limit: usize,
        visible: &dyn Fn(&str) -> bool,
    ) -> Vec<TopicStats> {
        self.inner.top_topics(prefix, limit, visible)
    }

    /// Stats of every subscription and group.
    pub fn subscription_stats(&self) -> Vec<SubscriptionStats> {
        let mut v: Vec<SubscriptionStats> =
            self.inner.consumers().iter().map(|c| c.stats()).collect();
        v.sort_by_key(|s| s.id);
        v
    }

    /// Lag over every subscription and group.
    pub fn lag(&self) -> LagStats {
        LagStats::from_lags(self.inner.consumers().iter().map(|c| c.lag()))
    }

    /// Subscriptions with a backlog that have read nothing for `threshold`.
    pub fn stale_consumers(&self, threshold: Duration) -> Vec<SubscriptionStats> {
        self.inner
            .consumers()
            .iter()
            .filter(|c| c.idle() >= threshold)
            .map(|c| c.stats())
            .filter(|s| s.lag > 0 || s.in_flight > 0)
            .collect()
    }

    /// Evicts subscriptions idle for `threshold` with at least `min_lag` unread records, so
    /// that they stop holding records. Returns how many.
    pub fn cleanup_stale_consumers(&self, threshold: Duration, min_lag: u64) -> usize {
        let stale = self.stale_consumers(threshold);
        stale
            .iter()
            .filter(|s| s.lag >= min_lag)
            .filter(|s| self.inner.evict(s.id))
            .count()
    }

    /// Health.
    pub fn health(&self) -> Health {
        let topics = self.inner.user_topic_count();
        let fault = self.inner.storage_fault();
        let reg = self.inner.registry.read();
        Health {
            status: match self.inner.state.load(Ordering::Acquire) {
                RUNNING if fault.is_some() => "degraded",
                RUNNING => "running",
                DRAINING => "draining",
                _ => "closed",
            },
            reason: fault,
            uptime: self.inner.epoch.elapsed(),
            topics,
            subscriptions: reg.consumers.len(),
        }
    }

    /// Lifecycle events from now on, starting with `Started` if the broker is running.
    pub fn events(&self) -> EventReceiver {
        EventReceiver {
            rx: self.inner.events.subscribe(),
            started: self.inner.running(),
        }
    }

    /// Whether shutdown has begun.
    pub fn is_closed(&self) -> bool {
        self.inner.state.load(Ordering::Acquire) != RUNNING
    }

    /// Runs one maintenance pass now (retention by age, stale detection, memory events,
    /// saving consumer positions).
    ///
    /// On a durable broker the pass runs on an I/O thread while the calling thread waits.
    pub fn maintain(&self) {
        match &self.inner.io {
            Some(io) => {
                let inner = self.inner.clone();
                // The pass reads the runtime's clock, if the caller has one.
                let runtime = tokio::runtime::Handle::try_current().ok();
                io.call(move || {
                    let _rt = runtime.as_ref().map(|r| r.enter());
                    inner.maintain()
                });
            }
            None => self.inner.maintain(),
        }
    }

    /// Makes everything published so far durable and saves the consumer positions now
    /// (otherwise done by the maintenance task and at shutdown). A no-op without storage.
    ///
    /// The work runs on an I/O thread while the calling thread waits: from async code, use
    /// [`flush_async`](Self::flush_async), which does not hold up an async worker.
    pub fn flush(&self) -> Result<(), StorageError> {
        match &self.inner.io {
            Some(io) => {
                let inner = self.inner.clone();
                io.call(move || inner.save_positions())
            }
            None => Ok(()),
        }
    }

    /// [`flush`](Self::flush) for async callers: the work runs on an I/O thread and the
    /// returned future resolves when it is done.
    pub async fn flush_async(&self) -> Result<(), StorageError> {
        match &self.inner.io {
            Some(io) => {
                let inner = self.inner.clone();
                io.run(move || inner.save_positions()).await
            }
            None => Ok(()),
        }
    }

    /// Whether the broker keeps its topics in durable storage.
    pub fn is_durable(&self) -> bool {
        self.inner.storage.is_some()
    }

    /// Graceful shutdown: stops accepting publishes and subscriptions, lets current subscribers
    /// receive (and handlers finish) what is queued until `timeout`, then closes. Whatever is
    /// still unread or unsettled then is counted as dropped. Calling it again returns the first
    /// report.
    pub async fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        self.inner.shutdown(timeout).await
    }
}

/// A publisher bound to one topic. A clone is a publisher of its own (with its own copy of
/// the topic name), meant for another task or thread.
#[derive(Debug)]
pub struct Publisher {
    broker: Broker,
    /// The topic's name in an allocation of this publisher's own: every record carries its
    /// name, and publishers on several cores counting references on one shared string would
    /// contend on its cache line.
    name: TopicName,
    topic: Arc<Topic>,
    producer: Option<Arc<str>>,
}

impl Clone for Publisher {
    fn clone(&self) -> Self {
        Publisher {
            broker: self.broker.clone(),
            name: self.name.private_copy(),
            topic: self.topic.clone(),
            producer: self.producer.clone(),
        }
    }
}

/// A publish under way (see [`Publisher::publish_pipelined`]): resolves to the offset once the
/// message is durable and visible, or to why it was not published.
#[must_use = "a pipelined publish reports its outcome only when awaited"]
pub struct Pipelined(PipelinedState);

enum PipelinedState {
    Ready(Option<Result<u64, PublishError>>),
    Syncing {
        offset: u64,
        durable: crate::commit::Durable,
    },
    Blocked(std::pin::Pin<Box<dyn Future<Output = Result<u64, PublishError>> + Send>>),
}

impl std::fmt::Debug for Pipelined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.0 {
            PipelinedState::Ready(_) => "ready",
            PipelinedState::Syncing { .. } => "syncing",
            PipelinedState::Blocked(_) => "waiting for space",
        };
        f.debug_tuple("Pipelined").field(&state).finish()
    }
}

impl Pipelined {
    /// Whether the message was appended (or refused) already; `false` while it waits for space
    /// in a full topic.
    pub fn is_appended(&self) -> bool {
        !matches!(self.0, PipelinedState::Blocked(_))
    }
}

impl Future for Pipelined {
    type Output = Result<u64, PublishError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        match &mut self.0 {
            PipelinedState::Ready(r) => Poll::Ready(r.take().unwrap_or(Err(PublishError::Closed))),
            PipelinedState::Syncing { offset, durable } => {
                match std::pin::Pin::new(&mut *durable).poll(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Ok(())) => Poll::Ready(Ok(*offset)),
                    Poll::Ready(Err(e)) => {
                        Poll::Ready(Err(BrokerInner::sync_error(durable.topic(), e)))
                    }
                }
            }
            PipelinedState::Blocked(f) => f.as_mut().poll(cx),
        }
    }
}

impl Publisher {
    /// Stamps this producer id on messages that have none.
    pub fn with_producer_id(mut self, producer: impl Into<Arc<str>>) -> Self {
        self.producer = Some(producer.into());
        self
    }

    /// The topic.
    pub fn topic(&self) -> &TopicName {
        &self.topic.name
    }

    /// Publishes, waiting while the topic is full. Returns the offset.
    ///
    /// The message is wrapped into its record when this is called, so the returned future holds
    /// a pointer rather than the message.
    pub fn publish(
        &self,
        message: impl Into<Message>,
    ) -> impl Future<Output = Result<u64, PublishError>> + Send + '_ {
        let record = self
            .topic
            .wrap_as(&self.name, message.into(), &self.producer);
        self.broker.inner.publish_one(&self.topic, record)
    }

    /// Publishes in order without waiting for durability: the message is appended when this is
    /// called (so messages published one after another keep their order), and the returned
    /// [`Pipelined`] resolves to its offset once it is durable and visible (at once on topics
    /// that need no sync). Meanwhile the caller may publish more: concurrent publishes on any
    /// topics share one fsync. If the topic is full and blocks, the append itself waits: check
    /// [`Pipelined::is_appended`] and await it before publishing more, to keep the order.
    pub fn publish_pipelined(&self, message: impl Into<Message>) -> Pipelined {
        let mut pending = Some(
            self.topic
                .wrap_as(&self.name, message.into(), &self.producer),
        );
        let inner = &self.broker.inner;
        match inner.append_unsynced(&self.topic, &mut pending) {
            Err(PublishError::Full { .. }) if self.topic.config.overflow == Overflow::Block => {
                let publisher = self.clone();
                let records: Vec<Arc<Record>> = pending.into_iter().collect();
                Pipelined(PipelinedState::Blocked(Box::pin(async move {
                    let inner = &publisher.broker.inner;
                    inner
                        .append_wait(&publisher.topic, records)
                        .await
                        .map(|r| r.start)
                })))
            }
            Err(e) => Pipelined(PipelinedState::Ready(Some(Err(e)))),
            Ok(range) if self.topic.waits_for_sync() => {
                match inner.submit(&self.topic, range.end) {
                    Ok(durable) => Pipelined(PipelinedState::Syncing {
                        offset: range.start,
                        durable,
                    }),
                    Err(e) => Pipelined(PipelinedState::Ready(Some(Err(e)))),
                }
            }
            Ok(range) => Pipelined(PipelinedState::Ready(Some(Ok(range.start)))),
        }
    }

    /// Publishes without waiting.
    pub fn try_publish(&self, message: impl Into<Message>) -> Result<u64, PublishError> {
        let record = self
            .topic
            .wrap_as(&self.name, message.into(), &self.producer);
        self.broker
            .inner
            .append(&self.topic, &mut Some(record))
            .map(|r| r.start)
    }

    /// Publishes, waiting at most `timeout` in all: [`PublishError::Timeout`] (and nothing
    /// stored) if no space was freed in time, [`PublishError::InDoubt`] if the message was
    /// appended but its sync did not end in time (it becomes visible if the sync succeeds).
    pub async fn publish_timeout(
        &self,
        message: impl Into<Message>,
        timeout: Duration,
    ) -> Result<u64, PublishError> {
        let record = self
            .topic
            .wrap_as(&self.name, message.into(), &self.producer);
        self.broker
            .inner
            .publish_one_timeout(&self.topic, record, timeout)
            .await
    }

    /// Publishes a batch atomically, waiting while the topic is full.
    pub async fn publish_batch(
        &self,
        messages: impl IntoIterator<Item = Message>,
    ) -> Result<Range<u64>, PublishError> {
        let records = messages
            .into_iter()
            .map(|m| self.topic.wrap_as(&self.name, m, &self.producer))
            .collect();
        self.broker.inner.append_wait(&self.topic, records).await
    }

    /// Publishes a batch without waiting (all or nothing).
    pub fn try_publish_batch(
        &self,
        messages: impl IntoIterator<Item = Message>,
    ) -> Result<Range<u64>, PublishError> {
        let mut records: Vec<Arc<Record>> = messages
            .into_iter()
            .map(|m| self.topic.wrap_as(&self.name, m, &self.producer))
            .collect();
        self.broker.inner.append(&self.topic, &mut records)
    }
}

impl BrokerInner {
    pub(crate) fn running(&self) -> bool {
        self.state.load(Ordering::Acquire) == RUNNING
    }

    fn emit(&self, e: BrokerEvent) {
        let _ = self.events.send(e);
    }

    /// The durable storage, if any.
    pub(crate) fn storage(&self) -> Option<&Arc<dyn Storage>> {
        self.storage.as_ref()
    }

    /// The topic `name` if it exists: loaded, or stored (then it is loaded).
    pub(crate) fn existing_topic(&self, name: &TopicName) -> Option<Arc<Topic>> {
        if let Some(t) = self.registry.read().topics.get(name) {
            return Some(t.clone());
        }
        if !self.storage.as_ref()?.has_topic(name) {
            return None;
        }
        let config = self.topic_config(name);
        match self.open_store(name, &config) {
            Ok(store) => Some(self.insert_topic(name, config, store)),
            Err(e) => {
                tracing::error!(topic = %name, error = %e, "loading a stored topic failed");
                None
            }
        }
    }

    /// Loads the stored topics `filter` matches that are not loaded, their stores opened on
    /// an I/O thread (no lock held meanwhile). Returns them: the caller holds them until its
    /// subscription does, so that they are not unloaded in between.
    fn load_matching(&self, filter: &TopicFilter) -> Result<Vec<Arc<Topic>>, StorageError> {
        let (Some(io), Some(storage)) = (&self.io, &self.storage) else {
            return Ok(Vec::new());
        };
        let stored = stored_in_scope(storage.as_ref(), &filter.scope());
        let wanted: Vec<(TopicName, TopicConfig)> = {
            let reg = self.registry.read();
            stored
                .into_iter()
                .filter(|n| filter.matches(n.as_str()) && !reg.topics.contains_key(n))
                .map(|n| {
                    let config = topic_config(&self.config, &reg.configs, &n);
                    (n, config)
                })
                .collect()
        };
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let storage = storage.clone();
        let opened = io.call(move || {
            wanted
                .into_iter()
                .map(|(name, config)| {
                    let store = storage.open_topic(&name, &config)?;
                    Ok((name, config, store))
                })
                .collect::<Result<Vec<_>, StorageError>>()
        })?;
        Ok(opened
            .into_iter()
            .map(|(name, config, store)| self.insert_topic(&name, config, Some(store)))
            .collect())
    }

    /// Every topic's name: those loaded and those only stored.
    fn topic_names(&self) -> Vec<TopicName> {
        let reg = self.registry.read();
        let mut names: Vec<TopicName> = reg.topics.keys().cloned().collect();
        drop(reg);
        if let Some(storage) = &self.storage {
            match storage.topics() {
                Ok(stored) => names.extend(stored),
                Err(e) => tracing::error!(error = %e, "listing the stored topics failed"),
            }
            names.sort_unstable();
            names.dedup();
        }
        names
    }

    /// How many user topics exist (every topic of a durable broker has a log).
    fn user_topic_count(&self) -> usize {
        match &self.storage {
            Some(storage) => storage.user_topic_count(),
            None => {
                let reg = self.registry.read();
                reg.topics.keys().filter(|t| !t.is_system()).count()
            }
        }
    }

    /// The I/O threads (durable brokers).
    pub(crate) fn io(&self) -> Option<&IoPool> {
        self.io.as_ref()
    }

    /// The topic `name`, created (and attached to matching consumers) if needed. A new durable
    /// topic's store is opened on an I/O thread while the calling thread waits, before the
    /// registry is locked.
    pub(crate) fn topic(&self, name: &TopicName) -> Result<Arc<Topic>, PublishError> {
        if let Some(t) = self.existing_topic(name) {
            return Ok(t);
        }
        let slot = self.reserve_topic(name)?;
        let config = self.topic_config(name);
        let store = match self.open_store(name, &config) {
            Ok(store) => store,
            Err(e) => {
                self.release_topic(slot);
                return Err(self.open_failed(&e));
            }
        };
        Ok(self.insert_new_topic(name, config, store, slot))
    }

    /// Reserves the place of a topic about to be created against `max_topics` (system topics
    /// take none: `Ok(false)`), before anything is opened or written.
    fn reserve_topic(&self, name: &TopicName) -> Result<bool, PublishError> {
        if name.is_system() {
            return Ok(false);
        }
        let Some(limit) = self.config.max_topics else {
            self.user_topics.fetch_add(1, Ordering::AcqRel);
            return Ok(true);
        };
        self.user_topics
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .map(|_| true)
            .map_err(|_| PublishError::TopicLimit {
                topic: name.to_string(),
                limit,
            })
    }

    /// Gives back a place reserved by [`reserve_topic`](Self::reserve_topic) for a topic that
    /// was not created after all.
    fn release_topic(&self, reserved: bool) {
        if reserved {
            self.user_topics.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// [`insert_topic`](Self::insert_topic) for a topic created now, whose place `slot` was
    /// reserved: given back if someone else made the topic meanwhile.
    fn insert_new_topic(
        &self,
        name: &TopicName,
        config: TopicConfig,
        store: Option<Arc<dyn TopicStore>>,
        slot: bool,
    ) -> Arc<Topic> {
        let mut reg = self.registry.write();
        if let Some(t) = reg.topics.get(name) {
            let t = t.clone();
            drop(reg);
            self.release_topic(slot);
            return t;
        }
        self.insert_topic_locked(&mut reg, name.clone(), config, store)
    }

    /// [`topic`](Self::topic) for async callers: a new durable topic's store is opened on an
    /// I/O thread while the task waits.
    pub(crate) async fn topic_async(&self, name: &TopicName) -> Result<Arc<Topic>, PublishError> {
        if let Some(t) = self.existing_topic(name) {
            return Ok(t);
        }
        // Boxed: the publish futures stay small on the common path.
        Box::pin(self.make_topic_async(name)).await
    }

    async fn make_topic_async(&self, name: &TopicName) -> Result<Arc<Topic>, PublishError> {
        let slot = self.reserve_topic(name)?;
        let config = self.topic_config(name);
        let store = match (&self.io, &self.storage) {
            (Some(io), Some(storage)) => {
                let (storage, name, config) = (storage.clone(), name.clone(), config.clone());
                match io.run(move || storage.open_topic(&name, &config)).await {
                    Ok(store) => Some(store),
                    Err(e) => {
                        self.release_topic(slot);
                        return Err(self.open_failed(&e));
                    }
                }
            }
            _ => None,
        };
        Ok(self.insert_new_topic(name, config, store, slot))
    }

    fn user_topic(&self, topic: &str) -> Result<Arc<Topic>, PublishError> {
        let name = TopicName::new(topic)?;
        if !self.running() {
            return Err(PublishError::Closed);
        }
        self.topic(&name)
    }

    async fn user_topic_async(&self, topic: &str) -> Result<Arc<Topic>, PublishError> {
        let name = TopicName::new(topic)?;
        if !self.running() {
            return Err(PublishError::Closed);
        }
        self.topic_async(&name).await
    }

    /// The settings a topic made without its own gets.
    fn topic_config(&self, name: &TopicName) -> TopicConfig {
        topic_config(&self.config, &self.registry.read().configs, name)
    }

    /// Opens the store of topic `name` on an I/O thread (the calling thread waits); `None`
    /// without storage. The caller holds no engine lock.
    pub(crate) fn open_store(
        &self,
        name: &TopicName,
        config: &TopicConfig,
    ) -> Result<Option<Arc<dyn TopicStore>>, StorageError> {
        match (&self.io, &self.storage) {
            (Some(io), Some(storage)) => {
                let (storage, name, config) = (storage.clone(), name.clone(), config.clone());
                io.call(move || storage.open_topic(&name, &config))
                    .map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Registers topic `name` over `store` (opened beforehand), unless it was made meanwhile:
    /// then the topic made first (the store opened twice is the same log).
    fn insert_topic(
        &self,
        name: &TopicName,
        config: TopicConfig,
        store: Option<Arc<dyn TopicStore>>,
    ) -> Arc<Topic> {
        let mut reg = self.registry.write();
        if let Some(t) = reg.topics.get(name) {
            return t.clone();
        }
        self.insert_topic_locked(&mut reg, name.clone(), config, store)
    }

    fn insert_topic_locked(
        &self,
        reg: &mut Registry,
        name: TopicName,
        config: TopicConfig,
        store: Option<Arc<dyn TopicStore>>,
    ) -> Arc<Topic> {
        // Dead-letter topics are bounded by their retention, not by the memory limit: a dead
        // letter is never refused.
        let gauge = if name.is_system() {
            None
        } else {
            self.memory.clone()
        };
        let durable = store.map(|store| Durable {
            store,
            hot_records: self.config.hot_window.records.max(1),
            hot_bytes: self.config.hot_window.bytes.max(1),
        });
        let topic = Arc::new(Topic::new(name.clone(), config, gauge, durable));
        let mut matching = Vec::new();
        reg.index
            .for_each_match(name.as_str(), |id, _| matching.push(id));
        for id in matching {
            if let Some(c) = reg.consumers.get(&id) {
                // The topic is new: everything in it is new to the subscription.
                c.attach(
                    &topic,
                    self.seek_for(c.durable_key.as_deref(), &name, Seek::Earliest),
                );
            }
        }
        reg.topics.insert(name, topic.clone());
        topic
    }

    /// Where a consumer starts on a topic: its saved position, if it has one; the start of
    /// the topic if the consumer was saved before but not on this topic (the topic appeared
    /// since its last save, so everything in it came after the consumer); else `default`.
    fn seek_for(&self, key: Option<&str>, topic: &TopicName, default: Seek) -> Seek {
        let Some(key) = key else {
            return default;
        };
        match self.positions.lock().get(key) {
            Some(p) => p
                .get(topic.as_str())
                .copied()
                .map_or(Seek::Earliest, Seek::Offset),
            None => default,
        }
    }

    /// Syncs the storage, then saves the consumer positions if they changed: a saved
    /// position never points past what is durable. Blocking: runs on an I/O thread.
    fn save_positions(&self) -> Result<(), StorageError> {
        let Some(storage) = &self.storage else {
            return Ok(());
        };
        // Merged in place, so that a consumer unregistering meanwhile is not overwritten. The
        // consumers are listed before `positions` is locked: the lock order is registry ->
        // positions (a topic created under the registry lock reads saved positions).
        let consumers = self.consumers();
        let positions = {
            let mut positions = self.positions.lock();
            for c in consumers {
                record_positions(&mut positions, &c);
            }
            positions.clone()
        };
        storage.sync()?;
        let mut saved = self.saved_positions.lock();
        if *saved != positions {
            storage.save_positions(&positions)?;
            *saved = positions;
        }
        Ok(())
    }

    /// Appends and, on a topic whose store waits for its sync, waits for the commit thread's
    /// sync (blocking the thread: for callers that do not wait asynchronously).
    pub(crate) fn append(
        &self,
        topic: &Arc<Topic>,
        records: &mut impl Pending,
    ) -> Result<Range<u64>, PublishError> {
        let range = self.append_unsynced(topic, records)?;
        if topic.waits_for_sync() {
            crate::io::block_on(self.submit(topic, range.end)?)
                .map_err(|e| BrokerInner::sync_error(topic, e))?;
        }
        Ok(range)
    }

    /// Appends; the records may still wait for their sync (see [`BrokerInner::synced`]).
    fn append_unsynced(
        &self,
        topic: &Topic,
        records: &mut impl Pending,
    ) -> Result<Range<u64>, PublishError> {
        if !self.running() {
            return Err(PublishError::Closed);
        }
        let appended = topic
            .append(records)
            .map_err(|e| BrokerInner::append_error(topic, e));
        if let Some(committer) = &self.committer {
            match &appended {
                // A store that syncs later is healthy again once a sync succeeds.
                Ok(_) if !topic.waits_for_sync() && topic.is_durable() => committer.storage_ok(),
                Err(PublishError::InDoubt { reason, .. }) => {
                    committer.storage_failed(reason.clone());
                }
                _ => {}
            }
        }
        appended
    }

    /// Records that opening a topic's log failed (see [`Broker::health`]).
    fn open_failed(&self, e: &StorageError) -> PublishError {
        let reason = format!("opening the topic's log failed: {e}");
        if let Some(committer) = &self.committer {
            committer.storage_failed(reason.clone());
        }
        PublishError::Storage(reason)
    }

    /// The storage failure seen last, if no write or sync succeeded since.
    fn storage_fault(&self) -> Option<String> {
        self.committer.as_ref().and_then(Committer::storage_fault)
    }

    /// Waits, off the async worker threads, until `range` is durable and visible.
    async fn synced(
        &self,
        topic: &Arc<Topic>,
        range: Range<u64>,
    ) -> Result<Range<u64>, PublishError> {
        if !topic.waits_for_sync() {
            return Ok(range);
        }
        match self.submit(topic, range.end)?.await {
            Ok(()) => Ok(range),
            Err(e) => Err(BrokerInner::sync_error(topic, e)),
        }
    }

    /// Hands `topic`'s records below `end` to the commit thread (see [`Committer::submit`]).
    pub(crate) fn submit(
        &self,
        topic: &Arc<Topic>,
        end: u64,
    ) -> Result<crate::commit::Durable, PublishError> {
        // Only a durable broker has topics that wait for their sync, and it has a commit thread.
        let committer = self
            .committer
            .as_ref()
            .ok_or_else(|| PublishError::Storage("no commit thread".into()))?;
        Ok(committer.submit(topic.clone(), end))
    }

    /// The publish error for a failed append to `topic`.
    pub(crate) fn append_error(topic: &Topic, e: AppendError) -> PublishError {
        match e {
            AppendError::MemoryLimit { used, limit } => PublishError::MemoryLimit { used, limit },
            AppendError::Closed => PublishError::Closed,
            AppendError::Full => PublishError::Full {
                topic: topic.name.to_string(),
                capacity: topic.config.capacity,
            },
            AppendError::TooLarge(len) => PublishError::BatchTooLarge {
                topic: topic.name.to_string(),
                len,
                capacity: topic.config.capacity,
            },
            // The store had the records: a failed write may have left them on disk.
            AppendError::Storage(reason) => PublishError::InDoubt {
                topic: topic.name.to_string(),
                reason: format!("storage write failed: {reason}"),
            },
        }
    }

    /// The publish error for appended records whose sync failed (or never came): in doubt,
    /// since the store may hold them.
    pub(crate) fn sync_error(topic: &Topic, e: AppendError) -> PublishError {
        match e {
            AppendError::Storage(reason) => PublishError::InDoubt {
                topic: topic.name.to_string(),
                reason: format!("storage sync failed: {reason}"),
            },
            AppendError::Closed => PublishError::InDoubt {
                topic: topic.name.to_string(),
                reason: "the broker closed before the write was synced".into(),
            },
            other => BrokerInner::append_error(topic, other),
        }
    }

    /// Publishes one message: a synchronous attempt first; only a full topic pays for the
    /// (boxed, so that the common path's future stays small) waiting path.
    async fn publish_one(
        &self,
        topic: &Arc<Topic>,
        record: Arc<Record>,
    ) -> Result<u64, PublishError> {
        let mut pending = Some(record);
        match self.append_unsynced(topic, &mut pending) {
            Err(PublishError::Full { .. }) if topic.config.overflow == Overflow::Block => {}
            Ok(range) if topic.waits_for_sync() => {
                return Box::pin(self.synced(topic, range)).await.map(|r| r.start)
            }
            other => return other.map(|r| r.start),
        }
        let waiting = Box::pin(self.append_wait(topic, pending.into_iter().collect()));
        waiting.await.map(|r| r.start)
    }

    /// [`publish_one`](Self::publish_one) within `timeout`: a timeout before the append
    /// stores nothing ([`PublishError::Timeout`]); one after it is in doubt, since the commit
    /// thread may still sync and reveal the record.
    async fn publish_one_timeout(
        &self,
        topic: &Arc<Topic>,
        record: Arc<Record>,
        timeout: Duration,
    ) -> Result<u64, PublishError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pending = Some(record);
        let range = match self.append_unsynced(topic, &mut pending) {
            Err(PublishError::Full { .. }) if topic.config.overflow == Overflow::Block => {
                let records = pending.into_iter().collect();
                let waiting = Box::pin(self.append_waiting_for_space(topic, records));
                match tokio::time::timeout_at(deadline, waiting).await {
                    Ok(r) => r?,
                    // Dropping the wait leaves nothing appended.
                    Err(_) => return Err(PublishError::Timeout(topic.name.to_string())),
                }
            }
            other => other?,
        };
        match tokio::time::timeout_at(deadline, Box::pin(self.synced(topic, range))).await {
            Ok(r) => r.map(|r| r.start),
            Err(_) => Err(PublishError::InDoubt {
                topic: topic.name.to_string(),
                reason: format!("not synced within {timeout:?}"),
            }),
        }
    }

    async fn append_wait(
        &self,
        topic: &Arc<Topic>,
        records: Vec<Arc<Record>>,
    ) -> Result<Range<u64>, PublishError> {
        let range = self.append_waiting_for_space(topic, records).await?;
        self.synced(topic, range).await
    }

    async fn append_waiting_for_space(
        &self,
        topic: &Topic,
        records: Vec<Arc<Record>>,
    ) -> Result<Range<u64>, PublishError> {
        let len = records.len();
        if len > topic.config.capacity {
            return Err(PublishError::BatchTooLarge {
                topic: topic.name.to_string(),
                len,
                capacity: topic.config.capacity,
            });
        }
        let mut pending = records;
        // A failed append leaves the records in `pending` for the next try.
        match self.append_unsynced(topic, &mut pending) {
            Err(PublishError::Full { .. }) if topic.config.overflow == Overflow::Block => {}
            other => return other,
        }
        let bytes = if topic.config.max_bytes.is_some() {
            pending.bytes()
        } else {
            0
        };
        loop {
            let attempt = || self.append_unsynced(topic, &mut pending);
            let r = wait_for_space(topic, (len, bytes), attempt, PublishError::is_full).await;
            if !matches!(r, Err(PublishError::Full { .. })) {
                return r;
            }
        }
    }

    pub(crate) fn subscribe(
        &self,
        b: SubscriptionBuilder,
        broker: &Broker,
    ) -> Result<Subscription, SubscribeError> {
        if !self.running() {
            return Err(SubscribeError::Closed);
        }
        let filter = b.filter?;
        let policy = AckPolicy {
            mode: b.mode,
            ack_timeout: b.ack_timeout.unwrap_or(self.config.ack_timeout),
            max_attempts: b.max_attempts.unwrap_or(self.config.max_attempts),
            prefetch: b.prefetch.unwrap_or(self.config.prefetch),
        };
        if policy.max_attempts == 0 {
            return Err(SubscribeError::InvalidOption(
                "max_attempts must be at least 1",
            ));
        }
        if policy.prefetch == 0 {
            return Err(SubscribeError::InvalidOption("prefetch must be at least 1"));
        }
        // Storage work first, before the registry is locked (on an I/O thread): opening the
        // store of a new topic, and looking the start time up in the stores' time indexes.
        let mut opened = None;
        // Stored topics a pattern matches are loaded (and held until the subscription holds
        // them) like every other.
        let mut _loaded = Vec::new();
        if let TopicFilter::Exact(name) = &filter {
            if self.storage.is_some() && self.existing_topic(name).is_none() {
                let config = self.topic_config(name);
                let store = self
                    .open_store(name, &config)
                    .map_err(|e| SubscribeError::Storage(e.to_string()))?;
                opened = Some((config, store));
            }
        } else {
            _loaded = self
                .load_matching(&filter)
                .map_err(|e| SubscribeError::Storage(e.to_string()))?;
        }
        let joins = b
            .group
            .as_ref()
            .is_some_and(|g| self.registry.read().groups.contains_key(g));
        let found = match b.start {
            StartPosition::Timestamp(t) if !joins => self.offsets_at(&filter, t),
            _ => HashMap::new(),
        };
        let member = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut reg = self.registry.write();
        if let Some(group) = &b.group {
            if let Some(c) = reg.groups.get(group).and_then(|id| reg.consumers.get(id)) {
                if c.filter != filter || c.policy.mode != policy.mode || c.headers != b.headers {
                    return Err(SubscribeError::GroupMismatch {
                        group: group.clone(),
                        existing: format!(
                            "filter {}, {:?} ack and header conditions {:?}",
                            c.filter, c.policy.mode, c.headers
                        ),
                    });
                }
                c.members.fetch_add(1, Ordering::AcqRel);
                return Ok(Subscription::new(
                    broker.clone(),
                    c.clone(),
                    member,
                    b.batch.min(64),
                ));
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Groups and named subscriptions keep their positions across restarts.
        let durable_key = match (&b.group, &b.name) {
            (Some(g), _) => Some(group_key(g)),
            (None, Some(n)) => Some(format!("sub:{n}")),
            (None, None) => None,
        }
        .filter(|_| self.storage.is_some());
        let name = b
            .group
            .clone()
            .or(b.name)
            .unwrap_or_else(|| format!("sub-{id}"));
        let consumer = Arc::new(Consumer::new(
            ConsumerSpec {
                id,
                name,
                filter: filter.clone(),
                group: b.group.is_some(),
                policy,
                headers: b.headers.clone(),
                durable_key,
            },
            self.weak.clone(),
            self.epoch,
        ));
        consumer.members.fetch_add(1, Ordering::AcqRel);
        let seek = match b.start {
            StartPosition::Latest => Seek::Tail,
            StartPosition::Earliest => Seek::Earliest,
            StartPosition::Offset(o) => Seek::Offset(o),
            StartPosition::Timestamp(t) => Seek::Time(t),
        };
        let key = consumer.durable_key.as_deref();
        // A time found in a topic's store; topics made since the look-up search memory.
        let seek_on = |name: &TopicName| found.get(name).map_or(seek, |&o| Seek::Found(o));
        if let TopicFilter::Exact(name) = &filter {
            let existing = reg.topics.get(name).cloned();
            let topic = match existing {
                Some(t) => t.clone(),
                None => {
                    let (config, store) = opened
                        .unwrap_or_else(|| (topic_config(&self.config, &reg.configs, name), None));
                    self.insert_topic_locked(&mut reg, name.clone(), config, store)
                }
            };
            consumer.attach(&topic, self.seek_for(key, name, seek_on(name)));
        } else {
            for (name, topic) in reg.topics.matching(&filter) {
                consumer.attach(topic, self.seek_for(key, name, seek_on(name)));
            }
        }
        reg.index.insert(&filter, id, ());
        reg.consumers.insert(id, consumer.clone());
        if let Some(group) = b.group {
            reg.groups.insert(group, id);
        }
        let batch = if consumer.group {
            b.batch.min(64)
        } else {
            b.batch
        };
        Ok(Subscription::new(broker.clone(), consumer, member, batch))
    }

    /// For each durable topic `filter` matches, the first offset published at or after `time`,
    /// looked up on an I/O thread while the calling thread waits (no lock held meanwhile).
    fn offsets_at(&self, filter: &TopicFilter, time: SystemTime) -> HashMap<TopicName, u64> {
        let Some(io) = &self.io else {
            return HashMap::new();
        };
        let topics: Vec<Arc<Topic>> = self
            .registry
            .read()
            .topics
            .matching(filter)
            .filter(|(_, t)| t.store().is_some())
            .map(|(_, t)| t.clone())
            .collect();
        if topics.is_empty() {
            return HashMap::new();
        }
        io.call(move || {
            let mut found = HashMap::with_capacity(topics.len());
            for t in topics {
                let Some(store) = t.store() else { continue };
                let offset = store.offset_at(time).unwrap_or_else(|e| {
                    tracing::warn!(topic = %t.name, error = %e, "time lookup failed; starting at the tail");
                    t.tail()
                });
                found.insert(t.name.clone(), offset);
            }
            found
        })
    }

    /// Removes a consumer from the registry and closes it (unsubscribed). Returns whether it
    /// was registered.
    pub(crate) fn remove_consumer(&self, id: u64) -> bool {
        self.unregister(id, false).is_some()
    }

    /// Removes a consumer and closes it as evicted (its members' `recv` say so).
    fn evict(&self, id: u64) -> bool {
        let Some(c) = self.unregister(id, true) else {
            return false;
        };
        self.emit(BrokerEvent::SubscriberEvicted {
            id,
            name: c.name.clone(),
        });
        true
    }

    fn unregister(&self, id: u64, evicted: bool) -> Option<Arc<Consumer>> {
        let mut reg = self.registry.write();
        let c = reg.consumers.remove(&id)?;
        reg.index.remove(&c.filter, id);
        if c.group {
            reg.groups.retain(|_, g| *g != id);
        }
        // Nothing leaks: every registered consumer has exactly one index entry.
        debug_assert_eq!(reg.index.len(), reg.consumers.len());
        debug_assert_eq!(reg.index.is_empty(), reg.consumers.is_empty());
        drop(reg);
        // A named subscription that is dropped resumes where it stopped when made again
        // (an evicted or deleted group starts over).
        if let Some(key) = &c.durable_key {
            let mut positions = self.positions.lock();
            if evicted {
                positions.remove(key);
            } else {
                record_positions(&mut positions, &c);
            }
        }
        c.close(evicted);
        Some(c)
    }

    pub(crate) fn consumers(&self) -> Vec<Arc<Consumer>> {
        self.registry.read().consumers.values().cloned().collect()
    }

    fn all_topics(&self) -> Vec<Arc<Topic>> {
        self.registry.read().topics.values().cloned().collect()
    }

    /// A copy of `topic`'s retained records from `from`, at most `max`. Records only in the
    /// store are read on an I/O thread while the calling thread waits.
    pub(crate) fn snapshot(&self, topic: &Arc<Topic>, from: u64, max: usize) -> Vec<Arc<Record>> {
        match topic.snapshot(from, max) {
            Ok(records) => records,
            Err((from, max)) => match &self.io {
                Some(io) => {
                    let t = topic.clone();
                    let read = io.call(move || t.read_stored(from, max));
                    revive(topic, read)
                }
                None => Vec::new(),
            },
        }
    }

    /// [`snapshot`](Self::snapshot) for async callers.
    pub(crate) async fn snapshot_async(
        &self,
        topic: &Arc<Topic>,
        from: u64,
        max: usize,
    ) -> Vec<Arc<Record>> {
        match topic.snapshot(from, max) {
            Ok(records) => records,
            Err((from, max)) => match &self.io {
                Some(io) => {
                    let t = topic.clone();
                    let read = io.run(move || t.read_stored(from, max)).await;
                    revive(topic, read)
                }
                None => Vec::new(),
            },
        }
    }

    /// Releases `topic`'s records below `until` (see [`Topic::truncate_before`]); a durable
    /// topic's store is trimmed on an I/O thread while the calling thread waits.
    pub(crate) fn truncate_before(&self, topic: &Arc<Topic>, until: u64) -> u64 {
        match &self.io {
            Some(io) => {
                let t = topic.clone();
                io.call(move || t.truncate_before(until))
            }
            None => topic.truncate_before(until),
        }
    }

    /// [`truncate_before`](Self::truncate_before) for async callers.
    pub(crate) async fn truncate_before_async(&self, topic: &Arc<Topic>, until: u64) -> u64 {
        match &self.io {
            Some(io) => {
                let t = topic.clone();
                io.run(move || t.truncate_before(until)).await
            }
            None => topic.truncate_before(until),
        }
    }

    /// Stores a dead letter in its source topic's dead-letter queue.
    pub(crate) fn dead_letter(&self, job: DeadJob) {
        let name = dlq_name(&job.topic);
        let topic = match self.topic(&name) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(topic = %job.topic, offset = job.record.offset(), error = %e, "dead letter lost: its queue could not be opened");
                return;
            }
        };
        let message = dead_letter_message(&job.topic, &job.record, &job.reason, job.attempts);
        // Dead-letter topics never refuse for capacity; retention bounds them. If the broker is
        // already closed the dead letter is still stored (it was counted as dead-lettered).
        if topic
            .append_visible(&mut Some(topic.wrap(message, &None)))
            .is_ok()
        {
            let mut reasons = self.dead_reasons.lock();
            *reasons
                .entry(job.topic.clone())
                .or_default()
                .entry(job.reason.kind().to_string())
                .or_default() += 1;
        }
    }

    pub(crate) fn topic_stats(&self, t: &Topic) -> TopicStats {
        self.topic_stats_with(t, &self.consumers())
    }

    /// [`topic_stats`](Self::topic_stats) with the consumers taken once for several topics.
    fn topic_stats_with(&self, t: &Topic, consumers: &[Arc<Consumer>]) -> TopicStats {
        let (depth, bytes) = t.depth();
        let (first, next) = t.bounds();
        let lags: Vec<u64> = consumers.iter().filter_map(|c| c.lag_on(t)).collect();
        TopicStats {
            topic: t.name.to_string(),
            counters: t.counters(),
            depth,
            bytes,
            first_offset: first,
            next_offset: next,
            subscribers: t.subscriber_count(),
            lag: LagStats::from_lags(lags.into_iter()),
            dead_letters: self.dead_letter_depth(&t.name),
            dead_letters_by_reason: self
                .dead_reasons
                .lock()
                .get(&t.name)
                .cloned()
                .unwrap_or_default(),
        }
    }

    fn topic_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        visible: &dyn Fn(&str) -> bool,
    ) -> TopicPage {
        if limit == 0 {
            return TopicPage {
                topics: Vec::new(),
                next: None,
            };
        }
        let (names, next) = match &self.storage {
            Some(storage) => page_of_stored(storage.as_ref(), prefix, after, limit, visible),
            None => self.page_of_loaded(prefix, after, limit, visible),
        };
        let consumers = self.consumers();
        let topics = names
            .iter()
            .filter_map(|name| self.page_stats(name, &consumers))
            .collect();
        TopicPage { topics, next }
    }

    /// A page of the registry's names (an in-memory broker, whose registry is every topic),
    /// read in chunks under the registry lock; `visible` is called with no lock held.
    fn page_of_loaded(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        visible: &dyn Fn(&str) -> bool,
    ) -> (Vec<TopicName>, Option<String>) {
        let names_from = |from: &str, exclusive: bool, max: usize| {
            self.registry.read().topics.names_from(from, exclusive, max)
        };
        page_of_names(&names_from, prefix, after, limit, visible)
    }

    /// The stats of `name` for a page: the loaded topic's, or what the store holds of it
    /// (nothing is loaded).
    fn page_stats(&self, name: &TopicName, consumers: &[Arc<Consumer>]) -> Option<TopicStats> {
        let loaded = self.registry.read().topics.get(name).cloned();
        if let Some(t) = loaded {
            return Some(self.topic_stats_with(&t, consumers));
        }
        let (first, next, bytes) = self.storage.as_ref()?.stored_bounds(name)?;
        Some(TopicStats {
            topic: name.to_string(),
            counters: CounterSnapshot::default(),
            depth: usize::try_from(next.saturating_sub(first)).unwrap_or(usize::MAX),
            bytes: usize::try_from(bytes).unwrap_or(usize::MAX),
            first_offset: first,
            next_offset: next,
            subscribers: 0,
            lag: LagStats::default(),
            dead_letters: self.dead_letter_depth(name),
            dead_letters_by_reason: self
                .dead_reasons
                .lock()
                .get(name)
                .cloned()
                .unwrap_or_default(),
        })
    }

    /// Records in `topic`'s dead-letter queue now (loaded or stored; nothing is loaded).
    fn dead_letter_depth(&self, topic: &TopicName) -> usize {
        let dlq = dlq_name(topic);
        let loaded = self.registry.read().topics.get(&dlq).cloned();
        match (loaded, &self.storage) {
            (Some(t), _) => t.depth().0,
            (None, Some(storage)) => storage.stored_depth(&dlq).map_or(0, |(records, _)| {
                usize::try_from(records).unwrap_or(usize::MAX)
            }),
            (None, None) => 0,
        }
    }

    fn top_topics(
        &self,
        prefix: &str,
        limit: usize,
        visible: &dyn Fn(&str) -> bool,
    ) -> Vec<TopicStats> {
        if limit == 0 {
            return Vec::new();
        }
        // The `limit` largest (depth, published) keys; the heap's top is the smallest kept.
        let mut largest: BinaryHeap<Reverse<(usize, u64, TopicName)>> =
            BinaryHeap::with_capacity(limit + 1);
        let mut kept: HashMap<TopicName, Arc<Topic>> = HashMap::with_capacity(limit + 1);
        for t in self.all_topics() {
            let n = t.name.as_str();
            if t.name.is_system() || !n.starts_with(prefix) || !visible(n) {
                continue;
            }
            let key = (t.depth().0, t.counters().published, t.name.clone());
            if largest.len() == limit && largest.peek().is_some_and(|Reverse(m)| &key <= m) {
                continue;
            }
            kept.insert(t.name.clone(), t.clone());
            largest.push(Reverse(key));
            if largest.len() > limit {
                if let Some(Reverse((_, _, out))) = largest.pop() {
                    kept.remove(&out);
                }
            }
        }
        let consumers = self.consumers();
        largest
            .into_sorted_vec()
            .into_iter()
            .filter_map(|Reverse((_, _, name))| kept.remove(&name))
            .map(|t| self.topic_stats_with(&t, &consumers))
            .collect()
    }

    fn stats(&self) -> BrokerStats {
        let n = self.user_topic_count();
        let (topics, mut counters) = {
            let reg = self.registry.read();
            let topics: Vec<Arc<Topic>> = reg.topics.values().cloned().collect();
            (topics, reg.retired)
        };
        let consumers = self.consumers();
        let (mut depth, mut bytes, mut dead) = (0, 0, 0);
        for t in &topics {
            let (d, b) = t.depth();
            if t.name.is_system() {
                dead += d;
                continue;
            }
            counters += t.counters();
            depth += d;
            bytes += b;
        }
        // Stored topics that are not loaded: what their logs hold (one pass over the
        // catalog, no name copied).
        if let Some(storage) = &self.storage {
            let loaded: HashSet<&str> = topics.iter().map(|t| t.name.as_str()).collect();
            storage.for_each_stored(&mut |name, d, b| {
                if loaded.contains(name) {
                    return;
                }
                if crate::topic::is_reserved(name) {
                    dead += d as usize;
                } else {
                    depth += d as usize;
                    bytes += b as usize;
                }
            });
        }
        let mut by_reason = BTreeMap::new();
        for reasons in self.dead_reasons.lock().values() {
            for (k, v) in reasons {
                *by_reason.entry(k.clone()).or_insert(0) += v;
            }
        }
        BrokerStats {
            uptime: self.epoch.elapsed(),
            counters,
            topics: n,
            loaded_topics: topics.len(),
            subscriptions: consumers.len(),
            depth,
            bytes,
            dead_letters: dead,
            lag: LagStats::from_lags(consumers.iter().map(|c| c.lag())),
            dead_letters_by_reason: by_reason,
        }
    }

    /// One maintenance pass.
    fn maintain(&self) {
        let _pass = self.maintaining.lock();
        if self.state.load(Ordering::Acquire) == CLOSED {
            return;
        }
        let pass = self.passes.fetch_add(1, Ordering::Relaxed);
        // Roll back expired transactions; forget finished ones after a while.
        let now = Instant::now();
        self.transactions
            .lock()
            .retain(|_, tx| !tx.expire_if_due(now, FORGET_FINISHED_TX));
        let mut total = 0;
        for t in self.all_topics() {
            t.collect();
            total += t.memory_bytes();
        }
        if let Some(after) = self.config.unload_idle_topics_after {
            self.unload_idle_topics(after);
        }
        if pass % STORED_RETENTION_EVERY == 0 {
            self.apply_stored_retention();
        }
        if let Err(e) = self.save_positions() {
            tracing::error!(error = %e, "saving consumer positions failed");
        }
        if let Some(limit) = self.config.memory_high_watermark {
            let pressure = self.memory_pressure.load(Ordering::Acquire);
            if !pressure && total > limit {
                self.memory_pressure.store(true, Ordering::Release);
                self.emit(BrokerEvent::MemoryPressure {
                    bytes: total,
                    limit,
                });
            } else if pressure && total <= limit / 10 * 8 {
                self.memory_pressure.store(false, Ordering::Release);
                self.emit(BrokerEvent::MemoryNormal {
                    bytes: total,
                    limit,
                });
            }
        }
        if let Some(after) = self.config.stale_after {
            for c in self.consumers() {
                let idle = c.idle();
                if idle < after {
                    continue;
                }
                let lag = c.lag();
                if lag == 0 {
                    continue;
                }
                self.emit(BrokerEvent::SubscriberStale {
                    id: c.id,
                    name: c.name.clone(),
                    lag,
                    idle,
                });
                if self.config.evict_stale {
                    self.evict(c.id);
                }
            }
        }
    }

    /// Unloads the topics nothing holds and nothing was published to for `after` (see
    /// [`BrokerConfig::unload_idle_topics_after`]).
    fn unload_idle_topics(&self, after: Duration) {
        let now = std::time::Instant::now();
        // Candidates first, under the read lock; each is checked again under the write lock.
        // Every new handle on a topic is taken under the registry lock, so a topic that only
        // the registry holds while the write lock is held stays unheld until it is removed.
        let idle: Vec<TopicName> = self
            .registry
            .read()
            .topics
            .iter()
            .filter(|(_, t)| Arc::strong_count(t) == 1 && t.unused_for(now) >= after)
            .map(|(name, _)| name.clone())
            .collect();
        if idle.is_empty() {
            return;
        }
        let mut reg = self.registry.write();
        for name in idle {
            let unused = reg
                .topics
                .get(&name)
                .is_some_and(|t| Arc::strong_count(t) == 1 && t.can_unload());
            if unused {
                if let Some(t) = reg.topics.remove(&name) {
                    let counters = t.counters();
                    reg.retired += counters;
                    if self.storage.is_none() && !name.is_system() {
                        // An in-memory topic unloaded is forgotten: it no longer exists.
                        self.user_topics.fetch_sub(1, Ordering::AcqRel);
                    }
                }
            }
        }
    }

    /// Applies retention to the stored topics that are not loaded (loaded ones apply theirs
    /// in [`Topic::collect`]).
    fn apply_stored_retention(&self) {
        let Some(storage) = &self.storage else {
            return;
        };
        let names = match storage.topics() {
            Ok(names) => names,
            Err(e) => {
                tracing::error!(error = %e, "listing the stored topics failed");
                return;
            }
        };
        for name in names {
            let config = {
                let reg = self.registry.read();
                if reg.topics.contains_key(&name) {
                    continue;
                }
                topic_config(&self.config, &reg.configs, &name)
            };
            let applied = storage
                .open_topic(&name, &config)
                .and_then(|store| store.apply_retention());
            if let Err(e) = applied {
                tracing::warn!(topic = %name, error = %e, "retention of the topic log failed");
            }
        }
    }

    async fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        let began = Instant::now();
        if self
            .state
            .compare_exchange(RUNNING, DRAINING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Someone else is shutting down: wait for their report.
            loop {
                if let Some(r) = self.report.lock().clone() {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        self.emit(BrokerEvent::ShutdownStarted);
        let deadline = began + timeout;
        let drained = loop {
            let idle = self.active_handlers.load(Ordering::Acquire) == 0;
            let caught_up = self
                .consumers()
                .iter()
                .filter(|c| c.members.load(Ordering::Acquire) > 0)
                .all(|c| c.drained());
            if idle && caught_up {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        // Positions first: closing the consumers below counts what they had not settled as
        // dropped, but on disk it stays, for the next run.
        let saved = match (&self.io, self.weak.upgrade()) {
            (Some(io), Some(inner)) => io.run(move || inner.save_positions()).await,
            _ => Ok(()),
        };
        if let Err(e) = saved {
            tracing::error!(error = %e, "saving consumer positions at shutdown failed");
        }
        self.state.store(CLOSED, Ordering::Release);
        for t in self.all_topics() {
            t.close();
        }
        let mut dropped_at_close = 0;
        for c in self.consumers() {
            let before = c.counters.snapshot().dropped;
            c.close(false);
            dropped_at_close += c.counters.snapshot().dropped - before;
        }
        // Handlers finish their current message, then see the close.
        while self.active_handlers.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let counters = self.stats().counters;
        // The storage closes last (on an I/O thread, after any maintenance pass): its
        // directory can be opened again at once, whoever still holds a handle on the broker.
        if let (Some(io), Some(inner)) = (&self.io, self.weak.upgrade()) {
            let closed = io
                .run(move || {
                    let _pass = inner.maintaining.lock();
                    inner.storage.as_ref().map_or(Ok(()), |s| s.close())
                })
                .await;
            if let Err(e) = closed {
                tracing::error!(error = %e, "closing the storage failed");
            }
        }
        let report = ShutdownReport {
            drained,
            counters,
            dropped_at_close,
            elapsed: began.elapsed(),
        };
        *self.report.lock() = Some(report.clone());
        self.emit(BrokerEvent::Shutdown(report.clone()));
        report
    }
}

async fn maintenance(inner: Weak<BrokerInner>) {
    let interval = match inner.upgrade() {
        Some(i) => i.config.maintenance_interval,
        None => return,
    };
    loop {
        tokio::time::sleep(interval).await;
        let Some(b) = inner.upgrade() else {
            return;
        };
        if b.state.load(Ordering::Acquire) == CLOSED {
            return;
        }
        match &b.io {
            // Saving positions and retention fsync and delete files: on an I/O thread.
            Some(io) => {
                // Entered on the I/O thread: the pass reads the runtime's clock.
                let runtime = tokio::runtime::Handle::current();
                let pass = io.run({
                    let b = b.clone();
                    move || {
                        let _rt = runtime.enter();
                        b.maintain()
                    }
                });
                drop(b);
                pass.await;
            }
            None => b.maintain(),
        }
    }
}

/// The records of a read from `topic`'s store (none if it failed: reported where it failed).
fn revive(topic: &Topic, read: Result<crate::log::StoreRead, StorageError>) -> Vec<Arc<Record>> {
    read.map_or_else(
        |_| Vec::new(),
        |r| r.records.into_iter().map(|s| topic.revive(s)).collect(),
    )
}

/// The settings of topic `name` when it has none of its own: those given to
/// [`Broker::create_topic`] (in `configs`), else the broker's defaults; dead-letter topics
/// keep what they hold, within the dead-letter retention.
fn topic_config(
    config: &BrokerConfig,
    configs: &HashMap<TopicName, TopicConfig>,
    name: &TopicName,
) -> TopicConfig {
    if name.is_system() {
        TopicConfig {
            capacity: usize::MAX / 2,
            keep_consumed: true,
            retention: config.dead_letter_retention.clone(),
            ..TopicConfig::default()
        }
    } else {
        configs
            .get(name)
            .cloned()
            .unwrap_or_else(|| config.topic_defaults.clone())
    }
}

/// Records a durable consumer's current positions (its lowest unsettled offset per topic).
fn record_positions(positions: &mut Positions, c: &Consumer) {
    if let Some(key) = &c.durable_key {
        positions
            .entry(key.clone())
            .or_default()
            .extend(c.saved_positions());
    }
}

/// The positions key of a consumer group.
fn group_key(group: &str) -> String {
    format!("group:{group}")
}

/// Tries `attempt` once more as a blocked publisher of `topic` and, if it still finds the topic
/// full, waits until consumers may have freed room for `len` records of `bytes` (or the broker
/// closed, or a subscription went away). Returns the attempt's result; the caller retries.
pub(crate) async fn wait_for_space<T, E>(
    topic: &Topic,
    (len, bytes): (usize, usize),
    attempt: impl FnOnce() -> Result<T, E>,
    is_full: impl Fn(&E) -> bool,
) -> Result<T, E> {
    let space = topic.space.notified();
    tokio::pin!(space);
    space.as_mut().enable();
    topic.blocked.fetch_add(1, Ordering::SeqCst);
    let r = attempt();
    let full = matches!(&r, Err(e) if is_full(e));
    if full && !topic.has_space(len, bytes) {
        // The attempt set the hold that consumers must reach to wake us; checked once more
        // after publishing it (see `Topic::hold_advanced`), now sleep.
        space.await;
    }
    topic.blocked.fetch_sub(1, Ordering::SeqCst);
    r
}

/// A page of a store's catalog: at most `limit` visible user topics with the prefix, after
/// `after`, looking at at most [`PAGE_SCAN_BUDGET`] names.
/// The stored topics in `scope` (from the store's catalog, in memory): its name, if stored,
/// and the names under its prefix, read in chunks of the ordered catalog.
fn stored_in_scope(storage: &dyn Storage, scope: &Scope) -> Vec<TopicName> {
    const CHUNK: usize = 1024;
    let mut names: Vec<TopicName> = match scope.name.as_deref() {
        Some(name) => storage
            .topics_from(name, false, 1)
            .into_iter()
            .filter(|n| n.as_str() == name)
            .collect(),
        None => Vec::new(),
    };
    let Some(prefix) = scope.under.as_deref() else {
        return names;
    };
    let (mut from, mut exclusive) = (prefix.to_string(), false);
    loop {
        let chunk = storage.topics_from(&from, exclusive, CHUNK);
        let full = chunk.len() == CHUNK;
        let mut last = None;
        for name in chunk {
            if !name.as_str().starts_with(prefix) {
                return names;
            }
            last = Some(name.to_string());
            names.push(name);
        }
        match last {
            Some(last) if full => (from, exclusive) = (last, true),
            _ => return names,
        }
    }
}

fn page_of_stored(
    storage: &dyn Storage,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
    visible: &dyn Fn(&str) -> bool,
) -> (Vec<TopicName>, Option<String>) {
    let names_from =
        |from: &str, exclusive: bool, max: usize| storage.topics_from(from, exclusive, max);
    page_of_names(&names_from, prefix, after, limit, visible)
}

/// A page of the user topic names that start with `prefix`, after `after`, for which `visible`
/// is true, at most `limit`, with the name to go on from when there may be more; `names_from`
/// lists names in order from a name (after it when exclusive), at most a given number.
fn page_of_names(
    names_from: &dyn Fn(&str, bool, usize) -> Vec<TopicName>,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
    visible: &dyn Fn(&str) -> bool,
) -> (Vec<TopicName>, Option<String>) {
    const CHUNK: usize = 256;
    let (mut from, mut exclusive) = match after {
        Some(a) if a >= prefix => (a.to_string(), true),
        _ => (prefix.to_string(), false),
    };
    let mut names: Vec<TopicName> = Vec::new();
    let mut looked = 0usize;
    loop {
        let chunk = names_from(&from, exclusive, CHUNK);
        let Some(last) = chunk.last() else {
            return (names, None);
        };
        let last = last.to_string();
        for name in chunk {
            let n = name.as_str();
            if !n.starts_with(prefix) {
                return (names, None);
            }
            // A system name (`$dlq/...`) is never listed; user `$` topics sort among them.
            let user = !name.is_system();
            if user && names.len() == limit {
                // Another topic with the prefix follows the full page.
                let next = names.last().map(|t| t.to_string());
                return (names, next);
            }
            looked += 1;
            if user && visible(n) {
                names.push(name);
            } else if looked >= PAGE_SCAN_BUDGET {
                return (names, Some(n.to_string()));
            }
        }
        (from, exclusive) = (last, true);
    }
}
