//! The MQTT server's own state on disk: retained messages and persistent sessions as records
//! of a [`ferry_log::Store`] in `mqtt-state/` under the data directory.
//!
//! Every retained topic and every persistent session is a stream of its own (`retained/<topic>`,
//! `session/<client id>`: names are data, never paths). A change appends one record to its
//! stream and trims the stream to that record, so a stream holds at most one live record, as a
//! JetStream stream with one message per subject does for the MQTT state of NATS; clearing one
//! (a retained topic cleared, a session ended) trims its stream and forgets it, so nothing of
//! it stays in the store's memory. A save round writes the records of what changed since the last round, then
//! makes them durable with one fsync of the store (group commit): its cost depends on the
//! changes, not on how many retained messages or sessions exist. Opening reads the last record
//! of each stream; the segments that only hold superseded records are deleted by the store's
//! compaction ([`StateStore::maintain`]), and its index checkpoint keeps opening from
//! scanning the whole log.
//!
//! The store is the MQTT server's, not the engine's: the MQTT state exists with any engine (on
//! a data directory, in memory behind a backend bridge) and is opened, saved and closed by the
//! server, which the engine's store neither knows nor should wait for.
//!
//! All of it is blocking storage I/O: called from the state saver thread or a blocking task,
//! never on an async worker.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use ferry_log::{LogConfig, LogError, RecordIn, Store, StoreConfig, StoredRecord};
use parking_lot::Mutex;

/// The store's directory under the data directory.
pub const STATE_DIR: &str = "mqtt-state";

/// Prefix of the streams of retained messages.
pub(crate) const RETAINED_PREFIX: &str = "retained/";
/// Prefix of the streams of persistent sessions.
pub(crate) const SESSION_PREFIX: &str = "session/";

/// Record flag: the record clears its stream's value.
pub(crate) const TOMBSTONE: u16 = 1;

/// Segment size of the state store: small enough that segments holding only superseded
/// records are deleted soon, large enough that few are open.
const SEGMENT_BYTES: u64 = 32 << 20;

/// Errors of the MQTT state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The store failed.
    #[error("MQTT state store {dir}: {source}")]
    Store {
        /// The store's directory.
        dir: PathBuf,
        /// The error.
        source: LogError,
    },
    /// A record is not what we wrote.
    #[error("MQTT state store {dir}: stream {stream:?}: {reason}")]
    Corrupt {
        /// The store's directory.
        dir: PathBuf,
        /// The stream.
        stream: String,
        /// What is wrong.
        reason: String,
    },
    /// Saving is switched off by the fault switch ([`StateStore::fail_saves`]).
    #[error("MQTT state store {dir}: saves fail (fault injected)")]
    Injected {
        /// The store's directory.
        dir: PathBuf,
    },
    /// Migrating an old JSON state file failed.
    #[error("migrating {path}: {reason}")]
    Migration {
        /// The old file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// The MQTT state store (see the module docs). `Send + Sync`.
#[derive(Debug)]
pub struct StateStore {
    store: Store,
    /// Held for a whole save round: rounds (the saver thread's, the once-a-second one, the one
    /// at shutdown) never interleave their appends to a stream.
    round: Mutex<()>,
    /// Fault injection for tests: every save fails while set.
    fail: AtomicBool,
}

impl StateStore {
    /// Opens (or creates) the store in `data_dir/mqtt-state`. Blocking.
    pub fn open(data_dir: &Path) -> Result<StateStore, StateError> {
        let dir = data_dir.join(STATE_DIR);
        let config = StoreConfig {
            log: LogConfig {
                segment_bytes: SEGMENT_BYTES,
                ..LogConfig::default()
            },
            ..StoreConfig::default()
        };
        let store = Store::open(&dir, config).map_err(|source| StateError::Store {
            dir: dir.clone(),
            source,
        })?;
        for note in store.recovery_notes() {
            tracing::warn!(store = %dir.display(), "{note}");
        }
        Ok(StateStore {
            store,
            round: Mutex::new(()),
            fail: AtomicBool::new(false),
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        self.store.dir()
    }

    fn err(&self, source: LogError) -> StateError {
        StateError::Store {
            dir: self.dir().to_path_buf(),
            source,
        }
    }

    /// Makes every save fail (`true`) or work again (`false`): fault injection for tests.
    #[doc(hidden)]
    pub fn fail_saves(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }

    /// Runs a save round: `f` under the round lock, after the fault switch.
    pub(crate) fn round<T>(
        &self,
        f: impl FnOnce() -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        let _round = self.round.lock();
        if self.fail.load(Ordering::SeqCst) {
            return Err(StateError::Injected {
                dir: self.dir().to_path_buf(),
            });
        }
        f()
    }

    /// Appends `record` as the value of stream `name` and trims the stream to it (buffered:
    /// durable after [`sync`](Self::sync)). A tombstone clears: the stream is trimmed to its
    /// end and forgotten ([`Store::forget`]), so a cleared retained topic or an ended session
    /// leaves nothing in the store's memory; a crash before the forget is durable leaves an
    /// empty stream, which reads as cleared too. A tombstone for a stream that does not exist
    /// writes nothing.
    pub(crate) fn put(&self, name: &str, record: RecordIn) -> Result<(), StateError> {
        if record.flags & TOMBSTONE != 0 {
            let Some(stream) = self.store.find(name) else {
                return Ok(());
            };
            stream.trim(stream.next_offset()).map_err(|e| self.err(e))?;
            drop(stream);
            self.store.forget(name).map_err(|e| self.err(e))?;
            return Ok(());
        }
        let stream = self.store.stream(name).map_err(|e| self.err(e))?;
        let at = stream.next_offset();
        stream.append(at, &[record]).map_err(|e| self.err(e))?;
        stream.trim(at).map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The store's counters (bytes appended, fsyncs).
    #[cfg(test)]
    pub(crate) fn stats(&self) -> ferry_log::LogStats {
        self.store.stats()
    }

    /// Makes everything appended durable (one fsync shared by concurrent callers).
    pub(crate) fn sync(&self) -> Result<(), StateError> {
        self.store.sync().map_err(|e| self.err(e))
    }

    /// The names of the streams starting with `prefix`, in order (without the prefix).
    pub(crate) fn names(&self, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut from = prefix.to_string();
        let mut exclusive = false;
        loop {
            let batch = self.store.stream_names_from(&from, exclusive, 4096);
            let Some(last) = batch.last().cloned() else {
                break;
            };
            let more = batch.len() == 4096;
            let mut past = false;
            for n in batch {
                match n.strip_prefix(prefix) {
                    Some(rest) => out.push(rest.to_string()),
                    None => {
                        past = true;
                        break;
                    }
                }
            }
            if past || !more {
                break;
            }
            from = last;
            exclusive = true;
        }
        out
    }

    /// The last record of stream `name`, if it has one that is not a tombstone.
    #[cfg(test)]
    pub(crate) fn last(&self, name: &str) -> Result<Option<StoredRecord>, StateError> {
        Ok(self.last_any(name)?.filter(|r| r.flags & TOMBSTONE == 0))
    }

    /// The live value (last record, unless a tombstone) of every stream starting with
    /// `prefix`, by name without the prefix, read in one pass over the log; the streams whose
    /// value was lost to damage are logged and left out (the others are served). Blocking.
    pub(crate) fn values(
        &self,
        prefix: &str,
    ) -> Result<BTreeMap<String, StoredRecord>, StateError> {
        let (found, damaged) = match self.store.last_records(prefix) {
            Ok(r) => r,
            Err(e) => {
                // One pass failed (damage in the active segment): one read per stream, each
                // failing alone.
                tracing::warn!(store = %self.dir().display(), error = %e, "reading the MQTT state in one pass failed; reading it stream by stream");
                let mut found = BTreeMap::new();
                let mut damaged = Vec::new();
                for name in self.names(prefix) {
                    let full = format!("{prefix}{name}");
                    match self.last_any(&full) {
                        Ok(Some(r)) => {
                            found.insert(full, r);
                        }
                        Ok(None) => {}
                        Err(e) => damaged.push((full, e.to_string())),
                    }
                }
                (found, damaged)
            }
        };
        for (stream, why) in damaged {
            tracing::error!(store = %self.dir().display(), stream, reason = why, "MQTT state lost to damage");
        }
        Ok(found
            .into_iter()
            .filter(|(_, r)| r.flags & TOMBSTONE == 0)
            .filter_map(|(n, r)| n.strip_prefix(prefix).map(|n| (n.to_string(), r)))
            .collect())
    }

    /// The last record of stream `name` (tombstone or not), read alone.
    fn last_any(&self, name: &str) -> Result<Option<StoredRecord>, StateError> {
        let Some(stream) = self.store.find(name) else {
            return Ok(None);
        };
        let next = stream.next_offset();
        if next <= stream.start() {
            return Ok(None);
        }
        let mut records = stream
            .read(next - 1, 1, usize::MAX)
            .map_err(|e| self.err(e))?;
        Ok(records.pop())
    }

    /// Housekeeping for the saver: deletes the segments that only hold superseded records
    /// (at most once a second) and writes the index checkpoint when one is due.
    pub(crate) fn maintain(&self) -> Result<(), StateError> {
        self.store.compact(false).map_err(|e| self.err(e))?;
        self.store.maybe_checkpoint().map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Writes the checkpoint, syncs and closes the store (at shutdown). Blocking.
    pub fn close(&self) -> Result<(), StateError> {
        let _round = self.round.lock();
        self.store.close().map_err(|e| self.err(e))
    }

    /// Renames an old JSON state file to `<name>.migrated` once its content is durable in the
    /// store, and syncs the directory.
    pub(crate) fn retire_legacy(&self, path: &Path) -> Result<(), StateError> {
        let migration = |reason: String| StateError::Migration {
            path: path.to_path_buf(),
            reason,
        };
        self.sync()?;
        let mut to = path.as_os_str().to_owned();
        to.push(".migrated");
        std::fs::rename(path, &to).map_err(|e| migration(format!("rename: {e}")))?;
        if let Some(parent) = path.parent() {
            std::fs::File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(|e| migration(format!("fsync of the directory: {e}")))?;
        }
        Ok(())
    }
}

/// A tombstone record.
pub(crate) fn tombstone() -> RecordIn {
    RecordIn {
        flags: TOMBSTONE,
        payload: Bytes::new(),
        ..RecordIn::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn one_live_record_per_stream_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = StateStore::open(dir.path()).unwrap();
            s.round(|| {
                s.put("retained/a", RecordIn::new("1"))?;
                s.put("retained/a", RecordIn::new("2"))?;
                s.put("retained/b", RecordIn::new("x"))?;
                s.put("retained/b", tombstone())?;
                s.put("retained/never", tombstone())?;
                s.put("session/c", RecordIn::new("s"))?;
                s.sync()
            })
            .unwrap();
        }
        let s = StateStore::open(dir.path()).unwrap();
        // A cleared stream is forgotten: not even its name is left.
        assert_eq!(s.names(RETAINED_PREFIX), vec!["a"]);
        assert_eq!(s.names(SESSION_PREFIX), vec!["c"]);
        let values = s.values(RETAINED_PREFIX).unwrap();
        assert_eq!(values.keys().collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(values["a"].payload, "2");
        assert_eq!(s.last("retained/a").unwrap().unwrap().payload, "2");
        assert!(s.last("retained/b").unwrap().is_none());
        assert!(s.last("retained/never").unwrap().is_none());
        let a = s.store.find("retained/a").unwrap();
        assert_eq!((a.start(), a.next_offset()), (1, 2));
    }

    #[test]
    fn the_fault_switch_fails_rounds() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path()).unwrap();
        s.fail_saves(true);
        assert!(matches!(
            s.round(|| Ok(())),
            Err(StateError::Injected { .. })
        ));
        s.fail_saves(false);
        s.round(|| Ok(())).unwrap();
    }
}
