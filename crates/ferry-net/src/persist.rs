//! Saving the server's state before an acknowledgement that depends on it.
//!
//! A SUBACK or UNSUBACK of a persistent session, or the PUBACK of a retained message, promises
//! state that must survive a crash: the session's subscriptions, the retained message, and the
//! engine position of a new consumer group. [`Persister::persist`] waits until a save that began
//! after the call has written all of it (sessions, retained messages, consumer positions,
//! each replaced atomically and fsynced). The saves run on a thread of their own, never on an
//! async worker, and one save covers every request made before it began, so a storm of
//! subscriptions costs a few saves, not one each.

use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

/// Which saves of the server's state failed last time they ran, for `/health`: a part
/// (sessions, retained messages, consumer positions) is failing from a failed save until one
/// succeeds.
#[derive(Debug, Default)]
pub(crate) struct SaveHealth {
    failing: Mutex<std::collections::BTreeMap<&'static str, String>>,
}

impl SaveHealth {
    /// Records the outcome of a save of `part`.
    pub(crate) fn record<E: std::fmt::Display>(&self, part: &'static str, result: &Result<(), E>) {
        let mut failing = self.failing.lock();
        match result {
            Ok(()) => {
                failing.remove(part);
            }
            Err(e) => {
                failing.insert(part, e.to_string());
            }
        }
    }

    /// What is failing now (`None` when every last save succeeded).
    pub(crate) fn failure(&self) -> Option<String> {
        let failing = self.failing.lock();
        if failing.is_empty() {
            return None;
        }
        let parts: Vec<String> = failing
            .iter()
            .map(|(part, e)| format!("saving {part} failed: {e}"))
            .collect();
        Some(parts.join("; "))
    }
}

/// The outcome of the last save round: the last request it covered, and its error.
#[derive(Debug, Clone, Default)]
struct Round {
    covered: u64,
    error: Option<Arc<str>>,
}

#[derive(Debug, Default)]
struct Requests {
    requested: u64,
    stop: bool,
}

#[derive(Debug)]
struct Inner {
    requests: Mutex<Requests>,
    wake: Condvar,
    done: watch::Sender<Round>,
}

/// The save thread. Dropping it lets the thread end after its current save.
#[derive(Debug)]
pub(crate) struct Persister {
    inner: Arc<Inner>,
}

impl Persister {
    /// Starts the thread; `save` writes everything and says what failed.
    pub(crate) fn start(
        save: impl Fn() -> Result<(), String> + Send + 'static,
    ) -> std::io::Result<Persister> {
        let inner = Arc::new(Inner {
            requests: Mutex::new(Requests::default()),
            wake: Condvar::new(),
            done: watch::Sender::new(Round::default()),
        });
        let i = inner.clone();
        std::thread::Builder::new()
            .name("ferry-persist".into())
            .spawn(move || run(&i, save))?;
        Ok(Persister { inner })
    }

    /// Returns once a save that began after this call finished (or failed).
    pub(crate) async fn persist(&self) -> Result<(), String> {
        let mut rx = self.inner.done.subscribe();
        let target = {
            let mut r = self.inner.requests.lock();
            r.requested += 1;
            r.requested
        };
        self.inner.wake.notify_one();
        loop {
            {
                let round = rx.borrow_and_update();
                if round.covered >= target {
                    return round
                        .error
                        .as_deref()
                        .map_or(Ok(()), |e| Err(e.to_string()));
                }
            }
            if rx.changed().await.is_err() {
                return Err("the state saver stopped".into());
            }
        }
    }
}

impl Drop for Persister {
    fn drop(&mut self) {
        self.inner.requests.lock().stop = true;
        self.inner.wake.notify_one();
    }
}

fn run(inner: &Inner, save: impl Fn() -> Result<(), String>) {
    let mut covered = 0;
    loop {
        let target = {
            let mut r = inner.requests.lock();
            while r.requested == covered && !r.stop {
                inner.wake.wait(&mut r);
            }
            if r.stop {
                return;
            }
            r.requested
        };
        let error = save().err().map(Arc::from);
        covered = target;
        inner.done.send_replace(Round { covered, error });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_request_is_covered_by_a_save_that_began_after_it() {
        let saves = Arc::new(AtomicU64::new(0));
        let s = saves.clone();
        let p = Arc::new(
            Persister::start(move || {
                s.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(2));
                Ok(())
            })
            .unwrap(),
        );
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let p = p.clone();
            let saves = saves.clone();
            tasks.push(tokio::spawn(async move {
                let before = saves.load(Ordering::SeqCst);
                p.persist().await.unwrap();
                // At least one save started after the request.
                assert!(saves.load(Ordering::SeqCst) > before);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // Requests share saves.
        assert!(saves.load(Ordering::SeqCst) < 64);
    }

    #[test]
    fn save_health_fails_from_a_failed_save_until_one_succeeds() {
        let h = SaveHealth::default();
        assert_eq!(h.failure(), None);
        h.record("sessions", &Err::<(), _>("disk full"));
        h.record("retained messages", &Ok::<(), &str>(()));
        assert_eq!(
            h.failure().as_deref(),
            Some("saving sessions failed: disk full")
        );
        h.record("retained messages", &Err::<(), _>("read-only"));
        h.record("sessions", &Ok::<(), &str>(()));
        assert_eq!(
            h.failure().as_deref(),
            Some("saving retained messages failed: read-only")
        );
        h.record("retained messages", &Ok::<(), &str>(()));
        assert_eq!(h.failure(), None);
    }

    #[tokio::test]
    async fn a_failed_save_is_reported() {
        let p = Persister::start(|| Err("disk full".into())).unwrap();
        assert_eq!(p.persist().await, Err("disk full".to_string()));
    }
}
