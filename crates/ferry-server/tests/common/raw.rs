//! A raw MQTT client (MQTT 5 or 3.1.1, hand-encoded packets) over a blocking stream, for tests
//! that read reason codes and reason strings exactly as the server sends them, or see the
//! server close the connection. The stream is a `TcpStream` by default; any `Read + Write`
//! (a TLS stream) will do.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// How long a read waits (on the `TcpStream`s this module opens).
pub const WAIT: Duration = Duration::from_secs(30);

/// A raw MQTT connection.
pub struct Raw<S = TcpStream> {
    pub stream: S,
    /// MQTT 5 (else 3.1.1).
    pub v5: bool,
}

impl Raw {
    /// CONNECT v5 as `client`; with `expiry` a persistent session (clean start off, that
    /// session expiry interval in seconds).
    pub fn connect(addr: SocketAddr, client: &str, expiry: Option<u32>) -> Raw {
        Raw::connect_over(tcp(addr), true, client, expiry)
    }

    /// CONNECT 3.1.1 as `client` with a clean session.
    pub fn connect_v311(addr: SocketAddr, client: &str) -> Raw {
        Raw::connect_over(tcp(addr), false, client, None)
    }
}

/// A TCP connection to `addr` whose reads wait at most [`WAIT`].
pub fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

impl<S: Read + Write> Raw<S> {
    /// CONNECT over `stream` (MQTT 5 if `v5`, else 3.1.1) as `client`, and checks that the
    /// CONNACK accepts it; `expiry` as in [`Raw::connect`].
    pub fn connect_over(stream: S, v5: bool, client: &str, expiry: Option<u32>) -> Raw<S> {
        let mut raw = Raw { stream, v5 };
        let code = raw.try_connect(client, expiry);
        assert_eq!(code, Some(0), "CONNACK of {client}");
        raw
    }

    /// Sends CONNECT as `client`; the CONNACK's return/reason code, `None` if the server
    /// closed the connection instead.
    pub fn try_connect(&mut self, client: &str, expiry: Option<u32>) -> Option<u8> {
        let flags = if expiry.is_some() { 0x00 } else { 0x02 };
        let mut body = [
            &str_bytes("MQTT")[..],
            &[if self.v5 { 5 } else { 4 }, flags, 0, 60],
        ]
        .concat();
        if self.v5 {
            match expiry {
                Some(secs) => {
                    body.extend_from_slice(&[&[5u8, 0x11][..], &secs.to_be_bytes()].concat())
                }
                None => body.push(0),
            }
        }
        body.extend_from_slice(&str_bytes(client));
        self.stream.write_all(&frame(0x10, &body)).unwrap();
        let (kind, ack) = self.read()?;
        assert_eq!(kind, 0x20, "expected CONNACK, got {kind:#x} {ack:?}");
        Some(ack[1])
    }

    /// Sends a QoS 1 PUBLISH without waiting for its PUBACK.
    pub fn send_publish(&mut self, id: u16, topic: &str, payload: &[u8], retain: bool) {
        let first = 0x32 | u8::from(retain);
        let props: &[u8] = if self.v5 { &[0] } else { &[] };
        let body = [&str_bytes(topic)[..], &id.to_be_bytes(), props, payload].concat();
        self.stream.write_all(&frame(first, &body)).unwrap();
    }

    /// The next packet's PUBACK (for packet `id`): its reason code (0 on 3.1.1) and reason
    /// string (empty when there is none). Panics if something else comes or the server closes.
    pub fn puback(&mut self, id: u16) -> (u8, String) {
        let (kind, ack) = self.read().expect("closed while waiting for a PUBACK");
        assert_eq!(kind, 0x40, "expected PUBACK, got {kind:#x} {ack:?}");
        assert_eq!(u16::from_be_bytes([ack[0], ack[1]]), id, "PUBACK packet id");
        let code = ack.get(2).copied().unwrap_or(0);
        let reason = ack
            .get(3..)
            .and_then(|props| property_string(props, 0x1F))
            .unwrap_or_default();
        (code, reason)
    }

    /// A QoS 1 PUBLISH; its PUBACK's reason code and reason string.
    pub fn publish(&mut self, id: u16, topic: &str, payload: &[u8], retain: bool) -> (u8, String) {
        self.send_publish(id, topic, payload, retain);
        self.puback(id)
    }

    /// SUBSCRIBE to `filter` at QoS 1; the SUBACK's reason code.
    pub fn subscribe(&mut self, id: u16, filter: &str) -> u8 {
        let props: &[u8] = if self.v5 { &[0] } else { &[] };
        let body = [&id.to_be_bytes()[..], props, &str_bytes(filter), &[1]].concat();
        self.stream.write_all(&frame(0x82, &body)).unwrap();
        loop {
            let (kind, ack) = self.read().expect("closed while waiting for a SUBACK");
            if kind == 0x90 {
                assert_eq!(u16::from_be_bytes([ack[0], ack[1]]), id);
                let at = if self.v5 {
                    let (props, n) = varint(&ack[2..]);
                    2 + n + props
                } else {
                    2
                };
                return ack[at];
            }
        }
    }

    /// The next PUBLISH's topic and payload (acknowledging QoS 1 ones).
    pub fn next_publish(&mut self) -> (String, Vec<u8>) {
        loop {
            let (kind, body) = self.read().expect("closed while waiting for a PUBLISH");
            if kind & 0xF0 != 0x30 {
                continue;
            }
            let n = usize::from(u16::from_be_bytes([body[0], body[1]]));
            let topic = String::from_utf8(body[2..2 + n].to_vec()).unwrap();
            let mut at = 2 + n;
            if kind & 0x06 != 0 {
                let id = [body[at], body[at + 1]];
                at += 2;
                self.stream.write_all(&frame(0x40, &id)).unwrap();
            }
            if self.v5 {
                let (props, len) = varint(&body[at..]);
                at += len + props;
            }
            return (topic, body[at..].to_vec());
        }
    }

    /// PINGREQ; whether the PINGRESP comes (other packets before it are dropped) before the
    /// server closes the connection.
    pub fn ping(&mut self) -> bool {
        if self.stream.write_all(&frame(0xC0, &[])).is_err() {
            return false;
        }
        loop {
            match self.read() {
                Some((0xD0, _)) => return true,
                Some(_) => {}
                None => return false,
            }
        }
    }

    /// The next packet (first byte, body), or `None` once the server closed the connection
    /// (or reset it). Panics when a read times out.
    pub fn read(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut first = [0u8; 1];
        match self.stream.read(&mut first) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) if timed_out(&e) => panic!("no packet within the read timeout: {e}"),
            Err(_) => return None,
        }
        let (mut len, mut shift) = (0usize, 0);
        loop {
            let mut b = [0u8; 1];
            self.stream.read_exact(&mut b).ok()?;
            len |= usize::from(b[0] & 0x7f) << shift;
            shift += 7;
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body).ok()?;
        Some((first[0], body))
    }
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// A variable byte integer at the start of `b`: its value and its length in bytes.
fn varint(b: &[u8]) -> (usize, usize) {
    let (mut n, mut shift) = (0usize, 0);
    for (i, byte) in b.iter().enumerate() {
        n |= usize::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return (n, i + 1);
        }
    }
    panic!("truncated variable byte integer: {b:?}")
}

/// The UTF-8 string property `key` in a property block (its length first), if there.
fn property_string(block: &[u8], key: u8) -> Option<String> {
    if block.is_empty() {
        return None;
    }
    let (len, n) = varint(block);
    let mut props = &block[n..n + len];
    while let [k, rest @ ..] = props {
        // Only string properties (reason string 0x1F, user property 0x26) come in the
        // acknowledgements read here; a user property is two strings.
        let strings = if *k == 0x26 { 2 } else { 1 };
        let mut at = 0;
        let mut first = None;
        for _ in 0..strings {
            let n = usize::from(u16::from_be_bytes([rest[at], rest[at + 1]]));
            first.get_or_insert_with(|| {
                String::from_utf8(rest[at + 2..at + 2 + n].to_vec()).unwrap()
            });
            at += 2 + n;
        }
        if *k == key {
            return first;
        }
        props = &rest[at..];
    }
    None
}

/// The next packet on `s` (first byte, body), for tests that frame packets themselves;
/// panics if the server closed the connection.
pub fn read(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut raw = Raw {
        stream: s,
        v5: true,
    };
    raw.read().expect("a packet, not a closed connection")
}

pub fn str_bytes(s: &str) -> Vec<u8> {
    let n = u16::try_from(s.len()).unwrap();
    [&n.to_be_bytes()[..], s.as_bytes()].concat()
}

pub fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}
