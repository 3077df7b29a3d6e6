//! What each backend does natively, emulates in the adapter, or cannot do.

use std::fmt;

/// How a backend provides a feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Support {
    /// The broker does it itself.
    Native,
    /// The adapter builds it from other primitives (see the adapter's docs for the limits).
    Emulated,
    /// Not available: asking for it fails with [`BackendError::Unsupported`](crate::BackendError).
    Unsupported,
}

impl Support {
    /// Native or emulated.
    pub fn is_supported(self) -> bool {
        !matches!(self, Support::Unsupported)
    }
}

impl fmt::Display for Support {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Support::Native => "native",
            Support::Emulated => "emulated",
            Support::Unsupported => "unsupported",
        })
    }
}

/// One backend's capability table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Capabilities {
    /// Several independent subscriptions each receive every message.
    pub fanout: Support,
    /// Consumer groups: each message goes to one member.
    pub groups: Support,
    /// Messages of one key (one topic) are delivered in publish order to a single subscriber.
    pub ordering: Support,
    /// Unsettled deliveries come back after an ack timeout (also when the consumer is alive).
    pub ack_timeout: Support,
    /// A nack redelivers after a given delay.
    pub nack_delay: Support,
    /// Messages that failed `max_attempts` times (or were rejected) go to a dead-letter queue.
    pub dead_letter: Support,
    /// Wildcard filters (`a.*`, `a.#`).
    pub wildcards: Support,
    /// Subscriptions can start from the earliest retained message.
    pub replay: Support,
    /// A consumer group's position and unsettled messages survive its members going away.
    pub durable_groups: Support,
    /// `publish_batch` is all-or-nothing.
    pub atomic_batch: Support,
    /// [`Queue::serve`](crate::Queue::serve) retries failing handlers with growing delays
    /// (native where the backend's nack delay is).
    pub retries: Support,
    /// Dead letters can be listed, redriven to their source topic and purged.
    pub redrive: Support,
    /// Messages with a time to live are never handed over after it (header `ferry-expires-at`).
    pub ttl: Support,
    /// Messages published with a delay are not handed over before it (header
    /// `ferry-deliver-at`).
    pub delayed_delivery: Support,
    /// Priority lanes: higher priorities are handed over first (header `ferry-priority`).
    pub priority: Support,
    /// A message id published twice within a window is delivered once. Native (the backend
    /// drops the second copy, whoever publishes it) is what makes resending a publish that
    /// failed [in doubt](crate::BackendError::InDoubt) safe: [`Queue::publish`](crate::Queue::publish)
    /// does so only then.
    pub dedup: Support,
    /// Handlers are `tower::Service`s, so tower's layers apply (always in-process).
    pub middleware: Support,
    /// Counters per queue, topic and subscription (always in-process).
    pub stats: Support,
}

impl Capabilities {
    /// The rows of the table, for docs and reports.
    pub fn rows(&self) -> [(&'static str, Support); 18] {
        [
            ("fanout", self.fanout),
            ("groups", self.groups),
            ("ordering", self.ordering),
            ("ack_timeout", self.ack_timeout),
            ("nack_delay", self.nack_delay),
            ("dead_letter", self.dead_letter),
            ("wildcards", self.wildcards),
            ("replay", self.replay),
            ("durable_groups", self.durable_groups),
            ("atomic_batch", self.atomic_batch),
            ("retries", self.retries),
            ("redrive", self.redrive),
            ("ttl", self.ttl),
            ("delayed_delivery", self.delayed_delivery),
            ("priority", self.priority),
            ("dedup", self.dedup),
            ("middleware", self.middleware),
            ("stats", self.stats),
        ]
    }
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, s)) in self.rows().iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{name}: {s}")?;
        }
        Ok(())
    }
}
