//! Milliseconds since the Unix epoch, as the JSON files and APIs carry times.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `t` in milliseconds since the epoch (0 before it, `u64::MAX` beyond what fits).
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

/// The time `ms` milliseconds after the epoch.
pub(crate) fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}
