//! Typed errors, one enum per operation family. Each has a stable machine-readable
//! [`code`](PublishError::code) so that the server can put it on the wire unchanged.

use crate::topic::TopicError;

/// Why a publish failed. Nothing of a failed publish (or of a failed batch) is stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The topic name is invalid.
    #[error(transparent)]
    InvalidTopic(#[from] TopicError),
    /// The broker is shutting down or closed.
    #[error("broker is closed")]
    Closed,
    /// The topic is full (its slowest subscription lags by `capacity` records) and the call
    /// does not wait.
    #[error("topic {topic} is full ({capacity} unconsumed records)")]
    Full {
        /// The topic.
        topic: String,
        /// Its capacity in records.
        capacity: usize,
    },
    /// A batch (or a single record) could never fit: more records than the topic's capacity,
    /// or more bytes than its byte bound.
    #[error("batch of {len} records can never fit in topic {topic} (capacity {capacity} records, or its byte bound)")]
    BatchTooLarge {
        /// The topic.
        topic: String,
        /// Records in the batch.
        len: usize,
        /// The topic's capacity.
        capacity: usize,
    },
    /// The broker-wide memory limit would be exceeded.
    #[error("memory limit exceeded: {used} of {limit} bytes in use")]
    MemoryLimit {
        /// Bytes of stored records.
        used: usize,
        /// The limit.
        limit: usize,
    },
    /// The topic does not exist and the broker already has `limit` topics
    /// ([`BrokerConfig::max_topics`](crate::BrokerConfig::max_topics)); nothing was stored.
    #[error("topic {topic} cannot be created: the broker has its limit of {limit} topics")]
    TopicLimit {
        /// The topic that would have been created.
        topic: String,
        /// The limit.
        limit: usize,
    },
    /// A blocking publish did not find space within its timeout (nothing was stored).
    #[error("timed out waiting for space in topic {0}")]
    Timeout(String),
    /// Publishing into a system topic (`$...`) is not allowed.
    #[error("topic {0} is a system topic")]
    SystemTopic(String),
    /// Storage failed before the records were handed to it (opening the topic's log): nothing
    /// was stored.
    #[error("storage failed: {0}")]
    Storage(String),
    /// The records were handed to storage (or a backend) but it is not known whether they were
    /// stored: the write or the sync that would have made them durable failed, the broker
    /// closed first, or the wait for it timed out. They were not made visible on this failure,
    /// but they may be on disk (and delivered after a restart) or, for a timeout, still become
    /// visible: a retry may deliver the message twice. Every other error means "not published".
    #[error("in doubt, the message may have been stored: {reason}")]
    InDoubt {
        /// The topic.
        topic: String,
        /// What failed (for a full disk: "storage write failed: ... No space left on device").
        reason: String,
    },
}

impl PublishError {
    /// Whether the topic was full (the publish may succeed later).
    pub fn is_full(&self) -> bool {
        matches!(self, PublishError::Full { .. })
    }

    /// Whether the message may have been stored although the publish failed
    /// ([`PublishError::InDoubt`]); for every other error it was not published.
    pub fn is_in_doubt(&self) -> bool {
        matches!(self, PublishError::InDoubt { .. })
    }

    /// A stable code for the wire.
    pub fn code(&self) -> &'static str {
        match self {
            PublishError::InDoubt { .. } => "in_doubt",
            PublishError::InvalidTopic(_) => "invalid_topic",
            PublishError::Closed => "closed",
            PublishError::Full { .. } => "queue_full",
            PublishError::BatchTooLarge { .. } => "batch_too_large",
            PublishError::MemoryLimit { .. } => "memory_limit",
            PublishError::TopicLimit { .. } => "topic_limit",
            PublishError::Timeout(_) => "timeout",
            PublishError::Storage(_) => "storage",
            PublishError::SystemTopic(_) => "system_topic",
        }
    }
}

/// Why a subscription could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// The filter is invalid.
    #[error(transparent)]
    InvalidFilter(#[from] TopicError),
    /// The broker is shutting down or closed.
    #[error("broker is closed")]
    Closed,
    /// A consumer group of that name exists with another filter or acknowledgement mode.
    #[error("consumer group {group} already exists with {existing}")]
    GroupMismatch {
        /// The group.
        group: String,
        /// What the existing group was created with.
        existing: String,
    },
    /// An option is out of range.
    #[error("invalid subscription option: {0}")]
    InvalidOption(&'static str),
    /// A topic's durable log could not be opened.
    #[error("storage failed: {0}")]
    Storage(String),
}

impl SubscribeError {
    /// A stable code for the wire.
    pub fn code(&self) -> &'static str {
        match self {
            SubscribeError::InvalidFilter(_) => "invalid_filter",
            SubscribeError::Closed => "closed",
            SubscribeError::GroupMismatch { .. } => "group_mismatch",
            SubscribeError::InvalidOption(_) => "invalid_option",
            SubscribeError::Storage(_) => "storage",
        }
    }
}

/// Why `recv` returned no message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecvError {
    /// The broker closed and everything queued for this subscription was delivered.
    #[error("broker is closed")]
    Closed,
    /// The subscription was removed (stale-consumer clean-up or explicit removal).
    #[error("subscription was evicted")]
    Evicted,
}

/// Why `try_recv` returned no message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TryRecvError {
    /// Nothing is available right now.
    #[error("no message available")]
    Empty,
    /// The broker closed and everything queued for this subscription was delivered.
    #[error("broker is closed")]
    Closed,
    /// The subscription was removed.
    #[error("subscription was evicted")]
    Evicted,
}

impl From<RecvError> for TryRecvError {
    fn from(e: RecvError) -> Self {
        match e {
            RecvError::Closed => TryRecvError::Closed,
            RecvError::Evicted => TryRecvError::Evicted,
        }
    }
}

/// Why an ack, nack or reject did not apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// The delivery is no longer in flight: its ack timeout passed and it was (or will be)
    /// redelivered, or it was already settled.
    #[error("delivery is no longer in flight (ack timeout passed or already settled)")]
    Stale,
    /// The subscription was closed or evicted.
    #[error("subscription is gone")]
    Gone,
}

/// Errors of dead-letter operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeadLetterError {
    /// The topic name is invalid.
    #[error(transparent)]
    InvalidTopic(#[from] TopicError),
    /// Redriving failed to publish.
    #[error("redrive failed: {0}")]
    Publish(#[from] PublishError),
    /// The broker is closed.
    #[error("broker is closed")]
    Closed,
}
