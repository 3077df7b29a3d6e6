//! A raw MQTT 5 client over a blocking socket, for tests that read reason codes and reason
//! strings exactly as the server sends them.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// How long a read waits.
const WAIT: Duration = Duration::from_secs(30);

/// A raw MQTT 5 connection.
pub struct Raw(pub TcpStream);

impl Raw {
    /// CONNECT v5 as `client`; with `expiry` a persistent session (clean start off, that
    /// session expiry interval in seconds).
    pub fn connect(addr: SocketAddr, client: &str, expiry: Option<u32>) -> Raw {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let (flags, props) = match expiry {
            Some(secs) => (0x00, [&[5u8, 0x11][..], &secs.to_be_bytes()].concat()),
            None => (0x02, vec![0u8]),
        };
        let body = [
            &[0, 4][..],
            b"MQTT",
            &[5, flags, 0, 60],
            &props,
            &str_bytes(client),
        ]
        .concat();
        s.write_all(&frame(0x10, &body)).unwrap();
        let (kind, ack) = read(&mut s);
        assert_eq!((kind, ack[1]), (0x20, 0), "CONNACK");
        Raw(s)
    }

    /// A QoS 1 PUBLISH; its PUBACK's reason code and reason string.
    pub fn publish(&mut self, id: u16, topic: &str, payload: &[u8], retain: bool) -> (u8, String) {
        let first = 0x32 | u8::from(retain);
        let body = [&str_bytes(topic)[..], &id.to_be_bytes(), &[0], payload].concat();
        self.0.write_all(&frame(first, &body)).unwrap();
        let (kind, ack) = read(&mut self.0);
        assert_eq!(kind, 0x40, "PUBACK");
        assert_eq!(u16::from_be_bytes([ack[0], ack[1]]), id);
        let code = ack.get(2).copied().unwrap_or(0);
        let mut reason = String::new();
        if ack.len() > 4 {
            let at = if ack[3] & 0x80 != 0 { 5 } else { 4 };
            if ack[at] == 0x1F {
                let n = usize::from(u16::from_be_bytes([ack[at + 1], ack[at + 2]]));
                reason = String::from_utf8(ack[at + 3..at + 3 + n].to_vec()).unwrap();
            }
        }
        (code, reason)
    }

    /// SUBSCRIBE to `filter` at QoS 1; the SUBACK's reason code.
    pub fn subscribe(&mut self, id: u16, filter: &str) -> u8 {
        let body = [&id.to_be_bytes()[..], &[0], &str_bytes(filter), &[1]].concat();
        self.0.write_all(&frame(0x82, &body)).unwrap();
        loop {
            let (kind, ack) = read(&mut self.0);
            if kind == 0x90 {
                assert_eq!(u16::from_be_bytes([ack[0], ack[1]]), id);
                let props = usize::from(ack[2]);
                return ack[3 + props];
            }
        }
    }

    /// The next PUBLISH's topic and payload (acknowledging QoS 1 ones).
    pub fn next_publish(&mut self) -> (String, Vec<u8>) {
        loop {
            let (kind, body) = read(&mut self.0);
            if kind & 0xF0 != 0x30 {
                continue;
            }
            let n = usize::from(u16::from_be_bytes([body[0], body[1]]));
            let topic = String::from_utf8(body[2..2 + n].to_vec()).unwrap();
            let mut at = 2 + n;
            if kind & 0x06 != 0 {
                let id = [body[at], body[at + 1]];
                at += 2;
                let ack = [&id[..], &[0]].concat();
                self.0.write_all(&frame(0x40, &ack)).unwrap();
            }
            // Properties: a one-byte length suffices for what the server sends here.
            let props = usize::from(body[at]);
            at += 1 + props;
            return (topic, body[at..].to_vec());
        }
    }
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

pub fn read(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut first = [0u8; 1];
    s.read_exact(&mut first).unwrap();
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        len |= usize::from(b[0] & 0x7f) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (first[0], body)
}
