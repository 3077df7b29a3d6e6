//! One test per validation rule: the exact error, and the reason code a server answers it with.
#![allow(clippy::unwrap_used)]

use bytes::{Bytes, BytesMut};
use ferry_mqtt::{
    decode, decode_connect, encode, encoded_len, Auth, ConnAck, Connect, ConnectProperties,
    DecodeError, EncodeError, Packet, PacketType, PropertyId, ProtocolVersion, PubAck, Publish,
    PublishProperties, QoS, ReasonCode, Subscribe, Subscription, SubscriptionOptions, TopicError,
    Unsubscribe,
};

use ProtocolVersion::{V311, V5};

const MAX: usize = 1 << 20;

/// A packet with first byte `first` and body `body` (remaining length computed).
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128);
    let mut bytes = vec![first, body.len() as u8];
    bytes.extend_from_slice(body);
    bytes
}

/// A length-prefixed string.
fn s(text: &[u8]) -> Vec<u8> {
    let mut out = vec![0, text.len() as u8];
    out.extend_from_slice(text);
    out
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Decoding `bytes` in `version` fails with `expected`, which maps to `reason`.
fn rejects(version: ProtocolVersion, bytes: &[u8], expected: DecodeError, reason: u8) {
    let mut buf = BytesMut::from(bytes);
    let err = decode(&mut buf, version, MAX).unwrap_err();
    assert_eq!(err, expected, "decoding {bytes:02X?}");
    assert_eq!(err.reason_code().value(), reason, "reason code of {err:?}");
}

/// Encoding `packet` fails with `EncodeError::Invalid(expected)` and writes nothing.
fn refuses(version: ProtocolVersion, packet: impl Into<Packet>, expected: DecodeError) {
    let packet = packet.into();
    let mut out = BytesMut::from(&b"keep"[..]);
    assert_eq!(
        encode(&packet, version, &mut out),
        Err(EncodeError::Invalid(expected.clone()))
    );
    assert_eq!(&out[..], b"keep");
    assert_eq!(
        encoded_len(&packet, version),
        Err(EncodeError::Invalid(expected))
    );
}

/// A v5 CONNECT body (client id "c") with the given flags, properties and extra payload.
fn connect_v5(flags: u8, props: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = cat(&[
        &s(b"MQTT"),
        &[5, flags, 0, 60, props.len() as u8],
        props,
        &s(b"c"),
    ]);
    body.extend_from_slice(payload);
    frame(0x10, &body)
}

fn connect_v311(flags: u8, payload: &[u8]) -> Vec<u8> {
    frame(
        0x10,
        &cat(&[&s(b"MQTT"), &[4, flags, 0, 60], &s(b"c"), payload]),
    )
}

#[test]
fn remaining_length_longer_than_four_bytes() {
    rejects(
        V5,
        &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
        DecodeError::MalformedVariableInteger,
        0x81,
    );
    // Detected as soon as the fifth byte is due, even without it.
    rejects(
        V311,
        &[0x30, 0x80, 0x80, 0x80, 0x80],
        DecodeError::MalformedVariableInteger,
        0x81,
    );
}

#[test]
fn remaining_length_not_minimal() {
    rejects(
        V5,
        &[0xC0, 0x80, 0x00],
        DecodeError::MalformedVariableInteger,
        0x81,
    );
}

#[test]
fn packet_too_large_from_the_fixed_header() {
    // Remaining length 2,097,151: only the fixed header is there.
    let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0x7F][..]);
    let err = decode(&mut buf, V5, 1024).unwrap_err();
    assert_eq!(
        err,
        DecodeError::PacketTooLarge {
            size: 2_097_151 + 4,
            max: 1024
        }
    );
    assert_eq!(err.reason_code(), ReasonCode::PacketTooLarge);
    assert_eq!(buf.len(), 4, "nothing consumed");
    // The limit counts the fixed header: PINGREQ is 2 bytes.
    let mut buf = BytesMut::from(&[0xC0, 0x00][..]);
    assert!(matches!(
        decode(&mut buf, V5, 1),
        Err(DecodeError::PacketTooLarge { size: 2, max: 1 })
    ));
    let mut buf = BytesMut::from(&[0xC0, 0x00][..]);
    assert_eq!(decode(&mut buf, V5, 2), Ok(Some(Packet::PingReq)));
    // Also before CONNECT.
    let mut buf = BytesMut::from(&[0x10, 0xFF, 0x7F][..]);
    assert!(matches!(
        decode_connect(&mut buf, 100),
        Err(DecodeError::PacketTooLarge {
            size: 16_386,
            max: 100
        })
    ));
}

#[test]
fn reserved_fixed_header_flags() {
    for (first, packet) in [
        (0x60, PacketType::PubRel),
        (0x80, PacketType::Subscribe),
        (0xA0, PacketType::Unsubscribe),
        (0x11, PacketType::Connect),
        (0x42, PacketType::PubAck),
        (0xC1, PacketType::PingReq),
        (0xE8, PacketType::Disconnect),
    ] {
        let flags = first & 0x0F;
        for version in [V311, V5] {
            rejects(
                version,
                &[first, 0x02, 0x00, 0x01],
                DecodeError::InvalidFixedHeaderFlags { packet, flags },
                0x81,
            );
        }
    }
    // Checked from the first byte alone.
    rejects(
        V5,
        &[0x60],
        DecodeError::InvalidFixedHeaderFlags {
            packet: PacketType::PubRel,
            flags: 0,
        },
        0x81,
    );
}

#[test]
fn publish_qos_3() {
    rejects(
        V5,
        &frame(0x36, &[0, 1, b't', 0, 1]),
        DecodeError::InvalidQoS(3),
        0x81,
    );
}

#[test]
fn publish_dup_at_qos_0() {
    rejects(
        V311,
        &frame(0x38, &[0, 1, b't']),
        DecodeError::InvalidFixedHeaderFlags {
            packet: PacketType::Publish,
            flags: 0b1000,
        },
        0x81,
    );
    refuses(
        V311,
        Publish {
            dup: true,
            ..Publish::new("t", "")
        },
        DecodeError::InvalidFixedHeaderFlags {
            packet: PacketType::Publish,
            flags: 0b1000,
        },
    );
}

#[test]
fn packet_id_zero() {
    let zero = DecodeError::ZeroPacketIdentifier;
    rejects(V5, &[0x40, 0x02, 0x00, 0x00], zero.clone(), 0x82);
    rejects(V311, &frame(0x32, &[0, 1, b't', 0, 0]), zero.clone(), 0x82);
    rejects(
        V311,
        &frame(0x82, &cat(&[&[0, 0], &s(b"a"), &[0]])),
        zero.clone(),
        0x82,
    );
    rejects(V311, &[0xB0, 0x02, 0x00, 0x00], zero.clone(), 0x82);
    refuses(V5, PubAck::new(0), zero.clone());
    refuses(
        V5,
        Publish {
            qos: QoS::AtLeastOnce,
            packet_id: Some(0),
            ..Publish::new("t", "")
        },
        zero,
    );
}

#[test]
fn publish_packet_id_must_match_qos() {
    for (qos, packet_id) in [(QoS::AtMostOnce, Some(1)), (QoS::ExactlyOnce, None)] {
        let publish = Publish {
            qos,
            packet_id,
            ..Publish::new("t", "")
        };
        assert_eq!(
            encode(&publish.into(), V5, &mut BytesMut::new()),
            Err(EncodeError::PacketIdQoSMismatch)
        );
    }
}

#[test]
fn invalid_utf8() {
    rejects(
        V311,
        &frame(0x30, &[0, 2, 0xC3, 0x28]),
        DecodeError::InvalidUtf8,
        0x81,
    );
    // In a property too (Content Type).
    rejects(
        V5,
        &frame(0x30, &[0, 1, b't', 4, 0x03, 0, 1, 0xFF]),
        DecodeError::InvalidUtf8,
        0x81,
    );
}

#[test]
fn null_character() {
    rejects(
        V311,
        &frame(0x30, &[0, 3, b'a', 0, b'b']),
        DecodeError::NullCharacter,
        0x81,
    );
    // In any string, e.g. a client id.
    rejects(
        V311,
        &frame(0x10, &cat(&[&s(b"MQTT"), &[4, 2, 0, 60], &s(b"a\0")])),
        DecodeError::NullCharacter,
        0x81,
    );
    assert_eq!(
        encode(&Connect::new(V5, "a\0").into(), V5, &mut BytesMut::new()),
        Err(EncodeError::Invalid(DecodeError::NullCharacter))
    );
}

#[test]
fn wildcard_in_publish_topic() {
    for topic in [&b"a/+"[..], b"#", b"a/b#"] {
        rejects(
            V5,
            &frame(0x30, &cat(&[&s(topic), &[0]])),
            DecodeError::InvalidTopicName(TopicError::WildcardInTopicName),
            0x90,
        );
    }
    refuses(
        V311,
        Publish::new("a/#", ""),
        DecodeError::InvalidTopicName(TopicError::WildcardInTopicName),
    );
    // And in a will topic.
    rejects(
        V311,
        &connect_v311(0x06, &cat(&[&s(b"w/+"), &s(b"")])),
        DecodeError::InvalidTopicName(TopicError::WildcardInTopicName),
        0x90,
    );
}

#[test]
fn empty_publish_topic() {
    rejects(
        V311,
        &frame(0x30, &[0, 0, b'x']),
        DecodeError::InvalidTopicName(TopicError::Empty),
        0x90,
    );
    rejects(
        V5,
        &frame(0x30, &[0, 0, 0, b'x']),
        DecodeError::EmptyTopicWithoutAlias,
        0x82,
    );
    // Fine in 5.0 with a Topic Alias.
    let mut buf = BytesMut::from(&frame(0x30, &[0, 0, 3, 0x23, 0, 1, b'x'])[..]);
    assert!(decode(&mut buf, V5, MAX).unwrap().is_some());
    refuses(
        V5,
        Publish::new("", "x"),
        DecodeError::EmptyTopicWithoutAlias,
    );
    // A topic alias means nothing in 3.1.1, where it is dropped.
    let aliased = Publish {
        properties: PublishProperties {
            topic_alias: Some(1),
            ..Default::default()
        },
        ..Publish::new("", "x")
    };
    refuses(
        V311,
        aliased,
        DecodeError::InvalidTopicName(TopicError::Empty),
    );
}

#[test]
fn empty_subscribe_and_unsubscribe() {
    rejects(
        V311,
        &frame(0x82, &[0, 1]),
        DecodeError::EmptySubscription,
        0x82,
    );
    rejects(
        V5,
        &frame(0x82, &[0, 1, 0]),
        DecodeError::EmptySubscription,
        0x82,
    );
    rejects(
        V311,
        &frame(0xA2, &[0, 1]),
        DecodeError::EmptySubscription,
        0x82,
    );
    refuses(
        V5,
        Subscribe {
            packet_id: 1,
            subscriptions: vec![],
            properties: Default::default(),
        },
        DecodeError::EmptySubscription,
    );
    refuses(
        V311,
        Unsubscribe {
            packet_id: 1,
            filters: vec![],
            properties: Default::default(),
        },
        DecodeError::EmptySubscription,
    );
}

#[test]
fn invalid_topic_filter() {
    rejects(
        V311,
        &frame(0x82, &cat(&[&[0, 1], &s(b"a/#/b"), &[0]])),
        DecodeError::InvalidTopicFilter(TopicError::MisplacedWildcard),
        0x8F,
    );
    rejects(
        V5,
        &frame(0xA2, &cat(&[&[0, 1, 0], &s(b"")])),
        DecodeError::InvalidTopicFilter(TopicError::Empty),
        0x8F,
    );
}

#[test]
fn invalid_shared_subscription() {
    rejects(
        V5,
        &frame(0x82, &cat(&[&[0, 1, 0], &s(b"$share/g+/a"), &[0]])),
        DecodeError::InvalidTopicFilter(TopicError::InvalidShareName),
        0x8F,
    );
    rejects(
        V5,
        &frame(0x82, &cat(&[&[0, 1, 0], &s(b"$share/g"), &[0]])),
        DecodeError::InvalidTopicFilter(TopicError::MissingSharedFilter),
        0x8F,
    );
    // 3.1.1 has no shared subscriptions: "$share/g" is an ordinary filter there.
    let mut buf = BytesMut::from(&frame(0x82, &cat(&[&[0, 1], &s(b"$share/g"), &[0]]))[..]);
    assert!(decode(&mut buf, V311, MAX).unwrap().is_some());
}

#[test]
fn no_local_on_shared_subscription() {
    rejects(
        V5,
        &frame(0x82, &cat(&[&[0, 1, 0], &s(b"$share/g/a"), &[0b0100]])),
        DecodeError::SharedSubscriptionNoLocal,
        0x82,
    );
    refuses(
        V5,
        Subscribe {
            packet_id: 1,
            subscriptions: vec![Subscription {
                filter: "$share/g/a".into(),
                options: SubscriptionOptions {
                    no_local: true,
                    ..Default::default()
                },
            }],
            properties: Default::default(),
        },
        DecodeError::SharedSubscriptionNoLocal,
    );
}

#[test]
fn invalid_subscription_options() {
    let sub = |options: u8| frame(0x82, &cat(&[&[0, 1, 0], &s(b"a"), &[options]]));
    // Reserved bits.
    rejects(
        V5,
        &sub(0x40),
        DecodeError::InvalidSubscriptionOptions(0x40),
        0x81,
    );
    // Retain Handling 3.
    rejects(
        V5,
        &sub(0x30),
        DecodeError::InvalidSubscriptionOptions(0x30),
        0x81,
    );
    // QoS 3.
    rejects(V5, &sub(0x03), DecodeError::InvalidQoS(3), 0x81);
    // In 3.1.1 everything above the QoS bits is reserved.
    rejects(
        V311,
        &frame(0x82, &cat(&[&[0, 1], &s(b"a"), &[0x04]])),
        DecodeError::InvalidSubscriptionOptions(0x04),
        0x81,
    );
}

#[test]
fn duplicate_property() {
    // Two Session Expiry Intervals in CONNECT.
    let props = [0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2];
    rejects(
        V5,
        &connect_v5(0x02, &props, &[]),
        DecodeError::DuplicateProperty(PropertyId::SessionExpiryInterval),
        0x82,
    );
    // User properties and PUBLISH subscription identifiers may repeat.
    let props = [0x26, 0, 1, b'k', 0, 0, 0x26, 0, 1, b'k', 0, 0];
    let mut buf = BytesMut::from(&connect_v5(0x02, &props, &[])[..]);
    let connect = decode_connect(&mut buf, MAX).unwrap().unwrap();
    assert_eq!(connect.properties.user_properties.len(), 2);
    let mut buf = BytesMut::from(&frame(0x30, &[0, 1, b't', 4, 0x0B, 1, 0x0B, 2])[..]);
    let Some(Packet::Publish(publish)) = decode(&mut buf, V5, MAX).unwrap() else {
        panic!("not a PUBLISH");
    };
    assert_eq!(publish.properties.subscription_identifiers, [1, 2]);
    // ... but not in SUBSCRIBE.
    rejects(
        V5,
        &frame(0x82, &cat(&[&[0, 1, 4, 0x0B, 1, 0x0B, 2], &s(b"a"), &[0]])),
        DecodeError::DuplicateProperty(PropertyId::SubscriptionIdentifier),
        0x82,
    );
}

#[test]
fn property_not_allowed_in_packet() {
    // Topic Alias in CONNECT.
    rejects(
        V5,
        &connect_v5(0x02, &[0x23, 0, 1], &[]),
        DecodeError::PropertyNotAllowed {
            property: PropertyId::TopicAlias,
            packet: PacketType::Connect,
        },
        0x81,
    );
    // Session Expiry Interval in PUBACK.
    rejects(
        V5,
        &frame(0x40, &[0, 1, 0, 5, 0x11, 0, 0, 0, 1]),
        DecodeError::PropertyNotAllowed {
            property: PropertyId::SessionExpiryInterval,
            packet: PacketType::PubAck,
        },
        0x81,
    );
}

#[test]
fn unknown_property() {
    rejects(
        V5,
        &frame(0x30, &[0, 1, b't', 2, 0x7F, 0]),
        DecodeError::UnknownProperty(0x7F),
        0x81,
    );
}

#[test]
fn invalid_property_values() {
    let cases: [(&[u8], PropertyId); 4] = [
        (&[0x21, 0, 0], PropertyId::ReceiveMaximum),
        (&[0x27, 0, 0, 0, 0], PropertyId::MaximumPacketSize),
        (&[0x17, 2], PropertyId::RequestProblemInformation),
        (&[0x19, 7], PropertyId::RequestResponseInformation),
    ];
    for (props, id) in &cases {
        rejects(
            V5,
            &connect_v5(0x02, props, &[]),
            DecodeError::InvalidPropertyValue(*id),
            0x82,
        );
    }
    // Maximum QoS 2 in CONNACK, Topic Alias 0 and Subscription Identifier 0 in PUBLISH, a
    // Response Topic with a wildcard.
    rejects(
        V5,
        &frame(0x20, &[0, 0, 2, 0x24, 2]),
        DecodeError::InvalidPropertyValue(PropertyId::MaximumQoS),
        0x82,
    );
    for (props, id) in [
        (&[0x23, 0, 0][..], PropertyId::TopicAlias),
        (&[0x0B, 0][..], PropertyId::SubscriptionIdentifier),
        (&[0x08, 0, 1, b'#'][..], PropertyId::ResponseTopic),
    ] {
        let body = cat(&[&[0, 1, b't', props.len() as u8], props]);
        rejects(
            V5,
            &frame(0x30, &body),
            DecodeError::InvalidPropertyValue(id),
            0x82,
        );
    }
    refuses(
        V5,
        Connect {
            properties: ConnectProperties {
                receive_maximum: Some(0),
                ..Default::default()
            },
            ..Connect::new(V5, "c")
        },
        DecodeError::InvalidPropertyValue(PropertyId::ReceiveMaximum),
    );
}

#[test]
fn auth_data_without_method() {
    rejects(
        V5,
        &connect_v5(0x02, &[0x16, 0, 1, 9], &[]),
        DecodeError::AuthDataWithoutMethod,
        0x82,
    );
    refuses(
        V5,
        Connect {
            properties: ConnectProperties {
                authentication_data: Some(Bytes::from_static(b"x")),
                ..Default::default()
            },
            ..Connect::new(V5, "c")
        },
        DecodeError::AuthDataWithoutMethod,
    );
}

#[test]
fn unsupported_protocol_version() {
    for (name, level) in [
        (&b"MQTT"[..], 3u8),
        (b"MQTT", 6),
        (b"MQIsdp", 3),
        (b"HTTP", 4),
    ] {
        let bytes = frame(0x10, &cat(&[&s(name), &[level, 2, 0, 60], &s(b"c")]));
        let expected = DecodeError::UnsupportedProtocolVersion {
            name: String::from_utf8(name.to_vec()).unwrap(),
            level,
        };
        let mut buf = BytesMut::from(&bytes[..]);
        let err = decode_connect(&mut buf, MAX).unwrap_err();
        assert_eq!(err, expected);
        assert_eq!(err.reason_code(), ReasonCode::UnsupportedProtocolVersion);
        assert_eq!(err.reason_code().to_v311_connack(), 0x01);
        rejects(V311, &bytes, expected, 0x84);
    }
}

#[test]
fn invalid_connect_flags() {
    // Reserved bit.
    rejects(
        V5,
        &connect_v5(0x03, &[], &[]),
        DecodeError::InvalidConnectFlags(0x03),
        0x81,
    );
    // Will QoS or Will Retain without the Will Flag.
    rejects(
        V5,
        &connect_v5(0x0A, &[], &[]),
        DecodeError::InvalidConnectFlags(0x0A),
        0x81,
    );
    rejects(
        V311,
        &connect_v311(0x22, &[]),
        DecodeError::InvalidConnectFlags(0x22),
        0x81,
    );
    // Will QoS 3.
    rejects(
        V5,
        &connect_v5(0x1E, &[], &[]),
        DecodeError::InvalidQoS(3),
        0x81,
    );
    // 3.1.1: password without user name (allowed in 5.0).
    rejects(
        V311,
        &connect_v311(0x42, &s(b"pw")),
        DecodeError::InvalidConnectFlags(0x42),
        0x81,
    );
    let mut buf = BytesMut::from(&connect_v5(0x42, &[], &s(b"pw"))[..]);
    assert!(decode_connect(&mut buf, MAX).unwrap().is_some());
    refuses(
        V311,
        Connect {
            password: Some(Bytes::from_static(b"pw")),
            ..Connect::new(V311, "c")
        },
        DecodeError::InvalidConnectFlags(0x42),
    );
}

#[test]
fn invalid_connack_flags() {
    rejects(
        V311,
        &[0x20, 0x02, 0x02, 0x00],
        DecodeError::InvalidConnAckFlags(0x02),
        0x81,
    );
    // Session present with a refusal.
    rejects(
        V5,
        &[0x20, 0x03, 0x01, 0x87, 0x00],
        DecodeError::InvalidConnAckFlags(0x01),
        0x81,
    );
    refuses(
        V5,
        ConnAck {
            session_present: true,
            reason_code: ReasonCode::NotAuthorized,
            properties: Default::default(),
        },
        DecodeError::InvalidConnAckFlags(0x01),
    );
}

#[test]
fn reason_code_not_allowed() {
    // "No matching subscribers" is a PUBACK/PUBREC code, not a PUBREL one.
    rejects(
        V5,
        &[0x62, 0x03, 0x00, 0x01, 0x10],
        DecodeError::InvalidReasonCode {
            code: 0x10,
            packet: PacketType::PubRel,
        },
        0x81,
    );
    // Undefined code.
    rejects(
        V5,
        &[0xE0, 0x01, 0x03],
        DecodeError::InvalidReasonCode {
            code: 0x03,
            packet: PacketType::Disconnect,
        },
        0x81,
    );
    // 3.1.1 CONNACK return code 6 and SUBACK code 3 are reserved.
    rejects(
        V311,
        &[0x20, 0x02, 0x00, 0x06],
        DecodeError::InvalidReasonCode {
            code: 6,
            packet: PacketType::ConnAck,
        },
        0x81,
    );
    rejects(
        V311,
        &[0x90, 0x03, 0x00, 0x01, 0x03],
        DecodeError::InvalidReasonCode {
            code: 3,
            packet: PacketType::SubAck,
        },
        0x81,
    );
    refuses(
        V5,
        Auth {
            reason_code: ReasonCode::Banned,
            properties: Default::default(),
        },
        DecodeError::InvalidReasonCode {
            code: 0x8A,
            packet: PacketType::Auth,
        },
    );
}

#[test]
fn lengths_beyond_the_packet() {
    // String length 5 with 1 byte left.
    rejects(
        V311,
        &frame(0x30, &[0, 5, b'a']),
        DecodeError::FieldOutOfBounds,
        0x81,
    );
    // Property length 9 with 2 bytes left.
    rejects(
        V5,
        &frame(0x30, &[0, 1, b't', 9, 0x01, 0]),
        DecodeError::FieldOutOfBounds,
        0x81,
    );
    // A property value cut by the end of the property section.
    rejects(
        V5,
        &frame(0x30, &[0, 1, b't', 2, 0x02, 0, 0, 0]),
        DecodeError::FieldOutOfBounds,
        0x81,
    );
    // A missing packet identifier.
    rejects(
        V311,
        &[0x40, 0x01, 0x00],
        DecodeError::FieldOutOfBounds,
        0x81,
    );
}

#[test]
fn trailing_bytes() {
    rejects(V5, &[0xC0, 0x01, 0x00], DecodeError::TrailingBytes(1), 0x81);
    rejects(
        V311,
        &[0x40, 0x03, 0x00, 0x01, 0x00],
        DecodeError::TrailingBytes(1),
        0x81,
    );
    rejects(
        V311,
        &[0xE0, 0x01, 0x00],
        DecodeError::TrailingBytes(1),
        0x81,
    );
    rejects(
        V311,
        &connect_v311(0x02, &[0xAA]),
        DecodeError::TrailingBytes(1),
        0x81,
    );
    rejects(
        V5,
        &[0x40, 0x05, 0x00, 0x01, 0x00, 0x00, 0xAA],
        DecodeError::TrailingBytes(1),
        0x81,
    );
}

#[test]
fn invalid_packet_type() {
    rejects(V5, &[0x00, 0x00], DecodeError::InvalidPacketType(0), 0x81);
    // AUTH does not exist in 3.1.1.
    rejects(
        V311,
        &[0xF0, 0x00],
        DecodeError::InvalidPacketType(15),
        0x81,
    );
    assert_eq!(
        encode(&Auth::default().into(), V311, &mut BytesMut::new()),
        Err(EncodeError::UnsupportedPacket {
            packet: PacketType::Auth,
            version: V311
        })
    );
}

#[test]
fn first_packet_must_be_connect() {
    let mut buf = BytesMut::from(&[0xC0, 0x00][..]);
    let err = decode_connect(&mut buf, MAX).unwrap_err();
    assert_eq!(err, DecodeError::ExpectedConnect(PacketType::PingReq));
    assert_eq!(err.reason_code(), ReasonCode::ProtocolError);
}

#[test]
fn oversized_fields_are_refused_by_the_encoder() {
    let long = "a".repeat(70_000);
    assert_eq!(
        encode(&Connect::new(V5, long).into(), V5, &mut BytesMut::new()),
        Err(EncodeError::FieldTooLong(70_000))
    );
    assert_eq!(
        encode(
            &Publish::new("a".repeat(65_536), "").into(),
            V5,
            &mut BytesMut::new()
        ),
        Err(EncodeError::Invalid(DecodeError::InvalidTopicName(
            TopicError::TooLong(65_536)
        )))
    );
}
