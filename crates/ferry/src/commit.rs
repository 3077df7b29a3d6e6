//! The commit thread of a durable broker: where publishes on topics whose store waits for its
//! sync (fsync-always) wait for durability.
//!
//! A publisher appends under the topic lock (a buffered write), then hands the topic and the
//! end of its records to the commit thread and awaits a oneshot reply. The thread takes every
//! waiting request at once, syncs (the first topic's sync fsyncs the shared commit log, which
//! covers every topic's appends written so far; the others find their records synced), makes
//! the records visible and answers. So concurrent publishers on any topics share one fsync
//! without a blocking-pool thread each, and a caller can keep appending while earlier
//! publishes wait (pipelining: see [`crate::Publisher::publish_pipelined`]).

use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};
use tokio::sync::oneshot;

use crate::log::{AppendError, Topic};

/// The answer to a request: the records are durable and visible, or why not.
pub(crate) type Reply = oneshot::Receiver<Result<(), AppendError>>;

struct Request {
    topic: Arc<Topic>,
    end: u64,
    reply: oneshot::Sender<Result<(), AppendError>>,
}

#[derive(Default)]
struct Queue {
    requests: Vec<Request>,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

/// The commit thread and its queue. Dropping it answers what is queued and joins the thread.
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

    /// Asks for everything of `topic` below `end` to be made durable and visible.
    pub(crate) fn submit(&self, topic: Arc<Topic>, end: u64) -> Reply {
        let (reply, rx) = oneshot::channel();
        let mut q = self.shared.queue.lock();
        if q.stop {
            let _ = reply.send(Err(AppendError::Closed));
            return rx;
        }
        let was_empty = q.requests.is_empty();
        q.requests.push(Request { topic, end, reply });
        drop(q);
        if was_empty {
            self.shared.wake.notify_one();
        }
        rx
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.shared.queue.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(shared: &Shared) {
    let mut batch = Vec::new();
    loop {
        {
            let mut q = shared.queue.lock();
            while q.requests.is_empty() && !q.stop {
                shared.wake.wait(&mut q);
            }
            if q.requests.is_empty() {
                return;
            }
            std::mem::swap(&mut batch, &mut q.requests);
        }
        commit(&mut batch);
    }
}

/// Syncs and reveals each topic of `batch` once, up to its highest end, then answers.
fn commit(batch: &mut Vec<Request>) {
    // Requests of one topic are adjacent after sorting by topic; each topic syncs once.
    batch.sort_by_key(|r| Arc::as_ptr(&r.topic) as usize);
    let mut group: Vec<Request> = Vec::new();
    for r in batch.drain(..) {
        if group
            .first()
            .is_some_and(|g| !Arc::ptr_eq(&g.topic, &r.topic))
        {
            answer(&mut group);
        }
        group.push(r);
    }
    answer(&mut group);
}

/// Syncs and reveals one topic's requests and answers them.
fn answer(group: &mut Vec<Request>) {
    let Some(first) = group.first() else {
        return;
    };
    let end = group.iter().map(|r| r.end).max().unwrap_or(0);
    let result = first.topic.sync_and_reveal(end);
    for r in group.drain(..) {
        let _ = r.reply.send(result.clone());
    }
}
