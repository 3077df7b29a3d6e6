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

/// Waits (bounded) until `tx` reaches `status`.
async fn wait_status(tx: &ferry::Transaction, status: ferry::TxStatus) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tx.status() != status {
        assert!(
            tokio::time::Instant::now() < deadline,
            "transaction is {:?}, never {status:?}",
            tx.status()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_is_committing_until_durable_then_committed() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, faults) = faulty(dir.path(), BrokerConfig::default());
    let mut a = broker.subscribe("a").unwrap();
    let tx = broker.begin().unwrap();
    tx.publish("a", "one").unwrap();
    tx.publish("b", "two").unwrap();
    assert_eq!(tx.status(), ferry::TxStatus::Open);
    faults.delay_syncs(Duration::from_secs(1));
    let committing = tokio::spawn({
        let tx = tx.clone();
        async move { tx.commit_wait().await }
    });
    // Appended, not durable yet: neither committed nor open to a second commit or a rollback.
    wait_status(&tx, ferry::TxStatus::Committing).await;
    assert_eq!(
        tx.commit().unwrap_err(),
        ferry::TxError::Committing(tx.id())
    );
    assert_eq!(tx.rollback().unwrap_err().code(), "tx_committing");
    let ranges = committing.await.unwrap().unwrap();
    assert_eq!(ranges.len(), 2);
    assert_eq!(tx.status(), ferry::TxStatus::Committed);
    assert_eq!(tx.commit().unwrap_err(), ferry::TxError::Committed(tx.id()));
    assert_eq!(payload(&next(&mut a).await), "one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_whose_sync_fails_is_in_doubt_not_committed() {
    for topics in [&["t"][..], &["t", "u"][..]] {
        let dir = tempfile::tempdir().unwrap();
        let (broker, faults) = faulty(dir.path(), BrokerConfig::default());
        let mut sub = broker.subscribe("t").unwrap();
        let tx = broker.begin().unwrap();
        for t in topics {
            tx.publish(t, "staged").unwrap();
        }
        faults.fail_syncs(true);
        // The blocking commit, off the async workers.
        let err = tokio::task::spawn_blocking({
            let tx = tx.clone();
            move || tx.commit()
        })
        .await
        .unwrap()
        .unwrap_err();
        assert!(err.is_in_doubt(), "{err:?}");
        assert_eq!(err.code(), "tx_in_doubt");
        let text = err.to_string();
        assert!(
            text.contains("in doubt") && text.contains("storage sync failed"),
            "{text}"
        );
        assert!(text.contains("No space left on device"), "{text}");
        assert_eq!(tx.status(), ferry::TxStatus::InDoubt);
        // A retry is told the same, not "already committed"; nothing to roll back either.
        assert_eq!(tx.commit().unwrap_err(), err);
        assert_eq!(tx.rollback().unwrap_err(), err);
        assert_eq!(tx.publish("t", "more").unwrap_err(), err);
        // Not revealed by the failure.
        assert!(matches!(sub.try_recv(), Err(TryRecvError::Empty)));
        assert_eq!(broker.topic_stats("t").unwrap().depth, 0);
        // The registry's handle says the same.
        assert_eq!(
            broker.transaction(tx.id()).unwrap().status(),
            ferry::TxStatus::InDoubt
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_whose_write_fails_is_in_doubt() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, faults) = faulty(dir.path(), BrokerConfig::default());
    let tx = broker.begin().unwrap();
    tx.publish("t", "x").unwrap();
    tx.publish("u", "y").unwrap();
    faults.fail_appends(true);
    let err = tx.commit_wait().await.unwrap_err();
    assert!(err.is_in_doubt(), "{err:?}");
    assert!(err.to_string().contains("storage write failed"), "{err}");
    assert_eq!(tx.status(), ferry::TxStatus::InDoubt);
    assert_eq!(tx.commit_wait().await.unwrap_err(), err);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_given_up_before_its_sync_is_in_doubt() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, faults) = faulty(dir.path(), BrokerConfig::default());
    let mut sub = broker.subscribe("t").unwrap();
    let tx = broker.begin().unwrap();
    tx.publish("t", "slow").unwrap();
    faults.delay_syncs(Duration::from_secs(1));
    let committing = tokio::spawn({
        let tx = tx.clone();
        async move { tx.commit_wait().await }
    });
    wait_status(&tx, ferry::TxStatus::Committing).await;
    // Its caller gives up the wait while the sync is pending.
    committing.abort();
    assert!(committing.await.unwrap_err().is_cancelled());
    assert_eq!(tx.status(), ferry::TxStatus::InDoubt);
    assert!(tx.commit().unwrap_err().is_in_doubt());
    // The sync still happens: the records become visible, as in doubt allows.
    assert_eq!(payload(&next(&mut sub).await), "slow");
}
