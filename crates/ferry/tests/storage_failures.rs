//! A failing disk (a storage whose appends or syncs fail with ENOSPC): a failed publish is
//! never visible to subscribers, says it is in doubt and what failed, the broker's health is
//! "degraded" with the reason while writes fail and "running" again once one succeeds; a
//! publish that timed out waiting for space stored nothing.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use ferry::disk::DiskStorage;
use ferry::fault::{Faults, FaultyStorage};
use ferry::{Broker, BrokerConfig, Overflow, PublishError, TopicConfig, TryRecvError};

fn faulty(dir: &std::path::Path, config: BrokerConfig) -> (Broker, Faults) {
    let disk = DiskStorage::open(dir, Default::default()).unwrap();
    let faults = Faults::default();
    let storage = FaultyStorage::new(Arc::new(disk), faults.clone());
    (
        Broker::with_storage(config, Arc::new(storage)).unwrap(),
        faults,
    )
}

fn payload(d: &ferry::Delivery) -> String {
    String::from_utf8(d.payload().to_vec()).unwrap()
}

async fn next(sub: &mut ferry::Subscription) -> ferry::Delivery {
    tokio::time::timeout(Duration::from_secs(5), sub.recv())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_is_in_doubt_invisible_and_degrades_health_until_a_write_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, faults) = faulty(dir.path(), BrokerConfig::default());
    let mut sub = broker.subscribe("t").unwrap();
    broker.publish("t", "before").await.unwrap();
    assert_eq!(payload(&next(&mut sub).await), "before");
    assert_eq!(broker.health().status, "running");
    assert_eq!(broker.health().reason, None);

    faults.fail_appends(true);
    let err = broker.publish("t", "lost").await.unwrap_err();
    assert!(err.is_in_doubt(), "{err:?}");
    assert_eq!(err.code(), "in_doubt");
    let text = err.to_string();
    assert!(
        text.contains("in doubt") && text.contains("storage write failed"),
        "{text}"
    );
    assert!(text.contains("No space left on device"), "{text}");
    let health = broker.health();
    assert_eq!(health.status, "degraded");
    assert!(
        health
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("No space left on device")),
        "{health:?}"
    );
    assert!(matches!(sub.try_recv(), Err(TryRecvError::Empty)));
    // Every way of publishing says the same.
    assert!(broker.try_publish("t", "x").unwrap_err().is_in_doubt());
    let p = broker.publisher("t").unwrap();
    assert!(p.publish_pipelined("x").await.unwrap_err().is_in_doubt());

    faults.fail_appends(false);
    broker.publish("t", "after").await.unwrap();
    assert_eq!(payload(&next(&mut sub).await), "after");
    assert_eq!(broker.health().status, "running");
    assert_eq!(broker.health().reason, None);
    assert!(faults.failed() >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_is_in_doubt_and_not_shown_to_subscribers() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, faults) = faulty(dir.path(), BrokerConfig::default());
    let mut sub = broker.subscribe("t").unwrap();
    faults.fail_syncs(true);
    let err = broker.publish("t", "unsynced").await.unwrap_err();
    assert!(
        matches!(&err, PublishError::InDoubt { reason, .. } if reason.contains("storage sync failed")),
        "{err:?}"
    );
    // Not visible: the record waits for a sync that failed.
    assert!(matches!(sub.try_recv(), Err(TryRecvError::Empty)));
    assert_eq!(broker.topic_stats("t").unwrap().depth, 0);
    let health = broker.health();
    assert_eq!(health.status, "degraded", "{health:?}");
    assert!(health
        .reason
        .as_deref()
        .is_some_and(|r| r.contains("storage sync failed")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_timed_out_waiting_for_space_stored_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = BrokerConfig {
        topic_defaults: TopicConfig {
            capacity: 1,
            overflow: Overflow::Block,
            ..TopicConfig::default()
        },
        ..BrokerConfig::default()
    };
    let (broker, _faults) = faulty(dir.path(), config);
    let mut sub = broker.subscription("t").manual_ack().build().unwrap();
    broker.publish("t", "first").await.unwrap();
    let err = broker
        .publish_timeout("t", "second", Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(err, PublishError::Timeout(_)), "{err:?}");
    assert!(!err.is_in_doubt());
    let first = next(&mut sub).await;
    assert_eq!(payload(&first), "first");
    first.ack().unwrap();
    broker.publish("t", "third").await.unwrap();
    assert_eq!(
        payload(&next(&mut sub).await),
        "third",
        "the timed-out one was not stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_timed_out_waiting_for_its_sync_is_in_doubt_and_may_still_be_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, faults) = faulty(dir.path(), BrokerConfig::default());
    let mut sub = broker.subscribe("t").unwrap();
    faults.delay_syncs(Duration::from_millis(500));
    let err = broker
        .publish_timeout("t", "slow", Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PublishError::InDoubt { reason, .. } if reason.contains("not synced within")),
        "{err:?}"
    );
    // Rightly in doubt: the sync goes on and the record is delivered.
    assert_eq!(payload(&next(&mut sub).await), "slow");
    faults.delay_syncs(Duration::ZERO);
    assert_eq!(broker.health().status, "running");
}
