//! Topic Name and Topic Filter rules (MQTT 5.0 section 4.7, 3.1.1 section 4.7) and shared
//! subscriptions (`$share/{group}/{filter}`, MQTT 5.0 section 4.8.2).

/// Why a topic name, topic filter or shared subscription is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// Topic names and filters must be at least one character long.
    #[error("topic is empty")]
    Empty,
    /// Longer than the 65,535 bytes a UTF-8 string field can hold.
    #[error("topic is {0} bytes long; at most 65535 fit")]
    TooLong(usize),
    /// Contains U+0000.
    #[error("topic contains U+0000")]
    NullCharacter,
    /// A topic name (as opposed to a filter) contains `+` or `#`.
    #[error("topic name contains a wildcard")]
    WildcardInTopicName,
    /// `+` does not occupy a whole level, or `#` is not a whole, last level.
    #[error("wildcard must occupy a whole level, and '#' must be the last level")]
    MisplacedWildcard,
    /// A `$share/` filter whose share name is empty or contains `+` or `#`.
    #[error("shared subscription has an invalid share name")]
    InvalidShareName,
    /// A `$share/{group}` filter without `/` and a topic filter after the share name.
    #[error("shared subscription has no topic filter after the share name")]
    MissingSharedFilter,
}

/// The prefix that marks a shared subscription.
pub const SHARE_PREFIX: &str = "$share/";

fn check_common(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > usize::from(u16::MAX) {
        return Err(TopicError::TooLong(topic.len()));
    }
    if topic.contains('\0') {
        return Err(TopicError::NullCharacter);
    }
    Ok(())
}

/// Checks a Topic Name, as used in PUBLISH and in a will: non-empty, at most 65,535 bytes, no
/// U+0000 and no wildcard characters.
///
/// ```
/// use ferry_mqtt::{validate_topic_name, TopicError};
/// assert!(validate_topic_name("sensors/1/temp").is_ok());
/// assert_eq!(validate_topic_name("sensors/+"), Err(TopicError::WildcardInTopicName));
/// ```
pub fn validate_topic_name(topic: &str) -> Result<(), TopicError> {
    check_common(topic)?;
    if topic.contains(['+', '#']) {
        return Err(TopicError::WildcardInTopicName);
    }
    Ok(())
}

/// Checks a Topic Filter, as used in SUBSCRIBE and UNSUBSCRIBE: non-empty, at most 65,535 bytes,
/// no U+0000, `+` only as a whole level and `#` only as the whole last level.
///
/// This is the plain syntax: a `$share/...` filter is checked as an ordinary filter here; use
/// [`parse_shared_subscription`] for the shared-subscription rules.
///
/// ```
/// use ferry_mqtt::{validate_topic_filter, TopicError};
/// assert!(validate_topic_filter("sensors/+/temp").is_ok());
/// assert!(validate_topic_filter("#").is_ok());
/// assert_eq!(validate_topic_filter("sensors/#/x"), Err(TopicError::MisplacedWildcard));
/// assert_eq!(validate_topic_filter("sensors+"), Err(TopicError::MisplacedWildcard));
/// ```
pub fn validate_topic_filter(filter: &str) -> Result<(), TopicError> {
    check_common(filter)?;
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let wildcard_ok = match level {
            "+" => true,
            "#" => levels.peek().is_none(),
            _ => !level.contains(['+', '#']),
        };
        if !wildcard_ok {
            return Err(TopicError::MisplacedWildcard);
        }
    }
    Ok(())
}

/// Splits a shared subscription `$share/{group}/{filter}` into `(group, filter)`.
///
/// Returns `Ok(None)` for a filter that does not start with `$share/` (an ordinary subscription,
/// still to be checked with [`validate_topic_filter`]). For a shared one, the share name must be
/// non-empty without `+` or `#` (it cannot contain `/`: the first `/` ends it), and it must be
/// followed by `/` and a valid topic filter.
///
/// ```
/// use ferry_mqtt::{parse_shared_subscription, TopicError};
/// assert_eq!(parse_shared_subscription("$share/workers/jobs/#"), Ok(Some(("workers", "jobs/#"))));
/// assert_eq!(parse_shared_subscription("jobs/#"), Ok(None));
/// assert_eq!(parse_shared_subscription("$share//jobs"), Err(TopicError::InvalidShareName));
/// assert_eq!(parse_shared_subscription("$share/workers"), Err(TopicError::MissingSharedFilter));
/// ```
pub fn parse_shared_subscription(filter: &str) -> Result<Option<(&str, &str)>, TopicError> {
    let Some(rest) = filter.strip_prefix(SHARE_PREFIX) else {
        return Ok(None);
    };
    check_common(filter)?;
    let (group, inner) = match rest.split_once('/') {
        Some(parts) => parts,
        None => (rest, ""),
    };
    if group.is_empty() || group.contains(['+', '#']) {
        return Err(TopicError::InvalidShareName);
    }
    if inner.is_empty() {
        return Err(TopicError::MissingSharedFilter);
    }
    validate_topic_filter(inner)?;
    Ok(Some((group, inner)))
}

/// The v5 check of a subscription filter: shared-subscription syntax for `$share/` filters, the
/// plain filter syntax otherwise. Returns whether the filter is shared.
pub(crate) fn check_filter_v5(filter: &str) -> Result<bool, TopicError> {
    match parse_shared_subscription(filter)? {
        Some(_) => Ok(true),
        None => validate_topic_filter(filter).map(|()| false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        for ok in [
            "a", "/", "+", "#", "+/+", "a/+/b", "a/#", "/#", "$SYS/#", "a//b", "+/#",
        ] {
            assert_eq!(validate_topic_filter(ok), Ok(()), "{ok}");
        }
        for bad in ["a+", "+a", "#/a", "a/#/b", "a#", "a/b#", "##", "++"] {
            assert_eq!(
                validate_topic_filter(bad),
                Err(TopicError::MisplacedWildcard),
                "{bad}"
            );
        }
        assert_eq!(validate_topic_filter(""), Err(TopicError::Empty));
        assert_eq!(validate_topic_filter("a\0"), Err(TopicError::NullCharacter));
        let long = "a".repeat(65_536);
        assert_eq!(
            validate_topic_filter(&long),
            Err(TopicError::TooLong(65_536))
        );
    }

    #[test]
    fn names() {
        for ok in ["a", "/", "a/b", "$SYS/x", " ", "a//b"] {
            assert_eq!(validate_topic_name(ok), Ok(()), "{ok}");
        }
        for bad in ["+", "#", "a/+", "a/#", "a+b"] {
            assert_eq!(
                validate_topic_name(bad),
                Err(TopicError::WildcardInTopicName),
                "{bad}"
            );
        }
        assert_eq!(validate_topic_name(""), Err(TopicError::Empty));
        assert_eq!(validate_topic_name("\0"), Err(TopicError::NullCharacter));
    }

    #[test]
    fn shared() {
        assert_eq!(
            parse_shared_subscription("$share/g/a/+"),
            Ok(Some(("g", "a/+")))
        );
        assert_eq!(
            parse_shared_subscription("$share/g//"),
            Ok(Some(("g", "/")))
        );
        assert_eq!(parse_shared_subscription("$share"), Ok(None));
        assert_eq!(parse_shared_subscription("$shared/g/a"), Ok(None));
        assert_eq!(
            parse_shared_subscription("$share/"),
            Err(TopicError::InvalidShareName)
        );
        assert_eq!(
            parse_shared_subscription("$share/+/a"),
            Err(TopicError::InvalidShareName)
        );
        assert_eq!(
            parse_shared_subscription("$share/g#/a"),
            Err(TopicError::InvalidShareName)
        );
        assert_eq!(
            parse_shared_subscription("$share/g/"),
            Err(TopicError::MissingSharedFilter)
        );
        assert_eq!(
            parse_shared_subscription("$share/g/a+"),
            Err(TopicError::MisplacedWildcard)
        );
        assert_eq!(check_filter_v5("$share/g/#"), Ok(true));
        assert_eq!(check_filter_v5("a/#"), Ok(false));
    }
}
