//! MQTT PUBLISH <-> Ferry [`Message`].
//!
//! MQTT metadata rides in headers whose names start with `mqtt-` (QoS, retain flag, content
//! type, response topic, correlation data in hex, payload format); MQTT 5 user properties are
//! the other headers, in order, both ways. (The engine's `MessageBuilder::header` replaces an
//! earlier value of the same key, so of user properties repeating a name only the last one is
//! kept.) A message published through the engine or HTTP has
//! no `mqtt-qos` header and is delivered at the subscription's QoS. Message expiry interval is
//! the message's TTL, and the remaining time goes back out as the expiry interval.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use ferry::Message;
use ferry_mqtt::{PublishProperties, QoS};

/// Header prefix of MQTT metadata (never sent as user properties).
pub const MQTT_HEADER_PREFIX: &str = "mqtt-";
/// The QoS the message was published with.
pub const H_QOS: &str = "mqtt-qos";
/// Set to `1` when the message was published with RETAIN.
pub const H_RETAIN: &str = "mqtt-retain";
const H_CONTENT_TYPE: &str = "mqtt-content-type";
const H_RESPONSE_TOPIC: &str = "mqtt-response-topic";
const H_CORRELATION: &str = "mqtt-correlation-data";
const H_PAYLOAD_FORMAT: &str = "mqtt-payload-format";

/// What an inbound PUBLISH (or will) carries besides topic and payload.
#[derive(Debug, Clone)]
pub struct Inbound<'a> {
    /// QoS it was published with.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// Client id of the publisher (the message's producer id, for No Local).
    pub client_id: &'a str,
    /// Payload format indicator.
    pub payload_format: Option<bool>,
    /// Message expiry interval (seconds).
    pub expiry: Option<u32>,
    /// Content type.
    pub content_type: Option<&'a str>,
    /// Response topic.
    pub response_topic: Option<&'a str>,
    /// Correlation data.
    pub correlation: Option<&'a Bytes>,
    /// User properties.
    pub user_properties: &'a [(String, String)],
}

impl<'a> Inbound<'a> {
    /// From PUBLISH properties.
    pub fn from_publish(
        qos: QoS,
        retain: bool,
        client_id: &'a str,
        p: &'a PublishProperties,
    ) -> Self {
        Inbound {
            qos,
            retain,
            client_id,
            payload_format: p.payload_format_indicator,
            expiry: p.message_expiry_interval,
            content_type: p.content_type.as_deref(),
            response_topic: p.response_topic.as_deref(),
            correlation: p.correlation_data.as_ref(),
            user_properties: &p.user_properties,
        }
    }

    /// From a will.
    pub fn from_will(will: &'a ferry_mqtt::Will, client_id: &'a str) -> Self {
        let p = &will.properties;
        Inbound {
            qos: will.qos,
            retain: will.retain,
            client_id,
            payload_format: p.payload_format_indicator,
            expiry: p.message_expiry_interval,
            content_type: p.content_type.as_deref(),
            response_topic: p.response_topic.as_deref(),
            correlation: p.correlation_data.as_ref(),
            user_properties: &p.user_properties,
        }
    }

    /// The Ferry message.
    pub fn to_message(&self, payload: Bytes) -> Message {
        let mut b = Message::builder()
            .payload(payload)
            .producer(self.client_id)
            .header(H_QOS, (self.qos as u8).to_string());
        if self.retain {
            b = b.header(H_RETAIN, "1");
        }
        if let Some(f) = self.payload_format {
            b = b.header(H_PAYLOAD_FORMAT, if f { "1" } else { "0" });
        }
        if let Some(ct) = self.content_type {
            b = b.header(H_CONTENT_TYPE, ct);
        }
        if let Some(rt) = self.response_topic {
            b = b.header(H_RESPONSE_TOPIC, rt);
        }
        if let Some(cd) = self.correlation {
            b = b.header(H_CORRELATION, to_hex(cd));
        }
        for (k, v) in self.user_properties {
            b = b.header(k.clone(), v.clone());
        }
        if let Some(secs) = self.expiry {
            b = b.ttl(Duration::from_secs(u64::from(secs)));
        }
        b.build()
    }
}

/// The QoS a message was published with (QoS 2 for messages that did not come from MQTT).
pub fn published_qos(m: &Message) -> QoS {
    match m.header(H_QOS) {
        Some("0") => QoS::AtMostOnce,
        Some("1") => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// Whether the message was published with RETAIN.
pub fn published_retained(m: &Message) -> bool {
    m.header(H_RETAIN) == Some("1")
}

/// Seconds left before the message expires: `None` when it does not expire, `Some(0)` when it
/// already has (rounded up, so a message with time left never reads as 0).
pub fn remaining_expiry(m: &Message, now: SystemTime) -> Option<u32> {
    let at = m.expires_at()?;
    let left = at.duration_since(now).unwrap_or(Duration::ZERO);
    let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
    Some(u32::try_from(secs).unwrap_or(u32::MAX))
}

/// PUBLISH properties for an outbound message (MQTT 5).
pub fn outbound_properties(m: &Message, expiry: Option<u32>) -> PublishProperties {
    let mut p = PublishProperties {
        message_expiry_interval: expiry,
        ..PublishProperties::default()
    };
    for (k, v) in m.headers().iter() {
        match k {
            H_PAYLOAD_FORMAT => p.payload_format_indicator = Some(v == "1"),
            H_CONTENT_TYPE => p.content_type = Some(v.to_string()),
            H_RESPONSE_TOPIC => {
                if ferry_mqtt::validate_topic_name(v).is_ok() {
                    p.response_topic = Some(v.to_string());
                }
            }
            H_CORRELATION => p.correlation_data = from_hex(v).map(Bytes::from),
            _ if k.starts_with(MQTT_HEADER_PREFIX) => {}
            _ => p.user_properties.push((k.to_string(), v.to_string())),
        }
    }
    p
}

pub(crate) fn to_hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(char::from(DIGITS[usize::from(x >> 4)]));
        s.push(char::from(DIGITS[usize::from(x & 0xF)]));
    }
    s
}

pub(crate) fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|d| u8::from_str_radix(d, 16).ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trip_properties() {
        let props = PublishProperties {
            payload_format_indicator: Some(true),
            message_expiry_interval: Some(60),
            content_type: Some("application/json".into()),
            response_topic: Some("replies/1".into()),
            correlation_data: Some(Bytes::from_static(&[0, 1, 0xfe])),
            user_properties: vec![("a".into(), "1".into()), ("b".into(), "2".into())],
            ..PublishProperties::default()
        };
        let inbound = Inbound::from_publish(QoS::AtLeastOnce, true, "c1", &props);
        let m = inbound.to_message(Bytes::from_static(b"x"));
        assert_eq!(published_qos(&m), QoS::AtLeastOnce);
        assert!(published_retained(&m));
        assert_eq!(m.producer_id(), Some("c1"));
        let left = remaining_expiry(&m, SystemTime::now()).unwrap();
        assert!((59..=60).contains(&left));
        let out = outbound_properties(&m, Some(left));
        assert_eq!(out.payload_format_indicator, Some(true));
        assert_eq!(out.content_type.as_deref(), Some("application/json"));
        assert_eq!(out.response_topic.as_deref(), Some("replies/1"));
        assert_eq!(out.correlation_data, props.correlation_data);
        assert_eq!(out.user_properties, props.user_properties);
    }

    #[test]
    fn engine_messages_are_qos2_without_properties() {
        let m = Message::builder().header("k", "v").build();
        assert_eq!(published_qos(&m), QoS::ExactlyOnce);
        assert_eq!(remaining_expiry(&m, SystemTime::now()), None);
        let p = outbound_properties(&m, None);
        assert_eq!(p.user_properties, vec![("k".to_string(), "v".to_string())]);
    }
}
