//! Property tests: valid packets of both versions round-trip through encode and decode, partial
//! input is never consumed, streams split at arbitrary points decode in order, and no input makes
//! the decoder panic.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::BytesMut;
use common::{packet, versioned_packet, MAX};
use ferry_mqtt::{decode, decode_connect, encode, encoded_len, Packet, ProtocolVersion};
use proptest::collection::vec;
use proptest::prelude::*;

use ProtocolVersion::{V311, V5};

fn encoded(packet: &Packet, version: ProtocolVersion) -> BytesMut {
    let mut out = BytesMut::new();
    encode(packet, version, &mut out).unwrap();
    out
}

/// Decodes every packet of `buf`, stopping at the first error or incomplete packet.
fn decode_all(buf: &mut BytesMut, version: ProtocolVersion) -> Vec<Packet> {
    let mut packets = Vec::new();
    while let Ok(Some(packet)) = decode(buf, version, MAX) {
        packets.push(packet);
    }
    packets
}

/// Whatever decodes must re-encode (in the same version) and decode to the same packet.
fn assert_reencodes(packet: &Packet, version: ProtocolVersion) {
    let mut again = encoded(packet, version);
    assert_eq!(
        decode(&mut again, version, MAX).unwrap().as_ref(),
        Some(packet)
    );
    assert!(again.is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn roundtrip((version, packet) in versioned_packet()) {
        let mut buf = encoded(&packet, version);
        prop_assert_eq!(encoded_len(&packet, version).unwrap(), buf.len());
        let decoded = decode(&mut buf, version, MAX).unwrap();
        prop_assert_eq!(decoded.as_ref(), Some(&packet));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn connect_roundtrips_without_knowing_the_version(connect in prop_oneof![common::connect(V311), common::connect(V5)]) {
        // The version passed to encode is irrelevant for CONNECT.
        let mut buf = encoded(&Packet::Connect(connect.clone()), V311);
        prop_assert_eq!(decode_connect(&mut buf, MAX).unwrap(), Some(connect));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn prefixes_need_more_bytes((version, packet) in versioned_packet()) {
        let full = encoded(&packet, version);
        for len in 0..full.len() {
            let mut buf = BytesMut::from(&full[..len]);
            prop_assert_eq!(decode(&mut buf, version, MAX), Ok(None), "prefix of {} bytes", len);
            prop_assert_eq!(&buf[..], &full[..len]);
            if let Packet::Connect(_) = packet {
                prop_assert_eq!(decode_connect(&mut buf, MAX), Ok(None));
                prop_assert_eq!(&buf[..], &full[..len]);
            }
        }
    }

    #[test]
    fn chunked_stream_decodes_in_order(
        (version, packets) in prop_oneof![Just(V311), Just(V5)]
            .prop_flat_map(|v| (Just(v), vec(packet(v), 1..6))),
        chunks in vec(1usize..24, 1..40),
    ) {
        let mut stream = BytesMut::new();
        for p in &packets {
            encode(p, version, &mut stream).unwrap();
        }
        let mut buf = BytesMut::new();
        let mut decoded = Vec::new();
        let mut rest = &stream[..];
        let mut sizes = chunks.iter().cycle();
        while !rest.is_empty() {
            let n = (*sizes.next().unwrap()).min(rest.len());
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            decoded.extend(decode_all(&mut buf, version));
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(decoded, packets);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..96)) {
        for version in [V311, V5] {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(p)) = decode(&mut buf, version, MAX) {
                assert_reencodes(&p, version);
            }
        }
        let mut buf = BytesMut::from(&bytes[..]);
        if let Ok(Some(connect)) = decode_connect(&mut buf, MAX) {
            assert_reencodes(&Packet::Connect(connect), V5);
        }
    }

    #[test]
    fn mutated_packets_never_panic(
        (version, packet) in versioned_packet(),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = encoded(&packet, version).to_vec();
        for (index, value) in edits {
            let i = index.index(bytes.len());
            bytes[i] = value;
        }
        for v in [V311, V5] {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(p)) = decode(&mut buf, v, MAX) {
                assert_reencodes(&p, v);
            }
        }
    }

    #[test]
    fn small_max_packet_size_is_enforced((version, packet) in versioned_packet(), max in 2usize..64) {
        let full = encoded(&packet, version);
        let mut buf = full.clone();
        match decode(&mut buf, version, max) {
            Ok(Some(p)) => {
                prop_assert!(full.len() <= max);
                prop_assert_eq!(p, packet);
            }
            Err(ferry_mqtt::DecodeError::PacketTooLarge { size, max: m }) => {
                prop_assert_eq!(size, full.len());
                prop_assert_eq!(m, max);
                prop_assert!(size > max);
            }
            other => prop_assert!(false, "unexpected {:?}", other),
        }
    }
}
