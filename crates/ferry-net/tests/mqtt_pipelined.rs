//! Packets a client sends right behind its CONNECT, without waiting for the CONNACK (the spec
//! allows it; paho-mqtt's `loop_start()` does it), are handled at once: the client gets its
//! SUBACK, PUBACK and messages without sending anything else.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;

use bytes::BytesMut;
use common::*;
use ferry_mqtt::{
    decode, encode, Connect, Packet, ProtocolVersion, Publish, QoS, ReasonCode, Subscribe,
    Subscription,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// CONNECT, SUBSCRIBE `t` (QoS 1) and PUBLISH to `t` (QoS 1), encoded back to back.
fn connect_subscribe_publish(version: ProtocolVersion, id: &str, topic: &str) -> BytesMut {
    let mut out = BytesMut::new();
    let connect = Connect::new(version, id);
    encode(&Packet::Connect(connect), version, &mut out).unwrap();
    let subscribe = Subscribe {
        packet_id: 1,
        subscriptions: vec![Subscription::new(topic, QoS::AtLeastOnce)],
        properties: Default::default(),
    };
    encode(&Packet::Subscribe(subscribe), version, &mut out).unwrap();
    let mut publish = Publish::new(topic, format!("hello {id}").into_bytes());
    publish.qos = QoS::AtLeastOnce;
    publish.packet_id = Some(2);
    encode(&Packet::Publish(publish), version, &mut out).unwrap();
    out
}

/// Writes `bytes` in the pieces `splits` gives (one write each), then reads until the client
/// has seen CONNACK, SUBACK, PUBACK and its own message, and checks their order and content.
async fn pipelined_round(
    addr: SocketAddr,
    version: ProtocolVersion,
    id: &str,
    splits: &[usize],
) -> Result<(), String> {
    let topic = format!("pipe/{id}");
    let bytes = connect_subscribe_publish(version, id, &topic);
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let mut at = 0;
    for &cut in splits.iter().chain(std::iter::once(&bytes.len())) {
        let cut = cut.min(bytes.len());
        if cut > at {
            stream.write_all(&bytes[at..cut]).await.unwrap();
            at = cut;
        }
    }
    let mut buf = BytesMut::new();
    let mut seen = Vec::new();
    let (mut suback, mut puback, mut message) = (false, false, false);
    while !(suback && puback && message) {
        let packet = loop {
            if let Some(p) = decode(&mut buf, version, 1 << 20).unwrap() {
                break p;
            }
            let n = tokio::time::timeout(WAIT, stream.read_buf(&mut buf))
                .await
                .map_err(|_| format!("{id}: nothing more within {WAIT:?}; seen {seen:?}"))?
                .unwrap_or(0);
            if n == 0 {
                return Err(format!("{id}: closed; seen {seen:?}"));
            }
        };
        match &packet {
            Packet::ConnAck(a) => {
                assert!(seen.is_empty(), "{id}: CONNACK not first: {seen:?}");
                assert_eq!(a.reason_code, ReasonCode::Success, "{id}");
            }
            Packet::SubAck(s) => {
                assert_eq!(s.packet_id, 1);
                assert_eq!(s.reason_codes, vec![ReasonCode::GrantedQoS1], "{id}");
                suback = true;
            }
            Packet::PubAck(a) => {
                assert_eq!(a.packet_id, 2);
                assert_eq!(a.reason_code, ReasonCode::Success, "{id}");
                puback = true;
            }
            Packet::Publish(p) => {
                assert_eq!(p.topic, topic);
                assert_eq!(p.payload.as_ref(), format!("hello {id}").as_bytes());
                message = true;
            }
            other => return Err(format!("{id}: unexpected {other:?}")),
        }
        seen.push(packet);
    }
    assert!(
        matches!(seen.first(), Some(Packet::ConnAck(_))),
        "{id}: {seen:?}"
    );
    Ok(())
}

async fn many_rounds(version: ProtocolVersion, tag: &str) {
    let server = server().await;
    let addr = server.mqtt_addr();
    let probe = connect_subscribe_publish(version, "x", "pipe/x").len();
    for i in 0..200 {
        // In one write; then split inside the SUBSCRIBE and the PUBLISH, so that the rest
        // arrives in a later read than the CONNECT.
        let splits: Vec<usize> = match i % 4 {
            0 | 1 => vec![],
            2 => vec![probe / 2],
            _ => vec![probe - 3],
        };
        let id = format!("{tag}-{i}");
        if let Err(e) = pipelined_round(addr, version, &id, &splits).await {
            panic!("round {i} (splits {splits:?}): {e}");
        }
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_behind_connect_are_handled_at_once_v311() {
    many_rounds(ProtocolVersion::V311, "p4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_behind_connect_are_handled_at_once_v5() {
    many_rounds(ProtocolVersion::V5, "p5").await;
}
