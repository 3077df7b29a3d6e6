//! The contract every backend implements: messages, deliveries, subscriptions, options.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

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
    /// Application headers. Names starting with `ferry-` are reserved for the adapters
    /// (attempt counts, dead-letter reasons).
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
