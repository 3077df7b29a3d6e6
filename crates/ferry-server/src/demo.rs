//! `ferry demo`: the GPU-telemetry pipeline of the seed design, run in process.
//!
//! - `--producers` streamers, one simulated host each, publish JSON [`GpuPoint`]s to
//!   `telemetry/gpu/<host>` through a bound [`Publisher`], paced at `--rate` points per second
//!   each (0: as fast as the broker takes them);
//! - `--collectors` fanout subscriptions on `telemetry/gpu/+` (auto-ack) decode every point,
//!   keep per-GPU aggregates and check that they see every host's sequence exactly once, in
//!   order;
//! - `--workers` members of the consumer group `alerts` (manual ack: at-least-once) share the
//!   points, count temperature alerts and acknowledge each point.
//!
//! Every consumer subscribes before the first point is published, so each one is obliged to
//! process every point. Once a second a live line shows the publish and delivery rates, the lag
//! and the depth. When the run ends (after `--duration`, or once every producer has published
//! `--messages` points) the broker is shut down gracefully and the final accounting is checked:
//! every subscription must have `unaccounted() == 0`, every collector must have received every
//! published point, and the group must have acknowledged every point.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::{self, Write as _};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use ferry::disk::{DiskConfig, Durability};
use ferry::stats::thousands;
use ferry::{
    Broker, BrokerConfig, Message, Publisher, ShutdownReport, Subscription, SubscriptionStats,
};
use serde::{Deserialize, Serialize};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};

/// Producers publish to `telemetry/gpu/<host>`.
const TOPIC_PREFIX: &str = "telemetry/gpu";
/// Collectors and workers read every host.
const FILTER: &str = "telemetry/gpu/+";
/// The consumer group of the workers.
const GROUP: &str = "alerts";
/// GPUs per simulated host.
const GPUS_PER_HOST: u32 = 8;
/// Workers raise an alert for points at or above this temperature.
const HOT_CELSIUS: u32 = 85;
/// The run length when neither `--duration` nor `--messages` is given.
const DEFAULT_DURATION: Duration = Duration::from_secs(5);
/// How long shutdown may take to drain.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long consumer tasks may take to finish once the broker has closed.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Paced producers publish what is due at this interval.
const PACE_TICK: Duration = Duration::from_millis(5);
/// Unpaced producers (and paced ones catching up) yield to the scheduler this often.
const YIELD_EVERY: u64 = 512;
/// Exit status of an accounting mismatch.
const EXIT_MISMATCH: u8 = 3;

/// Options of `ferry demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Producers ("streamers"), one simulated GPU host each.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub producers: u32,
    /// Fanout collectors subscribed to `telemetry/gpu/+`.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub collectors: u32,
    /// Workers in the `alerts` consumer group (manual ack).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub workers: u32,
    /// Run for this many seconds (fractions allowed) [default: 5, or until --messages are sent].
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub duration: Option<Duration>,
    /// Stop each producer after this many points (with --duration: whichever comes first).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub messages: Option<u64>,
    /// Points per second per producer; 0 publishes as fast as possible.
    #[arg(long, value_name = "PER_SEC", default_value_t = 20_000)]
    pub rate: u64,
    /// Print the final report as JSON on stdout (the live lines then go to stderr).
    #[arg(long)]
    pub json: bool,
    /// Keep the topics in this data directory (durable: segmented logs on disk, consumer
    /// positions saved) instead of in memory.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<std::path::PathBuf>,
    /// With --data-dir: when a publish is acknowledged. `always` fsyncs first (concurrent
    /// publishes share one fsync), `interval` fsyncs every 10 ms, `never` leaves it to the OS.
    #[arg(long, value_enum, default_value_t = Fsync::Always, requires = "data_dir")]
    pub fsync: Fsync,
}

/// The durability policy of `--data-dir`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fsync {
    /// Fsync before acknowledging (group commit).
    Always,
    /// Fsync every 10 ms.
    Interval,
    /// Leave writing back to the OS.
    Never,
}

impl DemoArgs {
    /// The broker: in memory, or durable on `--data-dir`.
    fn broker(&self) -> anyhow::Result<Broker> {
        let Some(dir) = &self.data_dir else {
            return Ok(Broker::new(BrokerConfig::default()));
        };
        let durability = match self.fsync {
            Fsync::Always => Durability::Always,
            Fsync::Interval => Durability::Interval(Duration::from_millis(10)),
            Fsync::Never => Durability::Never,
        };
        let disk = DiskConfig {
            durability,
            ..DiskConfig::default()
        };
        Broker::open_with(dir, BrokerConfig::default(), disk)
            .with_context(|| format!("opening the data directory {}", dir.display()))
    }
}

impl DemoArgs {
    /// How long to run: `--duration`, or the default unless `--messages` bounds the run.
    fn effective_duration(&self) -> Option<Duration> {
        match (self.duration, self.messages) {
            (None, None) => Some(DEFAULT_DURATION),
            (d, _) => d,
        }
    }
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !secs.is_finite() || secs <= 0.0 || secs > 86_400.0 {
        return Err(format!(
            "{s:?} must be more than 0 and at most 86400 seconds"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// One telemetry point, as a GPU exporter would send it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuPoint {
    /// The host (also the last level of the topic).
    pub host: String,
    /// The GPU index on the host.
    pub gpu: u32,
    /// The producer's sequence number, from 0 (lets collectors detect gaps and duplicates).
    pub seq: u64,
    /// Sample time, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// Utilisation, percent.
    pub utilization_pct: u32,
    /// Temperature, degrees Celsius.
    pub temperature_c: u32,
    /// Memory in use, MiB.
    pub memory_used_mib: u64,
    /// Memory size, MiB.
    pub memory_total_mib: u64,
    /// Board power, watts.
    pub power_w: f32,
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

/// Runs the demo; `Ok` carries the exit status (success, or an accounting mismatch).
pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let duration = args.effective_duration();
    let out = Out::new(args.json);
    let broker = args.broker()?;

    // Consumers first, so that every one of them is obliged to process every point.
    let (collectors, workers) = spawn_consumers(&broker, &args)?;
    for line in banner(&args, duration) {
        out.live(&line);
    }
    let driven = drive(&broker, &args, duration, &out).await;

    // Graceful shutdown: consumers drain what is queued, then the broker closes. It runs even
    // when a producer failed, so that nothing is left behind.
    let report = broker.shutdown(SHUTDOWN_TIMEOUT).await;
    let driven = driven.context("the demo stopped early")?;

    // Consumers end once the broker has closed and they have received what was queued.
    let mut problems = Vec::new();
    let collected = join_all(collectors, &mut problems).await;
    let worked = join_all(workers, &mut problems).await;
    // The subscriptions came back from the tasks and are still alive, so the registry still
    // lists every one of them (a dropped fanout subscription leaves it).
    let subscriptions = broker.subscription_stats();
    let (summary, subscriptions) = Summary::new(
        &args,
        Outcome {
            driven,
            report,
            subscriptions,
            collected,
            worked,
            problems,
        },
    );
    drop(subscriptions);

    if args.json {
        out.report(&serde_json::to_string_pretty(&summary).context("encoding the report")?);
    } else {
        out.report(&summary.render());
    }
    Ok(if summary.accounting.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_MISMATCH)
    })
}

type Tasks<T> = Vec<(String, JoinHandle<T>)>;

/// Subscribes the collectors and the workers and starts their tasks.
fn spawn_consumers(
    broker: &Broker,
    args: &DemoArgs,
) -> anyhow::Result<(Tasks<CollectorOutcome>, Tasks<WorkerOutcome>)> {
    let mut collectors = Vec::new();
    for i in 1..=args.collectors {
        let name = format!("collector-{i}");
        let sub = broker
            .subscription(FILTER)
            .name(name.clone())
            .build()
            .with_context(|| format!("subscribing {name} to {FILTER}"))?;
        collectors.push((name.clone(), tokio::spawn(collect(sub, name))));
    }
    let mut workers = Vec::new();
    for i in 1..=args.workers {
        let name = format!("worker-{i}");
        let sub = broker
            .subscription(FILTER)
            .group(GROUP)
            .manual_ack()
            .build()
            .with_context(|| format!("joining {name} to group {GROUP}"))?;
        workers.push((name.clone(), tokio::spawn(work(sub, name))));
    }
    Ok((collectors, workers))
}

/// What the run is about to do, and the header of the live table.
fn banner(args: &DemoArgs, duration: Option<Duration>) -> Vec<String> {
    let pace = match args.rate {
        0 => "as fast as possible".to_string(),
        r => format!("{}/s per producer", thousands(r)),
    };
    let until = match (duration, args.messages) {
        (Some(d), Some(n)) => format!(
            "for {:.1}s or {} points per producer",
            d.as_secs_f64(),
            thousands(n)
        ),
        (Some(d), None) => format!("for {:.1}s", d.as_secs_f64()),
        (None, Some(n)) => format!("until {} points per producer", thousands(n)),
        (None, None) => String::new(),
    };
    vec![
        format!(
            "ferry demo: {} producers -> {TOPIC_PREFIX}/<host> | {} collectors (fanout, {FILTER}) \
             | {} workers (group \"{GROUP}\", manual ack)",
            args.producers, args.collectors, args.workers
        ),
        format!("publishing {pace} {until}"),
        String::new(),
        Sample::header(),
    ]
}

/// What the producers did.
struct Driven {
    run_time: Duration,
    /// By producer index.
    produced: Vec<ProducerOutcome>,
    samples: Vec<Sample>,
}

/// Runs the producers until `duration` has passed or each has published `--messages` points,
/// printing a live line every second.
async fn drive(
    broker: &Broker,
    args: &DemoArgs,
    duration: Option<Duration>,
    out: &Out,
) -> anyhow::Result<Driven> {
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut producers = JoinSet::new();
    for index in 0..args.producers {
        let publisher = broker
            .publisher(&format!("{TOPIC_PREFIX}/{}", host_name(index)))
            .context("creating a publisher")?
            .with_producer_id(host_name(index));
        producers.spawn(produce(
            publisher,
            index,
            args.rate,
            args.messages,
            stop.clone(),
        ));
    }

    let mut samples = Vec::new();
    let mut probe = Sampler::new(broker, started);
    let every = Duration::from_secs(1);
    let mut ticker = tokio::time::interval_at(started + every, every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let deadline = async {
        match duration {
            Some(d) => tokio::time::sleep_until(started + d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut produced = Vec::new();
    let mut failure = None;
    while !producers.is_empty() {
        tokio::select! {
            _ = ticker.tick() => {
                let s = probe.sample(broker);
                out.live(&s.line());
                samples.push(s);
            }
            () = &mut deadline, if !stop.load(Ordering::Relaxed) => {
                stop.store(true, Ordering::Relaxed);
            }
            Some(joined) = producers.join_next() => {
                let result = joined
                    .map_err(|e| anyhow::Error::new(e).context("a producer panicked"))
                    .and_then(|r| r);
                match result {
                    Ok(p) => produced.push(p),
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        failure.get_or_insert(e);
                    }
                }
            }
        }
    }
    let run_time = started.elapsed();
    if let Some(e) = failure {
        return Err(e);
    }
    // One more line for the last partial second, when there is one.
    let last = samples.last().map_or(0.0, |s: &Sample| s.t_secs);
    let s = probe.sample(broker);
    if s.t_secs - last >= 0.1 {
        out.live(&s.line());
        samples.push(s);
    }
    produced.sort_by_key(|p: &ProducerOutcome| p.index);
    tracing::info!(
        published = produced.iter().map(|p| p.sent).sum::<u64>(),
        secs = run_time.as_secs_f64(),
        "producers finished"
    );
    Ok(Driven {
        run_time,
        produced,
        samples,
    })
}

/// Joins consumer tasks, with a time limit; failures become accounting problems.
async fn join_all<T>(tasks: Vec<(String, JoinHandle<T>)>, problems: &mut Vec<String>) -> Vec<T> {
    let mut done = Vec::new();
    for (name, mut task) in tasks {
        match tokio::time::timeout(JOIN_TIMEOUT, &mut task).await {
            Ok(Ok(v)) => done.push(v),
            Ok(Err(e)) => problems.push(format!("{name}: task failed: {e}")),
            Err(_) => {
                problems.push(format!(
                    "{name}: still receiving {}s after shutdown (recv did not end)",
                    JOIN_TIMEOUT.as_secs()
                ));
                task.abort();
            }
        }
    }
    done
}

/// Where the output goes: live lines go to stderr when stdout carries the JSON report. Once the
/// reader of stdout has gone (`ferry demo | head`), output stops quietly; the demo still runs
/// to the end and its exit status still reports the accounting.
#[derive(Debug)]
struct Out {
    json: bool,
    gone: std::cell::Cell<bool>,
}

impl Out {
    fn new(json: bool) -> Self {
        Out {
            json,
            gone: std::cell::Cell::new(false),
        }
    }

    /// A live line (stdout, or stderr with `--json`).
    fn live(&self, line: &str) {
        if self.json {
            self.write(&mut std::io::stderr().lock(), line);
        } else {
            self.write(&mut std::io::stdout().lock(), line);
        }
    }

    /// The final report, always on stdout.
    fn report(&self, text: &str) {
        self.write(&mut std::io::stdout().lock(), text);
    }

    fn write(&self, w: &mut impl std::io::Write, text: &str) {
        if self.gone.get() {
            return;
        }
        let r = w
            .write_all(text.as_bytes())
            .and_then(|()| {
                if text.ends_with('\n') {
                    Ok(())
                } else {
                    w.write_all(b"\n")
                }
            })
            .and_then(|()| w.flush());
        if let Err(e) = r {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                tracing::warn!(error = %e, "cannot write the output; stopping it");
            }
            self.gone.set(true);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Producers
// ---------------------------------------------------------------------------------------------

fn host_name(index: u32) -> String {
    format!("gpu-node-{index:02}")
}

#[derive(Debug)]
struct ProducerOutcome {
    index: u32,
    host: String,
    sent: u64,
}

/// Publishes points until `stop`, or until `limit` points, paced at `rate` per second (0: not
/// paced). A paced producer that falls behind catches up as fast as the broker allows.
async fn produce(
    publisher: Publisher,
    index: u32,
    rate: u64,
    limit: Option<u64>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<ProducerOutcome> {
    let mut sim = HostSim::new(index);
    let limit = limit.unwrap_or(u64::MAX);
    let started = Instant::now();
    let mut ticker = tokio::time::interval(PACE_TICK);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sent = 0u64;
    tracing::debug!(topic = %publisher.topic(), rate, "producer started");
    while sent < limit && !stop.load(Ordering::Relaxed) {
        let due = if rate == 0 {
            limit
        } else {
            ticker.tick().await;
            let due = started.elapsed().as_secs_f64() * rate as f64;
            (due as u64).min(limit)
        };
        while sent < due && !stop.load(Ordering::Relaxed) {
            let point = sim.point(sent);
            let message = Message::json(&point).context("encoding a telemetry point")?;
            publisher
                .publish(message)
                .await
                .with_context(|| format!("publishing to {}", publisher.topic()))?;
            sent += 1;
            if sent % YIELD_EVERY == 0 {
                tokio::task::yield_now().await;
            }
        }
    }
    tracing::debug!(topic = %publisher.topic(), sent, "producer stopped");
    Ok(ProducerOutcome {
        index,
        host: sim.host,
        sent,
    })
}

/// A simulated host: each GPU's utilisation wanders around a target; temperature, memory and
/// power follow it. One GPU on every third host has poor cooling and runs hot.
struct HostSim {
    host: String,
    rng: u64,
    gpus: Vec<GpuSim>,
}

struct GpuSim {
    util: f64,
    target: f64,
    cooling_penalty: f64,
    memory_total_mib: u64,
}

impl HostSim {
    fn new(index: u32) -> Self {
        let mut rng =
            0x9E37_79B9_7F4A_7C15 ^ (u64::from(index) + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        let memory_total_mib = if index % 2 == 0 { 81_920 } else { 40_960 };
        let gpus = (0..GPUS_PER_HOST)
            .map(|g| {
                let target = 25.0 + 70.0 * unit(&mut rng);
                GpuSim {
                    util: target,
                    target,
                    cooling_penalty: if index % 3 == 0 && g == index % GPUS_PER_HOST {
                        16.0
                    } else {
                        0.0
                    },
                    memory_total_mib,
                }
            })
            .collect();
        HostSim {
            host: host_name(index),
            rng,
            gpus,
        }
    }

    fn point(&mut self, seq: u64) -> GpuPoint {
        let gpu = (seq % u64::from(GPUS_PER_HOST)) as u32;
        let (n1, n2, n3) = (
            unit(&mut self.rng) - 0.5,
            unit(&mut self.rng) - 0.5,
            unit(&mut self.rng) - 0.5,
        );
        let g = &mut self.gpus[gpu as usize];
        g.util = (g.util + (g.target - g.util) * 0.02 + n1 * 12.0).clamp(0.0, 100.0);
        let temperature = 30.0 + 0.5 * g.util + g.cooling_penalty + n2 * 6.0;
        let memory_used = g.memory_total_mib as f64 * (0.15 + 0.8 * g.util / 100.0);
        let power = 60.0 + 3.2 * g.util + n3 * 20.0;
        let ts_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        GpuPoint {
            host: self.host.clone(),
            gpu,
            seq,
            ts_ms,
            utilization_pct: g.util.round() as u32,
            temperature_c: temperature.round().max(0.0) as u32,
            memory_used_mib: memory_used as u64,
            memory_total_mib: g.memory_total_mib,
            power_w: power as f32,
        }
    }
}

/// xorshift64*: deterministic, dependency-free noise for the simulation.
fn next_u64(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// A uniform float in `[0, 1)`.
fn unit(state: &mut u64) -> f64 {
    (next_u64(state) >> 11) as f64 / (1u64 << 53) as f64
}

// ---------------------------------------------------------------------------------------------
// Collectors (fanout, auto-ack)
// ---------------------------------------------------------------------------------------------

/// Per-GPU aggregates; integer sums, so that every collector must agree exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct GpuAgg {
    samples: u64,
    util_sum: u64,
    temp_sum: u64,
    temp_max: u32,
    mem_max_mib: u64,
}

/// Checks that one host's points arrive exactly once and in order.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct SeqCheck {
    /// The next sequence number expected.
    next: u64,
    /// Points skipped (a later point arrived first).
    gaps: u64,
    /// Points seen again or out of order.
    duplicates: u64,
}

impl SeqCheck {
    fn see(&mut self, seq: u64) {
        match seq.cmp(&self.next) {
            std::cmp::Ordering::Equal => self.next += 1,
            std::cmp::Ordering::Greater => {
                self.gaps += seq - self.next;
                self.next = seq + 1;
            }
            std::cmp::Ordering::Less => self.duplicates += 1,
        }
    }
}

struct CollectorOutcome {
    name: String,
    received: u64,
    decode_errors: u64,
    hosts: BTreeMap<String, SeqCheck>,
    gpus: BTreeMap<(String, u32), GpuAgg>,
    /// Kept alive so the registry still lists it for the final stats.
    sub: Subscription,
}

async fn collect(mut sub: Subscription, name: String) -> CollectorOutcome {
    let mut received = 0u64;
    let mut decode_errors = 0u64;
    let mut hosts: HashMap<String, SeqCheck> = HashMap::new();
    let mut gpus: HashMap<(String, u32), GpuAgg> = HashMap::new();
    while let Ok(delivery) = sub.recv().await {
        received += 1;
        let p = match delivery.decode::<GpuPoint>() {
            Ok(p) => p,
            Err(e) => {
                decode_errors += 1;
                tracing::warn!(collector = %name, topic = %delivery.topic(), offset = delivery.offset(), error = %e, "undecodable point");
                continue;
            }
        };
        match hosts.get_mut(&p.host) {
            Some(check) => check.see(p.seq),
            None => hosts.entry(p.host.clone()).or_default().see(p.seq),
        }
        let agg = gpus.entry((p.host, p.gpu)).or_default();
        agg.samples += 1;
        agg.util_sum += u64::from(p.utilization_pct);
        agg.temp_sum += u64::from(p.temperature_c);
        agg.temp_max = agg.temp_max.max(p.temperature_c);
        agg.mem_max_mib = agg.mem_max_mib.max(p.memory_used_mib);
    }
    tracing::debug!(collector = %name, received, "collector finished");
    CollectorOutcome {
        name,
        received,
        decode_errors,
        hosts: hosts.into_iter().collect(),
        gpus: gpus.into_iter().collect(),
        sub,
    }
}

// ---------------------------------------------------------------------------------------------
// Workers (consumer group, manual ack)
// ---------------------------------------------------------------------------------------------

/// What one worker did.
#[derive(Debug, Clone, Default, Serialize)]
struct WorkerCounts {
    name: String,
    /// Deliveries received (redeliveries included).
    processed: u64,
    /// Successful acks.
    acked: u64,
    /// Acks refused (the delivery was no longer in flight).
    ack_errors: u64,
    /// Deliveries that were not a first attempt.
    redeliveries: u64,
    /// Points that did not decode (rejected to the dead-letter queue).
    decode_errors: u64,
    /// Points at or above the alert temperature.
    alerts: u64,
    #[serde(skip)]
    hot_gpus: BTreeSet<(String, u32)>,
}

struct WorkerOutcome {
    counts: WorkerCounts,
    /// Kept alive so the group keeps its members for the final stats.
    sub: Subscription,
}

async fn work(mut sub: Subscription, name: String) -> WorkerOutcome {
    let mut o = WorkerCounts {
        name,
        ..WorkerCounts::default()
    };
    while let Ok(delivery) = sub.recv().await {
        o.processed += 1;
        if delivery.attempt() > 1 {
            o.redeliveries += 1;
        }
        match delivery.decode::<GpuPoint>() {
            Ok(p) => {
                if p.temperature_c >= HOT_CELSIUS {
                    o.alerts += 1;
                    tracing::trace!(worker = %o.name, host = %p.host, gpu = p.gpu, celsius = p.temperature_c, "temperature alert");
                    o.hot_gpus.insert((p.host, p.gpu));
                }
                match delivery.ack() {
                    Ok(()) => o.acked += 1,
                    Err(e) => {
                        o.ack_errors += 1;
                        tracing::warn!(worker = %o.name, error = %e, "ack failed");
                    }
                }
            }
            Err(e) => {
                o.decode_errors += 1;
                tracing::warn!(worker = %o.name, error = %e, "undecodable point, rejecting it");
                if let Err(e) = delivery.reject(format!("undecodable telemetry point: {e}")) {
                    tracing::warn!(worker = %o.name, error = %e, "reject failed");
                }
            }
        }
    }
    tracing::debug!(worker = %o.name, processed = o.processed, "worker finished");
    WorkerOutcome { counts: o, sub }
}

// ---------------------------------------------------------------------------------------------
// Live lines
// ---------------------------------------------------------------------------------------------

/// One live sample.
#[derive(Debug, Clone, Serialize)]
struct Sample {
    /// Seconds since the producers started.
    t_secs: f64,
    published: u64,
    delivered: u64,
    acked: u64,
    /// Points published per second since the last sample.
    publish_rate: f64,
    /// Deliveries per second since the last sample (over every subscription).
    delivery_rate: f64,
    lag_max: u64,
    lag_avg: f64,
    /// Records stored in the topics.
    depth: usize,
    /// Deliveries awaiting acknowledgement.
    in_flight: u64,
}

impl Sample {
    fn header() -> String {
        format!(
            "{:>7} {:>13} {:>10} {:>13} {:>10} {:>8} {:>8} {:>8} {:>9}",
            "time",
            "published",
            "pub/s",
            "delivered",
            "dlv/s",
            "lag max",
            "lag avg",
            "depth",
            "in-flight"
        )
    }

    fn line(&self) -> String {
        format!(
            "{:>6.1}s {:>13} {:>10} {:>13} {:>10} {:>8} {:>8.1} {:>8} {:>9}",
            self.t_secs,
            thousands(self.published),
            per_sec(self.publish_rate),
            thousands(self.delivered),
            per_sec(self.delivery_rate),
            thousands(self.lag_max),
            self.lag_avg,
            thousands(self.depth as u64),
            thousands(self.in_flight),
        )
    }
}

struct Sampler {
    started: Instant,
    last_at: Instant,
    last_published: u64,
    last_delivered: u64,
}

impl Sampler {
    fn new(broker: &Broker, started: Instant) -> Self {
        let c = broker.stats().counters;
        Sampler {
            started,
            last_at: started,
            last_published: c.published,
            last_delivered: c.delivered,
        }
    }

    fn sample(&mut self, broker: &Broker) -> Sample {
        let now = Instant::now();
        let stats = broker.stats();
        let in_flight = broker
            .subscription_stats()
            .iter()
            .map(|s| s.in_flight)
            .sum();
        let dt = now
            .saturating_duration_since(self.last_at)
            .as_secs_f64()
            .max(1e-9);
        let c = stats.counters;
        let s = Sample {
            t_secs: now.saturating_duration_since(self.started).as_secs_f64(),
            published: c.published,
            delivered: c.delivered,
            acked: c.acked,
            publish_rate: c.published.saturating_sub(self.last_published) as f64 / dt,
            delivery_rate: c.delivered.saturating_sub(self.last_delivered) as f64 / dt,
            lag_max: stats.lag.max_lag,
            lag_avg: stats.lag.avg_lag,
            depth: stats.depth,
            in_flight,
        };
        self.last_at = now;
        self.last_published = c.published;
        self.last_delivered = c.delivered;
        s
    }
}

// ---------------------------------------------------------------------------------------------
// The final report and the accounting check
// ---------------------------------------------------------------------------------------------

/// Everything the run produced, gathered for the report.
struct Outcome {
    driven: Driven,
    report: ShutdownReport,
    subscriptions: Vec<SubscriptionStats>,
    collected: Vec<CollectorOutcome>,
    worked: Vec<WorkerOutcome>,
    /// Problems found while joining the consumers.
    problems: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Summary {
    config: ConfigEcho,
    run_secs: f64,
    /// Points the producers published (by their own count).
    published: u64,
    producers: Vec<ProducerRow>,
    shutdown: ShutdownReport,
    subscriptions: Vec<SubscriptionRow>,
    collectors: Vec<CollectorRow>,
    workers: Vec<WorkerCounts>,
    fleet: Option<Fleet>,
    samples: Vec<Sample>,
    accounting: Accounting,
}

#[derive(Debug, Serialize)]
struct ConfigEcho {
    producers: u32,
    collectors: u32,
    workers: u32,
    duration_secs: Option<f64>,
    messages_per_producer: Option<u64>,
    rate_per_producer: u64,
    topic_prefix: &'static str,
    filter: &'static str,
    group: &'static str,
}

#[derive(Debug, Serialize)]
struct ProducerRow {
    host: String,
    sent: u64,
}

#[derive(Debug, Serialize)]
struct SubscriptionRow {
    #[serde(flatten)]
    stats: SubscriptionStats,
    unaccounted: i64,
}

#[derive(Debug, Serialize)]
struct CollectorRow {
    name: String,
    received: u64,
    hosts: usize,
    gpus: usize,
    gaps: u64,
    duplicates: u64,
    decode_errors: u64,
    /// Received every published point exactly once, in order per host.
    complete: bool,
    /// Its per-GPU aggregates equal the first collector's.
    agrees: bool,
}

/// The fleet as the first collector aggregated it.
#[derive(Debug, Serialize)]
struct Fleet {
    source: String,
    hosts: usize,
    gpus: usize,
    mean_utilization_pct: f64,
    mean_temperature_c: f64,
    alerts: u64,
    hot_gpus: Vec<String>,
    per_gpu: Vec<GpuRow>,
}

#[derive(Debug, Serialize)]
struct GpuRow {
    host: String,
    gpu: u32,
    samples: u64,
    avg_utilization_pct: f64,
    avg_temperature_c: f64,
    max_temperature_c: u32,
    max_memory_used_mib: u64,
}

#[derive(Debug, Serialize)]
struct Accounting {
    ok: bool,
    status: &'static str,
    problems: Vec<String>,
}

impl Summary {
    /// Checks the accounting and builds the report. Returns the subscriptions too, which the
    /// caller drops once the report no longer needs the registry.
    fn new(args: &DemoArgs, o: Outcome) -> (Summary, Vec<Subscription>) {
        let mut problems = o.problems;
        let published: u64 = o.driven.produced.iter().map(|p| p.sent).sum();
        let consumers = u64::from(args.collectors) + u64::from(args.workers > 0);
        check_broker(&mut problems, &o.report, published, consumers);
        let subscriptions =
            check_subscriptions(&mut problems, o.subscriptions, published, consumers);
        let collectors =
            check_collectors(&mut problems, &o.collected, &o.driven.produced, published);
        let workers: Vec<WorkerCounts> = o.worked.iter().map(|w| w.counts.clone()).collect();
        if args.workers > 0 {
            check_workers(&mut problems, &workers, published);
        }
        let fleet = o.collected.first().map(|c| Fleet::new(c, &workers));

        let mut subs: Vec<Subscription> = Vec::new();
        subs.extend(o.collected.into_iter().map(|c| c.sub));
        subs.extend(o.worked.into_iter().map(|w| w.sub));
        let ok = problems.is_empty();
        let summary = Summary {
            config: ConfigEcho {
                producers: args.producers,
                collectors: args.collectors,
                workers: args.workers,
                duration_secs: args.effective_duration().map(|d| d.as_secs_f64()),
                messages_per_producer: args.messages,
                rate_per_producer: args.rate,
                topic_prefix: TOPIC_PREFIX,
                filter: FILTER,
                group: GROUP,
            },
            run_secs: o.driven.run_time.as_secs_f64(),
            published,
            producers: o
                .driven
                .produced
                .into_iter()
                .map(|p| ProducerRow {
                    host: p.host,
                    sent: p.sent,
                })
                .collect(),
            shutdown: o.report,
            subscriptions,
            collectors,
            workers,
            fleet,
            samples: o.driven.samples,
            accounting: Accounting {
                ok,
                status: if ok { "OK" } else { "MISMATCH" },
                problems,
            },
        };
        (summary, subs)
    }

    /// The human-readable report.
    fn render(&self) -> String {
        let mut w = String::new();
        // Writing to a String cannot fail.
        let _ = self
            .write_run(&mut w)
            .and_then(|()| self.write_subscriptions(&mut w))
            .and_then(|()| self.write_consumers(&mut w))
            .and_then(|()| self.write_fleet(&mut w))
            .and_then(|()| self.write_verdict(&mut w));
        w
    }

    fn write_run(&self, w: &mut String) -> fmt::Result {
        let c = &self.shutdown.counters;
        writeln!(w)?;
        writeln!(
            w,
            "producers stopped after {:.2}s: {} points published ({} on average)",
            self.run_secs,
            thousands(self.published),
            per_sec(self.published as f64 / self.run_secs.max(1e-9))
        )?;
        writeln!(
            w,
            "shutdown: {} in {}, {} records dropped at close",
            if self.shutdown.drained {
                "drained"
            } else {
                "NOT drained"
            },
            human_duration(self.shutdown.elapsed),
            thousands(self.shutdown.dropped_at_close)
        )?;
        writeln!(w)?;
        writeln!(w, "totals")?;
        for (label, value) in [
            ("published", c.published),
            ("delivered", c.delivered),
            ("acked", c.acked),
            ("nacked", c.nacked),
            ("redelivered", c.redelivered),
            ("dead-lettered", c.dead_lettered),
            ("dropped", c.dropped),
            ("errors", c.errors),
        ] {
            writeln!(w, "  {label:<15}{:>15}", thousands(value))?;
        }
        Ok(())
    }

    fn write_subscriptions(&self, w: &mut String) -> fmt::Result {
        writeln!(w)?;
        if self.subscriptions.is_empty() {
            return writeln!(
                w,
                "subscriptions: none (with nobody subscribed, every point is dropped on arrival)"
            );
        }
        writeln!(w, "subscriptions (all on {FILTER})")?;
        writeln!(
            w,
            "  {:>3}  {:<13} {:<11} {:>13} {:>13} {:>13} {:>6} {:>8} {:>12}",
            "id",
            "name",
            "kind",
            "assigned",
            "delivered",
            "acked",
            "dead",
            "dropped",
            "unaccounted"
        )?;
        for row in &self.subscriptions {
            let s = &row.stats;
            let kind = if s.group {
                format!("group of {}", s.members)
            } else {
                "fanout".to_string()
            };
            writeln!(
                w,
                "  {:>3}  {:<13} {:<11} {:>13} {:>13} {:>13} {:>6} {:>8} {:>12}",
                s.id,
                s.name,
                kind,
                thousands(s.assigned),
                thousands(s.counters.delivered),
                thousands(s.counters.acked),
                thousands(s.counters.dead_lettered),
                thousands(s.counters.dropped),
                row.unaccounted
            )?;
        }
        Ok(())
    }

    fn write_consumers(&self, w: &mut String) -> fmt::Result {
        if !self.collectors.is_empty() {
            writeln!(w)?;
            writeln!(w, "collectors (fanout, auto-ack)")?;
            for col in &self.collectors {
                let verdict = match (col.complete, col.agrees) {
                    (true, true) => "complete, in order".to_string(),
                    (true, false) => "complete, but disagrees with the others".to_string(),
                    (false, _) => {
                        format!(
                            "INCOMPLETE: {} gaps, {} duplicates",
                            col.gaps, col.duplicates
                        )
                    }
                };
                writeln!(
                    w,
                    "  {:<13} {:>13} points  {:>4} hosts  {:>5} GPUs  {verdict}",
                    col.name,
                    thousands(col.received),
                    col.hosts,
                    col.gpus
                )?;
            }
        }
        if !self.workers.is_empty() {
            writeln!(w)?;
            writeln!(w, "workers (group \"{GROUP}\", manual ack)")?;
            let row = |w: &mut String, name: &str, acked: u64, alerts: u64, redelivered: u64| {
                writeln!(
                    w,
                    "  {name:<13} {:>13} acked  {:>9} alerts  {:>6} redelivered",
                    thousands(acked),
                    thousands(alerts),
                    thousands(redelivered)
                )
            };
            for k in &self.workers {
                row(w, &k.name, k.acked, k.alerts, k.redeliveries)?;
            }
            row(
                w,
                "all",
                self.workers.iter().map(|k| k.acked).sum(),
                self.workers.iter().map(|k| k.alerts).sum(),
                self.workers.iter().map(|k| k.redeliveries).sum(),
            )?;
        }
        Ok(())
    }

    fn write_fleet(&self, w: &mut String) -> fmt::Result {
        let Some(f) = &self.fleet else {
            return Ok(());
        };
        writeln!(w)?;
        writeln!(
            w,
            "fleet (aggregated by {}): {} hosts, {} GPUs, mean utilisation {:.1}%, \
             mean temperature {:.1} C",
            f.source, f.hosts, f.gpus, f.mean_utilization_pct, f.mean_temperature_c
        )?;
        let mut hottest: Vec<&GpuRow> = f.per_gpu.iter().collect();
        hottest.sort_by(|a, b| b.avg_temperature_c.total_cmp(&a.avg_temperature_c));
        let top: Vec<String> = hottest
            .iter()
            .take(3)
            .map(|g| {
                format!(
                    "{}/gpu{} avg {:.1} C, max {} C",
                    g.host, g.gpu, g.avg_temperature_c, g.max_temperature_c
                )
            })
            .collect();
        if !top.is_empty() {
            writeln!(w, "  hottest: {}", top.join(" | "))?;
        }
        if !self.workers.is_empty() {
            let which = if f.hot_gpus.is_empty() {
                String::new()
            } else {
                format!(" ({})", abbreviate(&f.hot_gpus, 6))
            };
            writeln!(
                w,
                "  alerts (>= {HOT_CELSIUS} C): {} on {} GPUs{which}",
                thousands(f.alerts),
                f.hot_gpus.len()
            )?;
        }
        Ok(())
    }

    fn write_verdict(&self, w: &mut String) -> fmt::Result {
        writeln!(w)?;
        if !self.accounting.ok {
            writeln!(w, "accounting: MISMATCH")?;
            for p in &self.accounting.problems {
                writeln!(w, "  - {p}")?;
            }
            return Ok(());
        }
        let mut why = vec![format!(
            "{} subscriptions, none unaccounted",
            self.subscriptions.len()
        )];
        if !self.collectors.is_empty() {
            why.push(format!(
                "{} collectors got all {} points",
                self.collectors.len(),
                thousands(self.published)
            ));
        }
        if !self.workers.is_empty() {
            why.push(format!("group \"{GROUP}\" acked every point"));
        }
        writeln!(w, "accounting: OK ({})", why.join("; "))
    }
}

/// Broker-wide counters after shutdown.
fn check_broker(
    problems: &mut Vec<String>,
    report: &ShutdownReport,
    published: u64,
    consumers: u64,
) {
    let c = &report.counters;
    if c.published != published {
        problems.push(format!(
            "broker counted {} published, the producers sent {}",
            thousands(c.published),
            thousands(published)
        ));
    }
    if !report.drained {
        problems.push(format!(
            "shutdown did not drain within {}s: {} records dropped at close",
            SHUTDOWN_TIMEOUT.as_secs(),
            thousands(report.dropped_at_close)
        ));
    }
    // With no subscription at all, every point is dropped on arrival; otherwise none is.
    let expect_dropped = if consumers == 0 { published } else { 0 };
    if c.dropped != expect_dropped {
        problems.push(format!(
            "broker counted {} dropped, expected {}",
            thousands(c.dropped),
            thousands(expect_dropped)
        ));
    }
    if c.acked != published * consumers {
        problems.push(format!(
            "broker counted {} acked, expected {} ({} points x {} subscriptions)",
            thousands(c.acked),
            thousands(published * consumers),
            thousands(published),
            consumers
        ));
    }
    if c.dead_lettered != 0 {
        problems.push(format!(
            "broker counted {} dead-lettered",
            thousands(c.dead_lettered)
        ));
    }
}

/// Every subscription: nothing unaccounted, and obliged to (and settled) every point.
fn check_subscriptions(
    problems: &mut Vec<String>,
    stats: Vec<SubscriptionStats>,
    published: u64,
    consumers: u64,
) -> Vec<SubscriptionRow> {
    if stats.len() as u64 != consumers {
        problems.push(format!(
            "the broker lists {} subscriptions, expected {consumers}",
            stats.len()
        ));
    }
    stats
        .into_iter()
        .map(|stats| {
            let unaccounted = stats.unaccounted();
            let n = &stats.counters;
            let who = format!("subscription {} (id {})", stats.name, stats.id);
            if unaccounted != 0 {
                problems.push(format!(
                    "{who}: {unaccounted} unaccounted: assigned {} != acked {} + dead-lettered {} \
                     + dropped {} + in flight {} + lag {}",
                    stats.assigned, n.acked, n.dead_lettered, n.dropped, stats.in_flight, stats.lag
                ));
            }
            if stats.assigned != published {
                problems.push(format!(
                    "{who}: assigned {}, but {} points were published after it subscribed",
                    thousands(stats.assigned),
                    thousands(published)
                ));
            }
            if n.dropped != 0 || n.dead_lettered != 0 {
                problems.push(format!(
                    "{who}: {} dropped, {} dead-lettered (expected none)",
                    thousands(n.dropped),
                    thousands(n.dead_lettered)
                ));
            }
            SubscriptionRow {
                unaccounted: i64::try_from(unaccounted).unwrap_or(i64::MAX),
                stats,
            }
        })
        .collect()
}

/// Every collector: every point exactly once, in order per host; and all of them agree.
fn check_collectors(
    problems: &mut Vec<String>,
    collected: &[CollectorOutcome],
    produced: &[ProducerOutcome],
    published: u64,
) -> Vec<CollectorRow> {
    let reference = collected.first();
    let mut rows = Vec::new();
    for col in collected {
        let mut complete = col.received == published && col.decode_errors == 0;
        if col.received != published {
            problems.push(format!(
                "{}: received {} of {} published points",
                col.name,
                thousands(col.received),
                thousands(published)
            ));
        }
        let (mut gaps, mut duplicates) = (0, 0);
        for p in produced {
            let check = col.hosts.get(&p.host).copied().unwrap_or_default();
            gaps += check.gaps;
            duplicates += check.duplicates;
            if check.next != p.sent || check.gaps != 0 || check.duplicates != 0 {
                complete = false;
                problems.push(format!(
                    "{}: {} sent seq 0..{}, got up to {} with {} gaps and {} duplicates",
                    col.name, p.host, p.sent, check.next, check.gaps, check.duplicates
                ));
            }
        }
        if col.decode_errors != 0 {
            problems.push(format!(
                "{}: {} undecodable points",
                col.name, col.decode_errors
            ));
        }
        let agrees = reference.is_none_or(|r| r.gpus == col.gpus);
        if let (false, Some(r)) = (agrees, reference) {
            problems.push(format!(
                "{}: per-GPU aggregates differ from {}'s",
                col.name, r.name
            ));
        }
        rows.push(CollectorRow {
            name: col.name.clone(),
            received: col.received,
            hosts: col.hosts.len(),
            gpus: col.gpus.len(),
            gaps,
            duplicates,
            decode_errors: col.decode_errors,
            complete,
            agrees,
        });
    }
    rows
}

/// The group acknowledged every point, and no ack was refused.
fn check_workers(problems: &mut Vec<String>, workers: &[WorkerCounts], published: u64) {
    let acked: u64 = workers.iter().map(|w| w.acked).sum();
    if acked != published {
        problems.push(format!(
            "group {GROUP}: workers acked {} of {} points",
            thousands(acked),
            thousands(published)
        ));
    }
    let refused: u64 = workers.iter().map(|w| w.ack_errors).sum();
    if refused != 0 {
        problems.push(format!("group {GROUP}: {refused} acks refused"));
    }
    let undecodable: u64 = workers.iter().map(|w| w.decode_errors).sum();
    if undecodable != 0 {
        problems.push(format!("group {GROUP}: {undecodable} undecodable points"));
    }
}

impl Fleet {
    fn new(source: &CollectorOutcome, workers: &[WorkerCounts]) -> Fleet {
        let per_gpu: Vec<GpuRow> = source
            .gpus
            .iter()
            .map(|((host, gpu), a)| {
                let n = a.samples.max(1) as f64;
                GpuRow {
                    host: host.clone(),
                    gpu: *gpu,
                    samples: a.samples,
                    avg_utilization_pct: a.util_sum as f64 / n,
                    avg_temperature_c: a.temp_sum as f64 / n,
                    max_temperature_c: a.temp_max,
                    max_memory_used_mib: a.mem_max_mib,
                }
            })
            .collect();
        let samples: u64 = source.gpus.values().map(|a| a.samples).sum();
        let n = samples.max(1) as f64;
        let hot: BTreeSet<&(String, u32)> = workers.iter().flat_map(|w| &w.hot_gpus).collect();
        Fleet {
            source: source.name.clone(),
            hosts: source.hosts.len(),
            gpus: source.gpus.len(),
            mean_utilization_pct: source.gpus.values().map(|a| a.util_sum).sum::<u64>() as f64 / n,
            mean_temperature_c: source.gpus.values().map(|a| a.temp_sum).sum::<u64>() as f64 / n,
            alerts: workers.iter().map(|w| w.alerts).sum(),
            hot_gpus: hot
                .into_iter()
                .map(|(h, g)| format!("{h}/gpu{g}"))
                .collect(),
            per_gpu,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Formatting
// ---------------------------------------------------------------------------------------------

/// A rate with a k/M suffix: `950/s`, `20.0k/s`, `1.20M/s`.
fn per_sec(r: f64) -> String {
    if r >= 999_500.0 {
        format!("{:.2}M/s", r / 1e6)
    } else if r >= 999.5 {
        format!("{:.1}k/s", r / 1e3)
    } else {
        format!("{r:.0}/s")
    }
}

fn human_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 {
        format!("{s:.2}s")
    } else {
        format!("{:.1}ms", s * 1e3)
    }
}

/// The first `max` items, then how many more.
fn abbreviate(items: &[String], max: usize) -> String {
    let shown = items
        .iter()
        .take(max)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > max {
        format!("{shown}, +{} more", items.len() - max)
    } else {
        shown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(per_sec(0.0), "0/s");
        assert_eq!(per_sec(950.0), "950/s");
        assert_eq!(per_sec(20_000.0), "20.0k/s");
        assert_eq!(per_sec(1_204_000.0), "1.20M/s");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_secs("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_secs("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_secs("2s"), Ok(Duration::from_secs(2)));
        assert!(parse_secs("0").is_err());
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("nan").is_err());
        assert!(parse_secs("soon").is_err());
    }

    #[test]
    fn sequence_check_finds_gaps_and_duplicates() {
        let mut c = SeqCheck::default();
        for s in [0, 1, 2, 4, 4, 3, 5] {
            c.see(s);
        }
        assert_eq!(
            c,
            SeqCheck {
                next: 6,
                gaps: 1,
                duplicates: 2
            }
        );
    }

    #[test]
    fn simulation_is_deterministic_and_plausible() {
        let (mut a, mut b) = (HostSim::new(3), HostSim::new(3));
        for seq in 0..10_000 {
            let (p, q) = (a.point(seq), b.point(seq));
            assert_eq!(
                (p.gpu, p.utilization_pct, p.temperature_c),
                (q.gpu, q.utilization_pct, q.temperature_c)
            );
            assert_eq!(p.host, "gpu-node-03");
            assert!(p.gpu < GPUS_PER_HOST);
            assert!(p.utilization_pct <= 100);
            assert!((15..=110).contains(&p.temperature_c), "{p:?}");
            assert!(p.memory_used_mib <= p.memory_total_mib);
        }
    }

    fn sub_stats(assigned: u64, acked: u64, in_flight: u64, lag: u64) -> SubscriptionStats {
        SubscriptionStats {
            id: 7,
            name: "collector-1".into(),
            filter: FILTER.into(),
            group: false,
            members: 1,
            counters: ferry::CounterSnapshot {
                delivered: acked + in_flight,
                acked,
                ..Default::default()
            },
            in_flight,
            lag,
            assigned,
            idle: Duration::ZERO,
        }
    }

    #[test]
    fn unaccounted_records_are_a_mismatch() {
        let mut problems = Vec::new();
        let rows = check_subscriptions(&mut problems, vec![sub_stats(100, 90, 6, 4)], 100, 1);
        assert_eq!(rows[0].unaccounted, 0);
        assert!(problems.is_empty(), "{problems:?}");

        let rows = check_subscriptions(&mut problems, vec![sub_stats(100, 97, 2, 0)], 100, 1);
        assert_eq!(rows[0].unaccounted, 1);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("1 unaccounted"), "{problems:?}");

        problems.clear();
        check_subscriptions(&mut problems, vec![sub_stats(90, 90, 0, 0)], 100, 2);
        assert_eq!(
            problems.len(),
            2,
            "wrong count and short assignment: {problems:?}"
        );
    }

    #[test]
    fn broker_totals_are_checked() {
        let report = |drained, published, acked, dropped| ShutdownReport {
            drained,
            counters: ferry::CounterSnapshot {
                published,
                acked,
                dropped,
                ..Default::default()
            },
            dropped_at_close: 0,
            elapsed: Duration::ZERO,
        };
        let mut problems = Vec::new();
        check_broker(&mut problems, &report(true, 10, 20, 0), 10, 2);
        assert!(problems.is_empty(), "{problems:?}");
        // Nobody subscribed: every point is dropped, and that is expected.
        check_broker(&mut problems, &report(true, 10, 0, 10), 10, 0);
        assert!(problems.is_empty(), "{problems:?}");
        check_broker(&mut problems, &report(false, 10, 19, 1), 10, 2);
        assert_eq!(
            problems.len(),
            3,
            "not drained, dropped, short acks: {problems:?}"
        );
    }

    #[test]
    fn workers_must_ack_every_point() {
        let w = |acked, ack_errors| WorkerCounts {
            name: "worker-1".into(),
            acked,
            ack_errors,
            ..WorkerCounts::default()
        };
        let mut problems = Vec::new();
        check_workers(&mut problems, &[w(6, 0), w(4, 0)], 10);
        assert!(problems.is_empty(), "{problems:?}");
        check_workers(&mut problems, &[w(6, 1), w(3, 0)], 10);
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn points_round_trip_as_json() {
        let p = HostSim::new(0).point(7);
        let m = Message::json(&p).expect("encode");
        assert_eq!(m.decode::<GpuPoint>().expect("decode"), p);
    }
}
