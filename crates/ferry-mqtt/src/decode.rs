//! Decoding: framing from a growing buffer, then one function per packet over a bounds-checked
//! [`Reader`]. The rules shared with the encoder (`check_*`) live here too, so both sides agree
//! on what a valid packet is.

use bytes::{Buf, BytesMut};

use crate::error::DecodeError;
use crate::packet::{
    Auth, ConnAck, Connect, Disconnect, Packet, PacketType, ProtocolVersion, PubAckFields, Publish,
    QoS, RetainHandling, SubAck, Subscribe, Subscription, SubscriptionOptions, UnsubAck,
    Unsubscribe, Will,
};
use crate::properties::{
    ConnAckProperties, ConnectProperties, PropertySet, PublishProperties, WillProperties,
};
use crate::reason::ReasonCode;
use crate::topic::{check_filter_v5, validate_topic_filter, validate_topic_name};
use crate::wire::{parse_varint, Reader, VarInt};

use ProtocolVersion::{V311, V5};

/// Decodes one packet from the front of `buf` on a connection that negotiated `version`.
///
/// * `Ok(Some(packet))`: the packet's bytes were removed from `buf`; PUBLISH payloads (and other
///   binary fields) are zero-copy slices of them.
/// * `Ok(None)`: `buf` holds only a prefix of a packet; nothing was consumed. Call again once
///   more bytes arrived.
/// * `Err(_)`: the stream is not valid MQTT; close the connection, after reporting
///   [`DecodeError::reason_code`] where the protocol allows. Whether the offending bytes were
///   consumed is unspecified.
///
/// `max_packet_size` bounds the whole packet (fixed header included). A bigger packet is reported
/// as [`DecodeError::PacketTooLarge`] as soon as its fixed header is readable, before its body
/// is buffered. The packet type and fixed-header flags are also checked from the first byte.
///
/// A CONNECT is decoded according to its own protocol level whatever `version` is; to decode
/// the first packet of a connection, before the version is known, use [`decode_connect`].
pub fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some(frame) = take_frame(buf, Some(version), max_packet_size)? else {
        return Ok(None);
    };
    decode_frame(frame, version).map(Some)
}

/// Decodes the first packet of a connection, which must be a CONNECT; the negotiated version is
/// then [`Connect::protocol_version`]. Same contract as [`decode`]; any other packet type is
/// [`DecodeError::ExpectedConnect`], an unknown protocol name or level
/// [`DecodeError::UnsupportedProtocolVersion`].
pub fn decode_connect(
    buf: &mut BytesMut,
    max_packet_size: usize,
) -> Result<Option<Connect>, DecodeError> {
    let Some(frame) = take_frame(buf, None, max_packet_size)? else {
        return Ok(None);
    };
    connect(frame.body).map(Some)
}

/// One whole packet taken off the buffer.
struct Frame {
    packet: PacketType,
    flags: u8,
    body: Reader,
}

/// Checks the fixed header and splits the packet off `buf` once it is complete. `version: None`
/// accepts only CONNECT.
fn take_frame(
    buf: &mut BytesMut,
    version: Option<ProtocolVersion>,
    max_packet_size: usize,
) -> Result<Option<Frame>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let packet = check_first_byte(first, version)?;
    let (remaining, len_bytes) = match parse_varint(&buf[1..])? {
        VarInt::Value(value, len) => (value, len),
        VarInt::Incomplete => return Ok(None),
    };
    let header_len = 1 + len_bytes;
    let size = header_len + remaining;
    if size > max_packet_size {
        return Err(DecodeError::PacketTooLarge {
            size,
            max: max_packet_size,
        });
    }
    if buf.len() < size {
        // No `reserve` for the rest: a peer announcing a large packet must not make us
        // allocate before it sends the bytes.
        return Ok(None);
    }
    let mut bytes = buf.split_to(size).freeze();
    bytes.advance(header_len);
    Ok(Some(Frame {
        packet,
        flags: first & 0x0F,
        body: Reader::new(bytes),
    }))
}

fn check_first_byte(
    first: u8,
    version: Option<ProtocolVersion>,
) -> Result<PacketType, DecodeError> {
    let nibble = first >> 4;
    let packet = PacketType::from_nibble(nibble).ok_or(DecodeError::InvalidPacketType(nibble))?;
    match version {
        None if packet != PacketType::Connect => return Err(DecodeError::ExpectedConnect(packet)),
        Some(V311) if packet == PacketType::Auth => {
            return Err(DecodeError::InvalidPacketType(nibble))
        }
        _ => {}
    }
    let flags = first & 0x0F;
    match packet.fixed_flags() {
        Some(fixed) if fixed != flags => {
            Err(DecodeError::InvalidFixedHeaderFlags { packet, flags })
        }
        Some(_) => Ok(packet),
        None => publish_flags(flags).map(|_| packet),
    }
}

/// Splits PUBLISH flags into (dup, qos, retain), rejecting QoS 3 and DUP at QoS 0.
fn publish_flags(flags: u8) -> Result<(bool, QoS, bool), DecodeError> {
    let qos_bits = (flags >> 1) & 0b11;
    let qos = QoS::from_bits(qos_bits).ok_or(DecodeError::InvalidQoS(qos_bits))?;
    let dup = flags & 0b1000 != 0;
    check_dup(dup, qos)?;
    Ok((dup, qos, flags & 1 != 0))
}

fn decode_frame(frame: Frame, version: ProtocolVersion) -> Result<Packet, DecodeError> {
    let Frame {
        packet,
        flags,
        body: mut r,
    } = frame;
    Ok(match packet {
        PacketType::Connect => Packet::Connect(connect(r)?),
        PacketType::ConnAck => Packet::ConnAck(connack(r, version)?),
        PacketType::Publish => Packet::Publish(publish(r, flags, version)?),
        PacketType::PubAck => Packet::PubAck(pub_ack(r, packet, version)?),
        PacketType::PubRec => Packet::PubRec(pub_ack(r, packet, version)?),
        PacketType::PubRel => Packet::PubRel(pub_ack(r, packet, version)?),
        PacketType::PubComp => Packet::PubComp(pub_ack(r, packet, version)?),
        PacketType::Subscribe => Packet::Subscribe(subscribe(r, version)?),
        PacketType::SubAck => Packet::SubAck(suback(r, version)?),
        PacketType::Unsubscribe => Packet::Unsubscribe(unsubscribe(r, version)?),
        PacketType::UnsubAck => Packet::UnsubAck(unsuback(r, version)?),
        PacketType::PingReq => r.finish().map(|()| Packet::PingReq)?,
        PacketType::PingResp => r.finish().map(|()| Packet::PingResp)?,
        PacketType::Disconnect => {
            let (reason_code, properties) = match version {
                V311 => Default::default(),
                V5 => reason_and_properties(&mut r, packet)?,
            };
            r.finish()?;
            Packet::Disconnect(Disconnect {
                reason_code,
                properties,
            })
        }
        PacketType::Auth => {
            let (reason_code, properties) = reason_and_properties(&mut r, packet)?;
            r.finish()?;
            Packet::Auth(Auth {
                reason_code,
                properties,
            })
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Rules shared with the encoder.

/// A Packet Identifier must be non-zero.
pub(crate) fn check_packet_id(id: u16) -> Result<u16, DecodeError> {
    if id == 0 {
        Err(DecodeError::ZeroPacketIdentifier)
    } else {
        Ok(id)
    }
}

/// DUP must be 0 at QoS 0.
pub(crate) fn check_dup(dup: bool, qos: QoS) -> Result<(), DecodeError> {
    if dup && qos == QoS::AtMostOnce {
        return Err(DecodeError::InvalidFixedHeaderFlags {
            packet: PacketType::Publish,
            flags: 0b1000,
        });
    }
    Ok(())
}

/// A reason code must be one the packet type allows.
pub(crate) fn check_reason(code: ReasonCode, packet: PacketType) -> Result<(), DecodeError> {
    if code.is_allowed_in(packet) {
        Ok(())
    } else {
        Err(DecodeError::InvalidReasonCode {
            code: code.value(),
            packet,
        })
    }
}

/// The topic of a PUBLISH: a valid topic name, or (5.0) empty with a Topic Alias.
pub(crate) fn check_publish_topic(
    topic: &str,
    properties: &PublishProperties,
    version: ProtocolVersion,
) -> Result<(), DecodeError> {
    if topic.is_empty() && version == V5 {
        return match properties.topic_alias {
            Some(_) => Ok(()),
            None => Err(DecodeError::EmptyTopicWithoutAlias),
        };
    }
    validate_topic_name(topic).map_err(DecodeError::InvalidTopicName)
}

/// A SUBSCRIBE or UNSUBSCRIBE filter; in 5.0 `$share/` filters follow the shared-subscription
/// rules and may not have No Local. `options` is `None` for UNSUBSCRIBE.
pub(crate) fn check_filter(
    filter: &str,
    options: Option<&SubscriptionOptions>,
    version: ProtocolVersion,
) -> Result<(), DecodeError> {
    let shared = match version {
        V311 => validate_topic_filter(filter).map(|()| false),
        V5 => check_filter_v5(filter),
    }
    .map_err(DecodeError::InvalidTopicFilter)?;
    if shared && options.is_some_and(|o| o.no_local) {
        return Err(DecodeError::SharedSubscriptionNoLocal);
    }
    Ok(())
}

/// The CONNECT flags byte of `connect`, refusing a 3.1.1 password without a user name.
pub(crate) fn connect_flags(connect: &Connect) -> Result<u8, DecodeError> {
    let mut flags = 0u8;
    if connect.clean_start {
        flags |= 0x02;
    }
    if let Some(will) = &connect.will {
        flags |= 0x04 | (will.qos as u8) << 3;
        if will.retain {
            flags |= 0x20;
        }
    }
    if connect.password.is_some() {
        flags |= 0x40;
    }
    if connect.username.is_some() {
        flags |= 0x80;
    }
    if connect.protocol_version == V311 && connect.password.is_some() && connect.username.is_none()
    {
        return Err(DecodeError::InvalidConnectFlags(flags));
    }
    Ok(flags)
}

/// Authentication Data requires an Authentication Method.
pub(crate) fn check_connect_properties(props: &ConnectProperties) -> Result<(), DecodeError> {
    if props.authentication_data.is_some() && props.authentication_method.is_none() {
        return Err(DecodeError::AuthDataWithoutMethod);
    }
    Ok(())
}

/// Session Present must be 0 with a failure code.
pub(crate) fn check_connack(session_present: bool, code: ReasonCode) -> Result<(), DecodeError> {
    if session_present && code != ReasonCode::Success {
        return Err(DecodeError::InvalidConnAckFlags(0x01));
    }
    Ok(())
}

/// The options byte of a subscription in `version`.
pub(crate) fn options_byte(options: &SubscriptionOptions, version: ProtocolVersion) -> u8 {
    let mut byte = options.qos as u8;
    if version == V5 {
        byte |= u8::from(options.no_local) << 2
            | u8::from(options.retain_as_published) << 3
            | (options.retain_handling as u8) << 4;
    }
    byte
}

// ---------------------------------------------------------------------------------------------
// Packets.

fn packet_id(r: &mut Reader) -> Result<u16, DecodeError> {
    check_packet_id(r.u16()?)
}

fn reason(r: &mut Reader, packet: PacketType) -> Result<ReasonCode, DecodeError> {
    let code = r.u8()?;
    let reason =
        ReasonCode::try_from(code).map_err(|_| DecodeError::InvalidReasonCode { code, packet })?;
    check_reason(reason, packet)?;
    Ok(reason)
}

fn properties<P: PropertySet>(
    r: &mut Reader,
    packet: PacketType,
    version: ProtocolVersion,
) -> Result<P, DecodeError> {
    match version {
        V311 => Ok(P::default()),
        V5 => P::decode(r, packet),
    }
}

/// The optional tail of 5.0 acknowledgements, DISCONNECT and AUTH: nothing (Success, no
/// properties), a reason code alone, or a reason code and properties. (The encoder never
/// writes an AUTH with a reason code alone; the decoder tolerates it.)
fn reason_and_properties<P: PropertySet>(
    r: &mut Reader,
    packet: PacketType,
) -> Result<(ReasonCode, P), DecodeError> {
    if r.is_empty() {
        return Ok((ReasonCode::Success, P::default()));
    }
    let code = reason(r, packet)?;
    let props = if r.is_empty() {
        P::default()
    } else {
        P::decode(r, packet)?
    };
    Ok((code, props))
}

fn connect(mut r: Reader) -> Result<Connect, DecodeError> {
    let name = r.string()?;
    let level = r.u8()?;
    let version = match (name.as_str(), level) {
        ("MQTT", 4) => V311,
        ("MQTT", 5) => V5,
        _ => return Err(DecodeError::UnsupportedProtocolVersion { name, level }),
    };
    let flags = r.u8()?;
    let will_flag = flags & 0x04 != 0;
    let will_qos_bits = (flags >> 3) & 0b11;
    let will_retain = flags & 0x20 != 0;
    let will_qos = QoS::from_bits(will_qos_bits).ok_or(DecodeError::InvalidQoS(will_qos_bits))?;
    if flags & 0x01 != 0 || (!will_flag && (will_qos_bits != 0 || will_retain)) {
        return Err(DecodeError::InvalidConnectFlags(flags));
    }
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if version == V311 && has_password && !has_username {
        return Err(DecodeError::InvalidConnectFlags(flags));
    }
    let keep_alive = r.u16()?;
    let properties: ConnectProperties = self::properties(&mut r, PacketType::Connect, version)?;
    check_connect_properties(&properties)?;
    let client_id = r.string()?;
    let will = if will_flag {
        let properties: WillProperties = self::properties(&mut r, PacketType::Connect, version)?;
        let topic = r.string()?;
        validate_topic_name(&topic).map_err(DecodeError::InvalidTopicName)?;
        let payload = r.binary()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = has_username.then(|| r.string()).transpose()?;
    let password = has_password.then(|| r.binary()).transpose()?;
    r.finish()?;
    Ok(Connect {
        protocol_version: version,
        client_id,
        clean_start: flags & 0x02 != 0,
        keep_alive,
        username,
        password,
        will,
        properties,
    })
}

fn connack(mut r: Reader, version: ProtocolVersion) -> Result<ConnAck, DecodeError> {
    let flags = r.u8()?;
    if flags & 0xFE != 0 {
        return Err(DecodeError::InvalidConnAckFlags(flags));
    }
    let session_present = flags & 0x01 != 0;
    let reason_code = match version {
        V311 => {
            let code = r.u8()?;
            ReasonCode::from_v311_connack(code).ok_or(DecodeError::InvalidReasonCode {
                code,
                packet: PacketType::ConnAck,
            })?
        }
        V5 => reason(&mut r, PacketType::ConnAck)?,
    };
    check_connack(session_present, reason_code)?;
    let properties: ConnAckProperties = properties(&mut r, PacketType::ConnAck, version)?;
    r.finish()?;
    Ok(ConnAck {
        session_present,
        reason_code,
        properties,
    })
}

fn publish(mut r: Reader, flags: u8, version: ProtocolVersion) -> Result<Publish, DecodeError> {
    let (dup, qos, retain) = publish_flags(flags)?;
    let topic = r.string()?;
    let packet_id = match qos {
        QoS::AtMostOnce => None,
        QoS::AtLeastOnce | QoS::ExactlyOnce => Some(packet_id(&mut r)?),
    };
    let properties: PublishProperties = properties(&mut r, PacketType::Publish, version)?;
    check_publish_topic(&topic, &properties, version)?;
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        packet_id,
        payload: r.rest(),
        properties,
    })
}

fn pub_ack<T: PubAckFields>(
    mut r: Reader,
    packet: PacketType,
    version: ProtocolVersion,
) -> Result<T, DecodeError> {
    let id = packet_id(&mut r)?;
    let (code, props) = match version {
        V311 => Default::default(),
        V5 => reason_and_properties(&mut r, packet)?,
    };
    r.finish()?;
    Ok(T::from_fields(id, code, props))
}

fn subscription_options(
    byte: u8,
    version: ProtocolVersion,
) -> Result<SubscriptionOptions, DecodeError> {
    let reserved = match version {
        V311 => 0b1111_1100,
        V5 => 0b1100_0000,
    };
    if byte & reserved != 0 {
        return Err(DecodeError::InvalidSubscriptionOptions(byte));
    }
    let qos = QoS::from_bits(byte & 0b11).ok_or(DecodeError::InvalidQoS(byte & 0b11))?;
    let retain_handling = match (byte >> 4) & 0b11 {
        0 => RetainHandling::SendAtSubscribe,
        1 => RetainHandling::SendAtSubscribeIfNew,
        2 => RetainHandling::DoNotSend,
        _ => return Err(DecodeError::InvalidSubscriptionOptions(byte)),
    };
    Ok(SubscriptionOptions {
        qos,
        no_local: byte & 0b0100 != 0,
        retain_as_published: byte & 0b1000 != 0,
        retain_handling,
    })
}

fn subscribe(mut r: Reader, version: ProtocolVersion) -> Result<Subscribe, DecodeError> {
    let packet_id = packet_id(&mut r)?;
    let properties = properties(&mut r, PacketType::Subscribe, version)?;
    let mut subscriptions = Vec::new();
    while !r.is_empty() {
        let filter = r.string()?;
        let options = subscription_options(r.u8()?, version)?;
        check_filter(&filter, Some(&options), version)?;
        subscriptions.push(Subscription { filter, options });
    }
    if subscriptions.is_empty() {
        return Err(DecodeError::EmptySubscription);
    }
    Ok(Subscribe {
        packet_id,
        subscriptions,
        properties,
    })
}

fn suback(mut r: Reader, version: ProtocolVersion) -> Result<SubAck, DecodeError> {
    let packet_id = packet_id(&mut r)?;
    let properties = properties(&mut r, PacketType::SubAck, version)?;
    let mut reason_codes = Vec::with_capacity(r.remaining());
    while !r.is_empty() {
        reason_codes.push(match version {
            V311 => {
                let code = r.u8()?;
                ReasonCode::from_v311_suback(code).ok_or(DecodeError::InvalidReasonCode {
                    code,
                    packet: PacketType::SubAck,
                })?
            }
            V5 => reason(&mut r, PacketType::SubAck)?,
        });
    }
    Ok(SubAck {
        packet_id,
        reason_codes,
        properties,
    })
}

fn unsubscribe(mut r: Reader, version: ProtocolVersion) -> Result<Unsubscribe, DecodeError> {
    let packet_id = packet_id(&mut r)?;
    let properties = properties(&mut r, PacketType::Unsubscribe, version)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.string()?;
        check_filter(&filter, None, version)?;
        filters.push(filter);
    }
    if filters.is_empty() {
        return Err(DecodeError::EmptySubscription);
    }
    Ok(Unsubscribe {
        packet_id,
        filters,
        properties,
    })
}

fn unsuback(mut r: Reader, version: ProtocolVersion) -> Result<UnsubAck, DecodeError> {
    let packet_id = packet_id(&mut r)?;
    let properties = properties(&mut r, PacketType::UnsubAck, version)?;
    let mut reason_codes = Vec::with_capacity(r.remaining());
    match version {
        V311 => r.finish()?,
        V5 => {
            while !r.is_empty() {
                reason_codes.push(reason(&mut r, PacketType::UnsubAck)?);
            }
        }
    }
    Ok(UnsubAck {
        packet_id,
        reason_codes,
        properties,
    })
}
