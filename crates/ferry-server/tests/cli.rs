//! `ferry pub`, `ferry sub`, `ferry stats` and `ferry dlq`, run as the built binary against a
//! server on ephemeral ports.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use ferry_net::config::ServeConfig;
use ferry_net::Server;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ferry");
const WAIT: Duration = Duration::from_secs(15);

async fn server() -> Server {
    let mut config = ServeConfig {
        memory: true,
        shutdown_timeout_secs: 1,
        ..ServeConfig::default()
    };
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    let broker = ferry_net::server::open_broker(&config).unwrap();
    Server::start(&config, broker).await.unwrap()
}

/// Runs `ferry args...` with `stdin`, off the runtime's threads.
async fn ferry(args: Vec<String>, stdin: Option<&'static str>) -> Output {
    let run = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(BIN)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    });
    tokio::time::timeout(WAIT, run).await.unwrap().unwrap()
}

fn args(s: &[&str]) -> Vec<String> {
    s.iter().map(|a| a.to_string()).collect()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// Waits until the broker has `n` subscriptions (the `ferry sub` child subscribed).
async fn subscribed(server: &Server, n: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.broker().subscription_stats().len() < n {
        assert!(tokio::time::Instant::now() < deadline, "no subscription");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_and_sub_round_trip_with_headers_files_and_lines() {
    let server = server().await;
    let port = server.mqtt_addr().port().to_string();
    let sub = tokio::spawn(ferry(
        args(&[
            "sub",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            "cli/a",
            "-t",
            "cli/more/#",
            "-q",
            "1",
            "-C",
            "4",
            "--json",
        ]),
        None,
    ));
    subscribed(&server, 2).await;

    let o = ferry(
        args(&[
            "pub",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            "cli/a",
            "-m",
            "hello",
            "-q",
            "1",
            "--header",
            "env=prod",
        ]),
        None,
    )
    .await;
    ok(&o);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("payload.txt");
    std::fs::write(&file, "from a file").unwrap();
    let o = ferry(
        args(&[
            "pub",
            "-p",
            &port,
            "-t",
            "cli/more/file",
            "-f",
            file.to_str().unwrap(),
            "-q",
            "2",
            "-V",
            "311",
        ]),
        None,
    )
    .await;
    ok(&o);
    let o = ferry(
        args(&["pub", "-p", &port, "-t", "cli/more/lines", "-l", "-q", "1"]),
        Some("line one\nline two\n"),
    )
    .await;
    ok(&o);

    let out = ok(&sub.await.unwrap());
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert_eq!(lines[0]["topic"], "cli/a");
    assert_eq!(lines[0]["payload"], "hello");
    assert_eq!(lines[0]["qos"], 1);
    assert_eq!(lines[0]["headers"]["env"], "prod");
    assert_eq!(lines[1]["topic"], "cli/more/file");
    assert_eq!(lines[1]["payload"], "from a file");
    assert_eq!(lines[2]["payload"], "line one");
    assert_eq!(lines[3]["payload"], "line two");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_publish_and_verbose_v311_sub() {
    let server = server().await;
    let port = server.mqtt_addr().port().to_string();
    ok(&ferry(
        args(&[
            "pub", "-p", &port, "-t", "cli/kept", "-m", "kept", "-r", "-V", "311",
        ]),
        None,
    )
    .await);
    let out = ok(&ferry(
        args(&[
            "sub", "-p", &port, "-t", "cli/#", "-C", "1", "-v", "-V", "311",
        ]),
        None,
    )
    .await);
    assert_eq!(out, "cli/kept kept\n");
    // Headers need MQTT 5.
    let o = ferry(
        args(&[
            "pub", "-p", &port, "-t", "x", "-m", "x", "-V", "311", "--header", "a=b",
        ]),
        None,
    )
    .await;
    assert!(!o.status.success());
    // A broker that is not there is an error.
    let o = ferry(args(&["pub", "-p", "1", "-t", "x", "-m", "x"]), None).await;
    assert!(!o.status.success());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_and_dead_letters_over_http() {
    let server = server().await;
    let url = format!("http://{}", server.http_addr().unwrap());
    let broker = server.broker().clone();
    let mut sub = broker
        .subscription("jobs/x")
        .group("g")
        .manual_ack()
        .build()
        .unwrap();
    for i in 0..3 {
        broker
            .publish("jobs/x", ferry::Message::new(format!("job{i}")))
            .await
            .unwrap();
    }
    for _ in 0..3 {
        let d = tokio::time::timeout(WAIT, sub.recv())
            .await
            .unwrap()
            .unwrap();
        d.reject("bad input").unwrap();
    }

    let all: Value =
        serde_json::from_str(&ok(&ferry(args(&["stats", "--url", &url]), None).await)).unwrap();
    assert!(all["broker"].is_object());
    let page: Value = serde_json::from_str(&ok(&ferry(
        args(&["stats", "--prefix", "jobs/", "--limit", "1", "--url", &url]),
        None,
    )
    .await))
    .unwrap();
    assert_eq!(page["topics"][0]["topic"], "jobs/x", "{page}");
    assert_eq!(page["topics"].as_array().unwrap().len(), 1, "{page}");
    let one: Value =
        serde_json::from_str(&ok(
            &ferry(args(&["stats", "jobs/x", "--url", &url]), None).await
        ))
        .unwrap();
    assert_eq!(one["topic"], "jobs/x");
    let missing = ferry(args(&["stats", "no/such", "--url", &url]), None).await;
    assert_eq!(missing.status.code(), Some(1));

    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let list: Value = serde_json::from_str(&ok(&ferry(
            args(&["dlq", "list", "jobs/x", "--url", &url]),
            None,
        )
        .await))
        .unwrap();
        if list["len"] == 3 {
            assert_eq!(list["dead_letters"][0]["payload"], "job0");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{list}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r: Value = serde_json::from_str(&ok(&ferry(
        args(&["dlq", "redrive", "jobs/x", "--max", "1", "--url", &url]),
        None,
    )
    .await))
    .unwrap();
    assert_eq!(r["redriven"], 1);
    let r: Value = serde_json::from_str(&ok(&ferry(
        args(&["dlq", "purge", "jobs/x", "--url", &url]),
        None,
    )
    .await))
    .unwrap();
    assert_eq!(r["purged"], 2);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_takes_a_backend_and_a_node_id() {
    let o = ferry(
        args(&[
            "serve",
            "--memory",
            "--backend",
            "nats://127.0.0.1:4222",
            "--node-id",
            "edge-1",
            "--print-config",
        ]),
        None,
    )
    .await;
    let text = ok(&o);
    assert!(
        text.contains("backend = \"nats://127.0.0.1:4222\""),
        "{text}"
    );
    assert!(text.contains("node_id = \"edge-1\""), "{text}");
    // A backend that is not there fails the start with the reason, and a failure status.
    let o = ferry(
        args(&[
            "serve",
            "--memory",
            "--no-http",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--backend",
            "redis://127.0.0.1:1",
        ]),
        None,
    )
    .await;
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("redis://127.0.0.1:1"), "{err}");
}

/// `ferry sub ... | head -1`: the reader goes away and `ferry sub` ends quietly, without a
/// panic, when it next writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_ends_quietly_when_its_reader_goes_away() {
    use std::io::BufRead;
    let server = server().await;
    let port = server.mqtt_addr().port().to_string();
    let mut child = Command::new(BIN)
        .args(["sub", "-p", &port, "-t", "pipe/t"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    subscribed(&server, 1).await;
    let publisher = server.broker().publisher("pipe/t").unwrap();
    publisher
        .publish(ferry::Message::from("first"))
        .await
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        line // the reader (and the pipe's read end) is dropped here, as `head -1` exits
    })
    .await
    .unwrap();
    assert_eq!(line.trim(), "first");
    // Keep publishing until the child notices the closed pipe and exits.
    let deadline = tokio::time::Instant::now() + WAIT;
    let status = loop {
        publisher
            .publish(ferry::Message::from("more"))
            .await
            .unwrap();
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ferry sub did not exit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `ferry hash-password -` reads the password from standard input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_password_reads_standard_input_for_a_dash() {
    let out = ok(&ferry(args(&["hash-password", "-"]), Some("s3cret\n")).await);
    let hash = out.trim().to_string();
    assert!(hash.starts_with("$argon2"), "{hash}");
    let users = [ferry_net::config::UserConfig {
        username: "u".into(),
        password_hash: hash,
        publish: None,
        subscribe: None,
        admin: false,
    }];
    let auth = ferry_net::auth::Authenticator::new(&users, false);
    assert_eq!(
        auth.check(Some("u"), Some(b"s3cret")),
        ferry_net::auth::AuthOutcome::Allowed
    );
    assert_ne!(
        auth.check(Some("u"), Some(b"-")),
        ferry_net::auth::AuthOutcome::Allowed
    );
    let empty = ferry(args(&["hash-password", "-"]), Some("\n")).await;
    assert!(!empty.status.success());
}

/// `ferry pub`/`sub --cafile` speak MQTT over TLS, and `ferry stats --cacert` HTTPS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_speak_tls_with_a_ca_file() {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    let mut config = ServeConfig {
        memory: true,
        shutdown_timeout_secs: 1,
        ..ServeConfig::default()
    };
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.mqtt.tls_listen = "127.0.0.1:0".parse().unwrap();
    config.mqtt.tls_cert = Some(cert.clone());
    config.mqtt.tls_key = Some(key.clone());
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    config.http.tls_cert = Some(cert.clone());
    config.http.tls_key = Some(key);
    let broker = ferry_net::server::open_broker(&config).unwrap();
    let server = Server::start(&config, broker).await.unwrap();
    let tls_port = server.mqtt_tls_addr().unwrap().port().to_string();
    let ca = cert.to_str().unwrap().to_string();
    let sub = tokio::spawn(ferry(
        args(&[
            "sub",
            "-h",
            "localhost",
            "-p",
            &tls_port,
            "--cafile",
            &ca,
            "-t",
            "tls/t",
            "-C",
            "1",
        ]),
        None,
    ));
    subscribed(&server, 1).await;
    ok(&ferry(
        args(&[
            "pub",
            "-h",
            "localhost",
            "-p",
            &tls_port,
            "--cafile",
            &ca,
            "-t",
            "tls/t",
            "-q",
            "1",
            "-m",
            "over tls",
        ]),
        None,
    )
    .await);
    assert_eq!(ok(&sub.await.unwrap()).trim(), "over tls");
    // Without the CA the server's certificate is not trusted.
    let refused = ferry(
        args(&[
            "pub",
            "-h",
            "localhost",
            "-p",
            &tls_port,
            "--cafile",
            "/nonexistent",
            "-t",
            "x",
            "-m",
            "y",
        ]),
        None,
    )
    .await;
    assert!(!refused.status.success());
    let url = format!("https://localhost:{}", server.http_addr().unwrap().port());
    let stats = ok(&ferry(args(&["stats", "--url", &url, "--cacert", &ca]), None).await);
    assert!(stats.contains("topics"), "{stats}");
    let untrusted = ferry(args(&["stats", "--url", &url]), None).await;
    assert!(!untrusted.status.success());
}
