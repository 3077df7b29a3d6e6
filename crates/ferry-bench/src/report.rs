//! Results: one [`Row`] per (scenario, system, payload), printed as a table (with Ferry's
//! throughput divided by each peer's) or, with `--json`, as one JSON object per line.

use std::collections::HashMap;
use std::fmt;
use std::io::Write as _;

use anyhow::{bail, Result};
use ferry::stats::thousands;
use hdrhistogram::Histogram;
use serde::ser::{Serialize, SerializeMap as _, Serializer};

use crate::inproc::{RunSpec, System};
use crate::measure::Outcome;

/// One measured (scenario, system, payload). The first seven fields are the stable JSON schema;
/// the rest are extras.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// Scenario name (`a-1p1s`, ...).
    pub scenario: &'static str,
    /// System name (`ferry`, `tokio-broadcast`, ...).
    pub system: String,
    /// Payload size in bytes.
    pub payload_bytes: usize,
    /// Deliveries (summed over consumers) per second, first publish to last delivery.
    pub msgs_per_s: u64,
    /// Publish -> delivery latency, median, in microseconds.
    pub p50_us: f64,
    /// 99th percentile latency, in microseconds.
    pub p99_us: f64,
    /// 99.9th percentile latency, in microseconds.
    pub p999_us: f64,
    /// Ferry's `msgs_per_s` divided by this row's, for the same scenario and payload.
    pub ratio_vs_ferry: Option<f64>,
    /// Producers in the run.
    pub producers: usize,
    /// Consumers in the run.
    pub consumers: usize,
    /// Messages published.
    pub published: u64,
    /// Deliveries expected.
    pub expected: u64,
    /// Deliveries made.
    pub delivered: u64,
    /// Deliveries missing (expected - distinct deliveries) or reported lost by the system.
    pub lost: u64,
    /// Deliveries of a message already received, where the run checked for exactly-once
    /// delivery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicates: Option<u64>,
    /// Wall time of the run, first publish to last delivery, in seconds.
    pub wall_s: f64,
    /// Latency samples behind the percentiles.
    pub latency_samples: u64,
    /// CPU time of the whole process during the run, in seconds (Linux only).
    pub cpu_s: Option<f64>,
    /// CPU nanoseconds per delivery, all threads (Linux only): the cost, whatever the load.
    pub cpu_ns_per_msg: Option<f64>,
    /// How the system implements the scenario, when that needs saying.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<&'static str>,
    /// Figures of this scenario only (JSON: a field each; table: the notes column).
    #[serde(flatten)]
    pub extra: Extras,
}

/// A scenario-specific figure.
#[derive(Debug, Clone, Copy)]
pub enum Extra {
    /// A count (messages, bytes).
    Count(u64),
    /// A measurement or ratio (3 decimals).
    Value(f64),
}

impl Serialize for Extra {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            Extra::Count(n) => s.serialize_u64(n),
            Extra::Value(x) => s.serialize_f64(round3(x)),
        }
    }
}

impl fmt::Display for Extra {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Extra::Count(n) => f.write_str(&thousands(n)),
            Extra::Value(x) if x.abs() >= 1000.0 => f.write_str(&thousands(x.round() as u64)),
            Extra::Value(x) => write!(f, "{x:.3}"),
        }
    }
}

/// Named [`Extra`]s in the order they were added; serialized as fields of the row.
#[derive(Debug, Clone, Default)]
pub struct Extras(Vec<(&'static str, Extra)>);

impl Extras {
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for Extras {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl fmt::Display for Extras {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            write!(f, "{}{k}={v}", if i == 0 { "" } else { " " })?;
        }
        Ok(())
    }
}

impl Row {
    /// A row for `outcome`.
    pub fn new(
        scenario: &'static str,
        system: impl fmt::Display,
        payload_bytes: usize,
        spec: &RunSpec,
        outcome: &Outcome,
        note: Option<&'static str>,
    ) -> Self {
        let expected = spec.expected();
        let distinct = outcome
            .delivered
            .saturating_sub(outcome.duplicates.unwrap_or(0));
        Row {
            scenario,
            system: system.to_string(),
            payload_bytes,
            msgs_per_s: outcome.msgs_per_s().round() as u64,
            p50_us: round3(outcome.latency_us(0.5)),
            p99_us: round3(outcome.latency_us(0.99)),
            p999_us: round3(outcome.latency_us(0.999)),
            ratio_vs_ferry: None,
            producers: spec.shape.producers,
            consumers: spec.shape.consumers,
            published: spec.published(),
            expected,
            delivered: outcome.delivered,
            lost: expected.saturating_sub(distinct).max(outcome.lost),
            duplicates: outcome.duplicates,
            wall_s: round3(outcome.wall.as_secs_f64()),
            latency_samples: outcome.latency.len(),
            cpu_s: outcome.cpu.map(|c| round3(c.as_secs_f64())),
            cpu_ns_per_msg: outcome.cpu_ns_per_delivery().map(f64::round),
            note,
            extra: Extras::default(),
        }
    }

    /// Adds a scenario-specific figure.
    pub fn add(&mut self, name: &'static str, value: Extra) {
        self.extra.0.push((name, value));
    }

    /// Takes the latency columns from `hist`, recorded in microseconds (instead of the run's
    /// publish -> delivery samples).
    pub fn set_latency_us(&mut self, hist: &Histogram<u64>) {
        let at = |q| {
            round3(if hist.is_empty() {
                0
            } else {
                hist.value_at_quantile(q)
            } as f64)
        };
        (self.p50_us, self.p99_us, self.p999_us) = (at(0.5), at(0.99), at(0.999));
        self.latency_samples = hist.len();
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

enum Line {
    Measured(Row),
    Skipped {
        scenario: &'static str,
        system: String,
        payload_bytes: usize,
        why: &'static str,
    },
}

/// Collects rows and prints them.
pub struct Report {
    json: bool,
    lines: Vec<Line>,
    ferry: HashMap<(&'static str, usize), u64>,
}

impl Report {
    /// A report printed as JSON lines (`json`) or as a table at the end.
    pub fn new(json: bool) -> Self {
        Report {
            json,
            lines: Vec::new(),
            ferry: HashMap::new(),
        }
    }

    /// Adds a measured row (Ferry's rows must come before their peers' for the ratio).
    pub fn row(&mut self, mut row: Row) -> Result<()> {
        let key = (row.scenario, row.payload_bytes);
        if row.system == System::Ferry.to_string() {
            self.ferry.insert(key, row.msgs_per_s);
        }
        row.ratio_vs_ferry = self
            .ferry
            .get(&key)
            .filter(|_| row.msgs_per_s > 0)
            .map(|&f| round3(f as f64 / row.msgs_per_s as f64));
        if self.json {
            let mut out = std::io::stdout().lock();
            serde_json::to_writer(&mut out, &row)?;
            writeln!(out)?;
            out.flush()?;
        }
        self.lines.push(Line::Measured(row));
        Ok(())
    }

    /// Records a combination that was not run, and why.
    pub fn skip(
        &mut self,
        scenario: &'static str,
        system: impl fmt::Display,
        payload_bytes: usize,
        why: &'static str,
    ) {
        if self.json {
            eprintln!("{scenario} {system} {payload_bytes} B: {why}");
        }
        self.lines.push(Line::Skipped {
            scenario,
            system: system.to_string(),
            payload_bytes,
            why,
        });
    }

    /// Prints the table (nothing more in JSON mode). Fails if a run lost deliveries (after
    /// printing), so that a smoke test catches it; timings are never judged.
    pub fn finish(self) -> Result<()> {
        if !self.json {
            self.print_table()?;
        }
        let lossy: Vec<String> = self
            .lines
            .iter()
            .filter_map(|l| match l {
                Line::Measured(r) if r.lost > 0 || r.duplicates.unwrap_or(0) > 0 => Some(format!(
                    "{} {} {} B: {} of {} deliveries missing, {} duplicated",
                    r.scenario,
                    r.system,
                    r.payload_bytes,
                    r.lost,
                    r.expected,
                    r.duplicates.unwrap_or(0)
                )),
                _ => None,
            })
            .collect();
        if !lossy.is_empty() {
            bail!("deliveries were lost or duplicated:\n{}", lossy.join("\n"));
        }
        Ok(())
    }

    fn print_table(&self) -> Result<()> {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "{:<14} {:>7}  {:<16} {:>13} {:>10} {:>10} {:>10} {:>8} {:>8}  notes",
            "scenario",
            "payload",
            "system",
            "msgs/s",
            "p50 us",
            "p99 us",
            "p999 us",
            "ferry/x",
            "cpu ns"
        )?;
        let mut previous = None;
        for line in &self.lines {
            let group = match line {
                Line::Measured(r) => (r.scenario, r.payload_bytes),
                Line::Skipped {
                    scenario,
                    payload_bytes,
                    ..
                } => (*scenario, *payload_bytes),
            };
            if previous.is_some_and(|p| p != group) {
                writeln!(out)?;
            }
            previous = Some(group);
            match line {
                Line::Measured(r) => {
                    let ratio = r
                        .ratio_vs_ferry
                        .map_or_else(|| "-".to_string(), |x| format!("{x:.2}x"));
                    let mut notes = Vec::new();
                    if r.lost > 0 {
                        notes.push(format!("LOST {} of {}", r.lost, r.expected));
                    }
                    if let Some(d) = r.duplicates.filter(|d| *d > 0) {
                        notes.push(format!("DUPLICATED {d}"));
                    }
                    if !r.extra.is_empty() {
                        notes.push(r.extra.to_string());
                    }
                    notes.extend(r.note.map(str::to_string));
                    let cpu = r
                        .cpu_ns_per_msg
                        .map_or_else(|| "-".to_string(), |x| format!("{x:.0}"));
                    writeln!(
                        out,
                        "{:<14} {:>7}  {:<16} {:>13} {:>10.1} {:>10.1} {:>10.1} {:>8} {:>8}  {}",
                        r.scenario,
                        format!("{} B", r.payload_bytes),
                        r.system,
                        thousands(r.msgs_per_s),
                        r.p50_us,
                        r.p99_us,
                        r.p999_us,
                        ratio,
                        cpu,
                        notes.join("; ")
                    )?;
                }
                Line::Skipped {
                    scenario,
                    system,
                    payload_bytes,
                    why,
                } => writeln!(
                    out,
                    "{:<14} {:>7}  {:<16} {:>13} {:>10} {:>10} {:>10} {:>8} {:>8}  {}",
                    scenario,
                    format!("{payload_bytes} B"),
                    system,
                    "n/a",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    why
                )?,
            }
        }
        writeln!(
            out,
            "\nmsgs/s: deliveries summed over consumers / wall time from first publish to last \
             delivery.\nLatency: publish -> delivery under full load (queueing included), sampled \
             (one message in N per producer carries its send time).\nferry/x: Ferry's msgs/s \
             divided by this row's (same scenario and payload).\ncpu ns: process CPU time (all \
             threads, 10 ms resolution) per delivery; unlike msgs/s it does not depend on how \
             much CPU other processes leave.\nd-f: Ferry only, scenario figures in the notes \
             (see the README); in e-delayed the latency columns are the lateness, receive time - \
             deliver_at."
        )?;
        Ok(())
    }
}
