//! Known byte sequences, laid out as in the MQTT 3.1.1 and 5.0 specs and as mosquitto_pub sends
//! them: each decodes to the expected packet and the packet encodes back to the same bytes.
#![allow(clippy::unwrap_used)]

use bytes::{Bytes, BytesMut};
use ferry_mqtt::{
    decode, decode_connect, encode, AckProperties, Auth, ConnAck, ConnAckProperties, Connect,
    ConnectProperties, Disconnect, Packet, ProtocolVersion, PubAck, PubRel, Publish,
    PublishProperties, QoS, ReasonCode, SubAck, Subscribe, SubscribeProperties, Subscription,
    SubscriptionOptions, UnsubAck, Unsubscribe, Will,
};

use ProtocolVersion::{V311, V5};

const MAX: usize = 1 << 20;

/// `bytes` decodes to exactly `packet` in `version` and `packet` encodes to exactly `bytes`.
fn check(version: ProtocolVersion, bytes: &[u8], packet: Packet) {
    let mut buf = BytesMut::from(bytes);
    assert_eq!(
        decode(&mut buf, version, MAX).unwrap(),
        Some(packet.clone())
    );
    assert!(buf.is_empty());
    let mut out = BytesMut::new();
    encode(&packet, version, &mut out).unwrap();
    assert_eq!(&out[..], bytes, "encoding of {packet:?}");
}

/// `bytes` decodes to `packet` (a non-canonical but valid form), without checking the encoding.
fn decodes_to(version: ProtocolVersion, bytes: &[u8], packet: Packet) {
    let mut buf = BytesMut::from(bytes);
    assert_eq!(decode(&mut buf, version, MAX).unwrap(), Some(packet));
    assert!(buf.is_empty());
}

#[test]
fn pingreq_pingresp() {
    for version in [V311, V5] {
        check(version, &[0xC0, 0x00], Packet::PingReq);
        check(version, &[0xD0, 0x00], Packet::PingResp);
    }
}

/// `mosquitto_pub -V mqttv311 -i test ...`: clean session, keep alive 60, client id "test".
#[test]
fn mosquitto_pub_connect_v311() {
    let bytes = [
        0x10, 0x10, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C, 0x00, 0x04, b't',
        b'e', b's', b't',
    ];
    let connect = Connect::new(V311, "test");
    check(V311, &bytes, Packet::Connect(connect.clone()));
    let mut buf = BytesMut::from(&bytes[..]);
    assert_eq!(decode_connect(&mut buf, MAX).unwrap(), Some(connect));
}

/// `mosquitto_pub -V 5 -i test ...`: as above, level 5, empty properties.
#[test]
fn mosquitto_pub_connect_v5() {
    let bytes = [
        0x10, 0x11, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3C, 0x00, 0x00, 0x04,
        b't', b'e', b's', b't',
    ];
    let connect = Connect::new(V5, "test");
    let mut buf = BytesMut::from(&bytes[..]);
    assert_eq!(
        decode_connect(&mut buf, MAX).unwrap(),
        Some(connect.clone())
    );
    // CONNECT carries its own version: decoding it on a "3.1.1" connection still reads 5.0.
    check(V311, &bytes, Packet::Connect(connect));
}

/// The variable header of the 3.1.1 spec's CONNECT example (flags 0xCE: user name, password,
/// will QoS 1, will flag, clean session; keep alive 10), with a payload.
#[test]
fn spec_connect_v311_with_will_and_credentials() {
    let mut bytes = vec![0x10, 0x00];
    bytes.extend_from_slice(&[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0xCE, 0x00, 0x0A]);
    for field in [&b"cid"[..], b"w/t", b"bye", b"user", b"pass"] {
        bytes.extend_from_slice(&[0x00, field.len() as u8]);
        bytes.extend_from_slice(field);
    }
    bytes[1] = (bytes.len() - 2) as u8;
    let connect = Connect {
        protocol_version: V311,
        client_id: "cid".into(),
        clean_start: true,
        keep_alive: 10,
        username: Some("user".into()),
        password: Some(Bytes::from_static(b"pass")),
        will: Some(Will {
            topic: "w/t".into(),
            payload: Bytes::from_static(b"bye"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
        }),
        properties: Default::default(),
    };
    check(V311, &bytes, Packet::Connect(connect));
}

/// The variable header of the 5.0 spec's CONNECT example (flags 0xC2, keep alive 10, Session
/// Expiry Interval 10), with a payload.
#[test]
fn spec_connect_v5_with_session_expiry() {
    let mut bytes = vec![0x10, 0x00];
    bytes.extend_from_slice(&[
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0xC2, 0x00, 0x0A, 0x05, 0x11, 0x00, 0x00, 0x00,
        0x0A,
    ]);
    for field in [&b"c"[..], b"u", b"p"] {
        bytes.extend_from_slice(&[0x00, field.len() as u8]);
        bytes.extend_from_slice(field);
    }
    bytes[1] = (bytes.len() - 2) as u8;
    let connect = Connect {
        protocol_version: V5,
        client_id: "c".into(),
        clean_start: true,
        keep_alive: 10,
        username: Some("u".into()),
        password: Some(Bytes::from_static(b"p")),
        will: None,
        properties: ConnectProperties {
            session_expiry_interval: Some(10),
            ..Default::default()
        },
    };
    check(V5, &bytes, Packet::Connect(connect));
}

#[test]
fn connack() {
    check(V311, &[0x20, 0x02, 0x00, 0x00], ConnAck::default().into());
    check(
        V311,
        &[0x20, 0x02, 0x01, 0x00],
        ConnAck {
            session_present: true,
            ..Default::default()
        }
        .into(),
    );
    // 3.1.1 return code 5 is "not authorized".
    let refused = ConnAck {
        reason_code: ReasonCode::NotAuthorized,
        ..Default::default()
    };
    check(V311, &[0x20, 0x02, 0x00, 0x05], refused.clone().into());
    check(V5, &[0x20, 0x03, 0x00, 0x87, 0x00], refused.into());
    // A v5-only refusal sent to a 3.1.1 client becomes a 3.1.1 return code.
    let mut out = BytesMut::new();
    let banned = ConnAck {
        reason_code: ReasonCode::Banned,
        ..Default::default()
    };
    encode(&banned.into(), V311, &mut out).unwrap();
    assert_eq!(&out[..], [0x20, 0x02, 0x00, 0x05]);
    // Properties: Receive Maximum 10, Maximum QoS 1, Assigned Client Identifier "id".
    check(
        V5,
        &[
            0x20, 0x0D, 0x00, 0x00, 0x0A, 0x21, 0x00, 0x0A, 0x24, 0x01, 0x12, 0x00, 0x02, b'i',
            b'd',
        ][..],
        ConnAck {
            properties: ConnAckProperties {
                receive_maximum: Some(10),
                maximum_qos: Some(QoS::AtLeastOnce),
                assigned_client_identifier: Some("id".into()),
                ..Default::default()
            },
            ..Default::default()
        }
        .into(),
    );
}

fn publish_qos1() -> Publish {
    Publish {
        qos: QoS::AtLeastOnce,
        packet_id: Some(1),
        ..Publish::new("a/b", "hi")
    }
}

#[test]
fn publish_qos1_with_packet_id() {
    check(
        V311,
        &[
            0x32, 0x09, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x01, b'h', b'i',
        ],
        publish_qos1().into(),
    );
    check(
        V5,
        &[
            0x32, 0x0A, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x01, 0x00, b'h', b'i',
        ],
        publish_qos1().into(),
    );
}

#[test]
fn publish_qos0_retained_and_qos2_dup() {
    check(
        V311,
        &[0x31, 0x05, 0x00, 0x01, b't', b'x', b'y'],
        Publish {
            retain: true,
            ..Publish::new("t", "xy")
        }
        .into(),
    );
    check(
        V311,
        &[0x3C, 0x05, 0x00, 0x01, b't', 0xAB, 0xCD],
        Publish {
            dup: true,
            qos: QoS::ExactlyOnce,
            packet_id: Some(0xABCD),
            ..Publish::new("t", "")
        }
        .into(),
    );
}

#[test]
fn publish_v5_properties_and_topic_alias() {
    // Empty topic, properties: Topic Alias 7, Subscription Identifier 1 and 300, User Property
    // ("k", "v").
    let bytes = [
        0x30, 0x14, 0x00, 0x00, 0x0F, 0x23, 0x00, 0x07, 0x0B, 0x01, 0x0B, 0xAC, 0x02, 0x26, 0x00,
        0x01, b'k', 0x00, 0x01, b'v', b'p', b'l',
    ];
    let publish = Publish {
        properties: PublishProperties {
            topic_alias: Some(7),
            subscription_identifiers: vec![1, 300],
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        },
        ..Publish::new("", "pl")
    };
    check(V5, &bytes, publish.into());
}

#[test]
fn publish_payload_is_a_zero_copy_slice() {
    let bytes = [0x30, 0x07, 0x00, 0x01, b't', b'a', b'b', b'c', b'd'];
    let mut buf = BytesMut::from(&bytes[..]);
    let base = buf.as_ptr() as usize;
    let Some(Packet::Publish(publish)) = decode(&mut buf, V311, MAX).unwrap() else {
        panic!("not a PUBLISH");
    };
    assert_eq!(&publish.payload[..], b"abcd");
    assert_eq!(publish.payload.as_ptr() as usize, base + 5);
}

#[test]
fn two_byte_remaining_length() {
    let publish: Packet = Publish::new("t", vec![7u8; 200]).into();
    let mut out = BytesMut::new();
    encode(&publish, V311, &mut out).unwrap();
    // 3 + 200 = 203 = 0xCB = [0xCB, 0x01].
    assert_eq!(&out[..4], [0x30, 0xCB, 0x01, 0x00]);
    assert_eq!(out.len(), 3 + 203);
    decodes_to(V311, &out, publish);
}

#[test]
fn pub_acks() {
    check(V311, &[0x40, 0x02, 0x00, 0x01], PubAck::new(1).into());
    check(V5, &[0x40, 0x02, 0x00, 0x01], PubAck::new(1).into());
    let no_subscribers = PubAck {
        reason_code: ReasonCode::NoMatchingSubscribers,
        ..PubAck::new(1)
    };
    check(
        V5,
        &[0x40, 0x03, 0x00, 0x01, 0x10],
        no_subscribers.clone().into(),
    );
    // Reason code and an explicit empty property length: same packet.
    decodes_to(
        V5,
        &[0x40, 0x04, 0x00, 0x01, 0x00, 0x00],
        PubAck::new(1).into(),
    );
    // 3.1.1 has no reason code: it is dropped.
    let mut out = BytesMut::new();
    encode(&no_subscribers.into(), V311, &mut out).unwrap();
    assert_eq!(&out[..], [0x40, 0x02, 0x00, 0x01]);
    check(V311, &[0x62, 0x02, 0x12, 0x34], PubRel::new(0x1234).into());
    check(
        V5,
        &[
            0x62, 0x0A, 0x12, 0x34, 0x92, 0x06, 0x1F, 0x00, 0x03, b'g', b'o', b'n',
        ],
        PubRel {
            reason_code: ReasonCode::PacketIdentifierNotFound,
            properties: AckProperties {
                reason_string: Some("gon".into()),
                ..Default::default()
            },
            ..PubRel::new(0x1234)
        }
        .into(),
    );
}

#[test]
fn subscribe_and_suback() {
    let subscribe = Subscribe {
        packet_id: 1,
        subscriptions: vec![Subscription::new("a/b", QoS::AtLeastOnce)],
        properties: Default::default(),
    };
    check(
        V311,
        &[0x82, 0x08, 0x00, 0x01, 0x00, 0x03, b'a', b'/', b'b', 0x01],
        subscribe.clone().into(),
    );
    // 5.0: Subscription Identifier 5; options QoS 2, No Local, Retain As Published, Retain
    // Handling 2 = 0b0010_1110.
    let subscribe_v5 = Subscribe {
        properties: SubscribeProperties {
            subscription_identifier: Some(5),
            ..Default::default()
        },
        subscriptions: vec![Subscription {
            filter: "a/+".into(),
            options: SubscriptionOptions {
                qos: QoS::ExactlyOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: ferry_mqtt::RetainHandling::DoNotSend,
            },
        }],
        ..subscribe
    };
    check(
        V5,
        &[
            0x82, 0x0B, 0x00, 0x01, 0x02, 0x0B, 0x05, 0x00, 0x03, b'a', b'/', b'+', 0x2E,
        ],
        subscribe_v5.into(),
    );
    let suback = SubAck {
        packet_id: 1,
        reason_codes: vec![ReasonCode::GrantedQoS1, ReasonCode::UnspecifiedError],
        properties: Default::default(),
    };
    check(
        V311,
        &[0x90, 0x04, 0x00, 0x01, 0x01, 0x80],
        suback.clone().into(),
    );
    check(
        V5,
        &[0x90, 0x05, 0x00, 0x01, 0x00, 0x01, 0x80],
        suback.into(),
    );
    // Any v5 failure is 0x80 in 3.1.1.
    let mut out = BytesMut::new();
    let refused = SubAck {
        packet_id: 1,
        reason_codes: vec![ReasonCode::NotAuthorized],
        properties: Default::default(),
    };
    encode(&refused.into(), V311, &mut out).unwrap();
    assert_eq!(&out[..], [0x90, 0x03, 0x00, 0x01, 0x80]);
}

#[test]
fn unsubscribe_and_unsuback() {
    let unsubscribe = Unsubscribe {
        packet_id: 2,
        filters: vec!["a/#".into()],
        properties: Default::default(),
    };
    check(
        V311,
        &[0xA2, 0x07, 0x00, 0x02, 0x00, 0x03, b'a', b'/', b'#'],
        unsubscribe.clone().into(),
    );
    check(
        V5,
        &[0xA2, 0x08, 0x00, 0x02, 0x00, 0x00, 0x03, b'a', b'/', b'#'],
        unsubscribe.into(),
    );
    check(
        V311,
        &[0xB0, 0x02, 0x00, 0x02],
        UnsubAck {
            packet_id: 2,
            reason_codes: vec![],
            properties: Default::default(),
        }
        .into(),
    );
    check(
        V5,
        &[0xB0, 0x04, 0x00, 0x02, 0x00, 0x11],
        UnsubAck {
            packet_id: 2,
            reason_codes: vec![ReasonCode::NoSubscriptionExisted],
            properties: Default::default(),
        }
        .into(),
    );
}

#[test]
fn disconnect_and_auth() {
    check(V311, &[0xE0, 0x00], Disconnect::default().into());
    check(V5, &[0xE0, 0x00], Disconnect::default().into());
    check(
        V5,
        &[0xE0, 0x01, 0x04],
        Disconnect {
            reason_code: ReasonCode::DisconnectWithWillMessage,
            ..Default::default()
        }
        .into(),
    );
    decodes_to(V5, &[0xE0, 0x02, 0x00, 0x00], Disconnect::default().into());
    check(V5, &[0xF0, 0x00], Auth::default().into());
    // AUTH always carries its property length after a reason code; a bare code is tolerated.
    let reauth: Packet = Auth {
        reason_code: ReasonCode::ReAuthenticate,
        ..Default::default()
    }
    .into();
    check(V5, &[0xF0, 0x02, 0x19, 0x00], reauth.clone());
    decodes_to(V5, &[0xF0, 0x01, 0x19], reauth);
    check(
        V5,
        &[0xF0, 0x08, 0x18, 0x06, 0x15, 0x00, 0x03, b'k', b'r', b'b'],
        Auth {
            reason_code: ReasonCode::ContinueAuthentication,
            properties: ferry_mqtt::AuthProperties {
                authentication_method: Some("krb".into()),
                ..Default::default()
            },
        }
        .into(),
    );
}
