//! Handler pools: run an async function for every delivery of a subscription, with a
//! concurrency limit, panic isolation and settlement from the function's result.
//!
//! `Ok(())` acks; [`HandlerError::Retry`] (and any `std::error::Error` turned into it by `?`)
//! nacks, optionally with a delay; [`HandlerError::Reject`] dead-letters at once; a panic is
//! caught, counted as an error and nacked. The broker and the other handlers keep running.
//! In auto-ack mode nothing is redelivered; errors and panics are only counted.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use serde::Serialize;
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::consumer::Settle;
use crate::subscription::{Delivery, Subscription};

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a handler returns when it did not process a message.
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

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandlerError::Retry { error, .. } => write!(f, "handler failed: {error}"),
            HandlerError::Reject(r) => write!(f, "handler rejected the message: {r}"),
        }
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
    /// Calls that returned an error.
    pub failed: u64,
    /// Calls that panicked.
    pub panicked: u64,
}

#[derive(Default)]
struct Counts {
    succeeded: AtomicU64,
    failed: AtomicU64,
    panicked: AtomicU64,
}

/// A running handler pool. Dropping it leaves the pool running until the broker closes;
/// [`stop`](Self::stop) stops it.
#[derive(Debug)]
pub struct HandlerHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    counts: Arc<Counts>,
}

impl std::fmt::Debug for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Counts")
    }
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
        F: Fn(Delivery) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let mut b = self;
        if !b.mode_set {
            b.mode = crate::AckMode::Manual;
        }
        Ok(b.build()?.handle(options, handler))
    }
}

impl Subscription {
    /// Runs `handler` for every delivery, at most `options.concurrency` at a time.
    /// Must be called inside a Tokio runtime.
    pub fn handle<F, Fut>(mut self, options: HandlerOptions, handler: F) -> HandlerHandle
    where
        F: Fn(Delivery) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let (stop, mut stopped) = watch::channel(false);
        let counts = Arc::new(Counts::default());
        let handler = Arc::new(handler);
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
                let delivery = tokio::select! {
                    d = self.recv() => d,
                    _ = stopped.wait_for(|s| *s) => break,
                };
                let Ok(mut delivery) = delivery else {
                    break;
                };
                let token = delivery.detach_ack();
                let consumer = self.consumer.clone();
                let record = delivery.record().clone();
                let topic = delivery.topic().clone();
                let handler = handler.clone();
                let counts = pool_counts.clone();
                let broker = self.broker.inner.clone();
                broker.active_handlers.fetch_add(1, Ordering::AcqRel);
                running.spawn(async move {
                    let outcome = AssertUnwindSafe(async move { handler(delivery).await })
                        .catch_unwind()
                        .await;
                    let settle = match outcome {
                        Ok(Ok(())) => {
                            counts.succeeded.fetch_add(1, Ordering::Relaxed);
                            Settle::Ack
                        }
                        Ok(Err(e)) => {
                            counts.failed.fetch_add(1, Ordering::Relaxed);
                            consumer.count_error(&topic);
                            tracing::debug!(topic = %topic, offset = record.offset(), error = %e, "handler failed");
                            match e {
                                HandlerError::Retry { delay, .. } => Settle::Nack(delay),
                                HandlerError::Reject(reason) => Settle::Reject(reason),
                            }
                        }
                        Err(_) => {
                            counts.panicked.fetch_add(1, Ordering::Relaxed);
                            consumer.count_error(&topic);
                            tracing::warn!(topic = %topic, offset = record.offset(), "handler panicked");
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
