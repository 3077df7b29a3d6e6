//! The portable filter syntax and its translations.
//!
//! Levels are separated by `.`; `*` matches exactly one level; `#` as the last level matches one
//! or more levels (NATS `>`; RabbitMQ and Ferry also match zero levels there, so a portable
//! filter never relies on that).

use crate::error::{BackendError, Result};

/// Whether `filter` has a wildcard level.
pub fn has_wildcards(filter: &str) -> bool {
    filter.split('.').any(|l| l == "*" || l == "#")
}

/// Checks a topic name for publishing: non-empty, no wildcard levels.
pub(crate) fn check_topic(topic: &str) -> Result<()> {
    if topic.is_empty() {
        return Err(BackendError::Invalid("empty topic".into()));
    }
    if has_wildcards(topic) || topic.contains('*') || topic.contains('#') || topic.contains('>') {
        return Err(BackendError::Invalid(format!(
            "topic {topic:?} contains a wildcard"
        )));
    }
    if topic.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(BackendError::Invalid(format!(
            "topic {topic:?} contains whitespace or control characters"
        )));
    }
    Ok(())
}

/// Checks a filter: non-empty levels, `#` only last.
pub(crate) fn check_filter(filter: &str) -> Result<()> {
    if filter.is_empty() {
        return Err(BackendError::Invalid("empty filter".into()));
    }
    let levels: Vec<&str> = filter.split('.').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.is_empty() {
            return Err(BackendError::Invalid(format!(
                "filter {filter:?} has an empty level"
            )));
        }
        if *l == "#" && i + 1 != levels.len() {
            return Err(BackendError::Invalid(format!(
                "filter {filter:?}: '#' must be the last level"
            )));
        }
        if *l != "*" && *l != "#" && (l.contains('*') || l.contains('#') || l.contains('>')) {
            return Err(BackendError::Invalid(format!(
                "filter {filter:?}: wildcards must occupy a whole level"
            )));
        }
        if l.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(BackendError::Invalid(format!(
                "filter {filter:?} contains whitespace or control characters"
            )));
        }
    }
    Ok(())
}

/// The NATS subject filter for a portable filter (`#` becomes `>`).
pub(crate) fn to_nats(filter: &str) -> String {
    filter
        .split('.')
        .map(|l| if l == "#" { ">" } else { l })
        .collect::<Vec<_>>()
        .join(".")
}

/// A regex (Kafka pattern subscription) for a portable filter.
#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
pub(crate) fn to_regex(filter: &str) -> String {
    let mut out = String::from("^");
    for (i, l) in filter.split('.').enumerate() {
        if i > 0 {
            out.push_str("\\.");
        }
        match l {
            "*" => out.push_str("[^.]+"),
            "#" => out.push_str(".+"),
            lit => {
                for c in lit.chars() {
                    if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                        out.push(c);
                    } else {
                        out.push('\\');
                        out.push(c);
                    }
                }
            }
        }
    }
    out.push('$');
    out
}

/// A name made of `[A-Za-z0-9_-]` from anything (for stream, consumer and queue names), with a
/// short hash of the original so that different inputs stay different.
pub(crate) fn safe_name(s: &str) -> String {
    use std::hash::{Hash, Hasher};
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    // FNV-1a: stable across runs and Rust versions (DefaultHasher is not guaranteed to be).
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    s.hash(&mut h);
    format!("{cleaned}_{:08x}", h.finish() as u32)
}

struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translations() {
        assert!(has_wildcards("a.*.c"));
        assert!(has_wildcards("a.#"));
        assert!(!has_wildcards("a.b*"));
        assert_eq!(to_nats("a.*.#"), "a.*.>");
        assert_eq!(to_regex("a.*.x-y"), "^a\\.[^.]+\\.x-y$");
        assert!(check_filter("a.#.b").is_err());
        assert!(check_filter("a..b").is_err());
        assert!(check_filter("a.b*").is_err());
        assert!(check_filter("a.*.#").is_ok());
        assert!(check_topic("a.*").is_err());
        assert!(check_topic("a.b").is_ok());
        assert_eq!(safe_name("a.b"), safe_name("a.b"));
        assert_ne!(safe_name("a.b"), safe_name("a_b"));
    }
}
