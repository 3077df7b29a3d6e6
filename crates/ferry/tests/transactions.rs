//! Transactions: commit makes everything visible at once (contiguous per topic, in order),
//! rollback and timeout leave no trace, finished and unknown transactions are typed errors, and
//! concurrent readers see all of a transaction or none of it.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use ferry::{Broker, Message, PublishError, TopicConfig, TryRecvError, TxError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_is_atomic_contiguous_and_ordered() {
    let broker = Broker::default();
    let mut a = broker.subscribe("orders").unwrap();
    let mut b = broker.subscribe("audit").unwrap();
    broker.publish("orders", "before").await.unwrap();
    let tx = broker.begin().unwrap();
    for i in 0..3u32 {
        tx.publish("orders", Message::json(&i).unwrap()).unwrap();
        tx.publish("audit", Message::json(&(i + 100)).unwrap())
            .unwrap();
    }
    assert_eq!(tx.len(), 6);
    // Nothing is visible before commit.
    assert_eq!(a.recv().await.unwrap().payload().as_ref(), b"before");
    assert_eq!(a.try_recv().unwrap_err(), TryRecvError::Empty);
    assert_eq!(b.try_recv().unwrap_err(), TryRecvError::Empty);
    let ranges: BTreeMap<_, _> = tx
        .commit()
        .unwrap()
        .into_iter()
        .map(|(t, r)| (t.to_string(), r))
        .collect();
    assert_eq!(ranges["orders"], 1..4);
    assert_eq!(ranges["audit"], 0..3);
    for i in 0..3u32 {
        let d = a.try_recv().unwrap();
        assert_eq!(
            (d.offset(), d.decode::<u32>().unwrap()),
            (u64::from(i) + 1, i)
        );
        assert_eq!(b.try_recv().unwrap().decode::<u32>().unwrap(), i + 100);
    }
    assert_eq!(tx.commit().unwrap_err(), TxError::Committed(tx.id()));
    assert_eq!(
        tx.publish("orders", "late").unwrap_err().code(),
        "tx_committed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_leaves_no_trace() {
    let broker = Broker::default();
    let mut a = broker.subscribe("t").unwrap();
    let tx = broker.begin().unwrap();
    tx.publish("t", "x").unwrap();
    tx.rollback().unwrap();
    assert_eq!(a.try_recv().unwrap_err(), TryRecvError::Empty);
    assert_eq!(broker.topic_stats("t").unwrap().next_offset, 0);
    assert_eq!(tx.commit().unwrap_err(), TxError::RolledBack(tx.id()));
    assert_eq!(tx.rollback().unwrap_err(), TxError::RolledBack(tx.id()));
}

#[tokio::test(start_paused = true)]
async fn an_uncommitted_transaction_times_out() {
    let broker = Broker::default();
    let _sub = broker.subscribe("t").unwrap();
    let tx = broker.begin_with_timeout(Duration::from_secs(5)).unwrap();
    tx.publish("t", "x").unwrap();
    tokio::time::advance(Duration::from_secs(6)).await;
    assert_eq!(tx.commit().unwrap_err(), TxError::Expired(tx.id()));
    // The maintenance pass rolls back expired transactions that nobody touches again.
    let idle = broker.begin_with_timeout(Duration::from_secs(5)).unwrap();
    idle.publish("t", "y").unwrap();
    tokio::time::advance(Duration::from_secs(6)).await;
    broker.maintain();
    let again = broker.transaction(idle.id()).unwrap();
    assert!(again.is_empty());
    assert_eq!(again.commit().unwrap_err(), TxError::Expired(idle.id()));
    assert_eq!(broker.topic_stats("t").unwrap().next_offset, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_and_lookups() {
    let broker = Broker::default();
    assert_eq!(
        broker.transaction(424_242).unwrap_err(),
        TxError::Unknown(424_242)
    );
    let tx = broker.begin().unwrap();
    let same = broker.transaction(tx.id()).unwrap();
    same.publish("t", "via the id").unwrap();
    assert_eq!(tx.len(), 1);
    assert!(matches!(
        tx.publish("$dlq/t", "x").unwrap_err(),
        TxError::Publish(PublishError::InvalidTopic(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_does_not_fit_changes_nothing_and_can_be_retried() {
    let broker = Broker::default();
    let small = TopicConfig {
        capacity: 4,
        ..TopicConfig::default()
    };
    broker.create_topic("small", small).unwrap();
    let mut s = broker.subscribe("small").unwrap();
    let mut big = broker.subscribe("big").unwrap();
    broker.publish("small", "0").await.unwrap();
    let tx = broker.begin().unwrap();
    tx.publish("big", "b").unwrap();
    for i in 0..4 {
        tx.publish("small", i.to_string()).unwrap();
    }
    let err = tx.commit().unwrap_err();
    assert!(
        matches!(err, TxError::Publish(PublishError::Full { .. })),
        "{err}"
    );
    assert_eq!(
        big.try_recv().unwrap_err(),
        TryRecvError::Empty,
        "all or nothing across topics"
    );
    assert_eq!(tx.len(), 5, "still open, still staged");
    s.recv().await.unwrap();
    tx.commit().unwrap();
    assert_eq!(big.try_recv().unwrap().payload().as_ref(), b"b");
    let got: Vec<_> = std::iter::from_fn(|| s.try_recv().ok())
        .map(|d| d.payload().clone())
        .collect();
    assert_eq!(got, vec!["0", "1", "2", "3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_see_all_or_nothing() {
    const TXS: u32 = 300;
    let broker = Broker::default();
    let mut watcher = broker.subscribe("tx/a").unwrap();
    let mut everything = broker.subscribe("tx/#").unwrap();
    let committer = {
        let broker = broker.clone();
        tokio::spawn(async move {
            let mut committed = HashSet::new();
            for k in 0..TXS {
                let tx = broker.begin().unwrap();
                for i in 0..5u32 {
                    tx.publish("tx/a", Message::json(&(k, i)).unwrap()).unwrap();
                    tx.publish("tx/b", Message::json(&(k, i)).unwrap()).unwrap();
                }
                if k % 4 == 3 {
                    tx.rollback().unwrap();
                } else {
                    tx.commit().unwrap();
                    committed.insert(k);
                }
                if k % 16 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            committed
        })
    };
    // Whenever the watcher sees the first record of a transaction, the other four are already
    // there: a transaction's records on a topic appear together.
    let mut seen_txs = 0;
    while seen_txs < TXS - TXS / 4 {
        let d = tokio::time::timeout(Duration::from_secs(10), watcher.recv())
            .await
            .unwrap()
            .unwrap();
        let (k, i): (u32, u32) = d.decode().unwrap();
        assert_eq!(i, 0, "transaction {k} seen from the middle");
        for j in 1..5u32 {
            let next = watcher
                .try_recv()
                .expect("the rest of the transaction is visible");
            assert_eq!(next.decode::<(u32, u32)>().unwrap(), (k, j));
            assert_eq!(next.offset(), d.offset() + u64::from(j));
        }
        seen_txs += 1;
    }
    let committed = committer.await.unwrap();
    let mut per_tx: BTreeMap<u32, usize> = BTreeMap::new();
    while let Ok(d) = everything.try_recv() {
        let (k, _): (u32, u32) = d.decode().unwrap();
        *per_tx.entry(k).or_default() += 1;
    }
    assert_eq!(per_tx.keys().copied().collect::<HashSet<_>>(), committed);
    assert!(per_tx.values().all(|n| *n == 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_transactions_are_forgotten_before_memory_grows() {
    let broker = Broker::default();
    let first = broker.begin().unwrap();
    first.rollback().unwrap();
    let open = broker.begin().unwrap();
    open.publish("t", "staged").unwrap();
    for _ in 0..70_000 {
        broker.begin().unwrap().rollback().unwrap();
    }
    let recent = broker.begin().unwrap();
    recent.rollback().unwrap();
    // Past the bound, finished transactions are forgotten (unknown by id); open ones and recent
    // ones are still known.
    assert_eq!(
        broker.transaction(first.id()).unwrap_err(),
        TxError::Unknown(first.id())
    );
    assert_eq!(
        broker
            .transaction(recent.id())
            .unwrap()
            .commit()
            .unwrap_err(),
        TxError::RolledBack(recent.id())
    );
    let again = broker.transaction(open.id()).unwrap();
    assert_eq!(again.commit().unwrap()[0].1, 0..1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_wait_waits_for_room_on_a_full_topic() {
    let broker = Broker::default();
    broker
        .create_topic(
            "small",
            TopicConfig {
                capacity: 3,
                ..TopicConfig::default()
            },
        )
        .unwrap();
    let mut s = broker.subscribe("small").unwrap();
    for i in 0..3 {
        broker.publish("small", i.to_string()).await.unwrap();
    }
    let tx = broker.begin().unwrap();
    tx.publish("small", "3").unwrap();
    tx.publish("small", "4").unwrap();
    // Full: the commit waits until the subscriber has read two records, then goes through.
    let waiting = tokio::spawn(async move { tx.commit_wait().await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiting.is_finished(), "no room yet");
    let mut got = Vec::new();
    while got.len() < 5 {
        let d = tokio::time::timeout(Duration::from_secs(5), s.recv())
            .await
            .unwrap()
            .unwrap();
        got.push(String::from_utf8(d.payload().to_vec()).unwrap());
    }
    let ranges = waiting.await.unwrap().unwrap();
    assert_eq!(ranges[0].1, 3..5);
    assert_eq!(got, ["0", "1", "2", "3", "4"]);
    // Errors other than a full topic return at once.
    let tx = broker.begin().unwrap();
    tx.rollback().unwrap();
    assert_eq!(
        tx.commit_wait().await.unwrap_err(),
        TxError::RolledBack(tx.id())
    );
}
