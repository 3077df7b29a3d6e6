//! `backends`: the same workload over every `ferry-backends` adapter, and over each engine's own
//! client used directly, in one run.
//!
//! The workload (see [`workload`]): 4 producers publish 1 KiB messages to one topic, each
//! waiting for the broker's confirmation before the next, and a consumer group of 4 members
//! acknowledges each delivery, for `--seconds`; then the subscribers drain what was confirmed.
//! Each backend runs twice: through `ferry_backends::connect(url)` (system `ferry-backends`),
//! then with its own client (see [`direct`]); the adapter's row carries the ratio of the two
//! throughputs (`vs_direct`) and median latencies (`p50_vs_direct`).
//!
//! A backend whose service cannot be reached is skipped with the reason (the benchmark does not
//! fail). The run fails only if a confirmed message was never delivered.

mod direct;
mod workload;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::Args as ClapArgs;
use ferry_backends::{ConnectOptions, RetryPolicy};

use crate::measure::{block_on, load_average, Outcome};
use crate::report::{Counts, Extra, ExtraColumn, Report, Row, Table};
use workload::{Measured, Plan, Target, CONSUMERS, PRODUCERS};

/// Options of `backends`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// A smoke test (under a minute): 1 s runs.
    #[arg(long)]
    pub quick: bool,
    /// Backends to run (kafka runs only if FERRY_KAFKA_URL is set and the `kafka` feature is on).
    #[arg(long, value_delimiter = ',', default_values = ["memory", "file", "nats", "redis", "amqp", "kafka"])]
    pub backends: Vec<String>,
    /// Seconds each run publishes for (default 5; 1 with --quick).
    #[arg(long, value_name = "SECONDS")]
    pub seconds: Option<f64>,
    /// Payload size in bytes (at least 16).
    #[arg(long, default_value_t = 1024)]
    pub payload: usize,
    /// Most messages confirmed but not yet delivered: producers wait beyond this, so that a
    /// fast publisher does not build an unbounded backlog.
    #[arg(long, default_value_t = 1000)]
    pub window: usize,
    /// Skip the direct-client runs.
    #[arg(long)]
    pub no_direct: bool,
    /// NATS URL (default: $FERRY_NATS_URL, else nats://127.0.0.1:4222).
    #[arg(long)]
    pub nats_url: Option<String>,
    /// Redis URL (default: $FERRY_REDIS_URL, else redis://127.0.0.1:6379/0).
    #[arg(long)]
    pub redis_url: Option<String>,
    /// RabbitMQ URL (default: $FERRY_AMQP_URL, else amqp://guest:guest@127.0.0.1:5672/%2f).
    #[arg(long)]
    pub amqp_url: Option<String>,
}

const TABLE: Table = Table {
    rate: "msgs/s",
    producers: false,
    ratio: false,
    after_rate: &[ExtraColumn {
        title: "vs direct",
        fields: &["vs_direct"],
    }],
    after_latency: &[
        ExtraColumn {
            title: "p50/direct",
            fields: &["p50_vs_direct"],
        },
        ExtraColumn {
            title: "dups",
            fields: &["duplicates"],
        },
    ],
    legend: "Each backend: 4 producers publish (each awaiting the broker's confirmation) -> a \
consumer group of 4 acknowledging every delivery, --seconds of publishing, then a drain. \
scenario = backend; system = ferry-backends (the adapter, via connect(url)) or the engine's own \
client used directly. msgs/s = deliveries / (first publish -> last delivery); latency = publish \
-> receipt of every message (under load, closed loop, --window in flight). vs direct = adapter \
msgs/s / direct msgs/s (< 1: the adapter is slower); p50/direct = adapter p50 / direct p50. \
cpu ns = this process's CPU per delivery: for memory and file it includes the broker, for \
services only the client side.",
};

/// The service URLs: flags, else the environment, else the local defaults.
struct Urls {
    nats: String,
    redis: String,
    amqp: String,
}

impl Urls {
    fn of(args: &Args) -> Self {
        let pick = |flag: &Option<String>, var: &str, default: &str| {
            flag.clone()
                .or_else(|| std::env::var(var).ok())
                .unwrap_or_else(|| default.to_string())
        };
        Urls {
            nats: pick(&args.nats_url, "FERRY_NATS_URL", "nats://127.0.0.1:4222"),
            redis: pick(
                &args.redis_url,
                "FERRY_REDIS_URL",
                "redis://127.0.0.1:6379/0",
            ),
            amqp: pick(
                &args.amqp_url,
                "FERRY_AMQP_URL",
                "amqp://guest:guest@127.0.0.1:5672/%2f",
            ),
        }
    }
}

/// What to run for one backend.
struct Spec {
    name: &'static str,
    url: String,
    direct: &'static str,
}

/// Runs `backends`.
pub fn run(args: &Args) -> Result<()> {
    if let Some(load) = load_average().filter(|l| *l >= 1.0) {
        eprintln!("note: load average {load:.2}: other processes compete for the CPUs");
    }
    let seconds = args.seconds.unwrap_or(if args.quick { 1.0 } else { 5.0 });
    let plan = Plan {
        payload: args.payload.max(16),
        duration: Duration::from_secs_f64(seconds.max(0.05)),
        window: args.window.max(1),
        drain: Duration::from_secs(if args.quick { 10 } else { 30 }),
    };
    let run_id = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    let dir = tempfile::Builder::new()
        .prefix("ferry-bench-backends-")
        .tempdir()?;
    let urls = Urls::of(args);
    let mut report = Report::new(args.json, TABLE);
    for name in &args.backends {
        let spec = match name.as_str() {
            "memory" => Spec {
                name: "memory",
                url: "memory://".into(),
                direct: "ferry::Broker",
            },
            "file" => Spec {
                name: "file",
                url: url_of_dir(&dir.path().join("adapter"))?,
                direct: "ferry::Broker",
            },
            "nats" => Spec {
                name: "nats",
                url: format!(
                    "{}?stream=FERRY_BENCH&prefix=ferry-bench&inactive_s=600",
                    urls.nats
                ),
                direct: "async-nats",
            },
            "redis" => Spec {
                name: "redis",
                url: format!("{}?prefix=ferry-bench:", urls.redis),
                direct: "redis-rs",
            },
            "amqp" => Spec {
                name: "amqp",
                url: format!("{}?exchange=ferry-bench&queue_expires_s=600", urls.amqp),
                direct: "lapin",
            },
            "kafka" => match std::env::var("FERRY_KAFKA_URL") {
                Ok(url) => Spec {
                    name: "kafka",
                    url,
                    direct: "rdkafka",
                },
                Err(_) => {
                    eprintln!("skip kafka: FERRY_KAFKA_URL is not set");
                    continue;
                }
            },
            other => {
                eprintln!("skip {other}: unknown backend (memory, file, nats, redis, amqp, kafka)");
                continue;
            }
        };
        eprintln!(
            "{}: adapter ({})",
            spec.name,
            ferry_backends::redact_url(&spec.url)
        );
        let adapter = block_on(run_adapter(&spec, &run_id, plan));
        let direct = if args.no_direct {
            None
        } else if spec.name == "kafka" {
            Some(Err(anyhow::anyhow!(
                "no direct Kafka client in the harness"
            )))
        } else {
            eprintln!("{}: direct ({})", spec.name, spec.direct);
            Some(block_on(run_direct(&spec, &urls, &dir, &run_id, plan)))
        };
        let adapter_row = match adapter {
            Ok(m) => Some(row(spec.name, "ferry-backends", plan, &m)?),
            Err(e) => {
                eprintln!("skip {} adapter: {e:#}", spec.name);
                report.skip(spec.name, "ferry-backends", plan.payload, leak(e));
                None
            }
        };
        let direct_row = match direct {
            None => None,
            Some(Ok(m)) => Some(row(spec.name, spec.direct, plan, &m)?),
            Some(Err(e)) => {
                eprintln!("skip {} direct: {e:#}", spec.name);
                report.skip(spec.name, spec.direct, plan.payload, leak(e));
                None
            }
        };
        if let Some(mut a) = adapter_row {
            if let Some(d) = &direct_row {
                if d.msgs_per_s > 0 {
                    a.add(
                        "vs_direct",
                        Extra::Value(a.msgs_per_s as f64 / d.msgs_per_s as f64),
                    );
                }
                if d.p50_us > 0.0 {
                    a.add("p50_vs_direct", Extra::Value(a.p50_us / d.p50_us));
                }
            }
            report.row(a)?;
        }
        if let Some(d) = direct_row {
            report.row(d)?;
        }
    }
    report.finish()
}

fn leak(e: anyhow::Error) -> &'static str {
    let text = format!("skipped: {e:#}");
    let short: String = text.chars().take(160).collect();
    Box::leak(short.into_boxed_str())
}

fn url_of_dir(path: &std::path::Path) -> Result<String> {
    std::fs::create_dir_all(path)?;
    url::Url::from_directory_path(path)
        .map(|u| u.to_string())
        .map_err(|()| anyhow::anyhow!("{} is not an absolute path", path.display()))
}

fn row(backend: &'static str, system: &str, plan: Plan, m: &Measured) -> Result<Row> {
    let outcome = Outcome {
        delivered: m.delivered,
        lost: 0,
        duplicates: None,
        wall: m.wall,
        latency: m.latency.clone(),
        cpu: m.cpu,
    };
    let counts = Counts {
        producers: PRODUCERS,
        consumers: CONSUMERS,
        published: m.published,
        expected: m.published,
    };
    let mut r = Row::new(backend, system, plan.payload, counts, &outcome, None);
    // At-least-once: a message counts as delivered once; further deliveries are duplicates
    // (reported, not a failure).
    r.lost = m.published.saturating_sub(m.unique);
    r.add(
        "duplicates",
        Extra::Count(m.delivered.saturating_sub(m.unique)),
    );
    Ok(r)
}

/// A short connect: one attempt, bounded, so that a missing service is skipped quickly.
fn connect_options() -> ConnectOptions {
    ConnectOptions {
        retry: RetryPolicy {
            attempts: 2,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(200),
            attempt_timeout: Duration::from_secs(3),
        },
        ..ConnectOptions::default()
    }
}

async fn measure<T: Target>(target: Arc<T>, plan: Plan) -> Result<Measured> {
    let outcome = workload::run(target.clone(), plan).await;
    target.cleanup().await;
    outcome
}

async fn run_adapter(spec: &Spec, run_id: &str, plan: Plan) -> Result<Measured> {
    let backend = ferry_backends::connect_with(&spec.url, connect_options()).await?;
    let target = Arc::new(direct::Adapter {
        backend,
        topic: format!("bench.{run_id}"),
        group: "bench".into(),
    });
    measure(target, plan).await
}

async fn run_direct(
    spec: &Spec,
    urls: &Urls,
    dir: &tempfile::TempDir,
    run_id: &str,
    plan: Plan,
) -> Result<Measured> {
    let topic = format!("bench.{run_id}");
    match spec.name {
        "memory" => {
            let broker = ferry::Broker::default();
            measure(
                Arc::new(direct::FerryDirect {
                    broker,
                    topic,
                    group: "bench".into(),
                }),
                plan,
            )
            .await
        }
        "file" => {
            let path = dir.path().join("direct");
            let broker = tokio::task::spawn_blocking(move || ferry::Broker::open(path)).await??;
            measure(
                Arc::new(direct::FerryDirect {
                    broker,
                    topic,
                    group: "bench".into(),
                }),
                plan,
            )
            .await
        }
        "nats" => {
            let addr = url::Url::parse(&urls.nats)?;
            let addr = format!(
                "nats://{}:{}",
                addr.host_str().unwrap_or("127.0.0.1"),
                addr.port().unwrap_or(4222)
            );
            measure(
                Arc::new(direct::NatsDirect::connect(&addr, run_id).await?),
                plan,
            )
            .await
        }
        "redis" => {
            measure(
                Arc::new(direct::RedisDirect::connect(&urls.redis, run_id).await?),
                plan,
            )
            .await
        }
        "amqp" => {
            measure(
                Arc::new(direct::AmqpDirect::connect(&urls.amqp, run_id).await?),
                plan,
            )
            .await
        }
        other => anyhow::bail!("no direct client for {other}"),
    }
}
