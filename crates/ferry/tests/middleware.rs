//! Handler middleware on virtual time: seed 004's handler examples (retrying handler with a
//! dead-letter handler around it, DLQ policy with exponential backoff, batch handler, timeout
//! handler), limits, de-duplication and chains.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use ferry::middleware::{
    then, Backoff, BatchHandler, ConcurrencyLimitLayer, DeadLetterLayer, DedupLayer,
    RateLimitLayer, RedeliveryLayer, RetryPolicy, ServiceBuilder, TimeoutLayer,
};
use ferry::{Broker, DeadLetterReason, Envelope, HandlerError, HandlerOptions, Message};

/// What a test records: a value (message number or batch) and when, in virtual seconds.
type Log<T> = Arc<Mutex<Vec<(T, f64)>>>;

/// Seconds since `start`, rounded to milliseconds.
fn secs(start: Instant) -> f64 {
    (start.elapsed().as_millis() as f64) / 1000.0
}

async fn publish_n(broker: &Broker, topic: &str, n: u32) {
    for i in 0..n {
        broker
            .publish(topic, Message::json(&i).unwrap())
            .await
            .unwrap();
    }
}

/// Waits (in virtual time) until `done` holds, at most a virtual hour.
async fn until(done: impl Fn() -> bool) {
    for _ in 0..36_000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("condition not reached within an hour of virtual time");
}

#[tokio::test(start_paused = true)]
async fn retrying_handler_then_dead_letter_handler() {
    // DeadLetterHandler(RetryingHandler(handler, RetryPolicy(max_retries=3, initial=1s))).
    let broker = Broker::default();
    let calls: Log<u32> = Arc::default();
    let start = Instant::now();
    let policy = RetryPolicy::new(3, Backoff::exponential(Duration::from_secs(1)));
    let c = calls.clone();
    let service = ServiceBuilder::new()
        .layer(DeadLetterLayer::new())
        .layer(policy.clone().into_layer())
        .service_fn(move |e: Envelope| {
            let c = c.clone();
            async move {
                let n: u32 = e.decode()?;
                let tries = {
                    let mut c = c.lock();
                    c.push((n, secs(start)));
                    c.iter().filter(|(m, _)| *m == n).count()
                };
                // Message 0 recovers on its third call; message 1 never does.
                if n == 0 && tries == 3 {
                    Ok(())
                } else {
                    Err(HandlerError::retry(format!("database down for {n}")))
                }
            }
        });
    let pool = broker
        .subscription("orders")
        .serve(HandlerOptions { concurrency: 1 }, service)
        .unwrap();
    publish_n(&broker, "orders", 2).await;
    let dlq = broker.dead_letters("orders").unwrap();
    until(|| dlq.len() == 1).await;

    let calls = calls.lock().clone();
    let times = |n: u32| -> Vec<f64> {
        calls
            .iter()
            .filter(|(m, _)| *m == n)
            .map(|(_, t)| *t)
            .collect()
    };
    // Exponential backoff, 1 s then 2 s then 4 s, within one delivery.
    assert_eq!(times(0), vec![0.0, 1.0, 3.0]);
    assert_eq!(times(1), vec![3.0, 4.0, 6.0, 10.0]);
    let letter = &dlq.list(10)[0];
    assert_eq!(letter.source_offset, 1);
    assert_eq!(letter.attempts, 1, "in-process retries are one delivery");
    assert_eq!(
        letter.reason,
        DeadLetterReason::Rejected("database down for 1".into())
    );
    assert_eq!(
        policy.stats(),
        ferry::middleware::RetryStats {
            retries: 5,
            recovered: 1,
            exhausted: 1
        }
    );
    let stats = pool.stop().await;
    assert_eq!((stats.succeeded, stats.failed), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn dlq_policy_with_exponential_backoff_redelivers_through_the_broker() {
    // DeadLetterPolicy(max_retries=3, retry_delay=1s, exponential_backoff=True): four attempts
    // in all, 1 s, 2 s and 4 s apart, then the dead-letter queue with reason max_attempts.
    let broker = Broker::default();
    let attempts: Log<u32> = Arc::default();
    let start = Instant::now();
    let a = attempts.clone();
    let service = ServiceBuilder::new()
        .layer(RedeliveryLayer::new(Backoff::exponential(
            Duration::from_secs(1),
        )))
        .service_fn(move |e: Envelope| {
            a.lock().push((e.attempt(), secs(start)));
            async move { Err::<(), _>(HandlerError::retry("still failing")) }
        });
    let pool = broker
        .subscription("tasks")
        .max_attempts(4)
        .serve(HandlerOptions::default(), service)
        .unwrap();
    publish_n(&broker, "tasks", 1).await;
    let dlq = broker.dead_letters("tasks").unwrap();
    until(|| dlq.len() == 1).await;
    let seen = attempts.lock().clone();
    let attempt_numbers: Vec<u32> = seen.iter().map(|(n, _)| *n).collect();
    assert_eq!(attempt_numbers, vec![1, 2, 3, 4]);
    let gaps: Vec<f64> = seen.windows(2).map(|w| w[1].1 - w[0].1).collect();
    for (gap, want) in gaps.iter().zip([1.0, 2.0, 4.0]) {
        assert!(
            (*gap - want).abs() < 0.2,
            "redelivery gaps {gaps:?} should be 1 s, 2 s, 4 s"
        );
    }
    let letter = &dlq.list(1)[0];
    assert_eq!(letter.reason, DeadLetterReason::MaxAttempts);
    assert_eq!(letter.attempts, 4);
    pool.stop().await;
}

#[tokio::test(start_paused = true)]
async fn jitter_shortens_delays_within_bounds() {
    let backoff = Backoff::exponential(Duration::from_secs(2))
        .with_max(Duration::from_secs(10))
        .with_jitter(0.5);
    let mut distinct = std::collections::HashSet::new();
    for _ in 0..200 {
        let d = backoff.delay(1);
        assert!(
            d <= Duration::from_secs(4) && d >= Duration::from_secs(2),
            "{d:?}"
        );
        distinct.insert(d);
        let capped = backoff.delay(10);
        assert!(capped <= Duration::from_secs(10) && capped >= Duration::from_secs(5));
    }
    assert!(distinct.len() > 10, "jitter varies the delay");
    assert_eq!(
        Backoff::constant(Duration::from_secs(3)).delay(7),
        Duration::from_secs(3)
    );
}

#[tokio::test(start_paused = true)]
async fn timeout_handler_cuts_slow_calls_and_redelivers() {
    // TimeoutHandler(handler, timeout=1s): the first attempt hangs, the second is quick.
    let broker = Broker::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let service = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_secs(1)))
        .service_fn(move |e: Envelope| {
            c.fetch_add(1, Ordering::SeqCst);
            async move {
                if e.attempt() == 1 {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                Ok::<(), HandlerError>(())
            }
        });
    let pool = broker
        .subscription("slow")
        .serve(HandlerOptions::default(), service)
        .unwrap();
    let start = Instant::now();
    publish_n(&broker, "slow", 1).await;
    until(|| pool.stats().succeeded == 1).await;
    assert!(start.elapsed() < Duration::from_secs(5), "not an hour");
    let stats = pool.stop().await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!((stats.failed, stats.timed_out), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn handler_that_always_times_out_is_dead_lettered() {
    let broker = Broker::default();
    let service = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_millis(500)))
        .service_fn(|_e: Envelope| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<(), HandlerError>(())
        });
    let pool = broker
        .subscription("hang")
        .max_attempts(2)
        .serve(HandlerOptions::default(), service)
        .unwrap();
    publish_n(&broker, "hang", 3).await;
    let dlq = broker.dead_letters("hang").unwrap();
    until(|| dlq.len() == 3).await;
    assert!(dlq
        .list(3)
        .iter()
        .all(|l| l.reason == DeadLetterReason::MaxAttempts));
    let stats = pool.stop().await;
    assert_eq!(stats.timed_out, 6);
}

#[tokio::test(start_paused = true)]
async fn batch_handler_flushes_on_size_or_timeout() {
    // BatchMessageHandler(batch_size=100, batch_timeout=5s) with 250 messages: two full batches
    // at once, the last 50 after the timeout.
    let broker = Broker::default();
    let batches: Log<Vec<u32>> = Arc::default();
    let start = Instant::now();
    let b = batches.clone();
    let handler = BatchHandler::new(100, Duration::from_secs(5), move |batch: Vec<Envelope>| {
        let b = b.clone();
        async move {
            let values = batch
                .iter()
                .map(|e| e.decode::<u32>())
                .collect::<Result<Vec<_>, _>>()?;
            b.lock().push((values, secs(start)));
            Ok(())
        }
    });
    let pool = broker
        .subscription("events")
        .prefetch(1000)
        .serve(HandlerOptions { concurrency: 200 }, handler.clone())
        .unwrap();
    publish_n(&broker, "events", 250).await;
    until(|| pool.stats().succeeded == 250).await;
    let batches = batches.lock().clone();
    let sizes: Vec<usize> = batches.iter().map(|(v, _)| v.len()).collect();
    assert_eq!(sizes, vec![100, 100, 50]);
    assert!(batches[0].1 < 1.0 && batches[1].1 < 1.0);
    assert!(
        (batches[2].1 - 5.0).abs() < 0.5,
        "the partial batch waits for its timeout: {}",
        batches[2].1
    );
    let all: Vec<u32> = batches.iter().flat_map(|(v, _)| v.clone()).collect();
    assert_eq!(
        all,
        (0..250).collect::<Vec<_>>(),
        "every message once, in order"
    );
    let stats = handler.stats();
    assert_eq!((stats.full, stats.timed_out, stats.messages), (2, 1, 250));
    pool.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_batch_is_redelivered_and_a_rejected_one_dead_lettered() {
    let broker = Broker::default();
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let handler = BatchHandler::new(4, Duration::from_secs(1), move |batch: Vec<Envelope>| {
        let run = r.fetch_add(1, Ordering::SeqCst);
        async move {
            match run {
                0 => Err(HandlerError::retry("warehouse offline")),
                _ if batch.iter().any(|e| e.decode::<u32>().ok() == Some(7)) => {
                    Err(HandlerError::reject("poison batch"))
                }
                _ => Ok(()),
            }
        }
    });
    let pool = broker
        .subscription("stock")
        .serve(HandlerOptions { concurrency: 4 }, handler)
        .unwrap();
    publish_n(&broker, "stock", 8).await;
    let dlq = broker.dead_letters("stock").unwrap();
    until(|| pool.stats().succeeded + dlq.len() as u64 == 8).await;
    assert_eq!(dlq.len(), 4, "the batch holding 7 is dead-lettered whole");
    assert!(dlq
        .list(4)
        .iter()
        .all(|l| l.reason == DeadLetterReason::Rejected("poison batch".into())));
    let stats = pool.stop().await;
    assert_eq!(stats.succeeded, 4);
    assert_eq!(
        stats.failed,
        4 + 4,
        "the first batch failed once, the poison batch once"
    );
}

#[tokio::test(start_paused = true)]
async fn concurrency_and_rate_limits_hold() {
    let broker = Broker::default();
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (r, p) = (running.clone(), peak.clone());
    let service = ServiceBuilder::new()
        .layer(ConcurrencyLimitLayer::new(2))
        .service_fn(move |_e: Envelope| {
            let (r, p) = (r.clone(), p.clone());
            async move {
                p.fetch_max(r.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                r.fetch_sub(1, Ordering::SeqCst);
                Ok::<(), HandlerError>(())
            }
        });
    let pool = broker
        .subscription("limited")
        .serve(HandlerOptions { concurrency: 50 }, service)
        .unwrap();
    publish_n(&broker, "limited", 40).await;
    until(|| pool.stats().succeeded == 40).await;
    assert_eq!(peak.load(Ordering::SeqCst), 2);
    pool.stop().await;

    // 5 calls per second: 20 messages need at least 3 more seconds after the first 5.
    let times: Arc<Mutex<Vec<f64>>> = Arc::default();
    let start = Instant::now();
    let t = times.clone();
    let service = ServiceBuilder::new()
        .layer(RateLimitLayer::new(5, Duration::from_secs(1)))
        .service_fn(move |_e: Envelope| {
            t.lock().push(secs(start));
            async { Ok::<(), HandlerError>(()) }
        });
    let pool = broker
        .subscription("rated")
        .serve(HandlerOptions::default(), service)
        .unwrap();
    publish_n(&broker, "rated", 20).await;
    until(|| pool.stats().succeeded == 20).await;
    let times = times.lock().clone();
    for second in 0..4 {
        let in_second = times
            .iter()
            .filter(|t| **t >= second as f64 && **t < (second + 1) as f64)
            .count();
        assert!(
            in_second <= 5,
            "at most 5 calls in second {second}: {times:?}"
        );
    }
    assert!(*times.last().unwrap() >= 3.0);
    pool.stop().await;
}

#[tokio::test(start_paused = true)]
async fn dedup_skips_repeated_ids_within_the_window_only() {
    let broker = Broker::default();
    let handled: Arc<Mutex<Vec<u32>>> = Arc::default();
    let h = handled.clone();
    let dedup = DedupLayer::new(Duration::from_secs(60));
    let service = ServiceBuilder::new()
        .layer(dedup.clone())
        .service_fn(move |e: Envelope| {
            let h = h.clone();
            async move {
                let n: u32 = e.decode()?;
                // The first delivery of 2 fails: its redelivery must not count as a duplicate.
                if n == 2 && e.attempt() == 1 {
                    return Err(HandlerError::retry("flaky"));
                }
                h.lock().push(n);
                Ok(())
            }
        });
    let pool = broker
        .subscription("payments")
        .serve(HandlerOptions { concurrency: 1 }, service)
        .unwrap();
    let one = Message::json(&1u32).unwrap();
    let two = Message::json(&2u32).unwrap();
    for m in [&one, &one, &two, &one] {
        broker.publish("payments", m.clone()).await.unwrap();
    }
    until(|| pool.stats().succeeded == 4).await;
    assert_eq!(*handled.lock(), vec![1, 2]);
    assert_eq!(dedup.duplicates(), 2);

    // After the window the same id is handled again.
    tokio::time::sleep(Duration::from_secs(61)).await;
    broker.publish("payments", one.clone()).await.unwrap();
    until(|| pool.stats().succeeded == 5).await;
    assert_eq!(*handled.lock(), vec![1, 2, 1]);
    assert_eq!(dedup.duplicates(), 2);
    pool.stop().await;
}

#[tokio::test(start_paused = true)]
async fn dedup_memory_is_bounded_by_its_capacity() {
    let broker = Broker::default();
    let dedup = DedupLayer::with_capacity(Duration::from_secs(3600), 3);
    let service = ServiceBuilder::new()
        .layer(dedup.clone())
        .service_fn(|_e: Envelope| async { Ok::<(), HandlerError>(()) });
    let pool = broker
        .subscription("ids")
        .serve(HandlerOptions { concurrency: 1 }, service)
        .unwrap();
    let messages: Vec<Message> = (0..5u32).map(|i| Message::json(&i).unwrap()).collect();
    for m in &messages {
        broker.publish("ids", m.clone()).await.unwrap();
    }
    until(|| pool.stats().succeeded == 5).await;
    // Only the last three ids are remembered: the first is handled again, the last is not.
    broker.publish("ids", messages[0].clone()).await.unwrap();
    broker.publish("ids", messages[4].clone()).await.unwrap();
    until(|| pool.stats().succeeded == 7).await;
    assert_eq!(dedup.duplicates(), 1);
    pool.stop().await;
}

#[tokio::test(start_paused = true)]
async fn chained_handlers_run_in_order_and_stop_at_the_first_failure() {
    let broker = Broker::default();
    let stored: Arc<Mutex<Vec<u32>>> = Arc::default();
    let s = stored.clone();
    let validate = tower::service_fn(|e: Envelope| async move {
        match e.decode::<u32>()? {
            n if n % 2 == 0 => Ok(()),
            n => Err(HandlerError::reject(format!("{n} is odd"))),
        }
    });
    let store = tower::service_fn(move |e: Envelope| {
        let s = s.clone();
        async move {
            s.lock().push(e.decode::<u32>()?);
            Ok::<(), HandlerError>(())
        }
    });
    let pool = broker
        .subscription("numbers")
        .serve(HandlerOptions { concurrency: 1 }, then(validate, store))
        .unwrap();
    publish_n(&broker, "numbers", 6).await;
    let dlq = broker.dead_letters("numbers").unwrap();
    until(|| pool.stats().succeeded == 3 && dlq.len() == 3).await;
    assert_eq!(*stored.lock(), vec![0, 2, 4]);
    assert_eq!(
        dlq.list(1)[0].reason,
        DeadLetterReason::Rejected("1 is odd".into())
    );
    pool.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_service_that_panics_when_called_is_isolated() {
    #[derive(Clone)]
    struct Explodes;
    impl tower::Service<Envelope> for Explodes {
        type Response = ();
        type Error = HandlerError;
        type Future = std::future::Ready<Result<(), HandlerError>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), HandlerError>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, e: Envelope) -> Self::Future {
            assert!(e.attempt() > 1, "boom on the first attempt");
            std::future::ready(Ok(()))
        }
    }
    let broker = Broker::default();
    let pool = broker
        .subscription("fragile")
        .serve(HandlerOptions::default(), Explodes)
        .unwrap();
    publish_n(&broker, "fragile", 3).await;
    until(|| pool.stats().succeeded == 3).await;
    let stats = pool.stop().await;
    assert_eq!(stats.panicked, 3);
}
