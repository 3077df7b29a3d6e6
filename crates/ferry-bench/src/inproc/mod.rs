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
//! Delivery-control scenarios, Ferry only (see [`control`]):
//! - `d-priority-3`: one producer, one subscriber; priorities cycling over Low/Normal/High vs all
//!   at the default level;
//! - `e-delayed`: a million messages delayed by up to 10 s; lateness and scheduler memory;
//! - `f-tx-10`: one producer, one subscriber; transactions of 10 messages vs batches of 10.
//!
//! Every async system runs on its own multi-threaded Tokio runtime with two worker threads, built
//! per run. Each measured run is preceded by an unmeasured warm-up run with a tenth of the
//! messages (except in `e-delayed`).

mod broadcast;
mod control;
mod crossbeam;
mod ferry;
mod flume;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Args as ClapArgs, ValueEnum};

use self::ferry::Mode;
use crate::measure::{block_on, cpu_time, load_average, median_by, template, Outcome, RunClock};
use crate::report::{Report, Row, Table};

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
    #[arg(long, value_delimiter = ',', default_values = ["a", "b", "c", "d", "e", "f"])]
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
    /// Scenario e: delayed messages to publish (default 1,000,000; 100,000 with --quick).
    #[arg(long, value_name = "N")]
    pub delayed_messages: Option<u64>,
    /// Scenario e: the delivery times are spread over this many seconds after each publish
    /// (default 10; 2 with --quick).
    #[arg(long, value_name = "SECONDS")]
    pub delay_window: Option<f64>,
}

/// The table of `inproc`.
const TABLE: Table = Table {
    rate: "msgs/s",
    producers: false,
    ratio: true,
    after_rate: &[],
    after_latency: &[],
    legend: "msgs/s: deliveries summed over consumers / wall time from first publish to last \
             delivery.\nLatency: publish -> delivery under full load (queueing included), sampled \
             (one message in N per producer carries its send time).\nferry/x: Ferry's msgs/s \
             divided by this row's (same scenario and payload).\ncpu ns: process CPU time (all \
             threads, 10 ms resolution) per delivery; unlike msgs/s it does not depend on how \
             much CPU other processes leave.\nd-f: Ferry only, scenario figures in the notes \
             (see the README); in e-delayed the latency columns are the lateness, receive time - \
             deliver_at.",
};

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
    /// Ferry only: priorities cycling over 3 levels vs all at the default level (1p1s).
    D,
    /// Ferry only: delayed messages spread over a window, lateness and scheduler memory.
    E,
    /// Ferry only: transactions of 10 messages vs batches of 10 (1p1s).
    F,
}

impl Scenario {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::A => "a-1p1s",
            Scenario::B => "b-4p5s-fanout",
            Scenario::C => "c-4p4c-group",
            Scenario::D => "d-priority-3",
            Scenario::E => "e-delayed",
            Scenario::F => "f-tx-10",
        }
    }

    /// Producers and consumers of the scenario.
    pub fn shape(self) -> Shape {
        match self {
            Scenario::A | Scenario::D | Scenario::E | Scenario::F => Shape {
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

/// Whether a contender runs a scenario.
pub enum Plan {
    /// It does, with a note on how when that needs saying.
    Run(Option<&'static str>),
    /// It does not, and why.
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
    if let Some(load) = load_average().filter(|l| *l >= 1.0) {
        eprintln!(
            "note: load average {load:.2} before starting: other processes compete for the CPUs, \
             throughput will be lower and noisier (the cpu ns column is less affected)"
        );
    }
    let mut bench = Bench {
        args,
        messages,
        templates: args.payloads.iter().map(|&p| (p, template(p))).collect(),
        report: Report::new(args.json, TABLE),
    };
    for &scenario in &args.scenarios {
        match scenario {
            Scenario::A | Scenario::B | Scenario::C => bench.compare_systems(scenario)?,
            Scenario::D => control::priority_mix(&mut bench)?,
            Scenario::E => control::delayed(&mut bench)?,
            Scenario::F => control::transactions(&mut bench)?,
        }
    }
    bench.report.finish()
}

/// One way of running a scenario's workload: a system, or a way of using Ferry's API.
pub struct Contender<'a> {
    /// The `system` column.
    pub name: String,
    /// Whether and how it runs the scenario.
    pub plan: Plan,
    /// Runs the workload once.
    pub run: RunFn<'a>,
}

/// Runs a workload once.
pub type RunFn<'a> = Box<dyn Fn(&RunSpec) -> Result<Outcome> + 'a>;

impl Contender<'static> {
    /// Ferry publishing in `mode`.
    pub fn ferry(name: &str, mode: Mode, note: Option<&'static str>) -> Self {
        Contender {
            name: name.to_string(),
            plan: Plan::Run(note),
            run: Box::new(move |spec| run_ferry(spec, mode)),
        }
    }
}

/// A contender's result: its median row, or why it was not run.
pub enum Measured {
    /// Measured.
    Row(Box<Row>),
    /// Not run (system, why).
    Skipped(String, &'static str),
}

/// A run of `inproc`: the options and the report being built.
pub struct Bench<'a> {
    /// The options.
    pub args: &'a Args,
    /// Messages per run of the throughput scenarios.
    pub messages: u64,
    templates: HashMap<usize, &'static [u8]>,
    /// Where rows go.
    pub report: Report,
}

impl Bench<'_> {
    /// The spec of a run of `shape` with `per_producer` messages and `payload`-byte payloads.
    pub fn spec(&self, shape: Shape, per_producer: u64, payload: usize) -> RunSpec {
        RunSpec {
            shape,
            per_producer,
            template: self.templates.get(&payload).copied().unwrap_or_default(),
            capacity: self.args.capacity,
            sample_every: self.args.sample_every,
        }
    }

    /// Whether Ferry is among `--systems` (the delivery-control scenarios only run Ferry);
    /// records `scenario` with `payloads` as skipped if not.
    pub fn wants_ferry(&mut self, scenario: Scenario, payloads: &[usize]) -> bool {
        let wanted = self.args.systems.contains(&System::Ferry);
        if !wanted {
            for &payload in payloads {
                self.report.skip(
                    scenario.name(),
                    System::Ferry,
                    payload,
                    "ferry not in --systems",
                );
            }
        }
        wanted
    }

    /// Scenarios a-c: every system of `--systems`, for each payload.
    fn compare_systems(&mut self, scenario: Scenario) -> Result<()> {
        let shape = scenario.shape();
        let per_producer = (self.messages / shape.producers as u64).max(1);
        for &payload in &self.args.payloads {
            let spec = self.spec(shape, per_producer, payload);
            let contenders = self
                .args
                .systems
                .iter()
                .map(|&system| Contender {
                    name: system.to_string(),
                    plan: system.plan(scenario),
                    run: Box::new(move |spec| run_one(system, spec)),
                })
                .collect();
            let measured = self.measure(scenario, &spec, contenders)?;
            self.add(scenario, payload, measured)?;
        }
        Ok(())
    }

    /// Measures each contender on `spec`: an unmeasured warm-up with a tenth of the messages
    /// (unless `--no-warmup`), then `--repeat` rounds that alternate the contenders, so that a
    /// slow phase of this noisy machine hits every contender alike and the ratios stay
    /// meaningful; each contender reports its median-throughput run.
    pub fn measure(
        &self,
        scenario: Scenario,
        spec: &RunSpec,
        contenders: Vec<Contender<'_>>,
    ) -> Result<Vec<Measured>> {
        let payload = spec.template.len();
        let mut planned: Vec<_> = contenders.into_iter().map(|c| (c, Vec::new())).collect();
        if !self.args.no_warmup {
            let warm = RunSpec {
                per_producer: (spec.per_producer / 10).max(1),
                ..spec.clone()
            };
            for (c, _) in &planned {
                if let Plan::Run(_) = c.plan {
                    (c.run)(&warm)
                        .with_context(|| format!("warm-up of {} in {}", c.name, scenario.name()))?;
                }
            }
        }
        for round in 0..self.args.repeat {
            for (c, runs) in &mut planned {
                if let Plan::Skip(_) = c.plan {
                    continue;
                }
                eprintln!(
                    "running {} {} {payload} B ({} messages, round {})",
                    scenario.name(),
                    c.name,
                    spec.published(),
                    round + 1
                );
                runs.push((c.run)(spec).with_context(|| {
                    format!("{} in {} with {payload} B", c.name, scenario.name())
                })?);
            }
        }
        planned
            .into_iter()
            .map(|(c, runs)| match c.plan {
                Plan::Skip(why) => Ok(Measured::Skipped(c.name, why)),
                Plan::Run(note) => {
                    let outcome = median_by(runs, Outcome::msgs_per_s)
                        .ok_or_else(|| anyhow!("{} was not run", c.name))?;
                    Ok(Measured::Row(Box::new(Row::new(
                        scenario.name(),
                        c.name,
                        payload,
                        spec,
                        &outcome,
                        note,
                    ))))
                }
            })
            .collect()
    }

    /// Adds measured rows (and skips) to the report, in order.
    pub fn add(
        &mut self,
        scenario: Scenario,
        payload: usize,
        measured: Vec<Measured>,
    ) -> Result<()> {
        for m in measured {
            match m {
                Measured::Row(row) => self.report.row(*row)?,
                Measured::Skipped(system, why) => {
                    self.report.skip(scenario.name(), system, payload, why)
                }
            }
        }
        Ok(())
    }
}

/// Runs one system once (Ferry as in scenarios a-c), measuring the process's CPU time too.
fn run_one(system: System, spec: &RunSpec) -> Result<Outcome> {
    let clock = RunClock::new(spec.shape.producers);
    cpu_timed(|| match system {
        System::Crossbeam => crossbeam::run(spec, clock),
        System::Ferry => block_on(ferry::run(spec, clock, Mode::Plain)),
        System::TokioBroadcast => block_on(broadcast::run(spec, clock)),
        System::Flume => block_on(flume::run(spec, clock)),
    })
}

/// Runs Ferry once, publishing in `mode`, measuring the process's CPU time too.
pub fn run_ferry(spec: &RunSpec, mode: Mode) -> Result<Outcome> {
    let clock = RunClock::new(spec.shape.producers);
    cpu_timed(|| block_on(ferry::run(spec, clock, mode)))
}

/// Runs `f`, setting the CPU time the whole process used meanwhile on its outcome.
fn cpu_timed(f: impl FnOnce() -> Result<Outcome>) -> Result<Outcome> {
    let (mut outcome, cpu) = cpu_time(f)?;
    outcome.cpu = cpu;
    Ok(outcome)
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

    /// Ferry delivers every message exactly once however it publishes (a small capacity makes
    /// transaction commits meet a full topic).
    #[test]
    fn ferry_delivers_exactly_once_in_every_mode() -> Result<()> {
        use ::ferry::Priority;
        for mode in [
            Mode::Priorities(&[Priority::Low, Priority::Normal, Priority::High]),
            Mode::Batch(10),
            Mode::Transaction(10),
        ] {
            let spec = RunSpec {
                shape: Scenario::D.shape(),
                per_producer: 2_005,
                template: template(100),
                capacity: 64,
                sample_every: 4,
            };
            let outcome = run_ferry(&spec, mode)?;
            ensure!(
                outcome.delivered == spec.expected() && outcome.duplicates == Some(0),
                "{mode:?}: delivered {} of {}, duplicates {:?}",
                outcome.delivered,
                spec.expected(),
                outcome.duplicates
            );
            ensure!(!outcome.latency.is_empty(), "{mode:?}: no latency samples");
        }
        Ok(())
    }
}
