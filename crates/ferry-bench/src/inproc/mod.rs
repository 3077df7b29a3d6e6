//! `inproc`: Ferry against in-process channels, side by side in one run.
//!
//! Scenarios (each with 100 B and 1 KiB payloads by default):
//! - `a-1p1s`: one producer, one subscriber;
//! - `b-4p5s-fanout`: four producers, five subscribers that each receive every message;
//! - `c-4p4c-group`: four producers, a group of four consumers that share the messages (each
//!   message goes to exactly one of them).
//!
//! Systems: `ferry` (a `Publisher` per producer, `Subscription::recv` in a loop), `tokio-broadcast`
//! (`tokio::sync::broadcast`; not run in the group scenario, which it cannot express), `flume`
//! (bounded async channels; fanout is one channel per subscriber, each producer sending a clone to
//! every channel; the group is one MPMC channel with four receivers) and `crossbeam` (the same
//! with bounded `crossbeam-channel`s, on OS threads since it blocks).
//!
//! Every async system runs on its own multi-threaded Tokio runtime with two worker threads, built
//! per run. Each measured run is preceded by an unmeasured warm-up run with a tenth of the
//! messages.

mod broadcast;
mod crossbeam;
mod ferry;
mod flume;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use clap::{Args as ClapArgs, ValueEnum};

use crate::measure::{load_average, process_cpu_time, template, Outcome, RunClock};
use crate::report::{Report, Row};

/// Options of `inproc`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Messages published per run, split evenly among the producers.
    #[arg(long, value_name = "N")]
    pub messages: Option<u64>,
    /// A smoke test that takes a few seconds (fewer messages, unless --messages is given).
    #[arg(long)]
    pub quick: bool,
    /// Scenarios to run.
    #[arg(long, value_delimiter = ',', default_values = ["a", "b", "c"])]
    pub scenarios: Vec<Scenario>,
    /// Systems to run (Ferry is needed for the ratio column).
    #[arg(
        long,
        value_delimiter = ',',
        default_values = ["ferry", "tokio-broadcast", "flume", "crossbeam"]
    )]
    pub systems: Vec<System>,
    /// Payload sizes in bytes (at least 8: the send timestamp).
    #[arg(long, value_delimiter = ',', default_values_t = [100, 1024])]
    pub payloads: Vec<usize>,
    /// Queue bound: Ferry's topic capacity and the bound of the flume and crossbeam channels.
    /// (tokio broadcast cannot apply backpressure; its ring holds a whole run instead.)
    #[arg(long, default_value_t = ::ferry::TopicConfig::default().capacity)]
    pub capacity: usize,
    /// Stamp one message in this many (per producer) with its send time for latency.
    #[arg(long, default_value_t = 16)]
    pub sample_every: u64,
    /// Skip the warm-up runs.
    #[arg(long)]
    pub no_warmup: bool,
    /// Measure each combination this many times, in rounds that alternate the systems, and
    /// report each system's run with the median throughput.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,
}

const DEFAULT_MESSAGES: u64 = 2_000_000;
const QUICK_MESSAGES: u64 = 20_000;

/// A benchmark scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum)]
pub enum Scenario {
    /// One producer, one subscriber.
    A,
    /// Four producers, five fanout subscribers.
    B,
    /// Four producers, a consumer group of four.
    C,
}

impl Scenario {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::A => "a-1p1s",
            Scenario::B => "b-4p5s-fanout",
            Scenario::C => "c-4p4c-group",
        }
    }

    fn shape(self) -> Shape {
        match self {
            Scenario::A => Shape {
                producers: 1,
                consumers: 1,
                group: false,
            },
            Scenario::B => Shape {
                producers: 4,
                consumers: 5,
                group: false,
            },
            Scenario::C => Shape {
                producers: 4,
                consumers: 4,
                group: true,
            },
        }
    }
}

/// A system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum)]
pub enum System {
    /// The Ferry broker.
    Ferry,
    /// `tokio::sync::broadcast`.
    TokioBroadcast,
    /// Bounded `flume` channels (async API).
    Flume,
    /// Bounded `crossbeam-channel`s (blocking API, OS threads).
    Crossbeam,
}

impl fmt::Display for System {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            System::Ferry => "ferry",
            System::TokioBroadcast => "tokio-broadcast",
            System::Flume => "flume",
            System::Crossbeam => "crossbeam",
        })
    }
}

impl System {
    /// How this system implements `scenario`, or why it does not.
    fn plan(self, scenario: Scenario) -> Plan {
        let shape = scenario.shape();
        match (self, shape.group, shape.consumers) {
            (System::TokioBroadcast, true, _) => Plan::Skip(
                "skipped: broadcast delivers every message to every receiver, \
                 it has no consumer groups",
            ),
            (System::Flume | System::Crossbeam, false, n) if n > 1 => Plan::Run(Some(
                "one channel per subscriber, producers send a clone to each",
            )),
            (System::Flume | System::Crossbeam, true, _) => {
                Plan::Run(Some("one MPMC channel, receivers compete"))
            }
            (System::TokioBroadcast, false, _) => Plan::Run(Some(
                "ring sized to the whole run (no backpressure, no lag)",
            )),
            _ => Plan::Run(None),
        }
    }
}

enum Plan {
    Run(Option<&'static str>),
    Skip(&'static str),
}

/// Producers and consumers of a scenario.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Producer tasks.
    pub producers: usize,
    /// Subscribers (fanout) or group members.
    pub consumers: usize,
    /// Whether the consumers share the messages (a group) or each receive all of them.
    pub group: bool,
}

/// Everything one run needs.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Producers and consumers.
    pub shape: Shape,
    /// Messages each producer publishes.
    pub per_producer: u64,
    /// The payload template (its length is the payload size).
    pub template: &'static [u8],
    /// Queue bound (see [`Args::capacity`]).
    pub capacity: usize,
    /// Stamp one message in this many.
    pub sample_every: u64,
}

impl RunSpec {
    /// Messages published in the run.
    pub fn published(&self) -> u64 {
        self.per_producer * self.shape.producers as u64
    }

    /// Deliveries expected in the run.
    pub fn expected(&self) -> u64 {
        if self.shape.group {
            self.published()
        } else {
            self.published() * self.shape.consumers as u64
        }
    }
}

/// Runs `inproc` and prints its report.
pub fn run(args: &Args) -> Result<()> {
    let messages = match (args.messages, args.quick) {
        (Some(n), _) => n,
        (None, true) => QUICK_MESSAGES,
        (None, false) => DEFAULT_MESSAGES,
    };
    if args.capacity == 0 {
        bail!("--capacity must be at least 1");
    }
    if let Some(p) = args.payloads.iter().find(|p| **p < 8) {
        bail!("payload size {p} is too small: the first 8 bytes carry the send timestamp");
    }
    let templates: HashMap<usize, &'static [u8]> =
        args.payloads.iter().map(|&p| (p, template(p))).collect();
    if let Some(load) = load_average().filter(|l| *l >= 1.0) {
        eprintln!(
            "note: load average {load:.2} before starting: other processes compete for the CPUs, \
             throughput will be lower and noisier (the cpu ns column is less affected)"
        );
    }
    let mut report = Report::new(args.json);
    for &scenario in &args.scenarios {
        let shape = scenario.shape();
        let per_producer = (messages / shape.producers as u64).max(1);
        for &payload in &args.payloads {
            let template = templates.get(&payload).copied().unwrap_or_default();
            let spec = RunSpec {
                shape,
                per_producer,
                template,
                capacity: args.capacity,
                sample_every: args.sample_every,
            };
            // Warm every system up, then interleave the measured runs (system after system, round
            // after round), so that a slow phase of this noisy machine hits every system alike
            // and the ratios stay meaningful; each system reports its median run.
            let mut planned: Vec<_> = args
                .systems
                .iter()
                .map(|&system| (system, system.plan(scenario), Vec::new()))
                .collect();
            if !args.no_warmup {
                let warm = RunSpec {
                    per_producer: (per_producer / 10).max(1),
                    ..spec.clone()
                };
                for (system, plan, _) in &planned {
                    if let Plan::Run(_) = plan {
                        run_one(*system, &warm).with_context(|| {
                            format!("warm-up of {system} in {}", scenario.name())
                        })?;
                    }
                }
            }
            for round in 0..args.repeat {
                for (system, plan, runs) in &mut planned {
                    if let Plan::Skip(_) = plan {
                        continue;
                    }
                    eprintln!(
                        "running {} {system} {payload} B ({} messages, round {})",
                        scenario.name(),
                        spec.published(),
                        round + 1
                    );
                    runs.push(run_one(*system, &spec).with_context(|| {
                        format!("{system} in {} with {payload} B", scenario.name())
                    })?);
                }
            }
            for (system, plan, mut runs) in planned {
                let note = match plan {
                    Plan::Skip(why) => {
                        report.skip(scenario.name(), system, payload, why);
                        continue;
                    }
                    Plan::Run(note) => note,
                };
                runs.sort_by(|x, y| x.msgs_per_s().total_cmp(&y.msgs_per_s()));
                let outcome = runs.swap_remove(runs.len() / 2);
                report.row(Row::new(
                    scenario.name(),
                    system,
                    payload,
                    &spec,
                    &outcome,
                    note,
                ))?;
            }
        }
    }
    report.finish()
}

/// Runs one system once, measuring the process's CPU time too.
fn run_one(system: System, spec: &RunSpec) -> Result<Outcome> {
    let before = process_cpu_time();
    let mut outcome = run_system(system, spec)?;
    outcome.cpu = before
        .zip(process_cpu_time())
        .map(|(before, after)| after.saturating_sub(before));
    Ok(outcome)
}

fn run_system(system: System, spec: &RunSpec) -> Result<Outcome> {
    let clock = RunClock::new(spec.shape.producers);
    if system == System::Crossbeam {
        return crossbeam::run(spec, clock);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the Tokio runtime")?;
    runtime.block_on(async {
        match system {
            System::Ferry => ferry::run(spec, clock).await,
            System::TokioBroadcast => broadcast::run(spec, clock).await,
            System::Flume => flume::run(spec, clock).await,
            System::Crossbeam => crossbeam::run(spec, clock),
        }
    })
}

/// The senders every producer writes to and the receiver of each consumer: one channel per
/// consumer for fanout, one shared channel for a group.
fn topology<S, R: Clone>(shape: Shape, channel: impl Fn() -> (S, R)) -> (Vec<S>, Vec<R>) {
    if shape.group {
        let (tx, rx) = channel();
        (vec![tx], vec![rx; shape.consumers])
    } else {
        (0..shape.consumers).map(|_| channel()).unzip()
    }
}

/// Awaits spawned tasks in order, returning their results.
async fn join_all<T>(handles: Vec<tokio::task::JoinHandle<Result<T>>>) -> Result<Vec<T>> {
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.context("a benchmark task panicked")??);
    }
    Ok(out)
}

/// A clock shared with the tasks of one run.
type Clock = Arc<RunClock>;

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::ensure;

    /// Every system delivers every message exactly as the scenario says (no timing is checked).
    #[test]
    fn every_system_delivers_everything() -> Result<()> {
        for scenario in [Scenario::A, Scenario::B, Scenario::C] {
            for system in [
                System::Ferry,
                System::TokioBroadcast,
                System::Flume,
                System::Crossbeam,
            ] {
                if let Plan::Skip(_) = system.plan(scenario) {
                    continue;
                }
                let spec = RunSpec {
                    shape: scenario.shape(),
                    per_producer: 2_000,
                    template: template(100),
                    capacity: 64,
                    sample_every: 4,
                };
                let outcome = run_one(system, &spec)?;
                ensure!(
                    outcome.delivered == spec.expected() && outcome.lost == 0,
                    "{system} in {}: delivered {} of {}, lost {}",
                    scenario.name(),
                    outcome.delivered,
                    spec.expected(),
                    outcome.lost
                );
                ensure!(!outcome.latency.is_empty(), "{system}: no latency samples");
            }
        }
        Ok(())
    }
}
