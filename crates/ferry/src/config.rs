//! Configuration of the broker, its topics and its subscriptions. Plain structs with public
//! fields and `Default`s, so that callers set what they need with struct-update syntax.

use std::time::Duration;

/// How long records are kept for replay once every subscription has read them, and the hard
/// bounds beyond which even unread records are released (counted as `dropped`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    /// Keep at most this many records.
    pub max_messages: Option<usize>,
    /// Keep at most this many bytes of records (as measured by [`Message::size`](crate::Message::size)).
    pub max_bytes: Option<usize>,
    /// Release records older than this (by message timestamp).
    pub max_age: Option<Duration>,
}

/// What a bounded topic does with a publish that does not fit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Overflow {
    /// `publish` waits until subscribers free space (honouring cancellation, and a timeout with
    /// [`Publisher::publish_timeout`](crate::Publisher::publish_timeout)); `try_publish` is
    /// refused with [`PublishError::Full`](crate::PublishError::Full).
    #[default]
    Block,
    /// Every publish that does not fit is refused at once with `PublishError::Full`.
    Reject,
    /// The oldest records are released to make room, read or not; a subscription that had not
    /// read them counts them as dropped.
    DropOldest,
}

/// Per-topic settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicConfig {
    /// The most unconsumed records the topic holds (how far the slowest subscription may lag)
    /// before `overflow` applies.
    pub capacity: usize,
    /// The most bytes of unconsumed records (by [`Message::size`](crate::Message::size)) before
    /// `overflow` applies; unbounded if `None`.
    pub max_bytes: Option<usize>,
    /// What a publish that does not fit does.
    pub overflow: Overflow,
    /// Keep records that every subscription has consumed, within `retention`, so that new
    /// subscriptions can start from the earliest retained record or a past offset or time.
    /// When `false` (the default), a record is released as soon as no subscription needs it,
    /// and a record published while no subscription exists is counted as dropped.
    pub keep_consumed: bool,
    /// Retention bounds.
    pub retention: Retention,
    /// Time to live of messages that set no expiry of their own.
    pub default_ttl: Option<Duration>,
    /// Against starvation under priorities: a message that has waited this long for a
    /// subscription is delivered as if it had the highest priority. Without it, a steady stream
    /// of higher-priority messages can delay lower ones indefinitely.
    pub priority_aging: Option<Duration>,
    /// Send expired messages to the dead-letter queue (reason `expired`) instead of only
    /// counting them.
    pub dead_letter_expired: bool,
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            capacity: 100_000,
            max_bytes: None,
            overflow: Overflow::Block,
            keep_consumed: false,
            retention: Retention::default(),
            default_ttl: None,
            priority_aging: None,
            dead_letter_expired: false,
        }
    }
}

/// Broker-wide settings.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Settings of topics created implicitly (by publishing or subscribing).
    pub topic_defaults: TopicConfig,
    /// Settings of dead-letter topics (kept until redriven or purged, within these bounds).
    pub dead_letter_retention: Retention,
    /// Default acknowledgement timeout of manual-ack subscriptions.
    pub ack_timeout: Duration,
    /// Default number of delivery attempts before a message is dead-lettered.
    pub max_attempts: u32,
    /// Default limit of unacknowledged deliveries per subscriber.
    pub prefetch: usize,
    /// A subscription that has read nothing for this long while it has a backlog is reported
    /// stale (an event, and in [`Broker::stale_consumers`](crate::Broker::stale_consumers)).
    pub stale_after: Option<Duration>,
    /// Evict stale subscriptions automatically (their `recv` then returns `Evicted`).
    pub evict_stale: bool,
    /// A broker-wide bound on the bytes of stored records: a publish that would exceed it is
    /// refused with [`PublishError::MemoryLimit`](crate::PublishError::MemoryLimit).
    pub memory_limit: Option<usize>,
    /// Emit a memory-pressure event when retained records exceed this many bytes, and a
    /// memory-normal event when they fall back under 80% of it.
    pub memory_high_watermark: Option<usize>,
    /// How long a transaction may stay open before it is rolled back.
    pub transaction_timeout: Duration,
    /// How often the maintenance task runs (retention by age, stale detection, memory).
    pub maintenance_interval: Duration,
    /// Capacity of the lifecycle event channel (slow event readers lose the oldest events).
    pub event_capacity: usize,
    /// With durable storage: how many recent records each topic keeps in memory. Older
    /// records are read back from disk, so memory does not grow with the data retained.
    pub hot_window: HotWindow,
    /// Topics unused for this long (nothing published, no subscription, publisher handle or
    /// transaction holding them) are unloaded by the maintenance pass, so that idle topics cost
    /// no engine memory: a durable topic keeps only its entry in the store and is loaded again
    /// on its next use (its counters start again from zero); an in-memory topic is forgotten
    /// once it holds no record. `None` keeps every topic loaded.
    pub unload_idle_topics_after: Option<Duration>,
    /// With durable storage: a stored topic that holds no record any more (retention or a
    /// purge removed them all), that is not loaded (no consumer or group holds it) and was not
    /// given settings of its own by [`Broker::create_topic`](crate::Broker::create_topic) since
    /// the broker opened (those are not saved), is forgotten by the maintenance pass: its entry leaves the store, it no longer counts towards
    /// `max_topics`, and consumer positions on it are dropped. Published to again, it is a
    /// new topic whose offsets start at 0 (saved groups and subscriptions read it from its
    /// start). So topics that churn (a topic per device or per job) cost nothing once their
    /// records are gone. Default true; false keeps every stored topic.
    pub forget_empty_topics: bool,
    /// The most user topics that may exist: loaded, or (durable) stored and unloaded. A publish
    /// (or `create_topic`, `publisher`, a transaction) that would create one more is refused with
    /// [`PublishError::TopicLimit`](crate::PublishError::TopicLimit) and nothing is written.
    /// System topics (dead letters) do not count and are never refused. `None`: no limit.
    pub max_topics: Option<usize>,
}

/// The in-memory window of a durable topic: at most this many records and bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotWindow {
    /// Records.
    pub records: usize,
    /// Bytes (by [`Message::size`](crate::Message::size)).
    pub bytes: usize,
}

impl Default for HotWindow {
    fn default() -> Self {
        HotWindow {
            records: 65_536,
            bytes: 32 << 20,
        }
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            topic_defaults: TopicConfig::default(),
            dead_letter_retention: Retention {
                max_messages: Some(1_000_000),
                max_bytes: Some(256 << 20),
                max_age: Some(Duration::from_secs(7 * 24 * 3600)),
            },
            ack_timeout: Duration::from_secs(30),
            max_attempts: 3,
            prefetch: 1000,
            stale_after: None,
            evict_stale: false,
            memory_limit: None,
            transaction_timeout: Duration::from_secs(30),
            memory_high_watermark: None,
            maintenance_interval: Duration::from_secs(1),
            event_capacity: 1024,
            hot_window: HotWindow::default(),
            unload_idle_topics_after: Some(Duration::from_secs(60)),
            forget_empty_topics: true,
            max_topics: Some(1_000_000),
        }
    }
}
