//! Handler middleware: `tower` layers for handler services (see [`crate::handler`]).
//!
//! A handler service takes an [`Envelope`] and returns `Result<(), E>`; its result settles the
//! delivery. Middleware stacks on it with a [`ServiceBuilder`], outermost first:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use ferry::middleware::{Backoff, DeadLetterLayer, RetryPolicy, ServiceBuilder, TimeoutLayer};
//! use ferry::{Broker, Envelope, HandlerError, HandlerOptions};
//!
//! let broker = Broker::default();
//! // Seed 004's DeadLetterHandler(RetryingHandler(TimeoutHandler(handler))): each call may take
//! // 30 s; a failure is retried 3 times, 1 s apart and doubling; then the message is
//! // dead-lettered with the handler's error as the reason.
//! let service = ServiceBuilder::new()
//!     .layer(DeadLetterLayer::new())
//!     .layer(RetryPolicy::new(3, Backoff::exponential(Duration::from_secs(1))).into_layer())
//!     .layer(TimeoutLayer::new(Duration::from_secs(30)))
//!     .service_fn(|e: Envelope| async move {
//!         let _order: u32 = e.decode()?;
//!         Ok::<(), HandlerError>(())
//!     });
//! let pool = broker.subscription("orders").serve(HandlerOptions::default(), service)?;
//! # drop(pool); Ok(()) }
//! ```
//!
//! What each piece is for:
//! - [`TimeoutLayer`] (tower): a call that takes longer fails (counted in
//!   [`HandlerStats::timed_out`](crate::HandlerStats)) and the message is redelivered.
//! - [`RetryPolicy`] with [`RetryLayer`] (tower): retries inside the same delivery, with
//!   exponential backoff and jitter. Retries do not count as delivery attempts.
//! - [`RedeliveryLayer`]: retries through the broker instead: a failure nacks the delivery with
//!   an exponentially growing redelivery delay, and the subscription's `max_attempts` then
//!   dead-letters it (seed 004's `DeadLetterPolicy` with `exponential_backoff`). Unlike an
//!   in-process retry, the message is not held by the handler while it waits.
//! - [`DeadLetterLayer`]: any failure is permanent: the message is dead-lettered at once with the
//!   error as its reason (seed 004's `DeadLetterHandler`).
//! - [`ConcurrencyLimitLayer`], [`RateLimitLayer`] (tower): at most N calls at once; at most N
//!   calls per period. The pool waits for the service to be ready before it takes a delivery,
//!   so waiting messages stay in the broker.
//! - [`DedupLayer`]: skips (and acks) a message whose id succeeded within a time window.
//! - [`BatchHandler`]: collects envelopes and calls a batch function when `size` are waiting
//!   or `timeout` after the first, whichever comes first.
//! - [`then`]: runs two handlers in sequence on each message (a handler chain).
//!
//! `tower` layers that need to clone the service they wrap ([`RetryLayer`]) must sit outside
//! layers whose services cannot be cloned ([`RateLimitLayer`]).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tower::{Layer, Service};

pub use tower::limit::{ConcurrencyLimitLayer, RateLimitLayer};
pub use tower::retry::RetryLayer;
pub use tower::timeout::TimeoutLayer;
pub use tower::ServiceBuilder;

use crate::handler::{is_permanent, BoxError, HandlerError, Rejected, RetryAfter};
use crate::message::MessageId;
use crate::subscription::Envelope;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A failure that middleware can classify: permanent failures are not retried.
pub trait Failure {
    /// Whether retrying cannot help (the message should be dead-lettered).
    fn is_permanent(&self) -> bool;
}

impl Failure for BoxError {
    fn is_permanent(&self) -> bool {
        is_permanent(self)
    }
}

impl Failure for HandlerError {
    fn is_permanent(&self) -> bool {
        matches!(self, HandlerError::Reject(_))
    }
}

/// Exponential backoff with jitter: the `n`th retry (from 0) waits
/// `min(initial * multiplier^n, max)`, less a random fraction of up to `jitter` of it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The first delay.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
    /// The growth factor between delays.
    pub multiplier: f64,
    /// The fraction (0..=1) of each delay that is randomised away, so that many failing
    /// handlers do not retry in lockstep.
    pub jitter: f64,
}

impl Backoff {
    /// Doubling delays from `initial`, at most 5 minutes, without jitter.
    pub fn exponential(initial: Duration) -> Self {
        Backoff {
            initial,
            max: Duration::from_secs(300),
            multiplier: 2.0,
            jitter: 0.0,
        }
    }

    /// The same delay every time.
    pub fn constant(delay: Duration) -> Self {
        Backoff {
            initial: delay,
            max: delay,
            multiplier: 1.0,
            jitter: 0.0,
        }
    }

    /// With this longest delay.
    pub fn with_max(self, max: Duration) -> Self {
        Backoff { max, ..self }
    }

    /// With this growth factor.
    pub fn with_multiplier(self, multiplier: f64) -> Self {
        Backoff { multiplier, ..self }
    }

    /// With this jitter fraction (clamped to 0..=1).
    pub fn with_jitter(self, jitter: f64) -> Self {
        Backoff {
            jitter: jitter.clamp(0.0, 1.0),
            ..self
        }
    }

    /// The delay before retry number `n` (from 0).
    pub fn delay(&self, n: u32) -> Duration {
        let exp = i32::try_from(n).unwrap_or(i32::MAX);
        let base = self.initial.as_secs_f64() * self.multiplier.max(1.0).powi(exp);
        let capped = base.min(self.max.as_secs_f64());
        let jittered = capped * (1.0 - self.jitter * fastrand::f64());
        Duration::try_from_secs_f64(jittered).unwrap_or(self.max)
    }
}

/// Counters of a retry policy, shared by all its clones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RetryStats {
    /// Calls made again after a failure.
    pub retries: u64,
    /// Messages that succeeded after at least one retry.
    pub recovered: u64,
    /// Messages whose retries ran out (their last error is passed on).
    pub exhausted: u64,
}

#[derive(Debug, Default)]
struct RetryCounters {
    retries: AtomicU64,
    recovered: AtomicU64,
    exhausted: AtomicU64,
}

/// A `tower` retry policy: up to `max_retries` more calls after a failure, waiting per
/// [`Backoff`]; permanent failures ([`Failure::is_permanent`]) are not retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    backoff: Backoff,
    max_retries: u32,
    /// Retries made so far for the current message (each message gets a fresh clone).
    done: u32,
    counters: Arc<RetryCounters>,
}

impl RetryPolicy {
    /// Up to `max_retries` retries, waiting per `backoff`.
    pub fn new(max_retries: u32, backoff: Backoff) -> Self {
        RetryPolicy {
            backoff,
            max_retries,
            done: 0,
            counters: Arc::default(),
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> RetryStats {
        RetryStats {
            retries: self.counters.retries.load(Ordering::Relaxed),
            recovered: self.counters.recovered.load(Ordering::Relaxed),
            exhausted: self.counters.exhausted.load(Ordering::Relaxed),
        }
    }

    /// The `tower` layer applying this policy.
    pub fn into_layer(self) -> RetryLayer<Self> {
        RetryLayer::new(self)
    }
}

impl<Req: Clone, Res, E: Failure> tower::retry::Policy<Req, Res, E> for RetryPolicy {
    type Future = tokio::time::Sleep;

    fn retry(&mut self, _req: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
        match result {
            Ok(_) => {
                if self.done > 0 {
                    self.counters.recovered.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
            Err(e) if e.is_permanent() => None,
            Err(_) if self.done >= self.max_retries => {
                self.counters.exhausted.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(_) => {
                let delay = self.backoff.delay(self.done);
                self.done += 1;
                self.counters.retries.fetch_add(1, Ordering::Relaxed);
                Some(tokio::time::sleep(delay))
            }
        }
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}

/// How a failure-rewriting layer turns a failed call's error into the one that settles the
/// delivery (see [`RedeliveryLayer`] and [`DeadLetterLayer`]).
pub trait RewriteFailure: Clone + Send + Sync + 'static {
    /// The error to settle with, for a call on delivery attempt `attempt` that failed with
    /// `error`.
    fn rewrite(&self, attempt: u32, error: BoxError) -> BoxError;
}

/// A layer that rewrites the errors of the service it wraps with `R`.
#[derive(Debug, Clone, Copy, Default)]
pub struct FailureLayer<R> {
    rewrite: R,
}

impl<S, R: Clone> Layer<S> for FailureLayer<R> {
    type Service = OnFailure<S, R>;
    fn layer(&self, inner: S) -> OnFailure<S, R> {
        OnFailure {
            inner,
            rewrite: self.rewrite.clone(),
        }
    }
}

/// The service of a [`FailureLayer`].
#[derive(Debug, Clone)]
pub struct OnFailure<S, R> {
    inner: S,
    rewrite: R,
}

impl<S, R> Service<Envelope> for OnFailure<S, R>
where
    S: Service<Envelope, Response = ()>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    R: RewriteFailure,
{
    type Response = ();
    type Error = BoxError;
    type Future = BoxFuture<Result<(), BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Envelope) -> Self::Future {
        let attempt = req.attempt();
        let rewrite = self.rewrite.clone();
        let fut = self.inner.call(req);
        Box::pin(async move { fut.await.map_err(|e| rewrite.rewrite(attempt, e.into())) })
    }
}

/// Retries through the broker: a failed call nacks its delivery with the redelivery delay
/// `backoff.delay(attempt - 1)`, so the delays grow with the delivery attempt; after the
/// subscription's `max_attempts` the message is dead-lettered. Permanent failures and failures
/// that already carry a delay pass unchanged.
pub type RedeliveryLayer = FailureLayer<Redeliver>;

/// The rewrite of [`RedeliveryLayer`]: a redelivery delay by attempt.
#[derive(Debug, Clone, Copy)]
pub struct Redeliver {
    backoff: Backoff,
}

impl RedeliveryLayer {
    /// Redelivery delays per `backoff`.
    pub fn new(backoff: Backoff) -> Self {
        FailureLayer {
            rewrite: Redeliver { backoff },
        }
    }
}

impl RewriteFailure for Redeliver {
    fn rewrite(&self, attempt: u32, error: BoxError) -> BoxError {
        if is_permanent(&error) || error.is::<RetryAfter>() {
            return error;
        }
        let delay = self.backoff.delay(attempt.saturating_sub(1));
        Box::new(RetryAfter { error, delay })
    }
}

/// Makes every failure permanent: the message is dead-lettered at once with the error's text
/// as its reason (seed 004's `DeadLetterHandler`). Put it outside a retry layer.
pub type DeadLetterLayer = FailureLayer<DeadLetter>;

impl DeadLetterLayer {
    /// The layer.
    pub fn new() -> Self {
        FailureLayer {
            rewrite: DeadLetter,
        }
    }
}

/// The rewrite of [`DeadLetterLayer`]: every failure becomes [`Rejected`].
#[derive(Debug, Clone, Copy, Default)]
pub struct DeadLetter;

impl RewriteFailure for DeadLetter {
    fn rewrite(&self, _attempt: u32, error: BoxError) -> BoxError {
        if is_permanent(&error) {
            error
        } else {
            Box::new(Rejected(error.to_string()))
        }
    }
}

/// Skips messages whose id was handled successfully within `window`: the duplicate is acked
/// without calling the handler, and counted. Only successes are remembered, so a redelivery
/// after a failure is handled again. At most `capacity` ids are remembered (the oldest are
/// forgotten first), which bounds the memory it takes.
#[derive(Debug, Clone)]
pub struct DedupLayer {
    window: Duration,
    capacity: usize,
    seen: Arc<Mutex<Seen>>,
}

#[derive(Debug, Default)]
struct Seen {
    at: HashMap<MessageId, Instant>,
    order: VecDeque<(Instant, MessageId)>,
    duplicates: u64,
}

impl Seen {
    fn forget_before(&mut self, cutoff: Option<Instant>, capacity: usize) {
        while let Some(&(t, id)) = self.order.front() {
            let stale = cutoff.is_some_and(|c| t < c) || self.order.len() > capacity;
            if !stale {
                break;
            }
            self.order.pop_front();
            if self.at.get(&id) == Some(&t) {
                self.at.remove(&id);
            }
        }
    }
}

impl DedupLayer {
    /// Remembers successful ids for `window`, at most 100,000 of them.
    pub fn new(window: Duration) -> Self {
        DedupLayer::with_capacity(window, 100_000)
    }

    /// Remembers successful ids for `window`, at most `capacity` of them.
    pub fn with_capacity(window: Duration, capacity: usize) -> Self {
        DedupLayer {
            window,
            capacity: capacity.max(1),
            seen: Arc::default(),
        }
    }

    /// Duplicates skipped so far (by this layer and every service it made).
    pub fn duplicates(&self) -> u64 {
        self.seen.lock().duplicates
    }
}

impl<S> Layer<S> for DedupLayer {
    type Service = Dedup<S>;
    fn layer(&self, inner: S) -> Dedup<S> {
        Dedup {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`DedupLayer`].
#[derive(Debug, Clone)]
pub struct Dedup<S> {
    inner: S,
    layer: DedupLayer,
}

impl<S> Service<Envelope> for Dedup<S>
where
    S: Service<Envelope, Response = ()>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = BoxFuture<Result<(), BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Envelope) -> Self::Future {
        let id = req.id();
        let layer = self.layer.clone();
        {
            let now = Instant::now();
            let mut seen = layer.seen.lock();
            seen.forget_before(now.checked_sub(layer.window), layer.capacity);
            if seen.at.contains_key(&id) {
                seen.duplicates += 1;
                return Box::pin(async { Ok(()) });
            }
        }
        let fut = self.inner.call(req);
        Box::pin(async move {
            fut.await.map_err(Into::into)?;
            let now = Instant::now();
            let mut seen = layer.seen.lock();
            seen.at.insert(id, now);
            seen.order.push_back((now, id));
            seen.forget_before(None, layer.capacity);
            Ok(())
        })
    }
}

/// Runs `first`, then — if it succeeded — `second`, on each message: a chain of handlers.
/// The first failure ends the chain and settles the delivery.
pub fn then<A, B>(first: A, second: B) -> Then<A, B> {
    Then { first, second }
}

/// The service of [`then`].
#[derive(Debug, Clone)]
pub struct Then<A, B> {
    first: A,
    second: B,
}

impl<A, B> Service<Envelope> for Then<A, B>
where
    A: Service<Envelope, Response = ()>,
    A::Error: Into<BoxError>,
    A::Future: Send + 'static,
    B: Service<Envelope, Response = ()> + Clone + Send + 'static,
    B::Error: Into<BoxError>,
    B::Future: Send + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = BoxFuture<Result<(), BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.first.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Envelope) -> Self::Future {
        let fut = self.first.call(req.clone());
        // The clone is driven to readiness inside the future, as tower's own combinators do.
        let mut second = self.second.clone();
        Box::pin(async move {
            fut.await.map_err(Into::into)?;
            std::future::poll_fn(|cx| second.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            second.call(req).await.map_err(Into::into)
        })
    }
}

/// Counters of a batch handler.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BatchStats {
    /// Batches handed to the function because they were full.
    pub full: u64,
    /// Batches handed to the function because their timeout passed.
    pub timed_out: u64,
    /// Messages in all batches.
    pub messages: u64,
}

/// How a batch ended, shared by every message in it.
#[derive(Debug, Clone)]
enum BatchOutcome {
    Done,
    Rejected(String),
    Failed(String, Option<Duration>),
}

impl BatchOutcome {
    fn of(result: Result<Result<(), HandlerError>, ()>) -> Self {
        match result {
            Ok(Ok(())) => BatchOutcome::Done,
            Ok(Err(HandlerError::Reject(reason))) => BatchOutcome::Rejected(reason),
            Ok(Err(HandlerError::Retry { error, delay })) => {
                BatchOutcome::Failed(format!("batch failed: {error}"), delay)
            }
            Err(()) => BatchOutcome::Failed("batch handler panicked".into(), None),
        }
    }

    fn into_result(self) -> Result<(), BoxError> {
        match self {
            BatchOutcome::Done => Ok(()),
            BatchOutcome::Rejected(reason) => Err(Box::new(Rejected(reason))),
            BatchOutcome::Failed(error, None) => Err(error.into()),
            BatchOutcome::Failed(error, Some(delay)) => Err(Box::new(RetryAfter {
                error: error.into(),
                delay,
            })),
        }
    }
}

struct Pending {
    envelopes: Vec<Envelope>,
    waiters: Vec<oneshot::Sender<BatchOutcome>>,
    /// Counts the batches taken, so that a timer only flushes the batch it was started for.
    generation: u64,
    stats: BatchStats,
}

type BatchFn = dyn Fn(Vec<Envelope>) -> BoxFuture<Result<(), HandlerError>> + Send + Sync;

struct BatchShared {
    size: usize,
    timeout: Duration,
    handler: Box<BatchFn>,
    pending: Mutex<Pending>,
}

/// A handler service that hands messages to a batch function: when `size` messages are
/// waiting, or `timeout` after the first of a batch arrived, whichever comes first (seed 004's
/// `BatchMessageHandler`). The batch's result settles every message in it.
///
/// A batch only fills if the pool runs at least `size` calls at once and the subscription lets
/// at least `size` messages be in flight (its prefetch); otherwise batches leave on the timeout.
#[derive(Clone)]
pub struct BatchHandler {
    shared: Arc<BatchShared>,
}

impl std::fmt::Debug for BatchHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchHandler")
            .field("size", &self.shared.size)
            .field("timeout", &self.shared.timeout)
            .finish()
    }
}

impl BatchHandler {
    /// Batches of at most `size` (at least 1), flushed `timeout` after their first message.
    pub fn new<F, Fut>(size: usize, timeout: Duration, handler: F) -> Self
    where
        F: Fn(Vec<Envelope>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        BatchHandler {
            shared: Arc::new(BatchShared {
                size: size.max(1),
                timeout,
                handler: Box::new(move |batch| Box::pin(handler(batch))),
                pending: Mutex::new(Pending {
                    envelopes: Vec::new(),
                    waiters: Vec::new(),
                    generation: 0,
                    stats: BatchStats::default(),
                }),
            }),
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> BatchStats {
        self.shared.pending.lock().stats
    }

    /// Takes the waiting batch (if any) and runs the batch function on it in a task.
    fn flush(shared: &Arc<BatchShared>, pending: &mut Pending, by_timeout: bool) {
        if pending.envelopes.is_empty() {
            return;
        }
        pending.generation += 1;
        let batch = std::mem::take(&mut pending.envelopes);
        let waiters = std::mem::take(&mut pending.waiters);
        pending.stats.messages += batch.len() as u64;
        if by_timeout {
            pending.stats.timed_out += 1;
        } else {
            pending.stats.full += 1;
        }
        let run = AssertUnwindSafe((shared.handler)(batch)).catch_unwind();
        tokio::spawn(async move {
            let outcome = BatchOutcome::of(run.await.map_err(|_| ()));
            for waiter in waiters {
                let _ = waiter.send(outcome.clone());
            }
        });
    }
}

impl Service<Envelope> for BatchHandler {
    type Response = ();
    type Error = BoxError;
    type Future = BoxFuture<Result<(), BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Envelope) -> Self::Future {
        let (tx, rx) = oneshot::channel();
        let shared = &self.shared;
        let mut pending = shared.pending.lock();
        pending.envelopes.push(req);
        pending.waiters.push(tx);
        if pending.envelopes.len() >= shared.size {
            BatchHandler::flush(shared, &mut pending, false);
        } else if pending.envelopes.len() == 1 {
            let generation = pending.generation;
            let timer = shared.clone();
            tokio::spawn(async move {
                tokio::time::sleep(timer.timeout).await;
                let mut pending = timer.pending.lock();
                if pending.generation == generation {
                    BatchHandler::flush(&timer, &mut pending, true);
                }
            });
        }
        drop(pending);
        Box::pin(async move {
            match rx.await {
                Ok(outcome) => outcome.into_result(),
                Err(_) => Err("the batch was dropped before it ran".into()),
            }
        })
    }
}
