//! The protocol state of one MQTT connection, without I/O: what CONNECT negotiates, packet
//! identifiers, the outbound in-flight window (QoS 1 and 2), the inbound QoS 2 table, inbound
//! topic aliases and the keep-alive deadline. The connection task drives these from packets and
//! deliveries; every rule here is unit-tested on its own.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Duration;

use ferry_mqtt::{Connect, ProtocolVersion, QoS, ReasonCode};

use crate::config::MqttConfig;

/// What the server agreed to for a connection (from CONNECT and the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The client identifier (assigned when the client sent none).
    pub client_id: String,
    /// Whether the server assigned it.
    pub assigned_id: bool,
    /// Keep alive in seconds (0: none).
    pub keep_alive: u16,
    /// Whether the server changed the keep alive (told to v5 clients as Server Keep Alive).
    pub keep_alive_changed: bool,
    /// Session expiry: `None` ends the session with the connection.
    pub session_expiry: Option<Duration>,
    /// The session expiry the client asked for, when the server lowered it (v5 CONNACK).
    pub session_expiry_capped: Option<u32>,
    /// Outbound QoS>0 messages in flight at once: min(client's receive maximum, config).
    pub outbound_window: u16,
    /// The largest packet the client accepts.
    pub client_max_packet: usize,
    /// Whether reason strings may go on acknowledgements (MQTT 5 Request Problem Information,
    /// 1 unless the client said 0).
    pub problem_information: bool,
}

/// Applies the connection rules of CONNECT; `Err` is the CONNACK reason code to refuse with.
pub fn negotiate(connect: &Connect, config: &MqttConfig) -> Result<Negotiated, ReasonCode> {
    let v5 = connect.protocol_version == ProtocolVersion::V5;
    let (client_id, assigned_id) = if connect.client_id.is_empty() {
        if !v5 && !connect.clean_start {
            // MQTT 3.1.1 3.1.3-8: an empty id needs clean session.
            return Err(ReasonCode::ClientIdentifierNotValid);
        }
        (format!("ferry-{:016x}", fastrand::u64(..)), true)
    } else {
        (connect.client_id.clone(), false)
    };
    let cap = config.max_keep_alive_secs;
    let (keep_alive, keep_alive_changed) =
        if cap > 0 && (connect.keep_alive == 0 || connect.keep_alive > cap) {
            (cap, true)
        } else {
            (connect.keep_alive, false)
        };
    let max_expiry = config.max_session_expiry_secs;
    let (session_expiry, session_expiry_capped) = if v5 {
        match connect.properties.session_expiry_interval.unwrap_or(0) {
            0 => (None, None),
            asked => {
                let granted = asked.min(max_expiry);
                let capped = (granted != asked).then_some(granted);
                if granted == 0 {
                    (None, capped)
                } else {
                    (Some(Duration::from_secs(u64::from(granted))), capped)
                }
            }
        }
    } else if connect.clean_start || max_expiry == 0 {
        (None, None)
    } else {
        (Some(Duration::from_secs(u64::from(max_expiry))), None)
    };
    let outbound_window = connect
        .properties
        .receive_maximum
        .unwrap_or(u16::MAX)
        .min(config.max_inflight)
        .max(1);
    let client_max_packet = connect
        .properties
        .maximum_packet_size
        .map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX));
    Ok(Negotiated {
        client_id,
        assigned_id,
        keep_alive,
        keep_alive_changed,
        session_expiry,
        session_expiry_capped,
        outbound_window,
        client_max_packet,
        problem_information: connect.properties.request_problem_information != Some(false),
    })
}

/// The keep-alive timeout: 1.5 times the keep alive, none for 0.
pub fn keep_alive_timeout(keep_alive: u16) -> Option<Duration> {
    (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500))
}

/// Where an outbound QoS>0 message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutStage {
    /// QoS 1, waiting for PUBACK.
    AwaitPubAck,
    /// QoS 2, waiting for PUBREC.
    AwaitPubRec,
    /// QoS 2, PUBREL sent, waiting for PUBCOMP.
    AwaitPubComp,
}

/// Why an acknowledgement from the client does not fit the in-flight table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMismatch {
    /// No message is in flight under that packet identifier.
    Unknown,
    /// The packet does not fit the message's stage (e.g. PUBACK for a QoS 2 message).
    WrongStage,
}

/// The hasher of packet-id tables: a multiplication (packet ids are not chosen by an
/// attacker who could flood one bucket: the server assigns them), and no per-table random
/// state, which keeps a connection's state smaller.
pub type IdHash = BuildHasherDefault<PacketIdHasher>;

/// See [`IdHash`].
#[derive(Debug, Default)]
pub struct PacketIdHasher(u64);

impl Hasher for PacketIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Outbound QoS 1/2 messages in flight, keyed by packet identifier, each with a handle `T`
/// (the engine delivery to settle).
#[derive(Debug)]
pub struct Outbound<T> {
    entries: HashMap<u16, (OutStage, Option<T>), IdHash>,
    /// Identifiers kept for messages to be resent (not given to new messages).
    reserved: HashSet<u16, IdHash>,
    window: usize,
    next_id: u16,
}

impl<T> Outbound<T> {
    /// An empty table allowing `window` messages in flight.
    pub fn new(window: u16) -> Self {
        Outbound {
            entries: HashMap::default(),
            reserved: HashSet::default(),
            window: usize::from(window.max(1)),
            next_id: 1,
        }
    }

    /// Messages in flight (PUBREL stages included).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether another message may be sent.
    pub fn has_room(&self) -> bool {
        self.entries.len() < self.window
    }

    fn allocate(&mut self) -> Option<u16> {
        if self.entries.len() >= usize::from(u16::MAX) {
            return None;
        }
        if self.entries.len() + self.reserved.len() >= usize::from(u16::MAX) {
            self.reserved.clear();
        }
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            if !self.entries.contains_key(&id) && !self.reserved.contains(&id) {
                return Some(id);
            }
        }
    }

    /// Keeps `ids` for messages that will be resent with them ([`start_as`](Self::start_as)).
    pub fn reserve(&mut self, ids: impl IntoIterator<Item = u16>) {
        self.reserved.extend(ids);
    }

    /// Starts a QoS 1 or 2 message; returns its packet identifier (`None` at QoS 0 or when
    /// every identifier is taken).
    pub fn start(&mut self, qos: QoS, handle: T) -> Option<u16> {
        self.start_as(qos, handle, None)
    }

    /// Like [`start`](Self::start), with identifier `preferred` if it is free (a message
    /// resent after a reconnect keeps its identifier).
    pub fn start_as(&mut self, qos: QoS, handle: T, preferred: Option<u16>) -> Option<u16> {
        let stage = match qos {
            QoS::AtMostOnce => return None,
            QoS::AtLeastOnce => OutStage::AwaitPubAck,
            QoS::ExactlyOnce => OutStage::AwaitPubRec,
        };
        let id = match preferred {
            Some(p) if p != 0 && !self.entries.contains_key(&p) => {
                self.reserved.remove(&p);
                p
            }
            _ => self.allocate()?,
        };
        self.entries.insert(id, (stage, Some(handle)));
        Some(id)
    }

    /// PUBACK: the QoS 1 message is done; its handle is returned to be settled.
    pub fn on_puback(&mut self, id: u16) -> Result<Option<T>, AckMismatch> {
        match self.entries.get(&id) {
            None => Err(AckMismatch::Unknown),
            Some((OutStage::AwaitPubAck, _)) => Ok(self.entries.remove(&id).and_then(|(_, h)| h)),
            Some(_) => Err(AckMismatch::WrongStage),
        }
    }

    /// PUBREC: the client has the QoS 2 message (its handle is returned to be settled). With a
    /// success code, the server answers PUBREL and waits for PUBCOMP; with an error code the
    /// exchange ends here. Returns `(handle, send_pubrel)`; a PUBREC repeated while waiting for
    /// PUBCOMP is answered with PUBREL again.
    pub fn on_pubrec(
        &mut self,
        id: u16,
        reason: ReasonCode,
    ) -> Result<(Option<T>, bool), AckMismatch> {
        match self.entries.get_mut(&id) {
            None => Err(AckMismatch::Unknown),
            Some((OutStage::AwaitPubRec, handle)) => {
                let handle = handle.take();
                if reason.is_error() {
                    self.entries.remove(&id);
                    Ok((handle, false))
                } else {
                    if let Some(e) = self.entries.get_mut(&id) {
                        e.0 = OutStage::AwaitPubComp;
                    }
                    Ok((handle, true))
                }
            }
            Some((OutStage::AwaitPubComp, _)) => Ok((None, true)),
            Some(_) => Err(AckMismatch::WrongStage),
        }
    }

    /// PUBCOMP: the QoS 2 exchange is complete.
    pub fn on_pubcomp(&mut self, id: u16) -> Result<(), AckMismatch> {
        match self.entries.get(&id) {
            None => Err(AckMismatch::Unknown),
            Some((OutStage::AwaitPubComp, _)) => {
                self.entries.remove(&id);
                Ok(())
            }
            Some(_) => Err(AckMismatch::WrongStage),
        }
    }

    /// Identifiers waiting for PUBCOMP (kept with a persistent session, PUBREL is resent on
    /// reconnect).
    pub fn awaiting_pubcomp(&self) -> Vec<u16> {
        let mut ids: Vec<u16> = self
            .entries
            .iter()
            .filter(|(_, (s, _))| *s == OutStage::AwaitPubComp)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Restores identifiers waiting for PUBCOMP from a resumed session.
    pub fn restore_pubcomp(&mut self, ids: &[u16]) {
        for &id in ids {
            self.entries.insert(id, (OutStage::AwaitPubComp, None));
        }
    }

    /// `(key(handle), id)` of every message sent and not yet acknowledged (PUBACK or PUBREC).
    pub fn unacked<K>(&self, key: impl Fn(&T) -> K) -> Vec<(K, u16)> {
        self.entries
            .iter()
            .filter(|(_, (s, _))| matches!(s, OutStage::AwaitPubAck | OutStage::AwaitPubRec))
            .filter_map(|(id, (_, h))| h.as_ref().map(|h| (key(h), *id)))
            .collect()
    }

    /// Takes every handle (the connection ends; the engine redelivers them later).
    pub fn drain_handles(&mut self) -> Vec<T> {
        self.entries
            .values_mut()
            .filter_map(|(_, h)| h.take())
            .collect()
    }
}

/// What to do with an inbound QoS 2 PUBLISH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos2Inbound {
    /// New: publish it, then answer PUBREC.
    Publish,
    /// Already received (a retransmission): answer PUBREC only.
    Duplicate,
    /// More unreleased QoS 2 messages than the receive maximum.
    ReceiveMaximumExceeded,
}

/// Inbound QoS 2 messages received but not yet released (PUBREL).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InboundQos2 {
    ids: HashSet<u16>,
    max: usize,
}

impl InboundQos2 {
    /// A table allowing `max` unreleased messages.
    pub fn new(max: u16, ids: HashSet<u16>) -> Self {
        InboundQos2 {
            ids,
            max: usize::from(max.max(1)),
        }
    }

    /// A QoS 2 PUBLISH with this identifier arrived.
    pub fn on_publish(&mut self, id: u16) -> Qos2Inbound {
        if self.ids.contains(&id) {
            Qos2Inbound::Duplicate
        } else if self.ids.len() >= self.max {
            Qos2Inbound::ReceiveMaximumExceeded
        } else {
            self.ids.insert(id);
            Qos2Inbound::Publish
        }
    }

    /// PUBREL: returns whether the identifier was known.
    pub fn on_pubrel(&mut self, id: u16) -> bool {
        self.ids.remove(&id)
    }

    /// The identifiers (kept with a persistent session).
    pub fn ids(&self) -> &HashSet<u16> {
        &self.ids
    }
}

/// Inbound topic aliases (MQTT 5).
#[derive(Debug, Clone, Default)]
pub struct TopicAliases {
    max: u16,
    map: HashMap<u16, String>,
}

impl TopicAliases {
    /// Aliases 1..=max are accepted.
    pub fn new(max: u16) -> Self {
        TopicAliases {
            max,
            map: HashMap::new(),
        }
    }

    /// The topic of a PUBLISH with `topic` and an optional alias. `Err` is the DISCONNECT
    /// reason: an alias out of range is Topic Alias invalid, an unknown alias with an empty
    /// topic a Protocol Error.
    pub fn resolve(&mut self, topic: &str, alias: Option<u16>) -> Result<String, ReasonCode> {
        let Some(alias) = alias else {
            return Ok(topic.to_string());
        };
        if alias == 0 || alias > self.max {
            return Err(ReasonCode::TopicAliasInvalid);
        }
        if topic.is_empty() {
            self.map
                .get(&alias)
                .cloned()
                .ok_or(ReasonCode::ProtocolError)
        } else {
            self.map.insert(alias, topic.to_string());
            Ok(topic.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config() -> MqttConfig {
        MqttConfig {
            max_inflight: 10,
            max_session_expiry_secs: 100,
            ..MqttConfig::default()
        }
    }

    #[test]
    fn negotiation() {
        let mut c = Connect::new(ProtocolVersion::V5, "");
        c.properties.session_expiry_interval = Some(1000);
        c.properties.receive_maximum = Some(5);
        let n = negotiate(&c, &config()).unwrap();
        assert!(n.assigned_id && n.client_id.starts_with("ferry-"));
        assert_eq!(n.session_expiry, Some(Duration::from_secs(100)));
        assert_eq!(n.session_expiry_capped, Some(100));
        assert_eq!(n.outbound_window, 5);

        let mut c = Connect::new(ProtocolVersion::V311, "");
        c.clean_start = false;
        assert_eq!(
            negotiate(&c, &config()),
            Err(ReasonCode::ClientIdentifierNotValid)
        );
        c.client_id = "x".into();
        let n = negotiate(&c, &config()).unwrap();
        assert_eq!(n.session_expiry, Some(Duration::from_secs(100)));
        assert_eq!(n.outbound_window, 10);
    }

    #[test]
    fn keep_alive_cap() {
        let mut cfg = config();
        cfg.max_keep_alive_secs = 30;
        let mut c = Connect::new(ProtocolVersion::V5, "a");
        c.keep_alive = 0;
        let n = negotiate(&c, &cfg).unwrap();
        assert_eq!((n.keep_alive, n.keep_alive_changed), (30, true));
        assert_eq!(keep_alive_timeout(10), Some(Duration::from_secs(15)));
        assert_eq!(keep_alive_timeout(0), None);
    }

    #[test]
    fn qos1_and_qos2_flows() {
        let mut out = Outbound::new(2);
        let a = out.start(QoS::AtLeastOnce, "a").unwrap();
        let b = out.start(QoS::ExactlyOnce, "b").unwrap();
        assert!(!out.has_room());
        assert_eq!(out.on_puback(b), Err(AckMismatch::WrongStage));
        assert_eq!(out.on_puback(a), Ok(Some("a")));
        assert_eq!(out.on_puback(a), Err(AckMismatch::Unknown));
        assert_eq!(out.on_pubrec(b, ReasonCode::Success), Ok((Some("b"), true)));
        // A repeated PUBREC gets PUBREL again, nothing to settle.
        assert_eq!(out.on_pubrec(b, ReasonCode::Success), Ok((None, true)));
        assert_eq!(out.awaiting_pubcomp(), vec![b]);
        assert_eq!(out.len(), 1);
        assert_eq!(out.on_pubcomp(b), Ok(()));
        assert!(out.is_empty());
        // PUBREC with an error ends the exchange.
        let c = out.start(QoS::ExactlyOnce, "c").unwrap();
        assert_eq!(
            out.on_pubrec(c, ReasonCode::UnspecifiedError),
            Ok((Some("c"), false))
        );
        assert!(out.is_empty());
        assert_eq!(out.start(QoS::AtMostOnce, "d"), None);
    }

    #[test]
    fn packet_ids_wrap_and_skip_used() {
        let mut out = Outbound::new(u16::MAX);
        out.next_id = u16::MAX;
        let a = out.start(QoS::AtLeastOnce, ()).unwrap();
        let b = out.start(QoS::AtLeastOnce, ()).unwrap();
        assert_eq!((a, b), (u16::MAX, 1));
        out.next_id = 1;
        assert_eq!(out.start(QoS::AtLeastOnce, ()), Some(2));
    }

    #[test]
    fn inbound_qos2_is_exactly_once() {
        let mut q = InboundQos2::new(2, HashSet::new());
        assert_eq!(q.on_publish(7), Qos2Inbound::Publish);
        assert_eq!(q.on_publish(7), Qos2Inbound::Duplicate);
        assert_eq!(q.on_publish(8), Qos2Inbound::Publish);
        assert_eq!(q.on_publish(9), Qos2Inbound::ReceiveMaximumExceeded);
        assert!(q.on_pubrel(7));
        assert!(!q.on_pubrel(7));
        assert_eq!(q.on_publish(7), Qos2Inbound::Publish);
    }

    #[test]
    fn topic_aliases() {
        let mut a = TopicAliases::new(2);
        assert_eq!(a.resolve("t", None), Ok("t".into()));
        assert_eq!(a.resolve("a/b", Some(1)), Ok("a/b".into()));
        assert_eq!(a.resolve("", Some(1)), Ok("a/b".into()));
        assert_eq!(a.resolve("", Some(2)), Err(ReasonCode::ProtocolError));
        assert_eq!(a.resolve("x", Some(3)), Err(ReasonCode::TopicAliasInvalid));
        assert_eq!(a.resolve("x", Some(0)), Err(ReasonCode::TopicAliasInvalid));
    }
}
