//! Results: one [`Row`] per (scenario, system, payload), printed as a table laid out by each
//! subcommand's [`Table`] (in `inproc`, with Ferry's throughput divided by each peer's) or, with
//! `--json`, as one JSON object per line.

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
    /// Whether missing deliveries are allowed (MQTT QoS 0): they are reported, but do not make
    /// [`Report::finish`] fail.
    #[serde(skip)]
    pub loss_allowed: bool,
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

impl Serialize for Extras {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// The shape and delivery accounting of a row: how many producers and consumers, messages
/// published and deliveries expected.
#[derive(Debug, Clone, Copy)]
pub struct Counts {
    /// Producers (publishers, writers).
    pub producers: usize,
    /// Consumers (subscribers, readers).
    pub consumers: usize,
    /// Messages published.
    pub published: u64,
    /// Deliveries expected.
    pub expected: u64,
}

impl From<&RunSpec> for Counts {
    fn from(spec: &RunSpec) -> Self {
        Counts {
            producers: spec.shape.producers,
            consumers: spec.shape.consumers,
            published: spec.published(),
            expected: spec.expected(),
        }
    }
}

impl Row {
    /// A row for `outcome`, whose run had the shape and expectations of `counts`.
    pub fn new(
        scenario: &'static str,
        system: impl fmt::Display,
        payload_bytes: usize,
        counts: impl Into<Counts>,
        outcome: &Outcome,
        note: Option<&'static str>,
    ) -> Self {
        let counts = counts.into();
        let expected = counts.expected;
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
            producers: counts.producers,
            consumers: counts.consumers,
            published: counts.published,
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
            loss_allowed: false,
        }
    }

    /// Adds a scenario-specific figure.
    pub fn add(&mut self, name: &'static str, value: Extra) {
        self.extra.0.push((name, value));
    }

    /// The scenario-specific figure `name`, if added.
    pub fn extra(&self, name: &str) -> Option<Extra> {
        self.extra
            .0
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| *v)
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

/// What the table of a subcommand shows besides the stable columns (scenario, payload, system,
/// throughput, latency percentiles, CPU per message, notes).
#[derive(Debug, Clone, Copy)]
pub struct Table {
    /// Title of the throughput (`msgs_per_s`) column.
    pub rate: &'static str,
    /// Whether to show a `pubs` column (`producers`).
    pub producers: bool,
    /// Whether to show the `ferry/x` column (`ratio_vs_ferry`).
    pub ratio: bool,
    /// Extras shown in columns of their own after the throughput column...
    pub after_rate: &'static [ExtraColumn],
    /// ...and after the latency columns. The other extras go to the notes column.
    pub after_latency: &'static [ExtraColumn],
    /// Printed under the table.
    pub legend: &'static str,
}

/// A table column showing extras.
#[derive(Debug, Clone, Copy)]
pub struct ExtraColumn {
    /// The column title.
    pub title: &'static str,
    /// The extras it shows: the first one a row has (rows rarely have two).
    pub fields: &'static [&'static str],
}

/// Collects rows and prints them.
pub struct Report {
    json: bool,
    table: Table,
    lines: Vec<Line>,
    ferry: HashMap<(&'static str, usize), u64>,
}

impl Report {
    /// A report printed as JSON lines (`json`) or as `table` at the end.
    pub fn new(json: bool, table: Table) -> Self {
        Report {
            json,
            table,
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

    /// The measured rows so far.
    pub fn rows(&self) -> Vec<&Row> {
        self.lines
            .iter()
            .filter_map(|l| match l {
                Line::Measured(r) => Some(r),
                Line::Skipped { .. } => None,
            })
            .collect()
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
                Line::Measured(r)
                    if (r.lost > 0 && !r.loss_allowed) || r.duplicates.unwrap_or(0) > 0 =>
                {
                    Some(format!(
                        "{} {} {} B: {} of {} deliveries missing, {} duplicated",
                        r.scenario,
                        r.system,
                        r.payload_bytes,
                        r.lost,
                        r.expected,
                        r.duplicates.unwrap_or(0)
                    ))
                }
                _ => None,
            })
            .collect();
        if !lossy.is_empty() {
            bail!("deliveries were lost or duplicated:\n{}", lossy.join("\n"));
        }
        Ok(())
    }

    fn print_table(&self) -> Result<()> {
        let t = &self.table;
        let mut columns = vec![
            Column::left("scenario", 14, 0),
            Column::right("payload", 7, 1),
            Column::left("system", 16, 2),
        ];
        if t.producers {
            columns.push(Column::right("pubs", 4, 1));
        }
        columns.push(Column::right(t.rate, 13, 1));
        columns.extend(t.after_rate.iter().map(|c| Column::right(c.title, 10, 1)));
        for title in ["p50 us", "p99 us", "p999 us"] {
            columns.push(Column::right(title, 10, 1));
        }
        columns.extend(
            t.after_latency
                .iter()
                .map(|c| Column::right(c.title, 10, 1)),
        );
        if t.ratio {
            columns.push(Column::right("ferry/x", 8, 1));
        }
        columns.push(Column::right("cpu ns", 8, 1));
        columns.push(Column::left("notes", 0, 2));

        let mut lines: Vec<Option<Vec<String>>> = Vec::with_capacity(self.lines.len() * 2 + 1);
        lines.push(Some(columns.iter().map(|c| c.title.to_string()).collect()));
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
                lines.push(None);
            }
            previous = Some(group);
            lines.push(Some(match line {
                Line::Measured(r) => self.cells(r),
                Line::Skipped {
                    scenario,
                    system,
                    payload_bytes,
                    why,
                } => {
                    let mut cells = vec![
                        scenario.to_string(),
                        size_label(*payload_bytes),
                        system.clone(),
                    ];
                    cells.resize(columns.len() - 1, "-".to_string());
                    if let Some(rate) = cells.get_mut(3 + usize::from(t.producers)) {
                        *rate = "n/a".to_string();
                    }
                    cells.push(why.to_string());
                    cells
                }
            }));
        }
        for (i, c) in columns.iter_mut().enumerate() {
            let widest = lines
                .iter()
                .flatten()
                .filter_map(|cells| cells.get(i))
                .map(|cell| cell.chars().count())
                .max();
            c.width = c.width.max(widest.unwrap_or(0));
        }
        let last = columns.len() - 1;
        let mut out = std::io::stdout().lock();
        for cells in &lines {
            let mut text = String::new();
            for (i, (c, cell)) in columns.iter().zip(cells.iter().flatten()).enumerate() {
                text.push_str(&" ".repeat(c.gap));
                let pad = " ".repeat(c.width.saturating_sub(cell.chars().count()));
                match (i == last, c.left) {
                    (true, _) => text.push_str(cell),
                    (false, true) => text.push_str(&format!("{cell}{pad}")),
                    (false, false) => text.push_str(&format!("{pad}{cell}")),
                }
            }
            writeln!(out, "{}", text.trim_end())?;
        }
        writeln!(out, "\n{}", t.legend)?;
        Ok(())
    }

    /// The table cells of a measured row.
    fn cells(&self, r: &Row) -> Vec<String> {
        let t = &self.table;
        let extra = |c: &ExtraColumn| {
            c.fields
                .iter()
                .find_map(|name| r.extra(name))
                .map_or_else(|| "-".to_string(), |x| x.to_string())
        };
        let mut cells = vec![
            r.scenario.to_string(),
            size_label(r.payload_bytes),
            r.system.clone(),
        ];
        if t.producers {
            cells.push(r.producers.to_string());
        }
        cells.push(thousands(r.msgs_per_s));
        cells.extend(t.after_rate.iter().map(extra));
        for x in [r.p50_us, r.p99_us, r.p999_us] {
            cells.push(if r.latency_samples == 0 {
                "-".to_string()
            } else {
                format!("{x:.1}")
            });
        }
        cells.extend(t.after_latency.iter().map(extra));
        if t.ratio {
            cells.push(
                r.ratio_vs_ferry
                    .map_or_else(|| "-".to_string(), |x| format!("{x:.2}x")),
            );
        }
        cells.push(
            r.cpu_ns_per_msg
                .map_or_else(|| "-".to_string(), |x| format!("{x:.0}")),
        );
        let mut notes = Vec::new();
        if r.lost > 0 {
            notes.push(format!("LOST {} of {}", r.lost, r.expected));
        }
        if let Some(d) = r.duplicates.filter(|d| *d > 0) {
            notes.push(format!("DUPLICATED {d}"));
        }
        let in_columns = |k: &str| {
            t.after_rate
                .iter()
                .chain(t.after_latency)
                .any(|c| c.fields.contains(&k))
        };
        let rest: Vec<String> = r
            .extra
            .0
            .iter()
            .filter(|(k, _)| !in_columns(k))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !rest.is_empty() {
            notes.push(rest.join(" "));
        }
        notes.extend(r.note.map(str::to_string));
        cells.push(notes.join("; "));
        cells
    }
}

/// A payload size for the table: in bytes, or in MiB from 1 MiB on when it is a whole number.
fn size_label(bytes: usize) -> String {
    const MIB: usize = 1 << 20;
    if bytes >= MIB && bytes % MIB == 0 {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} B")
    }
}

/// A column of the table: at least `width` characters wide, after `gap` spaces.
struct Column {
    title: &'static str,
    width: usize,
    left: bool,
    gap: usize,
}

impl Column {
    fn left(title: &'static str, width: usize, gap: usize) -> Self {
        Column {
            title,
            width,
            left: true,
            gap,
        }
    }

    fn right(title: &'static str, width: usize, gap: usize) -> Self {
        Column {
            title,
            width,
            left: false,
            gap,
        }
    }
}
