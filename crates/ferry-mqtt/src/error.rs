//! Decode and encode errors, and the reason code a server answers each decode error with.

use crate::packet::{PacketType, ProtocolVersion};
use crate::properties::PropertyId;
use crate::reason::ReasonCode;
use crate::topic::TopicError;

/// Why bytes are not a valid MQTT packet. After any of these the connection should be closed
/// (after sending, where the protocol allows it, a DISCONNECT or CONNACK with
/// [`DecodeError::reason_code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// A Variable Byte Integer (remaining length, property length, property identifier,
    /// subscription identifier) longer than four bytes or not minimally encoded.
    #[error("malformed variable byte integer")]
    MalformedVariableInteger,
    /// The fixed header announces a packet bigger than the allowed maximum. Raised from the fixed
    /// header alone, before the body is buffered.
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    PacketTooLarge {
        /// Size of the whole packet, fixed header included.
        size: usize,
        /// The maximum passed to the decoder.
        max: usize,
    },
    /// Packet type 0 (reserved), or AUTH (15) in MQTT 3.1.1.
    #[error("invalid packet type {0}")]
    InvalidPacketType(u8),
    /// A packet other than CONNECT where only CONNECT may come ([`decode_connect`](crate::decode_connect)).
    #[error("expected CONNECT, got {0}")]
    ExpectedConnect(PacketType),
    /// Reserved fixed-header flag bits are wrong (e.g. PUBREL, SUBSCRIBE and UNSUBSCRIBE must
    /// have `0b0010`, most others `0`), or a QoS 0 PUBLISH has DUP set.
    #[error("invalid fixed header flags {flags:#06b} for {packet}")]
    InvalidFixedHeaderFlags {
        /// The packet type.
        packet: PacketType,
        /// The low nibble of the first byte.
        flags: u8,
    },
    /// A QoS field (PUBLISH header, will QoS, subscription options) set to 3.
    #[error("invalid QoS {0}")]
    InvalidQoS(u8),
    /// Packet Identifier 0 where a non-zero one is required.
    #[error("packet identifier is 0")]
    ZeroPacketIdentifier,
    /// A length-prefixed field, a property section or a fixed-size field extends beyond the
    /// end of the packet (or of its property section).
    #[error("field extends beyond the end of the packet")]
    FieldOutOfBounds,
    /// Bytes left over after the last field of the packet.
    #[error("{0} unexpected bytes at the end of the packet")]
    TrailingBytes(usize),
    /// A UTF-8 string field is not well-formed UTF-8.
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    /// A UTF-8 string field contains U+0000.
    #[error("string contains U+0000")]
    NullCharacter,
    /// An invalid topic name in PUBLISH or in a will.
    #[error("invalid topic name: {0}")]
    InvalidTopicName(TopicError),
    /// A 5.0 PUBLISH with an empty topic name and no Topic Alias.
    #[error("empty topic name without a topic alias")]
    EmptyTopicWithoutAlias,
    /// An invalid topic filter (or shared subscription) in SUBSCRIBE or UNSUBSCRIBE.
    #[error("invalid topic filter: {0}")]
    InvalidTopicFilter(TopicError),
    /// A SUBSCRIBE or UNSUBSCRIBE without any topic filter.
    #[error("no topic filter in SUBSCRIBE or UNSUBSCRIBE")]
    EmptySubscription,
    /// Reserved bits set in a subscription options byte, or Retain Handling 3.
    #[error("invalid subscription options {0:#010b}")]
    InvalidSubscriptionOptions(u8),
    /// No Local set on a shared subscription (5.0).
    #[error("no local set on a shared subscription")]
    SharedSubscriptionNoLocal,
    /// The protocol name is not `MQTT`, or the level is neither 4 (3.1.1) nor 5 (5.0). The
    /// server may answer with CONNACK 0x84 (5.0) or return code 0x01 (3.1.1).
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocolVersion {
        /// The protocol name sent.
        name: String,
        /// The protocol level sent.
        level: u8,
    },
    /// CONNECT flags: the reserved bit set, will QoS or retain without the will flag, or (3.1.1)
    /// a password without a user name.
    #[error("invalid CONNECT flags {0:#010b}")]
    InvalidConnectFlags(u8),
    /// CONNACK flags: reserved bits set, or session present with a failure code.
    #[error("invalid CONNACK flags {0:#010b}")]
    InvalidConnAckFlags(u8),
    /// A reason code that is undefined or not allowed in this packet type.
    #[error("reason code {code:#04x} is not valid in {packet}")]
    InvalidReasonCode {
        /// The byte received.
        code: u8,
        /// The packet type.
        packet: PacketType,
    },
    /// A property identifier that 5.0 does not define.
    #[error("unknown property identifier {0:#x}")]
    UnknownProperty(usize),
    /// A property that this packet type may not carry.
    #[error("property {property} is not allowed in {packet}")]
    PropertyNotAllowed {
        /// The property.
        property: PropertyId,
        /// The packet type.
        packet: PacketType,
    },
    /// A property that may appear only once appears again.
    #[error("property {0} appears more than once")]
    DuplicateProperty(PropertyId),
    /// A property value out of range (a boolean other than 0/1, a Receive Maximum or Topic
    /// Alias of 0, a Maximum QoS of 2, a Response Topic with wildcards, ...).
    #[error("invalid value for property {0}")]
    InvalidPropertyValue(PropertyId),
    /// CONNECT with Authentication Data but no Authentication Method.
    #[error("authentication data without an authentication method")]
    AuthDataWithoutMethod,
}

impl DecodeError {
    /// The MQTT 5.0 reason code to report this error with, in a DISCONNECT or (while
    /// connecting) a CONNACK.
    ///
    /// | Error | Reason code |
    /// | --- | --- |
    /// | `PacketTooLarge` | 0x95 Packet too large |
    /// | `UnsupportedProtocolVersion` | 0x84 Unsupported Protocol Version |
    /// | `InvalidTopicName` | 0x90 Topic Name invalid |
    /// | `InvalidTopicFilter` | 0x8F Topic Filter invalid |
    /// | `ZeroPacketIdentifier`, `EmptySubscription`, `SharedSubscriptionNoLocal`, `EmptyTopicWithoutAlias`, `DuplicateProperty`, `InvalidPropertyValue`, `AuthDataWithoutMethod`, `ExpectedConnect` | 0x82 Protocol Error |
    /// | all others (framing, lengths, flags, UTF-8, unknown or misplaced properties and reason codes) | 0x81 Malformed Packet |
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            Self::PacketTooLarge { .. } => ReasonCode::PacketTooLarge,
            Self::UnsupportedProtocolVersion { .. } => ReasonCode::UnsupportedProtocolVersion,
            Self::InvalidTopicName(_) => ReasonCode::TopicNameInvalid,
            Self::InvalidTopicFilter(_) => ReasonCode::TopicFilterInvalid,
            Self::ZeroPacketIdentifier
            | Self::EmptySubscription
            | Self::SharedSubscriptionNoLocal
            | Self::EmptyTopicWithoutAlias
            | Self::DuplicateProperty(_)
            | Self::InvalidPropertyValue(_)
            | Self::AuthDataWithoutMethod
            | Self::ExpectedConnect(_) => ReasonCode::ProtocolError,
            Self::MalformedVariableInteger
            | Self::InvalidPacketType(_)
            | Self::InvalidFixedHeaderFlags { .. }
            | Self::InvalidQoS(_)
            | Self::FieldOutOfBounds
            | Self::TrailingBytes(_)
            | Self::InvalidUtf8
            | Self::NullCharacter
            | Self::InvalidSubscriptionOptions(_)
            | Self::InvalidConnectFlags(_)
            | Self::InvalidConnAckFlags(_)
            | Self::InvalidReasonCode { .. }
            | Self::UnknownProperty(_)
            | Self::PropertyNotAllowed { .. } => ReasonCode::MalformedPacket,
        }
    }
}

/// Why a packet cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The packet breaks a rule the decoder enforces; the contained error is what a peer
    /// decoding it would report (e.g. a topic name with a wildcard, packet id 0, an empty
    /// SUBSCRIBE, a Receive Maximum of 0, a reason code not allowed in this packet).
    #[error("invalid packet: {0}")]
    Invalid(#[from] DecodeError),
    /// A string or binary field longer than 65,535 bytes.
    #[error("field of {0} bytes exceeds 65535")]
    FieldTooLong(usize),
    /// The remaining length (or a property length) exceeds 268,435,455 bytes.
    #[error("packet body of {0} bytes exceeds the MQTT maximum")]
    PacketTooLarge(usize),
    /// A PUBLISH whose `packet_id` is `None` at QoS 1 or 2, or `Some` at QoS 0.
    #[error("PUBLISH packet identifier does not match its QoS")]
    PacketIdQoSMismatch,
    /// A packet type that this protocol version does not have (AUTH in 3.1.1).
    #[error("{packet} does not exist in {version:?}")]
    UnsupportedPacket {
        /// The packet type.
        packet: PacketType,
        /// The version asked for.
        version: ProtocolVersion,
    },
}
