//! MQTT 5.0 properties (spec section 2.2.2): one typed struct per packet (or family of packets
//! with the same allowed set), all generated from one table by [`property_set!`], which also
//! generates their decoder (rejecting unknown, misplaced, duplicate and out-of-range properties)
//! and encoder (applying the same value rules).
//!
//! A property that may appear at most once is an `Option`; a repeatable one (User Property,
//! and Subscription Identifier in PUBLISH) is a `Vec`, in wire order.

use bytes::Bytes;

use crate::error::{DecodeError, EncodeError};
use crate::packet::{PacketType, QoS};
use crate::topic::validate_topic_name;
use crate::wire::{measure, Reader, Sink, MAX_VARINT};

macro_rules! property_ids {
    ($($name:ident = $value:literal, $text:literal;)*) => {
        /// A property identifier (MQTT 5.0 section 2.2.2.2).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        #[non_exhaustive]
        pub enum PropertyId {
            $(
                #[doc = concat!("`", stringify!($value), "` ", $text, ".")]
                $name = $value,
            )*
        }

        impl PropertyId {
            /// The property for a decoded identifier, `None` if 5.0 defines none.
            pub fn from_id(id: usize) -> Option<Self> {
                match id {
                    $( $value => Some(Self::$name), )*
                    _ => None,
                }
            }

            /// The spec's name of this property.
            pub fn name(self) -> &'static str {
                match self {
                    $( Self::$name => $text, )*
                }
            }
        }
    };
}

property_ids! {
    PayloadFormatIndicator = 0x01, "Payload Format Indicator";
    MessageExpiryInterval = 0x02, "Message Expiry Interval";
    ContentType = 0x03, "Content Type";
    ResponseTopic = 0x08, "Response Topic";
    CorrelationData = 0x09, "Correlation Data";
    SubscriptionIdentifier = 0x0B, "Subscription Identifier";
    SessionExpiryInterval = 0x11, "Session Expiry Interval";
    AssignedClientIdentifier = 0x12, "Assigned Client Identifier";
    ServerKeepAlive = 0x13, "Server Keep Alive";
    AuthenticationMethod = 0x15, "Authentication Method";
    AuthenticationData = 0x16, "Authentication Data";
    RequestProblemInformation = 0x17, "Request Problem Information";
    WillDelayInterval = 0x18, "Will Delay Interval";
    RequestResponseInformation = 0x19, "Request Response Information";
    ResponseInformation = 0x1A, "Response Information";
    ServerReference = 0x1C, "Server Reference";
    ReasonString = 0x1F, "Reason String";
    ReceiveMaximum = 0x21, "Receive Maximum";
    TopicAliasMaximum = 0x22, "Topic Alias Maximum";
    TopicAlias = 0x23, "Topic Alias";
    MaximumQoS = 0x24, "Maximum QoS";
    RetainAvailable = 0x25, "Retain Available";
    UserProperty = 0x26, "User Property";
    MaximumPacketSize = 0x27, "Maximum Packet Size";
    WildcardSubscriptionAvailable = 0x28, "Wildcard Subscription Available";
    SubscriptionIdentifierAvailable = 0x29, "Subscription Identifier Available";
    SharedSubscriptionAvailable = 0x2A, "Shared Subscription Available";
}

impl std::fmt::Display for PropertyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (0x{:02X})", self.name(), *self as u8)
    }
}

/// How one property value is laid out on the wire and which values are in range.
trait Kind {
    type Value;

    /// Reads a value; a byte outside the type's domain (a boolean of 2) is reported here.
    fn read(r: &mut Reader, id: PropertyId) -> Result<Self::Value, DecodeError>;

    fn write<S: Sink>(value: &Self::Value, s: &mut S) -> Result<(), EncodeError>;

    /// Range rules beyond the wire type (a Receive Maximum of 0 is a protocol error).
    fn is_valid(_value: &Self::Value) -> bool {
        true
    }
}

fn decode_value<K: Kind>(r: &mut Reader, id: PropertyId) -> Result<K::Value, DecodeError> {
    let value = K::read(r, id)?;
    if K::is_valid(&value) {
        Ok(value)
    } else {
        Err(DecodeError::InvalidPropertyValue(id))
    }
}

fn encode_value<K: Kind, S: Sink>(
    value: &K::Value,
    id: PropertyId,
    s: &mut S,
) -> Result<(), EncodeError> {
    if !K::is_valid(value) {
        return Err(DecodeError::InvalidPropertyValue(id).into());
    }
    s.put_varint(id as usize);
    K::write(value, s)
}

/// Byte 0 or 1.
struct Bool;
impl Kind for Bool {
    type Value = bool;
    fn read(r: &mut Reader, id: PropertyId) -> Result<bool, DecodeError> {
        match r.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::InvalidPropertyValue(id)),
        }
    }
    fn write<S: Sink>(value: &bool, s: &mut S) -> Result<(), EncodeError> {
        s.put_u8(u8::from(*value));
        Ok(())
    }
}

/// Maximum QoS: a byte, 0 or 1.
struct MaxQoS;
impl Kind for MaxQoS {
    type Value = QoS;
    fn read(r: &mut Reader, id: PropertyId) -> Result<QoS, DecodeError> {
        match r.u8()? {
            0 => Ok(QoS::AtMostOnce),
            1 => Ok(QoS::AtLeastOnce),
            _ => Err(DecodeError::InvalidPropertyValue(id)),
        }
    }
    fn write<S: Sink>(value: &QoS, s: &mut S) -> Result<(), EncodeError> {
        s.put_u8(*value as u8);
        Ok(())
    }
    fn is_valid(value: &QoS) -> bool {
        *value != QoS::ExactlyOnce
    }
}

/// Defines a fixed-width integer kind, optionally forbidding 0.
macro_rules! int_kind {
    ($kind:ident, $ty:ty, $get:ident, $put:ident, $nonzero:literal) => {
        struct $kind;
        impl Kind for $kind {
            type Value = $ty;
            fn read(r: &mut Reader, _id: PropertyId) -> Result<$ty, DecodeError> {
                r.$get()
            }
            fn write<S: Sink>(value: &$ty, s: &mut S) -> Result<(), EncodeError> {
                s.$put(*value);
                Ok(())
            }
            fn is_valid(value: &$ty) -> bool {
                !$nonzero || *value != 0
            }
        }
    };
}

int_kind!(U16, u16, u16, put_u16, false);
int_kind!(NonZeroU16, u16, u16, put_u16, true);
int_kind!(U32, u32, u32, put_u32, false);
int_kind!(NonZeroU32, u32, u32, put_u32, true);

/// A Variable Byte Integer in 1..=268,435,455 (Subscription Identifier).
struct SubscriptionId;
impl Kind for SubscriptionId {
    type Value = u32;
    fn read(r: &mut Reader, id: PropertyId) -> Result<u32, DecodeError> {
        u32::try_from(r.varint()?).map_err(|_| DecodeError::InvalidPropertyValue(id))
    }
    fn write<S: Sink>(value: &u32, s: &mut S) -> Result<(), EncodeError> {
        s.put_varint(*value as usize);
        Ok(())
    }
    fn is_valid(value: &u32) -> bool {
        *value != 0 && *value as usize <= MAX_VARINT
    }
}

/// A UTF-8 Encoded String.
struct Utf8;
impl Kind for Utf8 {
    type Value = String;
    fn read(r: &mut Reader, _id: PropertyId) -> Result<String, DecodeError> {
        r.string()
    }
    fn write<S: Sink>(value: &String, s: &mut S) -> Result<(), EncodeError> {
        s.put_string(value)
    }
}

/// A UTF-8 string that must be a valid topic name (Response Topic).
struct TopicName;
impl Kind for TopicName {
    type Value = String;
    fn read(r: &mut Reader, _id: PropertyId) -> Result<String, DecodeError> {
        r.string()
    }
    fn write<S: Sink>(value: &String, s: &mut S) -> Result<(), EncodeError> {
        s.put_string(value)
    }
    fn is_valid(value: &String) -> bool {
        validate_topic_name(value).is_ok()
    }
}

/// Binary Data.
struct Binary;
impl Kind for Binary {
    type Value = Bytes;
    fn read(r: &mut Reader, _id: PropertyId) -> Result<Bytes, DecodeError> {
        r.binary()
    }
    fn write<S: Sink>(value: &Bytes, s: &mut S) -> Result<(), EncodeError> {
        s.put_binary(value)
    }
}

/// A UTF-8 String Pair.
struct StringPair;
impl Kind for StringPair {
    type Value = (String, String);
    fn read(r: &mut Reader, _id: PropertyId) -> Result<(String, String), DecodeError> {
        Ok((r.string()?, r.string()?))
    }
    fn write<S: Sink>(value: &(String, String), s: &mut S) -> Result<(), EncodeError> {
        s.put_string(&value.0)?;
        s.put_string(&value.1)
    }
}

/// Storage of one property in its struct: `Option` (at most once) or `Vec` (repeatable).
trait Slot {
    type Item;
    /// Stores a decoded value; `false` if the slot is single and already full.
    fn insert(&mut self, value: Self::Item) -> bool;
    fn items(&self) -> &[Self::Item];
}

impl<T> Slot for Option<T> {
    type Item = T;
    fn insert(&mut self, value: T) -> bool {
        if self.is_some() {
            return false;
        }
        *self = Some(value);
        true
    }
    fn items(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T> Slot for Vec<T> {
    type Item = T;
    fn insert(&mut self, value: T) -> bool {
        self.push(value);
        true
    }
    fn items(&self) -> &[T] {
        self
    }
}

/// What the packet codecs need of every property struct.
pub(crate) trait PropertySet: Default {
    /// Whether no property is set.
    fn is_empty(&self) -> bool;
    /// Decodes a property length and that many bytes of properties of a `packet`.
    fn decode(r: &mut Reader, packet: PacketType) -> Result<Self, DecodeError>;
    /// Encodes the property length and the properties.
    fn encode<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError>;
}

/// Writes a Variable Byte Integer length, refusing one no packet can hold.
pub(crate) fn put_length<S: Sink>(s: &mut S, len: usize) -> Result<(), EncodeError> {
    if len > MAX_VARINT {
        return Err(EncodeError::PacketTooLarge(len));
    }
    s.put_varint(len);
    Ok(())
}

/// Generates a property struct with its decoder and encoder from `field: Type = Id as Kind`
/// entries; every set also gets `user_properties`.
macro_rules! property_set {
    ($(
        $(#[$doc:meta])*
        $name:ident {
            $( $(#[$fdoc:meta])* $field:ident: $ty:ty = $id:ident as $kind:ident, )*
        }
    )*) => {$(
        $(#[$doc])*
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        pub struct $name {
            $( $(#[$fdoc])* pub $field: $ty, )*
            /// User Property (`0x26`): name/value pairs, repeatable, in wire order.
            pub user_properties: Vec<(String, String)>,
        }

        impl $name {
            /// Whether no property is set (the property length on the wire is 0).
            pub fn is_empty(&self) -> bool {
                $( Slot::items(&self.$field).is_empty() && )* self.user_properties.is_empty()
            }

            fn encode_items<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
                $(
                    for value in Slot::items(&self.$field) {
                        encode_value::<$kind, S>(value, PropertyId::$id, s)?;
                    }
                )*
                for pair in &self.user_properties {
                    encode_value::<StringPair, S>(pair, PropertyId::UserProperty, s)?;
                }
                Ok(())
            }
        }

        impl PropertySet for $name {
            fn is_empty(&self) -> bool {
                $name::is_empty(self)
            }

            fn decode(r: &mut Reader, packet: PacketType) -> Result<Self, DecodeError> {
                let len = r.varint()?;
                let mut r = r.section(len)?;
                let mut props = Self::default();
                while !r.is_empty() {
                    let raw = r.varint()?;
                    let id = PropertyId::from_id(raw).ok_or(DecodeError::UnknownProperty(raw))?;
                    let fresh = match id {
                        $( PropertyId::$id => {
                            Slot::insert(&mut props.$field, decode_value::<$kind>(&mut r, id)?)
                        } )*
                        PropertyId::UserProperty => Slot::insert(
                            &mut props.user_properties,
                            decode_value::<StringPair>(&mut r, id)?,
                        ),
                        _ => return Err(DecodeError::PropertyNotAllowed { property: id, packet }),
                    };
                    if !fresh {
                        return Err(DecodeError::DuplicateProperty(id));
                    }
                }
                Ok(props)
            }

            fn encode<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
                put_length(s, measure(|c| self.encode_items(c))?)?;
                self.encode_items(s)
            }
        }
    )*};
}

property_set! {
    /// CONNECT properties.
    ConnectProperties {
        /// Session Expiry Interval (`0x11`), seconds; absent means 0.
        session_expiry_interval: Option<u32> = SessionExpiryInterval as U32,
        /// Receive Maximum (`0x21`), non-zero.
        receive_maximum: Option<u16> = ReceiveMaximum as NonZeroU16,
        /// Maximum Packet Size (`0x27`) the client accepts, non-zero.
        maximum_packet_size: Option<u32> = MaximumPacketSize as NonZeroU32,
        /// Topic Alias Maximum (`0x22`).
        topic_alias_maximum: Option<u16> = TopicAliasMaximum as U16,
        /// Request Response Information (`0x19`).
        request_response_information: Option<bool> = RequestResponseInformation as Bool,
        /// Request Problem Information (`0x17`).
        request_problem_information: Option<bool> = RequestProblemInformation as Bool,
        /// Authentication Method (`0x15`).
        authentication_method: Option<String> = AuthenticationMethod as Utf8,
        /// Authentication Data (`0x16`); only together with an authentication method.
        authentication_data: Option<Bytes> = AuthenticationData as Binary,
    }

    /// Will properties (in the CONNECT payload).
    WillProperties {
        /// Will Delay Interval (`0x18`), seconds.
        will_delay_interval: Option<u32> = WillDelayInterval as U32,
        /// Payload Format Indicator (`0x01`): `true` for UTF-8 text.
        payload_format_indicator: Option<bool> = PayloadFormatIndicator as Bool,
        /// Message Expiry Interval (`0x02`), seconds.
        message_expiry_interval: Option<u32> = MessageExpiryInterval as U32,
        /// Content Type (`0x03`).
        content_type: Option<String> = ContentType as Utf8,
        /// Response Topic (`0x08`), a topic name.
        response_topic: Option<String> = ResponseTopic as TopicName,
        /// Correlation Data (`0x09`).
        correlation_data: Option<Bytes> = CorrelationData as Binary,
    }

    /// CONNACK properties.
    ConnAckProperties {
        /// Session Expiry Interval (`0x11`) the server uses, seconds.
        session_expiry_interval: Option<u32> = SessionExpiryInterval as U32,
        /// Receive Maximum (`0x21`), non-zero.
        receive_maximum: Option<u16> = ReceiveMaximum as NonZeroU16,
        /// Maximum QoS (`0x24`): 0 or 1 (absent means 2).
        maximum_qos: Option<QoS> = MaximumQoS as MaxQoS,
        /// Retain Available (`0x25`).
        retain_available: Option<bool> = RetainAvailable as Bool,
        /// Maximum Packet Size (`0x27`) the server accepts, non-zero.
        maximum_packet_size: Option<u32> = MaximumPacketSize as NonZeroU32,
        /// Assigned Client Identifier (`0x12`).
        assigned_client_identifier: Option<String> = AssignedClientIdentifier as Utf8,
        /// Topic Alias Maximum (`0x22`).
        topic_alias_maximum: Option<u16> = TopicAliasMaximum as U16,
        /// Reason String (`0x1F`).
        reason_string: Option<String> = ReasonString as Utf8,
        /// Wildcard Subscription Available (`0x28`).
        wildcard_subscription_available: Option<bool> = WildcardSubscriptionAvailable as Bool,
        /// Subscription Identifier Available (`0x29`).
        subscription_identifiers_available: Option<bool> = SubscriptionIdentifierAvailable as Bool,
        /// Shared Subscription Available (`0x2A`).
        shared_subscription_available: Option<bool> = SharedSubscriptionAvailable as Bool,
        /// Server Keep Alive (`0x13`), seconds.
        server_keep_alive: Option<u16> = ServerKeepAlive as U16,
        /// Response Information (`0x1A`).
        response_information: Option<String> = ResponseInformation as Utf8,
        /// Server Reference (`0x1C`).
        server_reference: Option<String> = ServerReference as Utf8,
        /// Authentication Method (`0x15`).
        authentication_method: Option<String> = AuthenticationMethod as Utf8,
        /// Authentication Data (`0x16`).
        authentication_data: Option<Bytes> = AuthenticationData as Binary,
    }

    /// PUBLISH properties.
    PublishProperties {
        /// Payload Format Indicator (`0x01`): `true` for UTF-8 text.
        payload_format_indicator: Option<bool> = PayloadFormatIndicator as Bool,
        /// Message Expiry Interval (`0x02`), seconds.
        message_expiry_interval: Option<u32> = MessageExpiryInterval as U32,
        /// Topic Alias (`0x23`), non-zero.
        topic_alias: Option<u16> = TopicAlias as NonZeroU16,
        /// Response Topic (`0x08`), a topic name.
        response_topic: Option<String> = ResponseTopic as TopicName,
        /// Correlation Data (`0x09`).
        correlation_data: Option<Bytes> = CorrelationData as Binary,
        /// Subscription Identifiers (`0x0B`, repeatable), each in 1..=268,435,455.
        subscription_identifiers: Vec<u32> = SubscriptionIdentifier as SubscriptionId,
        /// Content Type (`0x03`).
        content_type: Option<String> = ContentType as Utf8,
    }

    /// Properties of PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK and UNSUBACK.
    AckProperties {
        /// Reason String (`0x1F`).
        reason_string: Option<String> = ReasonString as Utf8,
    }

    /// SUBSCRIBE properties.
    SubscribeProperties {
        /// Subscription Identifier (`0x0B`), in 1..=268,435,455.
        subscription_identifier: Option<u32> = SubscriptionIdentifier as SubscriptionId,
    }

    /// UNSUBSCRIBE properties (only user properties).
    UnsubscribeProperties {}

    /// DISCONNECT properties.
    DisconnectProperties {
        /// Session Expiry Interval (`0x11`), seconds (client to server only).
        session_expiry_interval: Option<u32> = SessionExpiryInterval as U32,
        /// Reason String (`0x1F`).
        reason_string: Option<String> = ReasonString as Utf8,
        /// Server Reference (`0x1C`).
        server_reference: Option<String> = ServerReference as Utf8,
    }

    /// AUTH properties.
    AuthProperties {
        /// Authentication Method (`0x15`).
        authentication_method: Option<String> = AuthenticationMethod as Utf8,
        /// Authentication Data (`0x16`).
        authentication_data: Option<Bytes> = AuthenticationData as Binary,
        /// Reason String (`0x1F`).
        reason_string: Option<String> = ReasonString as Utf8,
    }
}
