//! The engine subscriptions of one connection, by key, polled only when woken.
//!
//! A connection may hold many subscriptions (`mqtt.max_subscriptions_per_connection`). A map
//! that polls every stream on each wake of the connection, and finds keys by a linear scan
//! (what `tokio_stream::StreamMap` does), makes each packet cost O(subscriptions) and
//! subscribing N filters O(N²). Here every stream has a waker of its own that queues the
//! stream's slot when the engine wakes it, so that a poll touches only the streams that have
//! something, and keys are found by hash.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;
use futures::{Stream, StreamExt};

/// Slots woken since the last poll, and the task to wake for them.
#[derive(Default)]
struct Ready {
    queue: parking_lot::Mutex<Vec<(usize, u64)>>,
    task: AtomicWaker,
}

/// The waker of one slot: queues it (once until it is polled) and wakes the task.
struct SlotWaker {
    idx: usize,
    generation: u64,
    /// Whether the slot is queued already (in the shared or the local queue).
    queued: AtomicBool,
    ready: Arc<Ready>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.ready.queue.lock().push((self.idx, self.generation));
            self.ready.task.wake();
        }
    }
}

struct Slot<S> {
    key: Arc<str>,
    stream: S,
    waker: Arc<SlotWaker>,
}

/// Streams by key; [`Self::poll_next`] yields `(key, item)` from whichever stream is ready.
/// A stream that ends is removed.
pub(crate) struct Streams<S> {
    slots: Vec<Option<Slot<S>>>,
    free: Vec<usize>,
    by_key: HashMap<Arc<str>, usize>,
    /// Slots to poll, taken from the shared queue (and new slots, which are polled once).
    local: VecDeque<(usize, u64)>,
    ready: Arc<Ready>,
    next_generation: u64,
}

impl<S> Default for Streams<S> {
    fn default() -> Self {
        Streams {
            slots: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::new(),
            local: VecDeque::new(),
            ready: Arc::default(),
            next_generation: 0,
        }
    }
}

impl<S: Stream + Unpin> Streams<S> {
    /// Adds `stream` under `key`, replacing (dropping) the one there.
    pub(crate) fn insert(&mut self, key: &str, stream: S) {
        self.remove(key);
        let generation = self.next_generation;
        self.next_generation += 1;
        let idx = self.free.pop().unwrap_or(self.slots.len());
        let waker = Arc::new(SlotWaker {
            idx,
            generation,
            queued: AtomicBool::new(true),
            ready: self.ready.clone(),
        });
        let key: Arc<str> = Arc::from(key);
        let slot = Slot {
            key: key.clone(),
            stream,
            waker,
        };
        if idx == self.slots.len() {
            self.slots.push(Some(slot));
        } else if let Some(s) = self.slots.get_mut(idx) {
            *s = Some(slot);
        }
        self.by_key.insert(key, idx);
        // Polled once, which registers its waker.
        self.local.push_back((idx, generation));
    }

    /// Removes (drops) the stream under `key`; whether there was one.
    pub(crate) fn remove(&mut self, key: &str) -> bool {
        let Some(idx) = self.by_key.remove(key) else {
            return false;
        };
        if let Some(s) = self.slots.get_mut(idx) {
            *s = None;
        }
        self.free.push(idx);
        true
    }

    pub(crate) fn contains_key(&self, key: &str) -> bool {
        self.by_key.contains_key(key)
    }

    /// How many streams there are.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_key.len()
    }

    /// The next item of a woken stream; pending (the task woken later) when none has one.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<(Arc<str>, S::Item)> {
        self.ready.task.register(cx.waker());
        match self.try_next() {
            Some(item) => Poll::Ready(item),
            None => Poll::Pending,
        }
    }

    /// The next item of a woken stream, if one has one now. Does not register the task for a
    /// wake-up ([`Self::poll_next`] does).
    pub(crate) fn try_next(&mut self) -> Option<(Arc<str>, S::Item)> {
        loop {
            {
                // Those woken since go behind those queued already.
                let mut queue = self.ready.queue.lock();
                if self.local.is_empty() && queue.is_empty() {
                    return None;
                }
                self.local.extend(queue.drain(..));
            }
            if let Some((idx, generation)) = self.local.pop_front() {
                let Some(Some(slot)) = self.slots.get_mut(idx) else {
                    continue;
                };
                if slot.waker.generation != generation {
                    // Woken before it was removed and the slot reused.
                    continue;
                }
                slot.waker.queued.store(false, Ordering::Release);
                let waker = Waker::from(slot.waker.clone());
                let mut scx = Context::from_waker(&waker);
                match slot.stream.poll_next_unpin(&mut scx) {
                    Poll::Ready(Some(item)) => {
                        // It may have more: polled again after the streams queued before it
                        // (round robin: a busy stream does not starve the others).
                        if !slot.waker.queued.swap(true, Ordering::AcqRel) {
                            self.local.push_back((idx, generation));
                        }
                        return Some((slot.key.clone(), item));
                    }
                    Poll::Ready(None) => {
                        let key = slot.key.clone();
                        self.remove(&key);
                    }
                    Poll::Pending => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use futures::channel::mpsc;

    fn noop() -> Context<'static> {
        Context::from_waker(futures::task::noop_waker_ref())
    }

    #[test]
    fn yields_from_woken_streams_by_key_and_forgets_removed_ones() {
        let mut s: Streams<mpsc::UnboundedReceiver<u32>> = Streams::default();
        let (a_tx, a) = mpsc::unbounded();
        let (b_tx, b) = mpsc::unbounded();
        s.insert("a", a);
        s.insert("b", b);
        assert!(s.poll_next(&mut noop()).is_pending());
        b_tx.unbounded_send(1).unwrap();
        b_tx.unbounded_send(2).unwrap();
        a_tx.unbounded_send(3).unwrap();
        let mut got = Vec::new();
        while let Some((k, v)) = s.try_next() {
            got.push((k.to_string(), v));
        }
        got.sort();
        assert_eq!(got, vec![("a".into(), 3), ("b".into(), 1), ("b".into(), 2)]);
        // Removed: its items are never seen, and its slot is reused safely.
        assert!(s.remove("a"));
        a_tx.unbounded_send(4).unwrap_or_default();
        let (c_tx, c) = mpsc::unbounded();
        s.insert("c", c);
        c_tx.unbounded_send(5).unwrap();
        assert_eq!(
            s.try_next().map(|(k, v)| (k.to_string(), v)),
            Some(("c".into(), 5))
        );
        assert!(s.try_next().is_none());
        assert!(s.contains_key("b") && s.contains_key("c") && !s.contains_key("a"));
        // A stream that ends is removed.
        drop(b_tx);
        assert!(s.try_next().is_none());
        assert!(!s.contains_key("b"));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn a_busy_stream_does_not_starve_the_others() {
        let mut s: Streams<mpsc::UnboundedReceiver<u32>> = Streams::default();
        let (a_tx, a) = mpsc::unbounded();
        let (b_tx, b) = mpsc::unbounded();
        s.insert("a", a);
        s.insert("b", b);
        for i in 0..100 {
            a_tx.unbounded_send(i).unwrap();
        }
        assert_eq!(s.try_next().map(|(k, _)| k.to_string()), Some("a".into()));
        b_tx.unbounded_send(1000).unwrap();
        let next: Vec<String> = (0..3)
            .filter_map(|_| s.try_next().map(|(k, _)| k.to_string()))
            .collect();
        assert!(next.contains(&"b".to_string()), "{next:?}");
    }

    #[test]
    fn a_wake_reaches_the_task() {
        struct Flag(AtomicBool);
        impl Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let mut s: Streams<mpsc::UnboundedReceiver<u32>> = Streams::default();
        let (tx, rx) = mpsc::unbounded();
        s.insert("x", rx);
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        assert!(s.poll_next(&mut Context::from_waker(&waker)).is_pending());
        assert!(!flag.0.load(Ordering::SeqCst));
        tx.unbounded_send(9).unwrap();
        assert!(flag.0.load(Ordering::SeqCst), "the task was not woken");
        match s.poll_next(&mut Context::from_waker(&waker)) {
            Poll::Ready((k, v)) => assert_eq!((&*k, v), ("x", 9)),
            Poll::Pending => panic!("woken but nothing ready"),
        }
    }

    #[test]
    fn many_streams_cost_only_the_woken_ones() {
        let mut s: Streams<mpsc::UnboundedReceiver<u32>> = Streams::default();
        let mut senders = Vec::new();
        for i in 0..10_000 {
            let (tx, rx) = mpsc::unbounded();
            s.insert(&format!("k{i}"), rx);
            senders.push(tx);
        }
        assert!(s.try_next().is_none());
        senders[1234].unbounded_send(7).unwrap();
        // Only the woken stream is queued.
        assert_eq!(s.ready.queue.lock().len(), 1);
        assert_eq!(
            s.try_next().map(|(k, v)| (k.to_string(), v)),
            Some(("k1234".into(), 7))
        );
    }
}
