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
