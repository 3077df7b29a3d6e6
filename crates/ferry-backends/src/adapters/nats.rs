//! NATS JetStream (`nats://host:4222`).
//!
//! **Mapping.** One stream (default `FERRY`, `?stream=NAME`) holds every topic under the subject
//! prefix (default `ferry`, `?prefix=P`): topic `t` is subject `P.t.t`, its dead letters
//! `P.dlq.t`. Because all topics share one stream, wildcard filters are native JetStream subject
//! filters (`*`, and `#` as `>`). A consumer group is a durable pull consumer (named from the
//! group and the filter, so the same group name on two filters is two groups); a fanout
//! subscription is an ephemeral pull consumer deleted when the subscription closes.
//! Durable consumers left unused for `?inactive_s=N` seconds (default 86400) are removed by
//! the server.
//!
//! **Delivery.** Ack timeout is the consumer's `ack_wait`; nack (with a delay) is `-NAK`;
//! attempt counts are JetStream's delivery counts. JetStream has no dead-letter queue: the
//! adapter dead-letters (publishes to `P.dlq.<topic>` and terminates the original) when a
//! delivery is nacked on its last attempt, rejected, or arrives with more attempts than allowed
//! (the consumer's `max_deliver` is `max_attempts + 1`, so the extra delivery after an ack timeout
//! on the last attempt is the adapter's chance to dead-letter it; if no subscriber is running
//! then, the message stays unacknowledged in the stream).
//!
//! **Connection loss.** async-nats reconnects by itself (without limit) and the pull
//! subscriptions resume. Meanwhile a publish fails after the
//! [`operation_timeout`](crate::ConnectOptions::operation_timeout) with
//! [`BackendError::InDoubt`] (the client buffers the message and may still send it once
//! reconnected: its `Nats-Msg-Id` header lets the server drop a retry of the same message, same
//! id, within the stream's 2-minute duplicate window, so [`Queue`](crate::Queue) resends it).
//! A publish not handed to the client in time (its buffer full) fails with
//! [`BackendError::Timeout`]: not sent.
//!
//! **De-duplication (native).** Every publish carries the message id as `Nats-Msg-Id`, so the
//! server drops a second publish of the same id within the stream's duplicate window (2
//! minutes); a message republished by a redrive (header `ferry-redriven: N`) uses `<id>~redriven-N`
//! instead, so that it is not dropped as a duplicate of itself. Acknowledging a delivery of
//! [`dead_letters`](Backend::dead_letters) deletes the dead letter from the stream.
//!
//! **Limits.** `publish_batch` is pipelined, not atomic. Ordering holds per subscriber (with
//! several group members, each sees its share in order).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream, AckKind};
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use async_trait::async_trait;
use futures::StreamExt;
use parking_lot::Mutex;

use crate::api::{
    Acker, Backend, BackendMessage, BackendSubscription, Delivery, Position, PublishAck, Start,
    SubscribeOptions, DLQ_ATTEMPTS_HEADER, DLQ_REASON_HEADER, DLQ_TOPIC_HEADER, REDRIVEN_HEADER,
};
use crate::capabilities::{Capabilities, Support};
use crate::connect::{
    bounded, query, query_num, timeout_is_unreachable, ConnectOptions, Lifecycle,
};
use crate::error::{BackendError, Result};
use crate::filter::{check_filter, check_topic, safe_name, to_nats};

const NAME: &str = "nats";
const ID_HEADER: &str = "Ferry-Id";
const KEY_HEADER: &str = "Ferry-Key";
const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// The NATS JetStream backend.
pub struct NatsBackend {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: String,
    prefix: String,
    inactive: Duration,
    /// Bound of one publish (send + acknowledgement).
    op_timeout: Duration,
    life: Lifecycle,
    /// Durable consumers made by this handle, by exact topic filter (for `delete_topic`).
    durables: Mutex<HashMap<String, HashSet<String>>>,
}

impl std::fmt::Debug for NatsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBackend")
            .field("stream", &self.stream)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl NatsBackend {
    /// The capability table.
    pub const fn capabilities() -> Capabilities {
        Capabilities {
            fanout: Support::Native,
            groups: Support::Native,
            ordering: Support::Native,
            ack_timeout: Support::Native,
            nack_delay: Support::Native,
            dead_letter: Support::Emulated,
            wildcards: Support::Native,
            replay: Support::Native,
            durable_groups: Support::Native,
            atomic_batch: Support::Unsupported,
            retries: Support::Native,
            redrive: Support::Emulated,
            ttl: Support::Emulated,
            delayed_delivery: Support::Emulated,
            priority: Support::Emulated,
            dedup: Support::Native,
            middleware: Support::Emulated,
            stats: Support::Emulated,
        }
    }

    pub(crate) async fn connect(url: &url::Url, options: &ConnectOptions) -> Result<Self> {
        let stream_name = query(url, "stream").unwrap_or_else(|| "FERRY".into());
        let prefix = query(url, "prefix").unwrap_or_else(|| "ferry".into());
        if stream_name.is_empty()
            || !stream_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(BackendError::InvalidUrl {
                url: url.to_string(),
                reason: "stream must be made of [A-Za-z0-9_-]".into(),
            });
        }
        check_topic(&prefix)?;
        let inactive = Duration::from_secs(query_num(url, "inactive_s")?.unwrap_or(86_400));
        let host = url.host_str().unwrap_or("127.0.0.1");
        let port = url.port().unwrap_or(4222);
        let addr = format!("nats://{host}:{port}");
        let mut opts = async_nats::ConnectOptions::new()
            .connection_timeout(options.retry.attempt_timeout)
            .max_reconnects(None);
        if !url.username().is_empty() {
            opts = opts.user_and_password(
                url.username().to_string(),
                url.password().unwrap_or("").to_string(),
            );
        }
        let client = options
            .retry
            .run(NAME, "connect", || {
                let opts = opts.clone();
                let addr = addr.clone();
                async move {
                    opts.connect(addr.as_str())
                        .await
                        .map_err(|e| BackendError::Unreachable {
                            backend: NAME,
                            reason: e.to_string(),
                        })
                }
            })
            .await
            .map_err(timeout_is_unreachable)?;
        let js = jetstream::new(client.clone());
        let subjects = vec![format!("{prefix}.>")];
        let config = stream::Config {
            name: stream_name.clone(),
            subjects: subjects.clone(),
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        let s = options
            .retry
            .run(NAME, "create stream", || {
                let js = js.clone();
                let config = config.clone();
                async move {
                    js.get_or_create_stream(config)
                        .await
                        .map_err(|e| BackendError::rejected(NAME, "create stream", e))
                }
            })
            .await?;
        let mut s = s;
        let info = s
            .info()
            .await
            .map_err(|e| BackendError::backend(NAME, "stream info", e))?;
        if !info.config.subjects.iter().any(|x| *x == subjects[0]) {
            return Err(BackendError::rejected(
                NAME,
                "create stream",
                format!(
                    "stream {stream_name} exists with subjects {:?}, not {}",
                    info.config.subjects, subjects[0]
                ),
            ));
        }
        Ok(NatsBackend {
            client,
            js,
            stream: stream_name,
            prefix,
            inactive,
            op_timeout: options.operation_timeout,
            life: Lifecycle::default(),
            durables: Mutex::new(HashMap::new()),
        })
    }

    fn subject(&self, topic: &str) -> String {
        format!("{}.t.{topic}", self.prefix)
    }

    fn dlq_subject(&self, topic: &str) -> String {
        format!("{}.dlq.{topic}", self.prefix)
    }

    async fn stream(&self) -> Result<stream::Stream> {
        self.js
            .get_stream(&self.stream)
            .await
            .map_err(|e| BackendError::backend(NAME, "get stream", e))
    }

    async fn pull(
        &self,
        config: consumer::pull::Config,
        durable: bool,
        ack_topic_prefix: String,
        max_attempts: u32,
        prefetch: usize,
        dead_letters: bool,
    ) -> Result<Box<dyn BackendSubscription>> {
        let stream = self.stream().await?;
        let name = config.name.clone().unwrap_or_default();
        let consumer: consumer::PullConsumer = if durable {
            stream
                .get_or_create_consumer(&name, config)
                .await
                .map_err(|e| BackendError::rejected(NAME, "create consumer", e))?
        } else {
            stream
                .create_consumer(config)
                .await
                .map_err(|e| BackendError::rejected(NAME, "create consumer", e))?
        };
        let messages = consumer
            .stream()
            .max_messages_per_batch(prefetch.clamp(1, 256))
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| BackendError::backend(NAME, "pull", e))?;
        Ok(Box::new(NatsSubscription {
            messages,
            cancel: self.life.child(),
            shared: Arc::new(Shared {
                js: self.js.clone(),
                prefix: self.prefix.clone(),
                remove_on_ack: dead_letters.then(|| stream.clone()),
            }),
            topic_prefix: ack_topic_prefix,
            max_attempts,
            ephemeral: (!durable).then_some((stream, name)),
        }))
    }
}

/// What deliveries need to dead-letter.
struct Shared {
    js: jetstream::Context,
    prefix: String,
    /// Dead-letter subscriptions: an acknowledged dead letter is deleted from the stream.
    remove_on_ack: Option<stream::Stream>,
}

fn headers_of(message: &BackendMessage, with_dedup: bool) -> Result<HeaderMap> {
    let mut h = HeaderMap::new();
    let invalid =
        |what: &str| BackendError::Invalid(format!("header {what} is not valid for NATS"));
    for (k, v) in &message.headers {
        let name = HeaderName::from_str(k).map_err(|_| invalid(k))?;
        let value = HeaderValue::from_str(v).map_err(|_| invalid(k))?;
        h.insert(name, value);
    }
    let id = HeaderValue::from_str(&message.id).map_err(|_| invalid("id"))?;
    h.insert(HeaderName::from_static(ID_HEADER), id.clone());
    if with_dedup {
        // A redriven message keeps its id but must not be dropped as a duplicate of itself.
        let dedup_id = match message.header(REDRIVEN_HEADER) {
            Some(n) => HeaderValue::from_str(&format!("{}~redriven-{n}", message.id))
                .map_err(|_| invalid("id"))?,
            None => id,
        };
        h.insert(HeaderName::from_static(MSG_ID_HEADER), dedup_id);
    }
    if let Some(key) = &message.key {
        let key = HeaderValue::from_str(key).map_err(|_| invalid("key"))?;
        h.insert(HeaderName::from_static(KEY_HEADER), key);
    }
    Ok(h)
}

/// A publish error as a typed error: no acknowledgement in time is a timeout, a lost
/// connection makes the server unreachable, the rest is the server refusing the message.
fn publish_error(operation: &str, e: &jetstream::context::PublishError) -> BackendError {
    use jetstream::context::PublishErrorKind as K;
    match e.kind() {
        K::TimedOut => BackendError::Timeout {
            backend: NAME,
            operation: operation.to_string(),
            after: Duration::ZERO,
        },
        K::BrokenPipe => BackendError::Unreachable {
            backend: NAME,
            reason: format!("{operation}: {e}"),
        },
        _ => BackendError::rejected(NAME, operation, e),
    }
}

/// An error awaiting a sent publish's acknowledgement: no acknowledgement (a timeout, the
/// connection lost) is in doubt, as the server may have stored the message; an error the
/// server answered is a refusal (nothing stored).
fn unconfirmed(operation: &str, e: &jetstream::context::PublishError) -> BackendError {
    use jetstream::context::PublishErrorKind as K;
    match e.kind() {
        K::TimedOut | K::BrokenPipe => {
            BackendError::in_doubt(NAME, operation, format!("no acknowledgement: {e}"))
        }
        _ => publish_error(operation, e),
    }
}

/// A publish that ran out of time (or lost the connection) after the message was handed to
/// the client is in doubt; before, nothing was sent.
fn sent_in_doubt(e: BackendError, sent: bool) -> BackendError {
    match e {
        BackendError::Timeout { .. } | BackendError::Unreachable { .. } if sent => {
            BackendError::in_doubt(NAME, "publish", format!("sent, not acknowledged: {e}"))
        }
        e => e,
    }
}

/// A batch (pipelined, not atomic) that failed once a message of it was sent: some of it may
/// be stored.
fn batch_in_doubt(e: BackendError, sent: bool) -> BackendError {
    if sent && !e.is_in_doubt() {
        BackendError::in_doubt(
            NAME,
            "publish batch",
            format!("part of it may be stored: {e}"),
        )
    } else {
        e
    }
}

fn message_of(m: &async_nats::Message) -> BackendMessage {
    let mut headers = BTreeMap::new();
    let mut id = None;
    let mut key = None;
    if let Some(h) = &m.headers {
        for (name, values) in h.iter() {
            let Some(v) = values.last() else { continue };
            match name.as_ref() {
                ID_HEADER => id = Some(v.as_str().to_string()),
                KEY_HEADER => key = Some(v.as_str().to_string()),
                MSG_ID_HEADER => {}
                n => {
                    headers.insert(n.to_string(), v.as_str().to_string());
                }
            }
        }
    }
    BackendMessage {
        id: id.unwrap_or_default(),
        payload: m.payload.clone(),
        headers,
        key,
    }
}

#[async_trait]
impl Backend for NatsBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Self::capabilities()
    }

    async fn publish(&self, topic: &str, message: BackendMessage) -> Result<PublishAck> {
        self.life.check()?;
        check_topic(topic)?;
        let headers = headers_of(&message, true)?;
        // Bounded: while the client is disconnected, the send waits for room in its buffer and
        // the acknowledgement may never come.
        // Once handed to the client the message may reach the server (also after a
        // reconnect): from then on a missing acknowledgement is in doubt.
        let sent = std::sync::atomic::AtomicBool::new(false);
        let ack = bounded(NAME, "publish", self.op_timeout, async {
            let pending = self
                .js
                .publish_with_headers(self.subject(topic), headers, message.payload.clone())
                .await
                .map_err(|e| publish_error("publish", &e))?;
            sent.store(true, std::sync::atomic::Ordering::Relaxed);
            pending.await.map_err(|e| unconfirmed("publish", &e))
        })
        .await
        .map_err(|e| sent_in_doubt(e, sent.load(std::sync::atomic::Ordering::Relaxed)))?;
        Ok(PublishAck {
            id: message.id,
            position: Position::Offset(ack.sequence),
        })
    }

    async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<BackendMessage>,
    ) -> Result<Vec<PublishAck>> {
        self.life.check()?;
        check_topic(topic)?;
        let subject = self.subject(topic);
        let sent = std::sync::atomic::AtomicBool::new(false);
        bounded(NAME, "publish", self.op_timeout, async {
            let mut pending = Vec::with_capacity(messages.len());
            for m in &messages {
                let headers = headers_of(m, true)?;
                let fut = self
                    .js
                    .publish_with_headers(subject.clone(), headers, m.payload.clone())
                    .await
                    .map_err(|e| publish_error("publish", &e))?;
                sent.store(true, std::sync::atomic::Ordering::Relaxed);
                pending.push(fut);
            }
            let mut out = Vec::with_capacity(messages.len());
            for (m, fut) in messages.into_iter().zip(pending) {
                let ack = fut.await.map_err(|e| unconfirmed("publish", &e))?;
                out.push(PublishAck {
                    id: m.id,
                    position: Position::Offset(ack.sequence),
                });
            }
            Ok(out)
        })
        .await
        .map_err(|e| batch_in_doubt(e, sent.load(std::sync::atomic::Ordering::Relaxed)))
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn BackendSubscription>> {
        self.life.check()?;
        options.validate()?;
        check_filter(&options.filter)?;
        let filter_subject = self.subject(&to_nats(&options.filter));
        let deliver_policy = match options.start {
            Start::Latest => consumer::DeliverPolicy::New,
            Start::Earliest => consumer::DeliverPolicy::All,
        };
        let durable = options.group.is_some();
        let name = match &options.group {
            Some(g) => format!("g_{}", safe_name(&format!("{g}\u{0}{}", options.filter))),
            None => format!("f_{}", uuid::Uuid::new_v4().simple()),
        };
        let config = consumer::pull::Config {
            durable_name: durable.then(|| name.clone()),
            name: Some(name.clone()),
            deliver_policy,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: options.ack_timeout,
            max_deliver: i64::from(options.max_attempts) + 1,
            filter_subject,
            max_ack_pending: i64::try_from(options.prefetch.max(1000)).unwrap_or(i64::MAX),
            inactive_threshold: if durable {
                self.inactive
            } else {
                Duration::from_secs(60)
            },
            ..Default::default()
        };
        if durable {
            self.durables
                .lock()
                .entry(options.filter.clone())
                .or_default()
                .insert(name);
        }
        self.pull(
            config,
            durable,
            format!("{}.t.", self.prefix),
            options.max_attempts,
            options.prefetch,
            false,
        )
        .await
    }

    async fn dead_letters(&self, topic: &str) -> Result<Box<dyn BackendSubscription>> {
        self.life.check()?;
        check_topic(topic)?;
        let config = consumer::pull::Config {
            name: Some(format!("d_{}", uuid::Uuid::new_v4().simple())),
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            filter_subject: self.dlq_subject(topic),
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        };
        self.pull(
            config,
            false,
            format!("{}.dlq.", self.prefix),
            u32::MAX,
            64,
            true,
        )
        .await
    }

    async fn delete_topic(&self, topic: &str) -> Result<()> {
        check_topic(topic)?;
        let stream = self.stream().await?;
        let names: HashSet<String> = self.durables.lock().remove(topic).unwrap_or_default();
        for name in names {
            // Best effort: the consumer may be gone already.
            let _ = stream.delete_consumer(&name).await;
        }
        for subject in [self.subject(topic), self.dlq_subject(topic)] {
            stream
                .purge()
                .filter(subject)
                .await
                .map_err(|e| BackendError::backend(NAME, "purge", e))?;
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        if self.life.is_closed() {
            return Ok(());
        }
        self.life.close();
        let _ = self.client.flush().await;
        let _ = self.client.drain().await;
        Ok(())
    }
}

struct NatsSubscription {
    messages: consumer::pull::Stream,
    cancel: tokio_util::sync::CancellationToken,
    shared: Arc<Shared>,
    topic_prefix: String,
    max_attempts: u32,
    /// An ephemeral consumer to delete on close.
    ephemeral: Option<(stream::Stream, String)>,
}

#[async_trait]
impl BackendSubscription for NatsSubscription {
    async fn next(&mut self) -> Result<Delivery> {
        loop {
            let item = tokio::select! {
                () = self.cancel.cancelled() => return Err(BackendError::Closed),
                item = self.messages.next() => item,
            };
            let msg = match item {
                None => return Err(BackendError::Closed),
                Some(Err(e)) => {
                    use consumer::pull::MessagesErrorKind as K;
                    match e.kind() {
                        K::ConsumerDeleted | K::PushBasedConsumer => {
                            return Err(BackendError::Closed)
                        }
                        _ => {
                            tracing::debug!(error = %e, "nats pull error; continuing");
                            continue;
                        }
                    }
                }
                Some(Ok(m)) => m,
            };
            let attempt = match msg.info() {
                Ok(info) => u32::try_from(info.delivered).unwrap_or(u32::MAX),
                Err(_) => 1,
            };
            let message = message_of(&msg.message);
            let topic = msg
                .subject
                .as_str()
                .strip_prefix(&self.topic_prefix)
                .unwrap_or(msg.subject.as_str())
                .to_string();
            let acker = NatsAcker {
                msg,
                shared: self.shared.clone(),
                topic: topic.clone(),
                message: message.clone(),
                attempt,
                max_attempts: self.max_attempts,
            };
            if attempt > self.max_attempts {
                // The last attempt timed out: dead-letter it now (in a task, so that `next`
                // stays cancel-safe).
                tokio::spawn(async move {
                    if let Err(e) = Box::new(acker).dead_letter("max_attempts".into()).await {
                        tracing::warn!(error = %e, "nats: dead-lettering failed");
                    }
                });
                continue;
            }
            return Ok(Delivery::new(message, topic, attempt, Box::new(acker)));
        }
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        if let Some((stream, name)) = self.ephemeral.take() {
            let _ = stream.delete_consumer(&name).await;
        }
        Ok(())
    }
}

impl Drop for NatsSubscription {
    fn drop(&mut self) {
        if let Some((stream, name)) = self.ephemeral.take() {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = stream.delete_consumer(&name).await;
                });
            }
        }
    }
}

struct NatsAcker {
    msg: jetstream::Message,
    shared: Arc<Shared>,
    topic: String,
    message: BackendMessage,
    attempt: u32,
    max_attempts: u32,
}

impl NatsAcker {
    async fn settle(&self, kind: AckKind) -> Result<()> {
        self.msg
            .ack_with(kind)
            .await
            .map_err(|e| BackendError::backend(NAME, "ack", e))
    }

    async fn dead_letter(self: Box<Self>, reason: String) -> Result<()> {
        let mut m = self.message.clone();
        m.headers.insert(DLQ_REASON_HEADER.into(), reason);
        m.headers
            .insert(DLQ_ATTEMPTS_HEADER.into(), self.attempt.to_string());
        m.headers
            .insert(DLQ_TOPIC_HEADER.into(), self.topic.clone());
        let headers = headers_of(&m, false)?;
        self.shared
            .js
            .publish_with_headers(
                format!("{}.dlq.{}", self.shared.prefix, self.topic),
                headers,
                m.payload.clone(),
            )
            .await
            .map_err(|e| publish_error("dead-letter", &e))?
            .await
            .map_err(|e| publish_error("dead-letter", &e))?;
        self.settle(AckKind::Term).await
    }
}

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.settle(AckKind::Ack).await?;
        if let Some(stream) = &self.shared.remove_on_ack {
            let seq = self
                .msg
                .info()
                .map_err(|e| BackendError::backend(NAME, "ack", e))?
                .stream_sequence;
            stream
                .delete_message(seq)
                .await
                .map_err(|e| BackendError::backend(NAME, "delete dead letter", e))?;
        }
        Ok(())
    }

    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        if self.attempt >= self.max_attempts {
            return self.dead_letter("max_attempts".into()).await;
        }
        self.settle(AckKind::Nak(delay)).await
    }

    async fn reject(self: Box<Self>, reason: String) -> Result<()> {
        self.dead_letter(reason).await
    }
}
