//! Who is calling the HTTP API: HTTP Basic credentials checked against the same users (argon2
//! hashes) and topic ACLs as MQTT.
//!
//! A request without credentials is anonymous: allowed when `mqtt.allow_anonymous` is on, with
//! the `[mqtt.anonymous]` ACL; otherwise `401` with `WWW-Authenticate: Basic`. Wrong credentials
//! are always `401`. Publishing needs the topic's publish permission; consuming, settling and
//! listing dead letters its subscribe permission; redriving and purging dead letters its publish
//! permission; stats, metrics and the dashboard's data any authenticated caller, showing it only
//! the topics it may consume, and the server's totals only when it may consume every topic or
//! is an administrator (`admin = true`); `/health` is open. Verified
//! credentials are remembered for [`CACHE_FOR`] (as a keyed hash, not the password) so that
//! argon2 runs once per user and minute, not per request.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};
use base64::Engine as _;
use parking_lot::Mutex;

use crate::acl::{AclRules, ClientAcl};
use crate::auth::{AuthOutcome, Authenticator};

/// How long verified credentials are remembered.
pub const CACHE_FOR: Duration = Duration::from_secs(60);
/// The most remembered credentials.
const CACHE_MAX: usize = 4096;

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No credentials, and anonymous access is off; or bad credentials.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// Authenticated, but the ACL does not allow it.
    #[error("{0}")]
    Forbidden(String),
}

/// The HTTP API's access control.
#[derive(Clone)]
pub struct HttpAccess {
    auth: Authenticator,
    acl: AclRules,
    cache: Arc<Mutex<HashMap<String, (u64, Instant)>>>,
    hasher: std::collections::hash_map::RandomState,
}

/// An authenticated (or anonymous) caller.
pub struct Caller {
    acl: ClientAcl,
    admin: bool,
}

impl Caller {
    /// Whether the caller sees every topic and the server's totals in stats, metrics and the
    /// dashboard: an administrator, or a caller whose ACL lets it consume any topic.
    pub fn sees_all(&self) -> bool {
        self.admin || self.acl.may_subscribe_anything()
    }

    /// Whether the caller sees `topic` in stats, metrics and the dashboard: when it may
    /// consume it (or is an administrator).
    pub fn may_see(&self, topic: &str) -> bool {
        self.admin || self.acl.may_subscribe(topic)
    }

    /// Checks publish permission on `topic`.
    pub fn may_publish(&self, topic: &str) -> Result<(), Denied> {
        if self.acl.may_publish(topic) {
            Ok(())
        } else {
            Err(Denied::Forbidden(format!(
                "not allowed to publish to {topic:?}"
            )))
        }
    }

    /// Checks subscribe permission on `topic`.
    pub fn may_subscribe(&self, topic: &str) -> Result<(), Denied> {
        if self.acl.may_subscribe(topic) {
            Ok(())
        } else {
            Err(Denied::Forbidden(format!(
                "not allowed to consume {topic:?}"
            )))
        }
    }
}

impl HttpAccess {
    /// Over the MQTT front end's users and ACLs.
    pub fn new(auth: Authenticator, acl: AclRules) -> Self {
        HttpAccess {
            auth,
            acl,
            cache: Arc::new(Mutex::new(HashMap::new())),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// Everyone may do everything (an API without users, as in tests of the engine alone).
    pub fn open() -> Self {
        HttpAccess::new(Authenticator::new(&[], true), AclRules::default())
    }

    fn fingerprint(&self, user: &str, password: &[u8]) -> u64 {
        let mut h = self.hasher.build_hasher();
        user.hash(&mut h);
        password.hash(&mut h);
        h.finish()
    }

    /// Who sent `headers`.
    pub async fn caller(&self, headers: &HeaderMap) -> Result<Caller, Denied> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return match self.auth.check(None, None) {
                AuthOutcome::Allowed => Ok(Caller {
                    acl: self.acl.for_client(None, "http"),
                    admin: false,
                }),
                _ => Err(Denied::Unauthenticated("credentials required")),
            };
        };
        let (user, password) = basic_credentials(value.as_bytes())
            .ok_or(Denied::Unauthenticated("malformed Basic credentials"))?;
        let fingerprint = self.fingerprint(&user, &password);
        let cached = self
            .cache
            .lock()
            .get(&user)
            .is_some_and(|(f, at)| *f == fingerprint && at.elapsed() < CACHE_FOR);
        if !cached {
            let auth = self.auth.clone();
            let (u, p) = (user.clone(), password);
            let outcome = tokio::task::spawn_blocking(move || auth.check(Some(&u), Some(&p)))
                .await
                .unwrap_or(AuthOutcome::BadCredentials);
            if outcome != AuthOutcome::Allowed {
                tracing::debug!(user, "HTTP request with bad credentials");
                return Err(Denied::Unauthenticated("bad user name or password"));
            }
            let mut cache = self.cache.lock();
            if cache.len() >= CACHE_MAX {
                cache.retain(|_, (_, at)| at.elapsed() < CACHE_FOR);
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
            }
            cache.insert(user.clone(), (fingerprint, Instant::now()));
        }
        Ok(Caller {
            acl: self.acl.for_client(Some(&user), "http"),
            admin: self.acl.is_admin(Some(&user)),
        })
    }
}

/// The user name and password of an `Authorization: Basic ...` value.
fn basic_credentials(value: &[u8]) -> Option<(String, Vec<u8>)> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let colon = decoded.iter().position(|b| *b == b':')?;
    let user = String::from_utf8(decoded.get(..colon)?.to_vec()).ok()?;
    let password = decoded.get(colon + 1..)?.to_vec();
    Some((user, password))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_parse() {
        let v = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("alice:s3:cret")
        );
        assert_eq!(
            basic_credentials(v.as_bytes()),
            Some(("alice".into(), b"s3:cret".to_vec()))
        );
        assert_eq!(basic_credentials(b"Bearer xyz"), None);
        assert_eq!(basic_credentials(b"Basic !!!"), None);
        assert_eq!(basic_credentials(b"Basic"), None);
        let no_colon = format!(
            "basic {}",
            base64::engine::general_purpose::STANDARD.encode("alice")
        );
        assert_eq!(basic_credentials(no_colon.as_bytes()), None);
    }
}
