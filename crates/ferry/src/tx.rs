//! Transactions: stage publishes to one or more topics, then commit them all at once or roll
//! them back.
//!
//! Invariants:
//! - nothing staged is visible before commit; a rolled-back or expired transaction leaves no
//!   trace in any topic;
//! - a commit appends each topic's staged records as one contiguous batch, in staging order,
//!   with every involved topic's log locked (in name order, so commits cannot deadlock) until
//!   all are appended: a reader of any of them sees all of the transaction or none of it;
//! - a commit that cannot fit (a full topic) changes nothing and leaves the transaction open;
//! - the status tells the truth about durability: a commit whose records wait for their sync
//!   is [`TxStatus::Committing`] until the commit thread synced them, then
//!   [`TxStatus::Committed`]. If the write or the sync fails (or the wait for it is given up)
//!   after the records were handed to storage, the transaction is [`TxStatus::InDoubt`] and
//!   the commit, and every later call on it, says so with [`TxError::InDoubt`]: the records
//!   may be on disk (and delivered after a restart), so a retry must not assume either way;
//! - an open transaction past its timeout is rolled back (by the maintenance task, or by the
//!   next call on it) and reports [`TxError::Expired`].

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::broker::{Broker, BrokerInner};
use crate::config::Overflow;
use crate::error::PublishError;
use crate::log::Topic;
use crate::message::{Message, Record};
use crate::topic::TopicName;

/// Why a transaction operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// No transaction has this id (never begun, or finished long ago).
    #[error("unknown transaction {0}")]
    Unknown(u64),
    /// The transaction timed out and was rolled back.
    #[error("transaction {0} expired and was rolled back")]
    Expired(u64),
    /// The transaction was already committed.
    #[error("transaction {0} was already committed")]
    Committed(u64),
    /// The transaction was already rolled back.
    #[error("transaction {0} was already rolled back")]
    RolledBack(u64),
    /// A commit of the transaction is waiting for its records to be synced.
    #[error("transaction {0} is being committed")]
    Committing(u64),
    /// The commit handed the records to storage but their write or sync failed (or the wait
    /// for it was given up): they may be stored, and delivered after a restart, or not. The
    /// transaction is finished either way; nothing of it was made visible by this failure.
    #[error("transaction {id} is in doubt, its records may have been stored: {reason}")]
    InDoubt {
        /// The transaction.
        id: u64,
        /// What failed (for a full disk: "storage sync failed: ... No space left on device").
        reason: String,
    },
    /// Staging or committing failed (invalid topic, full topic, closed broker, ...); nothing
    /// was stored.
    #[error(transparent)]
    Publish(#[from] PublishError),
}

impl TxError {
    /// A stable code for the wire.
    pub fn code(&self) -> &'static str {
        match self {
            TxError::Unknown(_) => "tx_unknown",
            TxError::Expired(_) => "tx_expired",
            TxError::Committed(_) => "tx_committed",
            TxError::RolledBack(_) => "tx_rolled_back",
            TxError::Committing(_) => "tx_committing",
            TxError::InDoubt { .. } => "tx_in_doubt",
            TxError::Publish(e) => e.code(),
        }
    }

    /// Whether the transaction's records may have been stored although the commit failed
    /// ([`TxError::InDoubt`]).
    pub fn is_in_doubt(&self) -> bool {
        matches!(self, TxError::InDoubt { .. })
    }
}

/// Where a transaction is (see [`Transaction::status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    /// Staging; nothing is visible.
    Open,
    /// Its records are appended and wait for the sync that makes them durable and visible.
    Committing,
    /// Its records are durable (on a durable topic that waits for its sync) and visible.
    Committed,
    /// Its records were handed to storage but their write or sync failed: they may be stored
    /// or not (see [`TxError::InDoubt`]).
    InDoubt,
    /// Rolled back: nothing of it was stored.
    RolledBack,
    /// Timed out and rolled back: nothing of it was stored.
    Expired,
}

type Status = TxStatus;

#[derive(Debug)]
struct Inner {
    status: Status,
    staged: Vec<(Arc<Topic>, Arc<Record>)>,
    finished_at: Option<Instant>,
    /// Why the transaction is in doubt.
    doubt: Option<String>,
}

/// Shared state of one transaction (also held by the broker's registry).
#[derive(Debug)]
pub(crate) struct TxState {
    id: u64,
    deadline: Instant,
    inner: Mutex<Inner>,
}

impl TxState {
    pub(crate) fn new(id: u64, timeout: Duration) -> Self {
        TxState {
            id,
            deadline: Instant::now() + timeout,
            inner: Mutex::new(Inner {
                status: Status::Open,
                staged: Vec::new(),
                finished_at: None,
                doubt: None,
            }),
        }
    }

    /// Rolls the transaction back if it is open and past its deadline. Returns whether it is
    /// finished and has been for at least `forget_after` (the registry may then drop it).
    pub(crate) fn expire_if_due(&self, now: Instant, forget_after: Duration) -> bool {
        let mut inner = self.inner.lock();
        self.expire_locked(&mut inner, now);
        inner
            .finished_at
            .is_some_and(|t| now.saturating_duration_since(t) >= forget_after)
    }

    fn expire_locked(&self, inner: &mut Inner, now: Instant) {
        if inner.status == Status::Open && now >= self.deadline {
            inner.status = Status::Expired;
            inner.staged.clear();
            inner.finished_at = Some(now);
        }
    }

    /// The state, or the error that says why it is not open.
    fn open<'a>(&self, inner: &'a mut Inner) -> Result<&'a mut Inner, TxError> {
        self.expire_locked(inner, Instant::now());
        match inner.status {
            Status::Open => Ok(inner),
            Status::Committing => Err(TxError::Committing(self.id)),
            Status::Committed => Err(TxError::Committed(self.id)),
            Status::InDoubt => Err(self.in_doubt(inner)),
            Status::RolledBack => Err(TxError::RolledBack(self.id)),
            Status::Expired => Err(TxError::Expired(self.id)),
        }
    }

    fn in_doubt(&self, inner: &Inner) -> TxError {
        TxError::InDoubt {
            id: self.id,
            reason: inner.doubt.clone().unwrap_or_default(),
        }
    }

    /// Ends a commit: `Committed` once every record is durable, `InDoubt` with `reason`
    /// otherwise. Returns the error to report for a failure.
    fn finish(&self, doubt: Option<String>) -> Option<TxError> {
        let mut inner = self.inner.lock();
        if inner.status == Status::Committing {
            inner.finished_at = Some(Instant::now());
            match doubt {
                None => inner.status = Status::Committed,
                Some(reason) => {
                    inner.status = Status::InDoubt;
                    inner.doubt = Some(reason);
                }
            }
        }
        (inner.status == Status::InDoubt).then(|| self.in_doubt(&inner))
    }
}

/// Marks a commit waiting for its sync as in doubt if its wait is given up (the future of
/// [`Transaction::commit_wait`] dropped): the commit thread may still make the records durable.
struct CommitGuard<'a> {
    state: &'a TxState,
    armed: bool,
}

impl CommitGuard<'_> {
    fn finish(mut self, doubt: Option<String>) -> Option<TxError> {
        self.armed = false;
        self.state.finish(doubt)
    }
}

impl Drop for CommitGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.state.finish(Some(
                "the commit stopped waiting before its records were synced".into(),
            ));
        }
    }
}

/// Why the sync of `topic`'s part of a commit failed, as the reason of an in-doubt commit.
fn sync_doubt(topic: &Topic, e: crate::log::AppendError) -> String {
    match BrokerInner::sync_error(topic, e) {
        PublishError::InDoubt { topic, reason } => format!("topic {topic}: {reason}"),
        other => other.to_string(),
    }
}

/// What a commit appended: each topic's offsets, and the durable topics (with the end of
/// their records) whose sync the commit waits for.
struct Appended {
    ranges: Vec<(TopicName, Range<u64>)>,
    syncs: Vec<(Arc<Topic>, u64)>,
}

/// A transaction; made by [`Broker::begin`]. Clones share one transaction.
#[derive(Debug, Clone)]
pub struct Transaction {
    pub(crate) broker: Broker,
    pub(crate) state: Arc<TxState>,
}

impl Transaction {
    /// Its id (to find it again with [`Broker::transaction`]).
    pub fn id(&self) -> u64 {
        self.state.id
    }

    /// Stages `message` for `topic`; nothing is visible before [`commit`](Self::commit).
    pub fn publish(&self, topic: &str, message: impl Into<Message>) -> Result<(), TxError> {
        let name = TopicName::new(topic).map_err(PublishError::from)?;
        let topic = self.broker.inner.topic(&name)?;
        let record = topic.wrap(message.into(), &None);
        let mut inner = self.state.inner.lock();
        let inner = self.state.open(&mut inner)?;
        inner.staged.push((topic, record));
        Ok(())
    }

    /// Staged messages.
    pub fn len(&self) -> usize {
        self.state.inner.lock().staged.len()
    }

    /// Whether nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes every staged message visible at once: per topic, contiguous offsets in staging
    /// order. Returns each topic's offsets. If a topic cannot take its records now (full, or
    /// over the memory limit), nothing is appended and the transaction stays open.
    ///
    /// On durable topics that wait for their sync, the calling thread waits for the broker's
    /// commit thread to sync them (from async code, [`commit_wait`](Self::commit_wait) does
    /// not hold up an async worker).
    ///
    /// If the records were handed to storage but their write or sync failed, the commit
    /// returns [`TxError::InDoubt`] and the transaction stays in doubt ([`status`](Self::status)).
    pub fn commit(&self) -> Result<Vec<(TopicName, Range<u64>)>, TxError> {
        let appended = self.append_all()?;
        crate::io::block_on(self.durable(appended))
    }

    /// The result of a commit once its wait for durability ended.
    fn outcome(
        failed: Option<TxError>,
        ranges: Vec<(TopicName, Range<u64>)>,
    ) -> Result<Vec<(TopicName, Range<u64>)>, TxError> {
        match failed {
            Some(e) => Err(e),
            None => Ok(ranges),
        }
    }

    /// Where the transaction is: open, committing (waiting for its sync), committed (durable),
    /// in doubt, rolled back or expired.
    pub fn status(&self) -> TxStatus {
        let mut inner = self.state.inner.lock();
        self.state.expire_locked(&mut inner, Instant::now());
        inner.status
    }

    /// [`commit`](Self::commit) without waiting for durability: appends every staged message
    /// and marks the transaction committed, or committing when records must be synced before
    /// they are visible (and the commit reported); returns what must be synced. A storage
    /// failure once records were handed to storage leaves the transaction in doubt.
    fn append_all(&self) -> Result<Appended, TxError> {
        let mut guard = self.state.inner.lock();
        let inner = self.state.open(&mut guard)?;
        if !self.broker.inner.running() {
            return Err(PublishError::Closed.into());
        }
        // Group by topic, in name order (the lock order), keeping staging order within each.
        let mut by_topic: BTreeMap<TopicName, (Arc<Topic>, Vec<Arc<Record>>)> = BTreeMap::new();
        for (topic, record) in inner.staged.drain(..) {
            by_topic
                .entry(topic.name.clone())
                .or_insert_with(|| (topic.clone(), Vec::new()))
                .1
                .push(record);
        }
        let (topics, mut batches): (Vec<Arc<Topic>>, Vec<Vec<Arc<Record>>>) =
            by_topic.into_values().unzip();
        let checked = {
            let mut logs: Vec<_> = topics.iter().map(|t| t.lock()).collect();
            let mut stores = Vec::with_capacity(topics.len());
            let mut failure = None;
            for ((topic, records), log) in topics.iter().zip(&batches).zip(logs.iter_mut()) {
                match topic.check(log, records) {
                    Ok(store) => stores.push(store),
                    Err(e) => {
                        failure = Some(BrokerInner::append_error(topic, e));
                        break;
                    }
                }
            }
            match failure {
                Some(e) => Err(e),
                None => {
                    // Across several durable topics the store writes each topic's records as a
                    // part and then one commit record naming them all: after a crash, all of
                    // the transaction or none of it is there.
                    let storage = self.broker.inner.storage().filter(|_| topics.len() > 1);
                    let mut parts = storage.map(|_| Vec::with_capacity(topics.len()));
                    let mut ranges = Vec::with_capacity(topics.len());
                    for (((topic, records), log), store) in topics
                        .iter()
                        .zip(batches.iter_mut())
                        .zip(logs.iter_mut())
                        .zip(stores)
                    {
                        match topic.commit_part(log, records, store, parts.as_mut()) {
                            Ok(range) => ranges.push((topic.name.clone(), range)),
                            Err(e) => {
                                // Storage had this part (and any before it): in doubt.
                                let e = BrokerInner::append_error(topic, e);
                                return Err(self.doubt_locked(inner, e));
                            }
                        }
                    }
                    if let (Some(storage), Some(parts)) = (storage, parts) {
                        if let Err(e) = storage.commit_parts(&parts) {
                            let e = PublishError::Storage(format!(
                                "storage write of the commit record failed: {e}"
                            ));
                            return Err(self.doubt_locked(inner, e));
                        }
                    }
                    Ok(ranges)
                }
            }
        };
        match checked {
            Ok(ranges) => {
                // Durable topics that wait for their sync show the records once the commit
                // thread synced them; the caller waits for that.
                let syncs = topics
                    .iter()
                    .zip(&ranges)
                    .filter(|(topic, _)| topic.waits_for_sync())
                    .map(|(topic, (_, range))| (topic.clone(), range.end))
                    .collect::<Vec<_>>();
                if syncs.is_empty() {
                    inner.status = Status::Committed;
                    inner.finished_at = Some(Instant::now());
                } else {
                    inner.status = Status::Committing;
                }
                Ok(Appended { ranges, syncs })
            }
            Err(e) => {
                // Put everything back, in order, for a later attempt.
                for (topic, records) in topics.into_iter().zip(batches) {
                    inner
                        .staged
                        .extend(records.into_iter().map(|r| (topic.clone(), r)));
                }
                Err(e.into())
            }
        }
    }

    /// Commits like [`commit`](Self::commit), but when a topic with the `Block` overflow policy
    /// is full, waits for consumers to free room and tries again (cancel by dropping the future,
    /// or bound it with `tokio::time::timeout`). Other errors return at once.
    pub async fn commit_wait(&self) -> Result<Vec<(TopicName, Range<u64>)>, TxError> {
        let appended = loop {
            let full = match self.append_all() {
                Err(TxError::Publish(PublishError::Full { topic, .. })) => topic,
                other => break other?,
            };
            let Some((topic, len, bytes)) = self.staged_for(&full) else {
                break self.append_all()?;
            };
            if topic.config.overflow != Overflow::Block {
                break self.append_all()?;
            }
            let is_full = |e: &TxError| matches!(e, TxError::Publish(p) if p.is_full());
            let r =
                crate::broker::wait_for_space(&topic, (len, bytes), || self.append_all(), is_full)
                    .await;
            match r {
                Err(e) if is_full(&e) => continue,
                other => break other?,
            }
        };
        self.durable(appended).await
    }

    /// Waits until the commit thread synced what `appended` must have synced, then marks the
    /// transaction committed; in doubt if a sync failed or could not be asked for (also when
    /// the wait is dropped: see `CommitGuard`).
    async fn durable(&self, appended: Appended) -> Result<Vec<(TopicName, Range<u64>)>, TxError> {
        let guard = CommitGuard {
            state: &self.state,
            armed: true,
        };
        let mut durable = Vec::new();
        let mut doubt = None;
        for (topic, end) in &appended.syncs {
            match self.broker.inner.submit(topic, *end) {
                Ok(d) => durable.push((d, topic)),
                Err(e) => {
                    doubt = Some(e.to_string());
                    break;
                }
            }
        }
        for (d, topic) in durable {
            if doubt.is_some() {
                break;
            }
            if let Err(e) = d.await {
                doubt = Some(sync_doubt(topic, e));
            }
        }
        Self::outcome(guard.finish(doubt), appended.ranges)
    }

    /// Marks the transaction (whose lock the caller holds) in doubt after a storage failure
    /// met once records were handed to storage; returns the error saying so.
    fn doubt_locked(&self, inner: &mut Inner, e: PublishError) -> TxError {
        inner.staged.clear();
        inner.status = Status::InDoubt;
        inner.finished_at = Some(Instant::now());
        inner.doubt = Some(match e {
            PublishError::InDoubt { reason, .. } => reason,
            other => other.to_string(),
        });
        self.state.in_doubt(inner)
    }

    /// The topic named `name` among the staged records, with how many records and bytes are
    /// staged for it.
    fn staged_for(&self, name: &str) -> Option<(Arc<Topic>, usize, usize)> {
        let inner = self.state.inner.lock();
        let mut found: Option<(Arc<Topic>, usize, usize)> = None;
        for (topic, record) in inner.staged.iter().filter(|(t, _)| t.name.as_str() == name) {
            let entry = found.get_or_insert_with(|| (topic.clone(), 0, 0));
            entry.1 += 1;
            entry.2 += record.message.size();
        }
        found
    }

    /// Discards every staged message.
    pub fn rollback(&self) -> Result<(), TxError> {
        let mut guard = self.state.inner.lock();
        let inner = self.state.open(&mut guard)?;
        inner.staged.clear();
        inner.status = Status::RolledBack;
        inner.finished_at = Some(Instant::now());
        Ok(())
    }
}
