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
//! With a data directory every persistent session, online or not, is a record of the MQTT
//! state store (see [`super::state_store`]; one stream per client id, one record per change,
//! a tombstone when the session ends): its subscriptions, QoS 2 identifiers, expiry interval
//! and when it went offline (or that it was online). A save round writes the records of the
//! sessions that changed since the last one and makes them durable: the SUBACK/UNSUBACK of a
//! persistent session waits for it (see `crate::persist`). At start the sessions are restored
//! offline, their expiry counted from when they went offline (for one that was online when the
//! server stopped, from the start), so a client reconnecting with clean start = false after a
//! restart resumes its session (session present) and receives, from the consumer groups the
//! durable engine kept, the messages published while it was away. A data directory with the
//! old whole-registry file (`mqtt-sessions.json`) is migrated when it opens (its sessions
//! written as records, made durable, the file renamed `mqtt-sessions.json.migrated`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_mqtt::RetainHandling;
use serde::{Deserialize, Serialize};

use ferry::Broker;
use ferry_mqtt::{QoS, SubscriptionOptions};
use futures::task::AtomicWaker;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use super::state_store::{tombstone, StateError, StateStore, SESSION_PREFIX};
use crate::unix_time::unix_ms;

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
    /// Outbound QoS 1/2 messages sent and not acknowledged when the connection ended: message
    /// id -> packet id, so that their resending reuses the identifier (MQTT-4.4.0-1) and a
    /// QoS 2 receiver recognises a message it already has.
    pub unacked: Vec<(String, u16)>,
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

/// Why the registry ended a live connection (see [`Control`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// The server shuts down.
    Shutdown,
    /// Another connection took the session over.
    TakenOver,
    /// No input within the keep-alive timeout.
    KeepAlive,
}

const SHUTDOWN: u8 = 1;
const TAKEN_OVER: u8 = 2;
const KEEP_ALIVE: u8 = 4;
const DONE: u8 = 8;
const KICKS: u8 = SHUTDOWN | TAKEN_OVER | KEEP_ALIVE;

/// Milliseconds since the first call (a process-wide monotonic clock for keep-alive stamps).
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Wakes the connections waiting for another to be done with its session (takeovers): one for
/// the process rather than one per connection, which keeps [`Control`] small. A takeover is
/// rare; each waiter re-checks its own connection's flag when woken.
static DONE_NOTIFY: Notify = Notify::const_new();

/// A live connection's control block, shared by its task and the registry: one small
/// allocation that carries takeover, shutdown and keep-alive expiry to the task (flags set by
/// the registry, then a wake), the time of the task's last input (checked by
/// [`Sessions::expire_keep_alive`] rather than by a timer per connection), and the end of the
/// task to a connection taking the session over (through [`DONE_NOTIFY`]).
pub struct Control {
    state: AtomicU8,
    /// Keep-alive timeout in milliseconds; 0: none.
    timeout_ms: u64,
    /// When the connection last received input, [`now_ms`].
    last_input: AtomicU64,
    /// The connection task, woken by a kick.
    waker: AtomicWaker,
}

impl Control {
    fn new(keep_alive: Option<Duration>) -> Self {
        Control {
            state: AtomicU8::new(0),
            timeout_ms: keep_alive.map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
            last_input: AtomicU64::new(now_ms()),
            waker: AtomicWaker::new(),
        }
    }

    /// Records input (the keep-alive timeout counts from the last one).
    pub fn touch(&self) {
        self.last_input.store(now_ms(), Ordering::Relaxed);
    }

    /// Whether (and why) the connection was kicked; registers the task to be woken if not.
    pub fn poll_kicked(&self, cx: &mut Context<'_>) -> Poll<Kick> {
        if let Some(k) = self.kicked() {
            return Poll::Ready(k);
        }
        self.waker.register(cx.waker());
        match self.kicked() {
            Some(k) => Poll::Ready(k),
            None => Poll::Pending,
        }
    }

    /// Why the connection was kicked, if it was (shutdown first, then takeover).
    pub fn kicked(&self) -> Option<Kick> {
        let s = self.state.load(Ordering::Acquire);
        if s & SHUTDOWN != 0 {
            Some(Kick::Shutdown)
        } else if s & TAKEN_OVER != 0 {
            Some(Kick::TakenOver)
        } else if s & KEEP_ALIVE != 0 {
            Some(Kick::KeepAlive)
        } else {
            None
        }
    }

    fn kick(&self, why: u8) {
        let before = self.state.fetch_or(why, Ordering::AcqRel);
        if before & KICKS == 0 {
            self.waker.wake();
        }
    }

    fn keep_alive_expired(&self, now: u64) -> bool {
        self.timeout_ms > 0
            && now.saturating_sub(self.last_input.load(Ordering::Relaxed)) >= self.timeout_ms
    }

    fn finish(&self) {
        self.state.fetch_or(DONE, Ordering::AcqRel);
        DONE_NOTIFY.notify_waiters();
    }

    /// Waits until the connection is done with its session (woken whenever any connection is
    /// done; the flag tells whether it was this one).
    async fn wait_done(&self) {
        loop {
            let notified = DONE_NOTIFY.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.state.load(Ordering::Acquire) & DONE != 0 {
                return;
            }
            notified.await;
        }
    }
}

enum Slot {
    Online {
        conn: u64,
        control: Arc<Control>,
        /// The session as last recorded by its connection (persistent sessions only), saved
        /// so that it survives a crash.
        persisted: Option<Box<StoredSession>>,
    },
    Offline {
        session: Box<StoredSession>,
        since: Instant,
    },
}

/// The session registry.
#[derive(Default)]
pub struct Sessions {
    slots: Mutex<HashMap<String, Slot>>,
    delayed_wills: Mutex<HashMap<String, AbortHandle>>,
    /// Where persistent sessions are saved (none in memory).
    state: Option<Arc<StateStore>>,
    /// Client ids whose slot changed since the last save round.
    dirty: Mutex<HashSet<String>>,
    /// Set (under the slots' lock) when the server shuts down: connections registered from
    /// then on are kicked at once.
    shut: AtomicBool,
}

/// The old session file's name in the data directory (migrated on open).
pub const SESSIONS_FILE: &str = "mqtt-sessions.json";

/// Errors reading or writing persistent sessions.
pub type SessionStoreError = StateError;

/// A session as stored: an entry of the old file, the payload (JSON) of a record now.
#[derive(Serialize, Deserialize)]
struct SessionRecord {
    client_id: String,
    expiry_secs: u64,
    /// When the session went offline (or was last saved while online), Unix milliseconds.
    offline_since_ms: u64,
    /// The client was connected when the record was written: after a restart its expiry
    /// counts from the start (the crash ended its connection at a time nobody recorded).
    #[serde(default)]
    online: bool,
    subscriptions: Vec<SubRecord>,
    inbound_qos2: Vec<u16>,
    awaiting_pubcomp: Vec<u16>,
    #[serde(default)]
    unacked: Vec<(String, u16)>,
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

impl SessionRecord {
    fn new(client_id: &str, s: &StoredSession, offline_since: SystemTime) -> Self {
        let mut inbound_qos2: Vec<u16> = s.inbound_qos2.iter().copied().collect();
        inbound_qos2.sort_unstable();
        SessionRecord {
            client_id: client_id.to_string(),
            expiry_secs: s.expiry.as_secs(),
            offline_since_ms: unix_ms(offline_since),
            online: false,
            subscriptions: s
                .subscriptions
                .iter()
                .map(|(k, e)| SubRecord::new(k, e))
                .collect(),
            inbound_qos2,
            awaiting_pubcomp: s.awaiting_pubcomp.clone(),
            unacked: s.unacked.clone(),
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
            unacked: self.unacked,
            expiry: Duration::from_secs(self.expiry_secs),
        })
    }
}

/// A connection's registration, returned by [`Sessions::connect`].
pub struct Registration {
    /// Kicks (takeover, shutdown, keep-alive expiry) and input stamps.
    pub control: Registered,
    /// The resumed session, if there was one and clean start was not asked.
    pub resumed: Option<Box<StoredSession>>,
}

/// A live connection's hold on its [`Control`]. Dropping it tells a connection taking the
/// session over that this one is done with it.
pub struct Registered(Arc<Control>);

impl Registered {
    /// The control block, shared.
    pub fn shared(&self) -> Arc<Control> {
        self.0.clone()
    }
}

impl std::ops::Deref for Registered {
    type Target = Control;

    fn deref(&self) -> &Control {
        &self.0
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.0.finish();
    }
}

impl Sessions {
    /// A registry kept in memory only.
    pub fn in_memory() -> Self {
        Sessions::default()
    }

    /// A registry saved in `state`, restoring the sessions saved there as offline sessions
    /// (first migrating the old JSON file of `data_dir`, if there is one). Sessions whose
    /// expiry passed while the server was down are dropped and their consumer groups deleted
    /// from `broker`. Blocking.
    pub fn open(
        state: Arc<StateStore>,
        data_dir: &Path,
        broker: &Broker,
    ) -> Result<Sessions, SessionStoreError> {
        migrate(&state, &data_dir.join(SESSIONS_FILE))?;
        let corrupt = |stream: &str, reason: String| StateError::Corrupt {
            dir: state.dir().to_path_buf(),
            stream: stream.to_string(),
            reason,
        };
        let mut slots = HashMap::new();
        let mut dirty = HashSet::new();
        let now_wall = SystemTime::now();
        let now = Instant::now();
        for (client, record) in state.values(SESSION_PREFIX)? {
            let name = format!("{SESSION_PREFIX}{client}");
            let r: SessionRecord = serde_json::from_slice(&record.payload)
                .map_err(|e| corrupt(&name, e.to_string()))?;
            let away = if r.online {
                Duration::ZERO
            } else {
                let offline_since = UNIX_EPOCH + Duration::from_millis(r.offline_since_ms);
                now_wall.duration_since(offline_since).unwrap_or_default()
            };
            let session = r
                .session()
                .ok_or_else(|| corrupt(&name, "bad subscription".into()))?;
            if away >= session.expiry {
                tracing::debug!(client, "session expired while the server was down");
                delete_groups(broker, &session);
                dirty.insert(client);
                continue;
            }
            let since = now.checked_sub(away).unwrap_or(now);
            slots.insert(
                client,
                Slot::Offline {
                    session: Box::new(session),
                    since,
                },
            );
        }
        tracing::info!(sessions = slots.len(), "MQTT sessions restored");
        Ok(Sessions {
            slots: Mutex::new(slots),
            delayed_wills: Mutex::default(),
            state: Some(state),
            dirty: Mutex::new(dirty),
            shut: AtomicBool::new(false),
        })
    }

    fn changed(&self, client_id: &str) {
        if self.state.is_some() {
            self.dirty.lock().insert(client_id.to_string());
        }
    }

    /// The record of `client_id`'s session as it stands (a tombstone when it has none to
    /// keep).
    fn record_of(&self, client_id: &str) -> Result<ferry_log::RecordIn, std::io::Error> {
        let now_wall = SystemTime::now();
        let now = Instant::now();
        let record = match self.slots.lock().get(client_id) {
            Some(Slot::Online {
                persisted: Some(s), ..
            }) => {
                let mut r = SessionRecord::new(client_id, s, now_wall);
                r.online = true;
                Some(r)
            }
            Some(Slot::Offline { session, since }) => {
                let at = now_wall
                    .checked_sub(now.duration_since(*since))
                    .unwrap_or(now_wall);
                Some(SessionRecord::new(client_id, session, at))
            }
            _ => None,
        };
        match record {
            Some(r) => Ok(ferry_log::RecordIn::new(
                serde_json::to_vec(&r).map_err(std::io::Error::other)?,
            )),
            None => Ok(tombstone()),
        }
    }

    /// Writes a record for each session changed since the last save and makes them durable
    /// (no-op in memory). Blocking. On failure the changes stay to be saved by the next round.
    pub fn save(&self) -> Result<(), SessionStoreError> {
        let Some(state) = &self.state else {
            return Ok(());
        };
        state.round(|| {
            let taken: Vec<String> = self.dirty.lock().drain().collect();
            if taken.is_empty() {
                return Ok(());
            }
            let written = (|| {
                for client in &taken {
                    let name = format!("{SESSION_PREFIX}{client}");
                    let record = self.record_of(client).map_err(|e| StateError::Corrupt {
                        dir: state.dir().to_path_buf(),
                        stream: name.clone(),
                        reason: e.to_string(),
                    })?;
                    state.put(&name, record)?;
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

    /// Records the current state of connection `conn`'s persistent session (`None`: the
    /// session is not persistent), to be saved with the others.
    pub fn record(&self, client_id: &str, conn: u64, session: Option<StoredSession>) {
        if self.state.is_none() {
            return;
        }
        let mut slots = self.slots.lock();
        if let Some(Slot::Online {
            conn: c, persisted, ..
        }) = slots.get_mut(client_id)
        {
            if *c == conn {
                *persisted = session.map(Box::new);
                self.changed(client_id);
            }
        }
    }

    /// Registers connection `conn` as `client_id`: takes over any live connection of that
    /// client (waiting up to `takeover_wait` for it to finish), cancels a pending delayed will,
    /// and resumes or discards the stored session. `keep_alive`: the connection's keep-alive
    /// timeout (see [`Sessions::expire_keep_alive`]).
    pub async fn connect(
        &self,
        broker: &Broker,
        client_id: &str,
        conn: u64,
        clean_start: bool,
        takeover_wait: Duration,
        keep_alive: Option<Duration>,
    ) -> Registration {
        if let Some(will) = self.delayed_wills.lock().remove(client_id) {
            will.abort();
        }
        // Kick the live connection, if any, and wait for it to store or drop its session.
        loop {
            let live = match self.slots.lock().get(client_id) {
                Some(Slot::Online { control, .. }) => {
                    control.kick(TAKEN_OVER);
                    Some(control.clone())
                }
                _ => None,
            };
            let Some(live) = live else { break };
            let _ = tokio::time::timeout(takeover_wait, live.wait_done()).await;
            // The old connection may have timed out without unregistering: give up on it.
            let mut slots = self.slots.lock();
            if let Some(Slot::Online { control, .. }) = slots.get(client_id) {
                if Arc::ptr_eq(control, &live) {
                    slots.remove(client_id);
                }
            }
        }
        let control = Arc::new(Control::new(keep_alive));
        let previous = {
            let mut slots = self.slots.lock();
            if self.shut.load(Ordering::Acquire) {
                control.kick(SHUTDOWN);
            }
            slots.insert(
                client_id.to_string(),
                Slot::Online {
                    conn,
                    control: control.clone(),
                    persisted: None,
                },
            )
        };
        self.changed(client_id);
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
            control: Registered(control),
            resumed,
        }
    }

    /// Kicks every live connection (and those registering from now on) for the server's
    /// shutdown.
    pub fn shutdown(&self) {
        let slots = self.slots.lock();
        self.shut.store(true, Ordering::Release);
        for slot in slots.values() {
            if let Slot::Online { control, .. } = slot {
                control.kick(SHUTDOWN);
            }
        }
    }

    /// Kicks the live connections that received nothing within their keep-alive timeout.
    /// Called about once a second: a connection ends up to a second after its timeout, without
    /// a timer of its own. Returns how many were kicked.
    pub fn expire_keep_alive(&self) -> usize {
        let now = now_ms();
        let slots = self.slots.lock();
        let mut kicked = 0;
        for slot in slots.values() {
            if let Slot::Online { control, .. } = slot {
                if control.keep_alive_expired(now) && control.kicked().is_none() {
                    control.kick(KEEP_ALIVE);
                    kicked += 1;
                }
            }
        }
        kicked
    }

    /// The connection `conn` of `client_id` ended: keeps `session` if it is persistent (else
    /// deletes its groups). Does nothing to a slot another connection has taken since.
    pub fn disconnect(&self, client_id: &str, conn: u64, session: Option<StoredSession>) {
        self.changed(client_id);
        let mut slots = self.slots.lock();
        let ours = matches!(slots.get(client_id), Some(Slot::Online { conn: c, .. }) if *c == conn);
        match session {
            Some(session) if ours => {
                slots.insert(
                    client_id.to_string(),
                    Slot::Offline {
                        session: Box::new(session),
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
                    tracing::debug!(client, "session expired");
                    ended.push((client.clone(), std::mem::take(session)));
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
                    ended.push((client.clone(), std::mem::take(session)));
                    return false;
                }
                true
            });
        }
        for (client, s) in &ended {
            delete_groups(broker, s);
            self.changed(client);
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

/// The session file of the old format.
#[derive(Deserialize)]
struct SessionFile {
    version: u32,
    sessions: Vec<SessionRecord>,
}

/// Imports the old JSON file at `path` into `state` (if it exists), then renames it.
fn migrate(state: &StateStore, path: &Path) -> Result<(), StateError> {
    let migration = |reason: String| StateError::Migration {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(migration(e.to_string())),
    };
    let file: SessionFile = serde_json::from_slice(&bytes).map_err(|e| migration(e.to_string()))?;
    if file.version != 1 {
        return Err(migration(format!("unknown version {}", file.version)));
    }
    let count = file.sessions.len();
    state.round(|| {
        for r in &file.sessions {
            let payload = serde_json::to_vec(r).map_err(|e| migration(e.to_string()))?;
            state.put(
                &format!("{SESSION_PREFIX}{}", r.client_id),
                ferry_log::RecordIn::new(payload),
            )?;
        }
        state.retire_legacy(path)
    })?;
    tracing::info!(
        sessions = count,
        file = %path.display(),
        "MQTT sessions migrated to the MQTT state store"
    );
    Ok(())
}

/// Deletes a session's own consumer groups.
pub fn delete_groups(broker: &Broker, session: &StoredSession) {
    for g in session.own_groups() {
        broker.delete_group(g);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn broker() -> Broker {
        Broker::default()
    }

    fn kicked(c: &Control) -> Option<Kick> {
        let waker = futures::task::noop_waker();
        match c.poll_kicked(&mut Context::from_waker(&waker)) {
            Poll::Ready(k) => Some(k),
            Poll::Pending => None,
        }
    }

    fn entry(filter: &str) -> SubEntry {
        SubEntry {
            filter: filter.to_string(),
            share: None,
            options: SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: false,
                retain_as_published: false,
                retain_handling: RetainHandling::SendAtSubscribe,
            },
            granted: QoS::AtLeastOnce,
            id: None,
            group: Some(session_group("c", filter)),
        }
    }

    fn persistent(filters: &[&str]) -> StoredSession {
        StoredSession {
            subscriptions: filters.iter().map(|f| (f.to_string(), entry(f))).collect(),
            expiry: Duration::from_secs(3600),
            ..StoredSession::default()
        }
    }

    fn open(dir: &Path, b: &Broker) -> Sessions {
        Sessions::open(Arc::new(StateStore::open(dir).unwrap()), dir, b).unwrap()
    }

    fn offline_filters(sessions: &Sessions, client: &str) -> Option<Vec<String>> {
        match sessions.slots.lock().get(client) {
            Some(Slot::Offline { session, .. }) => {
                Some(session.subscriptions.keys().cloned().collect())
            }
            _ => None,
        }
    }

    #[tokio::test]
    async fn sessions_are_saved_as_records_and_restored_offline() {
        let dir = tempfile::tempdir().unwrap();
        let b = broker();
        {
            let sessions = open(dir.path(), &b);
            let a = sessions
                .connect(&b, "online", 1, false, Duration::from_secs(5), None)
                .await;
            sessions.record("online", 1, Some(persistent(&["x/#", "y"])));
            let _c = sessions
                .connect(&b, "gone", 2, false, Duration::from_secs(5), None)
                .await;
            sessions.record("gone", 2, Some(persistent(&["z"])));
            sessions.save().unwrap();
            // Unsubscribed from one, then the other ends its session.
            sessions.record("online", 1, Some(persistent(&["x/#"])));
            sessions.disconnect("gone", 2, None);
            sessions.save().unwrap();
            drop(a);
        }
        let sessions = open(dir.path(), &b);
        assert_eq!(
            offline_filters(&sessions, "online"),
            Some(vec!["x/#".into()])
        );
        assert_eq!(offline_filters(&sessions, "gone"), None);
        assert_eq!(sessions.counts(), (0, 1));
    }

    #[tokio::test]
    async fn the_old_json_file_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let now = unix_ms(SystemTime::now());
        // Written in the old format.
        let old = format!(
            r#"{{"version":1,"sessions":[
            {{"client_id":"kept","expiry_secs":3600,"offline_since_ms":{now},
              "subscriptions":[{{"key":"a/#","filter":"a/#","share":null,"qos":1,"no_local":false,
                "retain_as_published":false,"retain_handling":0,"granted":1,"id":null,
                "group":"mqtt/session/kept/a/#"}}],
              "inbound_qos2":[7],"awaiting_pubcomp":[]}},
            {{"client_id":"expired","expiry_secs":1,"offline_since_ms":1000,
              "subscriptions":[],"inbound_qos2":[],"awaiting_pubcomp":[]}}
            ]}}"#
        );
        std::fs::write(dir.path().join(SESSIONS_FILE), old).unwrap();
        let b = broker();
        let sessions = open(dir.path(), &b);
        assert_eq!(offline_filters(&sessions, "kept"), Some(vec!["a/#".into()]));
        assert_eq!(sessions.counts(), (0, 1));
        assert!(!dir.path().join(SESSIONS_FILE).exists());
        assert!(dir.path().join("mqtt-sessions.json.migrated").exists());
        sessions.save().unwrap();
        drop(sessions);
        let sessions = open(dir.path(), &b);
        assert_eq!(offline_filters(&sessions, "kept"), Some(vec!["a/#".into()]));
        let qos2 = match sessions.slots.lock().get("kept") {
            Some(Slot::Offline { session, .. }) => session.inbound_qos2.contains(&7),
            _ => false,
        };
        assert!(qos2);
    }

    #[tokio::test]
    async fn takeover_kicks_the_live_connection_and_waits_for_it() {
        let sessions = Arc::new(Sessions::in_memory());
        let b = broker();
        let old = sessions
            .connect(&b, "c", 1, true, Duration::from_secs(5), None)
            .await;
        assert_eq!(kicked(&old.control), None);
        let (s2, b2) = (sessions.clone(), b.clone());
        let new = tokio::spawn(async move {
            s2.connect(&b2, "c", 2, true, Duration::from_secs(5), None)
                .await
        });
        // The old connection sees the kick, then ends (its registration dropped).
        let control = old.control.shared();
        std::future::poll_fn(|cx| {
            control
                .poll_kicked(cx)
                .map(|k| assert_eq!(k, Kick::TakenOver))
        })
        .await;
        assert!(!new.is_finished());
        sessions.disconnect("c", 1, None);
        drop(old);
        let new = tokio::time::timeout(Duration::from_secs(2), new)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(kicked(&new.control), None);
        assert_eq!(sessions.counts(), (1, 0));
    }

    #[tokio::test]
    async fn shutdown_kicks_live_and_later_connections() {
        let sessions = Sessions::in_memory();
        let b = broker();
        let a = sessions
            .connect(&b, "a", 1, true, Duration::from_secs(5), None)
            .await;
        sessions.shutdown();
        assert_eq!(kicked(&a.control), Some(Kick::Shutdown));
        let later = sessions
            .connect(&b, "b", 2, true, Duration::from_secs(5), None)
            .await;
        assert_eq!(kicked(&later.control), Some(Kick::Shutdown));
    }

    #[tokio::test]
    async fn keep_alive_expiry_kicks_silent_connections_only() {
        let sessions = Sessions::in_memory();
        let b = broker();
        let silent = sessions
            .connect(
                &b,
                "s",
                1,
                true,
                Duration::from_secs(5),
                Some(Duration::from_millis(50)),
            )
            .await;
        let talking = sessions
            .connect(
                &b,
                "t",
                2,
                true,
                Duration::from_secs(5),
                Some(Duration::from_millis(50)),
            )
            .await;
        let forever = sessions
            .connect(&b, "f", 3, true, Duration::from_secs(5), None)
            .await;
        assert_eq!(sessions.expire_keep_alive(), 0);
        tokio::time::sleep(Duration::from_millis(60)).await;
        talking.control.touch();
        assert_eq!(sessions.expire_keep_alive(), 1);
        assert_eq!(kicked(&silent.control), Some(Kick::KeepAlive));
        assert_eq!(kicked(&talking.control), None);
        assert_eq!(kicked(&forever.control), None);
        // Kicked once.
        assert_eq!(sessions.expire_keep_alive(), 0);
    }
}
