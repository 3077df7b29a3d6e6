//! Helpers shared by the integration tests.
#![allow(clippy::unwrap_used, dead_code)]

/// A current-thread runtime on paused (virtual) time, for property tests that drive the broker
/// step by step and move the clock themselves.
pub fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}
