//! Handler pools: the concurrency limit holds, and shutdown waits for running handlers up to its
//! deadline with the accounting intact either way.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry::{Broker, HandlerError, HandlerOptions, Message};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_is_respected() {
    let broker = Broker::default();
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (r, p) = (running.clone(), peak.clone());
    let handle = broker
        .subscription("jobs")
        .handle(HandlerOptions { concurrency: 3 }, move |_d| {
            let (r, p) = (r.clone(), p.clone());
            async move {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
                r.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .unwrap();
    for i in 0..60u32 {
        broker
            .publish("jobs", Message::json(&i).unwrap())
            .await
            .unwrap();
    }
    let report = broker.shutdown(Duration::from_secs(10)).await;
    assert!(report.drained);
    assert_eq!(handle.join().await.succeeded, 60);
    let peak = peak.load(Ordering::SeqCst);
    assert!(
        (2..=3).contains(&peak),
        "the pool runs handlers side by side, at most 3: {peak}"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_deadline_with_a_slow_handler() {
    let broker = Broker::default();
    let handle = broker
        .subscription("slow")
        .handle(HandlerOptions { concurrency: 1 }, |_d| async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok(())
        })
        .unwrap();
    for _ in 0..3 {
        broker.publish("slow", "x").await.unwrap();
    }
    let report = broker.shutdown(Duration::from_secs(15)).await;
    // One message finished, one was running at the deadline, one never started.
    assert!(!report.drained);
    assert_eq!(report.counters.acked, 1);
    assert_eq!(report.dropped_at_close, 2);
    assert_eq!(report.counters.published, 3);
    assert_eq!(
        report.counters.acked + report.counters.dropped + report.counters.dead_lettered,
        3,
        "{report:?}"
    );
    handle.join().await;
}

#[tokio::test(start_paused = true)]
async fn retry_after_delay_and_reject() {
    let broker = Broker::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let _handle = broker
        .subscription("t")
        .handle(HandlerOptions::default(), move |d| {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                match (d.payload().as_ref(), d.attempt()) {
                    (b"later", 1) => {
                        Err(HandlerError::retry_after("busy", Duration::from_secs(60)))
                    }
                    (b"poison", _) => Err(HandlerError::reject("cannot parse")),
                    _ => Ok(()),
                }
            }
        })
        .unwrap();
    broker.publish("t", "later").await.unwrap();
    broker.publish("t", "poison").await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3, "the delayed retry ran");
    let dead = broker.dead_letters("t").unwrap().list(10);
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].reason,
        ferry::DeadLetterReason::Rejected("cannot parse".into())
    );
    let s = broker.topic_stats("t").unwrap();
    assert_eq!(
        (
            s.counters.acked,
            s.counters.errors,
            s.counters.dead_lettered
        ),
        (1, 2, 1)
    );
}
