//! MQTT 5.0 Reason Codes, which packet may carry which, and their 3.1.1 equivalents.

use crate::packet::PacketType;

macro_rules! reason_codes {
    ($( $(#[$doc:meta])* $name:ident = $value:literal, $text:literal; )*) => {
        /// An MQTT 5.0 Reason Code (spec section 2.4).
        ///
        /// `0x00` is one code with three names in the spec (Success, Normal disconnection, Granted
        /// QoS 0); it is [`ReasonCode::Success`] here, with the other names as associated
        /// constants. In MQTT 3.1.1 only CONNACK and SUBACK carry codes; see
        /// [`ReasonCode::to_v311_connack`] and [`ReasonCode::from_v311_connack`].
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
        #[repr(u8)]
        #[non_exhaustive]
        pub enum ReasonCode {
            /// `0x00` Success / Normal disconnection / Granted QoS 0.
            #[default]
            Success = 0x00,
            $( $(#[$doc])* $name = $value, )*
        }

        impl ReasonCode {
            /// The spec's name for this code.
            pub fn description(self) -> &'static str {
                match self {
                    Self::Success => "Success",
                    $( Self::$name => $text, )*
                }
            }
        }

        impl TryFrom<u8> for ReasonCode {
            type Error = u8;

            /// The code for `value`, or `value` back if MQTT 5.0 defines none.
            fn try_from(value: u8) -> Result<Self, u8> {
                match value {
                    0x00 => Ok(Self::Success),
                    $( $value => Ok(Self::$name), )*
                    other => Err(other),
                }
            }
        }
    };
}

reason_codes! {
    /// `0x01` Granted QoS 1 (SUBACK).
    GrantedQoS1 = 0x01, "Granted QoS 1";
    /// `0x02` Granted QoS 2 (SUBACK).
    GrantedQoS2 = 0x02, "Granted QoS 2";
    /// `0x04` Disconnect with Will Message (DISCONNECT from a client).
    DisconnectWithWillMessage = 0x04, "Disconnect with Will Message";
    /// `0x10` No matching subscribers (PUBACK, PUBREC).
    NoMatchingSubscribers = 0x10, "No matching subscribers";
    /// `0x11` No subscription existed (UNSUBACK).
    NoSubscriptionExisted = 0x11, "No subscription existed";
    /// `0x18` Continue authentication (AUTH).
    ContinueAuthentication = 0x18, "Continue authentication";
    /// `0x19` Re-authenticate (AUTH).
    ReAuthenticate = 0x19, "Re-authenticate";
    /// `0x80` Unspecified error.
    UnspecifiedError = 0x80, "Unspecified error";
    /// `0x81` Malformed Packet.
    MalformedPacket = 0x81, "Malformed Packet";
    /// `0x82` Protocol Error.
    ProtocolError = 0x82, "Protocol Error";
    /// `0x83` Implementation specific error.
    ImplementationSpecificError = 0x83, "Implementation specific error";
    /// `0x84` Unsupported Protocol Version.
    UnsupportedProtocolVersion = 0x84, "Unsupported Protocol Version";
    /// `0x85` Client Identifier not valid.
    ClientIdentifierNotValid = 0x85, "Client Identifier not valid";
    /// `0x86` Bad User Name or Password.
    BadUserNameOrPassword = 0x86, "Bad User Name or Password";
    /// `0x87` Not authorized.
    NotAuthorized = 0x87, "Not authorized";
    /// `0x88` Server unavailable.
    ServerUnavailable = 0x88, "Server unavailable";
    /// `0x89` Server busy.
    ServerBusy = 0x89, "Server busy";
    /// `0x8A` Banned.
    Banned = 0x8A, "Banned";
    /// `0x8B` Server shutting down.
    ServerShuttingDown = 0x8B, "Server shutting down";
    /// `0x8C` Bad authentication method.
    BadAuthenticationMethod = 0x8C, "Bad authentication method";
    /// `0x8D` Keep Alive timeout.
    KeepAliveTimeout = 0x8D, "Keep Alive timeout";
    /// `0x8E` Session taken over.
    SessionTakenOver = 0x8E, "Session taken over";
    /// `0x8F` Topic Filter invalid.
    TopicFilterInvalid = 0x8F, "Topic Filter invalid";
    /// `0x90` Topic Name invalid.
    TopicNameInvalid = 0x90, "Topic Name invalid";
    /// `0x91` Packet Identifier in use.
    PacketIdentifierInUse = 0x91, "Packet Identifier in use";
    /// `0x92` Packet Identifier not found.
    PacketIdentifierNotFound = 0x92, "Packet Identifier not found";
    /// `0x93` Receive Maximum exceeded.
    ReceiveMaximumExceeded = 0x93, "Receive Maximum exceeded";
    /// `0x94` Topic Alias invalid.
    TopicAliasInvalid = 0x94, "Topic Alias invalid";
    /// `0x95` Packet too large.
    PacketTooLarge = 0x95, "Packet too large";
    /// `0x96` Message rate too high.
    MessageRateTooHigh = 0x96, "Message rate too high";
    /// `0x97` Quota exceeded.
    QuotaExceeded = 0x97, "Quota exceeded";
    /// `0x98` Administrative action.
    AdministrativeAction = 0x98, "Administrative action";
    /// `0x99` Payload format invalid.
    PayloadFormatInvalid = 0x99, "Payload format invalid";
    /// `0x9A` Retain not supported.
    RetainNotSupported = 0x9A, "Retain not supported";
    /// `0x9B` QoS not supported.
    QoSNotSupported = 0x9B, "QoS not supported";
    /// `0x9C` Use another server.
    UseAnotherServer = 0x9C, "Use another server";
    /// `0x9D` Server moved.
    ServerMoved = 0x9D, "Server moved";
    /// `0x9E` Shared Subscriptions not supported.
    SharedSubscriptionsNotSupported = 0x9E, "Shared Subscriptions not supported";
    /// `0x9F` Connection rate exceeded.
    ConnectionRateExceeded = 0x9F, "Connection rate exceeded";
    /// `0xA0` Maximum connect time.
    MaximumConnectTime = 0xA0, "Maximum connect time";
    /// `0xA1` Subscription Identifiers not supported.
    SubscriptionIdentifiersNotSupported = 0xA1, "Subscription Identifiers not supported";
    /// `0xA2` Wildcard Subscriptions not supported.
    WildcardSubscriptionsNotSupported = 0xA2, "Wildcard Subscriptions not supported";
}

impl ReasonCode {
    /// `0x00` under its DISCONNECT name.
    pub const NORMAL_DISCONNECTION: Self = Self::Success;
    /// `0x00` under its SUBACK name.
    pub const GRANTED_QOS_0: Self = Self::Success;

    /// The code's byte value.
    pub fn value(self) -> u8 {
        self as u8
    }

    /// Whether this code reports a failure (values `0x80` and above).
    pub fn is_error(self) -> bool {
        self.value() >= 0x80
    }

    /// Whether the spec allows this code in a packet of type `packet` (MQTT 5.0 sections 3.2 to
    /// 3.15). Packets that carry no reason code allow none.
    pub fn is_allowed_in(self, packet: PacketType) -> bool {
        use ReasonCode::*;
        match packet {
            PacketType::ConnAck => matches!(
                self,
                Success
                    | UnspecifiedError
                    | MalformedPacket
                    | ProtocolError
                    | ImplementationSpecificError
                    | UnsupportedProtocolVersion
                    | ClientIdentifierNotValid
                    | BadUserNameOrPassword
                    | NotAuthorized
                    | ServerUnavailable
                    | ServerBusy
                    | Banned
                    | BadAuthenticationMethod
                    | TopicNameInvalid
                    | PacketTooLarge
                    | QuotaExceeded
                    | PayloadFormatInvalid
                    | RetainNotSupported
                    | QoSNotSupported
                    | UseAnotherServer
                    | ServerMoved
                    | ConnectionRateExceeded
            ),
            PacketType::PubAck | PacketType::PubRec => matches!(
                self,
                Success
                    | NoMatchingSubscribers
                    | UnspecifiedError
                    | ImplementationSpecificError
                    | NotAuthorized
                    | TopicNameInvalid
                    | PacketIdentifierInUse
                    | QuotaExceeded
                    | PayloadFormatInvalid
            ),
            PacketType::PubRel | PacketType::PubComp => {
                matches!(self, Success | PacketIdentifierNotFound)
            }
            PacketType::SubAck => matches!(
                self,
                Success
                    | GrantedQoS1
                    | GrantedQoS2
                    | UnspecifiedError
                    | ImplementationSpecificError
                    | NotAuthorized
                    | TopicFilterInvalid
                    | PacketIdentifierInUse
                    | QuotaExceeded
                    | SharedSubscriptionsNotSupported
                    | SubscriptionIdentifiersNotSupported
                    | WildcardSubscriptionsNotSupported
            ),
            PacketType::UnsubAck => matches!(
                self,
                Success
                    | NoSubscriptionExisted
                    | UnspecifiedError
                    | ImplementationSpecificError
                    | NotAuthorized
                    | TopicFilterInvalid
                    | PacketIdentifierInUse
            ),
            PacketType::Disconnect => matches!(
                self,
                Success
                    | DisconnectWithWillMessage
                    | UnspecifiedError
                    | MalformedPacket
                    | ProtocolError
                    | ImplementationSpecificError
                    | NotAuthorized
                    | ServerBusy
                    | ServerShuttingDown
                    | KeepAliveTimeout
                    | SessionTakenOver
                    | TopicFilterInvalid
                    | TopicNameInvalid
                    | ReceiveMaximumExceeded
                    | TopicAliasInvalid
                    | PacketTooLarge
                    | MessageRateTooHigh
                    | QuotaExceeded
                    | AdministrativeAction
                    | PayloadFormatInvalid
                    | RetainNotSupported
                    | QoSNotSupported
                    | UseAnotherServer
                    | ServerMoved
                    | SharedSubscriptionsNotSupported
                    | ConnectionRateExceeded
                    | MaximumConnectTime
                    | SubscriptionIdentifiersNotSupported
                    | WildcardSubscriptionsNotSupported
            ),
            PacketType::Auth => matches!(self, Success | ContinueAuthentication | ReAuthenticate),
            PacketType::Connect
            | PacketType::Publish
            | PacketType::Subscribe
            | PacketType::Unsubscribe
            | PacketType::PingReq
            | PacketType::PingResp => false,
        }
    }

    /// The MQTT 3.1.1 CONNACK return code for this code (3.1.1 section 3.2.2.3).
    ///
    /// The five refusals of 3.1.1 map exactly (`0x84`→1, `0x85`→2, `0x88`→3, `0x86`→4, `0x87`→5);
    /// of the other v5 codes, bad authentication method maps to 4, banned to 5, and every other
    /// failure to 3 (Server unavailable). A v5-only success code maps to 0.
    pub fn to_v311_connack(self) -> u8 {
        use ReasonCode::*;
        match self {
            UnsupportedProtocolVersion => 0x01,
            ClientIdentifierNotValid => 0x02,
            BadUserNameOrPassword | BadAuthenticationMethod => 0x04,
            NotAuthorized | Banned => 0x05,
            code if code.is_error() => 0x03,
            _ => 0x00,
        }
    }

    /// The code for an MQTT 3.1.1 CONNACK return code (0 to 5), or `None` for a reserved one.
    pub fn from_v311_connack(code: u8) -> Option<Self> {
        match code {
            0x00 => Some(Self::Success),
            0x01 => Some(Self::UnsupportedProtocolVersion),
            0x02 => Some(Self::ClientIdentifierNotValid),
            0x03 => Some(Self::ServerUnavailable),
            0x04 => Some(Self::BadUserNameOrPassword),
            0x05 => Some(Self::NotAuthorized),
            _ => None,
        }
    }

    /// The MQTT 3.1.1 SUBACK return code: the granted QoS (0, 1, 2), or `0x80` for any failure.
    /// `None` for a code that is neither.
    pub fn to_v311_suback(self) -> Option<u8> {
        match self {
            Self::Success => Some(0x00),
            Self::GrantedQoS1 => Some(0x01),
            Self::GrantedQoS2 => Some(0x02),
            code if code.is_error() => Some(0x80),
            _ => None,
        }
    }

    /// The code for an MQTT 3.1.1 SUBACK return code (`0x80` becomes Unspecified error).
    pub fn from_v311_suback(code: u8) -> Option<Self> {
        match code {
            0x00 => Some(Self::Success),
            0x01 => Some(Self::GrantedQoS1),
            0x02 => Some(Self::GrantedQoS2),
            0x80 => Some(Self::UnspecifiedError),
            _ => None,
        }
    }
}

impl From<ReasonCode> for u8 {
    fn from(code: ReasonCode) -> u8 {
        code.value()
    }
}

impl std::fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (0x{:02X})", self.description(), self.value())
    }
}
