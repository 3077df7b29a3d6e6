//! Validated topic names and the error type shared by names and filters.
//!
//! A [`TopicName`] is an immutable, cheaply clonable (`Arc<str>`) string that was checked once,
//! at construction, so the rest of the crate never re-validates it. Invariants of every name
//! built by [`TopicName::new`]:
//!
//! - it is non-empty and at most [`MAX_TOPIC_LEN`] bytes long;
//! - it has no control characters (NUL included);
//! - it has none of the wildcard characters `+`, `#` (MQTT) and `*` (glob), so a name can never
//!   be mistaken for a filter;
//! - its first level (what comes before the first `/` or `.`) is none of the reserved names
//!   [`RESERVED_LEVELS`] (`$SYS`, `$share`, `$dlq`, `$ferry`, compared without regard to
//!   case): those are the system topics, such as the dead-letter topics `$dlq/<topic>`, which
//!   only the broker creates (through `TopicName::system`), MQTT's `$SYS` tree and shared
//!   subscriptions.
//!
//! Other names starting with `$` (`$foo/bar`) are user topics (MQTT §4.7.2): they are stored,
//! counted and retained like any other, but a filter whose first level is a wildcard (`#`,
//! `+/...`, `*`) does not match them; an exact filter or one that names their first level
//! (`$foo/#`) does.
//!
//! Levels may be separated by `/` (MQTT style) or `.` (AMQP/glob style); empty levels are allowed
//! (`a//b`), as in MQTT.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The maximum length of a topic name (and of a filter), in bytes.
pub const MAX_TOPIC_LEN: usize = 4096;

/// The first levels reserved for system topics (compared ASCII case-insensitively): MQTT's
/// `$SYS` tree, `$share` (shared subscriptions), the engine's dead-letter topics `$dlq/<topic>`
/// and `$ferry`, kept for future internal names.
pub const RESERVED_LEVELS: [&str; 4] = ["$SYS", "$share", "$dlq", "$ferry"];

/// Whether `name` is in a reserved namespace: its first level (up to the first `/` or `.`) is one
/// of [`RESERVED_LEVELS`].
pub(crate) fn is_reserved(name: &str) -> bool {
    if !name.starts_with('$') {
        return false;
    }
    let first = name.split(['/', '.']).next().unwrap_or(name);
    RESERVED_LEVELS
        .iter()
        .any(|r| first.eq_ignore_ascii_case(r))
}

/// Why a topic name or a topic filter is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The name is empty.
    #[error("invalid topic name: empty")]
    Empty,
    /// The name is longer than `max` bytes.
    #[error("invalid topic name: {len} bytes long, the maximum is {max}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// The maximum ([`MAX_TOPIC_LEN`]).
        max: usize,
    },
    /// The name contains a control character.
    #[error("invalid topic name: control character at byte {index}")]
    ControlChar {
        /// Byte offset of the character.
        index: usize,
    },
    /// The name contains a wildcard character (`+`, `#` or `*`).
    #[error("invalid topic name: wildcard {ch:?} at byte {index} (wildcards are only allowed in filters)")]
    Wildcard {
        /// The wildcard.
        ch: char,
        /// Byte offset of the character.
        index: usize,
    },
    /// The name's first level is reserved for system topics (`$SYS`, `$share`, `$dlq`,
    /// `$ferry`; see [`RESERVED_LEVELS`]).
    #[error("invalid topic name: names whose first level is $SYS, $share, $dlq or $ferry are reserved for system topics")]
    Reserved,
    /// An MQTT or glob filter is malformed.
    #[error("invalid topic filter {filter:?}: {reason}")]
    InvalidFilter {
        /// The filter as given.
        filter: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A regex filter does not compile or is too large.
    #[error("invalid regex filter {pattern:?}: {reason}")]
    InvalidRegex {
        /// The pattern as given.
        pattern: String,
        /// What is wrong with it (the regex compiler's message).
        reason: String,
    },
}

/// A validated topic name (see the [module documentation](self) for the rules).
///
/// Compares, orders and hashes like its string, so a `HashMap<TopicName, _>` can be queried with
/// a `&str`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(Arc<str>);

impl TopicName {
    /// Validates `name` as a user-supplied topic name.
    pub fn new(name: impl AsRef<str>) -> Result<TopicName, TopicError> {
        let name = name.as_ref();
        validate(name)?;
        Ok(TopicName(Arc::from(name)))
    }

    /// A system topic name such as `$dlq/<topic>`, built by the broker from valid parts. It skips
    /// validation (so it may exceed [`MAX_TOPIC_LEN`] by its prefix); `$ferry/` is prepended if
    /// `name` is not in a reserved namespace, so the result is always a system name and never
    /// one a user can publish to.
    pub(crate) fn system(name: String) -> TopicName {
        if is_reserved(&name) {
            TopicName(Arc::from(name))
        } else {
            TopicName(Arc::from(format!("$ferry/{name}")))
        }
    }

    /// The same name in an allocation of its own, so that reference counting on it does not
    /// contend with other threads' copies (each cursor keeps one for its deliveries).
    pub(crate) fn private_copy(&self) -> TopicName {
        TopicName(Arc::from(&*self.0))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is a system topic (its first level is reserved, see [`RESERVED_LEVELS`]).
    /// A user topic starting with `$` (`$foo/bar`) is not one.
    pub fn is_system(&self) -> bool {
        is_reserved(&self.0)
    }

    /// Whether the name starts with `$` (a system topic or a user `$` topic): filters whose
    /// first level is a wildcard do not match it (MQTT §4.7.2).
    pub fn is_dollar(&self) -> bool {
        self.0.starts_with('$')
    }
}

/// Checks the rules of a user-supplied topic name.
fn validate(name: &str) -> Result<(), TopicError> {
    if name.is_empty() {
        return Err(TopicError::Empty);
    }
    if name.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong {
            len: name.len(),
            max: MAX_TOPIC_LEN,
        });
    }
    if is_reserved(name) {
        return Err(TopicError::Reserved);
    }
    for (index, ch) in name.char_indices() {
        if ch.is_control() {
            return Err(TopicError::ControlChar { index });
        }
        if matches!(ch, '+' | '#' | '*') {
            return Err(TopicError::Wildcard { ch, index });
        }
    }
    Ok(())
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TopicName {
    type Err = TopicError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TopicName::new(s)
    }
}

impl AsRef<str> for TopicName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for TopicName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for TopicName {
    type Error = TopicError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        TopicName::new(s)
    }
}

impl TryFrom<String> for TopicName {
    type Error = TopicError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        validate(&s)?;
        Ok(TopicName(Arc::from(s)))
    }
}

impl PartialEq<str> for TopicName {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for TopicName {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn accepts_ordinary_names() {
        for n in [
            "a",
            "a/b",
            "a.b.c",
            "a//b",
            "/",
            "sport/tennis/player1",
            "ünï/cödé",
            "a$b",
        ] {
            let t = TopicName::new(n).unwrap();
            assert_eq!(t.as_str(), n);
            assert_eq!(t.to_string(), n);
            assert!(!t.is_system());
        }
        assert_eq!(
            TopicName::new("x".repeat(MAX_TOPIC_LEN))
                .unwrap()
                .as_str()
                .len(),
            4096
        );
    }

    #[test]
    fn rejects_invalid_names() {
        assert_eq!(TopicName::new(""), Err(TopicError::Empty));
        assert_eq!(
            TopicName::new("x".repeat(MAX_TOPIC_LEN + 1)),
            Err(TopicError::TooLong {
                len: 4097,
                max: 4096
            })
        );
        assert_eq!(
            TopicName::new("a\0b"),
            Err(TopicError::ControlChar { index: 1 })
        );
        assert_eq!(
            TopicName::new("ab\n"),
            Err(TopicError::ControlChar { index: 2 })
        );
        assert_eq!(
            TopicName::new("a\u{7f}"),
            Err(TopicError::ControlChar { index: 1 })
        );
        assert_eq!(
            TopicName::new("a/+"),
            Err(TopicError::Wildcard { ch: '+', index: 2 })
        );
        assert_eq!(
            TopicName::new("#"),
            Err(TopicError::Wildcard { ch: '#', index: 0 })
        );
        assert_eq!(
            TopicName::new("a.*"),
            Err(TopicError::Wildcard { ch: '*', index: 2 })
        );
        assert_eq!(TopicName::new("$SYS/x"), Err(TopicError::Reserved));
        for reserved in [
            "$SYS",
            "$sys/x",
            "$SYS.x",
            "$share/g/t",
            "$Share",
            "$dlq/x",
            "$DLQ.x",
            "$dlq",
            "$ferry/x",
        ] {
            assert_eq!(
                TopicName::new(reserved),
                Err(TopicError::Reserved),
                "{reserved}"
            );
        }
    }

    #[test]
    fn user_dollar_names_are_user_topics() {
        for n in [
            "$",
            "$foo",
            "$foo/bar",
            "$dlqx/y",
            "$SYSTEM/x",
            "$sharex",
            "$/x",
            "$ferryx",
        ] {
            let t = TopicName::new(n).unwrap();
            assert!(!t.is_system(), "{n}");
            assert!(t.is_dollar(), "{n}");
        }
        assert!(!TopicName::new("a$").unwrap().is_dollar());
    }

    #[test]
    fn error_messages_are_clear() {
        assert_eq!(TopicError::Empty.to_string(), "invalid topic name: empty");
        let e = TopicName::new("a/#").unwrap_err().to_string();
        assert!(e.contains("'#'") && e.contains("byte 2"), "{e}");
        assert!(TopicError::Reserved.to_string().contains("reserved"));
    }

    #[test]
    fn system_names() {
        let t = TopicName::system("$dlq/orders".to_string());
        assert!(t.is_system());
        assert_eq!(t.as_str(), "$dlq/orders");
        assert_eq!(
            TopicName::system("internal".into()).as_str(),
            "$ferry/internal"
        );
        assert!(TopicName::system("$foo".into()).is_system());
        assert!(TopicName::system("$dlq/$foo".into()).is_system());
    }

    #[test]
    fn conversions_and_lookup_by_str() {
        let t: TopicName = "a/b".parse().unwrap();
        assert_eq!(TopicName::try_from("a/b").unwrap(), t);
        assert_eq!(TopicName::try_from(String::from("a/b")).unwrap(), t);
        assert!(TopicName::try_from(String::from("$dlq/x")).is_err());
        assert!(TopicName::try_from(String::from("$x")).is_ok());
        assert_eq!(t, "a/b");
        assert_eq!(t.as_ref(), "a/b");
        let mut m = HashMap::new();
        m.insert(t.clone(), 1);
        assert_eq!(m.get("a/b"), Some(&1));
        assert!(TopicName::new("a").unwrap() < TopicName::new("b").unwrap());
    }
}
