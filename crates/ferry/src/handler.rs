//! Handler pools: run a handler for every delivery of a subscription, with a concurrency limit,
//! panic isolation and settlement from the handler's result.
//!
//! A handler is a [`tower::Service`] of [`Envelope`]s, so the middleware of `tower` and of
//! [`crate::middleware`] (timeouts, retries with backoff, rate and concurrency limits, batching,
//! de-duplication, dead-lettering) stacks on it with a `tower::ServiceBuilder`. A plain async
//! function is one too, through [`Subscription::handle`].
//!
//! How a result settles the delivery:
//! - `Ok(())` acks;
//! - an error nacks (the message is redelivered until its attempts run out); a [`RetryAfter`]
//!   error nacks with that redelivery delay;
//! - a [`Rejected`] error dead-letters at once, with its reason;
//! - a panic is caught, counted, and nacked. The broker and the other handlers keep running.
//!
//! [`HandlerError`] is the convenient return type of handler functions: its variants become
//! [`RetryAfter`]/[`Rejected`], and `?` turns any `std::error::Error` into a retry.
//! In auto-ack mode nothing is redelivered; errors and panics are only counted.

use std::future::{poll_fn, Future};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use serde::Serialize;
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tower::Service;

use crate::consumer::Settle;
use crate::subscription::{Envelope, Subscription};

/// The error type of handler services: any error, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A permanent failure: the message is dead-lettered with this reason and not retried.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub String);

/// A transient failure: the message is redelivered after `delay`.
#[derive(Debug, thiserror::Error)]
#[error("{error} (redelivery in {delay:?})")]
pub struct RetryAfter {
    /// The failure.
    #[source]
    pub error: BoxError,
    /// How long to wait before redelivery.
    pub delay: Duration,
}

/// What a handler function returns when it did not process a message.
#[derive(Debug)]
pub enum HandlerError {
    /// A transient failure: redeliver (after `delay`, if given) until the attempts run out.
    Retry {
        /// The failure.
        error: BoxError,
        /// How long to wait before redelivery.
        delay: Option<Duration>,
    },
    /// A permanent failure: dead-letter the message with this reason.
    Reject(String),
}

impl HandlerError {
    /// A transient failure with a message.
    pub fn retry(error: impl Into<BoxError>) -> Self {
        HandlerError::Retry {
            error: error.into(),
            delay: None,
        }
    }

    /// A transient failure; redeliver after `delay`.
    pub fn retry_after(error: impl Into<BoxError>, delay: Duration) -> Self {
        HandlerError::Retry {
            error: error.into(),
            delay: Some(delay),
        }
    }

    /// A permanent failure.
    pub fn reject(reason: impl Into<String>) -> Self {
        HandlerError::Reject(reason.into())
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(e: E) -> Self {
        HandlerError::retry(e)
    }
}

impl From<HandlerError> for BoxError {
    fn from(e: HandlerError) -> BoxError {
        match e {
            HandlerError::Retry { error, delay: None } => error,
            HandlerError::Retry {
                error,
                delay: Some(delay),
            } => Box::new(RetryAfter { error, delay }),
            HandlerError::Reject(reason) => Box::new(Rejected(reason)),
        }
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandlerError::Retry { error, .. } => write!(f, "handler failed: {error}"),
            HandlerError::Reject(r) => write!(f, "handler rejected the message: {r}"),
        }
    }
}

/// Whether an error asks for the message to be dead-lettered rather than retried.
pub fn is_permanent(error: &BoxError) -> bool {
    error.is::<Rejected>()
}

/// How an error settles a delivery.
fn settlement(error: &BoxError) -> Settle {
    if let Some(Rejected(reason)) = error.downcast_ref::<Rejected>() {
        Settle::Reject(reason.clone())
    } else if let Some(r) = error.downcast_ref::<RetryAfter>() {
        Settle::Nack(Some(r.delay))
    } else {
        Settle::Nack(None)
    }
}

/// Options of a handler pool.
#[derive(Debug, Clone)]
pub struct HandlerOptions {
    /// The most handler calls running at once (the worker-pool size).
    pub concurrency: usize,
}

impl Default for HandlerOptions {
    fn default() -> Self {
        HandlerOptions { concurrency: 100 }
    }
}

/// Counters of a handler pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct HandlerStats {
    /// Calls that returned `Ok`.
    pub succeeded: u64,
    /// Calls that returned an error (timeouts included).
    pub failed: u64,
    /// Calls that failed because a timeout layer cut them off.
    pub timed_out: u64,
    /// Calls that panicked.
    pub panicked: u64,
}

#[derive(Default)]
struct Counts {
    succeeded: AtomicU64,
    failed: AtomicU64,
    timed_out: AtomicU64,
    panicked: AtomicU64,
}

impl std::fmt::Debug for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Counts")
    }
}

/// A running handler pool. Dropping it leaves the pool running until the broker closes;
/// [`stop`](Self::stop) stops it.
#[derive(Debug)]
pub struct HandlerHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    counts: Arc<Counts>,
}

impl HandlerHandle {
    /// Counters so far.
    pub fn stats(&self) -> HandlerStats {
        HandlerHandle::snapshot(&self.counts)
    }

    /// Stops taking new messages, waits for running calls to finish, and unsubscribes.
    pub async fn stop(self) -> HandlerStats {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        HandlerHandle::snapshot(&self.counts)
    }

    /// Waits until the pool ends by itself (the broker closed or the subscription was evicted).
    pub async fn join(self) -> HandlerStats {
        let _ = self.task.await;
        HandlerHandle::snapshot(&self.counts)
    }

    fn snapshot(counts: &Counts) -> HandlerStats {
        HandlerStats {
            succeeded: counts.succeeded.load(Ordering::Relaxed),
            failed: counts.failed.load(Ordering::Relaxed),
            timed_out: counts.timed_out.load(Ordering::Relaxed),
            panicked: counts.panicked.load(Ordering::Relaxed),
        }
    }
}

impl crate::SubscriptionBuilder {
    /// Subscribes and runs `handler` for every delivery (see [`Subscription::handle`]).
    /// Handler subscriptions default to manual acknowledgement, so that errors and panics lead
    /// to redelivery; call [`ack_mode`](Self::ack_mode) with `AckMode::Auto` for at-most-once.
    pub fn handle<F, Fut>(
        self,
        options: HandlerOptions,
        handler: F,
    ) -> Result<HandlerHandle, crate::SubscribeError>
    where
        F: Fn(Envelope) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        Ok(self.handler_subscription()?.handle(options, handler))
    }

    /// Subscribes and runs the `tower` service for every delivery (see [`Subscription::serve`]).
    /// Defaults to manual acknowledgement, as [`handle`](Self::handle) does.
    pub fn serve<S>(
        self,
        options: HandlerOptions,
        service: S,
    ) -> Result<HandlerHandle, crate::SubscribeError>
    where
        S: Service<Envelope, Response = ()> + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        Ok(self.handler_subscription()?.serve(options, service))
    }

    fn handler_subscription(self) -> Result<Subscription, crate::SubscribeError> {
        let mut b = self;
        if !b.mode_set {
            b.mode = crate::AckMode::Manual;
        }
        b.build()
    }
}

impl Subscription {
    /// Runs the async function `handler` for every delivery, at most `options.concurrency` at
    /// a time. Must be called inside a Tokio runtime.
    pub fn handle<F, Fut>(self, options: HandlerOptions, handler: F) -> HandlerHandle
    where
        F: Fn(Envelope) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.serve(options, tower::service_fn(handler))
    }

    /// Runs the `tower` service for every delivery, at most `options.concurrency` calls at a
    /// time. The pool waits for the service to be ready before it takes the next delivery, so a
    /// rate or concurrency limit in the stack holds messages in the broker (where they count
    /// as in flight or queued) rather than in memory. Must be called inside a Tokio runtime.
    pub fn serve<S>(mut self, options: HandlerOptions, mut service: S) -> HandlerHandle
    where
        S: Service<Envelope, Response = ()> + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let (stop, mut stopped) = watch::channel(false);
        let counts = Arc::new(Counts::default());
        let pool_counts = counts.clone();
        let permits = Arc::new(Semaphore::new(options.concurrency.max(1)));
        let task = tokio::spawn(async move {
            let mut running = JoinSet::new();
            loop {
                let permit = tokio::select! {
                    p = permits.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    _ = stopped.wait_for(|s| *s) => break,
                };
                let ready = tokio::select! {
                    r = AssertUnwindSafe(poll_fn(|cx| service.poll_ready(cx))).catch_unwind() => {
                        r.map(|r| r.map_err(Into::<BoxError>::into))
                    }
                    _ = stopped.wait_for(|s| *s) => break,
                };
                match ready {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "handler service failed; the pool stops");
                        break;
                    }
                    Err(_) => {
                        tracing::error!("handler service panicked when polled; the pool stops");
                        break;
                    }
                }
                let delivery = tokio::select! {
                    d = self.recv() => d,
                    _ = stopped.wait_for(|s| *s) => break,
                };
                let Ok(delivery) = delivery else {
                    break;
                };
                let (envelope, token) = delivery.detach();
                let call =
                    std::panic::catch_unwind(AssertUnwindSafe(|| service.call(envelope.clone())));
                let consumer = self.consumer.clone();
                let counts = pool_counts.clone();
                let broker = self.broker.inner.clone();
                broker.active_handlers.fetch_add(1, Ordering::AcqRel);
                running.spawn(async move {
                    let outcome = match call {
                        Ok(fut) => AssertUnwindSafe(fut).catch_unwind().await,
                        Err(panic) => Err(panic),
                    };
                    let topic = envelope.topic();
                    let settle = match outcome {
                        Ok(Ok(())) => {
                            counts.succeeded.fetch_add(1, Ordering::Relaxed);
                            Settle::Ack
                        }
                        Ok(Err(e)) => {
                            let e: BoxError = e.into();
                            counts.failed.fetch_add(1, Ordering::Relaxed);
                            if e.is::<tower::timeout::error::Elapsed>() {
                                counts.timed_out.fetch_add(1, Ordering::Relaxed);
                            }
                            consumer.count_error(topic);
                            tracing::debug!(topic = %topic, offset = envelope.offset(), error = %e, "handler failed");
                            settlement(&e)
                        }
                        Err(_) => {
                            counts.panicked.fetch_add(1, Ordering::Relaxed);
                            consumer.count_error(topic);
                            tracing::warn!(topic = %topic, offset = envelope.offset(), "handler panicked");
                            Settle::Nack(None)
                        }
                    };
                    if let Some(token) = token {
                        let _ = token.settle(settle);
                    }
                    broker.active_handlers.fetch_sub(1, Ordering::AcqRel);
                    drop(permit);
                });
                while running.try_join_next().is_some() {}
            }
            while running.join_next().await.is_some() {}
        });
        HandlerHandle { stop, task, counts }
    }
}
