//! Sessions: which client is connected, session takeover, and persistent sessions kept while
//! their client is away.
//!
//! A persistent session's MQTT subscriptions are Ferry consumer groups named
//! `mqtt/session/<client id>/<filter>` with manual acknowledgement: a group outlives its last
//! member, so the engine keeps the position (and every record after it) while the client is
//! offline, and redelivers what was in flight when the connection dropped. The registry keeps
//! the subscription list, the inbound QoS 2 identifiers and the outbound identifiers waiting for
//! PUBCOMP. An offline session ends when its expiry interval passes or its backlog exceeds
//! `max_queued`; its groups are then deleted.
//!
//! With a data directory the registry is persisted in `mqtt-sessions.json` (replaced
//! atomically, at most once a second and at shutdown): for every persistent session, online or
//! not, its subscriptions, QoS 2 identifiers, expiry interval and when it went offline. At start
//! the sessions are restored offline, their expiry counted from when they went offline (or from
//! the last save for one that was online), so a client reconnecting with clean start = false
//! after a restart resumes its session (session present) and receives, from the consumer groups
//! the durable engine kept, the messages published while it was away.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_mqtt::RetainHandling;
use serde::{Deserialize, Serialize};

use ferry::Broker;
use ferry_mqtt::{QoS, SubscriptionOptions};
use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

/// One MQTT subscription of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubEntry {
    /// The topic filter without any `$share/<group>/` prefix.
    pub filter: String,
    /// The share name of a shared subscription.
    pub share: Option<String>,
    /// The options as requested.
    pub options: SubscriptionOptions,
    /// The QoS granted.
    pub granted: QoS,
    /// Subscription identifier (MQTT 5).
    pub id: Option<u32>,
    /// The engine consumer group behind it, if any (persistent or shared).
    pub group: Option<String>,
}

/// The consumer group of a persistent session's subscription.
pub fn session_group(client_id: &str, filter: &str) -> String {
    format!("mqtt/session/{client_id}/{filter}")
}

/// The consumer group of a shared subscription.
pub fn share_group(share: &str, filter: &str) -> String {
    format!("mqtt/share/{share}/{filter}")
}

/// What a persistent session keeps while its client is offline.
#[derive(Debug, Clone, Default)]
pub struct StoredSession {
    /// Subscriptions by their full MQTT filter (with any `$share/` prefix).
    pub subscriptions: BTreeMap<String, SubEntry>,
    /// Inbound QoS 2 identifiers received and not released.
    pub inbound_qos2: HashSet<u16>,
    /// Outbound QoS 2 identifiers waiting for PUBCOMP.
    pub awaiting_pubcomp: Vec<u16>,
    /// The session expiry interval.
    pub expiry: Duration,
}

impl StoredSession {
    /// Groups owned by this session only (not shared ones).
    fn own_groups(&self) -> impl Iterator<Item = &str> {
        self.subscriptions
            .values()
            .filter(|s| s.share.is_none())
            .filter_map(|s| s.group.as_deref())
    }
}

enum Slot {
    Online {
        conn: u64,
        kick: CancellationToken,
        done: Option<oneshot::Receiver<()>>,
        /// The session as last recorded by its connection (persistent sessions only), saved
        /// so that it survives a crash.
        persisted: Option<StoredSession>,
    },
    Offline {
        session: StoredSession,
        since: Instant,
    },
}

/// The session registry.
#[derive(Default)]
pub struct Sessions {
    slots: Mutex<HashMap<String, Slot>>,
    delayed_wills: Mutex<HashMap<String, AbortHandle>>,
    /// The file persistent sessions are saved to (none in memory).
    path: Option<PathBuf>,
    /// Whether the slots changed since the last save.
    dirty: AtomicBool,
}

/// The session file's name in the data directory.
pub const SESSIONS_FILE: &str = "mqtt-sessions.json";

/// Errors reading or writing the session file.
#[derive(Debug, thiserror::Error)]
pub enum SessionStoreError {
    /// I/O.
    #[error("MQTT sessions file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not what we wrote.
    #[error("MQTT sessions file {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The session file: a version and one record per persistent session.
#[derive(Serialize, Deserialize)]
struct SessionFile {
    version: u32,
    sessions: Vec<SessionRecord>,
}

#[derive(Serialize, Deserialize)]
struct SessionRecord {
    client_id: String,
    expiry_secs: u64,
    /// When the session went offline (or was last saved while online), Unix milliseconds.
    offline_since_ms: u64,
    subscriptions: Vec<SubRecord>,
    inbound_qos2: Vec<u16>,
    awaiting_pubcomp: Vec<u16>,
}

#[derive(Serialize, Deserialize)]
struct SubRecord {
    /// The full MQTT filter (with any `$share/` prefix).
    key: String,
    filter: String,
    share: Option<String>,
    qos: u8,
    no_local: bool,
    retain_as_published: bool,
    retain_handling: u8,
    granted: u8,
    id: Option<u32>,
    group: Option<String>,
}

impl SubRecord {
    fn new(key: &str, e: &SubEntry) -> Self {
        SubRecord {
            key: key.to_string(),
            filter: e.filter.clone(),
            share: e.share.clone(),
            qos: e.options.qos as u8,
            no_local: e.options.no_local,
            retain_as_published: e.options.retain_as_published,
            retain_handling: e.options.retain_handling as u8,
            granted: e.granted as u8,
            id: e.id,
            group: e.group.clone(),
        }
    }

    fn entry(self) -> Option<(String, SubEntry)> {
        let retain_handling = match self.retain_handling {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendAtSubscribeIfNew,
            2 => RetainHandling::DoNotSend,
            _ => return None,
        };
        let options = SubscriptionOptions {
            qos: QoS::from_bits(self.qos)?,
            no_local: self.no_local,
            retain_as_published: self.retain_as_published,
            retain_handling,
        };
        Some((
            self.key,
            SubEntry {
                filter: self.filter,
                share: self.share,
                options,
                granted: QoS::from_bits(self.granted)?,
                id: self.id,
                group: self.group,
            },
        ))
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

impl SessionRecord {
    fn new(client_id: &str, s: &StoredSession, offline_since: SystemTime) -> Self {
        let mut inbound_qos2: Vec<u16> = s.inbound_qos2.iter().copied().collect();
        inbound_qos2.sort_unstable();
        SessionRecord {
            client_id: client_id.to_string(),
            expiry_secs: s.expiry.as_secs(),
            offline_since_ms: unix_ms(offline_since),
            subscriptions: s
                .subscriptions
                .iter()
                .map(|(k, e)| SubRecord::new(k, e))
                .collect(),
            inbound_qos2,
            awaiting_pubcomp: s.awaiting_pubcomp.clone(),
        }
    }

    fn session(self) -> Option<StoredSession> {
        let mut subscriptions = BTreeMap::new();
        for r in self.subscriptions {
            let (k, e) = r.entry()?;
            subscriptions.insert(k, e);
        }
        Some(StoredSession {
            subscriptions,
            inbound_qos2: self.inbound_qos2.into_iter().collect(),
            awaiting_pubcomp: self.awaiting_pubcomp,
            expiry: Duration::from_secs(self.expiry_secs),
        })
    }
}

/// A connection's registration, returned by [`Sessions::connect`].
pub struct Registration {
    /// Cancelled when another connection takes the session over.
    pub kick: CancellationToken,
    /// Dropped when the connection is done with the session.
    pub done: oneshot::Sender<()>,
    /// The resumed session, if there was one and clean start was not asked.
    pub resumed: Option<StoredSession>,
}

impl Sessions {
    /// A registry kept in memory only.
    pub fn in_memory() -> Self {
        Sessions::default()
    }

    /// A registry persisted in `dir`, restoring the sessions saved there as offline sessions.
    /// Sessions whose expiry passed while the server was down are dropped and their consumer
    /// groups deleted from `broker`.
    pub fn open(dir: &Path, broker: &Broker) -> Result<Sessions, SessionStoreError> {
        let path = dir.join(SESSIONS_FILE);
        let mut slots = HashMap::new();
        let corrupt = |reason: String| SessionStoreError::Corrupt {
            path: path.clone(),
            reason,
        };
        match std::fs::read(&path) {
            Ok(bytes) => {
                let file: SessionFile =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
                if file.version != 1 {
                    return Err(corrupt(format!("unknown version {}", file.version)));
                }
                let now_wall = SystemTime::now();
                let now = Instant::now();
                for r in file.sessions {
                    let client = r.client_id.clone();
                    let offline_since = UNIX_EPOCH + Duration::from_millis(r.offline_since_ms);
                    let away = now_wall.duration_since(offline_since).unwrap_or_default();
                    let session = r
                        .session()
                        .ok_or_else(|| corrupt(format!("bad subscription of {client:?}")))?;
                    if away >= session.expiry {
                        tracing::info!(client, "session expired while the server was down");
                        delete_groups(broker, &session);
                        continue;
                    }
                    let since = now.checked_sub(away).unwrap_or(now);
                    slots.insert(client, Slot::Offline { session, since });
                }
                tracing::info!(sessions = slots.len(), "MQTT sessions restored");
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(SessionStoreError::Io { path, source: e }),
        }
        Ok(Sessions {
            slots: Mutex::new(slots),
            delayed_wills: Mutex::default(),
            path: Some(path),
            dirty: AtomicBool::new(false),
        })
    }

    fn changed(&self) {
        self.dirty.store(true, Ordering::Release);
    }

    /// Writes the session file if anything changed since the last save (no-op in memory).
    pub fn save(&self) -> Result<(), SessionStoreError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let now_wall = SystemTime::now();
        let now = Instant::now();
        let mut sessions: Vec<SessionRecord> = self
            .slots
            .lock()
            .iter()
            .filter_map(|(client, slot)| match slot {
                Slot::Online { persisted, .. } => persisted
                    .as_ref()
                    .map(|s| SessionRecord::new(client, s, now_wall)),
                Slot::Offline { session, since } => {
                    let at = now_wall
                        .checked_sub(now.duration_since(*since))
                        .unwrap_or(now_wall);
                    Some(SessionRecord::new(client, session, at))
                }
            })
            .collect();
        sessions.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        let file = SessionFile {
            version: 1,
            sessions,
        };
        let result = serde_json::to_vec_pretty(&file)
            .map_err(std::io::Error::other)
            .and_then(|json| crate::fsutil::write_atomic(path, &json));
        result.map_err(|e| {
            self.changed();
            SessionStoreError::Io {
                path: path.clone(),
                source: e,
            }
        })
    }

    /// Records the current state of connection `conn`'s persistent session (`None`: the
    /// session is not persistent), to be saved with the others.
    pub fn record(&self, client_id: &str, conn: u64, session: Option<StoredSession>) {
        if self.path.is_none() {
            return;
        }
        let mut slots = self.slots.lock();
        if let Some(Slot::Online {
            conn: c, persisted, ..
        }) = slots.get_mut(client_id)
        {
            if *c == conn {
                *persisted = session;
                self.changed();
            }
        }
    }

    /// Registers connection `conn` as `client_id`: takes over any live connection of that
    /// client (waiting up to `takeover_wait` for it to finish), cancels a pending delayed will,
    /// and resumes or discards the stored session.
    pub async fn connect(
        &self,
        broker: &Broker,
        client_id: &str,
        conn: u64,
        clean_start: bool,
        takeover_wait: Duration,
    ) -> Registration {
        if let Some(will) = self.delayed_wills.lock().remove(client_id) {
            will.abort();
        }
        // Kick the live connection, if any, and wait for it to store or drop its session.
        loop {
            let waiting = {
                let mut slots = self.slots.lock();
                match slots.get_mut(client_id) {
                    Some(Slot::Online { kick, done, .. }) => {
                        kick.cancel();
                        done.take()
                    }
                    _ => None,
                }
            };
            match waiting {
                Some(done) => {
                    let _ = tokio::time::timeout(takeover_wait, done).await;
                }
                None => break,
            }
            // The old connection may have timed out without unregistering: give up on it.
            let mut slots = self.slots.lock();
            if let Some(Slot::Online { done: None, .. }) = slots.get(client_id) {
                slots.remove(client_id);
            }
        }
        let (done_tx, done_rx) = oneshot::channel();
        let kick = CancellationToken::new();
        let previous = self.slots.lock().insert(
            client_id.to_string(),
            Slot::Online {
                conn,
                kick: kick.clone(),
                done: Some(done_rx),
                persisted: None,
            },
        );
        self.changed();
        let resumed = match previous {
            Some(Slot::Offline { session, .. }) => {
                if clean_start {
                    delete_groups(broker, &session);
                    None
                } else {
                    Some(session)
                }
            }
            _ => None,
        };
        Registration {
            kick,
            done: done_tx,
            resumed,
        }
    }

    /// The connection `conn` of `client_id` ended: keeps `session` if it is persistent (else
    /// deletes its groups). Does nothing to a slot another connection has taken since.
    pub fn disconnect(&self, client_id: &str, conn: u64, session: Option<StoredSession>) {
        self.changed();
        let mut slots = self.slots.lock();
        let ours = matches!(slots.get(client_id), Some(Slot::Online { conn: c, .. }) if *c == conn);
        match session {
            Some(session) if ours => {
                slots.insert(
                    client_id.to_string(),
                    Slot::Offline {
                        session,
                        since: Instant::now(),
                    },
                );
            }
            Some(session) => {
                // Taken over: the new connection resumed from our groups already (they are
                // shared by name), so only the slot bookkeeping is skipped.
                drop(session);
            }
            None => {
                if ours {
                    slots.remove(client_id);
                }
            }
        }
    }

    /// Remembers a delayed will so a reconnect can cancel it.
    pub fn add_delayed_will(&self, client_id: &str, handle: AbortHandle) {
        if let Some(old) = self
            .delayed_wills
            .lock()
            .insert(client_id.to_string(), handle)
        {
            old.abort();
        }
    }

    /// Forgets a delayed will that was published.
    pub fn will_published(&self, client_id: &str) {
        self.delayed_wills.lock().remove(client_id);
    }

    /// Ends offline sessions whose expiry passed or whose backlog exceeds `max_queued`
    /// messages, deleting their groups. Returns how many ended.
    pub fn expire(&self, broker: &Broker, max_queued: u64) -> usize {
        let now = Instant::now();
        let lags: HashMap<String, u64> = broker
            .subscription_stats()
            .into_iter()
            .filter(|s| s.group)
            .map(|s| (s.name, s.lag + s.in_flight))
            .collect();
        let mut ended = Vec::new();
        {
            let mut slots = self.slots.lock();
            slots.retain(|client, slot| {
                let Slot::Offline { session, since } = slot else {
                    return true;
                };
                if now.duration_since(*since) >= session.expiry {
                    tracing::info!(client, "session expired");
                    ended.push(std::mem::take(session));
                    return false;
                }
                let queued: u64 = session
                    .own_groups()
                    .map(|g| lags.get(g).copied().unwrap_or(0))
                    .sum();
                if queued > max_queued {
                    tracing::warn!(
                        client,
                        queued,
                        max_queued,
                        "offline session exceeded max_queued; session ended"
                    );
                    ended.push(std::mem::take(session));
                    return false;
                }
                true
            });
        }
        for s in &ended {
            delete_groups(broker, s);
        }
        if !ended.is_empty() {
            self.changed();
        }
        ended.len()
    }

    /// Number of connected clients and of offline sessions.
    pub fn counts(&self) -> (usize, usize) {
        let slots = self.slots.lock();
        let online = slots
            .values()
            .filter(|s| matches!(s, Slot::Online { .. }))
            .count();
        (online, slots.len() - online)
    }
}

/// Deletes a session's own consumer groups.
pub fn delete_groups(broker: &Broker, session: &StoredSession) {
    for g in session.own_groups() {
        broker.delete_group(g);
    }
}
