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
    /// registered: it is then registered again in the same place (a waiter woken for nothing
    /// keeps its turn) and should look for work again before it sleeps, unregistering if it
    /// finds some.
    pub(crate) fn register(&self, key: u64, waker: &Waker) -> bool {
        let mut waiters = crate::sync::lock(&self.waiters);
        if let Some(pos) = waiters.iter().position(|w| w.key == key) {
            let w = &mut waiters[pos];
            let notified = w.notified;
            match &w.waker {
                Some(old) if old.will_wake(waker) => {}
                _ => w.waker = Some(waker.clone()),
            }
            if notified {
                w.notified = false;
                self.waiting.fetch_add(1, Ordering::SeqCst);
                drop(waiters);
                fence();
            }
            return notified;
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
            // `remove`, not `swap_remove`: waiters stay in the order they registered, so
            // wake-ups go round the members of a group (one that found work registers again
            // at the back).
            let w = waiters.remove(pos);
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

    /// Wakes the longest-registered waiter that is not notified yet.
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
                    // Notified: still registered (re-armed); look again.
                    self.registered = true;
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

#[cfg(all(test, not(ferry_loom)))]
mod order_tests {
    use super::*;

    /// The keys of the waiters in registration order, and which of them are notified.
    fn waiters(s: &Signal) -> Vec<(u64, bool)> {
        crate::sync::lock(&s.waiters)
            .iter()
            .map(|w| (w.key, w.notified))
            .collect()
    }

    #[test]
    fn wake_ups_go_round_the_waiters() {
        let s = Signal::new();
        let waker = Waker::noop();
        for key in 1..=3 {
            assert!(!s.register(key, waker));
        }
        // The longest-registered waiter is woken first.
        s.notify_one();
        assert_eq!(waiters(&s), [(1, true), (2, false), (3, false)]);
        // It finds work: it leaves, and the notification passes to the next in line, which
        // finds nothing and stays registered in its place.
        s.unregister(1);
        assert_eq!(waiters(&s), [(2, true), (3, false)]);
        assert!(s.register(2, waker));
        assert_eq!(waiters(&s), [(2, false), (3, false)]);
        // The member that found work registers again at the back.
        assert!(!s.register(1, waker));
        assert_eq!(waiters(&s), [(2, false), (3, false), (1, false)]);
        s.notify_one();
        assert_eq!(waiters(&s), [(2, true), (3, false), (1, false)]);
        assert_eq!(s.waiting.load(Ordering::SeqCst), 2);
    }
}
