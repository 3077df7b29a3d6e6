//! Synchronisation primitives used by the hand-off structures, swapped for `loom`'s under
//! `cfg(ferry_loom)` so that `loom` can explore every interleaving of the code that uses them.

#[cfg(ferry_loom)]
pub(crate) use loom::sync::{
    atomic::{fence, AtomicU64, AtomicUsize, Ordering},
    Arc, Mutex, MutexGuard,
};

#[cfg(not(ferry_loom))]
pub(crate) use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Mutex, MutexGuard,
};

/// Locks `m`, recovering the data if a panicking thread poisoned it: every critical section in
/// this crate leaves its data consistent before anything that can panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
