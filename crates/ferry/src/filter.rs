//! Subscription filters: which topic names a subscription receives.
//!
//! A [`TopicFilter`] is one of four kinds, each validated once at construction and then matched
//! without allocating:
//!
//! - **Exact**: a single [`TopicName`] (same rules as topic names).
//! - **MQTT** (MQTT 3.1.1 §4.7): levels split on `/`. `+` matches exactly one level (an empty one
//!   included); `#` matches its parent level and any number of child levels, so `sport/#` matches
//!   `sport`, `sport/tennis` and `sport/tennis/x`, and `#` alone matches every topic. Both must
//!   occupy a whole level and `#` must be the last level. `*` is rejected (no topic can contain
//!   it). `$share/...` is not interpreted here; the server strips it.
//! - **Glob** (AMQP topic-exchange style, e.g. `game.*`, `player.*.joined`, `#`): levels split on
//!   `.`. `*` matches exactly one level, `#` zero or more levels; both must occupy a whole level,
//!   `#` may appear anywhere and several times. `+` is rejected.
//! - **Regex**: a [`regex`] pattern that must match the *whole* name (it is compiled as
//!   `^(?:pattern)$`). Patterns are limited to [`MAX_TOPIC_LEN`] bytes and 1 MiB compiled.
//!
//! MQTT and glob filters are non-empty, at most [`MAX_TOPIC_LEN`] bytes long and free of control
//! characters.
//!
//! **`$` topics.** Names starting with `$` (system topics such as the dead-letter topics
//! `$dlq/<topic>`, and user topics such as `$foo/bar`) are never matched by an MQTT or glob
//! filter whose first level is a wildcard (`#`, `+/...`, `*.x`, MQTT §4.7.2), nor by a regex
//! unless the pattern starts with `\$` (optionally after `^`). A filter that names their first
//! level literally (`$SYS/#`, `$foo/#`) does match them. [`TopicFilter::exact`] rejects reserved
//! names (`$SYS`, `$share`, `$dlq`, `$ferry`); the broker builds exact filters on system topics
//! itself.
//!
//! **Detection by [`TopicFilter::parse`]**, in order:
//!
//! 1. if the string contains `+` or `#` and is a valid MQTT filter, it is an MQTT filter
//!    (`#`, `a/+/c`, `sport/#`);
//! 2. otherwise, if it contains `*` or `#`, it is a glob filter, or an error if it is not a valid
//!    one (`a.#`, `game.*`, `*`);
//! 3. otherwise it is an exact filter, or an error if it is not a valid topic name (`a/b`). A
//!    string with `+` that failed step 1 reports the MQTT error.
//!
//! Regex filters are only made explicitly, with [`TopicFilter::regex`].
//!
//! Filters compare and hash by kind and source string.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::mem::discriminant;
use std::str::FromStr;

use regex::{Regex, RegexBuilder};

use crate::topic::{TopicError, TopicName, MAX_TOPIC_LEN};

/// The compiled-size limit of regex filters, in bytes.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// A subscription filter; see the [module documentation](self) for the kinds and their rules.
#[derive(Debug, Clone)]
pub enum TopicFilter {
    /// Exactly one topic.
    Exact(TopicName),
    /// An MQTT filter (`/`, `+`, `#`).
    Mqtt(MqttFilter),
    /// A glob filter (`.`, `*`, `#`).
    Glob(GlobFilter),
    /// A regular expression over the whole name.
    Regex(RegexFilter),
}

impl TopicFilter {
    /// An exact filter on a (user) topic name.
    pub fn exact(name: &str) -> Result<TopicFilter, TopicError> {
        TopicName::new(name).map(TopicFilter::Exact)
    }

    /// An exact filter on any name, system names (`$dlq/...`) included.
    pub(crate) fn exact_system(name: TopicName) -> TopicFilter {
        TopicFilter::Exact(name)
    }

    /// An MQTT filter.
    pub fn mqtt(filter: &str) -> Result<TopicFilter, TopicError> {
        MqttFilter::new(filter).map(TopicFilter::Mqtt)
    }

    /// A glob filter.
    pub fn glob(filter: &str) -> Result<TopicFilter, TopicError> {
        GlobFilter::new(filter).map(TopicFilter::Glob)
    }

    /// A regex filter.
    pub fn regex(pattern: &str) -> Result<TopicFilter, TopicError> {
        RegexFilter::new(pattern).map(TopicFilter::Regex)
    }

    /// Detects the kind of `filter` (see the [module documentation](self)) and builds it.
    pub fn parse(filter: &str) -> Result<TopicFilter, TopicError> {
        let glob_like = filter.contains(['*', '#']);
        if filter.contains(['+', '#']) {
            match MqttFilter::new(filter) {
                Ok(f) => return Ok(TopicFilter::Mqtt(f)),
                Err(e) if !glob_like => return Err(e),
                Err(_) => {}
            }
        }
        if glob_like {
            return TopicFilter::glob(filter);
        }
        TopicFilter::exact(filter)
    }

    /// Whether the topic named `topic` matches.
    pub fn matches(&self, topic: &str) -> bool {
        match self {
            TopicFilter::Exact(name) => name.as_str() == topic,
            TopicFilter::Mqtt(f) => f.matches(topic),
            TopicFilter::Glob(f) => f.matches(topic),
            TopicFilter::Regex(f) => f.matches(topic),
        }
    }

    /// The filter as written (the pattern, for a regex).
    pub fn as_str(&self) -> &str {
        match self {
            TopicFilter::Exact(name) => name.as_str(),
            TopicFilter::Mqtt(f) => f.as_str(),
            TopicFilter::Glob(f) => f.as_str(),
            TopicFilter::Regex(f) => f.as_str(),
        }
    }

    /// Where the names this filter matches lie in the name order: its literal leading levels
    /// (see [`Scope`]). Used to find matching topics without testing every name.
    pub fn scope(&self) -> Scope {
        match self {
            TopicFilter::Exact(name) => Scope {
                name: Some(name.to_string()),
                under: None,
            },
            TopicFilter::Mqtt(f) => level_scope(f.levels(), MQTT.sep),
            TopicFilter::Glob(f) => level_scope(f.levels(), GLOB.sep),
            TopicFilter::Regex(_) => Scope {
                name: None,
                under: Some(String::new()),
            },
        }
    }

    /// Whether the filter may match more than one name: a regex, or an MQTT or glob filter with a
    /// wildcard level.
    pub fn is_wildcard(&self) -> bool {
        match self {
            TopicFilter::Exact(_) => false,
            TopicFilter::Mqtt(f) => f.is_wildcard(),
            TopicFilter::Glob(f) => f.is_wildcard(),
            TopicFilter::Regex(_) => true,
        }
    }
}

/// Where in the name order the names a filter matches lie (see [`TopicFilter::scope`]): every
/// name it matches is `name`, or starts with `under`. A store or registry kept in name order
/// looks at one name and one range instead of every name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// A name the filter may match outside `under`: an exact filter's name, or the parent a
    /// `#` level matches with zero levels (`a` for `a/#`).
    pub name: Option<String>,
    /// The prefix of every other name the filter may match: `None` when there is none, `""`
    /// when the filter starts with a wildcard (or is a regex) and any name may match.
    pub under: Option<String>,
}

impl Scope {
    /// Whether `topic` lies in the scope (a filter matches only names that do; a name that
    /// does may still not match).
    pub fn covers(&self, topic: &str) -> bool {
        self.name.as_deref() == Some(topic)
            || self.under.as_deref().is_some_and(|u| topic.starts_with(u))
    }
}

impl PartialEq for TopicFilter {
    fn eq(&self, other: &Self) -> bool {
        discriminant(self) == discriminant(other) && self.as_str() == other.as_str()
    }
}

impl Eq for TopicFilter {}

impl Hash for TopicFilter {
    fn hash<H: Hasher>(&self, state: &mut H) {
        discriminant(self).hash(state);
        self.as_str().hash(state);
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TopicFilter {
    type Err = TopicError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TopicFilter::parse(s)
    }
}

/// One level of a pre-split MQTT or glob filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Level {
    /// Matches a topic level equal to it.
    Literal(Box<str>),
    /// `+` (MQTT) or `*` (glob): exactly one level.
    One,
    /// `#`: zero or more levels (MQTT only allows it last, where that is "the parent and every
    /// descendant").
    Many,
}

/// The syntax of a level-based filter kind.
struct Syntax {
    sep: char,
    one: char,
    /// The other kind's single-level wildcard, which no topic name can contain.
    foreign: char,
    many_last: bool,
    foreign_reason: &'static str,
    whole_reason: &'static str,
}

const MQTT: Syntax = Syntax {
    sep: '/',
    one: '+',
    foreign: '*',
    many_last: true,
    foreign_reason: "'*' is not an MQTT wildcard and cannot occur in topic names",
    whole_reason: "'+' and '#' must occupy a whole level",
};

const GLOB: Syntax = Syntax {
    sep: '.',
    one: '*',
    foreign: '+',
    many_last: false,
    foreign_reason: "'+' is not a glob wildcard and cannot occur in topic names",
    whole_reason: "'*' and '#' must occupy a whole level",
};

impl Syntax {
    /// Validates `filter` and splits it into levels.
    fn parse(&self, filter: &str) -> Result<Box<[Level]>, TopicError> {
        let err = |reason| TopicError::InvalidFilter {
            filter: filter.to_string(),
            reason,
        };
        if filter.is_empty() {
            return Err(err("empty"));
        }
        if filter.len() > MAX_TOPIC_LEN {
            return Err(err("longer than 4096 bytes"));
        }
        if filter.chars().any(char::is_control) {
            return Err(err("contains a control character"));
        }
        if filter.contains(self.foreign) {
            return Err(err(self.foreign_reason));
        }
        let mut levels = Vec::new();
        let mut split = filter.split(self.sep).peekable();
        while let Some(level) = split.next() {
            levels.push(if level == "#" {
                if self.many_last && split.peek().is_some() {
                    return Err(err("'#' must be the last level"));
                }
                Level::Many
            } else if level.len() == 1 && level.starts_with(self.one) {
                Level::One
            } else if level.contains(['#', self.one]) {
                return Err(err(self.whole_reason));
            } else {
                Level::Literal(level.into())
            });
        }
        Ok(levels.into_boxed_slice())
    }
}

/// Whether `topic`, split on `sep`, matches `levels`, where `#` matches zero or more levels.
///
/// Greedy matching that remembers only the latest `#` to backtrack to (as in glob matching), so
/// it takes at most O(levels × topic levels) steps and never allocates.
fn match_levels(levels: &[Level], topic: &str, sep: char) -> bool {
    if topic.starts_with('$') && matches!(levels.first(), Some(Level::One | Level::Many)) {
        return false;
    }
    let mut p = 0;
    let mut rest = topic.split(sep);
    // The filter level after the latest `#`, and the topic levels that `#` has not consumed.
    let mut backtrack = None;
    loop {
        let here = rest.clone();
        let Some(level) = rest.next() else { break };
        match levels.get(p) {
            Some(Level::Many) if p + 1 == levels.len() => return true,
            Some(Level::Many) => {
                backtrack = Some((p + 1, here.clone()));
                p += 1;
                rest = here;
                continue;
            }
            Some(Level::One) => {
                p += 1;
                continue;
            }
            Some(Level::Literal(l)) if **l == *level => {
                p += 1;
                continue;
            }
            _ => {}
        }
        // Mismatch: let the latest `#` absorb one more level and retry after it.
        let Some((after, consumed)) = &mut backtrack else {
            return false;
        };
        consumed.next();
        p = *after;
        rest = consumed.clone();
    }
    levels
        .get(p..)
        .is_some_and(|tail| tail.iter().all(|l| *l == Level::Many))
}

/// The scope of a level filter: its literal leading levels joined by `sep` are the prefix of
/// every name it matches; a `#` after them may also match the parent (zero levels).
fn level_scope(levels: &[Level], sep: char) -> Scope {
    let mut prefix = String::new();
    for (i, level) in levels.iter().enumerate() {
        if i > 0 {
            prefix.push(sep);
        }
        match level {
            Level::Literal(l) => prefix.push_str(l),
            Level::One => {
                return Scope {
                    name: None,
                    under: Some(prefix),
                }
            }
            Level::Many if i == 0 => {
                return Scope {
                    name: None,
                    under: Some(String::new()),
                }
            }
            Level::Many => {
                let parent = prefix[..prefix.len() - sep.len_utf8()].to_string();
                return Scope {
                    name: Some(parent),
                    under: Some(prefix),
                };
            }
        }
    }
    Scope {
        name: Some(prefix),
        under: None,
    }
}

/// Implements the common API of [`MqttFilter`] and [`GlobFilter`].
macro_rules! level_filter {
    ($name:ident, $syntax:ident) => {
        impl $name {
            /// Validates `filter` and pre-splits it into levels.
            pub fn new(filter: &str) -> Result<$name, TopicError> {
                Ok($name {
                    levels: $syntax.parse(filter)?,
                    source: filter.into(),
                })
            }

            /// Whether the topic named `topic` matches.
            pub fn matches(&self, topic: &str) -> bool {
                match_levels(&self.levels, topic, $syntax.sep)
            }

            /// Whether the filter has a wildcard level.
            pub fn is_wildcard(&self) -> bool {
                self.levels.iter().any(|l| !matches!(l, Level::Literal(_)))
            }

            /// The pre-split levels.
            pub(crate) fn levels(&self) -> &[Level] {
                &self.levels
            }
        }
    };
}

/// Implements `as_str`, `Display` and source-string equality and hashing.
macro_rules! by_source {
    ($($name:ident),*) => {$(
        impl $name {
            /// The filter as written.
            pub fn as_str(&self) -> &str {
                &self.source
            }
        }

        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                self.source == other.source
            }
        }

        impl Eq for $name {}

        impl Hash for $name {
            fn hash<H: Hasher>(&self, state: &mut H) {
                self.source.hash(state);
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.source)
            }
        }
    )*};
}

/// A validated MQTT filter (levels split on `/`, wildcards `+` and `#`).
#[derive(Debug, Clone)]
pub struct MqttFilter {
    source: Box<str>,
    levels: Box<[Level]>,
}

/// A validated glob filter (levels split on `.`, wildcards `*` and `#`).
#[derive(Debug, Clone)]
pub struct GlobFilter {
    source: Box<str>,
    levels: Box<[Level]>,
}

level_filter!(MqttFilter, MQTT);
level_filter!(GlobFilter, GLOB);

/// A compiled regex filter, matched against whole topic names.
#[derive(Debug, Clone)]
pub struct RegexFilter {
    source: Box<str>,
    regex: Regex,
    /// Whether the pattern starts with `\$`, so it may match system topics.
    system: bool,
}

impl RegexFilter {
    /// Compiles `pattern`, anchored at both ends.
    pub fn new(pattern: &str) -> Result<RegexFilter, TopicError> {
        let err = |reason: String| TopicError::InvalidRegex {
            pattern: pattern.to_string(),
            reason,
        };
        if pattern.is_empty() {
            return Err(err("empty pattern".into()));
        }
        if pattern.len() > MAX_TOPIC_LEN {
            return Err(err(format!("longer than {MAX_TOPIC_LEN} bytes")));
        }
        let compile = |p: &str| {
            RegexBuilder::new(p)
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map_err(|e| err(e.to_string()))
        };
        // Compiling the bare pattern first proves its groups are balanced, so wrapping it cannot
        // change its meaning (as `a)|(b` would).
        compile(pattern)?;
        let regex = compile(&format!("^(?:{pattern})$"))?;
        let system = pattern
            .strip_prefix('^')
            .unwrap_or(pattern)
            .starts_with("\\$");
        Ok(RegexFilter {
            source: pattern.into(),
            regex,
            system,
        })
    }

    /// Whether the topic named `topic` matches.
    pub fn matches(&self, topic: &str) -> bool {
        (self.system || !topic.starts_with('$')) && self.regex.is_match(topic)
    }
}

by_source!(MqttFilter, GlobFilter, RegexFilter);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mqtt(f: &str) -> TopicFilter {
        TopicFilter::mqtt(f).unwrap()
    }

    fn glob(f: &str) -> TopicFilter {
        TopicFilter::glob(f).unwrap()
    }

    #[test]
    fn mqtt_spec_examples() {
        let f = mqtt("sport/tennis/player1/#");
        for t in [
            "sport/tennis/player1",
            "sport/tennis/player1/ranking",
            "sport/tennis/player1/score/wimbledon",
        ] {
            assert!(f.matches(t), "{t}");
        }
        assert!(!f.matches("sport/tennis/player2"));
        let f = mqtt("sport/#");
        assert!(f.matches("sport") && f.matches("sport/tennis") && f.matches("sport/tennis/x"));
        assert!(!f.matches("sports"));
        let f = mqtt("sport/tennis/+");
        assert!(f.matches("sport/tennis/player1") && f.matches("sport/tennis/player2"));
        assert!(!f.matches("sport/tennis/player1/ranking"));
        let f = mqtt("sport/+");
        assert!(!f.matches("sport") && f.matches("sport/"));
        assert!(mqtt("+/+").matches("/finance") && mqtt("/+").matches("/finance"));
        assert!(!mqtt("+").matches("/finance"));
        assert!(mqtt("+/tennis/#").matches("sport/tennis/player1"));
        assert!(mqtt("#").matches("a") && mqtt("#").matches("a/b/c") && mqtt("#").matches("/"));
        assert!(mqtt("a/b").matches("a/b") && !mqtt("a/b").is_wildcard());
    }

    #[test]
    fn scopes() {
        let scope = |f: TopicFilter| {
            let s = f.scope();
            (s.name, s.under)
        };
        let s = |v: &str| Some(v.to_string());
        assert_eq!(scope(mqtt("a/b/+/c")), (None, s("a/b/")));
        assert_eq!(scope(mqtt("a/b/#")), (s("a/b"), s("a/b/")));
        assert_eq!(scope(mqtt("+/b")), (None, s("")));
        assert_eq!(scope(mqtt("#")), (None, s("")));
        assert_eq!(scope(mqtt("/+")), (None, s("/")));
        assert_eq!(scope(mqtt("a//#")), (s("a/"), s("a//")));
        assert_eq!(scope(mqtt("a/b")), (s("a/b"), None));
        assert_eq!(scope(glob("a.*.c")), (None, s("a.")));
        assert_eq!(scope(glob("a.#.c")), (s("a"), s("a.")));
        assert_eq!(scope(TopicFilter::exact("x/y").unwrap()), (s("x/y"), None));
        assert_eq!(scope(TopicFilter::regex("a.*").unwrap()), (None, s("")));
        assert!(mqtt("sport/#").scope().covers("sport"));
        assert!(!mqtt("sport/#").scope().covers("sports"));
    }

    #[test]
    fn mqtt_system_topics() {
        assert!(!mqtt("#").matches("$SYS/x"));
        assert!(!mqtt("+/monitor/Clients").matches("$SYS/monitor/Clients"));
        assert!(mqtt("$SYS/#").matches("$SYS/monitor/Clients"));
        assert!(mqtt("$SYS/monitor/+").matches("$SYS/monitor/Clients"));
        assert!(!mqtt("#").matches("$dlq/orders"));
        assert!(mqtt("a/#").matches("a/$x"));
        // User `$` topics: the same rule.
        assert!(!mqtt("#").matches("$foo/bar") && !mqtt("+/bar").matches("$foo/bar"));
        assert!(mqtt("$foo/#").matches("$foo/bar") && mqtt("$foo/+").matches("$foo/bar"));
        assert!(TopicFilter::exact("$foo/bar").unwrap().matches("$foo/bar"));
        assert!(!glob("#").matches("$foo.bar") && glob("$foo.*").matches("$foo.bar"));
    }

    #[test]
    fn mqtt_invalid() {
        for f in [
            "",
            "sport/tennis#",
            "sport/tennis/#/ranking",
            "sport+",
            "a/#/#",
            "a/*",
            "a\0",
            "#x",
        ] {
            let e = TopicFilter::mqtt(f).unwrap_err();
            assert!(matches!(e, TopicError::InvalidFilter { .. }), "{f}: {e}");
        }
        assert!(TopicFilter::mqtt(&"a".repeat(MAX_TOPIC_LEN + 1)).is_err());
        let e = TopicFilter::mqtt("a/#/b").unwrap_err().to_string();
        assert!(e.contains("last level") && e.contains("a/#/b"), "{e}");
    }

    #[test]
    fn glob_examples() {
        let f = glob("game.*");
        assert!(f.matches("game.started") && !f.matches("game.a.b") && !f.matches("game"));
        assert!(glob("player.*.joined").matches("player.42.joined"));
        assert!(!glob("player.*.joined").matches("player.42.left"));
        let all = glob("#");
        assert!(all.matches("a") && all.matches("a.b.c") && all.matches("a/b"));
        assert!(!all.matches("$dlq/x") && !glob("*").matches("$x"));
        assert!(glob("a.#").matches("a") && glob("a.#").matches("a.b.c"));
        assert!(
            glob("#.z").matches("z") && glob("#.z").matches("a.b.z") && !glob("#.z").matches("z.a")
        );
        assert!(glob("a.#.b.#.c").matches("a.b.c") && glob("a.#.b.#.c").matches("a.x.b.y.y.c"));
        assert!(!glob("a.#.b.#.c").matches("a.c.b"));
        assert!(
            glob("#.#").matches("x.y")
                && glob("*.#.*").matches("x.y")
                && !glob("*.#.*").matches("x")
        );
        assert!(glob("$dlq/a.*").matches("$dlq/a.b") && !glob("#").matches("$dlq/a.b"));
    }

    #[test]
    fn glob_invalid() {
        for f in ["", "a*.b", "a.b#", "a.+", "*x", "a.\n"] {
            let e = TopicFilter::glob(f).unwrap_err();
            assert!(matches!(e, TopicError::InvalidFilter { .. }), "{f}: {e}");
        }
    }

    #[test]
    fn regex_filters() {
        let f = TopicFilter::regex("orders/(eu|us)/.*").unwrap();
        assert!(
            f.matches("orders/eu/1") && !f.matches("xorders/eu/1") && !f.matches("orders/asia/1")
        );
        assert!(!TopicFilter::regex("a").unwrap().matches("ab"));
        assert!(!TopicFilter::regex(".*").unwrap().matches("$dlq/a"));
        assert!(TopicFilter::regex(r"\$dlq/.*").unwrap().matches("$dlq/a"));
        assert!(TopicFilter::regex(r"^\$dlq/.*$").unwrap().matches("$dlq/a"));
        // Balanced-group check: this must not become an unanchored alternation.
        assert!(TopicFilter::regex("a)|(b").is_err());
        for p in [
            "",
            "(",
            "[a-",
            &"a".repeat(MAX_TOPIC_LEN + 1),
            "(?:a{1000}){1000}",
        ] {
            let e = TopicFilter::regex(p).unwrap_err();
            assert!(matches!(e, TopicError::InvalidRegex { .. }), "{e}");
        }
    }

    #[test]
    fn parse_detection() {
        let kind = |s: &str| match TopicFilter::parse(s).unwrap() {
            TopicFilter::Exact(_) => "exact",
            TopicFilter::Mqtt(_) => "mqtt",
            TopicFilter::Glob(_) => "glob",
            TopicFilter::Regex(_) => "regex",
        };
        assert_eq!(kind("#"), "mqtt");
        assert_eq!(kind("a/+/c"), "mqtt");
        assert_eq!(kind("sport/#"), "mqtt");
        assert_eq!(kind("a.#"), "glob");
        assert_eq!(kind("game.*"), "glob");
        assert_eq!(kind("*"), "glob");
        assert_eq!(kind("a/b"), "exact");
        assert!(matches!(
            TopicFilter::parse("a.+"),
            Err(TopicError::InvalidFilter { .. })
        ));
        assert!(matches!(
            TopicFilter::parse("a*.b"),
            Err(TopicError::InvalidFilter { .. })
        ));
        assert_eq!(TopicFilter::parse("$dlq/x"), Err(TopicError::Reserved));
        assert_eq!(kind("$x"), "exact");
        assert!(TopicFilter::parse("$x").unwrap().matches("$x"));
        assert_eq!(TopicFilter::parse(""), Err(TopicError::Empty));
        let f: TopicFilter = "game.*".parse().unwrap();
        assert_eq!(f.to_string(), "game.*");
        assert!(f.is_wildcard() && !TopicFilter::parse("a").unwrap().is_wildcard());
    }

    #[test]
    fn equality_by_kind_and_source() {
        assert_eq!(mqtt("a/+"), TopicFilter::parse("a/+").unwrap());
        assert_ne!(mqtt("a"), glob("a"));
        assert_ne!(mqtt("a"), TopicFilter::exact("a").unwrap());
        assert_eq!(
            TopicFilter::regex("a.*").unwrap(),
            TopicFilter::regex("a.*").unwrap()
        );
        let sys = TopicFilter::exact_system(TopicName::system("$dlq/a".into()));
        assert!(sys.matches("$dlq/a") && !sys.matches("a"));
    }

    /// Naive reference: recursive backtracking over levels.
    fn reference(filter: &[&str], topic: &[&str], one: &str, mqtt: bool) -> bool {
        match filter.split_first() {
            None => topic.is_empty(),
            Some((&"#", _)) if mqtt => true,
            Some((&"#", rest)) => {
                (0..=topic.len()).any(|k| reference(rest, &topic[k..], one, mqtt))
            }
            Some((&w, rest)) if w == one => {
                !topic.is_empty() && reference(rest, &topic[1..], one, mqtt)
            }
            Some((lit, rest)) => {
                topic.first() == Some(lit) && reference(rest, &topic[1..], one, mqtt)
            }
        }
    }

    fn reference_match(filter: &str, topic: &str, sep: char, one: &str, mqtt: bool) -> bool {
        let f: Vec<&str> = filter.split(sep).collect();
        let t: Vec<&str> = topic.split(sep).collect();
        if topic.starts_with('$') && (f[0] == "#" || f[0] == one) {
            return false;
        }
        reference(&f, &t, one, mqtt)
    }

    fn levels(
        alphabet: &'static [&'static str],
        max: usize,
    ) -> impl Strategy<Value = Vec<&'static str>> {
        prop::collection::vec(prop::sample::select(alphabet), 1..max)
    }

    proptest! {
        #[test]
        fn mqtt_matches_reference(
            mut f in levels(&["a", "b", "", "+", "$s"], 5),
            hash in any::<bool>(),
            t in levels(&["a", "b", "", "$s"], 6),
        ) {
            if hash {
                f.push("#");
            }
            let (filter, topic) = (f.join("/"), t.join("/"));
            prop_assume!(!filter.is_empty());
            let got = TopicFilter::mqtt(&filter).unwrap().matches(&topic);
            prop_assert_eq!(got, reference_match(&filter, &topic, '/', "+", true), "{} vs {}", filter, topic);
        }

        #[test]
        fn a_match_lies_in_the_filter_scope(
            mut f in levels(&["a", "b", "", "+", "*", "$s"], 5),
            hash in 0..3u8,
            t in levels(&["a", "b", "", "$s", "ab"], 6),
        ) {
            match hash {
                1 => f.push("#"),
                2 => f.insert(0, "#"),
                _ => {}
            }
            for sep in ['/', '.'] {
                let (filter, topic) = (f.join(&sep.to_string()), t.join(&sep.to_string()));
                let parsed = if sep == '/' { TopicFilter::mqtt(&filter) } else { TopicFilter::glob(&filter) };
                let Ok(parsed) = parsed else { continue };
                if parsed.matches(&topic) {
                    prop_assert!(parsed.scope().covers(&topic), "{} matches {} outside {:?}", filter, topic, parsed.scope());
                }
            }
        }

        #[test]
        fn glob_matches_reference(
            f in levels(&["a", "b", "", "*", "#", "$s"], 7),
            t in levels(&["a", "b", "", "$s"], 7),
        ) {
            let (filter, topic) = (f.join("."), t.join("."));
            prop_assume!(!filter.is_empty());
            let got = TopicFilter::glob(&filter).unwrap().matches(&topic);
            prop_assert_eq!(got, reference_match(&filter, &topic, '.', "*", false), "{} vs {}", filter, topic);
        }
    }
}
