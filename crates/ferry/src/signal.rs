//! The hand-off between publishers and waiting consumers.
//!
//! Each consumer (a fanout subscription or a consumer group) owns one [`Signal`]. A consumer task
//! that finds nothing to read registers its waker with [`Signal::register`], then checks the
//! log once more before it sleeps; a publisher appends to the log and then calls
//! [`Signal::notify_one`]. The `waiting` counter lets publishers skip the lock entirely while
//! nobody sleeps, which is the common case under load.
//!
//! Invariant (no lost wake-up): the consumer's write of `waiting` and the publisher's write of the
//! log's tail are both `SeqCst`, as are the reads that follow them, so at least one side sees the
//! other: either the consumer's re-check sees the new record or the publisher sees the waiter.
//! `loom` checks this in `tests` below (`RUSTFLAGS="--cfg ferry_loom" cargo test -p ferry --lib loom`).

use std::task::Waker;

use crate::sync::{AtomicUsize, Mutex, Ordering};

#[derive(Debug)]
struct Waiter {
    key: u64,
    waker: Option<Waker>,
    notified: bool,
}

/// A multi-waiter wake-up signal with per-waiter notification flags.
#[derive(Debug, Default)]
pub(crate) struct Signal {
    waiting: AtomicUsize,
    waiters: Mutex<Vec<Waiter>>,
}

impl Signal {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Registers (or re-arms) waiter `key`. Returns `true` if it was notified since it last
    /// registered, in which case it is no longer registered and should look for work again.
    pub(crate) fn register(&self, key: u64, waker: &Waker) -> bool {
        let mut waiters = crate::sync::lock(&self.waiters);
        if let Some(pos) = waiters.iter().position(|w| w.key == key) {
            if waiters[pos].notified {
                waiters.swap_remove(pos);
                return true;
            }
            let slot = &mut waiters[pos].waker;
            match slot {
                Some(w) if w.will_wake(waker) => {}
                _ => *slot = Some(waker.clone()),
            }
            return false;
        }
        waiters.push(Waiter {
            key,
            waker: Some(waker.clone()),
            notified: false,
        });
        self.waiting.fetch_add(1, Ordering::SeqCst);
        false
    }

    /// Removes waiter `key` (it found work or is going away). If it had been notified, the
    /// notification is passed on to another waiter so that it is not lost.
    pub(crate) fn unregister(&self, key: u64) {
        let mut waiters = crate::sync::lock(&self.waiters);
        if let Some(pos) = waiters.iter().position(|w| w.key == key) {
            let w = waiters.swap_remove(pos);
            if !w.notified {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
            } else {
                Self::wake_one(&self.waiting, &mut waiters);
            }
        }
    }

    /// Wakes one registered waiter, if any. Cheap (one atomic load) when none is waiting.
    pub(crate) fn notify_one(&self) {
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut waiters = crate::sync::lock(&self.waiters);
        Self::wake_one(&self.waiting, &mut waiters);
    }

    /// Wakes every registered waiter (on close or shutdown).
    pub(crate) fn notify_all(&self) {
        let mut waiters = crate::sync::lock(&self.waiters);
        for w in waiters.iter_mut().filter(|w| !w.notified) {
            w.notified = true;
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            if let Some(waker) = w.waker.take() {
                waker.wake();
            }
        }
    }

    fn wake_one(waiting: &AtomicUsize, waiters: &mut [Waiter]) {
        if let Some(w) = waiters.iter_mut().find(|w| !w.notified) {
            w.notified = true;
            waiting.fetch_sub(1, Ordering::SeqCst);
            if let Some(waker) = w.waker.take() {
                waker.wake();
            }
        }
    }
}

#[cfg(all(test, ferry_loom))]
mod tests {
    use super::*;
    use crate::sync::{Arc, AtomicU64};
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A consumer future modelled on the engine's `poll_recv`: read the tail; if nothing new,
    /// register, re-check, and sleep.
    struct WaitFor<'a> {
        signal: &'a Signal,
        tail: &'a AtomicU64,
        want: u64,
        key: u64,
    }

    impl Future for WaitFor<'_> {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            loop {
                if self.tail.load(Ordering::SeqCst) >= self.want {
                    self.signal.unregister(self.key);
                    return Poll::Ready(());
                }
                if self.signal.register(self.key, cx.waker()) {
                    continue;
                }
                if self.tail.load(Ordering::SeqCst) >= self.want {
                    self.signal.unregister(self.key);
                    return Poll::Ready(());
                }
                return Poll::Pending;
            }
        }
    }

    #[test]
    fn loom_no_lost_wakeup_one_consumer() {
        loom::model(|| {
            let signal = Arc::new(Signal::new());
            let tail = Arc::new(AtomicU64::new(0));
            let (s2, t2) = (signal.clone(), tail.clone());
            let producer = loom::thread::spawn(move || {
                t2.store(1, Ordering::SeqCst);
                s2.notify_one();
            });
            loom::future::block_on(WaitFor {
                signal: &signal,
                tail: &tail,
                want: 1,
                key: 1,
            });
            producer.join().unwrap();
        });
    }

    #[test]
    fn loom_group_members_all_finish() {
        // Two members of a group wait for two records published by one producer: a notification
        // that reaches a member which then leaves must be passed on, so neither sleeps forever.
        loom::model(|| {
            let signal = Arc::new(Signal::new());
            let tail = Arc::new(AtomicU64::new(0));
            let (s2, t2) = (signal.clone(), tail.clone());
            let member = {
                let (s, t) = (signal.clone(), tail.clone());
                loom::thread::spawn(move || {
                    loom::future::block_on(WaitFor {
                        signal: &s,
                        tail: &t,
                        want: 1,
                        key: 2,
                    })
                })
            };
            let producer = loom::thread::spawn(move || {
                t2.store(1, Ordering::SeqCst);
                s2.notify_one();
                t2.store(2, Ordering::SeqCst);
                s2.notify_one();
            });
            loom::future::block_on(WaitFor {
                signal: &signal,
                tail: &tail,
                want: 2,
                key: 1,
            });
            member.join().unwrap();
            producer.join().unwrap();
        });
    }
}
