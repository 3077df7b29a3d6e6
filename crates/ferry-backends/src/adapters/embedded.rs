//! The embedded Ferry engine (`memory://`, `file:///dir`): everything is native.
//!
//! The [`Queue`](crate::Queue) features map to the engine's own: the `ferry-deliver-at` header
//! becomes the message's native delivery time (and is removed), `ferry-expires-at` its native
//! expiry (expired records are skipped by the engine and counted in the broker's stats, not in
//! the `Queue`'s), `ferry-priority` its native priority (one topic; the engine delivers higher
//! priorities first), and redrive and purge of dead letters are the engine's. Dead letters
//! rejected with a reason carry that reason text in `ferry-dlq-reason` (otherwise the kind:
//! `max_attempts`, `expired`). Publish-side de-duplication is emulated by the `Queue`.
//!
//! Query parameters: `retain=N` keeps up to N consumed records per topic for replay
//! (default 100000; `0` releases records once every subscription has read them, so `Earliest`
//! only sees what is unread), `close_timeout_ms=N` how long [`Backend::close`] lets
//! subscribers drain (default 1000).

use std::time::Duration;

use async_trait::async_trait;
use ferry::{
    AckError, Broker, BrokerConfig, DeadLetter, DeadLetterReason, Message, MessageId, PublishError,
    RecvError, Retention, StartPosition, SubscribeError, TopicConfig,
};

use crate::api::{
    Acker, Backend, BackendMessage, BackendSubscription, Delivery, Position, PublishAck, Start,
    SubscribeOptions, DLQ_ATTEMPTS_HEADER, DLQ_REASON_HEADER, DLQ_TOPIC_HEADER,
};
use crate::api::{Priority, DELIVER_AT_HEADER};
use crate::capabilities::{Capabilities, Support};
use crate::connect::query_num;
use crate::error::{BackendError, Result};
use crate::filter::{check_filter, check_topic};

const NAME: &str = "ferry";
/// Header keeping a message id that is not a UUID.
const ID_HEADER: &str = "ferry-backend-id";

/// The embedded Ferry broker behind the [`Backend`] API.
#[derive(Debug, Clone)]
pub struct EmbeddedBackend {
    broker: Broker,
    close_timeout: Duration,
}

impl EmbeddedBackend {
    /// The capability table: the engine does everything itself.
    pub const fn capabilities() -> Capabilities {
        Capabilities {
            fanout: Support::Native,
            groups: Support::Native,
            ordering: Support::Native,
            ack_timeout: Support::Native,
            nack_delay: Support::Native,
            dead_letter: Support::Native,
            wildcards: Support::Native,
            replay: Support::Native,
            durable_groups: Support::Native,
            atomic_batch: Support::Native,
            retries: Support::Native,
            redrive: Support::Native,
            ttl: Support::Native,
            delayed_delivery: Support::Native,
            priority: Support::Native,
            dedup: Support::Emulated,
            middleware: Support::Emulated,
            stats: Support::Emulated,
        }
    }

    /// Wraps an existing broker ([`Backend::close`] shuts it down).
    pub fn new(broker: Broker) -> Self {
        EmbeddedBackend {
            broker,
            close_timeout: Duration::from_secs(1),
        }
    }

    /// An in-memory broker that keeps up to `retain` consumed records per topic for replay.
    pub fn memory(retain: usize) -> Self {
        EmbeddedBackend::new(Broker::new(config(retain)))
    }

    /// The broker.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    pub(crate) fn from_url(url: &url::Url) -> Result<Self> {
        let mut b = EmbeddedBackend::memory(query_num(url, "retain")?.unwrap_or(100_000));
        if let Some(ms) = query_num(url, "close_timeout_ms")? {
            b.close_timeout = Duration::from_millis(ms);
        }
        Ok(b)
    }

    pub(crate) async fn open_url(url: &url::Url) -> Result<Self> {
        let path = url.to_file_path().map_err(|()| BackendError::InvalidUrl {
            url: url.to_string(),
            reason: "expected file:///absolute/path".into(),
        })?;
        let retain = query_num(url, "retain")?.unwrap_or(100_000);
        let broker = tokio::task::spawn_blocking(move || {
            Broker::open_with(&path, config(retain), ferry::disk::DiskConfig::default())
        })
        .await
        .map_err(|e| BackendError::backend(NAME, "open", e))?
        .map_err(|e| BackendError::backend(NAME, "open", e))?;
        let mut b = EmbeddedBackend::new(broker);
        if let Some(ms) = query_num(url, "close_timeout_ms")? {
            b.close_timeout = Duration::from_millis(ms);
        }
        Ok(b)
    }
}

fn config(retain: usize) -> BrokerConfig {
    BrokerConfig {
        topic_defaults: TopicConfig {
            keep_consumed: retain > 0,
            retention: Retention {
                max_messages: Some(retain.max(1)),
                ..Retention::default()
            },
            ..TopicConfig::default()
        },
        ..BrokerConfig::default()
    }
}

/// The engine's message: the delay, expiry and priority headers become the engine's native
/// fields (the delay header is consumed: the engine holds the message back itself).
fn to_ferry(mut m: BackendMessage) -> Message {
    let deliver_at = m.deliver_at();
    m.headers.remove(DELIVER_AT_HEADER);
    let expires_at = m.expires_at();
    let priority = match m.priority() {
        Priority::Low => ferry::Priority::Low,
        Priority::Normal => ferry::Priority::Normal,
        Priority::High => ferry::Priority::High,
    };
    let mut b = Message::builder().payload(m.payload).priority(priority);
    if let Some(at) = deliver_at {
        b = b.deliver_at(at);
    }
    if let Some(at) = expires_at {
        b = b.expires_at(at);
    }
    match uuid::Uuid::parse_str(&m.id) {
        Ok(u) => b = b.id(MessageId::from_uuid(u)),
        Err(_) => b = b.header(ID_HEADER, m.id),
    }
    for (k, v) in m.headers {
        b = b.header(k, v);
    }
    if let Some(k) = m.key {
        b = b.key(k);
    }
    b.build()
}

fn from_ferry(m: &Message) -> BackendMessage {
    let mut headers = std::collections::BTreeMap::new();
    let mut id = None;
    for (k, v) in m.headers().iter() {
        if k == ID_HEADER {
            id = Some(v.to_string());
        } else {
            headers.insert(k.to_string(), v.to_string());
        }
    }
    BackendMessage {
        id: id.unwrap_or_else(|| m.id().as_uuid().to_string()),
        payload: m.payload().clone(),
        headers,
        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
    }
}

fn publish_error(e: PublishError) -> BackendError {
    match e {
        PublishError::Closed => BackendError::Closed,
        PublishError::InvalidTopic(t) => BackendError::Invalid(t.to_string()),
        PublishError::Timeout(t) => BackendError::Timeout {
            backend: NAME,
            operation: format!("publish to {t}"),
            after: Duration::ZERO,
        },
        // The records reached the store but its write or sync failed (or the broker closed
        // before the sync): they may be delivered.
        PublishError::InDoubt { topic, reason } => {
            BackendError::in_doubt(NAME, format!("publish to {topic}"), reason)
        }
        other => BackendError::rejected(NAME, "publish", other),
    }
}

fn subscribe_error(e: SubscribeError) -> BackendError {
    match e {
        SubscribeError::Closed => BackendError::Closed,
        SubscribeError::InvalidFilter(t) => BackendError::Invalid(t.to_string()),
        SubscribeError::InvalidOption(o) => BackendError::Invalid(o.to_string()),
        other => BackendError::rejected(NAME, "subscribe", other),
    }
}

fn ack_error(e: AckError) -> BackendError {
    match e {
        AckError::Stale => BackendError::Stale,
        AckError::Gone => BackendError::Closed,
    }
}

#[async_trait]
impl Backend for EmbeddedBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Self::capabilities()
    }

    async fn publish(&self, topic: &str, message: BackendMessage) -> Result<PublishAck> {
        check_topic(topic)?;
        let id = message.id.clone();
        let offset = self
            .broker
            .publish(topic, to_ferry(message))
            .await
            .map_err(publish_error)?;
        Ok(PublishAck {
            id,
            position: Position::Offset(offset),
        })
    }

    async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<BackendMessage>,
    ) -> Result<Vec<PublishAck>> {
        check_topic(topic)?;
        let ids: Vec<String> = messages.iter().map(|m| m.id.clone()).collect();
        let range = self
            .broker
            .publish_batch(topic, messages.into_iter().map(to_ferry))
            .await
            .map_err(publish_error)?;
        Ok(ids
            .into_iter()
            .zip(range)
            .map(|(id, offset)| PublishAck {
                id,
                position: Position::Offset(offset),
            })
            .collect())
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn BackendSubscription>> {
        options.validate()?;
        check_filter(&options.filter)?;
        let mut b = self
            .broker
            .subscription(&options.filter)
            .manual_ack()
            .ack_timeout(options.ack_timeout)
            .max_attempts(options.max_attempts)
            .prefetch(options.prefetch)
            .start(match options.start {
                Start::Latest => StartPosition::Latest,
                Start::Earliest => StartPosition::Earliest,
            });
        if let Some(g) = &options.group {
            b = b.group(g.clone());
        }
        let sub = b.build().map_err(subscribe_error)?;
        Ok(Box::new(EmbeddedSubscription {
            sub,
            dead_letters: false,
        }))
    }

    async fn dead_letters(&self, topic: &str) -> Result<Box<dyn BackendSubscription>> {
        check_topic(topic)?;
        let sub = self
            .broker
            .dead_letters(topic)
            .map_err(|e| BackendError::Invalid(e.to_string()))?
            .subscription()
            .manual_ack()
            .build()
            .map_err(subscribe_error)?;
        Ok(Box::new(EmbeddedSubscription {
            sub,
            dead_letters: true,
        }))
    }

    async fn redrive_dead_letters(&self, topic: &str, max: usize) -> Result<usize> {
        check_topic(topic)?;
        let dlq = self
            .broker
            .dead_letters(topic)
            .map_err(|e| BackendError::Invalid(e.to_string()))?;
        dlq.redrive(max)
            .await
            .map_err(|e| BackendError::rejected(NAME, "redrive", e))
    }

    async fn purge_dead_letters(&self, topic: &str) -> Result<usize> {
        check_topic(topic)?;
        let dlq = self
            .broker
            .dead_letters(topic)
            .map_err(|e| BackendError::Invalid(e.to_string()))?;
        Ok(dlq.purge())
    }

    async fn delete_topic(&self, topic: &str) -> Result<()> {
        check_topic(topic)?;
        // The engine has no topic deletion yet: drop the dead letters at least.
        if let Ok(dlq) = self.broker.dead_letters(topic) {
            dlq.purge();
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.broker.shutdown(self.close_timeout).await;
        Ok(())
    }
}

struct EmbeddedSubscription {
    sub: ferry::Subscription,
    dead_letters: bool,
}

#[async_trait]
impl BackendSubscription for EmbeddedSubscription {
    async fn next(&mut self) -> Result<Delivery> {
        loop {
            let d = self.sub.recv().await.map_err(|e| match e {
                RecvError::Closed | RecvError::Evicted => BackendError::Closed,
            })?;
            let topic = d.topic().as_str().to_string();
            let attempt = d.attempt();
            if !self.dead_letters {
                let message = from_ferry(d.message());
                return Ok(Delivery::new(
                    message,
                    topic,
                    attempt,
                    Box::new(EmbeddedAcker(d)),
                ));
            }
            let Some(letter) = DeadLetter::from_record(d.record()) else {
                // Not a dead letter (cannot happen on a `$dlq/` topic): skip it.
                let _ = d.ack();
                continue;
            };
            let mut message = from_ferry(&letter.message);
            let reason = match &letter.reason {
                DeadLetterReason::Rejected(text) => text.clone(),
                other => other.kind().to_string(),
            };
            message.headers.insert(DLQ_REASON_HEADER.into(), reason);
            message
                .headers
                .insert(DLQ_ATTEMPTS_HEADER.into(), letter.attempts.to_string());
            message
                .headers
                .insert(DLQ_TOPIC_HEADER.into(), letter.source_topic.clone());
            return Ok(Delivery::new(
                message,
                letter.source_topic,
                attempt,
                Box::new(EmbeddedAcker(d)),
            ));
        }
    }

    async fn close(self: Box<Self>) -> Result<()> {
        drop(self);
        Ok(())
    }
}

struct EmbeddedAcker(ferry::Delivery);

#[async_trait]
impl Acker for EmbeddedAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.0.ack().map_err(ack_error)
    }

    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        match delay {
            None => self.0.nack(),
            Some(d) => self.0.nack_after(d),
        }
        .map_err(ack_error)
    }

    async fn reject(self: Box<Self>, reason: String) -> Result<()> {
        self.0.reject(reason).map_err(ack_error)
    }
}
