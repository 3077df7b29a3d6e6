//! MQTT packets from arbitrary bytes: decoding never panics in either protocol version (nor
//! before CONNECT), and every packet that decodes re-encodes and decodes to an equal packet.
#![no_main]

use ferry_mqtt::bytes::BytesMut;
use ferry_mqtt::{decode, decode_connect, encode, Packet, ProtocolVersion};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 1 << 16;

fn reencodes(packet: &Packet, version: ProtocolVersion) {
    let mut out = BytesMut::new();
    encode(packet, version, &mut out).expect("a decoded packet must encode");
    let again = decode(&mut out, version, MAX).expect("a re-encoded packet must decode");
    assert_eq!(again.as_ref(), Some(packet));
    assert!(out.is_empty());
}

fuzz_target!(|data: &[u8]| {
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let mut buf = BytesMut::from(data);
        while let Ok(Some(packet)) = decode(&mut buf, version, MAX) {
            reencodes(&packet, version);
        }
    }
    let mut buf = BytesMut::from(data);
    if let Ok(Some(connect)) = decode_connect(&mut buf, MAX) {
        reencodes(&Packet::Connect(connect), ProtocolVersion::V5);
    }
});
