//! Kafka (`kafka://host:9092[,host2:9092]`), with the cargo feature `kafka` (rdkafka, with a
//! bundled librdkafka built from source).
//!
//! **Mapping.** A topic is a Kafka topic (created by the broker's auto-creation or beforehand);
//! the key is the record key, so ordering holds per partition, i.e. per key. A consumer group is
//! a Kafka consumer group; a fanout subscription is a consumer group of its own
//! (`ferry-fanout-<uuid>`). Wildcard filters become regex subscriptions (`^a\.[^.]+$`). The
//! message id and headers travel as record headers (`ferry-id`, ...). Dead letters of `t` go to
//! the topic `t.dlq`. `subscribe` returns once the consumer has its partitions assigned (up to
//! 30 s), so that `Start::Latest` does not miss what is published right after it.
//!
//! **Acknowledgements.** Kafka commits positions, not messages: an ack stores the message's
//! offset for the next auto-commit, which also covers earlier unacknowledged offsets of that
//! partition. A nack (emulated) republishes the message to its topic with the next attempt
//! number (after the delay, waited in-process) and then stores its offset: if the process dies
//! during the delay, the original is consumed again from the last commit. There is no ack
//! timeout: an unsettled message comes back only when the group rebalances or restarts from its
//! committed position. Nacks on the last attempt and rejects produce to `t.dlq` first.
//!
//! **Above the contract.** Through a [`Queue`](crate::Queue): retries, TTL, delayed delivery
//! (in-process nack waits), priority lanes (`<t>.prio-high`, `<t>.prio-low`) and
//! de-duplication are emulated; redrive and purge of dead letters are unsupported (dead letters
//! cannot be removed from `t.dlq`).
//!
//! **Limits.** `publish_batch` is not transactional. Tests of this adapter run only when
//! `FERRY_KAFKA_URL` is set.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientContext;
use tokio::sync::{mpsc, oneshot};

use crate::api::{
    Acker, Backend, BackendMessage, BackendSubscription, Delivery, Position, PublishAck, Start,
    SubscribeOptions, DLQ_ATTEMPTS_HEADER, DLQ_REASON_HEADER, DLQ_TOPIC_HEADER,
};
use crate::capabilities::{Capabilities, Support};
use crate::connect::{ConnectOptions, Lifecycle};
use crate::error::{BackendError, Result};
use crate::filter::{check_filter, check_topic, has_wildcards, to_regex};

const NAME: &str = "kafka";
const ID_HEADER: &str = "ferry-id";
const ATTEMPT_HEADER: &str = "ferry-attempt";
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// The Kafka backend.
pub struct KafkaBackend {
    brokers: String,
    producer: FutureProducer,
    life: Lifecycle,
}

impl std::fmt::Debug for KafkaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBackend")
            .field("brokers", &self.brokers)
            .finish()
    }
}

fn kafka_error(operation: &str, e: &rdkafka::error::KafkaError) -> BackendError {
    use rdkafka::types::RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(C::MessageTimedOut | C::RequestTimedOut | C::OperationTimedOut) => {
            BackendError::Timeout {
                backend: NAME,
                operation: operation.to_string(),
                after: SEND_TIMEOUT,
            }
        }
        Some(C::AllBrokersDown | C::BrokerTransportFailure | C::Resolve) => {
            BackendError::Unreachable {
                backend: NAME,
                reason: format!("{operation}: {e}"),
            }
        }
        _ => BackendError::backend(NAME, operation, e),
    }
}

fn record_headers(m: &BackendMessage, attempt: Option<u32>) -> OwnedHeaders {
    let mut h = OwnedHeaders::new().insert(Header {
        key: ID_HEADER,
        value: Some(m.id.as_bytes()),
    });
    for (k, v) in &m.headers {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    if let Some(a) = attempt {
        let a = a.to_string();
        h = h.insert(Header {
            key: ATTEMPT_HEADER,
            value: Some(a.as_bytes()),
        });
    }
    h
}

async fn produce(
    producer: &FutureProducer,
    topic: &str,
    m: &BackendMessage,
    attempt: Option<u32>,
) -> Result<(i32, i64)> {
    let mut record = FutureRecord::to(topic)
        .payload(m.payload.as_ref())
        .headers(record_headers(m, attempt));
    if let Some(k) = &m.key {
        record = record.key(k.as_str());
    }
    producer
        .send(record, SEND_TIMEOUT)
        .await
        .map(|d| (d.partition, d.offset))
        .map_err(|(e, _)| delivery_error(&e))
}

/// A failed produce: a timeout or a lost broker connection once the record was queued (the
/// producer retries it, and the broker may have stored it) is in doubt; a full local queue
/// (nothing sent) or a broker refusal is not.
fn delivery_error(e: &rdkafka::error::KafkaError) -> BackendError {
    use rdkafka::types::RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(
            C::MessageTimedOut
            | C::RequestTimedOut
            | C::OperationTimedOut
            | C::AllBrokersDown
            | C::BrokerTransportFailure,
        ) => BackendError::in_doubt(NAME, "publish", format!("not acknowledged: {e}")),
        _ => kafka_error("publish", e),
    }
}

impl KafkaBackend {
    /// The capability table.
    pub const fn capabilities() -> Capabilities {
        Capabilities {
            fanout: Support::Native,
            groups: Support::Native,
            ordering: Support::Native,
            ack_timeout: Support::Unsupported,
            nack_delay: Support::Emulated,
            dead_letter: Support::Emulated,
            wildcards: Support::Native,
            replay: Support::Native,
            durable_groups: Support::Native,
            atomic_batch: Support::Unsupported,
            retries: Support::Emulated,
            redrive: Support::Unsupported,
            ttl: Support::Emulated,
            delayed_delivery: Support::Emulated,
            priority: Support::Emulated,
            dedup: Support::Emulated,
            middleware: Support::Emulated,
            stats: Support::Emulated,
        }
    }

    pub(crate) async fn connect(url: &url::Url, options: &ConnectOptions) -> Result<Self> {
        // `kafka://a:9092,b:9092` does not parse as one host: take the authority as written.
        let brokers = url
            .as_str()
            .trim_start_matches("kafka://")
            .split(['/', '?'])
            .next()
            .unwrap_or("")
            .to_string();
        if brokers.is_empty() {
            return Err(BackendError::InvalidUrl {
                url: url.to_string(),
                reason: "no broker address".into(),
            });
        }
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("message.timeout.ms", "10000")
            .set("enable.idempotence", "true")
            .create()
            .map_err(|e| BackendError::backend(NAME, "create producer", e))?;
        let timeout = options.retry.attempt_timeout;
        options
            .retry
            .run(NAME, "connect", || {
                let p = producer.clone();
                async move {
                    tokio::task::spawn_blocking(move || {
                        p.client().fetch_metadata(None, timeout).map(|_| ())
                    })
                    .await
                    .map_err(|e| BackendError::backend(NAME, "connect", e))?
                    .map_err(|e| BackendError::Unreachable {
                        backend: NAME,
                        reason: e.to_string(),
                    })
                }
            })
            .await?;
        Ok(KafkaBackend {
            brokers,
            producer,
            life: Lifecycle::default(),
        })
    }

    async fn consumer(
        &self,
        filter: &str,
        group: String,
        start: Start,
        max_attempts: u32,
    ) -> Result<Box<dyn BackendSubscription>> {
        let (assigned_tx, assigned_rx) = oneshot::channel();
        let context = AssignContext {
            assigned: Mutex::new(Some(assigned_tx)),
        };
        let consumer: StreamConsumer<AssignContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.offset.reset",
                match start {
                    Start::Latest => "latest",
                    Start::Earliest => "earliest",
                },
            )
            .set("topic.metadata.refresh.interval.ms", "1000")
            .create_with_context(context)
            .map_err(|e| BackendError::backend(NAME, "create consumer", e))?;
        let pattern = if has_wildcards(filter) {
            to_regex(filter)
        } else {
            filter.to_string()
        };
        consumer
            .subscribe(&[pattern.as_str()])
            .map_err(|e| kafka_error("subscribe", &e))?;
        let consumer = Arc::new(consumer);
        let cancel = self.life.child();
        let (tx, rx) = mpsc::channel(64);
        let shared = Arc::new(SubShared {
            consumer: consumer.clone(),
            producer: self.producer.clone(),
            max_attempts,
        });
        let stop = cancel.clone();
        let feeder = shared.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = feed(feeder, tx) => {}
            }
        });
        // Wait for the first assignment (driven by the feeding task's polls).
        let _ = tokio::time::timeout(Duration::from_secs(30), assigned_rx).await;
        Ok(Box::new(KafkaSubscription { rx, cancel }))
    }
}

struct AssignContext {
    assigned: Mutex<Option<oneshot::Sender<()>>>,
}

impl ClientContext for AssignContext {}

impl ConsumerContext for AssignContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(_) = rebalance {
            if let Some(tx) = self.assigned.lock().take() {
                let _ = tx.send(());
            }
        }
    }
}

struct SubShared {
    consumer: Arc<StreamConsumer<AssignContext>>,
    producer: FutureProducer,
    max_attempts: u32,
}

async fn feed(shared: Arc<SubShared>, tx: mpsc::Sender<Result<Delivery>>) {
    loop {
        let m = match shared.consumer.recv().await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "kafka receive failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut headers = BTreeMap::new();
        let mut id = String::new();
        let mut attempt = 1u32;
        if let Some(h) = m.headers() {
            for header in h.iter() {
                let value = header
                    .value
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                match header.key {
                    ID_HEADER => id = value,
                    ATTEMPT_HEADER => attempt = value.parse().unwrap_or(1),
                    k => {
                        headers.insert(k.to_string(), value);
                    }
                }
            }
        }
        let message = BackendMessage {
            id,
            payload: bytes::Bytes::copy_from_slice(m.payload().unwrap_or_default()),
            headers,
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        };
        let topic = m.topic().to_string();
        let acker = KafkaAcker {
            shared: shared.clone(),
            topic: topic.clone(),
            partition: m.partition(),
            offset: m.offset(),
            message: message.clone(),
            attempt,
        };
        drop(m);
        if attempt > shared.max_attempts {
            if let Err(e) = acker.dead_letter("max_attempts").await {
                tracing::warn!(error = %e, "kafka: dead-lettering failed");
            }
            continue;
        }
        let d = Delivery::new(message, topic, attempt, Box::new(acker));
        if tx.send(Ok(d)).await.is_err() {
            return;
        }
    }
}

#[async_trait]
impl Backend for KafkaBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Self::capabilities()
    }

    async fn publish(&self, topic: &str, message: BackendMessage) -> Result<PublishAck> {
        self.life.check()?;
        check_topic(topic)?;
        let (partition, offset) = produce(&self.producer, topic, &message, None).await?;
        Ok(PublishAck {
            id: message.id,
            position: Position::Partition { partition, offset },
        })
    }

    async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<BackendMessage>,
    ) -> Result<Vec<PublishAck>> {
        self.life.check()?;
        check_topic(topic)?;
        let sends = messages
            .iter()
            .map(|m| produce(&self.producer, topic, m, None));
        let results = futures::future::join_all(sends).await;
        // Not atomic: a failure beside a stored message leaves the batch in doubt.
        if results.iter().any(Result::is_ok) {
            if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
                if !e.is_in_doubt() {
                    return Err(BackendError::in_doubt(
                        NAME,
                        "publish batch",
                        format!("part of it is stored: {e}"),
                    ));
                }
            }
        }
        messages
            .into_iter()
            .zip(results)
            .map(|(m, r)| {
                r.map(|(partition, offset)| PublishAck {
                    id: m.id,
                    position: Position::Partition { partition, offset },
                })
            })
            .collect()
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn BackendSubscription>> {
        self.life.check()?;
        options.validate()?;
        check_filter(&options.filter)?;
        let group = options
            .group
            .clone()
            .unwrap_or_else(|| format!("ferry-fanout-{}", uuid::Uuid::new_v4().simple()));
        self.consumer(&options.filter, group, options.start, options.max_attempts)
            .await
    }

    async fn dead_letters(&self, topic: &str) -> Result<Box<dyn BackendSubscription>> {
        self.life.check()?;
        check_topic(topic)?;
        self.consumer(
            &format!("{topic}.dlq"),
            format!("ferry-dlq-{}", uuid::Uuid::new_v4().simple()),
            Start::Earliest,
            u32::MAX,
        )
        .await
    }

    async fn redrive_dead_letters(&self, _topic: &str, _max: usize) -> Result<usize> {
        // Acknowledging a dead letter commits an offset of a throwaway group, so a drain would
        // see the same dead letters again next time.
        Err(BackendError::unsupported(NAME, "redrive of dead letters"))
    }

    async fn purge_dead_letters(&self, _topic: &str) -> Result<usize> {
        Err(BackendError::unsupported(NAME, "purge of dead letters"))
    }

    async fn delete_topic(&self, topic: &str) -> Result<()> {
        check_topic(topic)?;
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()
            .map_err(|e| BackendError::backend(NAME, "create admin client", e))?;
        let dlq = format!("{topic}.dlq");
        admin
            .delete_topics(&[topic, dlq.as_str()], &AdminOptions::new())
            .await
            .map_err(|e| kafka_error("delete topics", &e))?;
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        if self.life.is_closed() {
            return Ok(());
        }
        self.life.close();
        let p = self.producer.clone();
        let _ = tokio::task::spawn_blocking(move || p.flush(SEND_TIMEOUT)).await;
        Ok(())
    }
}

struct KafkaSubscription {
    rx: mpsc::Receiver<Result<Delivery>>,
    cancel: tokio_util::sync::CancellationToken,
}

#[async_trait]
impl BackendSubscription for KafkaSubscription {
    async fn next(&mut self) -> Result<Delivery> {
        if self.cancel.is_cancelled() {
            return Err(BackendError::Closed);
        }
        tokio::select! {
            () = self.cancel.cancelled() => Err(BackendError::Closed),
            d = self.rx.recv() => d.unwrap_or(Err(BackendError::Closed)),
        }
    }

    async fn close(self: Box<Self>) -> Result<()> {
        self.cancel.cancel();
        Ok(())
    }
}

impl Drop for KafkaSubscription {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

struct KafkaAcker {
    shared: Arc<SubShared>,
    topic: String,
    partition: i32,
    offset: i64,
    message: BackendMessage,
    attempt: u32,
}

impl KafkaAcker {
    fn store(&self) -> Result<()> {
        self.shared
            .consumer
            .store_offset(&self.topic, self.partition, self.offset)
            .map_err(|e| kafka_error("ack", &e))
    }

    async fn dead_letter(&self, reason: &str) -> Result<()> {
        let mut m = self.message.clone();
        m.headers.insert(DLQ_REASON_HEADER.into(), reason.into());
        m.headers
            .insert(DLQ_ATTEMPTS_HEADER.into(), self.attempt.to_string());
        m.headers
            .insert(DLQ_TOPIC_HEADER.into(), self.topic.clone());
        produce(
            &self.shared.producer,
            &format!("{}.dlq", self.topic),
            &m,
            None,
        )
        .await?;
        self.store()
    }
}

#[async_trait]
impl Acker for KafkaAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.store()
    }

    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        if self.attempt >= self.shared.max_attempts {
            return self.dead_letter("max_attempts").await;
        }
        let redeliver = async move {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            produce(
                &self.shared.producer,
                &self.topic,
                &self.message,
                Some(self.attempt + 1),
            )
            .await?;
            self.store()
        };
        if delay.is_some_and(|d| !d.is_zero()) {
            tokio::spawn(async move {
                if let Err(e) = redeliver.await {
                    tracing::warn!(error = %e, "kafka: delayed redelivery failed");
                }
            });
            Ok(())
        } else {
            redeliver.await
        }
    }

    async fn reject(self: Box<Self>, reason: String) -> Result<()> {
        self.dead_letter(&reason).await
    }
}
