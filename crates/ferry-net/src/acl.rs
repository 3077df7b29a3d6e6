//! Per-user topic access control for MQTT: which topics a client may publish to and which topic
//! filters it may subscribe to.
//!
//! Each user of `[[mqtt.users]]` may carry `publish = [...]` and `subscribe = [...]` lists of
//! patterns in MQTT wildcard syntax (`+` one level, `#` the rest); anonymous clients use
//! `[mqtt.anonymous]`. A list that is absent allows everything; an empty list allows nothing.
//! In a pattern, `%u` stands for the user name and `%c` for the client identifier; a pattern
//! naming `%u` never matches for an anonymous client, and neither placeholder matches when the
//! value contains `/`, `+` or `#` (a client cannot widen its own access through its name).
//!
//! - A PUBLISH (and a will) is allowed when its topic matches one of the `publish` patterns.
//! - A SUBSCRIBE filter is allowed when one of the `subscribe` patterns covers it: every topic
//!   the filter matches also matches the pattern (`a/+` covers `a/b` and `a/+`, not `a/#`;
//!   `a/#` covers `a`, `a/b/c` and `a/#`). A shared subscription `$share/<g>/<filter>` is
//!   checked on `<filter>`.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::config::{MqttConfig, UserConfig};

/// The publish and subscribe patterns of one principal (a user, or anonymous clients).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AclConfig {
    /// Topics the client may publish to (`None`: any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish: Option<Vec<String>>,
    /// Topic filters the client may subscribe to (`None`: any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<Vec<String>>,
}

/// Every principal's patterns, as configured.
#[derive(Debug, Clone, Default)]
pub struct AclRules {
    users: HashMap<String, AclConfig>,
    anonymous: AclConfig,
    /// Users with `admin = true`.
    admins: HashSet<String>,
}

impl AclRules {
    /// From the MQTT config: each user's lists and `[mqtt.anonymous]`.
    pub fn new(config: &MqttConfig) -> Self {
        AclRules {
            users: config
                .users
                .iter()
                .map(|u: &UserConfig| {
                    (
                        u.username.clone(),
                        AclConfig {
                            publish: u.publish.clone(),
                            subscribe: u.subscribe.clone(),
                        },
                    )
                })
                .collect(),
            anonymous: config.anonymous.clone(),
            admins: config
                .users
                .iter()
                .filter(|u| u.admin)
                .map(|u| u.username.clone())
                .collect(),
        }
    }

    /// Whether `username` is an administrator (`admin = true`); anonymous callers never are.
    pub fn is_admin(&self, username: Option<&str>) -> bool {
        username.is_some_and(|u| self.admins.contains(u))
    }

    /// The access of a connected client: `username` as authenticated (`None`: anonymous).
    /// A user name without a configured entry gets nothing (authentication refuses it anyway).
    pub fn for_client(&self, username: Option<&str>, client_id: &str) -> ClientAcl {
        let empty = AclConfig {
            publish: Some(Vec::new()),
            subscribe: Some(Vec::new()),
        };
        let config = match username {
            None => &self.anonymous,
            Some(u) => self.users.get(u).unwrap_or(&empty),
        };
        let expand = |patterns: &Option<Vec<String>>| {
            patterns.as_ref().map(|ps| {
                ps.iter()
                    .filter_map(|p| substitute(p, username, client_id))
                    .collect()
            })
        };
        let rules = Rules {
            publish: expand(&config.publish),
            subscribe: expand(&config.subscribe),
        };
        ClientAcl {
            rules: (rules.publish.is_some() || rules.subscribe.is_some()).then(|| Box::new(rules)),
        }
    }
}

/// Replaces `%u` and `%c` in `pattern`; `None` when a placeholder cannot be filled safely.
fn substitute(pattern: &str, username: Option<&str>, client_id: &str) -> Option<String> {
    let safe = |v: &str| !v.is_empty() && !v.contains(['/', '+', '#']);
    let mut out = pattern.to_string();
    if out.contains("%u") {
        let u = username.filter(|u| safe(u))?;
        out = out.replace("%u", u);
    }
    if out.contains("%c") {
        if !safe(client_id) {
            return None;
        }
        out = out.replace("%c", client_id);
    }
    Some(out)
}

/// What one connected client may do, placeholders filled in.
/// Boxed, and absent when everything is allowed: a connection without ACL rules carries one
/// pointer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientAcl {
    rules: Option<Box<Rules>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Rules {
    publish: Option<Vec<String>>,
    subscribe: Option<Vec<String>>,
}

impl ClientAcl {
    /// Everything allowed.
    pub fn allow_all() -> Self {
        ClientAcl::default()
    }

    /// Whether the client may publish to `topic`.
    pub fn may_publish(&self, topic: &str) -> bool {
        match self.rules.as_ref().and_then(|r| r.publish.as_ref()) {
            None => true,
            Some(ps) => ps.iter().any(|p| covers(p, topic)),
        }
    }

    /// Whether the client may subscribe to any filter (no `subscribe` list).
    pub fn may_subscribe_anything(&self) -> bool {
        self.rules.as_ref().is_none_or(|r| r.subscribe.is_none())
    }

    /// Whether the client may subscribe to `filter` (without any `$share/<g>/` prefix).
    pub fn may_subscribe(&self, filter: &str) -> bool {
        match self.rules.as_ref().and_then(|r| r.subscribe.as_ref()) {
            None => true,
            Some(ps) => ps.iter().any(|p| covers(p, filter)),
        }
    }
}

/// Whether every topic matching `filter` also matches `pattern` (for a topic name: whether it
/// matches). Topics starting with `$` are not matched by a pattern starting with a wildcard.
pub fn covers(pattern: &str, filter: &str) -> bool {
    if filter.starts_with('$') && pattern.starts_with(['+', '#']) {
        return false;
    }
    let mut p = pattern.split('/');
    let mut f = filter.split('/');
    loop {
        match (p.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(pl), Some(fl)) => {
                if fl == "+" || pl != fl {
                    return false;
                }
            }
            (None, None) => return true,
            // (`a/#` against `a` took the first arm: `#` also matches the parent level.)
            (Some(_), None) | (None, Some(_)) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn topic_matching() {
        assert!(covers("a/b", "a/b"));
        assert!(!covers("a/b", "a/c"));
        assert!(covers("a/+", "a/b"));
        assert!(!covers("a/+", "a/b/c"));
        assert!(covers("a/#", "a/b/c"));
        assert!(covers("a/#", "a"));
        assert!(covers("#", "x/y"));
        assert!(!covers("#", "$SYS/x"));
        assert!(covers("$SYS/#", "$SYS/x"));
        assert!(!covers("a/b/c", "a/b"));
    }

    #[test]
    fn filter_coverage() {
        assert!(covers("a/+", "a/+"));
        assert!(!covers("a/+", "a/#"));
        assert!(covers("a/#", "a/#"));
        assert!(covers("a/#", "a/+/c"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("+/b", "#"));
        assert!(covers("#", "#"));
    }

    #[test]
    fn placeholders() {
        assert_eq!(
            substitute("u/%u/c/%c", Some("al"), "c1"),
            Some("u/al/c/c1".into())
        );
        assert_eq!(substitute("u/%u", None, "c1"), None);
        assert_eq!(substitute("u/%u", Some("a/b"), "c1"), None);
        assert_eq!(substitute("c/%c", Some("x"), "#"), None);
        assert_eq!(substitute("plain", None, "#"), Some("plain".into()));
    }

    #[test]
    fn client_acl() {
        let mut config = MqttConfig::default();
        config.users.push(UserConfig {
            username: "alice".into(),
            password_hash: String::new(),
            publish: Some(vec!["users/%u/#".into()]),
            subscribe: Some(vec!["users/%u/#".into(), "public/+".into()]),
            admin: false,
        });
        config.anonymous.publish = Some(vec![]);
        let rules = AclRules::new(&config);
        let alice = rules.for_client(Some("alice"), "c");
        assert!(alice.may_publish("users/alice/x"));
        assert!(!alice.may_publish("users/bob/x"));
        assert!(alice.may_subscribe("public/+"));
        assert!(!alice.may_subscribe("public/#"));
        let anon = rules.for_client(None, "c");
        assert!(!anon.may_publish("users/alice/x"));
        assert!(anon.may_subscribe("anything/#"));
        let unknown = rules.for_client(Some("mallory"), "c");
        assert!(!unknown.may_publish("x"));
    }
}
