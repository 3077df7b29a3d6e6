//! The loaded topics of a broker: a hash map by name for publishes, and the same names in order
//! for the topics a filter or a name prefix can match.
//!
//! A wildcard subscription, or a page of topic stats, looks at the names in the filter's
//! [`Scope`] (one name and one range of the order) instead of every loaded topic, so
//! subscribing `device/42/+` among a million topics costs the topics under `device/42/`.
//!
//! Invariant: `order` holds exactly the keys of `by_name` (both change only through
//! [`Loaded::insert`] and [`Loaded::remove`]).

use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;

use crate::filter::{Scope, TopicFilter};
use crate::topic::TopicName;

/// Loaded topics, by name and in name order.
#[derive(Debug)]
pub(crate) struct Loaded<V> {
    by_name: HashMap<TopicName, V>,
    order: BTreeSet<TopicName>,
}

impl<V> Default for Loaded<V> {
    fn default() -> Self {
        Loaded {
            by_name: HashMap::new(),
            order: BTreeSet::new(),
        }
    }
}

impl<V> Loaded<V> {
    /// The topic named `name`.
    pub(crate) fn get(&self, name: &(impl AsRef<str> + ?Sized)) -> Option<&V> {
        self.by_name.get(name.as_ref())
    }

    /// Whether a topic named `name` is loaded.
    pub(crate) fn contains_key(&self, name: &(impl AsRef<str> + ?Sized)) -> bool {
        self.by_name.contains_key(name.as_ref())
    }

    /// Adds (or replaces) topic `name`.
    pub(crate) fn insert(&mut self, name: TopicName, value: V) -> Option<V> {
        self.order.insert(name.clone());
        self.by_name.insert(name, value)
    }

    /// Removes topic `name`.
    pub(crate) fn remove(&mut self, name: &(impl AsRef<str> + ?Sized)) -> Option<V> {
        self.order.remove(name.as_ref());
        self.by_name.remove(name.as_ref())
    }

    /// Every loaded topic, in no order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&TopicName, &V)> {
        self.by_name.iter()
    }

    /// Every loaded topic's name, in no order.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &TopicName> {
        self.by_name.keys()
    }

    /// Every loaded topic, in no order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.by_name.values()
    }

    /// The names that start with `prefix`, in order.
    pub(crate) fn names_under<'a>(
        &'a self,
        prefix: &str,
    ) -> impl Iterator<Item = &'a TopicName> + 'a {
        let range = (Bound::Included(prefix), Bound::Unbounded);
        let prefix = prefix.to_string();
        self.order
            .range::<str, _>(range)
            .take_while(move |n| n.as_str().starts_with(&prefix))
    }

    /// At most `max` names in order from `from` (after it when `exclusive`).
    pub(crate) fn names_from(&self, from: &str, exclusive: bool, max: usize) -> Vec<TopicName> {
        let start = if exclusive {
            Bound::Excluded(from)
        } else {
            Bound::Included(from)
        };
        self.order
            .range::<str, _>((start, Bound::Unbounded))
            .take(max)
            .cloned()
            .collect()
    }

    /// The topics `filter` matches: only those in its [`Scope`] are tested.
    pub(crate) fn matching<'a>(
        &'a self,
        filter: &'a TopicFilter,
    ) -> impl Iterator<Item = (&'a TopicName, &'a V)> + 'a {
        let Scope { name, under } = filter.scope();
        let named = name.and_then(|n| self.by_name.get_key_value(n.as_str()));
        let ranged = under
            .into_iter()
            .flat_map(move |prefix| self.names_under(&prefix))
            .filter_map(move |n| self.by_name.get_key_value(n.as_str()));
        named
            .into_iter()
            .chain(ranged)
            .filter(move |(n, _)| filter.matches(n.as_str()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name(n: &str) -> TopicName {
        TopicName::new(n).unwrap()
    }

    fn matched(loaded: &Loaded<u32>, filter: &str) -> Vec<String> {
        let filter = TopicFilter::parse(filter).unwrap();
        let mut v: Vec<String> = loaded
            .matching(&filter)
            .map(|(n, _)| n.to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn matching_looks_in_the_scope() {
        let mut loaded = Loaded::default();
        for (i, n) in ["a", "a/b", "a/c/d", "ab", "b/a", "$x/a"]
            .iter()
            .enumerate()
        {
            loaded.insert(name(n), i as u32);
        }
        assert_eq!(matched(&loaded, "a/#"), ["a", "a/b", "a/c/d"]);
        assert_eq!(matched(&loaded, "a/+"), ["a/b"]);
        assert_eq!(matched(&loaded, "+/a"), ["b/a"]);
        assert_eq!(matched(&loaded, "#"), ["a", "a/b", "a/c/d", "ab", "b/a"]);
        assert_eq!(matched(&loaded, "$x/#"), ["$x/a"]);
        assert_eq!(loaded.remove("a/b"), Some(1));
        assert_eq!(matched(&loaded, "a/#"), ["a", "a/c/d"]);
        let under: Vec<&str> = loaded.names_under("a").map(|n| n.as_str()).collect();
        assert_eq!(under, ["a", "a/c/d", "ab"]);
        let from: Vec<String> = loaded
            .names_from("a", true, 2)
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(from, ["a/c/d", "ab"]);
    }

    proptest! {
        #[test]
        fn matching_finds_what_a_full_scan_finds(
            names in prop::collection::vec(
                prop::collection::vec(prop::sample::select(&["a", "b", "", "$s", "ab"][..]), 1..4),
                0..30,
            ),
            filter in prop::collection::vec(prop::sample::select(&["a", "b", "", "+", "$s"][..]), 1..4),
            hash in any::<bool>(),
        ) {
            let mut loaded = Loaded::default();
            for n in &names {
                if let Ok(n) = TopicName::new(n.join("/")) {
                    loaded.insert(n, 0u32);
                }
            }
            let mut filter = filter.join("/");
            if hash {
                filter.push_str("/#");
            }
            let Ok(filter) = TopicFilter::mqtt(&filter) else { return Ok(()) };
            let mut got: Vec<&str> = loaded.matching(&filter).map(|(n, _)| n.as_str()).collect();
            let mut want: Vec<&str> = loaded
                .keys()
                .filter(|n| filter.matches(n.as_str()))
                .map(TopicName::as_str)
                .collect();
            got.sort_unstable();
            want.sort_unstable();
            prop_assert_eq!(got, want);
        }
    }
}
