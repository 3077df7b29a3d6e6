//! Lifecycle events, broadcast to every [`Broker::events`](crate::Broker::events) receiver.
//! A receiver that falls behind by more than `event_capacity` events loses the oldest ones
//! (`RecvError::Lagged`), never blocking the broker.

use std::time::Duration;

use serde::Serialize;

use crate::broker::ShutdownReport;

/// Something that happened to the broker.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum BrokerEvent {
    /// The broker started.
    Started,
    /// A subscription has a backlog but has read nothing for `idle`.
    SubscriberStale {
        /// Subscription (or group) id.
        id: u64,
        /// Its name.
        name: String,
        /// Records it has not read.
        lag: u64,
        /// Time since it last read.
        #[serde(serialize_with = "crate::stats::ser_secs")]
        idle: Duration,
    },
    /// A subscription was evicted (stale-consumer clean-up or removal).
    SubscriberEvicted {
        /// Subscription (or group) id.
        id: u64,
        /// Its name.
        name: String,
    },
    /// Retained records exceed the configured high watermark.
    MemoryPressure {
        /// Bytes retained.
        bytes: usize,
        /// The watermark.
        limit: usize,
    },
    /// Retained records fell back under 80% of the high watermark.
    MemoryNormal {
        /// Bytes retained.
        bytes: usize,
        /// The watermark.
        limit: usize,
    },
    /// Shutdown began: publishing stopped, queued records are being delivered.
    ShutdownStarted,
    /// Shutdown finished.
    Shutdown(ShutdownReport),
}
