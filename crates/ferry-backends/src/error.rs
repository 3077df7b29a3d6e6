//! Typed errors shared by every backend.

use std::time::Duration;

/// What went wrong talking to a backend. Every variant has a stable [`code`](Self::code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The URL does not name a known backend or is malformed.
    #[error("invalid backend URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The backend could not be reached (after the connect retries, if any).
    #[error("{backend} is unreachable: {reason}")]
    Unreachable {
        /// Which backend (`nats`, `redis`, ...).
        backend: &'static str,
        /// The last error seen.
        reason: String,
    },
    /// An operation did not complete in time.
    #[error("{backend}: {operation} timed out after {after:?}")]
    Timeout {
        /// Which backend.
        backend: &'static str,
        /// What timed out.
        operation: String,
        /// After how long.
        after: Duration,
    },
    /// The backend refused the operation (a publish not confirmed, a full topic, a
    /// configuration conflict, a permission error...).
    #[error("{backend} rejected {operation}: {reason}")]
    Rejected {
        /// Which backend.
        backend: &'static str,
        /// What was refused.
        operation: String,
        /// Why, as the backend said it.
        reason: String,
    },
    /// A publish was sent (or reached storage) but its confirmation did not arrive: a
    /// confirmation timeout, the connection lost after the send, a store write or sync that
    /// failed after the record reached it. The message may have been stored and then will be
    /// delivered; the caller cannot tell. Every other publish error means nothing was stored.
    /// Retrying with the same message id is safe where the backend de-duplicates by id
    /// (`dedup` native: NATS JetStream's `Nats-Msg-Id`); elsewhere a retry may deliver twice
    /// (consumer-side de-duplication by id drops the second copy).
    #[error("{backend}: {operation} is in doubt (it may have been stored): {reason}")]
    InDoubt {
        /// Which backend.
        backend: &'static str,
        /// What was not confirmed.
        operation: String,
        /// Why the confirmation is missing.
        reason: String,
    },
    /// The backend handle (or the subscription) was closed.
    #[error("backend is closed")]
    Closed,
    /// The backend cannot do this (see its [`Capabilities`](crate::Capabilities)).
    #[error("{backend} does not support {feature}")]
    Unsupported {
        /// Which backend.
        backend: &'static str,
        /// The feature asked for.
        feature: String,
    },
    /// An argument is invalid: a topic name, a filter, an option out of range.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The delivery is no longer in flight (its ack timeout passed, or it was already settled,
    /// or the connection it came on was lost and the broker took it back).
    #[error("delivery is no longer in flight (ack timeout passed or already settled)")]
    Stale,
    /// Any other failure reported by the backend's client library.
    #[error("{backend}: {operation} failed: {reason}")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// The operation.
        operation: String,
        /// The client library's error.
        reason: String,
    },
}

impl BackendError {
    /// A stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            BackendError::InvalidUrl { .. } => "invalid_url",
            BackendError::Unreachable { .. } => "unreachable",
            BackendError::Timeout { .. } => "timeout",
            BackendError::Rejected { .. } => "rejected",
            BackendError::InDoubt { .. } => "in_doubt",
            BackendError::Closed => "closed",
            BackendError::Unsupported { .. } => "unsupported",
            BackendError::Invalid(_) => "invalid",
            BackendError::Stale => "stale",
            BackendError::Backend { .. } => "backend",
        }
    }

    /// Whether retrying the same operation later may succeed (unreachable, timed out).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            BackendError::Unreachable { .. } | BackendError::Timeout { .. }
        )
    }

    /// Whether the operation may have taken effect although it failed ([`InDoubt`](Self::InDoubt)).
    pub fn is_in_doubt(&self) -> bool {
        matches!(self, BackendError::InDoubt { .. })
    }

    pub(crate) fn in_doubt(
        backend: &'static str,
        operation: impl Into<String>,
        reason: impl std::fmt::Display,
    ) -> Self {
        BackendError::InDoubt {
            backend,
            operation: operation.into(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn backend(
        backend: &'static str,
        operation: impl Into<String>,
        reason: impl std::fmt::Display,
    ) -> Self {
        BackendError::Backend {
            backend,
            operation: operation.into(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn rejected(
        backend: &'static str,
        operation: impl Into<String>,
        reason: impl std::fmt::Display,
    ) -> Self {
        BackendError::Rejected {
            backend,
            operation: operation.into(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn unsupported(backend: &'static str, feature: impl Into<String>) -> Self {
        BackendError::Unsupported {
            backend,
            feature: feature.into(),
        }
    }
}

/// The result type of this crate.
pub type Result<T, E = BackendError> = std::result::Result<T, E>;
