//! Choosing a backend by URL, and connecting with bounded retries.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::api::Backend;
use crate::error::{BackendError, Result};

/// Bounded retries with exponential backoff, used when connecting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all (at least 1).
    pub attempts: u32,
    /// The wait after the first failure; doubled after each further one.
    pub initial_backoff: Duration,
    /// The longest wait between attempts.
    pub max_backoff: Duration,
    /// How long one attempt may take.
    pub attempt_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 4,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// One attempt, no retry.
    pub fn once(attempt_timeout: Duration) -> Self {
        RetryPolicy {
            attempts: 1,
            attempt_timeout,
            ..RetryPolicy::default()
        }
    }

    /// Runs `op` until it succeeds, fails with a non-transient error, or the attempts run out.
    /// Each attempt is bounded by `attempt_timeout`; waits grow from `initial_backoff` to
    /// `max_backoff` with ±25% jitter.
    pub async fn run<T, F, Fut>(&self, backend: &'static str, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let attempts = self.attempts.max(1);
        let mut backoff = self.initial_backoff;
        let mut last = None;
        for attempt in 1..=attempts {
            let outcome = match tokio::time::timeout(self.attempt_timeout, op()).await {
                Ok(r) => r,
                Err(_) => Err(BackendError::Timeout {
                    backend,
                    operation: what.to_string(),
                    after: self.attempt_timeout,
                }),
            };
            match outcome {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() && attempt < attempts => {
                    tracing::debug!(backend, what, attempt, error = %e, "retrying");
                    last = Some(e);
                    let jitter = 0.75 + fastrand_f64() * 0.5;
                    tokio::time::sleep(backoff.mul_f64(jitter)).await;
                    backoff = (backoff * 2).min(self.max_backoff);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(BackendError::Unreachable {
            backend,
            reason: format!("{what}: no attempt made"),
        }))
    }
}

/// A cheap jitter source (no extra dependency): the low bits of the clock.
fn fastrand_f64() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1000) / 1000.0
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Connect retries.
    pub retry: RetryPolicy,
    /// How long one publish (or batch) may take, confirmation included, before it fails with
    /// [`BackendError::Timeout`] before the message was sent, [`BackendError::InDoubt`] after
    /// (default 10 s): then it may still have been stored and the caller cannot tell (a retry
    /// is at-least-once).
    pub operation_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            retry: RetryPolicy::default(),
            operation_timeout: Duration::from_secs(10),
        }
    }
}

/// Bounds `op` by `after`: [`BackendError::Timeout`] when it runs out.
pub(crate) async fn bounded<T>(
    backend: &'static str,
    operation: &str,
    after: Duration,
    op: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(after, op).await {
        Ok(r) => r,
        Err(_) => Err(BackendError::Timeout {
            backend,
            operation: operation.to_string(),
            after,
        }),
    }
}

/// A connection attempt that timed out (the server accepted the TCP connection but never
/// completed the handshake) means the backend is unreachable, as a refused one does.
pub(crate) fn timeout_is_unreachable(e: BackendError) -> BackendError {
    match e {
        BackendError::Timeout {
            backend,
            operation,
            after,
        } => BackendError::Unreachable {
            backend,
            reason: format!("{operation} timed out after {after:?}"),
        },
        other => other,
    }
}

/// Connects to the backend named by `url` with the default retries:
///
/// | URL | backend |
/// | --- | --- |
/// | `memory://` | embedded Ferry, in memory |
/// | `file:///path/to/dir` | embedded Ferry, durable on disk ([`ferry::Broker::open`]) |
/// | `nats://host:4222` | NATS JetStream |
/// | `redis://host:6379` | Redis Streams |
/// | `amqp://user:pass@host:5672/vhost` | RabbitMQ |
/// | `kafka://host:9092` | Kafka (cargo feature `kafka`) |
///
/// Each adapter documents the query parameters it understands (`?stream=`, `?exchange=`, ...).
pub async fn connect(url: &str) -> Result<Arc<dyn Backend>> {
    connect_with(url, ConnectOptions::default()).await
}

/// Connects with explicit options.
pub async fn connect_with(url: &str, options: ConnectOptions) -> Result<Arc<dyn Backend>> {
    let parsed = url::Url::parse(url).map_err(|e| BackendError::InvalidUrl {
        url: url.to_string(),
        reason: e.to_string(),
    })?;
    match parsed.scheme() {
        "memory" => Ok(Arc::new(
            crate::adapters::embedded::EmbeddedBackend::from_url(&parsed)?,
        )),
        "file" => Ok(Arc::new(
            crate::adapters::embedded::EmbeddedBackend::open_url(&parsed).await?,
        )),
        "nats" => Ok(Arc::new(
            crate::adapters::nats::NatsBackend::connect(&parsed, &options).await?,
        )),
        "redis" => Ok(Arc::new(
            crate::adapters::redis::RedisBackend::connect(&parsed, &options).await?,
        )),
        "amqp" => Ok(Arc::new(
            crate::adapters::rabbitmq::RabbitBackend::connect(&parsed, &options).await?,
        )),
        #[cfg(feature = "kafka")]
        "kafka" => Ok(Arc::new(
            crate::adapters::kafka::KafkaBackend::connect(&parsed, &options).await?,
        )),
        #[cfg(not(feature = "kafka"))]
        "kafka" => Err(BackendError::unsupported(
            "kafka",
            "kafka:// (build ferry-backends with the `kafka` feature)",
        )),
        other => Err(BackendError::InvalidUrl {
            url: url.to_string(),
            reason: format!(
                "unknown scheme {other:?} (expected memory, file, nats, redis, amqp or kafka)"
            ),
        }),
    }
}

/// A query parameter of `url`.
pub(crate) fn query(url: &url::Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// A numeric query parameter.
pub(crate) fn query_num<T: std::str::FromStr>(url: &url::Url, name: &str) -> Result<Option<T>> {
    match query(url, name) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| BackendError::InvalidUrl {
            url: url.to_string(),
            reason: format!("query parameter {name}={v:?} is not a valid number"),
        }),
    }
}

/// The shared "closed" state of a backend handle and its subscriptions.
#[derive(Debug, Clone, Default)]
pub(crate) struct Lifecycle {
    token: tokio_util::sync::CancellationToken,
}

impl Lifecycle {
    pub(crate) fn check(&self) -> Result<()> {
        if self.token.is_cancelled() {
            Err(BackendError::Closed)
        } else {
            Ok(())
        }
    }

    pub(crate) fn close(&self) {
        self.token.cancel();
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.token.is_cancelled()
    }

    /// A child token: cancelled with the backend, or on its own (one subscription).
    pub(crate) fn child(&self) -> tokio_util::sync::CancellationToken {
        self.token.child_token()
    }
}

/// `url` with its password (if any) replaced by `***`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}
