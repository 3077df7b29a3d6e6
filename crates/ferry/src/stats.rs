//! Counters and the stats snapshots built from them.
//!
//! Counters live where the work happens (one set per topic, one per subscription) so that no
//! single atomic is shared by every thread; broker-wide figures are sums taken on demand.
//!
//! Accounting invariant, per subscription: every record it was obliged to process (from its start
//! position to the topic's tail) is, at any time, exactly one of: acknowledged (`acked`, which
//! includes auto-acknowledged deliveries), `dead_lettered`, `dropped`, `expired`, in flight, or still unread
//! (`lag`). [`SubscriptionStats::unaccounted`] computes the difference, which must be zero.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Aligns its content to its own cache lines, so that counters written by consumers do not
/// share a line with the log lock and tail that publishers write.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

macro_rules! counters {
    ($($name:ident => $add:ident),* $(,)?) => {
        /// A set of monotonically increasing counters.
        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $(pub(crate) $name: AtomicU64,)*
        }

        impl Counters {
            $(
                #[allow(dead_code)]
                pub(crate) fn $add(&self, n: u64) {
                    if n > 0 {
                        self.$name.fetch_add(n, Ordering::Relaxed);
                    }
                }
            )*

            pub(crate) fn snapshot(&self) -> CounterSnapshot {
                CounterSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }

        /// A snapshot of counters.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
        pub struct CounterSnapshot {
            $(
                #[allow(missing_docs)]
                pub $name: u64,
            )*
        }

        impl std::ops::AddAssign for CounterSnapshot {
            fn add_assign(&mut self, o: Self) {
                $(self.$name += o.$name;)*
            }
        }
    };
}

counters! {
    published => add_published,
    delivered => add_delivered,
    acked => add_acked,
    nacked => add_nacked,
    redelivered => add_redelivered,
    dead_lettered => add_dead_lettered,
    dropped => add_dropped,
    expired => add_expired,
    filtered => add_filtered,
    errors => add_errors,
}

/// Lag across subscriptions: how many records they still have to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LagStats {
    /// Subscriptions and groups counted.
    pub consumers: usize,
    /// The largest lag.
    pub max_lag: u64,
    /// The mean lag.
    pub avg_lag: f64,
}

impl LagStats {
    pub(crate) fn from_lags(lags: impl Iterator<Item = u64>) -> Self {
        let (mut n, mut max, mut sum) = (0usize, 0u64, 0u128);
        for l in lags {
            n += 1;
            max = max.max(l);
            sum += l as u128;
        }
        LagStats {
            consumers: n,
            max_lag: max,
            avg_lag: if n == 0 { 0.0 } else { sum as f64 / n as f64 },
        }
    }
}

/// Stats of one topic.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopicStats {
    /// The topic.
    pub topic: String,
    /// Counters: `published` counts records appended; the others are sums over the topic's
    /// subscriptions (a record read by five subscriptions is delivered five times). `dropped`
    /// includes records published while no subscription existed.
    #[serde(flatten)]
    pub counters: CounterSnapshot,
    /// Records currently stored.
    pub depth: usize,
    /// Bytes currently stored.
    pub bytes: usize,
    /// First retained offset.
    pub first_offset: u64,
    /// Next offset to be assigned.
    pub next_offset: u64,
    /// Attached subscriptions and groups.
    pub subscribers: usize,
    /// Lag of the attached subscriptions and groups.
    pub lag: LagStats,
    /// Records in the topic's dead-letter queue now (what a purge or redrive empties; the
    /// by-reason counts below are cumulative).
    pub dead_letters: usize,
    /// Dead letters by reason (for this topic's dead-letter queue).
    pub dead_letters_by_reason: BTreeMap<String, u64>,
}

/// One page of topic stats, in name order (see [`Broker::topic_page`](crate::Broker::topic_page)).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopicPage {
    /// The topics of the page.
    pub topics: Vec<TopicStats>,
    /// Where the next page starts (pass it as `after`); `None` when no topic follows.
    pub next: Option<String>,
}

/// Stats of one subscription or consumer group.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubscriptionStats {
    /// Its id.
    pub id: u64,
    /// Its name (the group name for a group).
    pub name: String,
    /// Its filter.
    pub filter: String,
    /// Whether it is a consumer group.
    pub group: bool,
    /// Connected members (1 for a fanout subscription).
    pub members: usize,
    /// Counters.
    #[serde(flatten)]
    pub counters: CounterSnapshot,
    /// Deliveries awaiting acknowledgement (including those waiting to be redelivered).
    pub in_flight: u64,
    /// Records still to be read.
    pub lag: u64,
    /// Records it was obliged to process: from its start to the tail of each topic it reads.
    pub assigned: u64,
    /// Time since it last read anything.
    #[serde(serialize_with = "ser_secs")]
    pub idle: Duration,
}

impl SubscriptionStats {
    /// `assigned - (acked + dead_lettered + dropped + expired + filtered + in_flight + lag)`; zero when
    /// nothing has silently disappeared. (A record that expires and is dead-lettered counts
    /// once, as dead-lettered.)
    pub fn unaccounted(&self) -> i128 {
        let c = &self.counters;
        self.assigned as i128
            - (c.acked
                + c.dead_lettered
                + c.dropped
                + c.expired
                + c.filtered
                + self.in_flight
                + self.lag) as i128
    }
}

/// Broker-wide stats.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BrokerStats {
    /// Time since the broker started.
    #[serde(serialize_with = "ser_secs")]
    pub uptime: Duration,
    /// Sums over user topics (dead-letter topics excluded, so nothing counts twice).
    #[serde(flatten)]
    pub counters: CounterSnapshot,
    /// User topics.
    pub topics: usize,
    /// Topics (dead-letter topics included) loaded in memory: in use, or used recently (see
    /// [`BrokerConfig::unload_idle_topics_after`](crate::BrokerConfig::unload_idle_topics_after)).
    pub loaded_topics: usize,
    /// Subscriptions and groups.
    pub subscriptions: usize,
    /// Records stored in user topics.
    pub depth: usize,
    /// Bytes stored in user topics.
    pub bytes: usize,
    /// Records stored in dead-letter topics.
    pub dead_letters: usize,
    /// Lag over every subscription and group.
    pub lag: LagStats,
    /// Dead letters by reason, over every topic.
    pub dead_letters_by_reason: BTreeMap<String, u64>,
}

/// Health: whether the broker accepts work, and for how long it has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    /// "running", "degraded" (running, but the last write or sync to storage failed: see
    /// `reason`; back to "running" once one succeeds; the server's `/health` also says it
    /// while a save of its own state fails), "draining" or "closed".
    pub status: &'static str,
    /// Why the broker is degraded (the storage failure, e.g. "storage write failed: ... No
    /// space left on device"); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Time since the broker started.
    #[serde(serialize_with = "ser_secs")]
    pub uptime: Duration,
    /// User topics.
    pub topics: usize,
    /// Subscriptions and groups.
    pub subscriptions: usize,
}

/// Formats a count with thousands separators (`1234567` -> `1,234,567`), for human-readable
/// stats output.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

pub(crate) fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(5_123_456), "5,123,456");
        assert_eq!(thousands(u64::MAX), "18,446,744,073,709,551,615");
    }

    #[test]
    fn lag_stats() {
        let l = LagStats::from_lags([3u64, 0, 9].into_iter());
        assert_eq!((l.consumers, l.max_lag), (3, 9));
        assert!((l.avg_lag - 4.0).abs() < 1e-12);
        assert_eq!(LagStats::from_lags(std::iter::empty()).avg_lag, 0.0);
    }
}
