//! The packet data model, one type for both protocol versions.
//!
//! Fields that exist only in MQTT 5.0 (properties, reason codes of acknowledgements and
//! DISCONNECT, subscription options other than QoS) are left at their defaults when a 3.1.1
//! packet is decoded and are dropped when a packet is encoded for 3.1.1.

use bytes::Bytes;

use crate::properties::{
    AckProperties, AuthProperties, ConnAckProperties, ConnectProperties, DisconnectProperties,
    PublishProperties, SubscribeProperties, UnsubscribeProperties, WillProperties,
};
use crate::reason::ReasonCode;

/// The protocol version negotiated by CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolVersion {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

impl ProtocolVersion {
    /// The Protocol Level byte of CONNECT.
    pub fn level(self) -> u8 {
        match self {
            Self::V311 => 4,
            Self::V5 => 5,
        }
    }
}

/// Quality of Service level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[repr(u8)]
pub enum QoS {
    /// QoS 0: at most once.
    #[default]
    AtMostOnce = 0,
    /// QoS 1: at least once.
    AtLeastOnce = 1,
    /// QoS 2: exactly once.
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS for the two-bit value `bits` (`None` for 3, which no packet may carry).
    pub fn from_bits(bits: u8) -> Option<Self> {
        match bits {
            0 => Some(Self::AtMostOnce),
            1 => Some(Self::AtLeastOnce),
            2 => Some(Self::ExactlyOnce),
            _ => None,
        }
    }
}

/// The type of a control packet: the high nibble of its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PacketType {
    /// CONNECT (1).
    Connect = 1,
    /// CONNACK (2).
    ConnAck = 2,
    /// PUBLISH (3).
    Publish = 3,
    /// PUBACK (4).
    PubAck = 4,
    /// PUBREC (5).
    PubRec = 5,
    /// PUBREL (6).
    PubRel = 6,
    /// PUBCOMP (7).
    PubComp = 7,
    /// SUBSCRIBE (8).
    Subscribe = 8,
    /// SUBACK (9).
    SubAck = 9,
    /// UNSUBSCRIBE (10).
    Unsubscribe = 10,
    /// UNSUBACK (11).
    UnsubAck = 11,
    /// PINGREQ (12).
    PingReq = 12,
    /// PINGRESP (13).
    PingResp = 13,
    /// DISCONNECT (14).
    Disconnect = 14,
    /// AUTH (15, MQTT 5.0 only).
    Auth = 15,
}

impl PacketType {
    /// The type for a first byte's high nibble (`None` for the reserved 0).
    pub fn from_nibble(nibble: u8) -> Option<Self> {
        use PacketType::*;
        Some(match nibble {
            1 => Connect,
            2 => ConnAck,
            3 => Publish,
            4 => PubAck,
            5 => PubRec,
            6 => PubRel,
            7 => PubComp,
            8 => Subscribe,
            9 => SubAck,
            10 => Unsubscribe,
            11 => UnsubAck,
            12 => PingReq,
            13 => PingResp,
            14 => Disconnect,
            15 => Auth,
            _ => return None,
        })
    }

    /// The fixed-header flags every packet of this type carries; PUBLISH has none fixed
    /// (its flags are DUP, QoS and RETAIN).
    pub fn fixed_flags(self) -> Option<u8> {
        match self {
            Self::Publish => None,
            Self::PubRel | Self::Subscribe | Self::Unsubscribe => Some(0b0010),
            _ => Some(0),
        }
    }
}

impl std::fmt::Display for PacketType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Self::Connect => "CONNECT",
            Self::ConnAck => "CONNACK",
            Self::Publish => "PUBLISH",
            Self::PubAck => "PUBACK",
            Self::PubRec => "PUBREC",
            Self::PubRel => "PUBREL",
            Self::PubComp => "PUBCOMP",
            Self::Subscribe => "SUBSCRIBE",
            Self::SubAck => "SUBACK",
            Self::Unsubscribe => "UNSUBSCRIBE",
            Self::UnsubAck => "UNSUBACK",
            Self::PingReq => "PINGREQ",
            Self::PingResp => "PINGRESP",
            Self::Disconnect => "DISCONNECT",
            Self::Auth => "AUTH",
        };
        f.write_str(name)
    }
}

/// An MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// CONNECT: client to server, first packet of a connection.
    Connect(Connect),
    /// CONNACK: server's answer to CONNECT.
    ConnAck(ConnAck),
    /// PUBLISH: an application message, either direction.
    Publish(Publish),
    /// PUBACK: QoS 1 acknowledgement.
    PubAck(PubAck),
    /// PUBREC: QoS 2, part 1.
    PubRec(PubRec),
    /// PUBREL: QoS 2, part 2.
    PubRel(PubRel),
    /// PUBCOMP: QoS 2, part 3.
    PubComp(PubComp),
    /// SUBSCRIBE: client to server.
    Subscribe(Subscribe),
    /// SUBACK: server's answer to SUBSCRIBE.
    SubAck(SubAck),
    /// UNSUBSCRIBE: client to server.
    Unsubscribe(Unsubscribe),
    /// UNSUBACK: server's answer to UNSUBSCRIBE.
    UnsubAck(UnsubAck),
    /// PINGREQ: keep-alive ping.
    PingReq,
    /// PINGRESP: answer to PINGREQ.
    PingResp,
    /// DISCONNECT: either direction in 5.0, client to server in 3.1.1.
    Disconnect(Disconnect),
    /// AUTH: extended authentication exchange (MQTT 5.0 only).
    Auth(Auth),
}

impl Packet {
    /// This packet's type.
    pub fn packet_type(&self) -> PacketType {
        match self {
            Self::Connect(_) => PacketType::Connect,
            Self::ConnAck(_) => PacketType::ConnAck,
            Self::Publish(_) => PacketType::Publish,
            Self::PubAck(_) => PacketType::PubAck,
            Self::PubRec(_) => PacketType::PubRec,
            Self::PubRel(_) => PacketType::PubRel,
            Self::PubComp(_) => PacketType::PubComp,
            Self::Subscribe(_) => PacketType::Subscribe,
            Self::SubAck(_) => PacketType::SubAck,
            Self::Unsubscribe(_) => PacketType::Unsubscribe,
            Self::UnsubAck(_) => PacketType::UnsubAck,
            Self::PingReq => PacketType::PingReq,
            Self::PingResp => PacketType::PingResp,
            Self::Disconnect(_) => PacketType::Disconnect,
            Self::Auth(_) => PacketType::Auth,
        }
    }
}

macro_rules! into_packet {
    ($($ty:ident),*) => {
        $(
            impl From<$ty> for Packet {
                fn from(packet: $ty) -> Self {
                    Packet::$ty(packet)
                }
            }
        )*
    };
}

into_packet!(
    Connect,
    ConnAck,
    Publish,
    PubAck,
    PubRec,
    PubRel,
    PubComp,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth
);

/// CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// The protocol level the client asked for. CONNECT is always encoded and decoded according
    /// to this, whatever version is passed to [`encode`](crate::encode) or
    /// [`decode`](crate::decode).
    pub protocol_version: ProtocolVersion,
    /// Client Identifier; may be empty (the server then assigns one or, in 3.1.1 without clean
    /// session, refuses with "identifier rejected", a decision left to the server).
    pub client_id: String,
    /// Clean Start (5.0) / Clean Session (3.1.1).
    pub clean_start: bool,
    /// Keep Alive in seconds (0 disables it).
    pub keep_alive: u16,
    /// User Name.
    pub username: Option<String>,
    /// Password (binary). In 3.1.1 it requires a user name.
    pub password: Option<Bytes>,
    /// Will message.
    pub will: Option<Will>,
    /// CONNECT properties (5.0).
    pub properties: ConnectProperties,
}

impl Connect {
    /// A CONNECT with the given version and client id, clean start, a 60 s keep alive and
    /// nothing else.
    pub fn new(protocol_version: ProtocolVersion, client_id: impl Into<String>) -> Self {
        Self {
            protocol_version,
            client_id: client_id.into(),
            clean_start: true,
            keep_alive: 60,
            username: None,
            password: None,
            will: None,
            properties: ConnectProperties::default(),
        }
    }
}

/// The will message of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Will Topic: a topic name (no wildcards).
    pub topic: String,
    /// Will Payload.
    pub payload: Bytes,
    /// Will QoS.
    pub qos: QoS,
    /// Will Retain.
    pub retain: bool,
    /// Will properties (5.0).
    pub properties: WillProperties,
}

/// CONNACK.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnAck {
    /// Session Present; must be false unless `reason_code` is Success.
    pub session_present: bool,
    /// Connect Reason Code; in 3.1.1 the return code, mapped with
    /// [`ReasonCode::from_v311_connack`] / [`ReasonCode::to_v311_connack`].
    pub reason_code: ReasonCode,
    /// CONNACK properties (5.0).
    pub properties: ConnAckProperties,
}

/// PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// DUP: a re-delivery. Must be false at QoS 0.
    pub dup: bool,
    /// QoS level.
    pub qos: QoS,
    /// RETAIN.
    pub retain: bool,
    /// Topic Name: no wildcards; empty only in 5.0 together with a Topic Alias property.
    pub topic: String,
    /// Packet Identifier: `Some` (non-zero) exactly when `qos` is above 0.
    pub packet_id: Option<u16>,
    /// Application payload; a zero-copy slice of the decoded buffer.
    pub payload: Bytes,
    /// PUBLISH properties (5.0).
    pub properties: PublishProperties,
}

impl Publish {
    /// A QoS 0, non-retained PUBLISH.
    pub fn new(topic: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: topic.into(),
            packet_id: None,
            payload: payload.into(),
            properties: PublishProperties::default(),
        }
    }
}

/// The four QoS acknowledgements have the same fields; their codecs go through this.
pub(crate) trait PubAckFields {
    fn from_fields(packet_id: u16, reason_code: ReasonCode, properties: AckProperties) -> Self;
    fn fields(&self) -> (u16, ReasonCode, &AckProperties);
}

macro_rules! pub_ack {
    ($($(#[$doc:meta])* $name:ident;)*) => {
        $(
            $(#[$doc])*
            #[derive(Debug, Clone, PartialEq, Eq)]
            pub struct $name {
                /// Packet Identifier (non-zero).
                pub packet_id: u16,
                /// Reason Code (5.0; 3.1.1 has none and decodes as Success).
                pub reason_code: ReasonCode,
                /// Properties (5.0).
                pub properties: AckProperties,
            }

            impl $name {
                /// A successful acknowledgement of `packet_id`.
                pub fn new(packet_id: u16) -> Self {
                    Self {
                        packet_id,
                        reason_code: ReasonCode::Success,
                        properties: AckProperties::default(),
                    }
                }
            }

            impl PubAckFields for $name {
                fn from_fields(
                    packet_id: u16,
                    reason_code: ReasonCode,
                    properties: AckProperties,
                ) -> Self {
                    Self {
                        packet_id,
                        reason_code,
                        properties,
                    }
                }

                fn fields(&self) -> (u16, ReasonCode, &AckProperties) {
                    (self.packet_id, self.reason_code, &self.properties)
                }
            }
        )*
    };
}

pub_ack! {
    /// PUBACK.
    PubAck;
    /// PUBREC.
    PubRec;
    /// PUBREL.
    PubRel;
    /// PUBCOMP.
    PubComp;
}

/// What the server does with retained messages when a subscription is made (5.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum RetainHandling {
    /// 0: send retained messages at the time of the subscribe.
    #[default]
    SendAtSubscribe = 0,
    /// 1: send them only if the subscription does not already exist.
    SendAtSubscribeIfNew = 1,
    /// 2: do not send them.
    DoNotSend = 2,
}

/// The options byte of one SUBSCRIBE entry. In 3.1.1 only `qos` exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SubscriptionOptions {
    /// Maximum QoS.
    pub qos: QoS,
    /// No Local (5.0): don't forward the client's own publications; not allowed on shared
    /// subscriptions.
    pub no_local: bool,
    /// Retain As Published (5.0): keep the RETAIN flag when forwarding.
    pub retain_as_published: bool,
    /// Retain Handling (5.0).
    pub retain_handling: RetainHandling,
}

impl SubscriptionOptions {
    /// Options with this QoS and 5.0 defaults otherwise.
    pub fn qos(qos: QoS) -> Self {
        Self {
            qos,
            ..Self::default()
        }
    }
}

/// One entry of a SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// Topic Filter (in 5.0 possibly `$share/{group}/{filter}`).
    pub filter: String,
    /// Subscription options.
    pub options: SubscriptionOptions,
}

impl Subscription {
    /// A subscription to `filter` at `qos`.
    pub fn new(filter: impl Into<String>, qos: QoS) -> Self {
        Self {
            filter: filter.into(),
            options: SubscriptionOptions::qos(qos),
        }
    }
}

/// SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet Identifier (non-zero).
    pub packet_id: u16,
    /// At least one subscription.
    pub subscriptions: Vec<Subscription>,
    /// SUBSCRIBE properties (5.0).
    pub properties: SubscribeProperties,
}

/// SUBACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    /// Packet Identifier (non-zero).
    pub packet_id: u16,
    /// One code per subscription, in order: granted QoS or a failure. In 3.1.1 any failure is
    /// sent as `0x80` and decodes as [`ReasonCode::UnspecifiedError`].
    pub reason_codes: Vec<ReasonCode>,
    /// SUBACK properties (5.0).
    pub properties: AckProperties,
}

/// UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Packet Identifier (non-zero).
    pub packet_id: u16,
    /// At least one topic filter.
    pub filters: Vec<String>,
    /// UNSUBSCRIBE properties (5.0).
    pub properties: UnsubscribeProperties,
}

/// UNSUBACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    /// Packet Identifier (non-zero).
    pub packet_id: u16,
    /// One code per filter (5.0; empty in 3.1.1).
    pub reason_codes: Vec<ReasonCode>,
    /// UNSUBACK properties (5.0).
    pub properties: AckProperties,
}

/// DISCONNECT.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Disconnect {
    /// Disconnect Reason Code (5.0; Normal disconnection in 3.1.1).
    pub reason_code: ReasonCode,
    /// DISCONNECT properties (5.0).
    pub properties: DisconnectProperties,
}

/// AUTH (5.0 only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Auth {
    /// Authenticate Reason Code.
    pub reason_code: ReasonCode,
    /// AUTH properties.
    pub properties: AuthProperties,
}
