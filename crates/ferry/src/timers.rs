//! The consumer's timer queue: ack deadlines, nack delays and delivery times, in one structure
//! per consumer (no task or timer per message).
//!
//! Timers are kept in millisecond buckets (a `BTreeMap` from bucket to the timers in it) rather
//! than a binary heap: with a million pending timers a heap costs a few cache misses per level on
//! every push and pop, while a bucket costs one map lookup and a vector push, and falling due
//! takes a whole bucket at once. A bucket's time is the end of its millisecond, so a timer never
//! fires early and at most a millisecond late.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

const GRAIN: Duration = Duration::from_millis(1);

/// Timers (a due time and a tag), taken in due order bucket by bucket.
#[derive(Debug, Default)]
pub(crate) struct TimerQueue {
    /// The time bucket keys count from: when the first timer was added. Every timer is due at
    /// or after the time it is added (a deadline, a delay or a delivery time from now on), so
    /// none is due before `base`; one that is (already past) lands in the first bucket.
    base: Option<Instant>,
    buckets: BTreeMap<u64, Vec<(Instant, u64)>>,
    len: usize,
}

impl TimerQueue {
    /// Adds a timer.
    pub(crate) fn push(&mut self, due: Instant, tag: u64) {
        let base = *self.base.get_or_insert_with(Instant::now);
        let nanos = due.saturating_duration_since(base).as_nanos();
        let grain = GRAIN.as_nanos();
        let key = u64::try_from(nanos.div_ceil(grain)).unwrap_or(u64::MAX);
        self.buckets.entry(key).or_default().push((due, tag));
        self.len += 1;
    }

    /// When the earliest bucket falls due (never before any timer in it).
    pub(crate) fn next_due(&self) -> Option<Instant> {
        let (&key, _) = self.buckets.first_key_value()?;
        Some(self.bucket_time(key))
    }

    /// Takes the earliest bucket if it is due at `now`: its timers in due order (ties in the
    /// order they were added).
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<Vec<(Instant, u64)>> {
        let (&key, _) = self.buckets.first_key_value()?;
        if self.bucket_time(key) > now {
            return None;
        }
        let (_, mut timers) = self.buckets.pop_first()?;
        self.len -= timers.len();
        // Stable: timers due at the same instant keep their order (tags rise with it).
        timers.sort_by_key(|(due, _)| *due);
        Some(timers)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Timers held, including stale ones not yet dropped.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Keeps only the timers for which `keep(due, tag)` holds (and drops emptied buckets).
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(Instant, u64) -> bool) {
        self.buckets.retain(|_, timers| {
            timers.retain(|&(due, tag)| keep(due, tag));
            !timers.is_empty()
        });
        self.len = self.buckets.values().map(Vec::len).sum();
    }

    pub(crate) fn clear(&mut self) {
        self.buckets.clear();
        self.len = 0;
    }

    fn bucket_time(&self, key: u64) -> Instant {
        let base = self.base.unwrap_or_else(Instant::now);
        let offset = GRAIN
            .checked_mul(u32::try_from(key).unwrap_or(u32::MAX))
            .unwrap_or(Duration::MAX);
        base.checked_add(offset).unwrap_or(base)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Timers come out in due order (by bucket), none before its time, none more than one
        /// grain late, and none lost.
        #[test]
        fn never_early_at_most_a_grain_late(offsets in proptest::collection::vec(0u64..5_000_000, 1..300)) {
            let start = Instant::now();
            let mut q = TimerQueue { base: Some(start), ..TimerQueue::default() };
            for (tag, us) in offsets.iter().enumerate() {
                q.push(start + Duration::from_micros(*us), tag as u64);
            }
            prop_assert_eq!(q.len, offsets.len());
            let mut seen = 0;
            let mut last_bucket = start;
            let mut last_due = start;
            while let Some(at) = q.next_due() {
                prop_assert!(at >= last_bucket);
                last_bucket = at;
                prop_assert!(q.pop_due(at - Duration::from_nanos(1)).is_none());
                for (due, tag) in q.pop_due(at).unwrap() {
                    prop_assert!(due >= last_due, "out of due order");
                    last_due = due;
                    prop_assert!(due <= at, "fired before its time");
                    prop_assert!(at - due <= GRAIN, "more than a grain late");
                    prop_assert_eq!(start + Duration::from_micros(offsets[tag as usize]), due);
                    seen += 1;
                }
            }
            prop_assert_eq!(seen, offsets.len());
            prop_assert!(q.is_empty());
        }

        /// `retain` drops exactly the timers it is told to, and the rest still come out in due
        /// order at their time.
        #[test]
        fn retain_keeps_exactly_the_chosen_timers(
            offsets in proptest::collection::vec((0u64..5_000_000, any::<bool>()), 1..300)
        ) {
            let start = Instant::now();
            let mut q = TimerQueue { base: Some(start), ..TimerQueue::default() };
            for (tag, (us, _)) in offsets.iter().enumerate() {
                q.push(start + Duration::from_micros(*us), tag as u64);
            }
            q.retain(|_, tag| offsets[tag as usize].1);
            let kept = offsets.iter().filter(|(_, k)| *k).count();
            prop_assert_eq!(q.len(), kept);
            let mut seen = 0;
            let mut last_due = start;
            while let Some(at) = q.next_due() {
                for (due, tag) in q.pop_due(at).unwrap() {
                    prop_assert!(offsets[tag as usize].1, "a dropped timer fired");
                    prop_assert!(due >= last_due && due <= at);
                    last_due = due;
                    seen += 1;
                }
            }
            prop_assert_eq!(seen, kept);
            prop_assert!(q.is_empty());
        }
    }
}
