//! Messages: what producers publish and what consumers receive.
//!
//! A [`Message`] is an immutable envelope around a zero-copy [`Bytes`] payload with a time-ordered
//! [`MessageId`] (UUID v7), headers, a wall-clock timestamp and an optional key and producer id.
//! Publishing wraps it in a [`Record`] that adds the topic and the offset the topic's log assigned;
//! records are shared (`Arc`) between every subscription that reads them and are never copied.
//!
//! Invariant: a record's offset is unique and increasing within its topic.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::topic::TopicName;
use uuid::Uuid;

/// A unique, time-ordered message id (a UUID v7: the first 48 bits are the Unix time in ms).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(Uuid);

impl MessageId {
    /// A new id, greater than every id made before it on this thread.
    pub fn new() -> Self {
        Self::at(SystemTime::now())
    }

    fn at(now: SystemTime) -> Self {
        thread_local! {
            // (last millisecond, counter, salt): the counter starts at a random value per thread
            // and is incremented per id, so ids from one thread are strictly increasing; the
            // random salt keeps threads (and processes) starting in the same millisecond apart.
            static STATE: Cell<(u64, u64, u16)> = Cell::new(seed());
        }
        let ms = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let (ms, counter, salt) = STATE.with(|s| {
            let (last, counter, salt) = s.get();
            let ms = ms.max(last);
            let next = counter.wrapping_add(1);
            s.set((ms, next, salt));
            (ms, next, salt)
        });
        let mut random = [0u8; 10];
        random[..8].copy_from_slice(&counter.to_be_bytes());
        random[8..].copy_from_slice(&salt.to_be_bytes());
        MessageId(uuid::Builder::from_unix_timestamp_millis(ms, &random).into_uuid())
    }

    /// Wraps an existing UUID (for example one received over the network).
    pub fn from_uuid(uuid: Uuid) -> Self {
        MessageId(uuid)
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

fn seed() -> (u64, u64, u16) {
    let random = RandomState::new().hash_one(std::thread::current().id());
    // The counter's top bits stay clear so that it does not wrap in practice.
    (0, random & 0x0000_FFFF_FFFF_FFFF, (random >> 48) as u16)
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.0)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Message headers: an ordered list of string pairs. Keys may repeat (as MQTT user properties
/// do); [`Headers::get`] returns the first value for a key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// An empty header list (no allocation).
    pub fn new() -> Self {
        Headers(Vec::new())
    }

    /// The first value stored under `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets `key` to `value`, replacing every earlier value of `key`.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) {
        let key = key.into();
        self.0.retain(|(k, _)| *k != key);
        self.0.push((key, value.into()));
    }

    /// Appends a pair, keeping earlier values of the same key.
    pub fn append(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.0.push((key.into(), value.into()));
    }

    /// Removes every value of `key`; returns whether there was one.
    pub fn remove(&mut self, key: &str) -> bool {
        let before = self.0.len();
        self.0.retain(|(k, _)| k != key);
        self.0.len() != before
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Iterates over the pairs in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The number of pairs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no headers.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Approximate heap size, used for memory accounting.
    pub(crate) fn size(&self) -> usize {
        self.0.iter().map(|(k, v)| k.len() + v.len() + 48).sum()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Headers(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

/// Delivery priority: among the messages waiting for a subscription, higher priority is
/// delivered first, first-in first-out within a level.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// The lowest level.
    Lowest = 0,
    /// Below normal.
    Low = 1,
    /// The default.
    #[default]
    Normal = 2,
    /// Above normal.
    High = 3,
    /// The highest level.
    Highest = 4,
}

impl Priority {
    /// Every level, lowest first.
    pub const ALL: [Priority; 5] = [
        Priority::Lowest,
        Priority::Low,
        Priority::Normal,
        Priority::High,
        Priority::Highest,
    ];
}

/// Errors from encoding or decoding a JSON payload.
#[derive(Debug, thiserror::Error)]
#[error("payload is not valid JSON for the requested type: {0}")]
pub struct PayloadError(#[from] serde_json::Error);

/// An immutable message. Build one with [`Message::new`], [`Message::json`] or
/// [`Message::builder`]; anything that converts into [`Bytes`] converts into a message.
#[derive(Clone)]
pub struct Message {
    id: MessageId,
    payload: Bytes,
    timestamp: SystemTime,
    /// Headers, key, producer id, expiry and delivery time: boxed, and absent when none is set,
    /// so that a plain message (and every record made of one) stays small: it is moved on each
    /// publish and stored in the topic's log.
    extra: Option<Box<Extra>>,
    priority: Priority,
}

/// The fields of a message that most messages do not set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Extra {
    headers: Headers,
    key: Option<Bytes>,
    producer_id: Option<Arc<str>>,
    expires_at: Option<SystemTime>,
    deliver_at: Option<SystemTime>,
}

/// What a message without [`Extra`] reads as.
static NO_EXTRA: Extra = Extra {
    headers: Headers(Vec::new()),
    key: None,
    producer_id: None,
    expires_at: None,
    deliver_at: None,
};

impl PartialEq for Message {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.payload == other.payload
            && self.timestamp == other.timestamp
            && self.priority == other.priority
            && self.extra() == other.extra()
    }
}

impl Eq for Message {}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let extra = self.extra();
        f.debug_struct("Message")
            .field("id", &self.id)
            .field("payload", &self.payload)
            .field("headers", &extra.headers)
            .field("timestamp", &self.timestamp)
            .field("key", &extra.key)
            .field("producer_id", &extra.producer_id)
            .field("expires_at", &extra.expires_at)
            .field("deliver_at", &extra.deliver_at)
            .field("priority", &self.priority)
            .finish()
    }
}

impl Message {
    /// A message with this payload, a fresh id and the current time.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        let timestamp = SystemTime::now();
        Message {
            id: MessageId::at(timestamp),
            payload: payload.into(),
            timestamp,
            extra: None,
            priority: Priority::Normal,
        }
    }

    fn extra(&self) -> &Extra {
        self.extra.as_deref().unwrap_or(&NO_EXTRA)
    }

    fn extra_mut(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    /// A message whose payload is `value` encoded as JSON, with `content-type: application/json`.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self, PayloadError> {
        let payload = serde_json::to_vec(value)?;
        Ok(Message::builder()
            .payload(payload)
            .header("content-type", "application/json")
            .build())
    }

    /// A builder for a message with headers, key or producer id.
    pub fn builder() -> MessageBuilder {
        MessageBuilder {
            message: Message::new(Bytes::new()),
        }
    }

    /// The message id.
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// The payload (cheap to clone: reference counted).
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Decodes the JSON payload into `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, PayloadError> {
        Ok(serde_json::from_slice(&self.payload)?)
    }

    /// The headers.
    pub fn headers(&self) -> &Headers {
        &self.extra().headers
    }

    /// The first value of header `key`.
    pub fn header(&self, key: &str) -> Option<&str> {
        self.extra().headers.get(key)
    }

    /// When the message was created.
    pub fn timestamp(&self) -> SystemTime {
        self.timestamp
    }

    /// The optional partitioning/ordering key.
    pub fn key(&self) -> Option<&Bytes> {
        self.extra().key.as_ref()
    }

    /// When the message expires: it is never delivered after that.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.extra().expires_at
    }

    /// Its delivery priority.
    pub fn priority(&self) -> Priority {
        self.priority
    }

    /// When the message is to be delivered: it is appended (and gets its offset) at once, but no
    /// subscription receives it before then.
    pub fn deliver_at(&self) -> Option<SystemTime> {
        self.extra().deliver_at
    }

    /// The optional id of the producer that created the message.
    pub fn producer_id(&self) -> Option<&str> {
        self.extra().producer_id.as_deref()
    }

    /// A copy with one more header (builder style, for messages already built).
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra_mut().headers.insert(key, value);
        self
    }

    /// Approximate memory used by the message, for retention and stats.
    pub fn size(&self) -> usize {
        let extra = self.extra.as_deref().map_or(0, |e| {
            std::mem::size_of::<Extra>() + e.headers.size() + e.key.as_ref().map_or(0, Bytes::len)
        });
        self.payload.len() + extra + std::mem::size_of::<Message>()
    }

    pub(crate) fn set_producer_if_missing(&mut self, producer: &Option<Arc<str>>) {
        if let Some(p) = producer {
            if self.extra().producer_id.is_none() {
                self.extra_mut().producer_id = Some(p.clone());
            }
        }
    }

    pub(crate) fn headers_mut(&mut self) -> &mut Headers {
        &mut self.extra_mut().headers
    }
}

impl<T: Into<Bytes>> From<T> for Message {
    fn from(payload: T) -> Self {
        Message::new(payload)
    }
}

/// Builds a [`Message`].
#[derive(Debug)]
#[must_use]
pub struct MessageBuilder {
    message: Message,
}

impl MessageBuilder {
    /// Sets the payload.
    pub fn payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.message.payload = payload.into();
        self
    }

    /// Adds a header (replacing an earlier value of the same key).
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.message.extra_mut().headers.insert(key, value);
        self
    }

    /// Adds a header, keeping earlier values of the same key (for protocols whose properties
    /// may repeat, such as MQTT user properties).
    pub fn append_header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.message.extra_mut().headers.append(key, value);
        self
    }

    /// Sets the key.
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.message.extra_mut().key = Some(key.into());
        self
    }

    /// Sets the producer id.
    pub fn producer(mut self, producer: impl Into<Arc<str>>) -> Self {
        self.message.extra_mut().producer_id = Some(producer.into());
        self
    }

    /// Overrides the id (for example to keep an id assigned upstream).
    pub fn id(mut self, id: MessageId) -> Self {
        self.message.id = id;
        self
    }

    /// Expires the message `ttl` after its timestamp.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.message.extra_mut().expires_at = self.message.timestamp.checked_add(ttl);
        self
    }

    /// Expires the message at `at`.
    pub fn expires_at(mut self, at: SystemTime) -> Self {
        self.message.extra_mut().expires_at = Some(at);
        self
    }

    /// Marks the message as one of the `size` messages of group `id` (see
    /// [`GroupCollector`](crate::tasks::GroupCollector)).
    pub fn in_group(self, id: impl Into<String>, size: usize) -> Self {
        self.header(crate::tasks::headers::GROUP_ID, id)
            .header(crate::tasks::headers::GROUP_SIZE, size.to_string())
    }

    /// Sets the delivery priority.
    pub fn priority(mut self, priority: Priority) -> Self {
        self.message.priority = priority;
        self
    }

    /// Delivers the message `delay` after its timestamp, not before.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.message.extra_mut().deliver_at = self.message.timestamp.checked_add(delay);
        self
    }

    /// Delivers the message at `at`, not before.
    pub fn deliver_at(mut self, at: SystemTime) -> Self {
        self.message.extra_mut().deliver_at = Some(at);
        self
    }

    /// Overrides the timestamp.
    pub fn timestamp(mut self, timestamp: SystemTime) -> Self {
        self.message.timestamp = timestamp;
        self
    }

    /// The message.
    pub fn build(self) -> Message {
        self.message
    }
}

/// A published message as stored in a topic's log: the message, its offset and its topic's
/// name. The name is shared with the topic: one reference count per publish, so that a delivery
/// (which reads the name through its record) adds none of its own.
#[derive(Debug)]
pub struct Record {
    /// The topic it was published to.
    pub(crate) topic: TopicName,
    /// When it expires, on the broker's (virtualisable) clock.
    pub(crate) expires: Option<tokio::time::Instant>,
    /// Not to be delivered before this, on the broker's clock.
    pub(crate) not_before: Option<tokio::time::Instant>,
    /// Set once, under the topic's log lock, before the record becomes visible (the log's
    /// SeqCst tail publishes it); a plain store, so appending costs no read-modify-write.
    offset: AtomicU64,
    pub(crate) message: Message,
}

impl Record {
    /// Wraps a message for appending (outside any lock); the log sets the offset.
    pub(crate) fn pending(
        topic: TopicName,
        message: Message,
        expires: Option<tokio::time::Instant>,
        not_before: Option<tokio::time::Instant>,
    ) -> Arc<Record> {
        Arc::new(Record {
            topic,
            offset: AtomicU64::new(0),
            message,
            expires,
            not_before,
        })
    }

    pub(crate) fn set_offset(&self, offset: u64) {
        self.offset.store(offset, Ordering::Relaxed);
    }

    /// Whether the record has expired at `now`.
    pub(crate) fn expired(&self, now: tokio::time::Instant) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }

    /// Its offset in the topic (0 for the topic's first record).
    pub fn offset(&self) -> u64 {
        self.offset.load(Ordering::Relaxed)
    }

    /// The message.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The topic it was published to.
    pub fn topic(&self) -> &TopicName {
        &self.topic
    }
}

impl std::ops::Deref for Record {
    type Target = Message;
    fn deref(&self) -> &Message {
        &self.message
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn plain_messages_stay_small() {
        // The rarely set fields live in one optional box: a plain message is its id, payload,
        // timestamp, that pointer and its priority.
        assert!(std::mem::size_of::<Message>() <= 80);
        let plain = Message::new("x");
        assert!(plain.extra.is_none());
        // A builder that sets nothing rare reads the same as one that never allocated.
        let same = Message::builder()
            .id(plain.id())
            .timestamp(plain.timestamp())
            .payload("x")
            .build();
        assert_eq!(plain, same);
        let ttl = Message::builder().ttl(Duration::from_secs(1)).build();
        assert!(ttl.expires_at().is_some() && ttl.headers().is_empty() && ttl.key().is_none());
    }

    #[test]
    fn ids_are_unique_and_ordered_per_thread() {
        let ids: Vec<MessageId> = (0..10_000).map(|_| MessageId::new()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(ids[0].as_uuid().get_version_num(), 7);
    }

    #[test]
    fn header_replaces_and_append_header_keeps() {
        let m = Message::builder()
            .header("a", "1")
            .header("a", "2")
            .append_header("b", "1")
            .append_header("b", "2")
            .build();
        let pairs: Vec<_> = m.headers().iter().collect();
        assert_eq!(pairs, vec![("a", "2"), ("b", "1"), ("b", "2")]);
    }

    #[test]
    fn json_round_trip() {
        #[derive(Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Point {
            gpu: u32,
            util: f64,
        }
        let m = Message::json(&Point { gpu: 3, util: 0.5 }).unwrap();
        assert_eq!(m.header("content-type"), Some("application/json"));
        assert_eq!(m.decode::<Point>().unwrap(), Point { gpu: 3, util: 0.5 });
        assert!(m.decode::<Vec<u8>>().is_err());
    }

    #[test]
    fn builder_sets_fields() {
        let m = Message::builder()
            .payload("x")
            .header("source", "streamer-1")
            .header("source", "streamer-2")
            .key("k")
            .producer("p")
            .build();
        assert_eq!(m.payload().as_ref(), b"x");
        assert_eq!(m.header("source"), Some("streamer-2"));
        assert_eq!(m.headers().len(), 1);
        assert_eq!(m.key().map(|k| k.as_ref()), Some(&b"k"[..]));
        assert_eq!(m.producer_id(), Some("p"));
    }
}
