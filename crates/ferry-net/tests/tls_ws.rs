//! MQTT over TLS, HTTPS, and MQTT over WebSocket (`ws://` and `wss://`) at `/mqtt`, with a
//! self-signed certificate made in the test.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use common::*;
use ferry_net::Server;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::{TlsConfiguration, Transport};

struct Cert {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    pem: String,
}

/// A self-signed certificate for `localhost` and 127.0.0.1, written as PEM files.
fn self_signed() -> Cert {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let pem = ck.cert.pem();
    std::fs::write(&cert, &pem).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    Cert {
        _dir: dir,
        cert,
        key,
        pem,
    }
}

async fn tls_server(c: &Cert) -> Server {
    server_with(|cfg| {
        cfg.mqtt.tls_listen = "127.0.0.1:0".parse().unwrap();
        cfg.mqtt.tls_cert = Some(c.cert.clone());
        cfg.mqtt.tls_key = Some(c.key.clone());
        cfg.http.tls_cert = Some(c.cert.clone());
        cfg.http.tls_key = Some(c.key.clone());
    })
    .await
}

fn trust(c: &Cert) -> TlsConfiguration {
    TlsConfiguration::Simple {
        ca: c.pem.clone().into_bytes(),
        alpn: None,
        client_auth: None,
    }
}

/// Subscribes `sub` to `t/#`, publishes from a plain TCP client, checks `sub` receives it.
async fn round_trip(server: &Server, sub: &mut Client5, topic: &str) {
    sub.client.subscribe("t/#", Q5::AtLeastOnce).await.unwrap();
    sub.suback().await;
    let publisher = connect5(server.mqtt_addr(), &format!("pub-{topic}")).await;
    publisher
        .client
        .publish(topic, Q5::AtLeastOnce, false, "hello")
        .await
        .unwrap();
    let m = sub.publish().await;
    assert_eq!(
        (m.topic.as_str(), m.payload.as_ref()),
        (topic, &b"hello"[..])
    );
    // And the other way round: what the subscriber's connection publishes arrives too.
    sub.client
        .publish("t/back", Q5::AtLeastOnce, false, "back")
        .await
        .unwrap();
    let m = sub.publish().await;
    assert_eq!(m.topic, "t/back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_tls_v5_and_v311() {
    let cert = self_signed();
    let server = tls_server(&cert).await;
    let addr = server.mqtt_tls_addr().expect("TLS listener");
    let mut o = rumqttc::v5::MqttOptions::new("tls5", "localhost", addr.port());
    o.set_transport(Transport::Tls(trust(&cert)));
    let mut c = spawn5(o);
    assert!(!c.connected().await);
    round_trip(&server, &mut c, "t/tls5").await;

    let mut o = rumqttc::MqttOptions::new("tls4", "localhost", addr.port());
    o.set_transport(Transport::Tls(trust(&cert)));
    let mut c4 = spawn4(o);
    c4.connected().await;
    c4.client
        .subscribe("t/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    c4.suback().await;
    c.client
        .publish("t/x", Q5::AtLeastOnce, false, "to4")
        .await
        .unwrap();
    assert_eq!(c4.publish().await.payload.as_ref(), b"to4");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_client_on_the_tls_port_is_dropped() {
    let cert = self_signed();
    let server = tls_server(&cert).await;
    let addr = server.mqtt_tls_addr().unwrap();
    let mut c = spawn5(options5(addr, "plain"));
    match c.next().await {
        Seen::Error(_) => {}
        other => panic!("expected an error, got {other:?}"),
    }
    // The server still serves TLS clients afterwards.
    let mut o = rumqttc::v5::MqttOptions::new("tls-after", "localhost", addr.port());
    o.set_transport(Transport::Tls(trust(&cert)));
    let mut c = spawn5(o);
    c.connected().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_api_with_a_custom_root() {
    let cert = self_signed();
    let server = tls_server(&cert).await;
    assert!(server.http_tls());
    let port = server.http_addr().unwrap().port();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let r = client
        .get(format!("https://localhost:{port}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Plain HTTP on the HTTPS port fails.
    assert!(reqwest::get(format!("http://127.0.0.1:{port}/health"))
        .await
        .is_err());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_websocket_v5_and_v311() {
    let server = server().await;
    let port = server.http_addr().unwrap().port();
    let url = format!("ws://127.0.0.1:{port}/mqtt");
    let mut o = rumqttc::v5::MqttOptions::new("ws5", &url, port);
    o.set_transport(Transport::Ws);
    let mut c = spawn5(o);
    c.connected().await;
    round_trip(&server, &mut c, "t/ws5").await;

    let mut o = rumqttc::MqttOptions::new("ws4", &url, port);
    o.set_transport(Transport::Ws);
    let mut c4 = spawn4(o);
    c4.connected().await;
    c4.client
        .subscribe("t/#", rumqttc::QoS::ExactlyOnce)
        .await
        .unwrap();
    c4.suback().await;
    c.client
        .publish("t/q2", Q5::ExactlyOnce, false, "exactly")
        .await
        .unwrap();
    let m = c4.publish().await;
    assert_eq!((m.qos, m.payload.as_ref()), (2, &b"exactly"[..]));
    assert!(server.mqtt().stats().active >= 2);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_websocket_without_a_client_library() {
    // A hand-made WebSocket handshake and one binary frame holding CONNECT.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = server().await;
    let addr = server.http_addr().unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /mqtt HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: mqtt\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("sec-websocket-protocol: mqtt"), "{head}");
    // CONNECT (3.1.1, client id "raw"), in a masked binary frame.
    let connect: &[u8] = &[
        0x10, 15, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30, 0, 3, b'r', b'a', b'w',
    ];
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x82, 0x80 | connect.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(connect.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&frame).await.unwrap();
    // The answer: an unmasked binary frame with CONNACK (0x20 0x02 0x00 0x00).
    let mut answer = [0u8; 6];
    tokio::time::timeout(WAIT, s.read_exact(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, [0x82, 4, 0x20, 2, 0, 0]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_secure_websocket() {
    let cert = self_signed();
    let server = tls_server(&cert).await;
    let port = server.http_addr().unwrap().port();
    let url = format!("wss://localhost:{port}/mqtt");
    let mut o = rumqttc::v5::MqttOptions::new("wss5", &url, port);
    o.set_transport(Transport::Wss(trust(&cert)));
    let mut c = spawn5(o);
    c.connected().await;
    round_trip(&server, &mut c, "t/wss").await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_has_the_header_timeout_and_the_connection_cap() {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let cert = self_signed();
    let server = server_with(|cfg| {
        cfg.http.tls_cert = Some(cert.cert.clone());
        cfg.http.tls_key = Some(cert.key.clone());
        cfg.http.header_read_timeout_secs = 1;
        cfg.http.max_connections = 2;
    })
    .await;
    let addr = server.http_addr().unwrap();
    let port = addr.port();
    let health = format!("https://localhost:{port}/health");
    // Each request on a connection of its own: a client of its own.
    let get = || async {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(cert.pem.as_bytes()).unwrap())
            .build()
            .unwrap()
            .get(&health)
            .send()
            .await
    };

    // A TLS client that completes the handshake, then never finishes its head, is cut.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(cert.pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(WAIT, tls.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "the unfinished head over TLS was not cut");
    drop(tls);

    // Two silent TCP connections (no handshake) fill the cap; the next is closed at once.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if get().await.is_ok() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "HTTPS did not answer");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // A silent connection the server holds (not refused while earlier ones still close).
    let held = || async {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut b = [0u8; 1];
            let r = tokio::time::timeout(std::time::Duration::from_millis(300), s.read(&mut b));
            if r.await.is_err() {
                return s;
            }
            assert!(std::time::Instant::now() < deadline, "never held");
        }
    };
    let silent = [held().await, held().await];
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if get().await.is_err() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a connection past the cap was served"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop(silent);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Ok(r) = get().await {
            assert_eq!(r.status(), 200);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "HTTPS did not serve again"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    server.shutdown().await;
}
