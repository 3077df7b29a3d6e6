//! A sans-io MQTT 3.1.1 and 5.0 packet codec.
//!
//! One data model ([`Packet`] and its structs) serves both protocol versions; the version
//! negotiated by CONNECT is passed to [`decode`] and [`encode`]. There is no I/O and no async:
//! bytes go in and out through [`bytes::BytesMut`], and payloads come out as zero-copy
//! [`bytes::Bytes`] slices of the input.
//!
//! * [`decode_connect`] reads the first packet of a connection, which must be CONNECT and tells
//!   the version; [`decode`] reads every later one. Both return `Ok(None)` while the buffer
//!   holds only part of a packet, consuming nothing.
//! * Decoding is strict and never panics: every violation is a typed [`DecodeError`], and
//!   [`DecodeError::reason_code`] tells which reason code to answer it with (for example
//!   [`ReasonCode::PacketTooLarge`], raised from the fixed header before the body is buffered).
//! * [`encode`] applies the same rules before writing, so what it accepts decodes back to the
//!   same packet; [`encoded_len`] measures a packet without writing it.
//! * MQTT 5.0 properties are typed structs, one per packet ([`ConnectProperties`],
//!   [`PublishProperties`], ...); [`validate_topic_name`], [`validate_topic_filter`] and
//!   [`parse_shared_subscription`] implement the topic rules.
//! * With the `tokio-codec` feature, `MqttCodec` implements `tokio_util::codec::{Decoder,
//!   Encoder}`.
//!
//! ```
//! use bytes::BytesMut;
//! use ferry_mqtt::{decode, decode_connect, encode, Connect, Packet, ProtocolVersion, Publish, QoS};
//!
//! const MAX: usize = 1024 * 1024;
//!
//! // A client connects with MQTT 5.0 and publishes at QoS 1.
//! let mut wire = BytesMut::new();
//! let connect = Connect::new(ProtocolVersion::V5, "sensor-1");
//! encode(&connect.clone().into(), ProtocolVersion::V5, &mut wire).unwrap();
//! let mut publish = Publish::new("sensors/1/temp", "21.5");
//! publish.qos = QoS::AtLeastOnce;
//! publish.packet_id = Some(1);
//! encode(&publish.clone().into(), ProtocolVersion::V5, &mut wire).unwrap();
//!
//! // The server learns the version from CONNECT, then decodes the rest with it.
//! let first = decode_connect(&mut wire, MAX).unwrap().unwrap();
//! assert_eq!(first, connect);
//! let version = first.protocol_version;
//! assert_eq!(decode(&mut wire, version, MAX).unwrap(), Some(Packet::Publish(publish)));
//! assert_eq!(decode(&mut wire, version, MAX).unwrap(), None); // needs more bytes
//!
//! // A PINGREQ split across two reads.
//! let mut wire = BytesMut::from(&[0xC0][..]);
//! assert_eq!(decode(&mut wire, version, MAX).unwrap(), None);
//! wire.extend_from_slice(&[0x00]);
//! assert_eq!(decode(&mut wire, version, MAX).unwrap(), Some(Packet::PingReq));
//! ```

#![warn(missing_docs)]

#[cfg(feature = "tokio-codec")]
mod codec;
mod decode;
mod encode;
mod error;
mod packet;
mod properties;
mod reason;
mod topic;
mod wire;

/// The `bytes` crate this codec's buffers come from.
pub use bytes;
#[cfg(feature = "tokio-codec")]
pub use codec::{CodecError, MqttCodec};
pub use decode::{decode, decode_connect};
pub use encode::{encode, encoded_len};
pub use error::{DecodeError, EncodeError};
pub use packet::{
    Auth, ConnAck, Connect, Disconnect, Packet, PacketType, ProtocolVersion, PubAck, PubComp,
    PubRec, PubRel, Publish, QoS, RetainHandling, SubAck, Subscribe, Subscription,
    SubscriptionOptions, UnsubAck, Unsubscribe, Will,
};
pub use properties::{
    AckProperties, AuthProperties, ConnAckProperties, ConnectProperties, DisconnectProperties,
    PropertyId, PublishProperties, SubscribeProperties, UnsubscribeProperties, WillProperties,
};
pub use reason::ReasonCode;
pub use topic::{
    parse_shared_subscription, validate_topic_filter, validate_topic_name, TopicError, SHARE_PREFIX,
};
