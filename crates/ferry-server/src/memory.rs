//! Returning the memory that the global allocator (mimalloc, see `GLOBAL` in `main.rs`) holds
//! free to the system.
//!
//! mimalloc keeps freed pages in the heap of the thread that used them and gives them back to
//! the system only when that heap allocates or collects again. A burst of connections leaves
//! such pages behind on worker threads that then sit idle, and they count in the broker's RSS
//! as if each connection held them. In `ferry-bench mqtt --scenarios idle` (10,000 idle
//! connections), a collection once a second takes Ferry from about 1,470 to about 930-1,000
//! bytes per connection (Mosquitto: about 734).

use std::time::Duration;

/// How often [`collect_periodically`] collects.
pub const INTERVAL: Duration = Duration::from_secs(1);

#[allow(unsafe_code)]
extern "C" {
    /// mimalloc's `void mi_collect(bool force)`, linked in through the `mimalloc` crate.
    fn mi_collect(force: bool);
}

/// A normal (not forced) mimalloc collection: frees the calling thread's unused pages and
/// returns to the system the memory whose purge delay has passed, process-wide.
pub fn collect() {
    #[allow(unsafe_code)]
    // SAFETY: `mi_collect` takes nothing but a bool and returns nothing, touches no memory of
    // ours, and is thread-safe (mimalloc's documentation: it may be called from any thread, at
    // any time; it works on the calling thread's heap and the shared arenas under mimalloc's own
    // synchronisation). The symbol is mimalloc's own, present because this binary links mimalloc
    // as its global allocator.
    unsafe {
        mi_collect(false)
    };
}

/// Calls [`collect`] every [`INTERVAL`], forever (the task is dropped with the runtime).
pub async fn collect_periodically() {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collect_can_be_called_from_any_thread() {
        let data: Vec<Vec<u8>> = (0..1000).map(|i| vec![0u8; 64 + i]).collect();
        drop(data);
        collect();
        std::thread::spawn(collect)
            .join()
            .expect("collect on another thread");
        // The allocator still works after a collection.
        let v = vec![1u8; 4096];
        assert_eq!(v.iter().map(|&b| usize::from(b)).sum::<usize>(), 4096);
    }

    #[tokio::test]
    async fn collects_periodically() {
        let task = tokio::spawn(collect_periodically());
        // The first tick is at once, the second after INTERVAL.
        tokio::time::sleep(INTERVAL + Duration::from_millis(100)).await;
        assert!(!task.is_finished());
        task.abort();
    }
}
