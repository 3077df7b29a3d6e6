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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

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
            },
        );
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
