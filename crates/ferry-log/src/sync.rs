//! Group commit (one fsync shared by concurrent appenders) and the interval flusher thread.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::error::LogError;

#[derive(Debug, Default)]
struct SyncState {
    /// Every write with a sequence number up to this one is on stable storage.
    synced: u64,
    /// A leader is fsyncing right now.
    in_progress: bool,
    /// An fsync failed: the state of the page cache is unknown, so nothing is durable any more.
    failed: Option<String>,
}

/// Leader/follower group commit over write sequence numbers.
#[derive(Debug, Default)]
pub(crate) struct GroupCommit {
    state: Mutex<SyncState>,
    done: Condvar,
}

impl GroupCommit {
    /// Returns once every write up to `seq` is synced. The caller that finds no sync in progress
    /// becomes the leader and runs `sync_all`, which syncs everything written so far and returns
    /// the sequence number it covered; the others wait for it and for the next round if it did
    /// not cover them.
    pub fn wait_synced(
        &self,
        seq: u64,
        sync_all: impl Fn() -> Result<u64, LogError>,
    ) -> Result<(), LogError> {
        let mut st = self.state.lock();
        loop {
            if let Some(reason) = &st.failed {
                return Err(LogError::SyncFailed(reason.clone()));
            }
            if st.synced >= seq {
                return Ok(());
            }
            if st.in_progress {
                self.done.wait(&mut st);
                continue;
            }
            st.in_progress = true;
            let result = parking_lot::MutexGuard::unlocked(&mut st, &sync_all);
            st.in_progress = false;
            match result {
                Ok(covered) => st.synced = st.synced.max(covered),
                Err(e) => st.failed = Some(e.to_string()),
            }
            self.done.notify_all();
        }
    }
}

/// A background thread that calls a function every interval until stopped.
#[derive(Debug)]
pub(crate) struct Flusher {
    stop: Arc<(Mutex<bool>, Condvar)>,
    handle: Option<JoinHandle<()>>,
}

impl Flusher {
    /// Starts the thread; `tick` returning `false` ends it.
    pub fn spawn(
        interval: Duration,
        tick: impl Fn() -> bool + Send + 'static,
    ) -> Result<Self, std::io::Error> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("ferry-log-flush".into())
            .spawn(move || loop {
                {
                    let mut stopped = flag.0.lock();
                    if !*stopped {
                        flag.1.wait_for(&mut stopped, interval);
                    }
                    if *stopped {
                        return;
                    }
                }
                if !tick() {
                    return;
                }
            })?;
        Ok(Flusher {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        *self.stop.0.lock() = true;
        self.stop.1.notify_all();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.stop();
    }
}
