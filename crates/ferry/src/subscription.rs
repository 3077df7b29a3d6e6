//! Subscriptions: the consumer-side handle, its builder and deliveries.
//!
//! A [`Subscription`] is one member of a consumer (a fanout subscription or a consumer group).
//! It reads in batches into a local buffer, so the topic lock is taken once per batch rather than
//! once per message, and offers `recv`, `try_recv`, `recv_batch`, a [`Stream`] and a payload
//! channel. Dropping it unsubscribes: a fanout subscription is removed with everything it had not
//! settled counted as dropped; a group member's unsettled deliveries go back to the group.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::Stream;
use tokio::time::Sleep;

use crate::broker::Broker;
use crate::consumer::{AckMode, Consumer, Settle};
use crate::error::{AckError, RecvError, SubscribeError, TryRecvError};
use crate::filter::TopicFilter;
use crate::headers_filter::HeaderMatch;
use crate::message::{Message, Record};
use crate::stats::SubscriptionStats;
use crate::topic::{TopicError, TopicName};

/// Where a new subscription (or a new consumer group) starts reading the topics that exist when
/// it is created. Topics created later are read from their beginning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartPosition {
    /// Only records published from now on (the default).
    #[default]
    Latest,
    /// The earliest record still retained.
    Earliest,
    /// A given offset (clamped to what is retained).
    Offset(u64),
    /// The first retained record whose timestamp is at or after this time.
    Timestamp(SystemTime),
}

/// A delivered message without its acknowledgement handle: the record (which knows its topic)
/// and which attempt this is. Cheap to clone (one reference count); this is what handler services
/// receive, so that middleware such as retries can hold on to it. Dereferences to the
/// [`Message`].
#[derive(Clone)]
pub struct Envelope {
    record: Arc<Record>,
    attempt: u32,
}

impl Envelope {
    /// The topic the message was published to.
    pub fn topic(&self) -> &TopicName {
        &self.record.topic
    }

    /// Its offset in the topic.
    pub fn offset(&self) -> u64 {
        self.record.offset()
    }

    /// The message.
    pub fn message(&self) -> &Message {
        &self.record.message
    }

    /// The shared record (offset and message).
    pub fn record(&self) -> &Arc<Record> {
        &self.record
    }

    /// Which delivery attempt this is, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

impl std::ops::Deref for Envelope {
    type Target = Message;
    fn deref(&self) -> &Message {
        &self.record.message
    }
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envelope")
            .field("topic", &self.record.topic)
            .field("offset", &self.record.offset())
            .field("attempt", &self.attempt)
            .field("id", &self.record.message.id())
            .finish()
    }
}

/// A message handed to a subscriber, with its acknowledgement handle.
///
/// In manual-ack mode, settle it with [`ack`](Self::ack), [`nack`](Self::nack),
/// [`nack_after`](Self::nack_after) or [`reject`](Self::reject). Dropping an unsettled delivery
/// nacks it (it is redelivered and the attempt counts). In auto-ack mode these are no-ops.
/// Dereferences to its [`Envelope`] (topic, offset, attempt), and through it to the [`Message`].
pub struct Delivery {
    envelope: Envelope,
    ack: Option<(Arc<Consumer>, u64)>,
}

impl Delivery {
    pub(crate) fn auto(record: Arc<Record>) -> Self {
        Delivery {
            envelope: Envelope { record, attempt: 1 },
            ack: None,
        }
    }

    pub(crate) fn manual(
        record: Arc<Record>,
        attempt: u32,
        consumer: Arc<Consumer>,
        tag: u64,
    ) -> Self {
        Delivery {
            envelope: Envelope { record, attempt },
            ack: Some((consumer, tag)),
        }
    }

    /// The delivered message without the acknowledgement handle.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// Whether this delivery must be settled by the subscriber.
    pub fn needs_ack(&self) -> bool {
        self.ack.is_some()
    }

    /// Acknowledges: the message is done and will not be redelivered.
    pub fn ack(mut self) -> Result<(), AckError> {
        self.settle(Settle::Ack)
    }

    /// Negative acknowledgement: redeliver now (or dead-letter after the last attempt).
    pub fn nack(mut self) -> Result<(), AckError> {
        self.settle(Settle::Nack(None))
    }

    /// Negative acknowledgement: redeliver after `delay` (or dead-letter after the last attempt).
    pub fn nack_after(mut self, delay: Duration) -> Result<(), AckError> {
        self.settle(Settle::Nack(Some(delay)))
    }

    /// Rejects the message: it goes to the topic's dead-letter queue with this reason.
    pub fn reject(mut self, reason: impl Into<String>) -> Result<(), AckError> {
        self.settle(Settle::Reject(reason.into()))
    }

    fn settle(&mut self, how: Settle) -> Result<(), AckError> {
        match self.ack.take() {
            Some((consumer, tag)) => consumer.settle(tag, how),
            None => Ok(()),
        }
    }

    /// Splits off the acknowledgement handle (handler pools settle from the handler's result).
    pub(crate) fn detach(mut self) -> (Envelope, Option<AckToken>) {
        let token = self
            .ack
            .take()
            .map(|(consumer, tag)| AckToken { consumer, tag });
        (self.envelope.clone(), token)
    }
}

impl std::ops::Deref for Delivery {
    type Target = Envelope;
    fn deref(&self) -> &Envelope {
        &self.envelope
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("envelope", &self.envelope)
            .field("needs_ack", &self.ack.is_some())
            .finish()
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some((consumer, tag)) = self.ack.take() {
            let _ = consumer.settle(tag, Settle::Nack(None));
        }
    }
}

/// A detached acknowledgement handle (used by handler pools).
pub(crate) struct AckToken {
    consumer: Arc<Consumer>,
    tag: u64,
}

impl AckToken {
    pub(crate) fn settle(self, how: Settle) -> Result<(), AckError> {
        self.consumer.settle(self.tag, how)
    }
}

/// Options of a new subscription; made by [`Broker::subscription`].
#[derive(Debug, Clone)]
#[must_use]
pub struct SubscriptionBuilder {
    pub(crate) broker: Broker,
    /// The parsed filter, or why it did not parse (reported by `build`).
    pub(crate) filter: Result<TopicFilter, TopicError>,
    pub(crate) name: Option<String>,
    pub(crate) group: Option<String>,
    pub(crate) mode: AckMode,
    pub(crate) mode_set: bool,
    pub(crate) ack_timeout: Option<Duration>,
    pub(crate) max_attempts: Option<u32>,
    pub(crate) prefetch: Option<usize>,
    pub(crate) start: StartPosition,
    pub(crate) batch: usize,
    pub(crate) headers: Vec<HeaderMatch>,
}

impl SubscriptionBuilder {
    /// A name for stats and stale-consumer reports.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Joins (or creates) consumer group `group`: each message goes to one member.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// At-least-once delivery: every delivery must be acknowledged.
    pub fn manual_ack(mut self) -> Self {
        self.mode = AckMode::Manual;
        self.mode_set = true;
        self
    }

    /// Sets the acknowledgement mode.
    pub fn ack_mode(mut self, mode: AckMode) -> Self {
        self.mode = mode;
        self.mode_set = true;
        self
    }

    /// Redeliver a delivery not settled within `timeout` (default from the broker config).
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = Some(timeout);
        self
    }

    /// Dead-letter after this many delivery attempts (default from the broker config).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// The most unsettled deliveries this subscriber may hold (manual-ack mode).
    pub fn prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = Some(prefetch);
        self
    }

    /// Where to start reading.
    pub fn start(mut self, start: StartPosition) -> Self {
        self.start = start;
        self
    }

    /// Delivers only messages whose headers satisfy `condition` (conditions add up: all must
    /// hold). Other messages are skipped and counted as `filtered`.
    pub fn where_header(mut self, condition: HeaderMatch) -> Self {
        self.headers.push(condition);
        self
    }

    /// How many records to take from the topic at a time (default 256).
    pub fn batch_size(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// Creates the subscription.
    pub fn build(self) -> Result<Subscription, SubscribeError> {
        let broker = self.broker.clone();
        broker.inner.subscribe(self, &broker)
    }
}

/// A subscription (or one member of a consumer group). Dropping it unsubscribes.
pub struct Subscription {
    pub(crate) broker: Broker,
    pub(crate) consumer: Arc<Consumer>,
    pub(crate) member: u64,
    pub(crate) batch: usize,
    buf: VecDeque<Delivery>,
    /// Which signal this member is registered with, if any: `Some(false)` the consumer's data
    /// signal, `Some(true)` its acknowledgement signal (when throttled by prefetch).
    registered: Option<bool>,
    sleep: Option<Pin<Box<Sleep>>>,
    /// The buffer may hold records with an expiry (checked again when handed over).
    expiring: bool,
}

impl Subscription {
    pub(crate) fn new(broker: Broker, consumer: Arc<Consumer>, member: u64, batch: usize) -> Self {
        Subscription {
            broker,
            consumer,
            member,
            batch,
            buf: VecDeque::new(),
            registered: None,
            sleep: None,
            expiring: false,
        }
    }

    /// The id of the subscription (or of the group).
    pub fn id(&self) -> u64 {
        self.consumer.id
    }

    /// The next delivery, waiting for one. `Err` once the broker has closed (after everything
    /// queued for this subscription was delivered) or the subscription was evicted.
    pub async fn recv(&mut self) -> Result<Delivery, RecvError> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next delivery if one is available now.
    pub fn try_recv(&mut self) -> Result<Delivery, TryRecvError> {
        loop {
            if let Some(d) = self.pop_buffered() {
                return Ok(d);
            }
            // Everything fetched may have expired in the buffer: fetch until nothing comes.
            let f = self.fetch();
            if f.got == 0 {
                return Err(f.closed.map_or(TryRecvError::Empty, Into::into));
            }
        }
    }

    /// Up to `max` deliveries: waits up to `timeout` for the first, then takes what is
    /// available without waiting. Empty if nothing arrived in time.
    pub async fn recv_batch(
        &mut self,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<Delivery>, RecvError> {
        let mut out = Vec::with_capacity(max.min(1024));
        if max == 0 {
            return Ok(out);
        }
        match tokio::time::timeout(timeout, self.recv()).await {
            Err(_) => return Ok(out),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(d)) => out.push(d),
        }
        while out.len() < max {
            match self.try_recv() {
                Ok(d) => out.push(d),
                Err(_) => break,
            }
        }
        Ok(out)
    }

    /// The next buffered delivery that has not expired meanwhile.
    fn pop_buffered(&mut self) -> Option<Delivery> {
        while let Some(d) = self.buf.pop_front() {
            if !self.expiring || !d.record().expired(tokio::time::Instant::now()) {
                return Some(d);
            }
            match d.detach() {
                (_, Some(token)) => {
                    let _ = token.settle(Settle::Expired);
                }
                (envelope, None) => self
                    .consumer
                    .expire_buffered(envelope.topic(), envelope.record()),
            }
        }
        None
    }

    /// Polls for the next delivery.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Delivery, RecvError>> {
        loop {
            if let Some(d) = self.pop_buffered() {
                return Poll::Ready(Ok(d));
            }
            let f = self.fetch();
            if f.got > 0 {
                self.unregister();
                continue;
            }
            if let Some(e) = f.closed {
                self.unregister();
                return Poll::Ready(Err(e));
            }
            let on_acks = f.throttled;
            if self.registered.is_some_and(|r| r != on_acks) {
                self.unregister();
            }
            let signal = if on_acks {
                &self.consumer.acks
            } else {
                &*self.consumer.signal
            };
            if signal.register(self.member, cx.waker()) {
                // Woken since we registered: still registered (re-armed in place); look again.
                self.registered = Some(on_acks);
                continue;
            }
            if self.registered.is_none() {
                // Newly registered: check once more before sleeping (no lost wake-up).
                self.registered = Some(on_acks);
                continue;
            }
            if let Some(deadline) = f.next_wake {
                let sleep = self
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if sleep.deadline() != deadline {
                    sleep.as_mut().reset(deadline);
                }
                if sleep.as_mut().poll(cx).is_ready() {
                    continue;
                }
            }
            return Poll::Pending;
        }
    }

    /// Refills the (empty) buffer from the consumer.
    fn fetch(&mut self) -> crate::consumer::Fetch {
        let f = self.consumer.fetch(self.member, self.batch, &mut self.buf);
        self.expiring = f.expiring;
        f
    }

    fn unregister(&mut self) {
        match self.registered.take() {
            Some(true) => self.consumer.acks.unregister(self.member),
            Some(false) => self.consumer.signal.unregister(self.member),
            None => {}
        }
    }

    /// Deliveries already taken from the topic and waiting in this handle.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Stats of the subscription (or of the whole group).
    pub fn stats(&self) -> SubscriptionStats {
        self.consumer.stats()
    }

    /// Unsubscribes (the same as dropping it).
    pub fn unsubscribe(self) {}

    /// Turns the subscription into a channel of payloads (seed 001's `Subscribe`). Manual-ack
    /// deliveries are acknowledged once their payload is in the channel. The forwarding task
    /// stops, and the subscription ends, when the receiver is dropped or the broker closes.
    pub fn into_payloads(mut self, capacity: usize) -> tokio::sync::mpsc::Receiver<Bytes> {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tx.closed() => break,
                    d = self.recv() => {
                        let Ok(d) = d else { break };
                        if tx.send(d.payload().clone()).await.is_err() {
                            break;
                        }
                        let _ = d.ack();
                    }
                }
            }
        });
        rx
    }
}

impl Stream for Subscription {
    type Item = Delivery;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.get_mut().poll_recv(cx).map(Result::ok)
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.consumer.id)
            .field("name", &self.consumer.name)
            .field("member", &self.member)
            .finish()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut unreceived = Vec::new();
        for d in self.buf.drain(..) {
            match d.detach() {
                (_, Some(token)) => {
                    let _ = token.settle(Settle::Returned);
                }
                (envelope, None) => unreceived.push(envelope.topic().clone()),
            }
        }
        if !unreceived.is_empty() {
            self.consumer.forget_buffered(&unreceived);
        }
        let remaining = self.consumer.leave(self.member);
        if !self.consumer.group && remaining == 0 {
            self.broker.inner.remove_consumer(self.consumer.id);
        }
    }
}
