//! The MQTT state survives a SIGKILL exactly as acknowledged: a real `ferry serve` on a data
//! directory, and in each cycle retained messages set, overwritten and cleared (each PUBACKed),
//! a persistent session's SUBSCRIBE (SUBACKed) and UNSUBSCRIBE (UNSUBACKed), then at once
//! SIGKILL; the last acknowledgement before the kill is the session's in odd cycles and a
//! retained message's in even ones (a save round covers every change made before it, so each
//! kind must be last to be tested alone: a server that acknowledged either before its save
//! fails). After the restart:
//! - a new subscriber to `state/#` gets exactly the retained messages acknowledged (every one
//!   set, the last overwrite, none of those cleared);
//! - the session is present, holds the subscription made just before the kill and not the one
//!   removed: subscribing again with "send retained only if the subscription is new" (MQTT 5
//!   retain handling 1) sends the retained message of a filter that is not in the session and
//!   nothing for one that is. A retained sentinel subscribed last marks the end of what the
//!   subscriptions send (retained messages go out in the order of the SUBSCRIBEs), so no
//!   absence is judged by waiting.
//!
//! `CRASH_STATE_CYCLES` sets the number of cycles (default 8).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

mod common;

use common::raw::{frame, read, str_bytes, Raw};

/// CONNECT v5 as `client` with a persistent session (clean start off, expiry 1 h); returns the
/// connection and whether the session was present.
fn connect_persistent(addr: SocketAddr, client: &str) -> (TcpStream, bool) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let props = [&[5u8, 0x11][..], &3600u32.to_be_bytes()].concat();
    let body = [
        &[0, 4][..],
        b"MQTT",
        &[5, 0x00, 0, 60],
        &props,
        &str_bytes(client),
    ]
    .concat();
    s.write_all(&frame(0x10, &body)).unwrap();
    let (kind, ack) = read(&mut s);
    assert_eq!((kind, ack[1]), (0x20, 0), "CONNACK");
    (s, ack[0] & 1 == 1)
}

/// A SUBSCRIBE of one filter at QoS 1 with `retain_handling`.
fn subscribe_frame(id: u16, filter: &str, retain_handling: u8) -> Vec<u8> {
    let options = 1 | (retain_handling << 4);
    let body = [&id.to_be_bytes()[..], &[0], &str_bytes(filter), &[options]].concat();
    frame(0x82, &body)
}

fn unsubscribe_frame(id: u16, filters: &[&str]) -> Vec<u8> {
    let mut body = [&id.to_be_bytes()[..], &[0]].concat();
    for f in filters {
        body.extend_from_slice(&str_bytes(f));
    }
    frame(0xA2, &body)
}

/// Reads until the packet of `kind` (high nibble) with packet id `id`; returns its body.
/// Publishes met on the way are acknowledged and returned as (topic, payload).
fn until_ack(s: &mut TcpStream, kind: u8, id: u16) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let mut publishes = Vec::new();
    loop {
        let (k, body) = read(s);
        if k & 0xF0 == 0x30 {
            publishes.push(parse_publish(s, k, &body));
            continue;
        }
        if k & 0xF0 == kind && u16::from_be_bytes([body[0], body[1]]) == id {
            return (body, publishes);
        }
    }
}

/// The topic and payload of a PUBLISH (acknowledging it if QoS 1).
fn parse_publish(s: &mut TcpStream, kind: u8, body: &[u8]) -> (String, Vec<u8>) {
    let n = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let topic = String::from_utf8(body[2..2 + n].to_vec()).unwrap();
    let mut at = 2 + n;
    if kind & 0x06 != 0 {
        let ack = [&body[at..at + 2], &[0]].concat();
        s.write_all(&frame(0x40, &ack)).unwrap();
        at += 2;
    }
    // Properties: a variable byte integer length (short here).
    let props = usize::from(body[at]);
    at += 1 + props;
    (topic, body[at..].to_vec())
}

/// Reads publishes until the sentinel's; returns those before it.
fn until_sentinel(s: &mut TcpStream, mut seen: Vec<(String, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
    loop {
        if let Some(i) = seen.iter().position(|(t, _)| t == SENTINEL) {
            seen.truncate(i);
            return seen;
        }
        let (k, body) = read(s);
        if k & 0xF0 == 0x30 {
            seen.push(parse_publish(s, k, &body));
        }
    }
}

const SENTINEL: &str = "end/x";

/// The retained messages under `state/` now, as a new client `client` gets them (up to the
/// sentinel's).
fn retained_now(addr: SocketAddr, client: &str) -> BTreeMap<String, Vec<u8>> {
    let mut check = Raw::connect(addr, client, None);
    let frames = [
        subscribe_frame(1, "state/#", 0),
        subscribe_frame(2, "end/#", 0),
    ]
    .concat();
    check.stream.write_all(&frames).unwrap();
    until_sentinel(&mut check.stream, Vec::new())
        .into_iter()
        .collect()
}
const SESSION: &str = "crash-state-session";

fn retained_expected(cycle: usize) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    for k in 1..=cycle {
        m.insert(format!("state/set/c{k}"), format!("v{k}").into_bytes());
    }
    m.insert("state/over".into(), format!("c{cycle}").into_bytes());
    m.insert(format!("state/clear/c{cycle}"), b"x".to_vec());
    m
}

#[test]
fn retained_and_session_changes_survive_an_immediate_sigkill_as_acknowledged() {
    let cycles: usize = std::env::var("CRASH_STATE_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = common::serve(&data, &[]).unwrap_or_else(|e| panic!("{e}"));
    let mut publisher = Raw::connect(server.mqtt, "crash-state-setup", None);
    assert_eq!(publisher.publish(1, SENTINEL, b"end", true).0, 0);
    drop(publisher);

    for cycle in 1..=cycles {
        let (mut sess, present) = connect_persistent(server.mqtt, SESSION);
        if cycle > 1 {
            assert!(
                present,
                "cycle {cycle}: the session is not present after the restart"
            );
            // The subscription made before the kill is there (nothing sent for it), the one
            // removed is not (its retained message sent).
            let mut id = 100;
            let mut frames = subscribe_frame(id, &format!("sub/c{}/#", cycle - 1), 1);
            if cycle > 2 {
                id += 1;
                frames.extend(subscribe_frame(id, &format!("sub/c{}/#", cycle - 2), 1));
            }
            id += 1;
            frames.extend(subscribe_frame(id, "end/#", 0));
            sess.write_all(&frames).unwrap();
            let (_, seen) = until_ack(&mut sess, 0x90, id);
            let got: Vec<String> = until_sentinel(&mut sess, seen)
                .into_iter()
                .map(|(t, _)| t)
                .collect();
            let want: Vec<String> = if cycle > 2 {
                vec![format!("sub/c{}/r", cycle - 2)]
            } else {
                Vec::new()
            };
            assert_eq!(
                got, want,
                "cycle {cycle}: the session's subscriptions are not as acknowledged"
            );
            let cleanup = format!("sub/c{}/#", cycle.saturating_sub(2));
            sess.write_all(&unsubscribe_frame(200, &[&cleanup, "end/#"]))
                .unwrap();
            until_ack(&mut sess, 0xB0, 200);

            // Exactly the retained messages acknowledged.
            let got = retained_now(server.mqtt, &format!("check-{cycle}"));
            assert_eq!(
                got,
                retained_expected(cycle - 1),
                "cycle {cycle}: the retained messages are not as acknowledged"
            );
        }

        // The changes of this cycle, each acknowledged, then at once SIGKILL: in odd cycles the
        // session's last, in even ones the retained messages' (a save round covers every
        // change made before it, so the last acknowledgement is the one tested alone).
        let mut p = Raw::connect(server.mqtt, &format!("pub-{cycle}"), None);
        // The retained message of the subscription made in this cycle is published before it
        // (published after, it would also be delivered to the session).
        let (code, _) = p.publish(9, &format!("sub/c{cycle}/r"), b"r", true);
        assert_eq!(code, 0);
        let retained_changes = |p: &mut Raw| {
            let changes: Vec<(String, Vec<u8>)> = vec![
                (
                    format!("state/set/c{cycle}"),
                    format!("v{cycle}").into_bytes(),
                ),
                ("state/over".into(), format!("c{cycle}").into_bytes()),
                (format!("state/clear/c{cycle}"), b"x".to_vec()),
                (format!("state/clear/c{}", cycle - 1), Vec::new()),
            ];
            for (i, (topic, payload)) in changes.iter().enumerate() {
                let (code, reason) = p.publish(i as u16 + 1, topic, payload, true);
                assert_eq!(code, 0, "cycle {cycle}: {topic}: {reason}");
            }
        };
        let session_changes = |sess: &mut TcpStream| {
            // Retain handling 2: nothing sent at subscribe, so nothing is left in flight.
            sess.write_all(&subscribe_frame(1, &format!("sub/c{cycle}/#"), 2))
                .unwrap();
            let (suback, _) = until_ack(sess, 0x90, 1);
            let props = usize::from(suback[2]);
            assert_eq!(suback[3 + props], 1, "cycle {cycle}: SUBACK");
            if cycle > 1 {
                sess.write_all(&unsubscribe_frame(2, &[&format!("sub/c{}/#", cycle - 1)]))
                    .unwrap();
                let (unsuback, _) = until_ack(sess, 0xB0, 2);
                let props = usize::from(unsuback[2]);
                assert_eq!(unsuback[3 + props], 0, "cycle {cycle}: UNSUBACK");
            }
        };
        if cycle % 2 == 1 {
            retained_changes(&mut p);
            session_changes(&mut sess);
        } else {
            session_changes(&mut sess);
            retained_changes(&mut p);
        }
        server.crash();
        server = common::serve(&data, &[]).unwrap_or_else(|e| panic!("{e}"));
    }
    // The last cycle's changes, checked once more after the final restart.
    assert_eq!(
        retained_now(server.mqtt, "check-last"),
        retained_expected(cycles)
    );
    let (_, present) = connect_persistent(server.mqtt, SESSION);
    assert!(present);
    server.stop("the last server");
}
