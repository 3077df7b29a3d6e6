//! Retained messages: the last retained message of each topic, kept in memory in topic order
//! (the read path: a SUBSCRIBE looks only at the topics in its filter's scope) and, with a data
//! directory, as records of the MQTT state store (see [`super::state_store`]): one stream per
//! topic, one record per change (payload, headers, expiry; a tombstone clears), written and
//! made durable by the next save round. A data directory with the old whole-set file
//! (`mqtt-retained.json`) is migrated when it opens: its messages are written as records, made
//! durable, and the file is renamed `mqtt-retained.json.migrated`.

use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use ferry::{Message, TopicFilter};
use ferry_log::{RecordIn, StoredRecord};
use parking_lot::Mutex;
use serde::Deserialize;

use super::convert::from_hex;
use super::state_store::{tombstone, StateError, StateStore, RETAINED_PREFIX};
use crate::unix_time::unix_ms;

/// The old retained-message file's name in the data directory (migrated on open).
pub const RETAINED_FILE: &str = "mqtt-retained.json";

/// Version byte of a retained record's key.
const RECORD_VERSION: u8 = 1;

/// Errors reading or writing retained messages.
pub type RetainedError = StateError;

/// An entry of the old JSON file.
#[derive(Deserialize)]
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
    messages: Mutex<BTreeMap<String, Message>>,
    /// Where changes are saved (none in memory).
    state: Option<Arc<StateStore>>,
    /// Topics changed since the last save round.
    dirty: Mutex<HashSet<String>>,
}

/// The record of a retained message.
fn encode(message: &Message) -> RecordIn {
    let mut key = vec![RECORD_VERSION];
    if let Some(at) = message.expires_at() {
        key.extend_from_slice(&unix_ms(at).to_be_bytes());
    }
    RecordIn {
        key: Some(Bytes::from(key)),
        headers: message
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), Bytes::copy_from_slice(v.as_bytes())))
            .collect(),
        payload: message.payload().clone(),
        ..RecordIn::default()
    }
}

/// The message of a retained record, `Ok(None)` if it expired.
fn decode(r: StoredRecord, now: SystemTime) -> Result<Option<Message>, String> {
    let key = r.key.unwrap_or_default();
    let expires = match key.as_ref() {
        [RECORD_VERSION] => None,
        [RECORD_VERSION, rest @ ..] => {
            let ms: [u8; 8] = rest
                .try_into()
                .map_err(|_| format!("bad expiry of {} bytes", rest.len()))?;
            Some(crate::unix_time::from_unix_ms(u64::from_be_bytes(ms)))
        }
        _ => return Err("unknown record version".into()),
    };
    let mut b = Message::builder().payload(r.payload);
    for (k, v) in r.headers {
        let v = String::from_utf8(v.to_vec()).map_err(|_| format!("header {k} is not UTF-8"))?;
        b = b.header(k, v);
    }
    if let Some(at) = expires {
        if at <= now {
            return Ok(None);
        }
        b = b.expires_at(at);
    }
    Ok(Some(b.build()))
}

impl RetainedStore {
    /// An in-memory store.
    pub fn in_memory() -> Self {
        RetainedStore::default()
    }

    /// A store saved in `state`, loading what is there; first migrates the old JSON file of
    /// `data_dir`, if there is one. Blocking.
    pub fn open(state: Arc<StateStore>, data_dir: &Path) -> Result<Self, RetainedError> {
        let legacy = data_dir.join(RETAINED_FILE);
        migrate(&state, &legacy)?;
        let now = SystemTime::now();
        let mut messages = BTreeMap::new();
        for (topic, record) in state.values(RETAINED_PREFIX)? {
            match decode(record, now) {
                Ok(Some(m)) => {
                    messages.insert(topic, m);
                }
                Ok(None) => {}
                Err(reason) => {
                    return Err(StateError::Corrupt {
                        dir: state.dir().to_path_buf(),
                        stream: format!("{RETAINED_PREFIX}{topic}"),
                        reason,
                    })
                }
            }
        }
        tracing::info!(retained = messages.len(), "retained messages restored");
        Ok(RetainedStore {
            messages: Mutex::new(messages),
            state: Some(state),
            dirty: Mutex::default(),
        })
    }

    /// Sets (or, with an empty payload, clears) the retained message of `topic`; saved by the
    /// next save round.
    pub fn set(&self, topic: &str, message: Message) {
        {
            let mut m = self.messages.lock();
            if message.payload().is_empty() {
                m.remove(topic);
            } else {
                m.insert(topic.to_string(), message);
            }
        }
        if self.state.is_some() {
            self.dirty.lock().insert(topic.to_string());
        }
    }

    /// The live retained messages whose topic matches `filter`, in topic order. Only the topics
    /// in the filter's scope (its literal leading levels) are looked at.
    pub fn matching(&self, filter: &TopicFilter) -> Vec<(String, Message)> {
        let now = SystemTime::now();
        let scope = filter.scope();
        let live = |t: &str, msg: &Message| {
            filter.matches(t) && msg.expires_at().is_none_or(|at| at > now)
        };
        let m = self.messages.lock();
        let mut out: Vec<(String, Message)> = Vec::new();
        if let Some(name) = scope.name.as_deref() {
            if let Some(msg) = m.get(name) {
                if live(name, msg) {
                    out.push((name.to_string(), msg.clone()));
                }
            }
        }
        if let Some(under) = scope.under.as_deref() {
            let range = m.range::<str, _>((Bound::Included(under), Bound::Unbounded));
            for (t, msg) in range.take_while(|(t, _)| t.starts_with(under)) {
                if scope.name.as_deref() != Some(t.as_str()) && live(t, msg) {
                    out.push((t.clone(), msg.clone()));
                }
            }
        }
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

    /// Writes a record for each topic changed since the last save and makes them durable
    /// (no-op in memory). Blocking. On failure the changes stay to be saved by the next round.
    pub fn save(&self) -> Result<(), RetainedError> {
        let Some(state) = &self.state else {
            return Ok(());
        };
        state.round(|| {
            let taken: Vec<String> = self.dirty.lock().drain().collect();
            if taken.is_empty() {
                return Ok(());
            }
            let written = (|| {
                for topic in &taken {
                    let record = match self.messages.lock().get(topic) {
                        Some(m) => encode(m),
                        None => tombstone(),
                    };
                    state.put(&format!("{RETAINED_PREFIX}{topic}"), record)?;
                }
                state.sync()?;
                state.maintain()
            })();
            if written.is_err() {
                self.dirty.lock().extend(taken);
            }
            written
        })
    }
}

/// Imports the old JSON file at `path` into `state` (if it exists), then renames it.
fn migrate(state: &StateStore, path: &Path) -> Result<(), StateError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(migration(path, e.to_string())),
    };
    let stored: Vec<StoredRetained> =
        serde_json::from_slice(&bytes).map_err(|e| migration(path, e.to_string()))?;
    let count = stored.len();
    state.round(|| {
        for s in stored {
            let payload = from_hex(&s.payload_hex)
                .ok_or_else(|| migration(path, format!("payload of {} is not hex", s.topic)))?;
            let mut b = Message::builder().payload(Bytes::from(payload));
            for (k, v) in s.headers {
                b = b.header(k, v);
            }
            if let Some(ms) = s.expires_at_ms {
                b = b.expires_at(crate::unix_time::from_unix_ms(ms));
            }
            state.put(&format!("{RETAINED_PREFIX}{}", s.topic), encode(&b.build()))?;
        }
        state.retire_legacy(path)
    })?;
    tracing::info!(
        retained = count,
        file = %path.display(),
        "retained messages migrated to the MQTT state store"
    );
    Ok(())
}

fn migration(path: &Path, reason: String) -> StateError {
    StateError::Migration {
        path: PathBuf::from(path),
        reason,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn open(dir: &Path) -> RetainedStore {
        RetainedStore::open(Arc::new(StateStore::open(dir).unwrap()), dir).unwrap()
    }

    #[test]
    fn persisted_and_cleared() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            store.set(
                "a/b",
                Message::builder().payload("x").header("h", "1").build(),
            );
            store.set("a/c", Message::new("y"));
            store.set("a/c", Message::new(""));
            store.set("a/d", Message::new("1"));
            store.save().unwrap();
            store.set("a/d", Message::new("2"));
            store.save().unwrap();
        }
        let store = open(dir.path());
        let all = store.matching(&TopicFilter::mqtt("a/#").unwrap());
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].0, "a/b");
        assert_eq!(all[0].1.payload().as_ref(), b"x");
        assert_eq!(all[0].1.header("h"), Some("1"));
        assert_eq!(all[1].0, "a/d");
        assert_eq!(all[1].1.payload().as_ref(), b"2");
    }

    #[test]
    fn expiry_is_kept_and_expired_messages_are_not_restored() {
        let dir = tempfile::tempdir().unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(3600);
        let earlier = SystemTime::now() - std::time::Duration::from_secs(1);
        {
            let store = open(dir.path());
            store.set(
                "t/live",
                Message::builder().payload("l").expires_at(later).build(),
            );
            store.set(
                "t/dead",
                Message::builder().payload("d").expires_at(earlier).build(),
            );
            store.save().unwrap();
        }
        let store = open(dir.path());
        let all = store.matching(&TopicFilter::mqtt("t/+").unwrap());
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].0, "t/live");
        assert_eq!(all[0].1.expires_at().map(unix_ms), Some(unix_ms(later)));
    }

    #[test]
    fn a_failed_save_keeps_the_changes_for_the_next_round() {
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(StateStore::open(dir.path()).unwrap());
        {
            let store = RetainedStore::open(state.clone(), dir.path()).unwrap();
            store.set("k", Message::new("v"));
            state.fail_saves(true);
            assert!(store.save().is_err());
            state.fail_saves(false);
            store.save().unwrap();
        }
        drop(state);
        let store = open(dir.path());
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn a_change_writes_its_own_record_whatever_the_number_stored() {
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(StateStore::open(dir.path()).unwrap());
        let store = RetainedStore::open(state.clone(), dir.path()).unwrap();
        let change = |topic: &str| {
            let before = state.stats();
            store.set(topic, Message::new(vec![b'x'; 1024]));
            store.save().unwrap();
            let after = state.stats();
            (
                after.bytes_appended - before.bytes_appended,
                after.fsyncs - before.fsyncs,
            )
        };
        let (first_bytes, first_fsyncs) = change("t/first");
        for i in 0..5_000 {
            store.set(&format!("t/{i}"), Message::new(vec![b'y'; 1024]));
        }
        store.save().unwrap();
        let (bytes, fsyncs) = change("t/first");
        // The same record (and trim) as with one message stored, not the whole set.
        assert!(bytes <= first_bytes + 64, "{bytes} vs {first_bytes}");
        assert!(bytes < 4096, "{bytes}");
        assert_eq!(fsyncs, first_fsyncs);
    }

    #[test]
    fn matching_looks_at_the_scope_and_finds_what_a_scan_finds() {
        let store = RetainedStore::in_memory();
        let topics = [
            "a", "a/b", "a/b/c", "a/bc", "ab", "a/", "/a", "b/a", "$SYS/x", "a/b/c/d",
        ];
        for t in topics {
            store.set(t, Message::new(t));
        }
        for f in [
            "a/#", "a/+", "a/b", "+/a", "#", "a/b/#", "/#", "+", "a/+/c", "$SYS/#",
        ] {
            let filter = TopicFilter::mqtt(f).unwrap();
            let got: Vec<String> = store
                .matching(&filter)
                .into_iter()
                .map(|(t, _)| t)
                .collect();
            let mut want: Vec<String> = topics
                .iter()
                .filter(|t| filter.matches(t))
                .map(|t| t.to_string())
                .collect();
            want.sort();
            assert_eq!(got, want, "{f}");
        }
        let exact = TopicFilter::exact("a/b").unwrap();
        assert_eq!(store.matching(&exact).len(), 1);
    }

    #[test]
    fn the_old_json_file_is_migrated_once() {
        let dir = tempfile::tempdir().unwrap();
        // Written in the old format: hex payloads, headers as pairs, optional expiry.
        let old = r#"[
            {"topic":"home/lamp","payload_hex":"6f6e","headers":[["h","1"]]},
            {"topic":"home/door","payload_hex":"00ff","headers":[],"expires_at_ms":32503680000000},
            {"topic":"home/gone","payload_hex":"78","headers":[],"expires_at_ms":1000}
        ]"#;
        std::fs::write(dir.path().join(RETAINED_FILE), old).unwrap();
        let store = open(dir.path());
        let all = store.matching(&TopicFilter::mqtt("home/#").unwrap());
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].0, "home/door");
        assert_eq!(all[0].1.payload().as_ref(), &[0x00, 0xff]);
        assert!(all[0].1.expires_at().is_some());
        assert_eq!(all[1].0, "home/lamp");
        assert_eq!(all[1].1.payload().as_ref(), b"on");
        assert_eq!(all[1].1.header("h"), Some("1"));
        assert!(!dir.path().join(RETAINED_FILE).exists());
        assert!(dir.path().join("mqtt-retained.json.migrated").exists());
        drop(store);
        // Reopened: from the store alone.
        let store = open(dir.path());
        assert_eq!(store.len(), 2);
    }
}
