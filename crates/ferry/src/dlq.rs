//! Dead letters.
//!
//! Each topic has a dead-letter queue: a system topic `$dlq/<topic>` that keeps its records
//! (within [`BrokerConfig::dead_letter_retention`](crate::BrokerConfig)) until they are redriven
//! or purged. A dead letter is the original message plus headers that say why, after how many
//! attempts, from which topic and offset, and when. [`DeadLetterQueue`] lists, subscribes to,
//! redrives and purges them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::broker::Broker;
use crate::error::DeadLetterError;
use crate::filter::TopicFilter;
use crate::message::{Message, Record};
use crate::subscription::SubscriptionBuilder;
use crate::topic::TopicName;

/// Header names carried by dead letters.
pub mod headers {
    /// Why: `max_attempts`, `rejected`, ...
    pub const REASON: &str = "ferry-dlq-reason";
    /// Free-text detail (the rejection reason).
    pub const DETAIL: &str = "ferry-dlq-detail";
    /// Delivery attempts made.
    pub const ATTEMPTS: &str = "ferry-dlq-attempts";
    /// The topic it came from.
    pub const SOURCE_TOPIC: &str = "ferry-dlq-source-topic";
    /// Its offset there.
    pub const SOURCE_OFFSET: &str = "ferry-dlq-source-offset";
    /// When it was dead-lettered, in milliseconds since the Unix epoch.
    pub const TIME: &str = "ferry-dlq-time";
    /// Every header above.
    pub const ALL: [&str; 6] = [REASON, DETAIL, ATTEMPTS, SOURCE_TOPIC, SOURCE_OFFSET, TIME];
}

/// Why a message was dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// It was delivered `max_attempts` times without being acknowledged.
    MaxAttempts,
    /// A subscriber or handler rejected it, with this reason.
    Rejected(String),
    /// Its time to live passed before it was delivered.
    Expired,
}

impl DeadLetterReason {
    /// The reason's kind, as counted in stats.
    pub fn kind(&self) -> &'static str {
        match self {
            DeadLetterReason::MaxAttempts => "max_attempts",
            DeadLetterReason::Rejected(_) => "rejected",
            DeadLetterReason::Expired => "expired",
        }
    }

    fn detail(&self) -> &str {
        match self {
            DeadLetterReason::MaxAttempts | DeadLetterReason::Expired => "",
            DeadLetterReason::Rejected(r) => r,
        }
    }

    fn parse(kind: &str, detail: &str) -> Self {
        match kind {
            "max_attempts" => DeadLetterReason::MaxAttempts,
            "expired" => DeadLetterReason::Expired,
            _ => DeadLetterReason::Rejected(detail.to_string()),
        }
    }
}

/// A dead letter: the original message and why it was dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The original message (dead-letter headers removed).
    pub message: Message,
    /// Why.
    pub reason: DeadLetterReason,
    /// Delivery attempts made.
    pub attempts: u32,
    /// The topic it came from.
    pub source_topic: String,
    /// Its offset there.
    pub source_offset: u64,
    /// When it was dead-lettered.
    pub dead_lettered_at: SystemTime,
    /// Its offset in the dead-letter queue.
    pub offset: u64,
}

impl DeadLetter {
    /// Decodes a record of a dead-letter topic. `None` if it lacks the dead-letter headers.
    pub fn from_record(record: &Record) -> Option<DeadLetter> {
        let m = &record.message;
        let kind = m.header(headers::REASON)?;
        let reason = DeadLetterReason::parse(kind, m.header(headers::DETAIL).unwrap_or(""));
        let attempts = m.header(headers::ATTEMPTS)?.parse().ok()?;
        let source_topic = m.header(headers::SOURCE_TOPIC)?.to_string();
        let source_offset = m.header(headers::SOURCE_OFFSET)?.parse().ok()?;
        let ms: u64 = m.header(headers::TIME)?.parse().ok()?;
        let mut message = m.clone();
        for h in headers::ALL {
            message.headers_mut().remove(h);
        }
        Some(DeadLetter {
            message,
            reason,
            attempts,
            source_topic,
            source_offset,
            dead_lettered_at: UNIX_EPOCH + Duration::from_millis(ms),
            offset: record.offset(),
        })
    }
}

/// Builds the record stored in the dead-letter queue.
pub(crate) fn dead_letter_message(
    topic: &TopicName,
    record: &Record,
    reason: &DeadLetterReason,
    attempts: u32,
) -> Message {
    let mut m = record.message.clone();
    let h = m.headers_mut();
    h.insert(headers::REASON, reason.kind());
    h.insert(headers::DETAIL, reason.detail());
    h.insert(headers::ATTEMPTS, attempts.to_string());
    h.insert(headers::SOURCE_TOPIC, topic.as_str());
    h.insert(headers::SOURCE_OFFSET, record.offset().to_string());
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    h.insert(headers::TIME, ms.to_string());
    m
}

/// The name of `topic`'s dead-letter topic.
pub(crate) fn dlq_name(topic: &TopicName) -> TopicName {
    TopicName::system(format!("$dlq/{}", topic.as_str()))
}

/// The dead-letter queue of one topic; made by [`Broker::dead_letters`].
#[derive(Debug, Clone)]
pub struct DeadLetterQueue {
    pub(crate) broker: Broker,
    pub(crate) source: TopicName,
    pub(crate) name: TopicName,
}

impl DeadLetterQueue {
    /// The dead-letter topic's name (`$dlq/<topic>`).
    pub fn topic(&self) -> &TopicName {
        &self.name
    }

    /// Dead letters waiting.
    pub fn len(&self) -> usize {
        self.broker
            .inner
            .existing_topic(&self.name)
            .map_or(0, |t| t.depth().0)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `max` dead letters, oldest first. On a durable broker, those only on disk are read
    /// on an I/O thread while the calling thread waits.
    pub fn list(&self, max: usize) -> Vec<DeadLetter> {
        let Some(t) = self.broker.inner.existing_topic(&self.name) else {
            return Vec::new();
        };
        let (first, _) = t.bounds();
        self.broker
            .inner
            .snapshot(&t, first, max)
            .iter()
            .filter_map(|r| DeadLetter::from_record(r))
            .collect()
    }

    /// A subscription to the dead letters (from the earliest by default); decode each with
    /// [`DeadLetter::from_record`].
    pub fn subscription(&self) -> SubscriptionBuilder {
        self.broker
            .builder(Ok(TopicFilter::exact_system(self.name.clone())))
            .start(crate::StartPosition::Earliest)
    }

    /// Republishes up to `max` of the oldest dead letters to their source topic (without the
    /// dead-letter headers) and removes them from the queue. Returns how many.
    pub async fn redrive(&self, max: usize) -> Result<usize, DeadLetterError> {
        let Some(t) = self.broker.inner.existing_topic(&self.name) else {
            return Ok(0);
        };
        let (first, _) = t.bounds();
        let records = self.broker.inner.snapshot_async(&t, first, max).await;
        let Some(last) = records.last().map(|r| r.offset()) else {
            return Ok(0);
        };
        let letters: Vec<Message> = records
            .iter()
            .filter_map(|r| DeadLetter::from_record(r))
            .map(|d| d.message)
            .collect();
        let n = letters.len();
        self.broker
            .publish_batch(self.source.as_str(), letters)
            .await?;
        self.broker.inner.truncate_before_async(&t, last + 1).await;
        Ok(n)
    }

    /// Deletes every dead letter. Returns how many. On a durable broker the store is trimmed
    /// on an I/O thread while the calling thread waits.
    pub fn purge(&self) -> usize {
        let inner = &self.broker.inner;
        inner
            .existing_topic(&self.name)
            .map_or(0, |t| inner.truncate_before(&t, u64::MAX) as usize)
    }
}
