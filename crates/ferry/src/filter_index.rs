//! An index from subscription filters to values, to find every subscription that matches a
//! topic name without testing every filter.
//!
//! Each filter kind has its own structure:
//!
//! - exact filters: a hash map from the name to its subscriptions (one lookup);
//! - MQTT filters: a trie over `/`-separated levels, with a literal child per level plus a `+`
//!   and a `#` child;
//! - glob filters: a separate trie over `.`-separated levels, with `*` and `#` children;
//! - regex filters: a map from pattern to its subscriptions; each distinct pattern is tested one
//!   by one, so their cost grows with their number.
//!
//! Both tries are walked as an NFA, one topic level at a time, over a deduplicated set of nodes:
//! `#` is entered without consuming a level and can then absorb any number of levels, which
//! covers MQTT's trailing `#` (parent and descendants) and glob's `#` anywhere, several times
//! included, in O(nodes × levels). Wildcard children of the root are skipped for topics starting
//! with `$`, as [`TopicFilter::matches`] does.
//!
//! Invariants: an entry is keyed by (filter, id), so an id appears at most once under a given
//! filter; trie nodes and map keys with no entries and no children are removed as soon as they
//! become empty, so removals leak nothing; [`FilterIndex::len`] counts the entries.

use std::collections::{HashMap, HashSet};
use std::ptr;

use crate::filter::{Level, RegexFilter, TopicFilter};
use crate::topic::TopicName;

/// The subscriptions registered under one filter: at most one per id.
type Entries<V> = Vec<(u64, V)>;

/// Filters, each with the ids and values subscribed through it.
#[derive(Debug)]
pub(crate) struct FilterIndex<V> {
    exact: HashMap<TopicName, Entries<V>>,
    mqtt: Trie<V>,
    glob: Trie<V>,
    regex: HashMap<Box<str>, (RegexFilter, Entries<V>)>,
    len: usize,
}

impl<V> Default for FilterIndex<V> {
    fn default() -> Self {
        FilterIndex::new()
    }
}

impl<V> FilterIndex<V> {
    /// An empty index.
    pub(crate) fn new() -> Self {
        FilterIndex {
            exact: HashMap::new(),
            mqtt: Trie::new('/'),
            glob: Trie::new('.'),
            regex: HashMap::new(),
            len: 0,
        }
    }

    /// Registers `value` as subscription `id` under `filter`, replacing the value if `id` is
    /// already registered under an equal filter.
    pub(crate) fn insert(&mut self, filter: &TopicFilter, id: u64, value: V) {
        let entries = match filter {
            TopicFilter::Exact(name) => self.exact.entry(name.clone()).or_default(),
            TopicFilter::Mqtt(f) => self.mqtt.entries_mut(f.levels()),
            TopicFilter::Glob(f) => self.glob.entries_mut(f.levels()),
            TopicFilter::Regex(f) => {
                let slot = self.regex.entry(f.as_str().into());
                &mut slot.or_insert_with(|| (f.clone(), Vec::new())).1
            }
        };
        match entries.iter_mut().find(|(i, _)| *i == id) {
            Some(entry) => entry.1 = value,
            None => {
                entries.push((id, value));
                self.len += 1;
            }
        }
    }

    /// Unregisters subscription `id` under `filter`, returning its value.
    pub(crate) fn remove(&mut self, filter: &TopicFilter, id: u64) -> Option<V> {
        let value = match filter {
            TopicFilter::Exact(name) => {
                let entries = self.exact.get_mut(name.as_str())?;
                let value = take(entries, id)?;
                if entries.is_empty() {
                    self.exact.remove(name.as_str());
                }
                value
            }
            TopicFilter::Mqtt(f) => self.mqtt.remove(f.levels(), id)?,
            TopicFilter::Glob(f) => self.glob.remove(f.levels(), id)?,
            TopicFilter::Regex(f) => {
                let (_, entries) = self.regex.get_mut(f.as_str())?;
                let value = take(entries, id)?;
                if entries.is_empty() {
                    self.regex.remove(f.as_str());
                }
                value
            }
        };
        self.len -= 1;
        Some(value)
    }

    /// Calls `f` for every subscription whose filter matches the topic named `topic`, each id at
    /// most once per call (with the value of the first matching filter found), in no particular
    /// order.
    pub(crate) fn for_each_match(&self, topic: &str, mut f: impl FnMut(u64, &V)) {
        let mut hits: Vec<&[(u64, V)]> = Vec::new();
        if let Some(entries) = self.exact.get(topic) {
            hits.push(entries);
        }
        self.mqtt.collect(topic, &mut hits);
        self.glob.collect(topic, &mut hits);
        hits.extend(
            self.regex
                .values()
                .filter(|(re, _)| re.matches(topic))
                .map(|(_, entries)| entries.as_slice()),
        );
        // One list never repeats an id, so only several lists (the same id under several
        // matching filters) need deduplication.
        let dedupe = hits.len() > 1;
        let mut seen = HashSet::new();
        for (id, value) in hits.into_iter().flatten() {
            if !dedupe || seen.insert(*id) {
                f(*id, value);
            }
        }
    }

    /// The number of registered (filter, id) entries.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is registered.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Removes `id`'s entry from `entries`.
fn take<V>(entries: &mut Entries<V>, id: u64) -> Option<V> {
    let at = entries.iter().position(|(i, _)| *i == id)?;
    Some(entries.swap_remove(at).1)
}

/// A trie over the levels of MQTT or glob filters.
#[derive(Debug)]
struct Trie<V> {
    root: Node<V>,
    sep: char,
}

/// A trie node: the filters whose levels spell the path from the root end here.
#[derive(Debug)]
struct Node<V> {
    literal: HashMap<Box<str>, Node<V>>,
    one: Option<Box<Node<V>>>,
    many: Option<Box<Node<V>>>,
    /// Whether this is a `#` node, which may absorb a level and stay where it is.
    is_many: bool,
    entries: Entries<V>,
}

impl<V> Node<V> {
    fn new(is_many: bool) -> Self {
        Node {
            literal: HashMap::new(),
            one: None,
            many: None,
            is_many,
            entries: Vec::new(),
        }
    }

    /// The number of children.
    fn edges(&self) -> usize {
        self.literal.len() + usize::from(self.one.is_some()) + usize::from(self.many.is_some())
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.edges() == 0
    }

    fn child_mut(&mut self, level: &Level) -> Option<&mut Node<V>> {
        match level {
            Level::Literal(l) => self.literal.get_mut(&**l),
            Level::One => self.one.as_deref_mut(),
            Level::Many => self.many.as_deref_mut(),
        }
    }

    fn child_or_insert(&mut self, level: &Level) -> &mut Node<V> {
        match level {
            Level::Literal(l) => self
                .literal
                .entry(l.clone())
                .or_insert_with(|| Node::new(false)),
            Level::One => self.one.get_or_insert_with(|| Box::new(Node::new(false))),
            Level::Many => self.many.get_or_insert_with(|| Box::new(Node::new(true))),
        }
    }

    fn remove_child(&mut self, level: &Level) {
        match level {
            Level::Literal(l) => {
                self.literal.remove(&**l);
            }
            Level::One => self.one = None,
            Level::Many => self.many = None,
        }
    }
}

impl<V> Trie<V> {
    fn new(sep: char) -> Self {
        Trie {
            root: Node::new(false),
            sep,
        }
    }

    /// The entries of the filter spelled by `levels`, creating its path if needed.
    fn entries_mut(&mut self, levels: &[Level]) -> &mut Entries<V> {
        let mut node = &mut self.root;
        for level in levels {
            node = node.child_or_insert(level);
        }
        &mut node.entries
    }

    /// Removes `id` from the filter spelled by `levels`, then prunes the nodes left empty.
    fn remove(&mut self, levels: &[Level], id: u64) -> Option<V> {
        // `cut`: depth of the deepest node on the path that must stay (the root, or a node with
        // entries or other children); everything below it hangs on the single path edge.
        let mut cut = 0;
        let mut node = &mut self.root;
        for (depth, level) in levels.iter().enumerate() {
            if depth == 0 || !node.entries.is_empty() || node.edges() > 1 {
                cut = depth;
            }
            node = node.child_mut(level)?;
        }
        let value = take(&mut node.entries, id)?;
        if node.is_empty() {
            self.prune(levels, cut);
        }
        Some(value)
    }

    /// Removes the child `levels[cut]` of the node at depth `cut` on the path `levels`.
    fn prune(&mut self, levels: &[Level], cut: usize) {
        let mut node = &mut self.root;
        for level in levels.iter().take(cut) {
            match node.child_mut(level) {
                Some(child) => node = child,
                None => return,
            }
        }
        if let Some(level) = levels.get(cut) {
            node.remove_child(level);
        }
    }

    /// Appends the entries of every filter in the trie that matches `topic` to `out`, each
    /// node at most once.
    fn collect<'a>(&'a self, topic: &str, out: &mut Vec<&'a [(u64, V)]>) {
        if self.root.is_empty() {
            return;
        }
        let dollar = topic.starts_with('$');
        let mut current = vec![&self.root];
        if let (false, Some(many)) = (dollar, &self.root.many) {
            add(&mut current, many);
        }
        let mut next = Vec::new();
        for (i, level) in topic.split(self.sep).enumerate() {
            for &node in &current {
                if let Some(child) = node.literal.get(level) {
                    add(&mut next, child);
                }
                if let (Some(one), false) = (&node.one, dollar && i == 0) {
                    add(&mut next, one);
                }
                if node.is_many {
                    add(&mut next, node);
                }
            }
            std::mem::swap(&mut current, &mut next);
            next.clear();
            if current.is_empty() {
                return;
            }
        }
        out.extend(
            current
                .iter()
                .filter(|n| !n.entries.is_empty())
                .map(|n| n.entries.as_slice()),
        );
    }
}

/// Adds `node` and the chain of `#` nodes below it (reachable without consuming a level) to
/// `set`, skipping nodes already there.
fn add<'a, V>(set: &mut Vec<&'a Node<V>>, mut node: &'a Node<V>) {
    loop {
        if set.iter().any(|n| ptr::eq(*n, node)) {
            return;
        }
        set.push(node);
        match &node.many {
            Some(many) => node = many,
            None => return,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn matches<V: Clone>(idx: &FilterIndex<V>, topic: &str) -> Vec<(u64, V)> {
        let mut out = Vec::new();
        idx.for_each_match(topic, |id, v| out.push((id, v.clone())));
        out.sort_by_key(|(id, _)| *id);
        out
    }

    fn ids<V: Clone>(idx: &FilterIndex<V>, topic: &str) -> Vec<u64> {
        matches(idx, topic).into_iter().map(|(id, _)| id).collect()
    }

    fn assert_pruned<V>(idx: &FilterIndex<V>) {
        assert!(idx.is_empty() && idx.exact.is_empty() && idx.regex.is_empty());
        assert!(idx.mqtt.root.is_empty() && idx.glob.root.is_empty());
    }

    #[test]
    fn each_kind_is_found() {
        let mut idx = FilterIndex::new();
        let filters = ["a/b", "a/+", "#", "a.*", "#.b", "sport/#"];
        for (id, f) in filters.iter().enumerate() {
            idx.insert(&TopicFilter::parse(f).unwrap(), id as u64, *f);
        }
        idx.insert(&TopicFilter::regex("a/.*").unwrap(), 9, "re");
        assert_eq!(idx.len(), 7);
        assert_eq!(ids(&idx, "a/b"), [0, 1, 2, 9]);
        assert_eq!(ids(&idx, "a.b"), [2, 3, 4]);
        assert_eq!(ids(&idx, "sport"), [2, 5]);
        assert_eq!(ids(&idx, "sport/tennis/x"), [2, 5]);
        assert_eq!(ids(&idx, "$dlq/a.b"), Vec::<u64>::new());
        assert_eq!(matches(&idx, "a/x"), [(1, "a/+"), (2, "#"), (9, "re")]);
    }

    #[test]
    fn system_topics() {
        let mut idx = FilterIndex::new();
        let dlq = TopicFilter::exact_system(TopicName::system("$dlq/a".into()));
        idx.insert(&dlq, 1, ());
        idx.insert(&TopicFilter::mqtt("#").unwrap(), 2, ());
        idx.insert(&TopicFilter::mqtt("+/a").unwrap(), 3, ());
        idx.insert(&TopicFilter::mqtt("$dlq/+").unwrap(), 4, ());
        idx.insert(&TopicFilter::glob("*").unwrap(), 5, ());
        assert_eq!(ids(&idx, "$dlq/a"), [1, 4]);
        assert_eq!(ids(&idx, "x/a"), [2, 3, 5]);
        assert_eq!(ids(&idx, "x"), [2, 5]);
    }

    #[test]
    fn ids_reported_once() {
        let mut idx = FilterIndex::new();
        idx.insert(&TopicFilter::glob("#.#").unwrap(), 1, ());
        idx.insert(&TopicFilter::glob("#.a.#").unwrap(), 2, ());
        idx.insert(&TopicFilter::glob("a.#").unwrap(), 2, ());
        idx.insert(&TopicFilter::exact("a.a").unwrap(), 2, ());
        assert_eq!(ids(&idx, "a.a.a"), [1, 2]);
        assert_eq!(ids(&idx, "a.a"), [1, 2]);
        assert_eq!(ids(&idx, "b"), [1]);
    }

    #[test]
    fn insert_replaces_and_remove_prunes() {
        let mut idx = FilterIndex::new();
        let f = TopicFilter::parse("a/+/c/#").unwrap();
        let g = TopicFilter::parse("a.#.c").unwrap();
        let r = TopicFilter::regex("a.*").unwrap();
        let e = TopicFilter::parse("a").unwrap();
        for filter in [&f, &g, &r, &e] {
            idx.insert(filter, 1, "old");
            idx.insert(filter, 1, "new");
            idx.insert(filter, 2, "two");
        }
        idx.insert(&TopicFilter::parse("a/+").unwrap(), 3, "short");
        assert_eq!(idx.len(), 9);
        assert_eq!(matches(&idx, "a/b/c"), [(1, "new"), (2, "two")]);
        assert_eq!(idx.remove(&TopicFilter::mqtt("a").unwrap(), 1), None);
        assert_eq!(idx.remove(&f, 7), None);
        for filter in [&f, &g, &r, &e] {
            assert_eq!(idx.remove(filter, 1), Some("new"));
            assert_eq!(idx.remove(filter, 2), Some("two"));
            assert_eq!(idx.remove(filter, 2), None);
        }
        assert_eq!(ids(&idx, "a/b"), [3]);
        assert_eq!(idx.mqtt.root.literal.get("a").unwrap().edges(), 1);
        assert_eq!(
            idx.remove(&TopicFilter::parse("a/+").unwrap(), 3),
            Some("short")
        );
        assert_pruned(&idx);
    }

    #[test]
    fn deep_topics_do_not_blow_up() {
        let mut idx = FilterIndex::new();
        idx.insert(&TopicFilter::glob("#.#.#.#.#.#.#.#.z").unwrap(), 1, ());
        let topic = vec!["a"; 2000].join(".");
        assert_eq!(ids(&idx, &topic), Vec::<u64>::new());
        assert_eq!(ids(&idx, &format!("{topic}.z")), [1]);
        assert_eq!(ids(&idx, &"/".repeat(4096)), Vec::<u64>::new());
    }

    fn sample(
        alphabet: &'static [&'static str],
        max: usize,
    ) -> impl Strategy<Value = Vec<&'static str>> {
        prop::collection::vec(prop::sample::select(alphabet), 1..max)
    }

    const REGEXES: &[&str] = &[
        "a.*",
        "[ab]/.*",
        r"\$s/.*",
        "a|b",
        ".*",
        "(a|b)[./](a|b)",
        "a/+",
    ];

    fn filter() -> impl Strategy<Value = TopicFilter> {
        let exact = (sample(&["a", "b", ""], 4), any::<bool>())
            .prop_map(|(l, slash)| l.join(if slash { "/" } else { "." }));
        let mqtt =
            (sample(&["a", "b", "", "+", "$s"], 4), any::<bool>()).prop_map(|(mut l, hash)| {
                if hash {
                    l.push("#");
                }
                l.join("/")
            });
        let glob = sample(&["a", "b", "", "*", "#", "$s"], 5).prop_map(|l| l.join("."));
        prop_oneof![
            exact.prop_filter_map("invalid", |s| TopicFilter::exact(&s).ok()),
            mqtt.prop_filter_map("invalid", |s| TopicFilter::mqtt(&s).ok()),
            glob.prop_filter_map("invalid", |s| TopicFilter::glob(&s).ok()),
            prop::sample::select(REGEXES).prop_map(|p| TopicFilter::regex(p).unwrap()),
        ]
    }

    fn topic() -> impl Strategy<Value = String> {
        (
            any::<bool>(),
            prop::collection::vec(
                (prop::sample::select(&["a", "b", ""][..]), any::<bool>()),
                1..6,
            ),
        )
            .prop_map(|(system, levels)| {
                let mut t = String::from(if system { "$s" } else { "" });
                for (i, (level, slash)) in levels.into_iter().enumerate() {
                    if i > 0 || system {
                        t.push(if slash { '/' } else { '.' });
                    }
                    t.push_str(level);
                }
                t
            })
    }

    proptest! {
        #[test]
        fn index_agrees_with_linear_scan(
            inserts in prop::collection::vec((filter(), 0..6u64), 1..24),
            removals in prop::collection::vec(any::<prop::sample::Index>(), 0..16),
            topics in prop::collection::vec(topic(), 1..8),
        ) {
            let mut idx = FilterIndex::new();
            // `TopicFilter` hashes by kind and source only; the regex cache does not affect it.
            #[allow(clippy::mutable_key_type)]
            let mut model = HashMap::new();
            for (n, (f, id)) in inserts.iter().enumerate() {
                idx.insert(f, *id, n);
                model.insert((f.clone(), *id), n);
            }
            for r in &removals {
                let (f, id) = r.get(&inserts);
                prop_assert_eq!(idx.remove(f, *id), model.remove(&(f.clone(), *id)));
            }
            prop_assert_eq!(idx.len(), model.len());
            for t in &topics {
                let mut got = Vec::new();
                idx.for_each_match(t, |id, v| got.push((id, *v)));
                let got_ids: BTreeSet<u64> = got.iter().map(|(id, _)| *id).collect();
                prop_assert_eq!(got_ids.len(), got.len(), "an id was reported twice for {}", t);
                let want: BTreeSet<u64> =
                    model.keys().filter(|(f, _)| f.matches(t)).map(|(_, id)| *id).collect();
                prop_assert_eq!(&got_ids, &want, "topic {}", t);
                for (id, v) in got {
                    prop_assert!(model.iter().any(|((f, i), n)| *i == id && *n == v && f.matches(t)));
                }
            }
            for (f, id) in model.keys() {
                prop_assert!(idx.remove(f, *id).is_some());
            }
            assert_pruned(&idx);
        }
    }
}
