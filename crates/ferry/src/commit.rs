//! The commit thread of a durable broker: where publishes on topics whose store waits for its
//! sync (fsync-always) wait for durability.
//!
//! A publisher appends under the topic lock (a buffered write), then hands the topic and the
//! end of its records to the commit thread ([`Committer::submit`]) and waits until the topic's
//! visible end (its tail) reaches its records ([`Durable`]). The thread takes every waiting
//! request at once, syncs (the first topic's sync fsyncs the shared commit log, which covers
//! every topic's appends written so far; the others find their records synced), moves each
//! topic's tail, then wakes every task that waits. So concurrent publishers on any topics share
//! one fsync without a blocking-pool thread each, a task with many publishes waiting (a
//! pipelining MQTT connection) is woken once per fsync, not once per message, and no
//! allocation is made per publish.
//!
//! No lost wake-up: the thread moves the tails and then takes the wakers under the lock; a
//! waiter registers its waker under that lock and then checks the tail again. A failed sync
//! fails every waiter that is not durable yet (the commit log closes itself after a failed
//! fsync: nothing written after it can be made durable).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use crate::log::{AppendError, Topic};

#[derive(Default)]
struct Queue {
    requests: Vec<(Arc<Topic>, u64)>,
    stop: bool,
}

#[derive(Default)]
pub(crate) struct Shared {
    queue: Mutex<Queue>,
    work: Condvar,
    /// Tasks waiting for the next round to end.
    waiters: Mutex<Vec<Waker>>,
    /// The first sync failure (sticky).
    failed: Mutex<Option<AppendError>>,
    /// The storage failure seen last, until a write or sync succeeds again (for the broker's
    /// health); `faulty` says whether there is one without taking the lock.
    fault: Mutex<Option<String>>,
    faulty: AtomicBool,
}

impl Shared {
    fn set_fault(&self, reason: String) {
        let mut fault = self.fault.lock();
        *fault = Some(reason);
        self.faulty.store(true, Ordering::Release);
    }

    fn clear_fault(&self) {
        if self.faulty.load(Ordering::Acquire) {
            let mut fault = self.fault.lock();
            *fault = None;
            self.faulty.store(false, Ordering::Release);
        }
    }
}

/// The commit thread and its queue. Dropping it lets the thread end once the queue is empty.
pub(crate) struct Committer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Committer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committer").finish_non_exhaustive()
    }
}

impl Committer {
    /// Starts the thread.
    pub(crate) fn start() -> std::io::Result<Committer> {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-commit".into())
            .spawn(move || run(&s))?;
        Ok(Committer {
            shared,
            thread: Some(thread),
        })
    }

    /// Asks for everything of `topic` below `end` to be made durable and visible; the returned
    /// future resolves when it is.
    pub(crate) fn submit(&self, topic: Arc<Topic>, end: u64) -> Durable {
        let mut q = self.shared.queue.lock();
        if q.stop {
            drop(q);
            *self.shared.failed.lock() = Some(AppendError::Closed);
        } else {
            let was_empty = q.requests.is_empty();
            q.requests.push((topic.clone(), end));
            drop(q);
            if was_empty {
                self.shared.work.notify_one();
            }
        }
        Durable {
            topic,
            end,
            shared: self.shared.clone(),
        }
    }
}

impl Committer {
    /// Records a storage failure (a write, a sync or opening a topic's log): the broker's
    /// health says "degraded" with `reason` until a write or sync succeeds again.
    pub(crate) fn storage_failed(&self, reason: String) {
        self.shared.set_fault(reason);
    }

    /// Records that a write reached the store (one atomic load when nothing failed).
    pub(crate) fn storage_ok(&self) {
        self.shared.clear_fault();
    }

    /// The storage failure seen last, if no write or sync succeeded since.
    pub(crate) fn storage_fault(&self) -> Option<String> {
        if !self.shared.faulty.load(Ordering::Acquire) {
            return None;
        }
        self.shared.fault.lock().clone()
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.shared.queue.lock().stop = true;
        self.shared.work.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Resolves once a topic's records below `end` are durable and visible (see
/// [`Committer::submit`]), or to the sync failure that prevented it.
pub(crate) struct Durable {
    topic: Arc<Topic>,
    end: u64,
    shared: Arc<Shared>,
}

impl Durable {
    fn check(&self) -> Option<Result<(), AppendError>> {
        if self.topic.tail() >= self.end {
            return Some(Ok(()));
        }
        self.shared.failed.lock().clone().map(Err)
    }

    /// The topic it waits on.
    pub(crate) fn topic(&self) -> &Arc<Topic> {
        &self.topic
    }
}

impl Future for Durable {
    type Output = Result<(), AppendError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(r) = self.check() {
            return Poll::Ready(r);
        }
        {
            let mut waiters = self.shared.waiters.lock();
            if !waiters.last().is_some_and(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
        }
        // Checked again after registering: a round that ended in between is seen here.
        match self.check() {
            Some(r) => Poll::Ready(r),
            None => Poll::Pending,
        }
    }
}

fn run(shared: &Shared) {
    crate::io::mark_storage_thread();
    let mut batch = Vec::new();
    loop {
        {
            let mut q = shared.queue.lock();
            while q.requests.is_empty() && !q.stop {
                shared.work.wait(&mut q);
            }
            if q.requests.is_empty() {
                return;
            }
            std::mem::swap(&mut batch, &mut q.requests);
        }
        match commit(&mut batch) {
            Ok(()) => shared.clear_fault(),
            Err(e) => {
                if let AppendError::Storage(reason) = &e {
                    shared.set_fault(format!("storage sync failed: {reason}"));
                }
                shared.failed.lock().get_or_insert(e);
            }
        }
        let waiters = std::mem::take(&mut *shared.waiters.lock());
        for w in waiters {
            w.wake();
        }
    }
}

/// Syncs and reveals each topic of `batch` once, up to its highest end.
fn commit(batch: &mut Vec<(Arc<Topic>, u64)>) -> Result<(), AppendError> {
    // Requests of one topic are adjacent after sorting by topic; each topic syncs once.
    batch.sort_by_key(|(t, end)| (Arc::as_ptr(t) as usize, std::cmp::Reverse(*end)));
    batch.dedup_by(|later, first| Arc::ptr_eq(&later.0, &first.0));
    let mut result = Ok(());
    for (topic, end) in batch.drain(..) {
        if let Err(e) = topic.sync_and_reveal(end) {
            result = Err(e);
        }
    }
    result
}
