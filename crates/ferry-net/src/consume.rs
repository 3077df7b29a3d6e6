//! REST consumption for consumer groups: fetch a batch, then ack, nack (with a delay) or reject
//! each message by its receipt.
//!
//! A group `g` on topic `t` is the engine consumer group `mqtt/share/g/t`: the same group as MQTT
//! `$share/g/t`, so HTTP workers and MQTT shared subscribers split one stream. Each server has one
//! member per (group, topic) that its HTTP clients fetch through; fetched deliveries are held by
//! the server under a receipt until settled. A delivery not settled within the member's ack
//! timeout goes back to the group (its receipt is then unknown) and comes again with a higher
//! attempt count; after `max_attempts` it is dead-lettered. A member nobody fetched through for
//! [`IDLE_MEMBER`] leaves the group.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::{
    AckError, Broker, Delivery, Envelope, RecvError, SubscribeError, Subscription, TopicFilter,
};
use parking_lot::Mutex;

use crate::bridge::Bridge;

/// How long a member with no fetches stays in its group.
pub const IDLE_MEMBER: Duration = Duration::from_secs(120);
/// The most messages one fetch returns.
pub const MAX_FETCH: usize = 1000;
/// The longest a fetch waits for its first message.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// Errors of REST consumption.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    /// The group or topic cannot be subscribed to.
    #[error(transparent)]
    Subscribe(#[from] SubscribeError),
    /// The broker is closing.
    #[error("the broker is closed")]
    Closed,
    /// A request parameter is out of range.
    #[error("{0}")]
    Invalid(String),
}

/// Options of a fetch.
#[derive(Debug, Clone, Copy)]
pub struct FetchOptions {
    /// At most this many messages.
    pub max: usize,
    /// Wait up to this long for the first one.
    pub wait: Duration,
    /// The ack timeout of this server's member (applies when the member is made).
    pub ack_timeout: Duration,
    /// Attempts before dead-lettering (applies when the member is made).
    pub max_attempts: u32,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            max: 10,
            wait: Duration::ZERO,
            ack_timeout: Duration::from_secs(30),
            max_attempts: 3,
        }
    }
}

/// A fetched message with the receipt that settles it.
pub struct Fetched {
    /// Settles this delivery.
    pub receipt: String,
    /// The message, its topic, offset and attempt.
    pub envelope: Envelope,
}

/// How a receipt is settled.
#[derive(Debug, Clone)]
pub enum Settle {
    /// Done.
    Ack,
    /// Deliver again, now or after a delay.
    Nack(Option<Duration>),
    /// Dead-letter with a reason.
    Reject(String),
}

/// The outcome of settling several receipts.
#[derive(Debug, Default, serde::Serialize)]
pub struct Settled {
    /// How many were settled.
    pub settled: usize,
    /// Receipts that are unknown or no longer in flight (ack timeout passed, already settled).
    pub unknown: Vec<String>,
}

struct Member {
    sub: tokio::sync::Mutex<Subscription>,
    last_used: Mutex<Instant>,
}

struct Held {
    delivery: Delivery,
    expires: Instant,
}

/// The server's REST consumers.
pub struct HttpConsumers {
    broker: Broker,
    bridge: Option<Arc<Bridge>>,
    members: Mutex<HashMap<(String, String), Arc<Member>>>,
    held: Mutex<HashMap<u64, Held>>,
    next: AtomicU64,
    /// Makes receipts of different server runs differ.
    epoch: u32,
}

impl HttpConsumers {
    /// Consumers over `broker` (through `bridge` when serving over a backend).
    pub fn new(broker: Broker, bridge: Option<Arc<Bridge>>) -> Self {
        HttpConsumers {
            broker,
            bridge,
            members: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            epoch: fastrand::u32(..),
        }
    }

    /// The member of `group` on `topic`, and whether it was made now.
    fn member(
        &self,
        group: &str,
        topic: &str,
        o: &FetchOptions,
    ) -> Result<(Arc<Member>, bool), ConsumeError> {
        let key = (group.to_string(), topic.to_string());
        if let Some(m) = self.members.lock().get(&key) {
            return Ok((m.clone(), false));
        }
        if group.is_empty() || group.contains(['/', '+', '#']) {
            return Err(ConsumeError::Invalid(format!(
                "group name {group:?} must be non-empty without '/', '+' or '#'"
            )));
        }
        let filter = TopicFilter::exact(topic).map_err(SubscribeError::from)?;
        let local_group = crate::mqtt::session::share_group(group, topic);
        let mut b = self
            .broker
            .subscription_to(&filter)
            .group(local_group.clone())
            .manual_ack()
            .ack_timeout(o.ack_timeout)
            .max_attempts(o.max_attempts)
            .prefetch(MAX_FETCH)
            // One record at a time from the group: a fetch takes exactly what it answers, so
            // nothing waits in the subscription's buffer with its ack timer running (it would
            // time out there and come again beside its stale copy).
            .batch_size(1);
        if let Some(bridge) = &self.bridge {
            b = b.where_header(bridge.share_condition(group, topic, &local_group));
        }
        let member = Arc::new(Member {
            sub: tokio::sync::Mutex::new(b.build()?),
            last_used: Mutex::new(Instant::now()),
        });
        Ok((
            self.members.lock().entry(key).or_insert(member).clone(),
            true,
        ))
    }

    /// Drops expired holds and idle members.
    fn prune(&self) {
        let now = Instant::now();
        self.held.lock().retain(|_, h| h.expires > now);
        self.members
            .lock()
            .retain(|_, m| now.duration_since(*m.last_used.lock()) < IDLE_MEMBER);
    }

    /// Up to `o.max` messages of `topic` for `group`, waiting up to `o.wait` for the first.
    pub async fn fetch(
        &self,
        group: &str,
        topic: &str,
        o: FetchOptions,
    ) -> Result<Vec<Fetched>, ConsumeError> {
        if o.max == 0 || o.max > MAX_FETCH {
            return Err(ConsumeError::Invalid(format!(
                "max must be 1..={MAX_FETCH}"
            )));
        }
        if o.wait > MAX_WAIT {
            return Err(ConsumeError::Invalid(format!(
                "wait must be at most {} ms",
                MAX_WAIT.as_millis()
            )));
        }
        if o.ack_timeout < Duration::from_millis(100) || o.max_attempts == 0 {
            return Err(ConsumeError::Invalid(
                "ack_timeout must be at least 100 ms and max_attempts at least 1".into(),
            ));
        }
        self.prune();
        let (member, made) = self.member(group, topic, &o)?;
        if made && self.broker.is_durable() {
            // The group's start position is on disk before it delivers anything, so that
            // what is published from now on reaches it even across a crash (saved on the
            // broker's I/O threads).
            if let Err(e) = self.broker.flush_async().await {
                tracing::error!(error = %e, "saving consumer positions failed");
            }
        }
        *member.last_used.lock() = Instant::now();
        let batch = {
            let mut sub = member.sub.lock().await;
            match sub.recv_batch(o.max, o.wait).await {
                Ok(b) => b,
                Err(RecvError::Closed) => return Err(ConsumeError::Closed),
                Err(e) => return Err(ConsumeError::Invalid(e.to_string())),
            }
        };
        *member.last_used.lock() = Instant::now();
        let expires = Instant::now() + o.ack_timeout;
        let mut held = self.held.lock();
        Ok(batch
            .into_iter()
            .map(|delivery| {
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                let envelope = delivery.envelope().clone();
                held.insert(n, Held { delivery, expires });
                Fetched {
                    receipt: format!("{:08x}-{n}", self.epoch),
                    envelope,
                }
            })
            .collect())
    }

    /// Settles receipts of messages of `topic`; others are `unknown`.
    pub fn settle(&self, topic: &str, receipts: &[String], how: &Settle) -> Settled {
        let mut out = Settled::default();
        for r in receipts {
            let held = self.parse(r).and_then(|n| {
                let mut held = self.held.lock();
                match held.get(&n) {
                    Some(h) if h.delivery.topic().as_str() == topic => held.remove(&n),
                    _ => None,
                }
            });
            let Some(h) = held else {
                out.unknown.push(r.clone());
                continue;
            };
            let result: Result<(), AckError> = match how {
                Settle::Ack => h.delivery.ack(),
                Settle::Nack(None) => h.delivery.nack(),
                Settle::Nack(Some(d)) => h.delivery.nack_after(*d),
                Settle::Reject(reason) => h.delivery.reject(reason.clone()),
            };
            match result {
                Ok(()) => out.settled += 1,
                Err(_) => out.unknown.push(r.clone()),
            }
        }
        out
    }

    fn parse(&self, receipt: &str) -> Option<u64> {
        let (epoch, n) = receipt.split_once('-')?;
        (u32::from_str_radix(epoch, 16).ok()? == self.epoch).then_some(())?;
        n.parse().ok()
    }
}
