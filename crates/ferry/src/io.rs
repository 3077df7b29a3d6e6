//! The storage threads of a durable broker, and the checks that keep storage I/O on them.
//!
//! A durable broker owns a small pool of I/O threads (`ferry-io-0`, `ferry-io-1`, ...) next to
//! its commit thread (`ferry-commit`, see [`crate::commit`]). Every storage operation that can
//! wait for the disk other than a buffered append runs on one of them: reads of a cursor
//! behind a topic's hot window, seeks by time, opening a topic's store, retention, saving
//! consumer positions and the syncs of [`Broker::flush`](crate::Broker::flush); the commit
//! thread does the fsyncs that publishes wait for. So no fsync, file open or disk read runs
//! on an async worker, nor while an engine lock (registry, saved positions, consumer state,
//! topic log) is held: the engine takes none of them around the work it hands over.
//!
//! Callers reach the pool three ways: [`IoPool::spawn`] (fire and forget: a cursor's read,
//! whose result it picks up on a later fetch), [`IoPool::run`] (a future, for async callers)
//! and [`IoPool::call`] (the calling thread waits; for the synchronous API, such as
//! `Broker::flush` or creating a topic from `Broker::publisher`). Work handed over from a
//! storage thread runs inline.
//!
//! Storage threads carry a thread-local mark ([`on_storage_thread`]), which a test storage
//! checks instead of thread names: a runtime may name its threads anything, and Tokio's
//! blocking threads look like its workers. In debug builds, the engine's locks count how many
//! of them the current thread holds ([`engine_locks_held`]).

use std::cell::Cell;
use std::collections::VecDeque;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

/// How many I/O threads a durable broker starts: enough that a long retention pass or
/// positions save does not hold up cursor reads, few enough to stay out of the way of the
/// async workers on a small machine.
pub(crate) const IO_THREADS: usize = 2;

thread_local! {
    static STORAGE_THREAD: Cell<bool> = const { Cell::new(false) };
    static ENGINE_LOCKS: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as one of the engine's storage threads.
pub(crate) fn mark_storage_thread() {
    STORAGE_THREAD.with(|s| s.set(true));
}

/// Whether the current thread is one of the storage threads of a durable broker (its I/O
/// threads or its commit thread).
pub fn on_storage_thread() -> bool {
    STORAGE_THREAD.with(Cell::get)
}

/// How many engine locks (the registry, saved positions, a consumer's state, a topic's log)
/// the current thread holds. Counted in debug builds only; always 0 in release builds.
pub fn engine_locks_held() -> usize {
    ENGINE_LOCKS.with(Cell::get)
}

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    work: Condvar,
}

/// The I/O threads of a durable broker. Dropping it lets them end once their queue is empty.
pub(crate) struct IoPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for IoPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoPool")
            .field("threads", &self.threads.len())
            .finish_non_exhaustive()
    }
}

impl IoPool {
    /// Starts `threads` I/O threads.
    pub(crate) fn start(threads: usize) -> std::io::Result<IoPool> {
        let shared = Arc::new(Shared::default());
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads.max(1) {
            let s = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("ferry-io-{i}"))
                .spawn(move || run(&s));
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    // Let the threads already started end.
                    drop(IoPool {
                        shared,
                        threads: handles,
                    });
                    return Err(e);
                }
            }
        }
        Ok(IoPool {
            shared,
            threads: handles,
        })
    }

    /// Runs `job` on an I/O thread; nobody waits for it.
    pub(crate) fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        let mut q = self.shared.queue.lock();
        q.jobs.push_back(Box::new(job));
        drop(q);
        self.shared.work.notify_one();
    }

    /// Runs `f` on an I/O thread; the returned future resolves to its result.
    pub(crate) fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Task<T> {
        let slot = Arc::new(Slot::default());
        if on_storage_thread() {
            slot.complete(f());
        } else {
            let done = Completer::new(slot.clone());
            self.spawn(move || done.complete(f()));
        }
        Task(slot)
    }

    /// Runs `f` on an I/O thread while the calling thread waits (inline on a storage thread).
    /// The caller must hold no engine lock: the work may need one.
    pub(crate) fn call<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        debug_assert_eq!(
            engine_locks_held(),
            0,
            "waiting for the I/O threads while holding an engine lock"
        );
        if on_storage_thread() {
            return f();
        }
        self.run(f).wait()
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.shared.queue.lock().stop = true;
        self.shared.work.notify_all();
        let me = std::thread::current().id();
        for t in self.threads.drain(..) {
            // The last handle on the broker may go away in a job on one of these threads.
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

fn run(shared: &Shared) {
    mark_storage_thread();
    loop {
        let job = {
            let mut q = shared.queue.lock();
            loop {
                if let Some(job) = q.jobs.pop_front() {
                    break job;
                }
                if q.stop {
                    return;
                }
                shared.work.wait(&mut q);
            }
        };
        // A panicking job must not take the thread (and every later job) with it; its waiter
        // sees the result slot dropped without a value.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}

/// Where an I/O job leaves its result.
///
/// No lost wake-up for a consumer polling [`try_take`](Slot::try_take): the job stores the
/// result, then sets `done` (SeqCst) and only then wakes the consumer's signal; a consumer
/// registers with the signal and then checks `done` again (see [`crate::signal`]).
pub(crate) struct Slot<T> {
    done: AtomicBool,
    state: Mutex<SlotState<T>>,
    ready: Condvar,
}

struct SlotState<T> {
    value: Option<T>,
    waker: Option<Waker>,
    /// The job ended without a value (it panicked).
    abandoned: bool,
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Slot {
            done: AtomicBool::new(false),
            state: Mutex::new(SlotState {
                value: None,
                waker: None,
                abandoned: false,
            }),
            ready: Condvar::new(),
        }
    }
}

impl<T> Slot<T> {
    /// Stores the result and wakes whoever waits for it.
    pub(crate) fn complete(&self, value: T) {
        self.finish(Some(value));
    }

    fn finish(&self, value: Option<T>) {
        let waker = {
            let mut st = self.state.lock();
            st.abandoned = value.is_none();
            st.value = value;
            st.waker.take()
        };
        // SeqCst, like the consumer's re-check after registering with its signal (see
        // `crate::signal`): one of the two sees the other.
        self.done.store(true, Ordering::SeqCst);
        self.ready.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Whether the job has finished.
    pub(crate) fn is_done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    /// The result, if the job has finished (taken once).
    pub(crate) fn try_take(&self) -> Option<T> {
        if !self.is_done() {
            return None;
        }
        self.state.lock().value.take()
    }
}

/// Completes a slot as abandoned if its job is dropped without running it to the end (a
/// panic), so that a waiter does not wait forever.
pub(crate) struct Completer<T>(Option<Arc<Slot<T>>>);

impl<T> Completer<T> {
    pub(crate) fn new(slot: Arc<Slot<T>>) -> Self {
        Completer(Some(slot))
    }

    pub(crate) fn complete(mut self, value: T) {
        if let Some(s) = self.0.take() {
            s.complete(value);
        }
    }
}

impl<T> Drop for Completer<T> {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.finish(None);
        }
    }
}

/// The result of work handed to the I/O threads ([`IoPool::run`]): await it, or
/// [`wait`](Task::wait) for it.
#[must_use = "the work runs anyway; its result is only seen when awaited"]
pub(crate) struct Task<T>(Arc<Slot<T>>);

impl<T> Task<T> {
    /// Blocks the calling thread until the result is there.
    ///
    /// # Panics
    /// If the work panicked (the panic is carried over to the waiter).
    pub(crate) fn wait(self) -> T {
        let mut st = self.0.state.lock();
        loop {
            if let Some(v) = st.value.take() {
                return v;
            }
            if st.abandoned {
                panic!("storage work on an I/O thread panicked");
            }
            self.0.ready.wait(&mut st);
        }
    }
}

impl<T> Future for Task<T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut st = self.0.state.lock();
        if let Some(v) = st.value.take() {
            return Poll::Ready(v);
        }
        if st.abandoned {
            panic!("storage work on an I/O thread panicked");
        }
        match &st.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => st.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

/// Runs `future` to completion on the calling thread, parking it while the future waits: for
/// the synchronous API waiting for the commit thread (whose work needs no runtime). Unlike
/// `futures::executor::block_on`, it may be called from inside another executor's `block_on`.
pub(crate) fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(v) = future.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

/// A lock of the engine: a parking_lot lock whose guards count, in debug builds, how many
/// engine locks the current thread holds (see [`engine_locks_held`]).
#[derive(Default)]
pub(crate) struct EngineLock<L>(L);

impl<L: std::fmt::Debug> std::fmt::Debug for EngineLock<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A guard of an [`EngineLock`].
pub(crate) struct Held<G>(G);

impl<G> Held<G> {
    fn new(guard: G) -> Self {
        #[cfg(debug_assertions)]
        ENGINE_LOCKS.with(|n| n.set(n.get() + 1));
        Held(guard)
    }
}

impl<G> Drop for Held<G> {
    fn drop(&mut self) {
        #[cfg(debug_assertions)]
        ENGINE_LOCKS.with(|n| n.set(n.get().saturating_sub(1)));
    }
}

impl<G: Deref> Deref for Held<G> {
    type Target = G::Target;
    fn deref(&self) -> &G::Target {
        &self.0
    }
}

impl<G: DerefMut> DerefMut for Held<G> {
    fn deref_mut(&mut self) -> &mut G::Target {
        &mut self.0
    }
}

/// A mutex of the engine.
pub(crate) type EngineMutex<T> = EngineLock<parking_lot::Mutex<T>>;
/// A held [`EngineMutex`].
pub(crate) type EngineMutexGuard<'a, T> = Held<parking_lot::MutexGuard<'a, T>>;
/// A reader-writer lock of the engine.
pub(crate) type EngineRwLock<T> = EngineLock<parking_lot::RwLock<T>>;

impl<T> EngineLock<parking_lot::Mutex<T>> {
    pub(crate) fn new(value: T) -> Self {
        EngineLock(parking_lot::Mutex::new(value))
    }

    pub(crate) fn lock(&self) -> EngineMutexGuard<'_, T> {
        Held::new(self.0.lock())
    }
}

impl<T> EngineLock<parking_lot::RwLock<T>> {
    pub(crate) fn new(value: T) -> Self {
        EngineLock(parking_lot::RwLock::new(value))
    }

    pub(crate) fn read(&self) -> Held<parking_lot::RwLockReadGuard<'_, T>> {
        Held::new(self.0.read())
    }

    pub(crate) fn write(&self) -> Held<parking_lot::RwLockWriteGuard<'_, T>> {
        Held::new(self.0.write())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn work_runs_on_a_marked_thread_and_returns_its_result() {
        let pool = IoPool::start(2).unwrap();
        assert!(!on_storage_thread());
        let (name, marked) = pool.call(|| {
            (
                std::thread::current().name().map(str::to_owned),
                on_storage_thread(),
            )
        });
        assert!(name.unwrap().starts_with("ferry-io-"));
        assert!(marked);
        let t = pool.run(|| 7);
        assert_eq!(block_on(t), 7);
    }

    #[test]
    fn a_panicking_job_does_not_stop_the_pool() {
        let pool = IoPool::start(1).unwrap();
        let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.call(|| -> u32 { panic!("boom") })
        }));
        assert!(waited.is_err());
        assert_eq!(pool.call(|| 3), 3);
    }

    #[test]
    #[cfg(debug_assertions)]
    fn engine_locks_are_counted() {
        let m: EngineMutex<u32> = EngineMutex::new(1);
        let rw: EngineRwLock<u32> = EngineRwLock::new(2);
        assert_eq!(engine_locks_held(), 0);
        {
            let _a = m.lock();
            let _b = rw.read();
            assert_eq!(engine_locks_held(), 2);
        }
        let _c = rw.write();
        assert_eq!(engine_locks_held(), 1);
    }
}
