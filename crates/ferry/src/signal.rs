//! The hand-off between publishers and waiting consumers.
//!
//! Each consumer (a fanout subscription or a consumer group) owns one [`Signal`]. A consumer task
//! that finds nothing to read registers its waker with [`Signal::register`], then checks the
//! log once more before it sleeps; a publisher appends to the log and then calls
//! [`Signal::notify_one`]. The `waiting` counter lets publishers skip the lock entirely while
//! nobody sleeps, which is the common case under load.
//!
//! Invariant (no lost wake-up): the consumer increments `waiting` and then re-reads the log's
//! tail; the publisher stores the tail and then reads `waiting`, all `SeqCst`, with [`fence`]
//! between each side's write and read, so at least one side sees the other: either the
//! consumer's re-check sees the new record or the publisher sees the waiter.
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
        drop(waiters);
        fence();
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
    /// The caller must have issued [`fence`] after making its data visible.
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

/// The fence between one side's write and its read of the other side's variable.
///
/// Every access on both sides is `SeqCst`, and `SeqCst` accesses form one total order that
/// respects program order, which already forbids the outcome where both sides miss each other;
/// so outside loom this is a no-op. loom models `SeqCst` accesses more weakly than the memory
/// model does (as acquire/release) and would report that impossible lost wake-up, so under
/// `cfg(ferry_loom)` the order is spelled out with a real fence, which loom models exactly.
#[inline(always)]
pub(crate) fn fence() {
    #[cfg(ferry_loom)]
    crate::sync::fence(Ordering::SeqCst);
}

#[cfg(all(test, ferry_loom))]
mod tests {
    use super::*;
    use crate::sync::{Arc, AtomicU64};
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A group member modelled on the engine's `poll_recv`: take one record if there is one
    /// (passing the wake-up on if more remain); otherwise register, re-check, and sleep.
    struct TakeOne<'a> {
        signal: &'a Signal,
        tail: &'a AtomicU64,
        taken: &'a AtomicU64,
        key: u64,
        registered: bool,
    }

    impl Future for TakeOne<'_> {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            loop {
                let t = self.taken.load(Ordering::SeqCst);
                if t < self.tail.load(Ordering::SeqCst) {
                    if self
                        .taken
                        .compare_exchange(t, t + 1, Ordering::SeqCst, Ordering::SeqCst)
                        .is_err()
                    {
                        continue;
                    }
                    self.signal.unregister(self.key);
                    if t + 1 < self.tail.load(Ordering::SeqCst) {
                        self.signal.notify_one();
                    }
                    return Poll::Ready(());
                }
                if self.signal.register(self.key, cx.waker()) {
                    self.registered = false;
                    continue;
                }
                if !self.registered {
                    self.registered = true;
                    continue;
                }
                return Poll::Pending;
            }
        }
    }

    fn take_one<'a>(
        signal: &'a Signal,
        tail: &'a AtomicU64,
        taken: &'a AtomicU64,
        key: u64,
    ) -> TakeOne<'a> {
        TakeOne {
            signal,
            tail,
            taken,
            key,
            registered: false,
        }
    }

    #[test]
    fn loom_no_lost_wakeup_one_consumer() {
        loom::model(|| {
            let signal = Arc::new(Signal::new());
            let tail = Arc::new(AtomicU64::new(0));
            let taken = AtomicU64::new(0);
            let (s2, t2) = (signal.clone(), tail.clone());
            let producer = loom::thread::spawn(move || {
                t2.store(1, Ordering::SeqCst);
                fence();
                s2.notify_one();
            });
            loom::future::block_on(take_one(&signal, &tail, &taken, 1));
            producer.join().unwrap();
        });
    }

    #[test]
    fn loom_group_members_all_finish() {
        // Two members of a group each take one of two records published one by one: neither
        // may sleep forever while a record is left.
        loom::model(|| {
            let signal = Arc::new(Signal::new());
            let tail = Arc::new(AtomicU64::new(0));
            let taken = Arc::new(AtomicU64::new(0));
            let member = {
                let (s, t, k) = (signal.clone(), tail.clone(), taken.clone());
                loom::thread::spawn(move || loom::future::block_on(take_one(&s, &t, &k, 2)))
            };
            let (s2, t2) = (signal.clone(), tail.clone());
            let producer = loom::thread::spawn(move || {
                for n in 1..=2 {
                    t2.store(n, Ordering::SeqCst);
                    fence();
                    s2.notify_one();
                }
            });
            loom::future::block_on(take_one(&signal, &tail, &taken, 1));
            member.join().unwrap();
            producer.join().unwrap();
            assert_eq!(taken.load(Ordering::SeqCst), 2);
        });
    }
}
