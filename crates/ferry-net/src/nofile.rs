//! The open-file limit: a server holds a descriptor per connection, so at start it raises its
//! soft `RLIMIT_NOFILE` to the hard limit (what an unprivileged process may do) and warns when
//! even that is below what its settings need.

use crate::config::ServeConfig;

/// Descriptors kept for everything but connections: listeners, the data directory's files (a
/// handful: one commit log, its index files, positions, sessions, retained messages) and the
/// runtime's own.
pub const OTHER_FILES: u64 = 256;

/// What the settings need: every MQTT connection and every HTTP connection (the HTTP API and
/// MQTT over WebSocket) the server admits, plus [`OTHER_FILES`].
pub fn needed(config: &ServeConfig) -> u64 {
    let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    let http = if config.http.enabled {
        count(config.http.max_connections)
    } else {
        0
    };
    count(config.mqtt.max_connections)
        .saturating_add(http)
        .saturating_add(OTHER_FILES)
}

/// The open-file limit before and after [`raise`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    /// The soft limit found at start.
    pub before: u64,
    /// The soft limit now (the hard limit, unless raising failed).
    pub now: u64,
    /// The hard limit.
    pub hard: u64,
    /// What the settings need ([`needed`]).
    pub needed: u64,
}

/// Raises the soft open-file limit to the hard one, logs the result at info, and warns when
/// it stays below what `config` needs. `None` where the platform has no such limit or it
/// cannot be read (logged at debug).
pub fn raise(config: &ServeConfig) -> Option<NofileLimit> {
    let needed = needed(config);
    let (before, hard) = match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(error = %e, "reading the open-file limit failed");
            return None;
        }
    };
    let now = match rlimit::increase_nofile_limit(hard) {
        Ok(now) => now,
        Err(e) => {
            tracing::warn!(error = %e, soft = before, hard, "raising the open-file limit failed");
            before
        }
    };
    let limit = NofileLimit {
        before,
        now,
        hard,
        needed,
    };
    tracing::info!(before, now, hard, needed, "open-file limit");
    if now < needed {
        tracing::warn!(
            limit = now,
            needed,
            max_connections = config.mqtt.max_connections,
            "the open-file limit is below what mqtt.max_connections needs (plus {OTHER_FILES} \
             for HTTP, listeners and storage): connections past it will fail to be accepted; \
             raise the hard limit (ulimit -Hn, LimitNOFILE= in systemd) or lower \
             mqtt.max_connections"
        );
    }
    Some(limit)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let mut config = ServeConfig::default();
        config.mqtt.max_connections = 100;
        let Some(l) = raise(&config) else {
            return; // no RLIMIT_NOFILE here
        };
        assert_eq!(
            l.needed,
            100 + 1024 + OTHER_FILES,
            "MQTT, HTTP (its default) and the rest"
        );
        assert!(l.now >= l.before);
        let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
        assert_eq!((soft, hard), (l.now, l.hard));
        #[cfg(target_os = "linux")]
        assert_eq!(l.now, l.hard);
    }
}
