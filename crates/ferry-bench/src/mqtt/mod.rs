//! `mqtt`: Ferry's MQTT server against Mosquitto, over loopback, in the same run.
//!
//! Both brokers run as child processes (so that their resident memory can be compared): the
//! `ferry` binary (`ferry serve --memory --no-http`) and the system's `mosquitto`, each on a free
//! loopback port, a fresh process for every run. The load generator is this process, the same
//! for both brokers: a lean MQTT 3.1.1 client of its own (a raw `TcpStream` and the workspace's
//! `ferry-mqtt` codec, PUBLISHes written many per system call) on a multi-threaded Tokio
//! runtime, one task per connection (see [`load`]); the idle connections connect the same way
//! and then keep only their socket, with no task (see [`idle`]).
//!
//! Scenarios, each at QoS 0 and QoS 1 with 100 B payloads: `fan-in` (8 publishers, a topic
//! each -> 1 subscriber to `+`), `fan-out` (1 publisher -> 50 subscribers), `shared` (8
//! publishers -> 8 subscribers of one shared subscription); and `idle` (10,000 connections that
//! only connect: the broker's RSS per connection). Ferry and Mosquitto alternate within each
//! scenario (and each round, with `--repeat`).

mod brokers;
mod idle;
mod load;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::{Args as ClapArgs, ValueEnum};
use ferry_mqtt::QoS;

use crate::measure::{load_average, median_by, Outcome};
use crate::report::{Counts, Extra, ExtraColumn, Report, Row, Table};
use brokers::{BrokerProcess, Kind};
use load::{LoadResult, LoadSpec, Shape};

/// Options of `mqtt`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// A smoke test (under a minute): 1 s runs, 1,000 idle connections.
    #[arg(long)]
    pub quick: bool,
    /// Scenarios to run.
    #[arg(long, value_delimiter = ',', default_values = ["fan-in", "fan-out", "shared", "idle"])]
    pub scenarios: Vec<Scenario>,
    /// Brokers to measure.
    #[arg(long, value_delimiter = ',', default_values = ["ferry", "ferry-durable", "mosquitto"])]
    pub systems: Vec<Kind>,
    /// QoS levels of the throughput scenarios.
    #[arg(long, value_delimiter = ',', default_values_t = [0u8, 1], value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: Vec<u8>,
    /// Payload size in bytes (at least 21: the header carrying the send time and sequence).
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Seconds each throughput run publishes for, after the warm-up (default 5; 1 with --quick).
    #[arg(long, value_name = "SECONDS")]
    pub seconds: Option<f64>,
    /// Seconds of unmeasured warm-up before each run (default 1; 0.3 with --quick).
    #[arg(long, value_name = "SECONDS")]
    pub warmup: Option<f64>,
    /// Most undelivered messages per publisher (0: no limit): publishers pause when this many
    /// of their messages have not reached every subscriber yet.
    #[arg(long, default_value_t = 100)]
    pub window: u64,
    /// Idle connections of the `idle` scenario (default 10,000; 1,000 with --quick).
    #[arg(long, value_name = "N")]
    pub idle_connections: Option<usize>,
    /// Measure each run this many times, in rounds that alternate the brokers, and report the
    /// median.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,
    /// Worker threads of the load generator's Tokio runtime.
    #[arg(long, default_value_t = 2)]
    pub client_threads: usize,
    /// The `ferry` binary (default: next to this executable; build it with `cargo build
    /// --release -p ferry-server`).
    #[arg(long, value_name = "PATH")]
    pub ferry_bin: Option<PathBuf>,
    /// The `mosquitto` binary.
    #[arg(long, value_name = "PATH", default_value = "/usr/sbin/mosquitto")]
    pub mosquitto_bin: PathBuf,
}

/// A scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// 8 publishers (a topic each) -> 1 subscriber (`bench/fan-in/+`).
    FanIn,
    /// 1 publisher -> 50 subscribers of its topic.
    FanOut,
    /// 8 publishers -> 8 subscribers sharing one subscription (`$share/bench/bench/shared`).
    Shared,
    /// Idle connections: broker RSS per connection.
    Idle,
}

impl Scenario {
    fn shape(self) -> Option<Shape> {
        let s = |publishers, subscribers, fanout, shared, per_pub, topic| Shape {
            publishers,
            subscribers,
            fanout,
            shared,
            topic_per_publisher: per_pub,
            topic,
        };
        match self {
            Scenario::FanIn => Some(s(8, 1, 1, false, true, "bench/fan-in")),
            Scenario::FanOut => Some(s(1, 50, 50, false, false, "bench/fan-out")),
            Scenario::Shared => Some(s(8, 8, 1, true, false, "bench/shared")),
            Scenario::Idle => None,
        }
    }

    /// The name of the scenario at `qos` in reports.
    fn name(self, qos: u8) -> &'static str {
        match (self, qos) {
            (Scenario::FanIn, 0) => "fan-in-8:1/q0",
            (Scenario::FanIn, _) => "fan-in-8:1/q1",
            (Scenario::FanOut, 0) => "fan-out-1:50/q0",
            (Scenario::FanOut, _) => "fan-out-1:50/q1",
            (Scenario::Shared, 0) => "shared-8:8/q0",
            (Scenario::Shared, _) => "shared-8:8/q1",
            (Scenario::Idle, _) => "idle",
        }
    }
}

/// The table of `mqtt`.
const TABLE: Table = Table {
    rate: "msgs/s",
    producers: false,
    ratio: true,
    after_rate: &[],
    after_latency: &[
        ExtraColumn {
            title: "RSS MiB",
            fields: &["rss_mib"],
        },
        ExtraColumn {
            title: "B/conn",
            fields: &["bytes_per_conn"],
        },
        ExtraColumn {
            title: "mem f/x",
            fields: &["rss_ferry_over_this", "per_conn_ferry_over_this"],
        },
    ],
    legend: "msgs/s: deliveries (summed over subscribers) / time from the start of the measured \
             phase to the last delivery; publishers publish as fast as the connection lets them, \
             at most --window undelivered messages each.\n\
             Latency: publish (the write of its chunk) -> delivery (the read that brought it), \
             every measured message, under that full load.\n\
             RSS MiB: broker VmRSS at the end of the run (peak in the notes). B/conn: (broker \
             RSS with the idle connections open - before, with one warm-up connection open) / \
             connections; that RSS is read from 5 s after the last CONNACK until it changes by \
             < 256 KiB between readings 1 s apart (at most 15 s more; settle_s: last CONNACK -> \
             that reading).\n\
             ferry/x: Ferry's msgs/s / this row's (> 1: Ferry is faster). mem f/x: Ferry's RSS \
             (idle: bytes per connection) / this row's (< 1: Ferry uses less).\n\
             cpu ns: the broker process's CPU time (all threads, 10 ms resolution) per delivery \
             (gen_cpu_ns_per_msg in the notes: the load generator's).",
};

/// One measured run, for the report.
enum Run {
    Load(LoadResult),
    Idle(idle::IdleResult),
}

impl Run {
    /// What `--repeat` takes the median of.
    fn key(&self) -> f64 {
        match self {
            Run::Load(r) => r.outcome.msgs_per_s(),
            Run::Idle(r) => r.bytes_per_connection(),
        }
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

fn qos_of(q: u8) -> QoS {
    if q == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

/// Runs `mqtt`.
pub fn run(args: &Args) -> Result<()> {
    let (seconds, warmup, idle_n) = if args.quick {
        (1.0, 0.3, 1_000)
    } else {
        (5.0, 1.0, 10_000)
    };
    let duration =
        Duration::try_from_secs_f64(args.seconds.unwrap_or(seconds)).context("--seconds")?;
    let warmup = Duration::try_from_secs_f64(args.warmup.unwrap_or(warmup)).context("--warmup")?;
    let idle_n = args.idle_connections.unwrap_or(idle_n);
    if args.payload < 21 {
        bail!("--payload must be at least 21 bytes");
    }
    if args.client_threads == 0 {
        bail!("--client-threads must be positive");
    }
    let mut systems = args.systems.clone();
    systems.dedup();
    let bins = brokers::Binaries::find(args.ferry_bin.as_deref(), &args.mosquitto_bin, &systems)?;
    let nofile = brokers::raise_nofile_limit()?;
    if args.scenarios.contains(&Scenario::Idle) && (nofile as usize) < idle_n + 1024 {
        bail!(
            "{idle_n} idle connections need more open files than the hard limit ({nofile}) \
             allows: raise it (ulimit -Hn) or lower --idle-connections"
        );
    }
    if let Some(load) = load_average().filter(|l| *l >= 1.0) {
        eprintln!(
            "note: load average {load:.2} before starting: other processes compete for the CPUs, \
             figures will be lower and noisier"
        );
    }
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.client_threads)
            .enable_all()
            .build()
            .context("building the Tokio runtime")
    };

    let mut report = Report::new(args.json, TABLE);
    let mut cases: Vec<(Scenario, u8)> = Vec::new();
    for &s in &args.scenarios {
        if s == Scenario::Idle {
            cases.push((s, 0));
        } else {
            for &q in &args.qos {
                cases.push((s, q));
            }
        }
    }
    cases.dedup();
    let mut ferry_mem: HashMap<&'static str, f64> = HashMap::new();
    for (scenario, q) in cases {
        let name = scenario.name(q);
        let mut runs: Vec<(Kind, Vec<Run>)> = systems.iter().map(|k| (*k, Vec::new())).collect();
        for _round in 0..args.repeat {
            for (kind, done) in &mut runs {
                if scenario.shape().is_none() && *kind == Kind::FerryDurable {
                    // Idle connections touch no storage: the in-memory row says it all.
                    continue;
                }
                eprintln!("{name}: {kind}...");
                let max_conn = idle_n + 1024;
                let mut broker = BrokerProcess::start(*kind, &bins, max_conn)?;
                let run = match scenario.shape() {
                    Some(shape) => {
                        let spec = LoadSpec {
                            shape,
                            qos: qos_of(q),
                            payload: args.payload,
                            warmup,
                            duration,
                            window: args.window,
                        };
                        let r = runtime()?.block_on(load::run(&broker, spec));
                        Run::Load(r.with_context(|| {
                            format!("{name} against {kind}; its log:\n{}", broker.log_tail())
                        })?)
                    }
                    None => Run::Idle(runtime()?.block_on(idle::run(&mut broker, idle_n))?),
                };
                if !broker.alive() {
                    bail!("{kind} died during {name}:\n{}", broker.log_tail());
                }
                drop(broker);
                done.push(run);
            }
        }
        for (kind, done) in runs {
            let Some(run) = median_by(done, Run::key) else {
                continue;
            };
            let row = match run {
                Run::Load(r) => {
                    let counts = Counts {
                        producers: scenario.shape().map_or(0, |s| s.publishers),
                        consumers: scenario.shape().map_or(0, |s| s.subscribers),
                        published: r.published,
                        expected: r.expected,
                    };
                    let mut row = Row::new(name, kind, args.payload, counts, &r.outcome, None);
                    row.loss_allowed = q == 0;
                    row.add("rss_mib", Extra::Value(mib(r.rss)));
                    let mem = r.rss as f64;
                    if kind == Kind::Ferry {
                        ferry_mem.insert(name, mem);
                    } else if let Some(f) = ferry_mem.get(name) {
                        row.add("rss_ferry_over_this", Extra::Value(f / mem.max(1.0)));
                    }
                    row.add("peak_rss_mib", Extra::Value(mib(r.peak_rss)));
                    row.add("connected_rss_mib", Extra::Value(mib(r.idle_rss)));
                    row.add("qos", Extra::Count(u64::from(q)));
                    if let Some(cpu) = r.generator_cpu.filter(|_| r.outcome.delivered > 0) {
                        row.add(
                            "gen_cpu_ns_per_msg",
                            Extra::Value(cpu.as_nanos() as f64 / r.outcome.delivered as f64),
                        );
                    }
                    row
                }
                Run::Idle(r) => {
                    let counts = Counts {
                        producers: 0,
                        consumers: r.connections,
                        published: 0,
                        expected: 0,
                    };
                    let outcome = Outcome::without_latency(0, None, r.connect_time)?;
                    let mut row = Row::new(name, kind, 0, counts, &outcome, None);
                    let per = r.bytes_per_connection();
                    row.add("rss_mib", Extra::Value(mib(r.rss_after)));
                    row.add("bytes_per_conn", Extra::Value(per));
                    if kind == Kind::Ferry {
                        ferry_mem.insert(name, per);
                    } else if let Some(f) = ferry_mem.get(name) {
                        row.add("per_conn_ferry_over_this", Extra::Value(f / per.max(1.0)));
                    }
                    row.add("connections", Extra::Count(r.connections as u64));
                    row.add("broker_threads", Extra::Count(r.threads));
                    row.add("rss_before_mib", Extra::Value(mib(r.rss_before)));
                    row.add("settle_s", Extra::Value(r.settle.as_secs_f64()));
                    row.add(
                        "connects_per_s",
                        Extra::Value(r.connections as f64 / r.connect_time.as_secs_f64().max(1e-9)),
                    );
                    row
                }
            };
            report.row(row)?;
        }
    }
    let summary = targets(&report);
    let result = report.finish();
    if args.json {
        eprint!("{summary}");
    } else {
        print!("{summary}");
    }
    result
}

/// The targets: Ferry at least 2x Mosquitto's throughput, at most 2x its memory per idle
/// connection.
fn targets(report: &Report) -> String {
    let mut out = String::new();
    let rows = report.rows();
    let mosq: Vec<_> = rows
        .iter()
        .filter(|r| r.system == Kind::Mosquitto.to_string())
        .collect();
    if mosq.is_empty() {
        return out;
    }
    out.push_str("\ntargets (Ferry vs Mosquitto):\n");
    for r in mosq {
        if let Some(ratio) = r.ratio_vs_ferry {
            let verdict = if ratio >= 2.0 {
                "met".to_string()
            } else {
                format!("MISSED, {:.0}% of the target", ratio / 2.0 * 100.0)
            };
            out.push_str(&format!(
                "  {:<16} throughput ferry/mosquitto {ratio:.2}x (target >= 2x): {verdict}\n",
                r.scenario
            ));
        }
        let ferry_cpu = rows
            .iter()
            .find(|f| f.scenario == r.scenario && f.system == Kind::Ferry.to_string())
            .and_then(|f| f.cpu_ns_per_msg);
        if let Some((f, m)) = ferry_cpu.zip(r.cpu_ns_per_msg) {
            out.push_str(&format!(
                "  {:<16} broker CPU per delivery: ferry {f:.0} ns, mosquitto {m:.0} ns \
                 (mosquitto/ferry {:.2}x)\n",
                r.scenario,
                m / f.max(1.0)
            ));
        }
        let durable = rows
            .iter()
            .find(|f| f.scenario == r.scenario && f.system == Kind::FerryDurable.to_string());
        let memory = rows
            .iter()
            .find(|f| f.scenario == r.scenario && f.system == Kind::Ferry.to_string());
        if let Some(d) = durable.filter(|d| d.msgs_per_s > 0) {
            let rate = |x: u64| x.max(1) as f64;
            let vs_mosq = d.msgs_per_s as f64 / rate(r.msgs_per_s);
            let vs_mem = memory.map(|m| d.msgs_per_s as f64 / rate(m.msgs_per_s));
            let verdict = if vs_mosq >= 1.0 && vs_mem.is_none_or(|v| v >= 0.5) {
                "met"
            } else {
                "MISSED"
            };
            out.push_str(&format!(
                "  {:<16} ferry-durable/mosquitto {vs_mosq:.2}x (target >= 1x), \
                 ferry-durable/ferry {} (target >= 0.5): {verdict}\n",
                r.scenario,
                vs_mem.map_or("-".to_string(), |v| format!("{v:.2}x")),
            ));
        }
        if let Some(Extra::Value(x)) = r.extra("per_conn_ferry_over_this") {
            let verdict = if x <= 2.0 {
                "met".to_string()
            } else {
                format!("MISSED by {:.2}x", x / 2.0)
            };
            out.push_str(&format!(
                "  {:<16} RSS per idle connection ferry/mosquitto {x:.2}x (target <= 2x): {verdict}\n",
                r.scenario
            ));
        }
    }
    out
}
