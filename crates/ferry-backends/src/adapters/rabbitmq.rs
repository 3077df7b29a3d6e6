//! RabbitMQ (`amqp://user:pass@host:5672/vhost`).
//!
//! **Mapping.** Messages are published (persistent, with publisher confirms) to one durable
//! topic exchange (default `ferry`, `?exchange=NAME`) with the topic as routing key, so wildcard
//! filters are native binding keys (`*` one word, `#` any number). A consumer group is a durable
//! quorum queue `<exchange>:<filter>:<group>` bound to the filter, with `x-delivery-limit` and
//! the dead-letter exchange `<exchange>.dlx`; a fanout subscription is an exclusive, auto-delete
//! classic queue of its own. `?queue_expires_s=N` sets `x-expires` on group queues (the server
//! deletes a group queue unused that long). Dead letters of topic `t` land in the durable queue
//! `<exchange>:dlq:<t>`, declared the first time this handle publishes to, subscribes to or asks
//! for the dead letters of `t`.
//!
//! **Delivery.** Attempt = the `ferry-attempt` header (set when the adapter republishes) + the
//! quorum queue's `x-delivery-count`. A nack on a group queue is `basic.nack(requeue)`: the
//! queue counts it and dead-letters past the delivery limit natively. On a fanout (classic)
//! queue, which counts nothing, the adapter republishes the message to its queue with the next
//! attempt number and acknowledges the original. A delayed nack (emulated) republishes to a
//! per-delay queue `<queue>:delay:<ms>` whose TTL dead-letters it back into the queue, then
//! acknowledges the original: durable, but the redelivery goes to the back of the queue.
//! RabbitMQ has no per-message ack timeout (only a channel-wide `consumer_timeout`), so the
//! adapter emulates it: a task per subscription returns deliveries unsettled after the ack
//! timeout (requeue, or republish on fanout queues) and a late ack then fails with
//! [`BackendError::Stale`]. A consumer that dies returns its deliveries natively (channel close).
//! Nacks on the last attempt and rejects publish the message with `ferry-dlq-*` headers to the
//! dead-letter exchange and acknowledge the original.
//!
//! **Connection loss.** Every publish (with its confirmation) is bounded by the
//! [`operation_timeout`](crate::ConnectOptions::operation_timeout). When the connection is lost,
//! calls fail with [`BackendError::Unreachable`] (or [`BackendError::InDoubt`] for a publish
//! sent whose confirmation never came: the message may or may not be stored), and the next publish or subscribe opens a new
//! connection (one attempt, bounded by the connect `attempt_timeout`). Subscriptions survive the
//! loss: a task per subscription feeds it from its consumer and, when the consumer fails or ends
//! without the subscription being closed (the connection or the channel was lost, or the
//! server cancelled the consumer), opens a channel on a new connection (the same reconnection
//! as publishing), declares the subscription's queue and binding again and consumes again,
//! retrying with a backoff (100 ms doubling to 2 s) while RabbitMQ is away. Meanwhile `next`
//! simply waits, as on NATS and Redis (it reports only an error that is not a lost connection,
//! such as a refused declaration, and keeps trying). A group's quorum queue is durable: it kept
//! the messages published meanwhile (unless its `queue_expires_s` ran out first), and the
//! deliveries unacknowledged when the channel was lost go back to it (RabbitMQ requeues them),
//! to be delivered again. A fanout subscription's exclusive queue died with the connection and
//! is declared anew (a new name): like an ephemeral subscriber, it misses what was published
//! while it was disconnected, and its delayed nacks still waiting in a delay queue then are
//! lost with the old queue. A queue deleted under a live subscription (by
//! [`delete_topic`](Backend::delete_topic)) makes the server cancel the consumer: the
//! subscription declares the queue again likewise. Deliveries received on the lost channel
//! cannot be settled any more: settling one fails with [`BackendError::Stale`] (and those
//! received but not yet handed out are dropped). Closing or dropping the subscription, or
//! closing the backend, stops the task: nothing reconnects after that.
//!
//! **Above the contract.** Through a [`Queue`](crate::Queue), everything is emulated: delayed
//! delivery and retry delays are delayed nacks (the delay queues above; the `Queue` rounds
//! delays to a coarse grid so that few distinct delay queues exist), TTL drops expired messages
//! on receipt, priority lanes are the routing keys `<t>.prio-high` and `<t>.prio-low` (a queue
//! each), de-duplication is the `Queue`'s, and redrive and purge consume the dead-letter queue.
//!
//! **Limits.** No replay (`Start::Earliest` is refused: queues hold only what arrived since they
//! were declared). `publish_batch` is confirmed as a whole but not atomic.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    ExchangeKind,
};
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::api::{
    Acker, Backend, BackendMessage, BackendSubscription, Delivery, Position, PublishAck, Start,
    SubscribeOptions, DLQ_ATTEMPTS_HEADER, DLQ_REASON_HEADER, DLQ_TOPIC_HEADER,
};
use crate::capabilities::{Capabilities, Support};
use crate::connect::{
    bounded, query, query_num, timeout_is_unreachable, ConnectOptions, Lifecycle,
};
use crate::error::{BackendError, Result};
use crate::filter::{check_filter, check_topic};

const NAME: &str = "rabbitmq";
const KEY_HEADER: &str = "ferry-key";
const ATTEMPT_HEADER: &str = "ferry-attempt";
const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";
/// The topic of a republished message (its routing key is then the queue's name).
const TOPIC_HEADER: &str = "ferry-topic";

fn amqp_error(operation: &str, e: &lapin::Error) -> BackendError {
    use lapin::ErrorKind as K;
    let text = e.to_string();
    let gone = matches!(
        e.kind(),
        K::IOError(_) | K::InvalidConnectionState(_) | K::InvalidChannelState(..)
    );
    if gone || text.contains("IO error") || text.contains("connection") && text.contains("refused")
    {
        BackendError::Unreachable {
            backend: NAME,
            reason: format!("{operation}: {text}"),
        }
    } else if text.contains("PRECONDITION_FAILED") || text.contains("ACCESS_REFUSED") {
        BackendError::rejected(NAME, operation, text)
    } else {
        BackendError::backend(NAME, operation, text)
    }
}

/// The connection and the publishing channel, shared by the backend handle and its
/// subscriptions (which reconnect through it).
struct Link {
    /// The connection, replaced on the next call after it was lost.
    conn: tokio::sync::Mutex<Arc<Connection>>,
    uri: String,
    connect_timeout: Duration,
    publisher: tokio::sync::Mutex<Channel>,
    life: Lifecycle,
}

impl Link {
    /// The connection, reopened (one attempt) if it was lost.
    async fn connection(&self) -> Result<Arc<Connection>> {
        let mut conn = self.conn.lock().await;
        if !conn.status().connected() {
            self.life.check()?;
            let uri = self.uri.clone();
            let fresh = bounded(NAME, "reconnect", self.connect_timeout, async move {
                Connection::connect(&uri, ConnectionProperties::default())
                    .await
                    .map_err(|e| BackendError::Unreachable {
                        backend: NAME,
                        reason: format!("reconnect: {e}"),
                    })
            })
            .await
            .map_err(timeout_is_unreachable)?;
            tracing::debug!("rabbitmq: reconnected");
            *conn = Arc::new(fresh);
        }
        Ok(conn.clone())
    }

    /// The publishing channel, reopened if a channel error (or a lost connection) closed it.
    async fn publisher(&self) -> Result<Channel> {
        let mut ch = self.publisher.lock().await;
        if !ch.status().connected() {
            let conn = self.connection().await?;
            *ch = confirm_channel(&conn).await?;
        }
        Ok(ch.clone())
    }
}

/// The RabbitMQ backend.
pub struct RabbitBackend {
    link: Arc<Link>,
    op_timeout: Duration,
    exchange: String,
    dlx: String,
    queue_expires: Option<u32>,
    /// Topics whose dead-letter queue this handle declared.
    dlqs: Mutex<HashSet<String>>,
    /// Group queues this handle declared, by filter (for `delete_topic`).
    queues: Mutex<HashMap<String, HashSet<String>>>,
}

impl std::fmt::Debug for RabbitBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitBackend")
            .field("exchange", &self.exchange)
            .finish()
    }
}

async fn confirm_channel(conn: &Connection) -> Result<Channel> {
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| amqp_error("open channel", &e))?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| amqp_error("confirm select", &e))?;
    Ok(ch)
}

fn properties(m: &BackendMessage, attempt: Option<u32>, topic: Option<&str>) -> BasicProperties {
    let mut h = FieldTable::default();
    for (k, v) in &m.headers {
        h.insert(
            ShortString::from(k.as_str()),
            AMQPValue::LongString(LongString::from(v.as_bytes())),
        );
    }
    if let Some(k) = &m.key {
        h.insert(
            KEY_HEADER.into(),
            AMQPValue::LongString(LongString::from(k.as_bytes())),
        );
    }
    if let Some(t) = topic {
        h.insert(
            TOPIC_HEADER.into(),
            AMQPValue::LongString(LongString::from(t.as_bytes())),
        );
    }
    if let Some(a) = attempt {
        h.insert(ATTEMPT_HEADER.into(), AMQPValue::LongLongInt(i64::from(a)));
    }
    BasicProperties::default()
        .with_message_id(ShortString::from(m.id.as_str()))
        .with_delivery_mode(2)
        .with_headers(h)
}

fn int_of(v: &AMQPValue) -> Option<i64> {
    match v {
        AMQPValue::ShortShortInt(x) => Some(i64::from(*x)),
        AMQPValue::ShortShortUInt(x) => Some(i64::from(*x)),
        AMQPValue::ShortInt(x) => Some(i64::from(*x)),
        AMQPValue::ShortUInt(x) => Some(i64::from(*x)),
        AMQPValue::LongInt(x) => Some(i64::from(*x)),
        AMQPValue::LongUInt(x) => Some(i64::from(*x)),
        AMQPValue::LongLongInt(x) => Some(*x),
        AMQPValue::Timestamp(x) => i64::try_from(*x).ok(),
        _ => None,
    }
}

fn string_of(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        other => int_of(other).map(|i| i.to_string()),
    }
}

/// The message, its attempt number and its topic.
fn message_of(d: &lapin::message::Delivery) -> (BackendMessage, u32, String) {
    let mut headers = BTreeMap::new();
    let mut key = None;
    let mut topic = None;
    let mut attempt: i64 = 1;
    let mut returned: i64 = 0;
    let mut death_reason = None;
    if let Some(h) = d.properties.headers() {
        for (k, v) in h.inner() {
            match k.as_str() {
                KEY_HEADER => key = string_of(v),
                TOPIC_HEADER => topic = string_of(v),
                ATTEMPT_HEADER => attempt = int_of(v).unwrap_or(1),
                DELIVERY_COUNT_HEADER => returned = int_of(v).unwrap_or(0),
                "x-first-death-reason" => death_reason = string_of(v),
                n if n.starts_with("x-") => {}
                n => {
                    if let Some(s) = string_of(v) {
                        headers.insert(n.to_string(), s);
                    }
                }
            }
        }
    }
    // Dead-lettered natively (delivery limit): say why, as the adapter's own dead letters do.
    if let Some(reason) = death_reason {
        if !headers.contains_key(DLQ_REASON_HEADER) && reason != "expired" {
            headers.insert(DLQ_REASON_HEADER.into(), reason);
        }
    }
    let message = BackendMessage {
        id: d
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        payload: bytes::Bytes::from(d.data.clone()),
        headers,
        key,
    };
    let attempt = u32::try_from(attempt.max(1).saturating_add(returned.max(0))).unwrap_or(u32::MAX);
    let topic = topic.unwrap_or_else(|| d.routing_key.as_str().to_string());
    (message, attempt, topic)
}

impl RabbitBackend {
    /// The capability table.
    pub const fn capabilities() -> Capabilities {
        Capabilities {
            fanout: Support::Native,
            groups: Support::Native,
            ordering: Support::Native,
            ack_timeout: Support::Emulated,
            nack_delay: Support::Emulated,
            dead_letter: Support::Native,
            wildcards: Support::Native,
            replay: Support::Unsupported,
            durable_groups: Support::Native,
            atomic_batch: Support::Unsupported,
            retries: Support::Emulated,
            redrive: Support::Emulated,
            ttl: Support::Emulated,
            delayed_delivery: Support::Emulated,
            priority: Support::Emulated,
            dedup: Support::Emulated,
            middleware: Support::Emulated,
            stats: Support::Emulated,
        }
    }

    pub(crate) async fn connect(url: &url::Url, options: &ConnectOptions) -> Result<Self> {
        let exchange = query(url, "exchange").unwrap_or_else(|| "ferry".into());
        let queue_expires =
            query_num::<u32>(url, "queue_expires_s")?.map(|s| s.saturating_mul(1000));
        let mut base = url.clone();
        base.set_query(None);
        let uri = base.to_string();
        let conn = options
            .retry
            .run(NAME, "connect", || {
                let uri = uri.clone();
                async move {
                    Connection::connect(&uri, ConnectionProperties::default())
                        .await
                        .map_err(|e| BackendError::Unreachable {
                            backend: NAME,
                            reason: e.to_string(),
                        })
                }
            })
            .await
            .map_err(timeout_is_unreachable)?;
        let ch = confirm_channel(&conn).await?;
        let dlx = format!("{exchange}.dlx");
        for name in [&exchange, &dlx] {
            ch.exchange_declare(
                name.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| amqp_error("declare exchange", &e))?;
        }
        Ok(RabbitBackend {
            link: Arc::new(Link {
                conn: tokio::sync::Mutex::new(Arc::new(conn)),
                uri,
                connect_timeout: options.retry.attempt_timeout,
                publisher: tokio::sync::Mutex::new(ch),
                life: Lifecycle::default(),
            }),
            op_timeout: options.operation_timeout,
            exchange,
            dlx,
            queue_expires,
            dlqs: Mutex::new(HashSet::new()),
            queues: Mutex::new(HashMap::new()),
        })
    }

    fn dlq_name(&self, topic: &str) -> String {
        format!("{}:dlq:{topic}", self.exchange)
    }

    /// Declares the dead-letter queue of `topic` once per handle.
    async fn ensure_dlq(&self, topic: &str) -> Result<()> {
        if self.dlqs.lock().contains(topic) {
            return Ok(());
        }
        let ch = self.link.publisher().await?;
        let q = self.dlq_name(topic);
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_error("declare dead-letter queue", &e))?;
        ch.queue_bind(
            q.as_str().into(),
            self.dlx.as_str().into(),
            topic.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_error("bind dead-letter queue", &e))?;
        self.dlqs.lock().insert(topic.to_string());
        Ok(())
    }

    /// Publishes and waits for the confirmations (unbounded: the caller bounds it); `sent`
    /// becomes true once a message was handed to the channel. A failure after that is in
    /// doubt (the broker may have stored the message), except the broker's nack of a single
    /// message (not stored).
    async fn publish_confirmed(
        &self,
        topic: &str,
        messages: Vec<BackendMessage>,
        sent: &AtomicBool,
    ) -> Result<Vec<PublishAck>> {
        self.ensure_dlq(topic).await?;
        let ch = self.link.publisher().await?;
        let total = messages.len();
        let mut confirms = Vec::with_capacity(total);
        for m in &messages {
            let c = ch
                .basic_publish(
                    self.exchange.as_str().into(),
                    topic.into(),
                    BasicPublishOptions::default(),
                    &m.payload,
                    properties(m, None, None),
                )
                .await
                .map_err(|e| {
                    let e = amqp_error("publish", &e);
                    if confirms.is_empty() {
                        e
                    } else {
                        BackendError::in_doubt(
                            NAME,
                            "publish batch",
                            format!("part of it may be stored: {e}"),
                        )
                    }
                })?;
            sent.store(true, Ordering::Relaxed);
            confirms.push(c);
        }
        let mut out = Vec::with_capacity(total);
        for (m, c) in messages.into_iter().zip(confirms) {
            // The lapin error alone: "unreachable" would read as "not sent".
            let confirmation = c.await.map_err(|e| {
                BackendError::in_doubt(NAME, "publish", format!("no confirmation: {e}"))
            })?;
            match confirmation {
                Confirmation::Nack(_) if total == 1 => {
                    return Err(BackendError::rejected(NAME, "publish", "broker nacked"))
                }
                Confirmation::Nack(_) => {
                    return Err(BackendError::in_doubt(
                        NAME,
                        "publish batch",
                        "the broker nacked a message of it; the others may be stored",
                    ))
                }
                Confirmation::Ack(_) | Confirmation::NotRequested => out.push(PublishAck {
                    id: m.id,
                    position: Position::Confirmed,
                }),
            }
        }
        Ok(out)
    }

    /// Declares `source`, consumes it and starts the subscription's tasks.
    async fn consume(
        &self,
        source: Source,
        quorum: bool,
        options: &SubscribeOptions,
        with_timeouts: bool,
    ) -> Result<Box<dyn BackendSubscription>> {
        let cancel = self.link.life.child();
        let (on, consumer) = open(&self.link, &source, 0).await?;
        let shared = Arc::new(SubShared {
            link: self.link.clone(),
            quorum,
            dlx: self.dlx.clone(),
            max_attempts: options.max_attempts,
            in_flight: Mutex::new(HashMap::new()),
        });
        if with_timeouts {
            tokio::spawn(expire_loop(
                Arc::downgrade(&shared),
                options.ack_timeout,
                cancel.clone(),
            ));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(consume_loop(
            shared.clone(),
            source,
            on,
            consumer,
            tx,
            cancel.clone(),
            self.op_timeout,
        ));
        Ok(Box::new(RabbitSubscription {
            rx,
            task: Some(task),
            shared,
            cancel,
            ack_timeout: options.ack_timeout,
            op_timeout: self.op_timeout,
        }))
    }
}

#[async_trait]
impl Backend for RabbitBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Self::capabilities()
    }

    async fn publish(&self, topic: &str, message: BackendMessage) -> Result<PublishAck> {
        let mut acks = self.publish_batch(topic, vec![message]).await?;
        acks.pop()
            .ok_or_else(|| BackendError::backend(NAME, "publish", "no confirmation"))
    }

    async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<BackendMessage>,
    ) -> Result<Vec<PublishAck>> {
        self.link.life.check()?;
        check_topic(topic)?;
        let sent = AtomicBool::new(false);
        bounded(
            NAME,
            "publish",
            self.op_timeout,
            self.publish_confirmed(topic, messages, &sent),
        )
        .await
        .map_err(|e| match e {
            BackendError::Timeout { .. } if sent.load(Ordering::Relaxed) => {
                BackendError::in_doubt(NAME, "publish", format!("sent, not confirmed: {e}"))
            }
            e => e,
        })
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn BackendSubscription>> {
        self.link.life.check()?;
        options.validate()?;
        check_filter(&options.filter)?;
        if options.start == Start::Earliest {
            return Err(BackendError::unsupported(NAME, "Start::Earliest (replay)"));
        }
        if !options.has_wildcards() {
            self.ensure_dlq(&options.filter).await?;
        }
        let mut args = FieldTable::default();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(self.dlx.as_str().into()),
        );
        let bind = Some((self.exchange.clone(), options.filter.clone()));
        let prefetch = u16::try_from(options.prefetch).unwrap_or(u16::MAX);
        let (source, quorum) = match &options.group {
            Some(g) => {
                let name = format!("{}:{}:{g}", self.exchange, options.filter);
                args.insert(
                    "x-queue-type".into(),
                    AMQPValue::LongString("quorum".into()),
                );
                args.insert(
                    "x-delivery-limit".into(),
                    AMQPValue::LongLongInt(i64::from(options.max_attempts.saturating_sub(1))),
                );
                if let Some(ms) = self.queue_expires {
                    args.insert("x-expires".into(), AMQPValue::LongLongInt(i64::from(ms)));
                }
                let source = Source {
                    queue: QueueName::Durable(name.clone()),
                    what: "declare group queue",
                    args,
                    bind,
                    prefetch,
                };
                self.queues
                    .lock()
                    .entry(options.filter.clone())
                    .or_default()
                    .insert(name);
                (source, true)
            }
            None => {
                let prefix = format!("{}:{}:fanout-", self.exchange, options.filter);
                let source = Source {
                    queue: QueueName::Exclusive(prefix),
                    what: "declare fanout queue",
                    args,
                    bind,
                    prefetch,
                };
                (source, false)
            }
        };
        self.consume(source, quorum, &options, true).await
    }

    async fn dead_letters(&self, topic: &str) -> Result<Box<dyn BackendSubscription>> {
        self.link.life.check()?;
        check_topic(topic)?;
        self.ensure_dlq(topic).await?;
        let options = SubscribeOptions::new(topic).max_attempts(u32::MAX);
        let source = Source {
            queue: QueueName::Durable(self.dlq_name(topic)),
            what: "declare dead-letter queue",
            args: FieldTable::default(),
            bind: Some((self.dlx.clone(), topic.to_string())),
            prefetch: u16::try_from(options.prefetch).unwrap_or(u16::MAX),
        };
        self.consume(source, false, &options, false).await
    }

    async fn delete_topic(&self, topic: &str) -> Result<()> {
        check_topic(topic)?;
        let ch = self.link.publisher().await?;
        let mut queues: Vec<String> = self
            .queues
            .lock()
            .remove(topic)
            .unwrap_or_default()
            .into_iter()
            .collect();
        queues.push(self.dlq_name(topic));
        self.dlqs.lock().remove(topic);
        for q in queues {
            ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(|e| amqp_error("delete queue", &e))?;
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        if self.link.life.is_closed() {
            return Ok(());
        }
        self.link.life.close();
        let conn = self.link.conn.lock().await.clone();
        let _ = conn.close(200, "closed".into()).await;
        Ok(())
    }
}

/// The queue a subscription consumes.
#[derive(Debug, Clone)]
enum QueueName {
    /// A durable queue of this name (a group's quorum queue, a dead-letter queue): declared
    /// again, as it was, on a new connection.
    Durable(String),
    /// An exclusive, auto-delete queue named with this prefix and a fresh id, declared anew on
    /// each connection (the previous one died with its connection).
    Exclusive(String),
}

/// What a subscription declares and consumes: again on each new connection.
#[derive(Debug, Clone)]
struct Source {
    queue: QueueName,
    /// The operation named in declaration errors.
    what: &'static str,
    args: FieldTable,
    /// The exchange and binding key to bind the queue with.
    bind: Option<(String, String)>,
    prefetch: u16,
}

/// One channel a subscription consumed (or consumes) on.
struct Consuming {
    /// Counts the channels of one subscription (delivery tags are per channel).
    epoch: u64,
    ch: Channel,
    queue: String,
    tag: String,
    /// Set once the consumer failed or ended: its deliveries cannot be settled any more.
    lost: AtomicBool,
}

impl Consuming {
    fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire) || !self.ch.status().connected()
    }
}

/// Opens a channel on the link's connection (reconnecting if it was lost), declares and binds
/// the queue and starts consuming it.
async fn open(link: &Link, source: &Source, epoch: u64) -> Result<(Arc<Consuming>, Consumer)> {
    let ch = link
        .connection()
        .await?
        .create_channel()
        .await
        .map_err(|e| amqp_error("open channel", &e))?;
    let (queue, declare) = match &source.queue {
        QueueName::Durable(name) => (
            name.clone(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
        ),
        QueueName::Exclusive(prefix) => (
            format!("{prefix}{}", uuid::Uuid::new_v4().simple()),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
        ),
    };
    ch.queue_declare(queue.as_str().into(), declare, source.args.clone())
        .await
        .map_err(|e| amqp_error(source.what, &e))?;
    if let Some((exchange, key)) = &source.bind {
        ch.queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_error("bind queue", &e))?;
    }
    ch.basic_qos(source.prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| amqp_error("qos", &e))?;
    let tag = format!("ferry-{}", uuid::Uuid::new_v4().simple());
    let consumer = ch
        .basic_consume(
            queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_error("consume", &e))?;
    let on = Arc::new(Consuming {
        epoch,
        ch,
        queue,
        tag,
        lost: AtomicBool::new(false),
    });
    Ok((on, consumer))
}

/// Stops consuming and closes the channel (its unsettled deliveries go back to the queue).
async fn stop_consuming(on: &Consuming, op_timeout: Duration) {
    let _ = tokio::time::timeout(op_timeout, async {
        let _ = on
            .ch
            .basic_cancel(on.tag.as_str().into(), BasicCancelOptions::default())
            .await;
        let _ = on.ch.close(200, "closed".into()).await;
    })
    .await;
}

/// Waits before the first resubscription attempt after a loss, doubled after each failed one.
const RESUBSCRIBE_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between resubscription attempts.
const RESUBSCRIBE_MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Feeds the subscription from its consumer; when the consumer fails or ends (the connection
/// or the channel was lost, the server cancelled it), consumes again on a new channel (on a new
/// connection if needed), with a backoff, until the subscription is closed or dropped.
async fn consume_loop(
    shared: Arc<SubShared>,
    source: Source,
    mut on: Arc<Consuming>,
    mut consumer: Consumer,
    tx: tokio::sync::mpsc::Sender<Result<(lapin::message::Delivery, Arc<Consuming>)>>,
    cancel: tokio_util::sync::CancellationToken,
    op_timeout: Duration,
) {
    loop {
        // Consume until the consumer fails or ends.
        loop {
            let item = tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    stop_consuming(&on, op_timeout).await;
                    return;
                }
                item = consumer.next() => item,
            };
            match item {
                Some(Ok(d)) => {
                    let sent = tokio::select! {
                        biased;
                        () = cancel.cancelled() => Err(()),
                        r = tx.send(Ok((d, on.clone()))) => r.map_err(|_| ()),
                    };
                    if sent.is_err() {
                        stop_consuming(&on, op_timeout).await;
                        return;
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, queue = %on.queue, "rabbitmq: consumer failed; subscribing again");
                    break;
                }
                None => {
                    tracing::debug!(queue = %on.queue, "rabbitmq: consumer ended; subscribing again");
                    break;
                }
            }
        }
        // Its deliveries cannot be settled any more: RabbitMQ returns them to the queue.
        on.lost.store(true, Ordering::Release);
        shared.forget(on.epoch);
        if on.ch.status().connected() {
            // The server cancelled the consumer but the channel lives on: close it.
            stop_consuming(&on, op_timeout).await;
        }
        // Consume again, with a backoff.
        let mut backoff = RESUBSCRIBE_BACKOFF;
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(RESUBSCRIBE_MAX_BACKOFF);
            let attempt = bounded(
                NAME,
                "subscribe again",
                shared.link.connect_timeout + op_timeout,
                open(&shared.link, &source, on.epoch + 1),
            );
            let r = tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                r = attempt => r,
            };
            match r {
                Ok((fresh, c)) => {
                    if cancel.is_cancelled() {
                        stop_consuming(&fresh, op_timeout).await;
                        return;
                    }
                    tracing::debug!(queue = %fresh.queue, "rabbitmq: subscribed again");
                    on = fresh;
                    consumer = c;
                    break;
                }
                // The backend was closed.
                Err(BackendError::Closed) => return,
                Err(e) if e.is_transient() => {
                    tracing::debug!(error = %e, ?backoff, "rabbitmq: subscribing again failed");
                }
                Err(e) => {
                    // Not a lost connection (a refused declaration...): tell the subscriber,
                    // and try again after the backoff.
                    tracing::warn!(error = %e, "rabbitmq: subscribing again failed");
                    let sent = tokio::select! {
                        biased;
                        () = cancel.cancelled() => return,
                        r = tx.send(Err(e)) => r,
                    };
                    if sent.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// A delivery not settled yet.
struct InFlight {
    deadline: Instant,
    acker: lapin::Acker,
    /// The channel it came on.
    on: Arc<Consuming>,
    /// For republishing (fanout queues, delays, dead letters).
    message: BackendMessage,
    topic: String,
    attempt: u32,
}

struct SubShared {
    link: Arc<Link>,
    quorum: bool,
    dlx: String,
    max_attempts: u32,
    /// By channel epoch and delivery tag.
    in_flight: Mutex<HashMap<(u64, u64), InFlight>>,
}

impl SubShared {
    /// Takes a delivery to settle it: [`BackendError::Stale`] if it is not in flight any more,
    /// or if the channel it came on was lost.
    fn take(&self, key: (u64, u64)) -> Result<InFlight> {
        let f = self
            .in_flight
            .lock()
            .remove(&key)
            .ok_or(BackendError::Stale)?;
        if f.on.is_lost() {
            return Err(BackendError::Stale);
        }
        Ok(f)
    }

    /// Drops the deliveries of a lost channel (RabbitMQ returns them to their queue).
    fn forget(&self, epoch: u64) {
        self.in_flight.lock().retain(|(e, _), _| *e != epoch);
    }

    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        m: &BackendMessage,
        props: BasicProperties,
    ) -> Result<()> {
        let c = self
            .link
            .publisher()
            .await?
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                &m.payload,
                props,
            )
            .await
            .map_err(|e| amqp_error("republish", &e))?
            .await
            .map_err(|e| amqp_error("republish", &e))?;
        if let Confirmation::Nack(_) = c {
            return Err(BackendError::rejected(NAME, "republish", "broker nacked"));
        }
        Ok(())
    }

    async fn ack(&self, f: &InFlight) -> Result<()> {
        f.acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(|e| amqp_error("ack", &e))?;
        Ok(())
    }

    /// Redeliver: requeue on quorum queues (counted by the queue), republish with the next
    /// attempt number elsewhere; via a delay queue when there is a delay.
    async fn redeliver(&self, f: InFlight, delay: Option<Duration>) -> Result<()> {
        if f.attempt >= self.max_attempts {
            return self.dead_letter(f, "max_attempts").await;
        }
        match delay.filter(|d| !d.is_zero()) {
            None if self.quorum => {
                f.acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await
                    .map_err(|e| amqp_error("nack", &e))?;
                Ok(())
            }
            None => {
                let props = properties(&f.message, Some(f.attempt + 1), Some(&f.topic));
                self.publish_confirmed("", &f.on.queue, &f.message, props)
                    .await?;
                self.ack(&f).await
            }
            Some(delay) => {
                let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX).max(1);
                let delay_queue = format!("{}:delay:{ms}", f.on.queue);
                let mut args = FieldTable::default();
                args.insert(
                    "x-message-ttl".into(),
                    AMQPValue::LongLongInt(i64::try_from(ms).unwrap_or(i64::MAX)),
                );
                args.insert(
                    "x-dead-letter-exchange".into(),
                    AMQPValue::LongString("".into()),
                );
                args.insert(
                    "x-dead-letter-routing-key".into(),
                    AMQPValue::LongString(f.on.queue.as_str().into()),
                );
                args.insert(
                    "x-expires".into(),
                    AMQPValue::LongLongInt(
                        i64::try_from(ms.saturating_add(60_000)).unwrap_or(i64::MAX),
                    ),
                );
                self.link
                    .publisher()
                    .await?
                    .queue_declare(
                        delay_queue.as_str().into(),
                        QueueDeclareOptions {
                            durable: self.quorum,
                            ..QueueDeclareOptions::default()
                        },
                        args,
                    )
                    .await
                    .map_err(|e| amqp_error("declare delay queue", &e))?;
                let props = properties(&f.message, Some(f.attempt + 1), Some(&f.topic));
                self.publish_confirmed("", &delay_queue, &f.message, props)
                    .await?;
                self.ack(&f).await
            }
        }
    }

    async fn dead_letter(&self, f: InFlight, reason: &str) -> Result<()> {
        let mut m = f.message.clone();
        m.headers.insert(DLQ_REASON_HEADER.into(), reason.into());
        m.headers
            .insert(DLQ_ATTEMPTS_HEADER.into(), f.attempt.to_string());
        m.headers.insert(DLQ_TOPIC_HEADER.into(), f.topic.clone());
        let props = properties(&m, None, None);
        self.publish_confirmed(&self.dlx, &f.topic, &m, props)
            .await?;
        self.ack(&f).await
    }
}

/// Returns deliveries that outlived the ack timeout.
async fn expire_loop(
    shared: std::sync::Weak<SubShared>,
    ack_timeout: Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    let tick = (ack_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(tick) => {}
        }
        let Some(s) = shared.upgrade() else { return };
        let now = Instant::now();
        let expired: Vec<InFlight> = {
            let mut map = s.in_flight.lock();
            let keys: Vec<(u64, u64)> = map
                .iter()
                .filter(|(_, f)| f.deadline <= now)
                .map(|(k, _)| *k)
                .collect();
            keys.iter().filter_map(|k| map.remove(k)).collect()
        };
        // Those of a lost channel are back in their queue already.
        for f in expired.into_iter().filter(|f| !f.on.is_lost()) {
            if let Err(e) = s.redeliver(f, None).await {
                tracing::warn!(error = %e, "rabbitmq: returning an expired delivery failed");
            }
        }
    }
}

type Incoming = Result<(lapin::message::Delivery, Arc<Consuming>)>;

struct RabbitSubscription {
    /// From the consuming task.
    rx: tokio::sync::mpsc::Receiver<Incoming>,
    task: Option<tokio::task::JoinHandle<()>>,
    shared: Arc<SubShared>,
    cancel: tokio_util::sync::CancellationToken,
    ack_timeout: Duration,
    op_timeout: Duration,
}

#[async_trait]
impl BackendSubscription for RabbitSubscription {
    async fn next(&mut self) -> Result<Delivery> {
        loop {
            if self.cancel.is_cancelled() {
                return Err(BackendError::Closed);
            }
            let item = tokio::select! {
                () = self.cancel.cancelled() => return Err(BackendError::Closed),
                item = self.rx.recv() => item,
            };
            let (d, on) = match item {
                None => return Err(BackendError::Closed),
                Some(Err(e)) => return Err(e),
                Some(Ok(x)) => x,
            };
            if on.is_lost() {
                // Came on a lost channel: it cannot be settled, and RabbitMQ delivers it again
                // (a group queue), or it died with its queue (a fanout one).
                continue;
            }
            let (message, attempt, topic) = message_of(&d);
            let key = (on.epoch, d.delivery_tag);
            let f = InFlight {
                deadline: Instant::now() + self.ack_timeout,
                acker: d.acker,
                on,
                message: message.clone(),
                topic: topic.clone(),
                attempt,
            };
            if attempt > self.shared.max_attempts {
                // In a task, so that `next` stays cancel-safe.
                let shared = self.shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = shared.dead_letter(f, "max_attempts").await {
                        tracing::warn!(error = %e, "rabbitmq: dead-lettering failed");
                    }
                });
                continue;
            }
            self.shared.in_flight.lock().insert(key, f);
            return Ok(Delivery::new(
                message,
                topic,
                attempt,
                Box::new(RabbitAcker {
                    shared: self.shared.clone(),
                    key,
                }),
            ));
        }
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            // The task cancels the consumer and closes its channel.
            let _ = tokio::time::timeout(self.op_timeout * 2, task).await;
        }
        Ok(())
    }
}

impl Drop for RabbitSubscription {
    fn drop(&mut self) {
        // The consuming task sees it, cancels the consumer and closes its channel.
        self.cancel.cancel();
    }
}

struct RabbitAcker {
    shared: Arc<SubShared>,
    key: (u64, u64),
}

/// A settlement that failed because the delivery's channel was lost meanwhile is `Stale`.
fn stale_if_lost(on: &Consuming, r: Result<()>) -> Result<()> {
    match r {
        Err(e) if e.is_transient() && on.is_lost() => Err(BackendError::Stale),
        other => other,
    }
}

#[async_trait]
impl Acker for RabbitAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        let f = self.shared.take(self.key)?;
        let r = self.shared.ack(&f).await;
        stale_if_lost(&f.on, r)
    }

    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        let f = self.shared.take(self.key)?;
        let on = f.on.clone();
        let r = self.shared.redeliver(f, delay).await;
        stale_if_lost(&on, r)
    }

    async fn reject(self: Box<Self>, reason: String) -> Result<()> {
        let f = self.shared.take(self.key)?;
        let on = f.on.clone();
        let r = self.shared.dead_letter(f, &reason).await;
        stale_if_lost(&on, r)
    }
}
