//! Encoding: each packet body is written once, generically over a [`Sink`], and run first into a
//! counter (for the remaining length, and to validate) and then into the output buffer.

use bytes::BytesMut;

use crate::decode::{
    check_connack, check_connect_properties, check_dup, check_filter, check_packet_id,
    check_publish_topic, check_reason, connect_flags, options_byte,
};
use crate::error::{DecodeError, EncodeError};
use crate::packet::{Connect, Packet, PacketType, ProtocolVersion, PubAckFields, Publish, QoS};
use crate::properties::PropertySet;
use crate::reason::ReasonCode;
use crate::topic::validate_topic_name;
use crate::wire::{measure, varint_len, Sink, MAX_VARINT};

use ProtocolVersion::{V311, V5};

/// Appends the encoding of `packet` for a connection of `version` to `out`.
///
/// A [`Connect`] is always encoded with its own [`Connect::protocol_version`]. For
/// [`ProtocolVersion::V311`], fields that only exist in 5.0 are dropped (properties, reason
/// codes of acknowledgements and DISCONNECT, subscription options other than QoS), CONNACK and
/// SUBACK codes are mapped with [`ReasonCode::to_v311_connack`] / [`ReasonCode::to_v311_suback`],
/// and AUTH is refused.
///
/// The packet is validated with the decoder's rules first: whatever `encode` accepts, [`decode`]
/// returns unchanged (up to the 3.1.1 drops above), and nothing is written on error.
///
/// [`decode`]: crate::decode
pub fn encode(
    packet: &Packet,
    version: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let version = packet_version(packet, version);
    let (first, body_len) = header(packet, version)?;
    out.reserve(1 + varint_len(body_len) + body_len);
    out.put_u8(first);
    out.put_varint(body_len);
    body(packet, version, out)
}

/// The number of bytes [`encode`] would append (to compare with a peer's Maximum Packet
/// Size), or the error it would return.
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> Result<usize, EncodeError> {
    let version = packet_version(packet, version);
    let (_, body_len) = header(packet, version)?;
    Ok(1 + varint_len(body_len) + body_len)
}

fn packet_version(packet: &Packet, version: ProtocolVersion) -> ProtocolVersion {
    match packet {
        Packet::Connect(connect) => connect.protocol_version,
        _ => version,
    }
}

/// The first byte and the remaining length, validating the whole packet on the way.
fn header(packet: &Packet, version: ProtocolVersion) -> Result<(u8, usize), EncodeError> {
    let packet_type = packet.packet_type();
    if packet_type == PacketType::Auth && version == V311 {
        return Err(EncodeError::UnsupportedPacket {
            packet: packet_type,
            version,
        });
    }
    let flags = match packet {
        Packet::Publish(publish) => {
            check_dup(publish.dup, publish.qos)?;
            u8::from(publish.dup) << 3 | (publish.qos as u8) << 1 | u8::from(publish.retain)
        }
        _ => packet_type.fixed_flags().unwrap_or(0),
    };
    let body_len = measure(|c| body(packet, version, c))?;
    if body_len > MAX_VARINT {
        return Err(EncodeError::PacketTooLarge(body_len));
    }
    Ok(((packet_type as u8) << 4 | flags, body_len))
}

fn body<S: Sink>(packet: &Packet, version: ProtocolVersion, s: &mut S) -> Result<(), EncodeError> {
    match packet {
        Packet::Connect(connect) => write_connect(connect, s),
        Packet::ConnAck(connack) => {
            check_reason(connack.reason_code, PacketType::ConnAck)?;
            check_connack(connack.session_present, connack.reason_code)?;
            s.put_u8(u8::from(connack.session_present));
            s.put_u8(match version {
                V311 => connack.reason_code.to_v311_connack(),
                V5 => connack.reason_code.value(),
            });
            properties(&connack.properties, version, s)
        }
        Packet::Publish(publish) => write_publish(publish, version, s),
        Packet::PubAck(ack) => write_pub_ack(PacketType::PubAck, ack, version, s),
        Packet::PubRec(ack) => write_pub_ack(PacketType::PubRec, ack, version, s),
        Packet::PubRel(ack) => write_pub_ack(PacketType::PubRel, ack, version, s),
        Packet::PubComp(ack) => write_pub_ack(PacketType::PubComp, ack, version, s),
        Packet::Subscribe(subscribe) => {
            s.put_u16(check_packet_id(subscribe.packet_id)?);
            properties(&subscribe.properties, version, s)?;
            if subscribe.subscriptions.is_empty() {
                return Err(DecodeError::EmptySubscription.into());
            }
            for sub in &subscribe.subscriptions {
                check_filter(&sub.filter, Some(&sub.options), version)?;
                s.put_string(&sub.filter)?;
                s.put_u8(options_byte(&sub.options, version));
            }
            Ok(())
        }
        Packet::SubAck(suback) => {
            s.put_u16(check_packet_id(suback.packet_id)?);
            properties(&suback.properties, version, s)?;
            for &code in &suback.reason_codes {
                check_reason(code, PacketType::SubAck)?;
                s.put_u8(match version {
                    // Every code SUBACK allows has a 3.1.1 form.
                    V311 => code.to_v311_suback().unwrap_or(0x80),
                    V5 => code.value(),
                });
            }
            Ok(())
        }
        Packet::Unsubscribe(unsubscribe) => {
            s.put_u16(check_packet_id(unsubscribe.packet_id)?);
            properties(&unsubscribe.properties, version, s)?;
            if unsubscribe.filters.is_empty() {
                return Err(DecodeError::EmptySubscription.into());
            }
            for filter in &unsubscribe.filters {
                check_filter(filter, None, version)?;
                s.put_string(filter)?;
            }
            Ok(())
        }
        Packet::UnsubAck(unsuback) => {
            s.put_u16(check_packet_id(unsuback.packet_id)?);
            if version == V5 {
                unsuback.properties.encode(s)?;
                for &code in &unsuback.reason_codes {
                    check_reason(code, PacketType::UnsubAck)?;
                    s.put_u8(code.value());
                }
            }
            Ok(())
        }
        Packet::PingReq | Packet::PingResp => Ok(()),
        Packet::Disconnect(disconnect) => match version {
            V311 => Ok(()),
            V5 => write_reason_and_properties(
                PacketType::Disconnect,
                disconnect.reason_code,
                &disconnect.properties,
                s,
            ),
        },
        Packet::Auth(auth) => {
            write_reason_and_properties(PacketType::Auth, auth.reason_code, &auth.properties, s)
        }
    }
}

/// Properties in 5.0, nothing in 3.1.1.
fn properties<P: PropertySet, S: Sink>(
    props: &P,
    version: ProtocolVersion,
    s: &mut S,
) -> Result<(), EncodeError> {
    match version {
        V311 => Ok(()),
        V5 => props.encode(s),
    }
}

/// The shortest form of a 5.0 reason code and properties: nothing for Success without
/// properties, the code alone without properties (except for AUTH, whose spec only allows
/// omitting both), both otherwise.
fn write_reason_and_properties<P: PropertySet, S: Sink>(
    packet: PacketType,
    code: ReasonCode,
    props: &P,
    s: &mut S,
) -> Result<(), EncodeError> {
    check_reason(code, packet)?;
    if code == ReasonCode::Success && props.is_empty() {
        return Ok(());
    }
    s.put_u8(code.value());
    if props.is_empty() && packet != PacketType::Auth {
        return Ok(());
    }
    props.encode(s)
}

fn write_pub_ack<S: Sink>(
    packet: PacketType,
    ack: &impl PubAckFields,
    version: ProtocolVersion,
    s: &mut S,
) -> Result<(), EncodeError> {
    let (packet_id, code, props) = ack.fields();
    s.put_u16(check_packet_id(packet_id)?);
    match version {
        V311 => Ok(()),
        V5 => write_reason_and_properties(packet, code, props, s),
    }
}

fn write_connect<S: Sink>(connect: &Connect, s: &mut S) -> Result<(), EncodeError> {
    let version = connect.protocol_version;
    s.put_string("MQTT")?;
    s.put_u8(version.level());
    s.put_u8(connect_flags(connect)?);
    s.put_u16(connect.keep_alive);
    if version == V5 {
        check_connect_properties(&connect.properties)?;
    }
    properties(&connect.properties, version, s)?;
    s.put_string(&connect.client_id)?;
    if let Some(will) = &connect.will {
        properties(&will.properties, version, s)?;
        validate_topic_name(&will.topic).map_err(DecodeError::InvalidTopicName)?;
        s.put_string(&will.topic)?;
        s.put_binary(&will.payload)?;
    }
    if let Some(username) = &connect.username {
        s.put_string(username)?;
    }
    if let Some(password) = &connect.password {
        s.put_binary(password)?;
    }
    Ok(())
}

fn write_publish<S: Sink>(
    publish: &Publish,
    version: ProtocolVersion,
    s: &mut S,
) -> Result<(), EncodeError> {
    check_publish_topic(&publish.topic, &publish.properties, version)?;
    s.put_string(&publish.topic)?;
    match (publish.qos, publish.packet_id) {
        (QoS::AtMostOnce, None) => {}
        (QoS::AtLeastOnce | QoS::ExactlyOnce, Some(id)) => s.put_u16(check_packet_id(id)?),
        _ => return Err(EncodeError::PacketIdQoSMismatch),
    }
    properties(&publish.properties, version, s)?;
    s.put_slice(&publish.payload);
    Ok(())
}
