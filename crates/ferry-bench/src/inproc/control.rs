//! Delivery control, Ferry only: what priorities, delayed delivery and transactions cost.
//!
//! - `d-priority-3`: one producer, one subscriber. `ferry-plain` publishes every message at the
//!   default priority (the topic stays unprioritized), `ferry-priority` cycles over Low, Normal
//!   and High (the subscriber then reads ahead into priority lanes); both build their messages
//!   with `Message::builder()`, so the priority is the only difference. The priority row adds
//!   `vs_plain`, its msgs/s over the plain row's.
//! - `e-delayed`: one subscriber; a million messages (published in batches of 1,000 as fast as
//!   possible), each delayed by a uniformly random time under 10 s from its publication. Reports
//!   the lateness (receive time - `deliver_at`) in the latency columns, the publish rate, and the
//!   resident memory per message pending in the scheduler.
//! - `f-tx-10`: one producer, one subscriber. `ferry-tx` publishes in transactions of 10
//!   messages (`begin`, 10 `Transaction::publish`, `commit`), `ferry-batch` in batches of 10
//!   (`Publisher::publish_batch`) for reference. The transaction row adds `tx_per_s` and
//!   `vs_batch`, its msgs/s over the batch row's.
//!
//! Every subscriber checks that it receives each offset exactly once; the report fails if any is
//! missing or duplicated.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use ferry::{Broker, Message, Priority, TopicConfig};
use hdrhistogram::Histogram;

use super::ferry::{Mode, TOPIC};
use super::{Bench, Contender, Measured, RunSpec, Scenario};
use crate::measure::{block_on, chunks, cpu_time, resident_bytes, ExactlyOnce, Outcome};
use crate::report::{Extra, Row};

/// The priority levels of `ferry-priority`, cycled over.
const PRIORITY_MIX: &[Priority] = &[Priority::Low, Priority::Normal, Priority::High];
/// Messages per transaction (and per batch).
const TX_SIZE: u64 = 10;
/// Messages per `publish_batch` in `e-delayed`.
const DELAYED_BATCH: u64 = 1_000;
/// How long `e-delayed` waits, after the last delivery time, for the last delivery.
const DELAYED_GRACE: Duration = Duration::from_secs(60);
/// The largest lateness tracked, in microseconds (larger values are clamped).
const MAX_LATENESS_US: u64 = 3_600_000_000;

/// `d-priority-3`: priorities cycling over three levels vs all at the default one.
pub fn priority_mix(bench: &mut Bench<'_>) -> Result<()> {
    versus(
        bench,
        Scenario::D,
        || {
            [
                Contender::ferry(
                    "ferry-plain",
                    Mode::Priorities(&[Priority::Normal]),
                    Some("all at the default priority"),
                ),
                Contender::ferry(
                    "ferry-priority",
                    Mode::Priorities(PRIORITY_MIX),
                    Some("priorities cycle Low, Normal, High"),
                ),
            ]
        },
        "vs_plain",
        |_| {},
    )
}

/// `f-tx-10`: transactions of 10 messages vs batches of 10.
pub fn transactions(bench: &mut Bench<'_>) -> Result<()> {
    versus(
        bench,
        Scenario::F,
        || {
            [
                Contender::ferry(
                    "ferry-batch",
                    Mode::Batch(TX_SIZE),
                    Some("publish_batch of 10"),
                ),
                Contender::ferry(
                    "ferry-tx",
                    Mode::Transaction(TX_SIZE),
                    Some("begin, 10 publishes, commit"),
                ),
            ]
        },
        "vs_batch",
        |tx| {
            let per_s = tx.msgs_per_s as f64 / TX_SIZE as f64;
            tx.add("tx_per_s", Extra::Count(per_s.round() as u64));
        },
    )
}

/// Measures a subject against a reference (the second and first of `contenders`), 1p1s with
/// `--messages` messages, for each payload. The subject's row gets `ratio` (its msgs/s over the
/// reference's) and whatever `extra` adds.
fn versus(
    bench: &mut Bench<'_>,
    scenario: Scenario,
    contenders: impl Fn() -> [Contender<'static>; 2],
    ratio: &'static str,
    extra: impl Fn(&mut Row),
) -> Result<()> {
    let args = bench.args;
    if !bench.wants_ferry(scenario, &args.payloads) {
        return Ok(());
    }
    for &payload in &args.payloads {
        let spec = bench.spec(scenario.shape(), bench.messages, payload);
        let mut measured = bench.measure(scenario, &spec, contenders().into())?;
        if let [Measured::Row(reference), Measured::Row(subject)] = &mut measured[..] {
            if reference.msgs_per_s > 0 {
                let r = subject.msgs_per_s as f64 / reference.msgs_per_s as f64;
                subject.add(ratio, Extra::Value(r));
            }
            extra(subject);
        }
        bench.add(scenario, payload, measured)?;
    }
    Ok(())
}

/// `e-delayed`: delayed messages spread over a window; lateness and scheduler memory. Runs once,
/// with the first payload size (payloads are shared, so their size costs nothing per message).
pub fn delayed(bench: &mut Bench<'_>) -> Result<()> {
    let scenario = Scenario::E;
    let args = bench.args;
    let payload = args.payloads.first().copied().unwrap_or(100);
    if !bench.wants_ferry(scenario, &[payload]) {
        return Ok(());
    }
    let (default_n, default_window) = if args.quick {
        (100_000, 2.0)
    } else {
        (1_000_000, 10.0)
    };
    let n = args.delayed_messages.unwrap_or(default_n).max(1);
    let window = Duration::try_from_secs_f64(args.delay_window.unwrap_or(default_window))
        .context("--delay-window")?;
    let spec = bench.spec(scenario.shape(), n, payload);
    eprintln!(
        "running {} ferry {payload} B ({n} messages delayed by up to {window:?})",
        scenario.name()
    );
    let ((mut outcome, run), cpu) = cpu_time(|| block_on(run_delayed(&spec, window)))
        .with_context(|| format!("ferry in {}", scenario.name()))?;
    outcome.cpu = cpu;

    let mut row = Row::new(scenario.name(), "ferry", payload, &spec, &outcome, None);
    row.set_latency_us(&run.lateness_us);
    let secs = run.publish.as_secs_f64();
    if secs > 0.0 {
        row.add("publish_msgs_per_s", Extra::Value(n as f64 / secs));
    }
    row.add("lateness_max_us", Extra::Count(run.lateness_us.max()));
    if run.early > 0 {
        row.add("early", Extra::Count(run.early));
    }
    row.add("pending_at_peak", Extra::Count(run.pending));
    if let Some((before, peak)) = run.rss_before.zip(run.rss_peak) {
        let growth = peak.saturating_sub(before);
        row.add("rss_growth_bytes", Extra::Count(growth));
        if run.pending > 0 {
            row.add(
                "bytes_per_pending",
                Extra::Value(growth as f64 / run.pending as f64),
            );
        }
    }
    bench.report.row(row)
}

/// What `e-delayed` measured besides the [`Outcome`].
struct DelayedRun {
    /// Receive time - `deliver_at` of every delivery, in microseconds.
    lateness_us: Histogram<u64>,
    /// Deliveries received before their `deliver_at` (recorded as 0 lateness).
    early: u64,
    /// From the first publish to the last.
    publish: Duration,
    /// Resident memory before publishing.
    rss_before: Option<u64>,
    /// Resident memory once everything is published and the subscriber has taken every record
    /// into its scheduler.
    rss_peak: Option<u64>,
    /// Messages waiting in the scheduler at that point.
    pending: u64,
}

/// Publishes `spec.published()` messages, each delayed by a uniformly random time under
/// `window` from its own timestamp, to one subscriber that receives them all.
async fn run_delayed(spec: &RunSpec, window: Duration) -> Result<(Outcome, DelayedRun)> {
    let n = spec.published();
    let broker = Broker::default();
    // A delayed record holds its place in the topic until it is delivered: the topic must hold
    // every one of them, or publishing would wait for the first delivery times.
    let capacity = spec.capacity.max(usize::try_from(n)?);
    broker.create_topic(
        TOPIC,
        TopicConfig {
            capacity,
            ..TopicConfig::default()
        },
    )?;
    let mut sub = broker.subscribe(TOPIC)?;
    let deadline = tokio::time::Instant::now() + window + DELAYED_GRACE;
    let consumer = tokio::spawn(async move {
        let mut once = ExactlyOnce::new(n);
        let mut lateness = Histogram::<u64>::new_with_bounds(1, MAX_LATENESS_US, 3)
            .context("creating the lateness histogram")?;
        let (mut delivered, mut early, mut last) = (0u64, 0u64, None);
        while delivered - once.duplicates() < n {
            let Ok(Ok(d)) = tokio::time::timeout_at(deadline, sub.recv()).await else {
                break;
            };
            let now = SystemTime::now();
            let Some(at) = d.deliver_at() else {
                bail!(
                    "offset {} was delivered without a delivery time",
                    d.offset()
                );
            };
            let late = now.duration_since(at).unwrap_or_else(|_| {
                early += 1;
                Duration::ZERO
            });
            lateness.saturating_record(u64::try_from(late.as_micros()).unwrap_or(u64::MAX));
            once.observe(d.offset());
            delivered += 1;
            last = Some(Instant::now());
        }
        Ok((delivered, once.duplicates(), early, last, lateness))
    });

    let publisher = broker.publisher(TOPIC)?;
    let payload = Bytes::from_static(spec.template);
    let window_ns = u64::try_from(window.as_nanos())?.max(1);
    let mut rng = SplitMix64(0x5eed_f0e1_1a7e_d00d);
    let rss_before = resident_bytes();
    let first = Instant::now();
    for len in chunks(n, DELAYED_BATCH) {
        let batch = (0..len).map(|_| {
            Message::builder()
                .payload(payload.clone())
                .delay(Duration::from_nanos(rng.next() % window_ns))
                .build()
        });
        publisher.publish_batch(batch).await?;
    }
    let publish = first.elapsed();
    // The peak: wait until the subscriber has read every record into its scheduler (at most
    // a few seconds), then count what is pending there.
    let settle_by = Instant::now() + Duration::from_secs(5);
    let pending = loop {
        let stats = broker.subscription_stats();
        if stats.iter().all(|s| s.lag == 0) || Instant::now() >= settle_by {
            break stats.iter().map(|s| s.in_flight).sum();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let rss_peak = resident_bytes();

    let (delivered, duplicates, early, last, lateness_us) =
        consumer.await.context("the subscriber panicked")??;
    broker.shutdown(Duration::from_secs(5)).await;
    let wall = last.map_or(Duration::ZERO, |l| l.saturating_duration_since(first));
    let outcome = Outcome::without_latency(delivered, Some(duplicates), wall)?;
    Ok((
        outcome,
        DelayedRun {
            lateness_us,
            early,
            publish,
            rss_before,
            rss_peak,
            pending,
        },
    ))
}

/// A small, fast pseudo-random generator (SplitMix64), so that runs are reproducible.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::measure::template;
    use anyhow::ensure;

    /// Every delayed message arrives exactly once, with a lateness sample each.
    #[test]
    fn every_delayed_message_arrives_once() -> Result<()> {
        let spec = RunSpec {
            shape: Scenario::E.shape(),
            per_producer: 3_000,
            template: template(100),
            capacity: 64,
            sample_every: 16,
        };
        let (outcome, run) = block_on(run_delayed(&spec, Duration::from_millis(300)))?;
        ensure!(
            outcome.delivered == 3_000 && outcome.duplicates == Some(0),
            "delivered {}, duplicates {:?}",
            outcome.delivered,
            outcome.duplicates
        );
        ensure!(
            run.lateness_us.len() == 3_000,
            "{} lateness samples",
            run.lateness_us.len()
        );
        ensure!(run.pending <= 3_000, "{} pending", run.pending);
        Ok(())
    }
}
