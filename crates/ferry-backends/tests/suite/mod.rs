//! The conformance suite's harness: fixtures (one per backend), the per-case context and the
//! runner. The cases themselves are in `cases.rs`, written once over `Arc<dyn Backend>`.

pub mod cases;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use ferry_backends::{
    connect_with, Backend, BackendMessage, BackendSubscription, Capabilities, ConnectOptions,
    Delivery, RetryPolicy, Support,
};
use parking_lot::Mutex;

/// A backend under test, and whatever must live as long as it (a temporary directory).
pub struct Fixture {
    pub backend: Arc<dyn Backend>,
    /// Cases known to fail on this backend because of a bug outside this crate, and why. They
    /// still run: a failure is reported as XFAIL, a pass as XPASS (time to remove the entry).
    pub known_issues: &'static [(&'static str, &'static str)],
    /// Storage failures the case can switch on (the embedded engine over `FaultyStorage`).
    pub faults: Option<ferry::fault::Faults>,
    _dir: Option<Arc<tempfile::TempDir>>,
}

/// Makes a fixture (a connection to the backend under test), or `None` to skip.
pub type FixtureFn = fn() -> std::pin::Pin<Box<dyn Future<Output = Option<Fixture>> + Send>>;

/// A case skipped because the backend lacks a capability.
#[derive(Debug)]
pub struct Skip(pub String);

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "skipped: {}", self.0)
    }
}

impl std::error::Error for Skip {}

fn require_services() -> bool {
    std::env::var("FERRY_REQUIRE_SERVICES").is_ok_and(|v| v == "1" || v == "true")
}

async fn connect_service(kind: &str, url: String) -> Option<Fixture> {
    let options = ConnectOptions {
        retry: RetryPolicy {
            attempts: 2,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(200),
            attempt_timeout: Duration::from_secs(5),
        },
        ..ConnectOptions::default()
    };
    match connect_with(&url, options).await {
        Ok(backend) => Some(Fixture {
            backend,
            known_issues: &[],
            faults: None,
            _dir: None,
        }),
        Err(e) if require_services() => {
            panic!("{kind} is required (FERRY_REQUIRE_SERVICES=1) but unusable at {url}: {e}")
        }
        Err(e) => {
            eprintln!("SKIP {kind}: cannot connect to {url}: {e} (set FERRY_REQUIRE_SERVICES=1 to fail instead)");
            None
        }
    }
}

fn env_or(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_string())
}

/// The fixtures, one per backend.
pub mod fixtures {
    use super::*;

    pub async fn memory() -> Option<Fixture> {
        let url = "memory://".to_string();
        let backend = ferry_backends::connect(&url).await.ok()?;
        Some(Fixture {
            backend,
            known_issues: &[],
            faults: None,
            _dir: None,
        })
    }

    pub async fn file() -> Option<Fixture> {
        let dir = Arc::new(tempfile::tempdir().ok()?);
        let url = url::Url::from_directory_path(dir.path()).ok()?.to_string();
        let backend = ferry_backends::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("file backend at {url}: {e}"));
        Some(Fixture {
            backend,
            known_issues: &[],
            faults: None,
            _dir: Some(dir),
        })
    }

    /// The embedded engine on a data directory whose storage fails on demand.
    pub async fn file_faulty() -> Option<Fixture> {
        let dir = Arc::new(tempfile::tempdir().ok()?);
        let disk = ferry::disk::DiskStorage::open(dir.path(), Default::default())
            .unwrap_or_else(|e| panic!("disk storage: {e}"));
        let faults = ferry::fault::Faults::default();
        let storage = ferry::fault::FaultyStorage::new(Arc::new(disk), faults.clone());
        let broker = ferry::Broker::with_storage(ferry::BrokerConfig::default(), Arc::new(storage))
            .unwrap_or_else(|e| panic!("broker over faulty storage: {e}"));
        Some(Fixture {
            backend: Arc::new(ferry_backends::adapters::embedded::EmbeddedBackend::new(
                broker,
            )),
            known_issues: &[],
            faults: Some(faults),
            _dir: Some(dir),
        })
    }

    pub async fn nats() -> Option<Fixture> {
        let base = env_or("FERRY_NATS_URL", "nats://127.0.0.1:4222");
        connect_service(
            "nats",
            format!("{base}?stream=FERRY_CONFORMANCE&prefix=ferry-conformance&inactive_s=300"),
        )
        .await
    }

    pub async fn redis() -> Option<Fixture> {
        let base = env_or("FERRY_REDIS_URL", "redis://127.0.0.1:6379/0");
        connect_service("redis", format!("{base}?prefix=ferry-conformance:")).await
    }

    pub async fn rabbitmq() -> Option<Fixture> {
        let base = env_or("FERRY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
        connect_service(
            "rabbitmq",
            format!("{base}?exchange=ferry-conformance&queue_expires_s=300"),
        )
        .await
    }

    #[cfg(feature = "kafka")]
    pub async fn kafka() -> Option<Fixture> {
        match std::env::var("FERRY_KAFKA_URL") {
            Ok(url) => connect_service("kafka", url).await,
            Err(_) => {
                eprintln!("SKIP kafka: FERRY_KAFKA_URL is not set");
                None
            }
        }
    }
}

/// What a case gets: the backend, its capabilities, unique names, helpers.
pub struct Ctx {
    pub backend: Arc<dyn Backend>,
    pub caps: Capabilities,
    pub case: &'static str,
    run: String,
    topics: Mutex<Vec<String>>,
    fixture: FixtureFn,
    /// The fixture's storage failure switches, if it has them.
    pub faults: Option<ferry::fault::Faults>,
}

impl Ctx {
    /// A topic name unique to this run and case.
    pub fn topic(&self, name: &str) -> String {
        let t = format!("conf.{}.{}.{name}", self.run, self.case);
        self.topics.lock().push(t.clone());
        t
    }

    /// A name (group) unique to this run.
    pub fn name(&self, name: &str) -> String {
        format!("{name}-{}", self.run)
    }

    /// Fails with [`Skip`] unless the backend supports `what` (natively or emulated).
    pub fn require(&self, what: &str, support: Support) -> anyhow::Result<()> {
        if support.is_supported() {
            Ok(())
        } else {
            Err(Skip(format!("{} does not support {what}", self.backend.name())).into())
        }
    }

    /// Another handle on the same backend (a new connection; a new broker for `memory://`).
    pub async fn second_backend(&self) -> anyhow::Result<Fixture> {
        (self.fixture)()
            .await
            .ok_or_else(|| anyhow!("second connection to the backend failed"))
    }

    async fn cleanup(&self) {
        let topics = std::mem::take(&mut *self.topics.lock());
        for t in topics {
            if let Err(e) = self.backend.delete_topic(&t).await {
                eprintln!("cleanup of {t} failed: {e}");
            }
        }
    }
}

/// A numbered test message.
pub fn msg(i: usize) -> BackendMessage {
    BackendMessage::new(format!("payload-{i}")).with_header("n", i.to_string())
}

/// The number carried by a test message.
pub fn num(m: &BackendMessage) -> anyhow::Result<usize> {
    m.header("n")
        .ok_or_else(|| anyhow!("message {} has no n header", m.id))?
        .parse()
        .context("n header")
}

/// The next delivery within `within`.
pub async fn recv(
    sub: &mut Box<dyn BackendSubscription>,
    within: Duration,
) -> anyhow::Result<Delivery> {
    match tokio::time::timeout(within, sub.next()).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(anyhow!("no delivery within {within:?}")),
    }
}

/// Fails if a delivery arrives within `within`.
pub async fn expect_none(
    sub: &mut Box<dyn BackendSubscription>,
    within: Duration,
) -> anyhow::Result<()> {
    match tokio::time::timeout(within, sub.next()).await {
        Err(_) => Ok(()),
        Ok(Ok(d)) => Err(anyhow!(
            "unexpected delivery {} (attempt {}) on {}",
            d.id,
            d.attempt(),
            d.topic()
        )),
        Ok(Err(e)) => Err(anyhow!("subscription failed while expecting silence: {e}")),
    }
}

/// Receives and acknowledges `n` deliveries; returns their messages in arrival order.
pub async fn collect_acked(
    sub: &mut Box<dyn BackendSubscription>,
    n: usize,
    within: Duration,
) -> anyhow::Result<Vec<BackendMessage>> {
    let deadline = tokio::time::Instant::now() + within;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let d = recv(sub, left)
            .await
            .with_context(|| format!("after {} of {n} deliveries", out.len()))?;
        let m = d.message().clone();
        d.ack().await?;
        out.push(m);
    }
    Ok(out)
}

/// Runs one case on one backend: connects (or skips), runs with a time limit, cleans up.
pub async fn run<F, Fut>(case: &'static str, fixture: FixtureFn, body: F)
where
    F: FnOnce(Arc<Ctx>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let Some(fx) = fixture().await else { return };
    let name = fx.backend.name();
    let known = fx
        .known_issues
        .iter()
        .find(|(c, _)| *c == case)
        .map(|(_, why)| *why);
    let ctx = Arc::new(Ctx {
        caps: fx.backend.capabilities(),
        backend: fx.backend.clone(),
        case,
        run: uuid::Uuid::new_v4().simple().to_string()[..12].to_string(),
        topics: Mutex::new(Vec::new()),
        fixture,
        faults: fx.faults.clone(),
    });
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(40), body(ctx.clone())).await;
    ctx.cleanup().await;
    let _ = fx.backend.close().await;
    let took = started.elapsed();
    match (outcome, known) {
        (Ok(Ok(())), Some(why)) => {
            eprintln!(
                "XPASS {name}/{case} in {took:.2?}: passes despite known issue ({why}); remove it"
            )
        }
        (Ok(Err(e)), Some(why)) if e.downcast_ref::<Skip>().is_none() => {
            eprintln!("XFAIL {name}/{case}: {e:#} (known issue: {why})")
        }
        (Err(_), Some(why)) => eprintln!("XFAIL {name}/{case}: timed out (known issue: {why})"),
        (outcome, _) => report(name, case, took, outcome),
    }
}

fn report(
    name: &str,
    case: &str,
    took: Duration,
    outcome: Result<anyhow::Result<()>, tokio::time::error::Elapsed>,
) {
    match outcome {
        Err(_) => panic!("{name}/{case}: timed out after {took:?}"),
        Ok(Ok(())) => eprintln!("PASS {name}/{case} in {took:.2?}"),
        Ok(Err(e)) => match e.downcast_ref::<Skip>() {
            Some(skip) => eprintln!("SKIP {name}/{case}: {}", skip.0),
            None => panic!("{name}/{case} failed after {took:.2?}: {e:#}"),
        },
    }
}
