//! Proptest strategies for valid packets of either protocol version: for 3.1.1 only fields that
//! exist in 3.1.1 are generated (everything 5.0-only stays at its default).
#![allow(dead_code, clippy::unwrap_used)]

use bytes::Bytes;
use ferry_mqtt::{
    AckProperties, Auth, AuthProperties, ConnAck, ConnAckProperties, Connect, ConnectProperties,
    Disconnect, DisconnectProperties, Packet, PacketType, ProtocolVersion, PubAck, PubComp, PubRec,
    PubRel, Publish, PublishProperties, QoS, ReasonCode, RetainHandling, SubAck, Subscribe,
    SubscribeProperties, Subscription, SubscriptionOptions, UnsubAck, Unsubscribe,
    UnsubscribeProperties, Will, WillProperties,
};
use proptest::collection::vec;
use proptest::option::of as opt;
use proptest::prelude::*;
use proptest::sample::select;

use ProtocolVersion::{V311, V5};

/// Generous enough for every generated packet.
pub const MAX: usize = 1 << 20;

/// Any UTF-8 text without U+0000.
pub fn text() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,6}"
}

pub fn bytes() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..12).prop_map(Bytes::from)
}

pub fn topic_name() -> impl Strategy<Value = String> {
    "[a-z$ é]{1,3}(/[a-z]{0,3}){0,3}"
}

/// A plain (non-shared) topic filter with wildcards in valid places.
pub fn topic_filter() -> impl Strategy<Value = String> {
    (
        vec(prop_oneof![Just("+".to_owned()), "[a-z]{0,3}"], 1..4),
        any::<bool>(),
    )
        .prop_map(|(mut levels, hash)| {
            if hash {
                levels.push("#".to_owned());
            }
            let filter = levels.join("/");
            if filter.is_empty() {
                "a".to_owned()
            } else {
                filter
            }
        })
}

/// A 5.0 filter: plain or `$share/{group}/{filter}`; returns whether it is shared.
pub fn topic_filter_v5() -> impl Strategy<Value = (String, bool)> {
    (topic_filter(), opt("[a-z]{1,3}")).prop_map(|(filter, group)| match group {
        Some(group) => (format!("$share/{group}/{filter}"), true),
        None => (filter, false),
    })
}

pub fn qos() -> impl Strategy<Value = QoS> {
    select(vec![QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce])
}

pub fn packet_id() -> impl Strategy<Value = u16> {
    1..=u16::MAX
}

fn nonzero_u16() -> impl Strategy<Value = u16> {
    1..=u16::MAX
}

fn nonzero_u32() -> impl Strategy<Value = u32> {
    1..=u32::MAX
}

fn subscription_id() -> impl Strategy<Value = u32> {
    1..=268_435_455u32
}

fn user_properties() -> impl Strategy<Value = Vec<(String, String)>> {
    vec((text(), text()), 0..3)
}

/// The reason codes `packet` allows in `version`.
pub fn reason(packet: PacketType, version: ProtocolVersion) -> impl Strategy<Value = ReasonCode> {
    let codes: Vec<ReasonCode> = match (version, packet) {
        (V311, PacketType::ConnAck) => (0..=5).filter_map(ReasonCode::from_v311_connack).collect(),
        (V311, PacketType::SubAck) => [0, 1, 2, 0x80]
            .into_iter()
            .filter_map(ReasonCode::from_v311_suback)
            .collect(),
        (V311, _) => vec![ReasonCode::Success],
        (V5, _) => (0..=255u8)
            .filter_map(|b| ReasonCode::try_from(b).ok())
            .filter(|c| c.is_allowed_in(packet))
            .collect(),
    };
    select(codes)
}

/// `strategy` in 5.0, the default in 3.1.1.
fn v5_only<T: Default + std::fmt::Debug + Clone + 'static>(
    version: ProtocolVersion,
    strategy: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<T> {
    match version {
        V311 => Just(T::default()).boxed(),
        V5 => strategy.boxed(),
    }
}

fn connect_properties() -> impl Strategy<Value = ConnectProperties> {
    (
        opt(any::<u32>()),
        opt(nonzero_u16()),
        opt(nonzero_u32()),
        opt(any::<u16>()),
        opt(any::<bool>()),
        opt(any::<bool>()),
        opt(text()),
        opt(bytes()),
        user_properties(),
    )
        .prop_map(|(sei, rm, mps, tam, rri, rpi, method, data, user)| {
            // Authentication Data requires an Authentication Method.
            let method = if data.is_some() && method.is_none() {
                Some("SCRAM".to_owned())
            } else {
                method
            };
            ConnectProperties {
                session_expiry_interval: sei,
                receive_maximum: rm,
                maximum_packet_size: mps,
                topic_alias_maximum: tam,
                request_response_information: rri,
                request_problem_information: rpi,
                authentication_method: method,
                authentication_data: data,
                user_properties: user,
            }
        })
}

fn will_properties() -> impl Strategy<Value = WillProperties> {
    (
        opt(any::<u32>()),
        opt(any::<bool>()),
        opt(any::<u32>()),
        opt(text()),
        opt(topic_name()),
        opt(bytes()),
        user_properties(),
    )
        .prop_map(|(delay, pfi, mei, ct, rt, cd, user)| WillProperties {
            will_delay_interval: delay,
            payload_format_indicator: pfi,
            message_expiry_interval: mei,
            content_type: ct,
            response_topic: rt,
            correlation_data: cd,
            user_properties: user,
        })
}

fn connack_properties() -> impl Strategy<Value = ConnAckProperties> {
    (
        (
            opt(any::<u32>()),
            opt(nonzero_u16()),
            opt(select(vec![QoS::AtMostOnce, QoS::AtLeastOnce])),
            opt(any::<bool>()),
            opt(nonzero_u32()),
            opt(text()),
            opt(any::<u16>()),
            opt(text()),
        ),
        (
            opt(any::<bool>()),
            opt(any::<bool>()),
            opt(any::<bool>()),
            opt(any::<u16>()),
            opt(text()),
            opt(text()),
            opt(text()),
            opt(bytes()),
            user_properties(),
        ),
    )
        .prop_map(
            |((sei, rm, mq, ra, mps, aci, tam, rs), (wsa, sia, ssa, ska, ri, sr, am, ad, user))| {
                ConnAckProperties {
                    session_expiry_interval: sei,
                    receive_maximum: rm,
                    maximum_qos: mq,
                    retain_available: ra,
                    maximum_packet_size: mps,
                    assigned_client_identifier: aci,
                    topic_alias_maximum: tam,
                    reason_string: rs,
                    wildcard_subscription_available: wsa,
                    subscription_identifiers_available: sia,
                    shared_subscription_available: ssa,
                    server_keep_alive: ska,
                    response_information: ri,
                    server_reference: sr,
                    authentication_method: am,
                    authentication_data: ad,
                    user_properties: user,
                }
            },
        )
}

fn publish_properties() -> impl Strategy<Value = PublishProperties> {
    (
        opt(any::<bool>()),
        opt(any::<u32>()),
        opt(nonzero_u16()),
        opt(topic_name()),
        opt(bytes()),
        vec(subscription_id(), 0..3),
        opt(text()),
        user_properties(),
    )
        .prop_map(|(pfi, mei, ta, rt, cd, sids, ct, user)| PublishProperties {
            payload_format_indicator: pfi,
            message_expiry_interval: mei,
            topic_alias: ta,
            response_topic: rt,
            correlation_data: cd,
            subscription_identifiers: sids,
            content_type: ct,
            user_properties: user,
        })
}

fn ack_properties() -> impl Strategy<Value = AckProperties> {
    (opt(text()), user_properties()).prop_map(|(rs, user)| AckProperties {
        reason_string: rs,
        user_properties: user,
    })
}

fn will(version: ProtocolVersion) -> impl Strategy<Value = Will> {
    (
        topic_name(),
        bytes(),
        qos(),
        any::<bool>(),
        v5_only(version, will_properties()),
    )
        .prop_map(|(topic, payload, qos, retain, properties)| Will {
            topic,
            payload,
            qos,
            retain,
            properties,
        })
}

pub fn connect(version: ProtocolVersion) -> impl Strategy<Value = Connect> {
    (
        text(),
        any::<bool>(),
        any::<u16>(),
        opt(text()),
        opt(bytes()),
        opt(will(version)),
        v5_only(version, connect_properties()),
    )
        .prop_map(
            move |(client_id, clean_start, keep_alive, username, password, will, properties)| {
                // 3.1.1 allows a password only with a user name.
                let username = if version == V311 && password.is_some() && username.is_none() {
                    Some("user".to_owned())
                } else {
                    username
                };
                Connect {
                    protocol_version: version,
                    client_id,
                    clean_start,
                    keep_alive,
                    username,
                    password,
                    will,
                    properties,
                }
            },
        )
}

fn connack(version: ProtocolVersion) -> impl Strategy<Value = ConnAck> {
    (
        any::<bool>(),
        reason(PacketType::ConnAck, version),
        v5_only(version, connack_properties()),
    )
        .prop_map(|(session_present, reason_code, properties)| ConnAck {
            session_present: session_present && reason_code == ReasonCode::Success,
            reason_code,
            properties,
        })
}

pub fn publish(version: ProtocolVersion) -> impl Strategy<Value = Publish> {
    (
        any::<bool>(),
        qos(),
        any::<bool>(),
        topic_name(),
        any::<bool>(),
        packet_id(),
        bytes(),
        v5_only(version, publish_properties()),
    )
        .prop_map(
            move |(dup, qos, retain, topic, empty_topic, id, payload, properties)| {
                // In 5.0 a topic alias may stand in for the topic name.
                let topic = if version == V5 && empty_topic && properties.topic_alias.is_some() {
                    String::new()
                } else {
                    topic
                };
                let at_least_once = qos != QoS::AtMostOnce;
                Publish {
                    dup: dup && at_least_once,
                    qos,
                    retain,
                    topic,
                    packet_id: at_least_once.then_some(id),
                    payload,
                    properties,
                }
            },
        )
}

/// (packet id, reason code, properties) of a PUBACK-like packet.
fn pub_ack(
    packet: PacketType,
    version: ProtocolVersion,
) -> impl Strategy<Value = (u16, ReasonCode, AckProperties)> {
    (
        packet_id(),
        reason(packet, version),
        v5_only(version, ack_properties()),
    )
}

fn subscription(version: ProtocolVersion) -> BoxedStrategy<Subscription> {
    match version {
        V311 => (topic_filter(), qos())
            .prop_map(|(filter, qos)| Subscription::new(filter, qos))
            .boxed(),
        V5 => (
            topic_filter_v5(),
            qos(),
            any::<bool>(),
            any::<bool>(),
            select(vec![
                RetainHandling::SendAtSubscribe,
                RetainHandling::SendAtSubscribeIfNew,
                RetainHandling::DoNotSend,
            ]),
        )
            .prop_map(|((filter, shared), qos, no_local, rap, rh)| Subscription {
                filter,
                options: SubscriptionOptions {
                    qos,
                    // No Local is a protocol error on a shared subscription.
                    no_local: no_local && !shared,
                    retain_as_published: rap,
                    retain_handling: rh,
                },
            })
            .boxed(),
    }
}

fn unsubscribe_filter(version: ProtocolVersion) -> BoxedStrategy<String> {
    match version {
        V311 => topic_filter().boxed(),
        V5 => topic_filter_v5().prop_map(|(f, _)| f).boxed(),
    }
}

/// Any valid packet of `version`.
pub fn packet(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    let mut options: Vec<BoxedStrategy<Packet>> = vec![
        connect(version).prop_map(Packet::Connect).boxed(),
        connack(version).prop_map(Packet::ConnAck).boxed(),
        publish(version).prop_map(Packet::Publish).boxed(),
        pub_ack(PacketType::PubAck, version)
            .prop_map(|(packet_id, reason_code, properties)| {
                Packet::PubAck(PubAck {
                    packet_id,
                    reason_code,
                    properties,
                })
            })
            .boxed(),
        pub_ack(PacketType::PubRec, version)
            .prop_map(|(packet_id, reason_code, properties)| {
                Packet::PubRec(PubRec {
                    packet_id,
                    reason_code,
                    properties,
                })
            })
            .boxed(),
        pub_ack(PacketType::PubRel, version)
            .prop_map(|(packet_id, reason_code, properties)| {
                Packet::PubRel(PubRel {
                    packet_id,
                    reason_code,
                    properties,
                })
            })
            .boxed(),
        pub_ack(PacketType::PubComp, version)
            .prop_map(|(packet_id, reason_code, properties)| {
                Packet::PubComp(PubComp {
                    packet_id,
                    reason_code,
                    properties,
                })
            })
            .boxed(),
        (
            packet_id(),
            vec(subscription(version), 1..4),
            v5_only(
                version,
                (opt(subscription_id()), user_properties()).prop_map(|(sid, user)| {
                    SubscribeProperties {
                        subscription_identifier: sid,
                        user_properties: user,
                    }
                }),
            ),
        )
            .prop_map(|(packet_id, subscriptions, properties)| {
                Packet::Subscribe(Subscribe {
                    packet_id,
                    subscriptions,
                    properties,
                })
            })
            .boxed(),
        (
            packet_id(),
            vec(reason(PacketType::SubAck, version), 1..4),
            v5_only(version, ack_properties()),
        )
            .prop_map(|(packet_id, reason_codes, properties)| {
                Packet::SubAck(SubAck {
                    packet_id,
                    reason_codes,
                    properties,
                })
            })
            .boxed(),
        (
            packet_id(),
            vec(unsubscribe_filter(version), 1..4),
            v5_only(
                version,
                user_properties().prop_map(|user| UnsubscribeProperties {
                    user_properties: user,
                }),
            ),
        )
            .prop_map(|(packet_id, filters, properties)| {
                Packet::Unsubscribe(Unsubscribe {
                    packet_id,
                    filters,
                    properties,
                })
            })
            .boxed(),
        (
            packet_id(),
            v5_only(version, vec(reason(PacketType::UnsubAck, version), 1..4)),
            v5_only(version, ack_properties()),
        )
            .prop_map(|(packet_id, reason_codes, properties)| {
                Packet::UnsubAck(UnsubAck {
                    packet_id,
                    reason_codes,
                    properties,
                })
            })
            .boxed(),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
        (
            reason(PacketType::Disconnect, version),
            v5_only(
                version,
                (
                    opt(any::<u32>()),
                    opt(text()),
                    opt(text()),
                    user_properties(),
                )
                    .prop_map(|(sei, rs, sr, user)| DisconnectProperties {
                        session_expiry_interval: sei,
                        reason_string: rs,
                        server_reference: sr,
                        user_properties: user,
                    }),
            ),
        )
            .prop_map(|(reason_code, properties)| {
                Packet::Disconnect(Disconnect {
                    reason_code,
                    properties,
                })
            })
            .boxed(),
    ];
    if version == V5 {
        options.push(
            (
                reason(PacketType::Auth, version),
                opt(text()),
                opt(bytes()),
                opt(text()),
                user_properties(),
            )
                .prop_map(|(reason_code, am, ad, rs, user)| {
                    Packet::Auth(Auth {
                        reason_code,
                        properties: AuthProperties {
                            authentication_method: am,
                            authentication_data: ad,
                            reason_string: rs,
                            user_properties: user,
                        },
                    })
                })
                .boxed(),
        );
    }
    proptest::strategy::Union::new(options).boxed()
}

/// A version and a valid packet of it.
pub fn versioned_packet() -> impl Strategy<Value = (ProtocolVersion, Packet)> {
    select(vec![V311, V5]).prop_flat_map(|v| packet(v).prop_map(move |p| (v, p)))
}
