//! Storage I/O stays off the async workers and out of the engine's locks.
//!
//! [`Checked`] wraps the disk storage and records a violation whenever a storage method that
//! may wait for the disk (anything but a buffered append) is called
//! - on a thread with a Tokio runtime context that is not one of the broker's storage
//!   threads: an async worker, the thread blocked in `block_on`, or a thread of Tokio's
//!   blocking pool (which has the runtime's context and, by default, the workers' name, so
//!   neither `Handle::try_current` alone nor thread names can tell them apart). The broker's
//!   storage threads carry a thread-local mark (`ferry::storage::on_storage_thread`); a thread
//!   with no runtime context (this test's own thread opening a broker, a server's own saver
//!   thread) may block as it likes;
//! - while the calling thread holds an engine lock (registry, saved positions, consumer
//!   state, topic log), as counted by `ferry::storage::engine_locks_held` in debug builds.
//!
//! `append`, `append_part` and `commit_parts` are buffered writes made under the topic lock
//! by design and are allowed anywhere. The scenario drives a durable broker (fsync always, a
//! memory window of a few records, frequent maintenance) on a multi-thread runtime through
//! every path that touches storage, restarts it, and expects no violation.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ferry::disk::{DiskConfig, DiskStorage, Durability};
use ferry::storage::{Positions, Storage, StorageError, StoredMessage, TopicStore};
use ferry::{
    Broker, BrokerConfig, HotWindow, Message, Retention, StartPosition, TopicConfig, TopicName,
    TryRecvError,
};

/// What the checked storage saw: violations, and how often each operation ran.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<SeenInner>>);

#[derive(Default)]
struct SeenInner {
    violations: Vec<String>,
    calls: BTreeMap<&'static str, u64>,
}

impl Seen {
    /// Records a call of `op`, and a violation if it is made where storage must not block.
    fn check(&self, op: &'static str) {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("(unnamed)");
        let mut seen = self.0.lock().unwrap();
        *seen.calls.entry(op).or_default() += 1;
        if !ferry::storage::on_storage_thread() && tokio::runtime::Handle::try_current().is_ok() {
            let v = format!("{op} on runtime thread {name}");
            seen.violations.push(v);
        }
        let locks = ferry::storage::engine_locks_held();
        if locks > 0 {
            let v = format!("{op} on thread {name} holding {locks} engine lock(s)");
            seen.violations.push(v);
        }
    }

    /// Records a call of `op`, which may be made anywhere (the catalog, answered from memory).
    fn count(&self, op: &'static str) {
        *self.0.lock().unwrap().calls.entry(op).or_default() += 1;
    }

    fn violations(&self) -> Vec<String> {
        self.0.lock().unwrap().violations.clone()
    }

    fn calls(&self, op: &str) -> u64 {
        self.0.lock().unwrap().calls.get(op).copied().unwrap_or(0)
    }
}

/// A [`Storage`] that checks where it is called (see the module docs).
#[derive(Debug)]
struct Checked {
    inner: Arc<dyn Storage>,
    seen: Seen,
}

impl std::fmt::Debug for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Seen")
    }
}

#[derive(Debug)]
struct CheckedTopic {
    inner: Arc<dyn TopicStore>,
    seen: Seen,
}

impl Storage for Checked {
    fn open_topic(
        &self,
        name: &TopicName,
        config: &TopicConfig,
    ) -> Result<Arc<dyn TopicStore>, StorageError> {
        self.seen.check("open_topic");
        let inner = self.inner.open_topic(name, config)?;
        Ok(Arc::new(CheckedTopic {
            inner,
            seen: self.seen.clone(),
        }))
    }

    fn topics(&self) -> Result<Vec<TopicName>, StorageError> {
        self.seen.count("topics");
        self.inner.topics()
    }

    fn has_topic(&self, name: &TopicName) -> bool {
        self.seen.count("has_topic");
        self.inner.has_topic(name)
    }

    fn forget_topic(&self, name: &TopicName) -> Result<bool, StorageError> {
        self.seen.check("forget_topic");
        self.inner.forget_topic(name)
    }

    fn stored_depth(&self, name: &TopicName) -> Option<(u64, u64)> {
        self.seen.count("stored_depth");
        self.inner.stored_depth(name)
    }

    fn user_topic_count(&self) -> usize {
        self.seen.count("user_topic_count");
        self.inner.user_topic_count()
    }

    fn load_positions(&self) -> Result<Positions, StorageError> {
        self.seen.check("load_positions");
        self.inner.load_positions()
    }

    fn save_positions(&self, positions: &Positions) -> Result<(), StorageError> {
        self.seen.check("save_positions");
        self.inner.save_positions(positions)
    }

    fn commit_parts(&self, parts: &[u64]) -> Result<(), StorageError> {
        // A buffered write under the topic locks, by design.
        self.inner.commit_parts(parts)
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.seen.check("sync");
        self.inner.sync()
    }
}

impl TopicStore for CheckedTopic {
    fn append(&self, first: u64, messages: &[&Message]) -> Result<(), StorageError> {
        // A buffered write under the topic lock, by design.
        self.inner.append(first, messages)
    }

    fn append_part(&self, first: u64, messages: &[&Message]) -> Result<u64, StorageError> {
        self.inner.append_part(first, messages)
    }

    fn sync(&self, end: u64) -> Result<(), StorageError> {
        self.seen.check("topic sync");
        self.inner.sync(end)
    }

    fn waits_for_sync(&self) -> bool {
        self.inner.waits_for_sync()
    }

    fn read(&self, from: u64, max: usize) -> Result<Vec<StoredMessage>, StorageError> {
        self.seen.check("read");
        self.inner.read(from, max)
    }

    fn start(&self) -> u64 {
        self.inner.start()
    }

    fn end(&self) -> u64 {
        self.inner.end()
    }

    fn offset_at(&self, time: SystemTime) -> Result<u64, StorageError> {
        self.seen.check("offset_at");
        self.inner.offset_at(time)
    }

    fn apply_retention(&self) -> Result<(), StorageError> {
        self.seen.check("apply_retention");
        self.inner.apply_retention()
    }

    fn truncate_before(&self, offset: u64) -> Result<(), StorageError> {
        self.seen.check("truncate_before");
        self.inner.truncate_before(offset)
    }

    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
}

/// The named manual-ack subscription "audit" on `io/orders`, from the earliest offset.
fn audit(broker: &ferry::Broker) -> ferry::Subscription {
    broker
        .subscription("io/orders")
        .name("audit")
        .manual_ack()
        .start(StartPosition::Earliest)
        .build()
        .unwrap()
}

fn numbered(i: u32) -> Message {
    Message::builder()
        .payload(format!("message {i:06}").into_bytes())
        .header("n", i.to_string())
        .build()
}

fn number(d: &ferry::Envelope) -> u32 {
    d.header("n").unwrap().parse().unwrap()
}

fn config() -> BrokerConfig {
    BrokerConfig {
        // A few records in memory: cursors behind them read the store.
        hot_window: HotWindow {
            records: 8,
            bytes: 4096,
        },
        maintenance_interval: Duration::from_millis(10),
        ..BrokerConfig::default()
    }
}

/// Opens the data directory (on the calling thread, outside any runtime) behind a checked
/// storage.
fn checked_storage(dir: &std::path::Path, seen: &Seen) -> Arc<dyn Storage> {
    let disk = DiskStorage::open(
        dir,
        DiskConfig {
            durability: Durability::Always,
            segment_bytes: 16 << 10,
            ..DiskConfig::default()
        },
    )
    .unwrap();
    Arc::new(Checked {
        inner: Arc::new(disk),
        seen: seen.clone(),
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Waits (polling, never blocking a worker) until `f` returns something.
async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

const N: u32 = 300;

#[test]
fn storage_io_runs_on_the_storage_threads_only() {
    let dir = tempfile::tempdir().unwrap();
    let seen = Seen::default();
    let rt = runtime();

    // ---- first run --------------------------------------------------------------------------
    let storage = checked_storage(dir.path(), &seen);
    // Each run is a task on the runtime's workers.
    let first = rt.spawn(async move {
        // Opened on a runtime thread: the broker opens its topics on its I/O threads.
        let broker = Broker::with_storage(config(), storage).unwrap();
        broker
            .create_topic(
                "io/retained",
                TopicConfig {
                    retention: Retention {
                        max_messages: Some(20),
                        ..Retention::default()
                    },
                    ..TopicConfig::default()
                },
            )
            .unwrap();

        // Publishing, every way there is (fsync always: the commit thread syncs).
        for i in 0..100 {
            broker.publish("io/orders", numbered(i)).await.unwrap();
        }
        // The store keeps times in milliseconds: leave some between the two halves.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let between = SystemTime::now();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let publisher = broker.publisher("io/orders").unwrap();
        for i in 100..150 {
            publisher.publish(numbered(i)).await.unwrap();
        }
        let pipelined: Vec<_> = (150..200)
            .map(|i| publisher.publish_pipelined(numbered(i)))
            .collect();
        for p in pipelined {
            p.await.unwrap();
        }
        broker
            .publish_batch("io/orders", (200..250).map(numbered))
            .await
            .unwrap();
        for i in 250..260 {
            broker.try_publish("io/orders", numbered(i)).unwrap();
        }
        for i in 260..N {
            publisher.try_publish(numbered(i)).unwrap();
        }
        let tx = broker.begin().unwrap();
        tx.publish("io/tx-a", numbered(0)).unwrap();
        tx.publish("io/tx-b", numbered(0)).unwrap();
        tx.commit().unwrap();
        let tx = broker.begin().unwrap();
        tx.publish("io/tx-a", numbered(1)).unwrap();
        tx.publish("io/tx-b", numbered(1)).unwrap();
        tx.commit_wait().await.unwrap();

        // A reader from the start is behind the memory window: the first records are only on
        // disk, so `try_recv` starts a read and returns at once.
        let mut polled = broker
            .subscription("io/orders")
            .start(StartPosition::Earliest)
            .build()
            .unwrap();
        assert!(matches!(polled.try_recv(), Err(TryRecvError::Empty)));
        let mut got = Vec::new();
        while got.len() < N as usize {
            match polled.try_recv() {
                Ok(d) => got.push(number(&d)),
                Err(TryRecvError::Empty) => tokio::time::sleep(Duration::from_millis(1)).await,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, (0..N).collect::<Vec<_>>());

        // `recv` waits for the reads (read ahead, in order).
        let mut fanout = broker
            .subscription("io/orders")
            .start(StartPosition::Earliest)
            .batch_size(16)
            .build()
            .unwrap();
        for i in 0..N {
            let d = tokio::time::timeout(Duration::from_secs(10), fanout.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(d.offset(), u64::from(i));
            assert_eq!(number(&d), i);
        }

        // A named subscription acknowledges half, then leaves (its position is saved).
        {
            let mut audit = audit(&broker);
            for i in 0..N / 2 {
                let d = audit.recv().await.unwrap();
                assert_eq!(number(&d), i);
                d.ack().unwrap();
            }
        }

        // A consumer group of two members acknowledging by hand, from the start.
        let members: Vec<_> = (0..2)
            .map(|_| {
                broker
                    .subscription("io/orders")
                    .group("billing")
                    .manual_ack()
                    .start(StartPosition::Earliest)
                    .build()
                    .unwrap()
            })
            .collect();
        let total = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let tasks: Vec<_> = members
            .into_iter()
            .map(|mut m| {
                let total = total.clone();
                tokio::spawn(async move {
                    let mut mine = Vec::new();
                    while total.load(std::sync::atomic::Ordering::SeqCst) < N {
                        let Ok(Ok(d)) =
                            tokio::time::timeout(Duration::from_millis(50), m.recv()).await
                        else {
                            continue;
                        };
                        mine.push(number(&d));
                        d.ack().unwrap();
                        total.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    (m, mine)
                })
            })
            .collect();
        let mut all = Vec::new();
        let mut members = Vec::new();
        for t in tasks {
            let (m, mine) = t.await.unwrap();
            assert!(mine.windows(2).all(|w| w[0] < w[1]), "in order per member");
            all.extend(mine);
            members.push(m);
        }
        all.sort_unstable();
        assert_eq!(all, (0..N).collect::<Vec<_>>());

        // A seek by time: the store's time index, looked up on an I/O thread.
        let mut later = broker
            .subscription("io/orders")
            .start(StartPosition::Timestamp(between))
            .build()
            .unwrap();
        assert_eq!(number(&later.recv().await.unwrap()), 100);

        // Dead letters: the queue's store is opened on the settle path; listed and purged.
        let mut jobs = broker
            .subscription("io/jobs")
            .group("workers")
            .manual_ack()
            .max_attempts(1)
            .build()
            .unwrap();
        broker.publish("io/jobs", numbered(7)).await.unwrap();
        jobs.recv().await.unwrap().reject("no").unwrap();
        let dlq = broker.dead_letters("io/jobs").unwrap();
        let listed = eventually("the dead letter", || {
            let l = dlq.list(10);
            (!l.is_empty()).then_some(l)
        })
        .await;
        assert_eq!(listed.len(), 1);
        assert_eq!(dlq.purge(), 1);

        // Retention, applied by the maintenance task and by a pass asked for here.
        for i in 0..400 {
            broker.publish("io/retained", numbered(i)).await.unwrap();
        }
        broker.maintain();
        eventually("retention", || {
            let s = broker.topic_stats("io/retained").unwrap();
            (s.first_offset > 0).then_some(())
        })
        .await;

        broker.flush().unwrap();
        broker.flush_async().await.unwrap();
        drop((polled, fanout, members, later, jobs));
        broker.shutdown(Duration::from_secs(5)).await;
    });
    rt.block_on(first).unwrap();

    // ---- after a restart --------------------------------------------------------------------
    let storage = checked_storage(dir.path(), &seen);
    let second = rt.spawn(async move {
        let broker = Broker::with_storage(config(), storage).unwrap();
        // The named subscription resumes where it left (read from disk).
        let mut audit = audit(&broker);
        for i in N / 2..N {
            let d = audit.recv().await.unwrap();
            assert_eq!(number(&d), i);
            d.ack().unwrap();
        }
        // The group acknowledged everything: it gets only what is new.
        let mut billing = broker
            .subscription("io/orders")
            .group("billing")
            .manual_ack()
            .build()
            .unwrap();
        broker.publish("io/orders", numbered(N)).await.unwrap();
        let d = billing.recv().await.unwrap();
        assert_eq!(number(&d), N);
        d.ack().unwrap();
        // Transactions survived whole.
        let mut tx = broker
            .subscription("io/tx-b")
            .start(StartPosition::Earliest)
            .build()
            .unwrap();
        assert_eq!(number(&tx.recv().await.unwrap()), 0);
        assert_eq!(number(&tx.recv().await.unwrap()), 1);
        drop((audit, billing, tx));
        broker.shutdown(Duration::from_secs(5)).await;
    });
    rt.block_on(second).unwrap();

    let violations = seen.violations();
    assert!(violations.is_empty(), "{violations:#?}");
    // The scenario did reach every kind of storage work.
    for op in [
        "open_topic",
        "topics",
        "load_positions",
        "save_positions",
        "sync",
        "topic sync",
        "read",
        "offset_at",
        "apply_retention",
        "truncate_before",
    ] {
        assert!(seen.calls(op) > 0, "no {op} call was seen");
    }
}

/// The check itself: a storage call on an async worker or on Tokio's blocking pool is
/// reported; one on a plain thread is not.
#[test]
fn the_check_reports_calls_on_runtime_threads() {
    let dir = tempfile::tempdir().unwrap();
    let seen = Seen::default();
    let storage = checked_storage(dir.path(), &seen);
    storage.sync().unwrap();
    assert!(seen.violations().is_empty());
    let rt = runtime();
    rt.block_on(async {
        let s = storage.clone();
        tokio::spawn(async move { s.sync().unwrap() })
            .await
            .unwrap();
        let s = storage.clone();
        tokio::task::spawn_blocking(move || s.sync().unwrap())
            .await
            .unwrap();
    });
    assert_eq!(seen.violations().len(), 2, "{:#?}", seen.violations());
}
