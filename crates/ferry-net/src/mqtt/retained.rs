//! Retained messages: the last retained message of each topic, optionally persisted to a JSON
//! file in the data directory (written atomically: a temporary file, fsynced, renamed over the
//! old one).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use bytes::Bytes;
use ferry::{Message, TopicFilter};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::convert::{from_hex, to_hex};
use crate::unix_time::unix_ms;

/// The retained-message file's name in the data directory.
pub const RETAINED_FILE: &str = "mqtt-retained.json";

/// Errors reading or writing the retained-message file.
#[derive(Debug, thiserror::Error)]
pub enum RetainedError {
    /// I/O.
    #[error("retained messages file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not what we wrote.
    #[error("retained messages file {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Serialize, Deserialize)]
struct StoredRetained {
    topic: String,
    payload_hex: String,
    headers: Vec<(String, String)>,
    #[serde(default)]
    expires_at_ms: Option<u64>,
}

/// The retained store.
#[derive(Debug, Default)]
pub struct RetainedStore {
    messages: Mutex<HashMap<String, Message>>,
    path: Option<PathBuf>,
    dirty: AtomicBool,
}

impl RetainedStore {
    /// An in-memory store.
    pub fn in_memory() -> Self {
        RetainedStore::default()
    }

    /// A store persisted in `dir`, loading what is there.
    pub fn open(dir: &Path) -> Result<Self, RetainedError> {
        let path = dir.join(RETAINED_FILE);
        let mut messages = HashMap::new();
        match std::fs::read(&path) {
            Ok(bytes) => {
                let stored: Vec<StoredRetained> =
                    serde_json::from_slice(&bytes).map_err(|e| RetainedError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                let now = SystemTime::now();
                for s in stored {
                    let payload =
                        from_hex(&s.payload_hex).ok_or_else(|| RetainedError::Corrupt {
                            path: path.clone(),
                            reason: format!("payload of {} is not hex", s.topic),
                        })?;
                    let mut b = Message::builder().payload(Bytes::from(payload));
                    for (k, v) in s.headers {
                        b = b.header(k, v);
                    }
                    if let Some(ms) = s.expires_at_ms {
                        let at = crate::unix_time::from_unix_ms(ms);
                        if at <= now {
                            continue;
                        }
                        b = b.expires_at(at);
                    }
                    messages.insert(s.topic, b.build());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(RetainedError::Io { path, source: e }),
        }
        Ok(RetainedStore {
            messages: Mutex::new(messages),
            path: Some(path),
            dirty: AtomicBool::new(false),
        })
    }

    /// Sets (or, with an empty payload, clears) the retained message of `topic`.
    pub fn set(&self, topic: &str, message: Message) {
        let mut m = self.messages.lock();
        if message.payload().is_empty() {
            m.remove(topic);
        } else {
            m.insert(topic.to_string(), message);
        }
        self.dirty.store(true, Ordering::Release);
    }

    /// The live retained messages whose topic matches `filter`.
    pub fn matching(&self, filter: &TopicFilter) -> Vec<(String, Message)> {
        let now = SystemTime::now();
        let m = self.messages.lock();
        let mut out: Vec<(String, Message)> = m
            .iter()
            .filter(|(t, msg)| filter.matches(t) && msg.expires_at().is_none_or(|at| at > now))
            .map(|(t, msg)| (t.clone(), msg.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// How many are stored.
    pub fn len(&self) -> usize {
        self.messages.lock().len()
    }

    /// Whether none is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the file if anything changed since the last save (no-op in memory).
    pub fn save(&self) -> Result<(), RetainedError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let now = SystemTime::now();
        let stored: Vec<StoredRetained> = self
            .messages
            .lock()
            .iter()
            .filter(|(_, m)| m.expires_at().is_none_or(|at| at > now))
            .map(|(t, m)| StoredRetained {
                topic: t.clone(),
                payload_hex: to_hex(m.payload()),
                headers: m
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                expires_at_ms: m.expires_at().map(unix_ms),
            })
            .collect();
        let result = (|| {
            let json = serde_json::to_vec(&stored).map_err(std::io::Error::other)?;
            crate::fsutil::write_atomic(path, &json)
        })();
        result.map_err(|e| {
            // Try again next time.
            self.dirty.store(true, Ordering::Release);
            RetainedError::Io {
                path: path.clone(),
                source: e,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn persisted_and_cleared() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = RetainedStore::open(dir.path()).unwrap();
            store.set(
                "a/b",
                Message::builder().payload("x").header("h", "1").build(),
            );
            store.set("a/c", Message::new("y"));
            store.set("a/c", Message::new(""));
            store.save().unwrap();
        }
        let store = RetainedStore::open(dir.path()).unwrap();
        let all = store.matching(&TopicFilter::mqtt("a/#").unwrap());
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].0, "a/b");
        assert_eq!(all[0].1.payload().as_ref(), b"x");
        assert_eq!(all[0].1.header("h"), Some("1"));
    }
}
