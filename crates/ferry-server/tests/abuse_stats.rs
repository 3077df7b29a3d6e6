//! Stats, metrics and dead-letter figures of the real `ferry serve` under many topics and
//! several users: `/stats` is a bounded page with a cursor, `/metrics` a bounded set of
//! per-topic series, both showing a caller only the topics it may consume (administrators
//! everything), and out-of-range requests are refused while others go on being served.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::{Client, StatusCode};
use serde_json::Value;

const PASSWORD: &str = "pw";

/// A config with an administrator `root` (who may consume only `jobs/#`, yet sees all), `alice`
/// (may consume `alice/#`), `nobody` (may consume nothing) and no anonymous access.
fn write_config(dir: &Path, extra: &str) -> String {
    let hash = ferry_net::auth::hash_password(PASSWORD).unwrap();
    let toml = format!(
        r#"
[mqtt]
allow_anonymous = false

[[mqtt.users]]
username = "root"
password_hash = "{hash}"
subscribe = ["jobs/#"]
admin = true

[[mqtt.users]]
username = "alice"
password_hash = "{hash}"
subscribe = ["alice/#"]

[[mqtt.users]]
username = "nobody"
password_hash = "{hash}"
subscribe = []

{extra}
"#
    );
    let path = dir.join("ferry.toml");
    std::fs::write(&path, toml).unwrap();
    path.to_str().unwrap().to_string()
}

struct Api {
    http: Client,
    base: String,
}

impl Api {
    fn new(server: &common::Server) -> Self {
        Api {
            http: Client::new(),
            base: format!("http://{}", server.http),
        }
    }

    async fn get(&self, user: &str, path: &str) -> (StatusCode, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .basic_auth(user, Some(PASSWORD))
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap())
    }

    async fn json(&self, user: &str, path: &str) -> Value {
        let (status, body) = self.get(user, path).await;
        assert_eq!(status, StatusCode::OK, "{user} GET {path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    async fn publish(&self, topic: &str) {
        let topic = topic.replace('/', "%2F");
        let r = self
            .http
            .post(format!("{}/topics/{topic}/messages", self.base))
            .basic_auth("root", Some(PASSWORD))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
    }

    /// Every topic `user` sees, page after page of `limit`, and the number of pages.
    async fn walk(&self, user: &str, query: &str, limit: usize) -> (Vec<String>, usize) {
        let (mut seen, mut after, mut pages) = (Vec::new(), None::<String>, 0);
        loop {
            let mut path = format!("/stats?limit={limit}{query}");
            if let Some(a) = &after {
                path.push_str(&format!("&after={}", a.replace('/', "%2F")));
            }
            let page = self.json(user, &path).await;
            let topics = page["topics"].as_array().unwrap();
            assert!(topics.len() <= limit, "{page}");
            seen.extend(
                topics
                    .iter()
                    .map(|t| t["topic"].as_str().unwrap().to_string()),
            );
            pages += 1;
            match page["next"].as_str() {
                Some(n) => after = Some(n.to_string()),
                None => return (seen, pages),
            }
        }
    }
}

fn topics() -> Vec<String> {
    let mut v: Vec<String> = ["alice", "bob", "zed"]
        .iter()
        .flat_map(|owner| (0..8).map(move |i| format!("{owner}/t{i}")))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_and_metrics_show_each_caller_its_topics_a_page_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[http]\nmetrics_topics = \"top\"\nmetrics_topic_limit = 5\n",
    );
    let server = common::serve(&dir.path().join("data"), &["--config", &config]).unwrap();
    let api = Api::new(&server);
    for t in topics() {
        api.publish(&t).await;
    }
    // The administrator pages through everything, in name order, and sees the totals.
    let (seen, pages) = api.walk("root", "", 5).await;
    assert_eq!(seen, topics());
    assert_eq!(pages, 5);
    let page = api.json("root", "/stats?limit=5").await;
    assert_eq!(page["broker"]["topics"], 24);
    assert_eq!(page["broker"]["published"], 24);
    assert!(page["mqtt"].is_object());
    let (seen, _) = api.walk("root", "&prefix=bob%2F", 3).await;
    assert_eq!(seen, topics()[8..16].to_vec());

    // alice sees her topics only, and no server totals.
    let (seen, _) = api.walk("alice", "", 3).await;
    assert_eq!(seen, topics()[..8].to_vec());
    let page = api.json("alice", "/stats").await;
    assert!(page["broker"].is_null(), "{page}");
    assert!(page["mqtt"].is_null(), "{page}");
    assert_eq!(page["subscriptions"], Value::Array(vec![]));
    let one = api.json("alice", "/stats/alice/t3").await;
    assert_eq!(one["next_offset"], 1);
    // Another's topic is as unknown as a missing one.
    let (status, body) = api.get("alice", "/stats/bob/t3").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let missing = api.get("alice", "/stats/alice/none").await;
    assert_eq!(missing.0, StatusCode::NOT_FOUND);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"],
        serde_json::from_str::<Value>(&missing.1).unwrap()["error"]
    );
    assert_eq!(api.json("root", "/stats/bob/t3").await["next_offset"], 1);
    // A user allowed nothing sees nothing.
    let page = api.json("nobody", "/stats").await;
    assert_eq!(page["topics"], Value::Array(vec![]));
    assert!(page["next"].is_null() && page["broker"].is_null());

    // Metrics: per-topic series of at most 5 topics, of those the caller may see; totals under
    // their own names, for the administrator only.
    let (status, text) = api.get("root", "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(text.contains("\nferry_published_total 24\n"), "{text}");
    let series = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("ferry_topic_depth{"))
            .count()
    };
    assert_eq!(series(&text), 5, "{text}");
    let (_, text) = api.get("alice", "/metrics").await;
    assert_eq!(series(&text), 5, "{text}");
    assert!(
        text.lines()
            .filter(|l| l.starts_with("ferry_topic_"))
            .all(|l| l.contains("topic=\"alice/")),
        "{text}"
    );
    assert!(!text.contains("ferry_published_total"), "{text}");
    let (_, text) = api.get("nobody", "/metrics").await;
    assert_eq!(series(&text), 0, "{text}");

    // Out-of-range pages are refused with the API's error body; others are still served.
    for bad in [
        "/stats?limit=0",
        "/stats?limit=1001",
        "/stats?sort=rate",
        "/stats?sort=depth&after=a",
        "/stats?limit=abc",
        "/stats?limit=-1",
    ] {
        let (status, body) = api.get("root", bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], "invalid_request", "{bad}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(
        api.json("alice", "/stats?limit=1000").await["topics"]
            .as_array()
            .unwrap()
            .len(),
        8
    );
    let top = api.json("root", "/stats?sort=depth&limit=2").await;
    assert_eq!(top["topics"].as_array().unwrap().len(), 2, "{top}");
    assert!(top["next"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_figure_is_what_the_queue_holds_now() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let server = common::serve(&dir.path().join("data"), &["--config", &config]).unwrap();
    let api = Api::new(&server);
    let group = format!("{}/topics/jobs%2Fa/groups/g", api.base);
    // The group begins at its first fetch; then a message comes.
    let r = api
        .http
        .post(format!("{group}/fetch"))
        .basic_auth("root", Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    api.publish("jobs/a").await;
    let fetched: Value = api
        .http
        .post(format!("{group}/fetch?wait_ms=5000"))
        .basic_auth("root", Some(PASSWORD))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let receipt = fetched["messages"][0]["receipt"].clone();
    assert!(receipt.is_string(), "{fetched}");
    let r = api
        .http
        .post(format!("{group}/reject"))
        .basic_auth("root", Some(PASSWORD))
        .json(&serde_json::json!({"receipts": [receipt], "reason": "bad"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Dead-lettered after the consumer's lock is released: wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = api.json("root", "/stats/jobs/a").await;
        if t["dead_letters"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "never dead-lettered: {t}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let page = api.json("root", "/stats?prefix=jobs%2F").await;
    assert_eq!(page["topics"][0]["dead_letters"], 1, "{page}");
    let r = api
        .http
        .delete(format!("{}/topics/jobs%2Fa/dead-letters", api.base))
        .basic_auth("root", Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Emptied: the current figure is 0, the cumulative by-reason count stays.
    let t = api.json("root", "/stats/jobs/a").await;
    assert_eq!(t["dead_letters"], 0, "{t}");
    assert_eq!(t["dead_letters_by_reason"]["rejected"], 1, "{t}");
    let page = api.json("root", "/stats?prefix=jobs%2F").await;
    assert_eq!(page["topics"][0]["dead_letters"], 0, "{page}");
}

/// The resident set of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Measures `/stats` and `/metrics` of a real server over `FERRY_MEASURE_TOPICS` topics
/// (default 100,000), written beforehand through the engine: sizes, times, and the server's
/// RSS during 5 parallel calls of each. Figures are printed, never asserted on time.
/// `cargo test -p ferry-server --test abuse_stats -- --ignored --nocapture measure`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run by hand"]
async fn measure_stats_and_metrics_with_many_topics() {
    use ferry::disk::{DiskConfig, Durability};
    let n: usize = std::env::var("FERRY_MEASURE_TOPICS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let started = Instant::now();
    {
        let broker = ferry::Broker::open_with(
            &data,
            ferry::BrokerConfig::default(),
            DiskConfig {
                durability: Durability::Never,
                ..DiskConfig::default()
            },
        )
        .unwrap();
        for i in 0..n {
            broker
                .try_publish(&format!("fleet/{}/node-{i:07}", i % 97), "reading")
                .unwrap();
        }
        broker.shutdown(Duration::from_secs(5)).await;
    }
    println!("{n} topics written in {:?}", started.elapsed());
    let config = write_config(dir.path(), "");
    let server = common::serve(&data, &["--config", &config]).unwrap();
    let pid = server.child.id();
    let api = Api::new(&server);
    println!("server RSS idle: {} KiB", rss_kib(pid));
    for path in [
        "/stats",
        "/stats",
        "/stats?limit=1000",
        "/stats?prefix=fleet%2F42%2F&limit=1000",
        "/stats?after=fleet%2F50%2F&limit=1000",
        "/stats?sort=depth",
        "/metrics",
    ] {
        let t = Instant::now();
        let (status, body) = api.get("root", path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        println!(
            "GET {path} as admin: {} bytes in {:?}",
            body.len(),
            t.elapsed()
        );
    }
    // Twice: the first call of a user includes its password check (argon2).
    for call in ["first", "second"] {
        let t = Instant::now();
        let (_, body) = api.get("alice", "/stats").await;
        println!(
            "GET /stats as a user who sees none of them ({call} call): {} bytes in {:?}",
            body.len(),
            t.elapsed()
        );
    }
    for path in ["/stats", "/metrics"] {
        let before = rss_kib(pid);
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let (peak, stop) = (peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    peak.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        let t = Instant::now();
        let calls: Vec<_> = (0..5)
            .map(|_| {
                let (http, url) = (api.http.clone(), format!("{}{path}", api.base));
                tokio::spawn(async move {
                    let r = http
                        .get(url)
                        .basic_auth("root", Some(PASSWORD))
                        .send()
                        .await
                        .unwrap();
                    r.bytes().await.unwrap().len()
                })
            })
            .collect();
        let mut sizes = Vec::new();
        for c in calls {
            sizes.push(c.await.unwrap());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        sampler.join().unwrap();
        println!(
            "5 parallel GET {path}: {:?}, sizes {sizes:?}, server RSS {before} KiB before, peak {} KiB",
            t.elapsed(),
            peak.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
}
