//! Lifecycle events, broadcast to every [`Broker::events`](crate::Broker::events) receiver.
//! A receiver that falls behind by more than `event_capacity` events loses the oldest ones
//! (`RecvError::Lagged`), never blocking the broker. A receiver made while the broker runs
//! starts with [`BrokerEvent::Started`], so that no receiver misses the start however early or
//! late it subscribes.

use std::time::Duration;

use serde::Serialize;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

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

/// A receiver of lifecycle events; made by [`Broker::events`](crate::Broker::events).
#[derive(Debug)]
pub struct EventReceiver {
    pub(crate) rx: broadcast::Receiver<BrokerEvent>,
    /// Yield `Started` first (the broker was running when the receiver was made).
    pub(crate) started: bool,
}

impl EventReceiver {
    /// The next event, waiting for one.
    pub async fn recv(&mut self) -> Result<BrokerEvent, RecvError> {
        if std::mem::take(&mut self.started) {
            return Ok(BrokerEvent::Started);
        }
        self.rx.recv().await
    }

    /// The next event if there is one now.
    pub fn try_recv(&mut self) -> Result<BrokerEvent, TryRecvError> {
        if std::mem::take(&mut self.started) {
            return Ok(BrokerEvent::Started);
        }
        self.rx.try_recv()
    }
}
