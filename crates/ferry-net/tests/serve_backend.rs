//! `ferry serve --backend`: two servers on one JetStream (and on one RabbitMQ) share a consumer
//! group (an MQTT shared subscription whose members sit on both servers), and every ordinary
//! subscriber of either server sees what was published on the other.
//!
//! Needs NATS with JetStream (`FERRY_NATS_URL`, default `nats://127.0.0.1:4222`) and RabbitMQ
//! (`FERRY_AMQP_URL`). Without them the tests skip with a message, unless
//! `FERRY_REQUIRE_SERVICES=1`, where they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{connect5, Client5, Seen};
use ferry_net::Server;
use rumqttc::v5::mqttbytes::QoS;

fn nats_base() -> String {
    std::env::var("FERRY_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// Whether `service` answers at `addr`; panics when it must.
async fn service_available(service: &str, addr: &str) -> bool {
    let ok = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(addr.to_string()),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    if !ok {
        let required = std::env::var("FERRY_REQUIRE_SERVICES").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "{service} is not reachable at {addr} and FERRY_REQUIRE_SERVICES=1"
        );
        eprintln!("SKIP: {service} is not reachable at {addr}");
    }
    ok
}

async fn node(url: &str, name: &str) -> Server {
    let url = url.to_string();
    let name = name.to_string();
    common::server_with(move |c| {
        c.backend = Some(url);
        c.node_id = Some(name);
    })
    .await
}

/// Removes the test's stream.
async fn delete_stream(base: &str, stream: &str) {
    if let Ok(client) = async_nats::connect(base).await {
        let js = async_nats::jetstream::new(client);
        let _ = js.delete_stream(stream).await;
    }
}

/// Collects PUBLISH payloads until `total` across `clients` or nothing arrives for a while.
async fn collect(clients: &mut [&mut Client5], total: usize) -> Vec<Vec<String>> {
    let mut got: Vec<Vec<String>> = vec![Vec::new(); clients.len()];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while got.iter().map(Vec::len).sum::<usize>() < total && tokio::time::Instant::now() < deadline
    {
        for (i, c) in clients.iter_mut().enumerate() {
            while let Ok(seen) = c.rx.try_recv() {
                match seen {
                    Seen::Publish(m) => got[i].push(String::from_utf8(m.payload.to_vec()).unwrap()),
                    Seen::Error(e) => panic!("client failed: {e}"),
                    _ => {}
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_share_a_consumer_group_on_one_jetstream() {
    let base = nats_base();
    if !service_available("NATS", base.trim_start_matches("nats://")).await {
        return;
    }
    let run = format!("{:08x}", fastrand::u32(..));
    let stream = format!("FERRY_SERVE_{run}");
    let url = format!("{base}?stream={stream}&prefix=ferry-serve-{run}&inactive_s=120");
    two_servers_share_a_group(&url).await;
    delete_stream(&base, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_share_a_consumer_group_on_one_rabbitmq() {
    let base = std::env::var("FERRY_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let host = base
        .rsplit('@')
        .next()
        .unwrap_or_default()
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    if !service_available("RabbitMQ", &host).await {
        return;
    }
    let run = format!("{:08x}", fastrand::u32(..));
    let url = format!("{base}?exchange=ferry-serve-{run}&queue_expires_s=60");
    two_servers_share_a_group(&url).await;
}

async fn two_servers_share_a_group(url: &str) {
    let a = node(url, "a").await;
    let b = node(url, "b").await;

    // Group members on both servers, an ordinary subscriber on b, a publisher on a.
    let mut on_a = connect5(a.mqtt_addr(), "worker-a").await;
    let mut on_b = connect5(b.mqtt_addr(), "worker-b").await;
    let mut watcher = connect5(b.mqtt_addr(), "watcher-b").await;
    for (c, filter) in [
        (&mut on_a, "$share/workers/jobs/#"),
        (&mut on_b, "$share/workers/jobs/#"),
        (&mut watcher, "jobs/#"),
    ] {
        c.client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        assert_eq!(c.suback().await, vec!["Success(AtLeastOnce)".to_string()]);
    }
    let publisher = connect5(a.mqtt_addr(), "producer-a").await;
    // The backend consumers are made when the subscriptions are: give the group ingresses
    // a moment to start pulling before the first message.
    tokio::time::sleep(Duration::from_millis(500)).await;

    const N: usize = 300;
    for i in 0..N {
        publisher
            .client
            .publish(
                format!("jobs/{}", i % 7),
                QoS::AtLeastOnce,
                false,
                format!("m{i}"),
            )
            .await
            .unwrap();
    }
    // Also through b's HTTP API: the same topics, the same group.
    let http = b.http_addr().unwrap();
    let web = reqwest::Client::new();
    for i in N..N + 20 {
        let r = web
            .post(format!("http://{http}/topics/jobs%2Fweb/messages"))
            .body(format!("m{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }
    let total = N + 20;

    let got = collect(&mut [&mut on_a, &mut on_b], total).await;
    eprintln!("group split: a {}, b {}", got[0].len(), got[1].len());
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for m in got.iter().flatten() {
        *seen.entry(m.as_str()).or_default() += 1;
    }
    let missing: Vec<String> = (0..total)
        .map(|i| format!("m{i}"))
        .filter(|m| !seen.contains_key(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "group lost {} messages: {missing:?}",
        missing.len()
    );
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "delivered more than once in the group: {twice:?}"
    );
    assert!(
        !got[0].is_empty() && !got[1].is_empty(),
        "the group should span both servers: a got {}, b got {}",
        got[0].len(),
        got[1].len()
    );

    // The ordinary subscriber on b saw everything, including what was published on a.
    let all = collect(&mut [&mut watcher], total).await;
    assert_eq!(all[0].len(), total, "the fanout subscriber on b");

    // Each server's local engine only holds what its ingresses wrote.
    assert!(a.bridge().is_some_and(|br| br.group_ingresses().len() == 1));

    drop((on_a, on_b, watcher, publisher));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_is_not_there_fails_the_start_with_a_typed_error() {
    let mut config = ferry_net::ServeConfig {
        memory: true,
        backend: Some("nats://127.0.0.1:1".into()),
        ..ferry_net::ServeConfig::default()
    };
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.http.enabled = false;
    let broker = ferry_net::server::open_broker(&config).unwrap();
    let err = match Server::start(&config, broker).await {
        Ok(_) => panic!("started without its backend"),
        Err(e) => e,
    };
    assert!(
        matches!(err, ferry_net::ServeError::Backend(_)),
        "unexpected error: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_without_wildcards_is_refused() {
    let base =
        std::env::var("FERRY_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    let addr = base
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    if tokio::net::TcpStream::connect(addr).await.is_err() {
        let required = std::env::var("FERRY_REQUIRE_SERVICES").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "Redis is not reachable and FERRY_REQUIRE_SERVICES=1"
        );
        eprintln!("SKIP: Redis is not reachable");
        return;
    }
    let mut config = ferry_net::ServeConfig {
        memory: true,
        backend: Some(base),
        ..ferry_net::ServeConfig::default()
    };
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.http.enabled = false;
    let broker = ferry_net::server::open_broker(&config).unwrap();
    match Server::start(&config, broker).await {
        Ok(_) => panic!("started over a backend without wildcards"),
        Err(e) => assert!(
            matches!(
                e,
                ferry_net::ServeError::Backend(ferry_net::bridge::BridgeError::Unsuitable { .. })
            ),
            "unexpected error: {e}"
        ),
    }
}

/// A TCP proxy to `upstream` on `port` (0: any); cancelling `stop` drops every connection.
async fn proxy(port: u16, upstream: String, stop: tokio_util::sync::CancellationToken) -> u16 {
    let mut tries = 0;
    let listener = loop {
        match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => break l,
            Err(e) if tries < 40 => {
                tries += 1;
                eprintln!("proxy: bind {port}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("proxy: cannot bind {port}: {e}"),
        }
    };
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut inbound, _) = tokio::select! {
                () = stop.cancelled() => return,
                r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
            };
            let (stop, upstream) = (stop.clone(), upstream.clone());
            tokio::spawn(async move {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                tokio::select! {
                    () = stop.cancelled() => {}
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_keeps_serving_after_losing_rabbitmq_for_a_moment() {
    let base = std::env::var("FERRY_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let (userinfo, rest) = base.rsplit_once('@').unwrap();
    let (host, vhost) = rest.split_once('/').unwrap_or((rest, ""));
    if !service_available("RabbitMQ", host).await {
        return;
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let port = proxy(0, host.to_string(), stop.clone()).await;
    let run = format!("{:08x}", fastrand::u32(..));
    let url = format!(
        "{userinfo}@127.0.0.1:{port}/{vhost}?exchange=ferry-serve-{run}&queue_expires_s=60"
    );
    let server = node(&url, "lossy").await;
    let mut sub = connect5(server.mqtt_addr(), "watcher").await;
    sub.client
        .subscribe("jobs/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    sub.suback().await;
    let http = reqwest::Client::new();
    let post = |body: &'static str| {
        http.post(format!(
            "http://{}/topics/jobs%2Fa/messages",
            server.http_addr().unwrap()
        ))
        .body(body)
        .send()
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(post("before").await.unwrap().status(), 201);
    assert_eq!(&sub.publish().await.payload[..], b"before");

    // Lose RabbitMQ: every connection through the proxy drops, then it comes back.
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stop = tokio_util::sync::CancellationToken::new();
    proxy(port, host.to_string(), stop.clone()).await;

    // Publishing works again once the adapter reconnected...
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = post("after").await.unwrap();
        if r.status() == 201 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "publishing never recovered: {}",
            r.text().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ...and the fanout ingress subscribed again, so the subscriber sees it.
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !got.iter().any(|p: &String| p == "after") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing after the loss; got {got:?}"
        );
        if let Ok(Some(Seen::Publish(m))) =
            tokio::time::timeout(Duration::from_millis(500), sub.rx.recv()).await
        {
            got.push(String::from_utf8(m.payload.to_vec()).unwrap());
        }
    }
    drop(sub);
    server.shutdown().await;
    stop.cancel();
}
