//! The systems under test: the `ferry-backends` adapter ([`Adapter`]), and each engine's own
//! client used directly, as lean as a user would write it with the same guarantees (the broker
//! confirms each publish; each delivery is acknowledged explicitly; the group is durable).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use futures::StreamExt;

use super::workload::{Received, Subscriber, Target, POLL};

// ---------------------------------------------------------------------------------------------
// The adapter: `ferry_backends::connect(url)`.

/// Any backend through the `Backend` trait.
pub struct Adapter {
    pub backend: Arc<dyn ferry_backends::Backend>,
    pub topic: String,
    pub group: String,
}

pub struct AdapterSub(Box<dyn ferry_backends::BackendSubscription>);
pub struct AdapterDelivery(ferry_backends::Delivery);

impl Target for Adapter {
    type Sub = AdapterSub;

    async fn publish(&self, payload: Bytes) -> Result<()> {
        self.backend
            .publish(&self.topic, ferry_backends::BackendMessage::new(payload))
            .await?;
        Ok(())
    }

    async fn subscribe(&self) -> Result<AdapterSub> {
        let options = ferry_backends::SubscribeOptions::new(self.topic.clone()).group(&self.group);
        Ok(AdapterSub(self.backend.subscribe(options).await?))
    }

    async fn cleanup(&self) {
        if let Err(e) = self.backend.delete_topic(&self.topic).await {
            eprintln!("  cleanup of {}: {e}", self.topic);
        }
        let _ = self.backend.close().await;
    }
}

impl Subscriber for AdapterSub {
    type Delivery = AdapterDelivery;

    async fn recv(&mut self) -> Result<Option<AdapterDelivery>> {
        // `next` is cancel-safe (the `BackendSubscription` contract).
        match tokio::time::timeout(POLL, self.0.next()).await {
            Err(_) => Ok(None),
            Ok(d) => Ok(Some(AdapterDelivery(d?))),
        }
    }
}

impl Received for AdapterDelivery {
    fn payload(&self) -> &[u8] {
        &self.0.payload
    }

    async fn ack(self) -> Result<()> {
        Ok(self.0.ack().await?)
    }
}

// ---------------------------------------------------------------------------------------------
// Ferry: the `ferry::Broker` API.

/// `Broker::publish` and a manual-ack consumer group.
pub struct FerryDirect {
    pub broker: ferry::Broker,
    pub topic: String,
    pub group: String,
}

pub struct FerrySub(ferry::Subscription);
pub struct FerryDelivery(ferry::Delivery);

impl Target for FerryDirect {
    type Sub = FerrySub;

    async fn publish(&self, payload: Bytes) -> Result<()> {
        self.broker
            .publish(&self.topic, ferry::Message::new(payload))
            .await?;
        Ok(())
    }

    async fn subscribe(&self) -> Result<FerrySub> {
        Ok(FerrySub(
            self.broker
                .subscription(&self.topic)
                .group(self.group.clone())
                .manual_ack()
                .build()?,
        ))
    }

    async fn cleanup(&self) {
        self.broker.shutdown(Duration::from_secs(1)).await;
    }
}

impl Subscriber for FerrySub {
    type Delivery = FerryDelivery;

    async fn recv(&mut self) -> Result<Option<FerryDelivery>> {
        match tokio::time::timeout(POLL, self.0.recv()).await {
            Err(_) => Ok(None),
            Ok(d) => Ok(Some(FerryDelivery(d?))),
        }
    }
}

impl Received for FerryDelivery {
    fn payload(&self) -> &[u8] {
        self.0.message().payload()
    }

    async fn ack(self) -> Result<()> {
        self.0.ack().map_err(|e| anyhow!("ack: {e}"))
    }
}

// ---------------------------------------------------------------------------------------------
// NATS JetStream: async-nats.

/// `jetstream::Context::publish` (awaiting the ack) and a durable pull consumer shared by the
/// group, explicit acks.
pub struct NatsDirect {
    js: async_nats::jetstream::Context,
    stream: String,
    subject: String,
    consumer: async_nats::jetstream::consumer::PullConsumer,
}

pub struct NatsSub(async_nats::jetstream::consumer::pull::Stream);
pub struct NatsDelivery(async_nats::jetstream::Message);

impl NatsDirect {
    pub async fn connect(addr: &str, run: &str) -> Result<Self> {
        use async_nats::jetstream::{consumer, stream};
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .connect(addr)
            .await?;
        let js = async_nats::jetstream::new(client);
        let name = format!("FERRY_BENCH_DIRECT_{run}");
        let subject = format!("ferry-bench-direct.{run}");
        let s = js
            .create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![subject.clone()],
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await?;
        let consumer = s
            .create_consumer(consumer::pull::Config {
                durable_name: Some("bench".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                deliver_policy: consumer::DeliverPolicy::New,
                ..Default::default()
            })
            .await?;
        Ok(NatsDirect {
            js,
            stream: name,
            subject,
            consumer,
        })
    }
}

impl Target for NatsDirect {
    type Sub = NatsSub;

    async fn publish(&self, payload: Bytes) -> Result<()> {
        self.js
            .publish(self.subject.clone(), payload)
            .await?
            .await?;
        Ok(())
    }

    async fn subscribe(&self) -> Result<NatsSub> {
        Ok(NatsSub(self.consumer.messages().await?))
    }

    async fn cleanup(&self) {
        if let Err(e) = self.js.delete_stream(&self.stream).await {
            eprintln!("  deleting stream {}: {e}", self.stream);
        }
    }
}

impl Subscriber for NatsSub {
    type Delivery = NatsDelivery;

    async fn recv(&mut self) -> Result<Option<NatsDelivery>> {
        match tokio::time::timeout(POLL, self.0.next()).await {
            Err(_) => Ok(None),
            Ok(None) => bail!("the consumer's message stream ended"),
            Ok(Some(m)) => Ok(Some(NatsDelivery(m.map_err(|e| anyhow!("pull: {e}"))?))),
        }
    }
}

impl Received for NatsDelivery {
    fn payload(&self) -> &[u8] {
        &self.0.payload
    }

    async fn ack(self) -> Result<()> {
        self.0.ack().await.map_err(|e| anyhow!("ack: {e}"))
    }
}

// ---------------------------------------------------------------------------------------------
// Redis Streams: redis-rs.

/// `XADD`, a consumer group read with `XREADGROUP` (a connection per member, blocking reads),
/// `XACK` per delivery.
pub struct RedisDirect {
    client: redis::Client,
    conn: redis::aio::MultiplexedConnection,
    key: String,
    group: String,
}

pub struct RedisSub {
    conn: redis::aio::MultiplexedConnection,
    reader: redis::aio::MultiplexedConnection,
    key: Arc<str>,
    group: Arc<str>,
    consumer: String,
    buffer: VecDeque<(String, Bytes)>,
}

pub struct RedisDelivery {
    conn: redis::aio::MultiplexedConnection,
    key: Arc<str>,
    group: Arc<str>,
    id: String,
    payload: Bytes,
}

impl RedisDirect {
    pub async fn connect(url: &str, run: &str) -> Result<Self> {
        let client = redis::Client::open(url)?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let key = format!("ferry-bench-direct:{run}");
        let group = "bench".to_string();
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&key)
            .arg(&group)
            .arg("$")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await?;
        Ok(RedisDirect {
            client,
            conn,
            key,
            group,
        })
    }
}

impl Target for RedisDirect {
    type Sub = RedisSub;

    async fn publish(&self, payload: Bytes) -> Result<()> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("XADD")
            .arg(&self.key)
            .arg("*")
            .arg("payload")
            .arg(payload.as_ref())
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn subscribe(&self) -> Result<RedisSub> {
        // Blocking reads get a connection of their own, without a response timeout.
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        let reader = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok(RedisSub {
            conn: self.conn.clone(),
            reader,
            key: self.key.as_str().into(),
            group: self.group.as_str().into(),
            consumer: format!("c{}", fastrand_u64()),
            buffer: VecDeque::new(),
        })
    }

    async fn cleanup(&self) {
        let mut conn = self.conn.clone();
        let r: redis::RedisResult<i64> = redis::cmd("DEL")
            .arg(&self.key)
            .query_async(&mut conn)
            .await;
        if let Err(e) = r {
            eprintln!("  deleting {}: {e}", self.key);
        }
    }
}

impl Subscriber for RedisSub {
    type Delivery = RedisDelivery;

    async fn recv(&mut self) -> Result<Option<RedisDelivery>> {
        if self.buffer.is_empty() {
            let block_ms = u64::try_from(POLL.as_millis()).unwrap_or(100);
            let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(&*self.group)
                .arg(&self.consumer)
                .arg("COUNT")
                .arg(64)
                .arg("BLOCK")
                .arg(block_ms)
                .arg("STREAMS")
                .arg(&*self.key)
                .arg(">")
                .query_async(&mut self.reader)
                .await?;
            for key in reply.map(|r| r.keys).unwrap_or_default() {
                for entry in key.ids {
                    let payload = entry
                        .get::<Vec<u8>>("payload")
                        .map(Bytes::from)
                        .context("an entry without a payload")?;
                    self.buffer.push_back((entry.id, payload));
                }
            }
        }
        Ok(self.buffer.pop_front().map(|(id, payload)| RedisDelivery {
            conn: self.conn.clone(),
            key: self.key.clone(),
            group: self.group.clone(),
            id,
            payload,
        }))
    }
}

impl Received for RedisDelivery {
    fn payload(&self) -> &[u8] {
        &self.payload
    }

    async fn ack(mut self) -> Result<()> {
        let _: i64 = redis::cmd("XACK")
            .arg(&*self.key)
            .arg(&*self.group)
            .arg(&self.id)
            .query_async(&mut self.conn)
            .await?;
        Ok(())
    }
}

fn fastrand_u64() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()))
}

// ---------------------------------------------------------------------------------------------
// RabbitMQ: lapin.

/// A durable quorum queue (as the adapter's groups), persistent messages published to it with
/// publisher confirms on one channel, a channel and `basic_consume` per member (prefetch 64),
/// `basic_ack` per delivery.
pub struct AmqpDirect {
    conn: lapin::Connection,
    publisher: lapin::Channel,
    queue: String,
}

pub struct AmqpSub(lapin::Consumer);
pub struct AmqpDelivery(lapin::message::Delivery);

impl AmqpDirect {
    pub async fn connect(url: &str, run: &str) -> Result<Self> {
        use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions};
        use lapin::types::{AMQPValue, FieldTable};
        let conn = tokio::time::timeout(
            Duration::from_secs(2),
            lapin::Connection::connect(url, lapin::ConnectionProperties::default()),
        )
        .await
        .map_err(|_| anyhow!("connect timed out"))??;
        let publisher = conn.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let queue = format!("ferry-bench-direct:{run}");
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        publisher
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await?;
        Ok(AmqpDirect {
            conn,
            publisher,
            queue,
        })
    }
}

impl Target for AmqpDirect {
    type Sub = AmqpSub;

    async fn publish(&self, payload: Bytes) -> Result<()> {
        let confirm = self
            .publisher
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                lapin::options::BasicPublishOptions::default(),
                &payload,
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await?
            .await?;
        if let lapin::Confirmation::Nack(_) = confirm {
            bail!("the broker nacked a publish");
        }
        Ok(())
    }

    async fn subscribe(&self) -> Result<AmqpSub> {
        let ch = self.conn.create_channel().await?;
        ch.basic_qos(64, lapin::options::BasicQosOptions::default())
            .await?;
        let consumer = ch
            .basic_consume(
                self.queue.as_str().into(),
                format!("bench-{}", fastrand_u64()).as_str().into(),
                lapin::options::BasicConsumeOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await?;
        Ok(AmqpSub(consumer))
    }

    async fn cleanup(&self) {
        let r = self
            .publisher
            .queue_delete(
                self.queue.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
        if let Err(e) = r {
            eprintln!("  deleting queue {}: {e}", self.queue);
        }
        let _ = self.conn.close(200, "done".into()).await;
    }
}

impl Subscriber for AmqpSub {
    type Delivery = AmqpDelivery;

    async fn recv(&mut self) -> Result<Option<AmqpDelivery>> {
        match tokio::time::timeout(POLL, self.0.next()).await {
            Err(_) => Ok(None),
            Ok(None) => bail!("the consumer was cancelled"),
            Ok(Some(d)) => Ok(Some(AmqpDelivery(d?))),
        }
    }
}

impl Received for AmqpDelivery {
    fn payload(&self) -> &[u8] {
        &self.0.data
    }

    async fn ack(self) -> Result<()> {
        self.0
            .acker
            .ack(lapin::options::BasicAckOptions::default())
            .await?;
        Ok(())
    }
}
