//! Choosing a backend by URL, typed connect errors, bounded retries.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_backends::{connect, connect_with, BackendError, ConnectOptions, RetryPolicy, Support};

fn quick() -> ConnectOptions {
    ConnectOptions {
        retry: RetryPolicy {
            attempts: 3,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(50),
            attempt_timeout: Duration::from_secs(2),
        },
        ..ConnectOptions::default()
    }
}

#[tokio::test]
async fn urls_choose_the_backend() {
    let b = connect("memory://").await.unwrap();
    assert_eq!(b.name(), "ferry");
    assert_eq!(b.capabilities().replay, Support::Native);
    let dir = tempfile::tempdir().unwrap();
    let url = url::Url::from_directory_path(dir.path()).unwrap();
    let b = connect(url.as_str()).await.unwrap();
    assert_eq!(b.name(), "ferry");
    b.close().await.unwrap();
}

#[tokio::test]
async fn bad_urls_are_typed_errors() {
    for url in ["", "nope", "ftp://x", "memory://?retain=lots"] {
        match connect(url).await {
            Err(BackendError::InvalidUrl { .. }) => {}
            other => panic!("{url:?}: {other:?}"),
        }
    }
    #[cfg(not(feature = "kafka"))]
    match connect("kafka://127.0.0.1:9092").await {
        Err(BackendError::Unsupported { .. }) => {}
        other => panic!("kafka without the feature: {other:?}"),
    }
}

#[tokio::test]
async fn unreachable_services_fail_fast_after_bounded_retries() {
    // Port 1 on loopback: nothing listens there, connections are refused at once.
    for url in [
        "nats://127.0.0.1:1",
        "redis://127.0.0.1:1",
        "amqp://guest:guest@127.0.0.1:1/%2f",
    ] {
        let started = Instant::now();
        match connect_with(url, quick()).await {
            Err(BackendError::Unreachable { .. }) => {}
            other => panic!("{url}: {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{url} took {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn retry_policy_retries_transient_errors_only() {
    let policy = quick().retry;
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let r: Result<(), _> = policy
        .run("test", "op", || {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                Err(BackendError::Unreachable {
                    backend: "test",
                    reason: "down".into(),
                })
            }
        })
        .await;
    assert!(matches!(r, Err(BackendError::Unreachable { .. })));
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    calls.store(0, Ordering::SeqCst);
    let c = calls.clone();
    let r: Result<(), _> = policy
        .run("test", "op", || {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                Err(BackendError::Invalid("no".into()))
            }
        })
        .await;
    assert!(matches!(r, Err(BackendError::Invalid(_))));
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    calls.store(0, Ordering::SeqCst);
    let c = calls.clone();
    let r = policy
        .run("test", "op", || {
            let c = c.clone();
            async move {
                if c.fetch_add(1, Ordering::SeqCst) < 1 {
                    Err(BackendError::Timeout {
                        backend: "test",
                        operation: "op".into(),
                        after: Duration::ZERO,
                    })
                } else {
                    Ok(7)
                }
            }
        })
        .await;
    assert_eq!(r.unwrap(), 7);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn retry_policy_bounds_each_attempt() {
    let policy = RetryPolicy {
        attempts: 2,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(10),
        attempt_timeout: Duration::from_millis(50),
    };
    let started = Instant::now();
    let r: Result<(), _> = policy
        .run("test", "hang", || async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        })
        .await;
    assert!(matches!(r, Err(BackendError::Timeout { .. })), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
}
