//! The workload every system runs: 4 producers publishing 1 KiB messages (each waiting for the
//! broker's confirmation before the next) to one topic, a group of 4 subscribers acknowledging
//! each delivery, for a fixed time; then a drain until every confirmed message was delivered.
//!
//! A payload carries its send time (nanoseconds since the run's base `Instant`, + 1) in bytes
//! 0..8 and a unique id (`producer << 48 | seq`) in bytes 8..16, both little endian; the rest
//! is a fixed template. Every delivery is timed (publish -> receipt, before the ack) and its id
//! recorded, so that the run counts unique deliveries (lost = confirmed - unique) and
//! duplicates (at-least-once).

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use tokio::sync::Semaphore;

use crate::measure::new_histogram;

/// Producers and subscribers of every run.
pub const PRODUCERS: usize = 4;
/// Members of the consumer group.
pub const CONSUMERS: usize = 4;
/// How long a subscriber waits for a delivery before it checks whether the run is over.
pub const POLL: Duration = Duration::from_millis(100);

/// A system under test: publishes to the run's topic and makes members of its group.
pub trait Target: Send + Sync + 'static {
    /// A member of the group.
    type Sub: Subscriber;
    /// Publishes one message; returns once the broker confirmed it.
    fn publish(&self, payload: Bytes) -> impl Future<Output = Result<()>> + Send;
    /// Joins the group.
    fn subscribe(&self) -> impl Future<Output = Result<Self::Sub>> + Send;
    /// Deletes what the run left on the broker (best effort).
    fn cleanup(&self) -> impl Future<Output = ()> + Send;
}

/// A member of the group.
pub trait Subscriber: Send + 'static {
    /// A delivery to acknowledge.
    type Delivery: Received;
    /// The next delivery, or `None` if none came within about [`POLL`].
    fn recv(&mut self) -> impl Future<Output = Result<Option<Self::Delivery>>> + Send;
}

/// A delivery.
pub trait Received: Send {
    /// Its payload.
    fn payload(&self) -> &[u8];
    /// Acknowledges it.
    fn ack(self) -> impl Future<Output = Result<()>> + Send;
}

/// How a run goes.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Payload size (at least 16).
    pub payload: usize,
    /// How long the producers publish.
    pub duration: Duration,
    /// Most messages confirmed but not yet delivered (the producers wait beyond).
    pub window: usize,
    /// How long the subscribers may take, once publishing is over, to receive the rest.
    pub drain: Duration,
}

/// What a run measured.
#[derive(Debug)]
pub struct Measured {
    /// Messages the broker confirmed.
    pub published: u64,
    /// Deliveries, duplicates included.
    pub delivered: u64,
    /// Distinct ids delivered.
    pub unique: u64,
    /// First publish to last delivery.
    pub wall: Duration,
    /// Publish -> receipt latency, nanoseconds.
    pub latency: Histogram<u64>,
    /// Process CPU time during the run (where known).
    pub cpu: Option<Duration>,
}

struct Shared {
    base: Instant,
    seen: Mutex<HashSet<u64>>,
    unique: AtomicU64,
    published: AtomicU64,
    publishing_done: AtomicBool,
    window: Semaphore,
    template: Vec<u8>,
}

impl Shared {
    fn payload(&self, id: u64) -> Bytes {
        let sent = u64::try_from(self.base.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let mut v = Vec::with_capacity(self.template.len());
        v.extend_from_slice(&sent.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
        v.extend_from_slice(self.template.get(16..).unwrap_or_default());
        Bytes::from(v)
    }

    fn complete(&self) -> bool {
        self.publishing_done.load(Ordering::Acquire)
            && self.unique.load(Ordering::Acquire) >= self.published.load(Ordering::Acquire)
    }
}

struct ConsumerTally {
    delivered: u64,
    last: Option<Instant>,
    hist: Histogram<u64>,
}

/// Runs the workload on `target` (its subscribers join before the first publish).
pub async fn run<T: Target>(target: Arc<T>, plan: Plan) -> Result<Measured> {
    let mut template = vec![0u8; plan.payload.max(16)];
    for (i, b) in template.iter_mut().enumerate().skip(16) {
        *b = (i % 251) as u8;
    }
    let shared = Arc::new(Shared {
        base: Instant::now(),
        seen: Mutex::new(HashSet::new()),
        unique: AtomicU64::new(0),
        published: AtomicU64::new(0),
        publishing_done: AtomicBool::new(false),
        window: Semaphore::new(plan.window.max(PRODUCERS)),
        template,
    });
    let mut subs = Vec::with_capacity(CONSUMERS);
    for _ in 0..CONSUMERS {
        subs.push(target.subscribe().await.context("subscribing")?);
    }
    let cpu_before = crate::measure::process_cpu_time();
    let mut consumers = Vec::with_capacity(CONSUMERS);
    for sub in subs {
        let shared = shared.clone();
        consumers.push(tokio::spawn(consume(sub, shared)));
    }
    let start = Instant::now();
    let end = start + plan.duration;
    let mut producers = Vec::with_capacity(PRODUCERS);
    for p in 0..PRODUCERS {
        let shared = shared.clone();
        let target = target.clone();
        producers.push(tokio::spawn(async move {
            let mut seq = 0u64;
            let first = Instant::now();
            let mut outcome = Ok(());
            while Instant::now() < end {
                match shared.window.acquire().await {
                    Ok(permit) => permit.forget(),
                    Err(_) => break,
                }
                let id = ((p as u64) << 48) | seq;
                if let Err(e) = target.publish(shared.payload(id)).await {
                    outcome = Err(e);
                    break;
                }
                seq += 1;
                shared.published.fetch_add(1, Ordering::AcqRel);
            }
            (first, outcome)
        }));
    }
    let mut first = None::<Instant>;
    let mut failure = None;
    for h in producers {
        let (f, outcome) = h.await.context("a producer panicked")?;
        first = Some(first.map_or(f, |x| x.min(f)));
        if let Err(e) = outcome {
            failure.get_or_insert(e);
        }
    }
    let publishing_end = Instant::now();
    shared.publishing_done.store(true, Ordering::Release);
    let drain_deadline = publishing_end + plan.drain;
    let mut tallies = Vec::with_capacity(CONSUMERS);
    for h in consumers {
        let stop = tokio::time::sleep_until(drain_deadline.into());
        let joined = tokio::select! {
            r = h => Some(r),
            () = stop => None,
        };
        match joined {
            Some(r) => tallies.push(r.context("a subscriber panicked")??),
            None => {
                // The drain ran out: report what arrived (the rest counts as lost).
                eprintln!("  drain timed out after {:?}", plan.drain);
                break;
            }
        }
    }
    let cpu = cpu_before
        .zip(crate::measure::process_cpu_time())
        .map(|(b, a)| a.saturating_sub(b));
    if let Some(e) = failure {
        return Err(e.context("publishing failed"));
    }
    let first = first.ok_or_else(|| anyhow!("no producer ran"))?;
    let mut latency = new_histogram()?;
    let mut delivered = 0;
    let mut last = publishing_end;
    for t in &tallies {
        delivered += t.delivered;
        if let Some(l) = t.last {
            last = last.max(l);
        }
        latency
            .add(&t.hist)
            .map_err(|e| anyhow!("merging histograms: {e:?}"))?;
    }
    let published = shared.published.load(Ordering::Acquire);
    let unique = shared.unique.load(Ordering::Acquire);
    Ok(Measured {
        published,
        delivered,
        unique,
        wall: last.saturating_duration_since(first),
        latency,
        cpu,
    })
}

async fn consume<S: Subscriber>(mut sub: S, shared: Arc<Shared>) -> Result<ConsumerTally> {
    let mut tally = ConsumerTally {
        delivered: 0,
        last: None,
        hist: new_histogram()?,
    };
    loop {
        if shared.complete() {
            return Ok(tally);
        }
        let Some(d) = sub.recv().await? else { continue };
        let now = Instant::now();
        let payload = d.payload();
        let word = |at: usize| {
            payload
                .get(at..at + 8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_le_bytes)
        };
        if let (Some(stamp), Some(id)) = (word(0), word(8)) {
            let sent = stamp.saturating_sub(1);
            let at = u64::try_from(now.saturating_duration_since(shared.base).as_nanos())
                .unwrap_or(u64::MAX);
            tally.hist.saturating_record(at.saturating_sub(sent).max(1));
            let fresh = shared
                .seen
                .lock()
                .map_err(|_| anyhow!("poisoned id set"))?
                .insert(id);
            if fresh {
                shared.unique.fetch_add(1, Ordering::AcqRel);
                shared.window.add_permits(1);
            }
        }
        tally.delivered += 1;
        tally.last = Some(now);
        d.ack().await?;
    }
}
