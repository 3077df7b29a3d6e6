//! Content-based subscription filters on message headers (seed 004's content routing).
//!
//! A subscription may carry header conditions; all must hold for a record to be delivered to it.
//! Records that fail them are skipped by that subscription and counted as `filtered` (part of
//! its accounting), never delivered, and do not hold the topic's memory.

use crate::message::Message;

/// One condition on a message's headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderMatch {
    /// Header `key` is present with exactly this value.
    Equals(String, String),
    /// Header `key` is present (any value).
    Exists(String),
    /// Header `key` is present with one of these values.
    OneOf(String, Vec<String>),
}

impl HeaderMatch {
    /// `key == value`.
    pub fn equals(key: impl Into<String>, value: impl Into<String>) -> Self {
        HeaderMatch::Equals(key.into(), value.into())
    }

    /// `key` is present.
    pub fn exists(key: impl Into<String>) -> Self {
        HeaderMatch::Exists(key.into())
    }

    /// `key` is one of `values`.
    pub fn one_of<V: Into<String>>(
        key: impl Into<String>,
        values: impl IntoIterator<Item = V>,
    ) -> Self {
        HeaderMatch::OneOf(key.into(), values.into_iter().map(Into::into).collect())
    }

    /// Whether `message` satisfies the condition. With repeated keys, any value may match.
    pub fn matches(&self, message: &Message) -> bool {
        let h = message.headers();
        match self {
            HeaderMatch::Equals(k, v) => h.iter().any(|(hk, hv)| hk == k && hv == v),
            HeaderMatch::Exists(k) => h.iter().any(|(hk, _)| hk == k),
            HeaderMatch::OneOf(k, vs) => h
                .iter()
                .any(|(hk, hv)| hk == k && vs.iter().any(|v| v == hv)),
        }
    }
}

/// Whether `message` satisfies every condition.
pub(crate) fn all_match(conditions: &[HeaderMatch], message: &Message) -> bool {
    conditions.iter().all(|c| c.matches(message))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn conditions() {
        let m = Message::builder()
            .payload("x")
            .header("region", "eu")
            .header("kind", "order")
            .build();
        assert!(HeaderMatch::equals("region", "eu").matches(&m));
        assert!(!HeaderMatch::equals("region", "us").matches(&m));
        assert!(HeaderMatch::exists("kind").matches(&m));
        assert!(!HeaderMatch::exists("missing").matches(&m));
        assert!(HeaderMatch::one_of("region", ["us", "eu"]).matches(&m));
        assert!(!HeaderMatch::one_of("region", ["us", "apac"]).matches(&m));
        assert!(all_match(&[], &m));
        assert!(!all_match(
            &[
                HeaderMatch::exists("kind"),
                HeaderMatch::equals("region", "us")
            ],
            &m
        ));
    }
}
