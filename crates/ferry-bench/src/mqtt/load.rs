//! The load generator of the throughput scenarios: rumqttc clients (MQTT 3.1.1, one client and
//! one event loop task per connection) on a multi-threaded Tokio runtime.
//!
//! Every payload carries, in its first 21 bytes, the send time (nanoseconds since the run's base
//! `Instant`, plus 1), the publisher's index, its sequence number and the phase (warm-up or
//! measured). Subscribers count measured deliveries per publisher in bitsets, so that loss and
//! duplicates are exact, and record every measured delivery's latency.
//!
//! A run: subscribers connect and subscribe, publishers connect; a warm-up phase publishes for
//! `warmup` and waits until its deliveries stop; the measured phase publishes for `duration`,
//! then waits until every expected delivery arrived (or, when messages were lost, until
//! deliveries stop). Throughput is measured deliveries / (last measured delivery - start of the
//! measured phase). Publishers publish as fast as the client lets them, but keep at most
//! `window` of their messages undelivered (deliveries counted across subscribers), so that a
//! broker without backpressure at QoS 0 cannot queue without bound.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::{oneshot, watch};

use super::brokers::BrokerProcess;
use crate::measure::{join_all, new_histogram, Outcome};

/// Bytes of the header every payload starts with.
const HEADER: usize = 21;
/// Phase byte of warm-up messages.
const WARMUP: u8 = 0;
/// Phase byte of measured messages.
const MEASURED: u8 = 1;
/// How long deliveries may stop before the drain gives up (messages lost).
const STALL: Duration = Duration::from_secs(2);
/// The longest a drain may last.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);
/// A publisher whose window is full and sees no delivery for this long counts its undelivered
/// messages as lost and goes on (QoS 0 may lose messages).
const WINDOW_STALL: Duration = Duration::from_millis(200);

/// The shape of a throughput scenario.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Publishing connections.
    pub publishers: usize,
    /// Subscribing connections.
    pub subscribers: usize,
    /// Deliveries each message makes (the subscriber count for fan-out, else 1).
    pub fanout: usize,
    /// Whether the subscribers share one subscription (`$share/bench/...`).
    pub shared: bool,
    /// Whether each publisher has a topic of its own (the subscriber uses a `+` wildcard).
    pub topic_per_publisher: bool,
    /// Topic prefix.
    pub topic: &'static str,
}

impl Shape {
    fn publish_topic(&self, publisher: usize) -> String {
        if self.topic_per_publisher {
            format!("{}/{publisher}", self.topic)
        } else {
            self.topic.to_string()
        }
    }

    fn filter(&self) -> String {
        let f = if self.topic_per_publisher {
            format!("{}/+", self.topic)
        } else {
            self.topic.to_string()
        };
        if self.shared {
            format!("$share/bench/{f}")
        } else {
            f
        }
    }
}

/// Settings of one throughput run.
#[derive(Debug, Clone, Copy)]
pub struct LoadSpec {
    /// The scenario's shape.
    pub shape: Shape,
    /// QoS of publishes and subscriptions.
    pub qos: QoS,
    /// Payload size in bytes (at least [`HEADER`]).
    pub payload: usize,
    /// Unmeasured warm-up.
    pub warmup: Duration,
    /// Measured publishing time.
    pub duration: Duration,
    /// Most undelivered messages per publisher (0: no limit).
    pub window: u64,
}

/// The result of one throughput run.
#[derive(Debug)]
pub struct LoadResult {
    /// Deliveries, wall time, latency and broker CPU time.
    pub outcome: Outcome,
    /// Messages published in the measured phase.
    pub published: u64,
    /// Deliveries expected in the measured phase.
    pub expected: u64,
    /// Broker RSS at the end of the measured phase, bytes.
    pub rss: u64,
    /// Broker peak RSS (`VmHWM`), bytes.
    pub peak_rss: u64,
    /// Broker RSS once every client was connected, before any message, bytes.
    pub idle_rss: u64,
}

/// The clock and progress counters shared by the clients of a run.
struct Shared {
    base: Instant,
    /// Per publisher: its messages delivered so far (all phases, all subscribers).
    delivered: Vec<AtomicU64>,
    /// Deliveries of warm-up messages.
    warm: AtomicU64,
    /// Deliveries of measured messages.
    measured: AtomicU64,
    /// Nanoseconds since `base` of the latest measured delivery.
    last_ns: AtomicU64,
}

impl Shared {
    fn nanos(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Sequence numbers seen, per publisher: a growable bitset.
#[derive(Debug, Default, Clone)]
struct Bits {
    words: Vec<u64>,
    ones: u64,
}

impl Bits {
    /// Sets `seq`; false if it was set already.
    fn set(&mut self, seq: u64) -> bool {
        let i = usize::try_from(seq / 64).unwrap_or(usize::MAX);
        if i >= self.words.len() {
            self.words.resize(i + 1, 0);
        }
        let bit = 1u64 << (seq % 64);
        match self.words.get_mut(i) {
            Some(w) if *w & bit == 0 => {
                *w |= bit;
                self.ones += 1;
                true
            }
            _ => false,
        }
    }

    fn union(&mut self, other: &Bits) {
        if other.words.len() > self.words.len() {
            self.words.resize(other.words.len(), 0);
        }
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
        self.ones = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
    }
}

/// What one subscriber saw of the measured phase.
struct SubTally {
    delivered: u64,
    seen: Vec<Bits>,
    hist: Histogram<u64>,
}

fn options(id: &str, broker: &BrokerProcess) -> MqttOptions {
    let mut o = MqttOptions::new(id, broker.addr.ip().to_string(), broker.addr.port());
    o.set_keep_alive(Duration::from_secs(60));
    o.set_clean_session(true);
    o.set_max_packet_size(1 << 20, 1 << 20);
    o.set_inflight(100);
    o
}

/// Polls a subscriber's event loop: signals `ready` at its SUBACK, then counts deliveries
/// until `stop`.
async fn subscriber(
    mut el: EventLoop,
    shared: Arc<Shared>,
    ready: oneshot::Sender<()>,
    mut stop: watch::Receiver<bool>,
) -> Result<SubTally> {
    let publishers = shared.delivered.len();
    let mut tally = SubTally {
        delivered: 0,
        seen: vec![Bits::default(); publishers],
        hist: new_histogram()?,
    };
    let mut ready = Some(ready);
    loop {
        let event = tokio::select! {
            biased;
            _ = stop.changed() => return Ok(tally),
            e = el.poll() => e.context("subscriber connection failed")?,
        };
        let p = match event {
            Event::Incoming(Packet::Publish(p)) => p,
            Event::Incoming(Packet::SubAck(_)) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
                continue;
            }
            _ => continue,
        };
        let h = p.payload.get(..HEADER).context("payload too short")?;
        let stamp = u64::from_le_bytes(h[0..8].try_into()?);
        let publisher = u32::from_le_bytes(h[8..12].try_into()?) as usize;
        let seq = u64::from_le_bytes(h[12..20].try_into()?);
        let now = shared.nanos();
        if let Some(d) = shared.delivered.get(publisher) {
            d.fetch_add(1, Ordering::Relaxed);
        }
        if h[20] == MEASURED {
            tally.delivered += 1;
            if let Some(bits) = tally.seen.get_mut(publisher) {
                bits.set(seq);
            }
            tally
                .hist
                .saturating_record(now.saturating_sub(stamp.saturating_sub(1)).max(1));
            shared.measured.fetch_add(1, Ordering::Relaxed);
            shared.last_ns.fetch_max(now, Ordering::Relaxed);
        } else {
            shared.warm.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Polls a publisher's event loop (acknowledgements, keep-alive) until `stop`; signals `ready`
/// at its CONNACK.
async fn publisher_loop(
    mut el: EventLoop,
    ready: oneshot::Sender<()>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut ready = Some(ready);
    loop {
        let event = tokio::select! {
            biased;
            _ = stop.changed() => return Ok(()),
            e = el.poll() => e.context("publisher connection failed")?,
        };
        if let Event::Incoming(Packet::ConnAck(_)) = event {
            if let Some(r) = ready.take() {
                let _ = r.send(());
            }
        }
    }
}

/// Where a publisher is: messages sent so far (all phases) and how many of them it gave up on.
struct PubState {
    id: usize,
    client: AsyncClient,
    topic: String,
    sent: u64,
    written_off: u64,
    seq: u64,
}

/// Publishes `phase` messages until `until`; returns how many.
async fn publish_phase(
    mut p: PubState,
    spec: LoadSpec,
    shared: Arc<Shared>,
    template: Arc<[u8]>,
    phase: u8,
    until: Instant,
) -> Result<(PubState, u64)> {
    let fanout = spec.shape.fanout as u64;
    let limit = spec.window.saturating_mul(fanout);
    let mut count = 0;
    let mut stalled: Option<(u64, Instant)> = None;
    while Instant::now() < until {
        if limit > 0 {
            let delivered = shared.delivered[p.id].load(Ordering::Relaxed);
            let outstanding = (p.sent * fanout).saturating_sub(delivered + p.written_off);
            if outstanding >= limit {
                let now = Instant::now();
                match stalled {
                    Some((d, since)) if d == delivered => {
                        if now.duration_since(since) >= WINDOW_STALL {
                            p.written_off += outstanding;
                            stalled = None;
                        }
                    }
                    _ => stalled = Some((delivered, now)),
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
            stalled = None;
        }
        let mut v = template.to_vec();
        let stamp = shared.nanos().saturating_add(1);
        v[0..8].copy_from_slice(&stamp.to_le_bytes());
        v[8..12].copy_from_slice(&u32::try_from(p.id)?.to_le_bytes());
        v[12..20].copy_from_slice(&p.seq.to_le_bytes());
        v[20] = phase;
        p.client
            .publish_bytes(p.topic.clone(), spec.qos, false, Bytes::from(v))
            .await
            .map_err(|e| anyhow!("publishing: {e}"))?;
        p.seq += 1;
        p.sent += 1;
        count += 1;
    }
    Ok((p, count))
}

/// Runs every publisher through one phase; returns the messages each published.
async fn phase(
    pubs: Vec<PubState>,
    spec: LoadSpec,
    shared: &Arc<Shared>,
    template: &Arc<[u8]>,
    phase_byte: u8,
    until: Instant,
) -> Result<(Vec<PubState>, Vec<u64>)> {
    let handles = pubs
        .into_iter()
        .map(|p| {
            tokio::spawn(publish_phase(
                p,
                spec,
                shared.clone(),
                template.clone(),
                phase_byte,
                until,
            ))
        })
        .collect();
    let done = join_all(handles).await?;
    Ok(done.into_iter().unzip())
}

/// Waits until `counter` reaches `expected`, or stops moving for `stall`, or `limit` passed.
async fn drain(counter: &AtomicU64, expected: u64, stall: Duration, limit: Duration) {
    let start = Instant::now();
    let mut last = (counter.load(Ordering::Relaxed), Instant::now());
    loop {
        let n = counter.load(Ordering::Relaxed);
        if n >= expected || start.elapsed() >= limit {
            return;
        }
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() >= stall {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One throughput run against `broker`.
pub async fn run(broker: &BrokerProcess, spec: LoadSpec) -> Result<LoadResult> {
    let shape = spec.shape;
    let shared = Arc::new(Shared {
        base: Instant::now(),
        delivered: (0..shape.publishers).map(|_| AtomicU64::new(0)).collect(),
        warm: AtomicU64::new(0),
        measured: AtomicU64::new(0),
        last_ns: AtomicU64::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let tag = fastrand_tag();

    // Subscribers first, each waiting for its SUBACK.
    let mut subs = Vec::with_capacity(shape.subscribers);
    let mut sub_clients = Vec::with_capacity(shape.subscribers);
    for i in 0..shape.subscribers {
        let (client, el) = AsyncClient::new(options(&format!("sub-{tag}-{i}"), broker), 64);
        let (ready_tx, ready_rx) = oneshot::channel();
        subs.push(tokio::spawn(subscriber(
            el,
            shared.clone(),
            ready_tx,
            stop_rx.clone(),
        )));
        client
            .subscribe(shape.filter(), spec.qos)
            .await
            .map_err(|e| anyhow!("subscribing: {e}"))?;
        sub_clients.push((client, ready_rx));
    }
    for (_, ready) in &mut sub_clients {
        tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .context("a subscriber got no SUBACK within 10 s")?
            .context("a subscriber failed before its SUBACK")?;
    }
    let mut pubs = Vec::with_capacity(shape.publishers);
    let mut pub_loops = Vec::with_capacity(shape.publishers);
    for i in 0..shape.publishers {
        let (client, el) = AsyncClient::new(options(&format!("pub-{tag}-{i}"), broker), 1024);
        let (ready_tx, ready_rx) = oneshot::channel();
        pub_loops.push(tokio::spawn(publisher_loop(el, ready_tx, stop_rx.clone())));
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .context("a publisher got no CONNACK within 10 s")?
            .context("a publisher failed before its CONNACK")?;
        pubs.push(PubState {
            id: i,
            client,
            topic: shape.publish_topic(i),
            sent: 0,
            written_off: 0,
            seq: 0,
        });
    }
    let idle_rss = broker.rss()?;
    let mut template = vec![0u8; spec.payload.max(HEADER)];
    for (i, b) in template.iter_mut().enumerate().skip(HEADER) {
        *b = b'a' + (i % 26) as u8;
    }
    let template: Arc<[u8]> = template.into();
    let fanout = shape.fanout as u64;

    // Warm-up, then let its deliveries finish.
    let mut warm_sent = 0;
    if !spec.warmup.is_zero() {
        let until = Instant::now() + spec.warmup;
        let (p, counts) = phase(pubs, spec, &shared, &template, WARMUP, until).await?;
        pubs = p;
        warm_sent = counts.iter().sum::<u64>();
        drain(
            &shared.warm,
            warm_sent * fanout,
            Duration::from_millis(500),
            DRAIN_LIMIT,
        )
        .await;
    }
    // A publisher's window counts all its messages: forget warm-up messages that never came.
    for p in &mut pubs {
        p.written_off =
            (p.sent * fanout).saturating_sub(shared.delivered[p.id].load(Ordering::Relaxed));
        p.seq = 0;
    }
    let _ = warm_sent;

    // The measured phase.
    let cpu_before = broker.cpu_time();
    let start_ns = shared.nanos();
    let until = shared.base + Duration::from_nanos(start_ns) + spec.duration;
    let (_pubs, counts) = phase(pubs, spec, &shared, &template, MEASURED, until).await?;
    let published: u64 = counts.iter().sum();
    let expected = published * fanout;
    drain(&shared.measured, expected, STALL, DRAIN_LIMIT).await;
    let cpu_after = broker.cpu_time();
    let rss = broker.rss()?;
    let peak_rss = broker.peak_rss()?;

    let _ = stop_tx.send(true);
    let tallies = join_all(subs).await?;
    join_all(pub_loops).await?;
    drop(sub_clients);

    let mut hist = new_histogram()?;
    let mut delivered = 0;
    let mut distinct = 0;
    let mut union: Vec<Bits> = vec![Bits::default(); shape.publishers];
    for t in &tallies {
        delivered += t.delivered;
        hist.add(&t.hist)
            .map_err(|e| anyhow!("merging latency histograms: {e:?}"))?;
        for (u, bits) in union.iter_mut().zip(&t.seen) {
            if shape.shared {
                u.union(bits);
            } else {
                distinct += bits.ones;
            }
        }
    }
    if shape.shared {
        distinct = union.iter().map(|b| b.ones).sum();
    }
    if distinct > expected {
        bail!("{distinct} distinct deliveries but only {expected} expected");
    }
    let last_ns = shared.last_ns.load(Ordering::Relaxed);
    let mut outcome = Outcome::without_latency(
        delivered,
        Some(delivered - distinct),
        Duration::from_nanos(last_ns.saturating_sub(start_ns)),
    )?;
    outcome.latency = hist;
    outcome.cpu = cpu_before.zip(cpu_after).map(|(b, a)| a.saturating_sub(b));
    Ok(LoadResult {
        outcome,
        published,
        expected,
        rss,
        peak_rss,
        idle_rss,
    })
}

/// A short tag that keeps client ids of successive runs apart.
fn fastrand_tag() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::mqtt::brokers::{Binaries, Kind};

    #[test]
    fn bits_count_distinct_and_union() {
        let mut a = Bits::default();
        assert!(a.set(0));
        assert!(a.set(130));
        assert!(!a.set(130));
        let mut b = Bits::default();
        b.set(130);
        b.set(7);
        a.union(&b);
        assert_eq!(a.ones, 3);
    }

    #[test]
    fn shapes_name_their_topics() {
        let s = Shape {
            publishers: 2,
            subscribers: 2,
            fanout: 1,
            shared: true,
            topic_per_publisher: true,
            topic: "t",
        };
        assert_eq!(s.publish_topic(1), "t/1");
        assert_eq!(s.filter(), "$share/bench/t/+");
    }

    /// A tiny run of every shape against the system's Mosquitto binary, if there is one:
    /// every QoS 1 message arrives exactly once.
    #[test]
    fn tiny_runs_against_mosquitto_count_every_delivery() {
        let path = std::path::Path::new("/usr/sbin/mosquitto");
        if !path.is_file() {
            eprintln!("skipped: no /usr/sbin/mosquitto");
            return;
        }
        let bins = Binaries::find(None, path, &[Kind::Mosquitto]).unwrap();
        for shape in [
            Shape {
                publishers: 2,
                subscribers: 1,
                fanout: 1,
                shared: false,
                topic_per_publisher: true,
                topic: "t/in",
            },
            Shape {
                publishers: 1,
                subscribers: 3,
                fanout: 3,
                shared: false,
                topic_per_publisher: false,
                topic: "t/out",
            },
            Shape {
                publishers: 2,
                subscribers: 2,
                fanout: 1,
                shared: true,
                topic_per_publisher: false,
                topic: "t/shared",
            },
        ] {
            let broker = BrokerProcess::start(Kind::Mosquitto, &bins, 100).unwrap();
            let spec = LoadSpec {
                shape,
                qos: QoS::AtLeastOnce,
                payload: 100,
                warmup: Duration::from_millis(50),
                duration: Duration::from_millis(200),
                window: 50,
            };
            let r = tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(run(&broker, spec))
                .unwrap();
            assert!(r.published > 0);
            assert_eq!(r.expected, r.published * shape.fanout as u64);
            assert_eq!(r.outcome.delivered, r.expected, "{shape:?}");
            assert_eq!(r.outcome.duplicates, Some(0));
            assert_eq!(r.outcome.latency.len(), r.expected);
        }
    }
}
