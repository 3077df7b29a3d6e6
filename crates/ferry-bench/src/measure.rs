//! Measurement shared by every benchmark: payloads that carry a send timestamp, per-consumer
//! tallies (deliveries, latency histogram, time of the last delivery), closed-loop tallies of
//! timed operations ([`OpTally`]) and their combination into one [`Outcome`] per run; medians,
//! CPU time and the Tokio runtime every async run uses.
//!
//! Timing model:
//! - a run starts at the first publish (the earliest `Instant` a producer took just before its
//!   first send) and ends at the last delivery;
//! - reading the clock on every delivery would cost as much as a cheap channel hop, so consumers
//!   only read it for stamped messages (latency samples) and, once every producer has finished
//!   (the *tail* of the run), after each delivery, to find the last one. A consumer that received
//!   its last message before the tail began is covered by the producers' finish time, which every
//!   remaining delivery follows;
//! - latency is publish -> delivery under full load (producers publish as fast as they can), so it
//!   includes the time a message waits in a full queue. It is sampled: one message in
//!   `sample_every` per producer carries the nanoseconds since the run's base `Instant` (+1, so
//!   that 0 means "not stamped") in its first 8 bytes (little endian).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;

/// The largest latency the histograms track (larger samples are clamped), in nanoseconds.
const MAX_LATENCY_NS: u64 = 120_000_000_000;

/// The least CPU time worth turning into a per-delivery figure (10 ticks: within 10%).
pub const MIN_CPU: Duration = Duration::from_millis(100);

/// The clock and progress shared by the producers and consumers of one run.
#[derive(Debug)]
pub struct RunClock {
    base: Instant,
    producers_left: AtomicUsize,
    tail: AtomicBool,
}

impl RunClock {
    /// A clock for a run with `producers` producers.
    pub fn new(producers: usize) -> Arc<Self> {
        Arc::new(RunClock {
            base: Instant::now(),
            producers_left: AtomicUsize::new(producers),
            tail: AtomicBool::new(producers == 0),
        })
    }

    /// Nanoseconds from the base to `at`.
    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether every producer has finished.
    #[inline]
    fn in_tail(&self) -> bool {
        self.tail.load(Ordering::Relaxed)
    }

    /// A producer has sent its last message: returns its finish time.
    pub fn producer_done(&self) -> Instant {
        if self.producers_left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.tail.store(true, Ordering::Release);
        }
        Instant::now()
    }
}

/// A static payload template of `len` bytes (at least 8) whose first 8 bytes are zero (no stamp).
///
/// Leaked on purpose, once per payload size and process: cloning a `Bytes` made from a static
/// slice costs no reference counting, so the unstamped messages of every system cost the same
/// and as little as possible, and the comparison measures the brokers and channels.
pub fn template(len: usize) -> &'static [u8] {
    let len = len.max(8);
    let mut v = vec![0u8; len];
    for (i, b) in v.iter_mut().enumerate().skip(8) {
        *b = (i % 251) as u8;
    }
    Box::leak(v.into_boxed_slice())
}

/// Makes the payloads of one producer: a cheap clone of the template, or, for one message in
/// `every`, a fresh copy of it stamped with the send time.
#[derive(Debug)]
pub struct PayloadSource {
    template: &'static [u8],
    every: u64,
    n: u64,
    clock: Arc<RunClock>,
}

impl PayloadSource {
    /// A source over `template`, stamping one message in `every` (at least 1).
    pub fn new(template: &'static [u8], every: u64, clock: Arc<RunClock>) -> Self {
        PayloadSource {
            template,
            every: every.max(1),
            n: 0,
            clock,
        }
    }

    /// The next payload.
    #[inline]
    pub fn next_payload(&mut self) -> Bytes {
        let stamp = self.n % self.every == 0;
        self.n += 1;
        if !stamp {
            return Bytes::from_static(self.template);
        }
        let sent = self.clock.nanos(Instant::now()).saturating_add(1);
        let mut v = Vec::with_capacity(self.template.len());
        v.extend_from_slice(&sent.to_le_bytes());
        v.extend_from_slice(self.template.get(8..).unwrap_or_default());
        Bytes::from(v)
    }
}

/// What one producer saw.
#[derive(Debug, Clone, Copy)]
pub struct ProducerTally {
    /// Just before its first publish.
    pub first: Instant,
    /// Just after its last publish.
    pub finish: Instant,
}

/// What one consumer saw.
#[derive(Debug)]
pub struct ConsumerTally {
    clock: Arc<RunClock>,
    /// Messages delivered to it.
    pub delivered: u64,
    /// Messages the system reported as lost to it (for example `Lagged`).
    pub lost: u64,
    last: Option<Instant>,
    hist: Histogram<u64>,
    once: Option<ExactlyOnce>,
}

impl ConsumerTally {
    /// An empty tally.
    pub fn new(clock: Arc<RunClock>) -> Result<Self> {
        Ok(ConsumerTally {
            clock,
            delivered: 0,
            lost: 0,
            last: None,
            hist: new_histogram()?,
            once: None,
        })
    }

    /// Also checks, through [`observe_seq`](Self::observe_seq), that this consumer sees each of
    /// the sequence numbers `0..n` exactly once.
    pub fn exactly_once(mut self, n: u64) -> Self {
        self.once = Some(ExactlyOnce::new(n));
        self
    }

    /// Records the sequence number (for Ferry, the offset) of the delivery just observed, if
    /// this tally checks for exactly-once delivery.
    #[inline]
    pub fn observe_seq(&mut self, seq: u64) {
        if let Some(once) = &mut self.once {
            once.observe(seq);
        }
    }

    /// Counts one delivery of `payload` (and records its latency if it is stamped).
    #[inline]
    pub fn observe(&mut self, payload: &[u8]) {
        self.delivered += 1;
        let stamp = payload
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map_or(0, u64::from_le_bytes);
        let tail = self.clock.in_tail();
        if stamp == 0 && !tail {
            return;
        }
        let now = Instant::now();
        if stamp != 0 {
            let latency = self.clock.nanos(now).saturating_sub(stamp - 1);
            self.hist.saturating_record(latency.max(1));
        }
        if tail {
            self.last = Some(now);
        }
    }
}

/// Checks that each of the sequence numbers `0..n` is seen exactly once (a bit per number).
#[derive(Debug)]
pub struct ExactlyOnce {
    seen: Vec<u64>,
    n: u64,
    duplicates: u64,
}

impl ExactlyOnce {
    /// A check for `0..n`, nothing seen yet.
    pub fn new(n: u64) -> Self {
        ExactlyOnce {
            seen: vec![0; usize::try_from(n.div_ceil(64)).unwrap_or(usize::MAX)],
            n,
            duplicates: 0,
        }
    }

    /// Records `seq`; one seen before or outside `0..n` counts as a duplicate.
    #[inline]
    pub fn observe(&mut self, seq: u64) {
        let bit = 1u64 << (seq % 64);
        match usize::try_from(seq / 64)
            .ok()
            .filter(|_| seq < self.n)
            .and_then(|i| self.seen.get_mut(i))
        {
            Some(word) if *word & bit == 0 => *word |= bit,
            _ => self.duplicates += 1,
        }
    }

    /// Sequence numbers seen twice or more, or outside `0..n`.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }
}

/// An empty latency histogram in nanoseconds (1 ns to 120 s, 3 significant digits).
pub fn new_histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).context("creating a latency histogram")
}

/// The result of one run of one system.
#[derive(Debug)]
pub struct Outcome {
    /// Deliveries across all consumers.
    pub delivered: u64,
    /// Deliveries the system reported as lost.
    pub lost: u64,
    /// Deliveries of a message the consumer had already received, where the run checked for
    /// exactly-once delivery (see [`ConsumerTally::exactly_once`]).
    pub duplicates: Option<u64>,
    /// From the first publish to the last delivery.
    pub wall: Duration,
    /// Publish -> delivery latency samples, in nanoseconds.
    pub latency: Histogram<u64>,
    /// CPU time the whole process used during the run (all threads), where known.
    pub cpu: Option<Duration>,
}

impl Outcome {
    /// An outcome without publish -> delivery latency samples.
    pub fn without_latency(
        delivered: u64,
        duplicates: Option<u64>,
        wall: Duration,
    ) -> Result<Self> {
        Ok(Outcome {
            delivered,
            lost: 0,
            duplicates,
            wall,
            latency: new_histogram()?,
            cpu: None,
        })
    }

    /// Combines the tallies of a closed loop's workers: every operation counts as a delivery,
    /// its duration as a latency sample, and the run lasts from the first start to the last end.
    pub fn from_ops(workers: Vec<OpTally>) -> Result<Self> {
        let start = workers
            .iter()
            .map(|w| w.first)
            .min()
            .ok_or_else(|| anyhow!("a run needs at least one worker"))?;
        let end = workers.iter().map(|w| w.finish).max().unwrap_or(start);
        let mut outcome = Outcome::without_latency(0, None, end.saturating_duration_since(start))?;
        for w in workers {
            outcome.delivered += w.ops;
            outcome
                .latency
                .add(&w.hist)
                .map_err(|e| anyhow!("merging latency histograms: {e:?}"))?;
        }
        Ok(outcome)
    }

    /// Combines the tallies of a run's producers and consumers.
    pub fn combine(producers: &[ProducerTally], consumers: Vec<ConsumerTally>) -> Result<Self> {
        let start = producers
            .iter()
            .map(|p| p.first)
            .min()
            .ok_or_else(|| anyhow!("a run needs at least one producer"))?;
        let mut end = producers.iter().map(|p| p.finish).max().unwrap_or(start);
        let mut latency = new_histogram()?;
        let (mut delivered, mut lost, mut duplicates) = (0, 0, None);
        for c in consumers {
            delivered += c.delivered;
            lost += c.lost;
            if let Some(once) = &c.once {
                *duplicates.get_or_insert(0) += once.duplicates();
            }
            if let Some(last) = c.last {
                end = end.max(last);
            }
            latency
                .add(&c.hist)
                .map_err(|e| anyhow!("merging latency histograms: {e:?}"))?;
        }
        Ok(Outcome {
            delivered,
            lost,
            duplicates,
            wall: end.saturating_duration_since(start),
            latency,
            cpu: None,
        })
    }

    /// Deliveries per second of wall time.
    pub fn msgs_per_s(&self) -> f64 {
        let secs = self.wall.as_secs_f64();
        if secs > 0.0 {
            self.delivered as f64 / secs
        } else {
            0.0
        }
    }

    /// CPU nanoseconds per delivery (all threads of the process), where known and measured
    /// over at least [`MIN_CPU`] (the clock ticks every 10 ms).
    pub fn cpu_ns_per_delivery(&self) -> Option<f64> {
        let cpu = self.cpu.filter(|c| *c >= MIN_CPU)?;
        (self.delivered > 0).then(|| cpu.as_nanos() as f64 / self.delivered as f64)
    }

    /// The latency at `quantile`, in microseconds (0 without samples).
    pub fn latency_us(&self, quantile: f64) -> f64 {
        if self.latency.is_empty() {
            return 0.0;
        }
        self.latency.value_at_quantile(quantile) as f64 / 1_000.0
    }
}

/// What one worker of a closed loop saw: operations timed one by one, each starting when the
/// previous one ended (for example appends, publishes waiting for their acknowledgement, or
/// write + fsync pairs).
#[derive(Debug)]
pub struct OpTally {
    /// Operations completed.
    pub ops: u64,
    /// When the first one started.
    pub first: Instant,
    /// When the last one ended.
    pub finish: Instant,
    hist: Histogram<u64>,
}

impl OpTally {
    /// An empty tally starting now.
    pub fn new() -> Result<Self> {
        let now = Instant::now();
        Ok(OpTally {
            ops: 0,
            first: now,
            finish: now,
            hist: new_histogram()?,
        })
    }

    /// Runs `op` again and again until `deadline`, timing each run (one clock read per
    /// operation: each one starts when the previous one ends).
    pub fn run_until(deadline: Instant, mut op: impl FnMut() -> Result<()>) -> Result<OpTally> {
        let mut tally = OpTally::new()?;
        let mut at = tally.first;
        while at < deadline {
            op()?;
            at = tally.record(at);
        }
        Ok(tally)
    }

    /// Counts an operation that started at `started` and ended now; returns now.
    #[inline]
    pub fn record(&mut self, started: Instant) -> Instant {
        let now = Instant::now();
        let nanos = u64::try_from(now.saturating_duration_since(started).as_nanos());
        self.hist
            .saturating_record(nanos.unwrap_or(u64::MAX).max(1));
        self.ops += 1;
        self.finish = now;
        now
    }
}

/// The middle element of `runs` by `key` (the upper one of an even count); `None` if empty.
pub fn median_by<T>(mut runs: Vec<T>, key: impl Fn(&T) -> f64) -> Option<T> {
    if runs.is_empty() {
        return None;
    }
    runs.sort_by(|x, y| key(x).total_cmp(&key(y)));
    let mid = runs.len() / 2;
    Some(runs.swap_remove(mid))
}

/// Runs `f`, returning its result and the CPU time the whole process used meanwhile.
pub fn cpu_time<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Option<Duration>)> {
    let before = process_cpu_time();
    let out = f()?;
    let cpu = before
        .zip(process_cpu_time())
        .map(|(before, after)| after.saturating_sub(before));
    Ok((out, cpu))
}

/// Runs `future` on a fresh multi-threaded Tokio runtime with two worker threads.
pub fn block_on<T>(future: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the Tokio runtime")?
        .block_on(future)
}

/// Awaits spawned tasks in order, returning their results.
pub async fn join_all<T>(handles: Vec<tokio::task::JoinHandle<Result<T>>>) -> Result<Vec<T>> {
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.context("a benchmark task panicked")??);
    }
    Ok(out)
}

/// The lengths of the chunks of `size` (the last one shorter) that make up `n`.
pub fn chunks(n: u64, size: u64) -> impl Iterator<Item = u64> {
    let size = size.max(1);
    (0..n.div_ceil(size)).map(move |i| size.min(n - i * size))
}

/// CPU time (user + system) used so far by the whole process, from `/proc/self/stat` (Linux;
/// `None` elsewhere). The resolution is one clock tick (10 ms).
pub fn process_cpu_time() -> Option<Duration> {
    /// Linux reports these fields in `USER_HZ` ticks, 100 per second on every architecture's ABI.
    const TICKS_PER_S: u64 = 100;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may contain spaces; the fields after it are space-separated,
    // starting with the state (field 3). utime and stime are fields 14 and 15.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 1000 / TICKS_PER_S))
}

/// The resident set size of the process in bytes (`VmRSS` in `/proc/self/status`; Linux, `None`
/// elsewhere).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// The 1-minute load average (Linux; `None` elsewhere).
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
