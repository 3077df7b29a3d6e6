//! The contract every backend implements: messages, deliveries, subscriptions, options.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;

use crate::capabilities::Capabilities;
use crate::error::{BackendError, Result};

/// A message as every backend carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendMessage {
    /// The message id (a UUIDv7 string unless set otherwise). Backends keep it end to end.
    pub id: String,
    /// The payload.
    pub payload: Bytes,
    /// Application headers. Names starting with `ferry-` are reserved for the adapters and the
    /// [`Queue`](crate::Queue) (attempt counts, dead-letter reasons, delays, expiry, priority).
    pub headers: BTreeMap<String, String>,
    /// The partitioning / ordering key, if any.
    pub key: Option<String>,
}

impl BackendMessage {
    /// A message with this payload and a fresh id.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        BackendMessage {
            id: uuid::Uuid::now_v7().to_string(),
            payload: payload.into(),
            headers: BTreeMap::new(),
            key: None,
        }
    }

    /// Sets the id.
    #[must_use]
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Sets the key.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// Not to be handed over before `delay` from now (header [`DELIVER_AT_HEADER`]; honoured by
    /// [`Queue`](crate::Queue) subscriptions, natively by the embedded engine).
    #[must_use]
    pub fn with_delay(self, delay: Duration) -> Self {
        self.with_deliver_at(SystemTime::now() + delay)
    }

    /// Not to be handed over before `at` (header [`DELIVER_AT_HEADER`]).
    #[must_use]
    pub fn with_deliver_at(self, at: SystemTime) -> Self {
        self.with_header(DELIVER_AT_HEADER, epoch_ms(at).to_string())
    }

    /// Never handed over once `ttl` from now has passed (header [`EXPIRES_AT_HEADER`]).
    #[must_use]
    pub fn with_ttl(self, ttl: Duration) -> Self {
        self.with_expires_at(SystemTime::now() + ttl)
    }

    /// Never handed over after `at` (header [`EXPIRES_AT_HEADER`]).
    #[must_use]
    pub fn with_expires_at(self, at: SystemTime) -> Self {
        self.with_header(EXPIRES_AT_HEADER, epoch_ms(at).to_string())
    }

    /// Published by a [`Queue`](crate::Queue) into this priority lane (header
    /// [`PRIORITY_HEADER`]).
    #[must_use]
    pub fn with_priority(self, priority: Priority) -> Self {
        self.with_header(PRIORITY_HEADER, priority.as_str())
    }

    /// When the message is due ([`DELIVER_AT_HEADER`]), if it has a valid one.
    pub fn deliver_at(&self) -> Option<SystemTime> {
        self.header(DELIVER_AT_HEADER).and_then(parse_epoch_ms)
    }

    /// When the message expires ([`EXPIRES_AT_HEADER`]), if it has a valid one.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.header(EXPIRES_AT_HEADER).and_then(parse_epoch_ms)
    }

    /// Its priority lane ([`PRIORITY_HEADER`]; `Normal` when absent or not understood).
    pub fn priority(&self) -> Priority {
        self.header(PRIORITY_HEADER)
            .and_then(Priority::parse)
            .unwrap_or_default()
    }
}

/// Milliseconds since the Unix epoch (0 before it).
pub(crate) fn epoch_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A time given in milliseconds since the Unix epoch; `None` if not a number.
pub(crate) fn parse_epoch_ms(value: &str) -> Option<SystemTime> {
    let ms: u64 = value.trim().parse().ok()?;
    UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

/// A priority lane. A [`Queue`](crate::Queue) publishes each lane to a topic of its own
/// (`<topic>.prio-high`, `<topic>`, `<topic>.prio-low`) unless the backend has native
/// priorities, and its subscriptions prefer higher lanes when several have deliveries ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Priority {
    /// Below normal.
    Low,
    /// The default.
    #[default]
    Normal,
    /// Above normal.
    High,
}

impl Priority {
    /// Every lane, highest first.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    /// The header value (`low`, `normal`, `high`).
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }

    /// Parses a header value.
    pub fn parse(value: &str) -> Option<Priority> {
        match value {
            "low" => Some(Priority::Low),
            "normal" => Some(Priority::Normal),
            "high" => Some(Priority::High),
            _ => None,
        }
    }

    /// The topic of this lane of `topic`: `<topic>.prio-high`, `<topic>` or `<topic>.prio-low`
    /// (valid topic names on every backend).
    pub fn lane_topic(self, topic: &str) -> String {
        match self {
            Priority::Normal => topic.to_string(),
            other => format!("{topic}.prio-{}", other.as_str()),
        }
    }
}

/// Where a published message landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// An offset in a log (embedded Ferry) or a stream sequence (JetStream).
    Offset(u64),
    /// A Redis stream entry id (`<ms>-<seq>`).
    EntryId(String),
    /// A Kafka partition and offset.
    Partition {
        /// The partition.
        partition: i32,
        /// The offset in it.
        offset: i64,
    },
    /// Confirmed by the broker, which gives no position (RabbitMQ publisher confirms).
    Confirmed,
}

/// The answer to a publish: the message id and where it landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishAck {
    /// The id of the published message.
    pub id: String,
    /// Its position.
    pub position: Position,
}

/// Where a new subscription (or a new consumer group) starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Start {
    /// Only messages published from now on.
    #[default]
    Latest,
    /// The earliest message the backend still retains (needs the `replay` capability).
    Earliest,
}

/// What to subscribe to and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// A topic, or a filter in the portable syntax: levels separated by `.`, `*` for exactly one
    /// level, a trailing `#` for one or more levels (needs the `wildcards` capability).
    pub filter: String,
    /// A consumer group: each message goes to one member of the group. `None`: a fanout
    /// subscription that receives every message.
    pub group: Option<String>,
    /// Where a new subscription or group starts (an existing group resumes where it was).
    pub start: Start,
    /// An unsettled delivery is redelivered after this long.
    pub ack_timeout: Duration,
    /// After this many delivery attempts a message goes to the topic's dead letters.
    pub max_attempts: u32,
    /// How many unsettled deliveries one subscriber may hold.
    pub prefetch: usize,
}

impl SubscribeOptions {
    /// A fanout subscription to `filter` from the latest message, ack timeout 30 s, 3 attempts,
    /// prefetch 64.
    pub fn new(filter: impl Into<String>) -> Self {
        SubscribeOptions {
            filter: filter.into(),
            group: None,
            start: Start::Latest,
            ack_timeout: Duration::from_secs(30),
            max_attempts: 3,
            prefetch: 64,
        }
    }

    /// Joins consumer group `group`.
    #[must_use]
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Sets where to start.
    #[must_use]
    pub fn start(mut self, start: Start) -> Self {
        self.start = start;
        self
    }

    /// Sets the ack timeout.
    #[must_use]
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// Sets the maximum number of delivery attempts.
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Sets the prefetch.
    #[must_use]
    pub fn prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Checks the options (shared by the adapters).
    pub(crate) fn validate(&self) -> Result<()> {
        if self.filter.is_empty() {
            return Err(BackendError::Invalid("empty filter".into()));
        }
        if self.max_attempts == 0 {
            return Err(BackendError::Invalid(
                "max_attempts must be at least 1".into(),
            ));
        }
        if self.ack_timeout < Duration::from_millis(10) {
            return Err(BackendError::Invalid(
                "ack_timeout must be at least 10 ms".into(),
            ));
        }
        if self.prefetch == 0 {
            return Err(BackendError::Invalid("prefetch must be at least 1".into()));
        }
        if self.group.as_deref() == Some("") {
            return Err(BackendError::Invalid("empty group name".into()));
        }
        Ok(())
    }

    /// Whether the filter has wildcards.
    pub fn has_wildcards(&self) -> bool {
        crate::filter::has_wildcards(&self.filter)
    }
}

/// How an adapter settles one delivery. Implemented by each adapter; users call the methods of
/// [`Delivery`].
#[async_trait]
pub trait Acker: Send + Sync {
    /// Done: never deliver it again.
    async fn ack(self: Box<Self>) -> Result<()>;
    /// Deliver it again, at once or after `delay` (or dead-letter it after the last attempt).
    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<()>;
    /// Dead-letter it at once with `reason`.
    async fn reject(self: Box<Self>, reason: String) -> Result<()>;
}

/// A message handed to a subscriber, to be settled with [`ack`](Self::ack),
/// [`nack`](Self::nack) or [`reject`](Self::reject).
///
/// Dropping it unsettled leaves it in flight until the ack timeout (the embedded Ferry backend
/// redelivers it at once instead).
pub struct Delivery {
    message: BackendMessage,
    topic: String,
    attempt: u32,
    acker: Box<dyn Acker>,
}

impl Delivery {
    /// A delivery (for adapters).
    pub fn new(
        message: BackendMessage,
        topic: String,
        attempt: u32,
        acker: Box<dyn Acker>,
    ) -> Self {
        Delivery {
            message,
            topic,
            attempt,
            acker,
        }
    }

    /// The message.
    pub fn message(&self) -> &BackendMessage {
        &self.message
    }

    /// Takes the message out (the delivery then cannot be settled any more: it stays in flight
    /// until its ack timeout).
    pub fn into_message(self) -> BackendMessage {
        self.message
    }

    /// The topic it was published to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Which delivery attempt this is, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The message, topic, attempt and settlement (for wrappers that count or intercept).
    pub(crate) fn into_parts(self) -> (BackendMessage, String, u32, Box<dyn Acker>) {
        (self.message, self.topic, self.attempt, self.acker)
    }

    /// Acknowledges: the message is done.
    pub async fn ack(self) -> Result<()> {
        self.acker.ack().await
    }

    /// Negative acknowledgement: redeliver now (`None`) or after `delay`; after the last attempt
    /// the message is dead-lettered instead.
    pub async fn nack(self, delay: Option<Duration>) -> Result<()> {
        self.acker.nack(delay).await
    }

    /// Dead-letters the message at once.
    pub async fn reject(self, reason: impl Into<String>) -> Result<()> {
        self.acker.reject(reason.into()).await
    }
}

impl std::ops::Deref for Delivery {
    type Target = BackendMessage;
    fn deref(&self) -> &BackendMessage {
        &self.message
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("topic", &self.topic)
            .field("id", &self.message.id)
            .field("attempt", &self.attempt)
            .finish()
    }
}

/// A subscription: a fanout subscriber or one member of a consumer group.
///
/// Dropping it (or [`close`](Self::close)) leaves the group; its unsettled deliveries are
/// redelivered (to other members) after their ack timeout, or at once where the backend knows
/// the consumer is gone.
#[async_trait]
pub trait BackendSubscription: Send {
    /// The next delivery, waiting for one. [`BackendError::Closed`] once the subscription or the
    /// backend was closed. Cancel-safe: dropping the future (in a `select!`) loses no message.
    async fn next(&mut self) -> Result<Delivery>;

    /// Leaves: like dropping, but waits until the backend has been told.
    async fn close(self: Box<Self>) -> Result<()>;
}

/// One publish/subscribe API over a message broker. Use it as `Arc<dyn Backend>`; make one with
/// [`connect`](crate::connect).
#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug {
    /// The backend's name (`ferry`, `nats`, `redis`, `rabbitmq`, `kafka`).
    fn name(&self) -> &'static str;

    /// What the backend does natively, emulates or cannot do.
    fn capabilities(&self) -> Capabilities;

    /// Publishes one message; returns once the broker has stored (confirmed) it.
    async fn publish(&self, topic: &str, message: BackendMessage) -> Result<PublishAck>;

    /// Publishes several messages to one topic, in order; returns once all are confirmed. Atomic
    /// only where [`Capabilities::atomic_batch`] says so.
    async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<BackendMessage>,
    ) -> Result<Vec<PublishAck>>;

    /// Subscribes.
    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn BackendSubscription>>;

    /// A subscription to the dead letters of `topic`, from the earliest. Each delivery carries
    /// the original message with `ferry-dlq-reason` and `ferry-dlq-attempts` headers added.
    async fn dead_letters(&self, topic: &str) -> Result<Box<dyn BackendSubscription>>;

    /// Republishes up to `max` dead letters of `topic` to the topic they came from, without the
    /// `ferry-dlq-*` headers and with fresh attempt counts (a `ferry-redriven` header counts the
    /// redrives), and removes them from the dead letters. Returns how many.
    ///
    /// The default drains [`dead_letters`](Self::dead_letters) (publish, then acknowledge each:
    /// a failure in between may leave a message both redriven and still dead-lettered);
    /// backends with a native redrive override it.
    async fn redrive_dead_letters(&self, topic: &str, max: usize) -> Result<usize> {
        crate::queue::drain_redrive(self, topic, max).await
    }

    /// Deletes the dead letters of `topic`. Returns how many.
    ///
    /// The default drains [`dead_letters`](Self::dead_letters), acknowledging each.
    async fn purge_dead_letters(&self, topic: &str) -> Result<usize> {
        crate::queue::drain_purge(self, topic).await
    }

    /// Deletes what the backend stores for `topic` (messages, dead letters, the groups and queues
    /// this handle made for it), where it can. For tests and tooling.
    async fn delete_topic(&self, topic: &str) -> Result<()>;

    /// Closes the handle: publishes fail with [`BackendError::Closed`] and subscriptions end.
    async fn close(&self) -> Result<()>;
}

/// Header carrying the dead-letter reason on dead letters.
pub const DLQ_REASON_HEADER: &str = "ferry-dlq-reason";
/// Header carrying the number of attempts made on dead letters.
pub const DLQ_ATTEMPTS_HEADER: &str = "ferry-dlq-attempts";
/// Header carrying the source topic on dead letters.
pub const DLQ_TOPIC_HEADER: &str = "ferry-dlq-topic";
/// Header carrying when a message is due, in milliseconds since the Unix epoch.
pub const DELIVER_AT_HEADER: &str = "ferry-deliver-at";
/// Header carrying when a message expires, in milliseconds since the Unix epoch.
pub const EXPIRES_AT_HEADER: &str = "ferry-expires-at";
/// Header carrying a message's priority lane (`low`, `normal`, `high`).
pub const PRIORITY_HEADER: &str = "ferry-priority";
/// Header counting how many times a message was redriven from the dead letters.
pub const REDRIVEN_HEADER: &str = "ferry-redriven";
