//! MQTT user name / password authentication against argon2 hashes.

use std::collections::HashMap;
use std::sync::Arc;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::SaltString;
use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};

use crate::config::UserConfig;

/// Why a password could not be hashed.
#[derive(Debug, thiserror::Error)]
#[error("hashing the password failed: {0}")]
pub struct HashError(String);

/// Hashes `password` with argon2id and a random salt, as a PHC string for the config file.
pub fn hash_password(password: &str) -> Result<String, HashError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| HashError(e.to_string()))
}

/// The outcome of checking a CONNECT's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOutcome {
    /// Let it in.
    Allowed,
    /// Unknown user or wrong password.
    BadCredentials,
    /// No user name and anonymous access is off.
    NotAuthorized,
}

/// The configured users.
#[derive(Debug, Clone)]
pub struct Authenticator {
    users: Arc<HashMap<String, String>>,
    allow_anonymous: bool,
}

impl Authenticator {
    /// From the config's users.
    pub fn new(users: &[UserConfig], allow_anonymous: bool) -> Self {
        Authenticator {
            users: Arc::new(
                users
                    .iter()
                    .map(|u| (u.username.clone(), u.password_hash.clone()))
                    .collect(),
            ),
            allow_anonymous,
        }
    }

    /// Whether [`check`](Self::check) would verify a password hash for `username` (slow, by
    /// design: worth a blocking thread); anonymous and unknown names are answered at once.
    pub fn hashes_for(&self, username: Option<&str>) -> bool {
        username.is_some_and(|u| self.users.contains_key(u))
    }

    /// Checks credentials. Argon2 is deliberately slow: when [`hashes_for`](Self::hashes_for)
    /// says so, call this from a blocking thread.
    pub fn check(&self, username: Option<&str>, password: Option<&[u8]>) -> AuthOutcome {
        let Some(user) = username else {
            return if self.allow_anonymous {
                AuthOutcome::Allowed
            } else {
                AuthOutcome::NotAuthorized
            };
        };
        let Some(hash) = self.users.get(user) else {
            // Anonymous access allows clients that send a user name we do not know? No: a
            // user name that is given must be valid.
            return AuthOutcome::BadCredentials;
        };
        let Some(password) = password else {
            return AuthOutcome::BadCredentials;
        };
        match PasswordHash::new(hash) {
            Ok(parsed) => match Argon2::default().verify_password(password, &parsed) {
                Ok(()) => AuthOutcome::Allowed,
                Err(_) => AuthOutcome::BadCredentials,
            },
            Err(e) => {
                tracing::error!(user, error = %e, "stored password hash is invalid");
                AuthOutcome::BadCredentials
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hash_and_check() {
        let hash = hash_password("s3cret").unwrap();
        let auth = Authenticator::new(
            &[UserConfig {
                username: "alice".into(),
                password_hash: hash,
                publish: None,
                subscribe: None,
                admin: false,
            }],
            false,
        );
        assert_eq!(
            auth.check(Some("alice"), Some(b"s3cret")),
            AuthOutcome::Allowed
        );
        assert_eq!(
            auth.check(Some("alice"), Some(b"nope")),
            AuthOutcome::BadCredentials
        );
        assert_eq!(
            auth.check(Some("bob"), Some(b"s3cret")),
            AuthOutcome::BadCredentials
        );
        assert_eq!(auth.check(None, None), AuthOutcome::NotAuthorized);
    }
}
