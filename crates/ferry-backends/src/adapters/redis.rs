//! Redis Streams (`redis://host:6379/db`).
//!
//! **Mapping.** Topic `t` is the stream `P t` (prefix `?prefix=P`, default empty); its dead
//! letters are the stream `t:dlq`. Entries have the fields `id`, `payload`, `key` (optional)
//! and `h:<name>` per header. `?maxlen=N` trims streams to about N entries on publish.
//!
//! **Subscriptions.** A consumer group is a Redis consumer group (`XGROUP CREATE ... MKSTREAM`,
//! at `$` for `Latest` or `0` for `Earliest`); each subscription is a consumer in it with a
//! random name. A fanout subscription gets a consumer group of its own
//! (`ferry-fanout-<uuid>`), destroyed when the subscription closes (one left behind by a killed
//! process keeps its pending entries until deleted). New entries come from `XREADGROUP ... >`
//! on a connection of the subscription's own (blocking reads would stall a shared one).
//!
//! **Redelivery (emulated).** Each subscriber runs `XAUTOCLAIM` with min-idle = the ack
//! timeout, every quarter of it, so entries whose consumer died or stalled are claimed and
//! redelivered; attempt counts are the PEL's delivery counts (`XPENDING`). A nack re-idles the
//! entry with `XCLAIM ... IDLE ... JUSTID` so that the next `XAUTOCLAIM` takes it: at once, or
//! after the nack delay — delays longer than the ack timeout are capped at it. An entry
//! delivered more than `max_attempts` times, nacked on its last attempt or rejected is written
//! to `t:dlq` and acknowledged in one `MULTI`. Acknowledging a delivery of
//! [`dead_letters`](Backend::dead_letters) removes the entry from `t:dlq` (`XDEL`).
//!
//! **Connection loss.** Commands share one multiplexed connection (response timeout: the
//! [`operation_timeout`](crate::ConnectOptions::operation_timeout)). When it is lost, the calls
//! in flight fail with [`BackendError::Unreachable`] (or `Timeout`) and the next call opens a new
//! connection (one attempt, bounded by the connect `attempt_timeout`): publishing resumes by
//! itself once Redis is back, and nothing is acknowledged that Redis did not answer. A
//! subscription's reader reconnects likewise, with a backoff (100 ms to 2 s) while Redis is
//! away; deliveries read before the loss stay pending in the group and come back through
//! `XAUTOCLAIM` after the ack timeout if their ack failed.
//!
//! **Above the contract.** Through a [`Queue`](crate::Queue), everything is emulated: delayed
//! delivery re-nacks a message that is not due yet (each nack delay at most the ack timeout, so
//! a long delay takes several, which do not count as attempts), retry delays longer than the
//! ack timeout are enforced the same way by the subscription that nacked, TTL drops expired
//! messages on receipt, priority lanes are the streams `<t>.prio-high` and `<t>.prio-low`,
//! de-duplication is the `Queue`'s, and redrive and purge drain `t:dlq`.
//!
//! **Limits.** No wildcard subscriptions (streams are separate keys). `publish_batch` is one
//! `MULTI`/`EXEC`, so atomic.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamPendingCountReply, StreamReadReply};
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisError, RedisFuture, Value};
use tokio::sync::mpsc;
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
use crate::filter::{check_filter, check_topic, has_wildcards};

const NAME: &str = "redis";
const HEADER_PREFIX: &str = "h:";

/// The shared connection: replaced by a new one on the next call after it was lost.
struct Conn {
    client: redis::Client,
    config: AsyncConnectionConfig,
    connect_timeout: Duration,
    /// The connection and its generation (`None`: lost, reconnect on the next call).
    current: parking_lot::Mutex<(u64, Option<MultiplexedConnection>)>,
    /// Serializes reconnections.
    reconnect: tokio::sync::Mutex<()>,
}

impl Conn {
    /// The current connection, or a new one if it was lost.
    async fn get(self: &Arc<Self>) -> Result<Tracked> {
        let tracked = |gen, conn| Tracked {
            conn,
            gen,
            owner: self.clone(),
        };
        if let (gen, Some(c)) = &*self.current.lock() {
            return Ok(tracked(*gen, c.clone()));
        }
        let _one = self.reconnect.lock().await;
        if let (gen, Some(c)) = &*self.current.lock() {
            return Ok(tracked(*gen, c.clone()));
        }
        let conn = bounded(NAME, "reconnect", self.connect_timeout, async {
            self.client
                .get_multiplexed_async_connection_with_config(&self.config)
                .await
                .map_err(|e| redis_error("reconnect", &e))
        })
        .await
        .map_err(timeout_is_unreachable)?;
        let mut current = self.current.lock();
        current.0 += 1;
        current.1 = Some(conn.clone());
        tracing::debug!(generation = current.0, "redis: reconnected");
        Ok(tracked(current.0, conn))
    }

    /// An error on connection `gen`: forgets the connection if the error says it is gone.
    fn failed(&self, gen: u64, e: &RedisError) {
        if e.is_connection_dropped()
            || e.is_io_error()
            || e.is_connection_refusal()
            || e.is_unrecoverable_error()
            || e.is_timeout()
        {
            let mut current = self.current.lock();
            if current.0 == gen && current.1.is_some() {
                tracing::debug!(error = %e, "redis: connection lost");
                current.1 = None;
            }
        }
    }
}

/// A connection that reports its errors to its [`Conn`].
struct Tracked {
    conn: MultiplexedConnection,
    gen: u64,
    owner: Arc<Conn>,
}

impl ConnectionLike for Tracked {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let r = self.conn.req_packed_command(cmd).await;
            if let Err(e) = &r {
                self.owner.failed(self.gen, e);
            }
            r
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let r = self.conn.req_packed_commands(pipeline, offset, count).await;
            if let Err(e) = &r {
                self.owner.failed(self.gen, e);
            }
            r
        })
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}

/// The Redis Streams backend.
pub struct RedisBackend {
    client: redis::Client,
    conn: Arc<Conn>,
    op_timeout: Duration,
    prefix: String,
    maxlen: Option<usize>,
    life: Lifecycle,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("prefix", &self.prefix)
            .field("maxlen", &self.maxlen)
            .finish()
    }
}

fn redis_error(operation: &str, e: &RedisError) -> BackendError {
    if e.is_timeout() {
        BackendError::Timeout {
            backend: NAME,
            operation: operation.to_string(),
            after: Duration::ZERO,
        }
    } else if e.is_connection_refusal() || e.is_connection_dropped() || e.is_io_error() {
        BackendError::Unreachable {
            backend: NAME,
            reason: format!("{operation}: {e}"),
        }
    } else {
        BackendError::backend(NAME, operation, e)
    }
}

/// A failed XADD: no answer in time or the connection dropped once the command was sent is
/// in doubt (Redis may have appended the entry); a refused connection or an error reply is not.
fn publish_error(e: &RedisError) -> BackendError {
    if e.is_timeout() || e.is_connection_dropped() {
        BackendError::in_doubt(NAME, "publish", format!("no reply: {e}"))
    } else {
        redis_error("publish", e)
    }
}

impl RedisBackend {
    /// The capability table.
    pub const fn capabilities() -> Capabilities {
        Capabilities {
            fanout: Support::Native,
            groups: Support::Native,
            ordering: Support::Native,
            ack_timeout: Support::Emulated,
            nack_delay: Support::Emulated,
            dead_letter: Support::Emulated,
            wildcards: Support::Unsupported,
            replay: Support::Native,
            durable_groups: Support::Native,
            atomic_batch: Support::Native,
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
        let prefix = query(url, "prefix").unwrap_or_default();
        let maxlen = query_num(url, "maxlen")?;
        let mut base = url.clone();
        base.set_query(None);
        let client = redis::Client::open(base.as_str()).map_err(|e| BackendError::InvalidUrl {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(options.retry.attempt_timeout))
            .set_response_timeout(Some(options.operation_timeout));
        let conn = options
            .retry
            .run(NAME, "connect", || {
                let client = client.clone();
                let config = config.clone();
                async move {
                    let mut conn = client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await
                        .map_err(|e| BackendError::Unreachable {
                            backend: NAME,
                            reason: e.to_string(),
                        })?;
                    let _: String = redis::cmd("PING")
                        .query_async(&mut conn)
                        .await
                        .map_err(|e| redis_error("ping", &e))?;
                    Ok(conn)
                }
            })
            .await
            .map_err(timeout_is_unreachable)?;
        Ok(RedisBackend {
            conn: Arc::new(Conn {
                client: client.clone(),
                config,
                connect_timeout: options.retry.attempt_timeout,
                current: parking_lot::Mutex::new((0, Some(conn))),
                reconnect: tokio::sync::Mutex::new(()),
            }),
            client,
            op_timeout: options.operation_timeout,
            prefix,
            maxlen,
            life: Lifecycle::default(),
        })
    }

    fn key(&self, topic: &str) -> String {
        format!("{}{topic}", self.prefix)
    }

    fn xadd(&self, key: &str, m: &BackendMessage) -> redis::Cmd {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(key);
        if let Some(n) = self.maxlen {
            cmd.arg("MAXLEN").arg("~").arg(n);
        }
        cmd.arg("*");
        entry_fields(&mut cmd, m);
        cmd
    }

    /// A dedicated connection for blocking reads (their `BLOCK` is at most 500 ms: the
    /// response timeout only catches a connection that stopped answering).
    async fn reader(&self) -> Result<MultiplexedConnection> {
        reader_connection(&self.client, self.op_timeout).await
    }

    async fn group_subscription(
        &self,
        stream_key: String,
        topic: String,
        group: String,
        start: Start,
        options: &SubscribeOptions,
        destroy_on_close: bool,
    ) -> Result<Box<dyn BackendSubscription>> {
        let mut conn = self.conn.get().await?;
        let start_id = match start {
            Start::Latest => "$",
            Start::Earliest => "0",
        };
        let created: std::result::Result<(), RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&stream_key)
            .arg(&group)
            .arg(start_id)
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        if let Err(e) = created {
            if e.code() != Some("BUSYGROUP") {
                return Err(redis_error("create group", &e));
            }
        }
        let reader = self.reader().await?;
        let ack_timeout_ms = u64::try_from(options.ack_timeout.as_millis()).unwrap_or(u64::MAX);
        let claim_every =
            (options.ack_timeout / 4).clamp(Duration::from_millis(20), Duration::from_secs(5));
        drop(conn);
        let shared = Arc::new(SubShared {
            conn: self.conn.clone(),
            stream_key,
            dlq_key: format!("{}:dlq", self.key(&topic)),
            topic,
            group,
            consumer: format!("c-{}", uuid::Uuid::new_v4().simple()),
            ack_timeout_ms,
            max_attempts: options.max_attempts,
            claim_now: AtomicBool::new(true),
        });
        let reader = Reader {
            shared: shared.clone(),
            client: self.client.clone(),
            op_timeout: self.op_timeout,
            reader,
            buffer: VecDeque::new(),
            next_claim: Instant::now(),
            claim_every,
            block: claim_every.min(Duration::from_millis(500)),
            count: options.prefetch,
        };
        let cancel = self.life.child();
        let (tx, rx) = mpsc::channel(options.prefetch.max(1));
        let stop = cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = reader.run(tx) => {}
            }
        });
        Ok(Box::new(RedisSubscription {
            rx,
            shared,
            cancel,
            destroy_on_close,
        }))
    }
}

async fn reader_connection(
    client: &redis::Client,
    op_timeout: Duration,
) -> Result<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(op_timeout + Duration::from_secs(1)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| redis_error("connect", &e))
}

fn entry_fields(cmd: &mut redis::Cmd, m: &BackendMessage) {
    cmd.arg("id").arg(&m.id);
    cmd.arg("payload").arg(m.payload.as_ref());
    if let Some(k) = &m.key {
        cmd.arg("key").arg(k);
    }
    for (k, v) in &m.headers {
        cmd.arg(format!("{HEADER_PREFIX}{k}")).arg(v);
    }
}

fn message_of(entry: &StreamId) -> BackendMessage {
    let mut headers = BTreeMap::new();
    for (k, v) in &entry.map {
        if let Some(name) = k.strip_prefix(HEADER_PREFIX) {
            if let Ok(v) = redis::from_redis_value_ref::<String>(v) {
                headers.insert(name.to_string(), v);
            }
        }
    }
    BackendMessage {
        id: entry
            .get::<String>("id")
            .unwrap_or_else(|| entry.id.clone()),
        payload: entry
            .get::<Vec<u8>>("payload")
            .map(bytes::Bytes::from)
            .unwrap_or_default(),
        headers,
        key: entry.get::<String>("key"),
    }
}

#[async_trait]
impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Self::capabilities()
    }

    async fn publish(&self, topic: &str, message: BackendMessage) -> Result<PublishAck> {
        self.life.check()?;
        check_topic(topic)?;
        let mut conn = self.conn.get().await?;
        let id: String = self
            .xadd(&self.key(topic), &message)
            .query_async(&mut conn)
            .await
            .map_err(|e| publish_error(&e))?;
        Ok(PublishAck {
            id: message.id,
            position: Position::EntryId(id),
        })
    }

    async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<BackendMessage>,
    ) -> Result<Vec<PublishAck>> {
        self.life.check()?;
        check_topic(topic)?;
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let key = self.key(topic);
        let mut pipe = redis::pipe();
        pipe.atomic();
        for m in &messages {
            pipe.add_command(self.xadd(&key, m));
        }
        let mut conn = self.conn.get().await?;
        let ids: Vec<String> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| publish_error(&e))?;
        Ok(messages
            .into_iter()
            .zip(ids)
            .map(|(m, id)| PublishAck {
                id: m.id,
                position: Position::EntryId(id),
            })
            .collect())
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn BackendSubscription>> {
        self.life.check()?;
        options.validate()?;
        check_filter(&options.filter)?;
        if has_wildcards(&options.filter) {
            return Err(BackendError::unsupported(NAME, "wildcard filters"));
        }
        let (group, destroy) = match &options.group {
            Some(g) => (g.clone(), false),
            None => (
                format!("ferry-fanout-{}", uuid::Uuid::new_v4().simple()),
                true,
            ),
        };
        self.group_subscription(
            self.key(&options.filter),
            options.filter.clone(),
            group,
            options.start,
            &options,
            destroy,
        )
        .await
    }

    async fn dead_letters(&self, topic: &str) -> Result<Box<dyn BackendSubscription>> {
        self.life.check()?;
        check_topic(topic)?;
        let options = SubscribeOptions::new(topic).max_attempts(u32::MAX);
        self.group_subscription(
            format!("{}:dlq", self.key(topic)),
            topic.to_string(),
            format!("ferry-dlq-{}", uuid::Uuid::new_v4().simple()),
            Start::Earliest,
            &options,
            true,
        )
        .await
    }

    async fn delete_topic(&self, topic: &str) -> Result<()> {
        check_topic(topic)?;
        let mut conn = self.conn.get().await?;
        let key = self.key(topic);
        let _: i64 = redis::cmd("DEL")
            .arg(&key)
            .arg(format!("{key}:dlq"))
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("delete", &e))?;
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.life.close();
        Ok(())
    }
}

/// What a subscription and its deliveries share.
struct SubShared {
    conn: Arc<Conn>,
    stream_key: String,
    dlq_key: String,
    topic: String,
    group: String,
    consumer: String,
    ack_timeout_ms: u64,
    max_attempts: u32,
    /// A nack asked for an immediate claim run.
    claim_now: AtomicBool,
}

impl SubShared {
    /// Writes the entry to the dead-letter stream and acknowledges it, atomically.
    async fn dead_letter(
        &self,
        entry_id: &str,
        message: &BackendMessage,
        attempts: u32,
        reason: &str,
    ) -> Result<()> {
        let mut m = message.clone();
        m.headers.insert(DLQ_REASON_HEADER.into(), reason.into());
        m.headers
            .insert(DLQ_ATTEMPTS_HEADER.into(), attempts.to_string());
        m.headers
            .insert(DLQ_TOPIC_HEADER.into(), self.topic.clone());
        let mut add = redis::cmd("XADD");
        add.arg(&self.dlq_key).arg("*");
        entry_fields(&mut add, &m);
        let mut ack = redis::cmd("XACK");
        ack.arg(&self.stream_key).arg(&self.group).arg(entry_id);
        let mut pipe = redis::pipe();
        pipe.atomic().add_command(add).add_command(ack);
        let mut conn = self.conn.get().await?;
        let _: (String, i64) = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("dead-letter", &e))?;
        Ok(())
    }
}

/// Reads deliveries (claims, then new entries) in a task of its own, so that
/// [`RedisSubscription::next`] is cancel-safe: an entry read from Redis is never lost with a
/// dropped future.
struct Reader {
    shared: Arc<SubShared>,
    client: redis::Client,
    op_timeout: Duration,
    reader: MultiplexedConnection,
    buffer: VecDeque<Delivery>,
    next_claim: Instant,
    claim_every: Duration,
    block: Duration,
    count: usize,
}

impl Reader {
    fn delivery(&self, entry: &StreamId, attempt: u32) -> Delivery {
        let message = message_of(entry);
        Delivery::new(
            message.clone(),
            self.shared.topic.clone(),
            attempt,
            Box::new(RedisAcker {
                shared: self.shared.clone(),
                entry_id: entry.id.clone(),
                message,
                attempt,
            }),
        )
    }

    /// Claims entries idle for longer than the ack timeout; dead-letters those past their
    /// attempts, buffers the others.
    async fn claim(&mut self) -> Result<()> {
        let s = self.shared.clone();
        let mut conn = s.conn.get().await?;
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&s.stream_key)
            .arg(&s.group)
            .arg(&s.consumer)
            .arg(s.ack_timeout_ms)
            .arg("0-0")
            .arg("COUNT")
            .arg(self.count)
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("claim", &e))?;
        if reply.claimed.is_empty() {
            return Ok(());
        }
        let first = reply
            .claimed
            .first()
            .map(|e| e.id.clone())
            .unwrap_or_default();
        let last = reply
            .claimed
            .last()
            .map(|e| e.id.clone())
            .unwrap_or_default();
        let pending: StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(&s.stream_key)
            .arg(&s.group)
            .arg(&first)
            .arg(&last)
            .arg(reply.claimed.len())
            .arg(&s.consumer)
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("pending", &e))?;
        for entry in &reply.claimed {
            let attempt = pending
                .ids
                .iter()
                .find(|p| p.id == entry.id)
                .map_or(2, |p| u32::try_from(p.times_delivered).unwrap_or(u32::MAX));
            if attempt > s.max_attempts {
                let message = message_of(entry);
                s.dead_letter(&entry.id, &message, attempt - 1, "max_attempts")
                    .await?;
                continue;
            }
            let d = self.delivery(entry, attempt);
            self.buffer.push_back(d);
        }
        Ok(())
    }

    async fn read_new(&mut self) -> Result<()> {
        let s = self.shared.clone();
        let block_ms = u64::try_from(self.block.as_millis()).unwrap_or(500).max(1);
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&s.group)
            .arg(&s.consumer)
            .arg("COUNT")
            .arg(self.count)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(&s.stream_key)
            .arg(">")
            .query_async(&mut self.reader)
            .await
            .map_err(|e| redis_error("read", &e))?;
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in &key.ids {
                let d = self.delivery(entry, 1);
                self.buffer.push_back(d);
            }
        }
        Ok(())
    }

    async fn fill(&mut self) -> Result<()> {
        let now = Instant::now();
        if now >= self.next_claim || self.shared.claim_now.swap(false, Ordering::AcqRel) {
            self.next_claim = now + self.claim_every;
            self.claim().await?;
            if !self.buffer.is_empty() {
                return Ok(());
            }
        }
        self.read_new().await
    }

    /// Feeds `tx` until the subscription is dropped or cancelled, or a permanent error.
    async fn run(mut self, tx: mpsc::Sender<Result<Delivery>>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            while let Some(d) = self.buffer.pop_front() {
                if tx.send(Ok(d)).await.is_err() {
                    return;
                }
            }
            if tx.is_closed() {
                return;
            }
            match self.fill().await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) if !e.is_transient() => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                Err(e) => {
                    // The connection may be gone: wait, then read on a new one.
                    tracing::debug!(error = %e, ?backoff, "redis read failed; reconnecting");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    match reader_connection(&self.client, self.op_timeout).await {
                        Ok(c) => self.reader = c,
                        Err(e) => tracing::debug!(error = %e, "redis: reader reconnect failed"),
                    }
                }
            }
        }
    }
}

struct RedisSubscription {
    rx: mpsc::Receiver<Result<Delivery>>,
    shared: Arc<SubShared>,
    cancel: tokio_util::sync::CancellationToken,
    destroy_on_close: bool,
}

impl RedisSubscription {
    fn destroy(&mut self) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        self.cancel.cancel();
        if !std::mem::take(&mut self.destroy_on_close) {
            return None;
        }
        let s = self.shared.clone();
        Some(async move {
            let Ok(mut conn) = s.conn.get().await else {
                return;
            };
            let _: std::result::Result<i64, RedisError> = redis::cmd("XGROUP")
                .arg("DESTROY")
                .arg(&s.stream_key)
                .arg(&s.group)
                .query_async(&mut conn)
                .await;
        })
    }
}

#[async_trait]
impl BackendSubscription for RedisSubscription {
    async fn next(&mut self) -> Result<Delivery> {
        if self.cancel.is_cancelled() {
            return Err(BackendError::Closed);
        }
        tokio::select! {
            () = self.cancel.cancelled() => Err(BackendError::Closed),
            d = self.rx.recv() => d.unwrap_or(Err(BackendError::Closed)),
        }
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        if let Some(f) = self.destroy() {
            f.await;
        }
        Ok(())
    }
}

impl Drop for RedisSubscription {
    fn drop(&mut self) {
        if let Some(f) = self.destroy() {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(f);
            }
        }
    }
}

struct RedisAcker {
    shared: Arc<SubShared>,
    entry_id: String,
    message: BackendMessage,
    attempt: u32,
}

#[async_trait]
impl Acker for RedisAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        let s = &self.shared;
        let mut conn = s.conn.get().await?;
        let n: i64 = if s.stream_key == s.dlq_key {
            // A dead letter acknowledged is done with: remove it from the dead-letter stream.
            let (acked, _deleted): (i64, i64) = redis::pipe()
                .atomic()
                .cmd("XACK")
                .arg(&s.stream_key)
                .arg(&s.group)
                .arg(&self.entry_id)
                .cmd("XDEL")
                .arg(&s.stream_key)
                .arg(&self.entry_id)
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_error("ack", &e))?;
            acked
        } else {
            redis::cmd("XACK")
                .arg(&s.stream_key)
                .arg(&s.group)
                .arg(&self.entry_id)
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_error("ack", &e))?
        };
        if n == 0 {
            return Err(BackendError::Stale);
        }
        Ok(())
    }

    async fn nack(self: Box<Self>, delay: Option<Duration>) -> Result<()> {
        let s = &self.shared;
        if self.attempt >= s.max_attempts {
            return s
                .dead_letter(&self.entry_id, &self.message, self.attempt, "max_attempts")
                .await;
        }
        let delay_ms = delay.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        // Idle so that XAUTOCLAIM (min-idle = ack timeout) takes it after `delay`.
        let idle = s.ack_timeout_ms.saturating_sub(delay_ms);
        let mut conn = s.conn.get().await?;
        let claimed: Vec<Value> = redis::cmd("XCLAIM")
            .arg(&s.stream_key)
            .arg(&s.group)
            .arg(&s.consumer)
            .arg(0)
            .arg(&self.entry_id)
            .arg("IDLE")
            .arg(idle)
            .arg("JUSTID")
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("nack", &e))?;
        if claimed.is_empty() {
            return Err(BackendError::Stale);
        }
        if delay_ms == 0 {
            s.claim_now.store(true, Ordering::Release);
        }
        Ok(())
    }

    async fn reject(self: Box<Self>, reason: String) -> Result<()> {
        self.shared
            .dead_letter(&self.entry_id, &self.message, self.attempt, &reason)
            .await
    }
}
