//! `ferry serve` under TLS abuse: connections that open TCP to a TLS port and never send a
//! ClientHello. On the MQTT TLS listener they count against `mqtt.max_connections_per_address`
//! and `mqtt.max_connections` from the moment they are accepted: one address holds no more
//! than its cap, the connections past it are closed at once (counted in
//! `ferry_refused_total{reason}`), and other clients' handshakes go through meanwhile. A silent
//! handshake is closed after `tls_handshake_timeout_secs` (MQTT TLS and HTTPS), and its place
//! comes back.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use common::raw::Raw;
use common::Server;

const WAIT: Duration = Duration::from_secs(15);

const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, last))
}

/// A self-signed certificate for `localhost` written to `dir`: (cert.pem, key.pem, its DER).
fn certificate(dir: &Path) -> (String, String, CertificateDer<'static>) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    (
        cert.to_str().unwrap().to_string(),
        key.to_str().unwrap().to_string(),
        ck.cert.der().clone(),
    )
}

/// A TLS client configuration that trusts `cert`.
fn client_config(cert: &CertificateDer<'static>) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Starts `ferry serve` on `dir` with an MQTT TLS listener (and `mqtt` more of its section)
/// and `http` as its `[http]` section, where `{cert}` and `{key}` stand for the files of a
/// fresh certificate; returns the server, the MQTT TLS listener's address and a client
/// configuration that trusts the certificate.
fn serve_tls(dir: &Path, mqtt: &str, http: &str) -> (Server, SocketAddr, Arc<ClientConfig>) {
    let (cert, key, der) = certificate(dir);
    let toml = format!(
        "[mqtt]\ntls_listen = \"127.0.0.1:0\"\ntls_cert = \"{{cert}}\"\ntls_key = \"{{key}}\"\n\
         {mqtt}\n[http]\n{http}\n"
    )
    .replace("{cert}", &cert)
    .replace("{key}", &key);
    let file = dir.join("ferry-test.toml");
    std::fs::write(&file, toml).unwrap();
    let server = common::serve(&dir.join("data"), &["--config", file.to_str().unwrap()])
        .unwrap_or_else(|e| panic!("{e}"));
    let tls = server.mqtt_tls.expect("an MQTT TLS listener");
    (server, tls, client_config(&der))
}

/// A TCP connection from `from` (any port) to `to`, whose reads wait at most [`WAIT`].
fn tcp_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::new(from, 0).into()).unwrap();
    socket.connect(&to.into()).unwrap();
    let s: TcpStream = socket.into();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// A TLS connection from `from` to `to`, its handshake done; `Err` if the server closed it.
fn tls_from(from: IpAddr, to: SocketAddr, config: &Arc<ClientConfig>) -> std::io::Result<Tls> {
    let mut tcp = tcp_from(from, to);
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = ClientConnection::new(config.clone(), name).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    Ok(StreamOwned::new(conn, tcp))
}

/// Silent connections (nothing sent) from `from` to `to`.
fn silent(from: IpAddr, to: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n).map(|_| tcp_from(from, to)).collect()
}

/// Whether the server has closed `s` (a read sees the end or a reset rather than blocking).
fn closed(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 64];
    let r = match s.read(&mut b) {
        Ok(0) => true,
        // An alert before the close, say: the close comes on a later read.
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    s.set_nonblocking(false).unwrap();
    r
}

/// Waits until the server has closed `want` of `conns`; returns those still open.
fn wait_closed(what: &str, conns: Vec<TcpStream>, want: usize) -> Vec<TcpStream> {
    let deadline = Instant::now() + WAIT;
    let mut open = conns;
    let mut gone = 0;
    loop {
        let before = open.len();
        open.retain_mut(|s| !closed(s));
        gone += before - open.len();
        if gone >= want {
            assert_eq!(gone, want, "{what}: more connections closed than expected");
            return open;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {gone} of {want} connections closed by the server"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A plain HTTP GET; the body.
fn http_get(http: SocketAddr, path: &str) -> String {
    let mut s = tcp_from(LOCAL, http);
    http_request(&mut s, path)
}

fn http_request<S: Read + Write>(s: &mut S, path: &str) -> String {
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    // Over TLS the server may close without close_notify after `connection: close`.
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    assert!(text.starts_with("HTTP/1.1 200"), "{path}: {text}");
    text.split_once("\r\n\r\n").unwrap().1.to_string()
}

fn stats(http: SocketAddr) -> serde_json::Value {
    serde_json::from_str(&http_get(http, "/stats")).unwrap()
}

/// `ferry_refused_total{reason="<reason>"}` in `/metrics`.
fn refused(http: SocketAddr, reason: &str) -> u64 {
    let metrics = http_get(http, "/metrics");
    let prefix = format!("ferry_refused_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |n| n.trim().parse::<f64>().unwrap() as u64)
}

/// Waits until `/stats` counts `n` open MQTT connections.
fn wait_active(http: SocketAddr, n: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let active = stats(http)["mqtt"]["active"].as_u64().unwrap();
        if active == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{active} MQTT connections open, expected {n}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client over TLS from `from` subscribes, publishes to itself and gets the message.
fn served_over_tls(tls: SocketAddr, from: IpAddr, config: &Arc<ClientConfig>, id: &str) {
    let stream = tls_from(from, tls, config).unwrap_or_else(|e| panic!("{id}: handshake: {e}"));
    let mut c = Raw::connect_over(stream, true, id, None);
    let topic = format!("healthy/{id}");
    assert_eq!(c.subscribe(1, &topic), 1);
    assert_eq!(c.publish(2, &topic, b"alive", false), (0, String::new()));
    assert_eq!(c.next_publish(), (topic, b"alive".to_vec()));
}

#[test]
fn silent_tls_connections_take_no_more_than_their_address_cap() {
    let dir = tempfile::tempdir().unwrap();
    // A handshake timeout far longer than the test: nothing here is closed by it.
    let (server, tls, config) = serve_tls(
        dir.path(),
        "max_connections_per_address = 4\nmax_connections = 12\ntls_handshake_timeout_secs = 600",
        "",
    );
    let http = server.http;

    // One address opens 200 TCP connections to the TLS port and sends nothing: it keeps 4,
    // the other 196 are closed at once.
    let conns = silent(LOCAL, tls, 200);
    let mut held = wait_closed("past the address cap", conns, 196);
    assert_eq!(held.len(), 4);
    assert!(held.iter_mut().all(|s| !closed(s)), "the 4 are still open");
    wait_active(http, 4);
    assert_eq!(refused(http, "mqtt_connections_per_address"), 196);
    // A real client from that address is refused too: closed before its handshake.
    assert!(tls_from(LOCAL, tls, &config).is_err());
    assert_eq!(refused(http, "mqtt_connections_per_address"), 197);
    let s = stats(http);
    assert_eq!(s["mqtt"]["refused_per_address"], 197, "{s}");

    // Nor do its silent connections to the plain port, past its cap, take places from others
    // while they wait to be refused at their CONNECT.
    let accepted = stats(http)["mqtt"]["accepted"].as_u64().unwrap();
    let plain_silent = silent(LOCAL, server.mqtt, 50);
    let deadline = Instant::now() + WAIT;
    while stats(http)["mqtt"]["accepted"].as_u64().unwrap() < accepted + 50 {
        assert!(Instant::now() < deadline, "the server never accepted them");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(stats(http)["mqtt"]["active"], 4);

    // Others' handshakes are not held up by the silent ones (each runs in its own task).
    served_over_tls(tls, ip(2), &config, "other");
    wait_active(http, 4);
    drop(plain_silent);

    // The global cap counts connections in their handshake too (over every listener).
    let mut more = silent(ip(3), tls, 4);
    more.extend(silent(ip(4), tls, 4));
    wait_active(http, 12);
    let before = refused(http, "mqtt_connections");
    assert!(
        tls_from(ip(5), tls, &config).is_err(),
        "past max_connections"
    );
    let mut plain = Raw {
        stream: tcp_from(ip(5), server.mqtt),
        v5: true,
    };
    assert_eq!(plain.try_connect("plain", None), Some(0x89), "Server busy");
    assert_eq!(refused(http, "mqtt_connections"), before + 2);
    drop(more);

    // A handshake that ends (here the client gives up) gives its place back.
    held.clear();
    let deadline = Instant::now() + WAIT;
    let back = loop {
        if let Ok(s) = tls_from(LOCAL, tls, &config) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the address never got its places back"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut c = Raw::connect_over(back, true, "back", None);
    assert!(c.ping());
}

#[test]
fn a_silent_handshake_is_closed_at_the_timeout_and_gives_its_place_back() {
    let dir = tempfile::tempdir().unwrap();
    let limits = "max_connections_per_address = 2\ntls_handshake_timeout_secs = 1";
    let (server, tls, config) = serve_tls(
        dir.path(),
        limits,
        &format!("tls_cert = \"{{cert}}\"\ntls_key = \"{{key}}\"\n{limits}"),
    );
    let https = server.http;

    // MQTT over TLS: two silent connections fill the address's places and are closed by the
    // handshake timeout; then the address is served again.
    let conns = silent(LOCAL, tls, 2);
    wait_closed("MQTT TLS handshake timeout", conns, 2);
    served_over_tls(tls, LOCAL, &config, "after-timeout");

    // HTTPS likewise.
    let conns = silent(LOCAL, https, 2);
    wait_closed("HTTPS handshake timeout", conns, 2);
    let mut s = tls_from(LOCAL, https, &config).unwrap();
    let health = http_request(&mut s, "/health");
    assert!(health.contains("running"), "{health}");
}

#[test]
fn silent_plain_connections_past_a_cap_hold_at_most_the_refusal_allowance() {
    let dir = tempfile::tempdir().unwrap();
    // A CONNECT timeout far longer than the test: nothing here is closed by it.
    let (server, _tls, _config) = serve_tls(
        dir.path(),
        "max_connections_per_address = 4\nconnect_timeout_secs = 600",
        "",
    );
    let http = server.http;
    // One address opens 4 + 300 silent connections to the plain port: 4 within its cap, 256
    // past it kept open to be refused at their CONNECT, and 44 closed at once.
    let within = silent(LOCAL, server.mqtt, 4);
    wait_active(http, 4);
    let past = silent(LOCAL, server.mqtt, 300);
    let held = wait_closed("past the refusal allowance", past, 44);
    assert_eq!(held.len(), 256);
    assert_eq!(refused(http, "mqtt_connections_per_address"), 44);
    // Others are served meanwhile.
    let mut other = Raw {
        stream: tcp_from(ip(2), server.mqtt),
        v5: true,
    };
    assert_eq!(
        other.try_connect("other", None),
        Some(0),
        "another address connects"
    );
    assert!(other.ping());
    // Those held are refused at their CONNECT; once they are gone, new ones are held again.
    drop(held);
    let deadline = Instant::now() + WAIT;
    let mut late = loop {
        let mut s = Raw {
            stream: tcp_from(LOCAL, server.mqtt),
            v5: true,
        };
        std::thread::sleep(Duration::from_millis(50));
        if !closed(&mut s.stream) {
            break s;
        }
        assert!(Instant::now() < deadline, "the allowance never came back");
    };
    assert_eq!(late.try_connect("late", None), Some(0x97), "Quota exceeded");
    drop(within);
}
