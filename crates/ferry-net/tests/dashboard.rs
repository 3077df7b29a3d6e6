//! The web dashboard at `/`: served from the binary, and (in headless Chromium) rendering live
//! data from `/stats`.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

/// Where Chromium is: `$FERRY_CHROMIUM`, else the usual Debian/Ubuntu paths.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FERRY_CHROMIUM") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

/// The text of the element whose start tag contains `attr`.
fn text_of<'a>(dom: &'a str, attr: &str) -> Option<&'a str> {
    let rest = &dom[dom.find(attr)?..];
    let rest = &rest[rest.find('>')? + 1..];
    Some(&rest[..rest.find('<')?])
}

fn services_required() -> bool {
    std::env::var("FERRY_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

#[tokio::test]
async fn dashboard_page_is_served() {
    let server = common::server().await;
    let http = server.http_addr().unwrap();
    let r = reqwest::get(format!("http://{http}/")).await.unwrap();
    assert_eq!(r.status(), 200);
    let ctype = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ctype.starts_with("text/html"), "{ctype}");
    let body = r.text().await.unwrap();
    assert!(body.contains("<script>") && body.contains("fetch(\"/stats\""));
    assert!(
        !body.contains("http://") && !body.contains("https://"),
        "no external assets"
    );
    // The API is still there next to it.
    let r = reqwest::get(format!("http://{http}/health")).await.unwrap();
    assert_eq!(r.status(), 200);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_live_data_in_headless_chromium() {
    let Some(chromium) = chromium() else {
        let why =
            "no Chromium (/usr/bin/chromium; apt-get install -y chromium, or set FERRY_CHROMIUM)";
        if services_required() {
            panic!("FERRY_REQUIRE_SERVICES=1 but {why}");
        }
        eprintln!("skipped: {why}");
        return;
    };
    let server = common::server().await;
    let http = server.http_addr().unwrap();
    let broker = common::broker_of(&server);
    // A subscription that reads nothing: the topic has depth and lag.
    let _lagging = broker.subscribe("dashboard/lagging").unwrap();
    for i in 0..7 {
        broker
            .publish("dashboard/lagging", format!("message {i}"))
            .await
            .unwrap();
    }
    // One open MQTT connection.
    let _mqtt = common::connect4(server.mqtt_addr(), "dashboard-viewer").await;

    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(&chromium);
    cmd.args([
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--virtual-time-budget=3000",
        "--dump-dom",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .arg(format!("http://{http}/"))
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("chromium did not finish within 90 s")
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !dom.is_empty(),
        "chromium failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // Rendered by the script from /stats, not present in the static page.
    assert!(
        dom.contains("data-updates=\""),
        "the script never updated: {dom}"
    );
    assert!(
        dom.contains("<td class=\"name\">dashboard/lagging</td>"),
        "no topic row: {dom}"
    );
    assert!(
        dom.contains("<td class=\"published\">7</td>"),
        "no published count: {dom}"
    );
    assert!(
        dom.contains("<td class=\"depth\">7</td>"),
        "no depth: {dom}"
    );
    assert!(dom.contains("<td class=\"lag\">7</td>"), "no lag: {dom}");
    assert_eq!(
        text_of(&dom, "id=\"connections\""),
        Some("1"),
        "no connection count: {dom}"
    );
    server.shutdown().await;
}

/// The DOM of `url` once the page's script ran for a while in headless Chromium.
async fn rendered(chromium: &std::path::Path, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(chromium);
    cmd.args([
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--virtual-time-budget=3000",
        "--dump-dom",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .arg(url)
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("chromium did not finish within 90 s")
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && dom.contains("data-updates=\""),
        "chromium failed or the script never updated ({}): {}\n{dom}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    dom
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_a_page_of_many_topics_and_the_dead_letters_of_now() {
    let Some(chromium) = chromium() else {
        let why =
            "no Chromium (/usr/bin/chromium; apt-get install -y chromium, or set FERRY_CHROMIUM)";
        if services_required() {
            panic!("FERRY_REQUIRE_SERVICES=1 but {why}");
        }
        eprintln!("skipped: {why}");
        return;
    };
    let server = common::server().await;
    let http = server.http_addr().unwrap();
    let broker = common::broker_of(&server);
    for i in 0..120 {
        broker
            .create_topic(&format!("bulk/{i:03}"), Default::default())
            .unwrap();
    }
    // One dead letter on dashboard/dead.
    let mut sub = broker
        .subscription("dashboard/dead")
        .manual_ack()
        .build()
        .unwrap();
    broker.publish("dashboard/dead", "poison").await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), sub.recv())
        .await
        .unwrap()
        .unwrap();
    d.reject("bad").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while broker.topic_stats("dashboard/dead").unwrap().dead_letters != 1 {
        assert!(std::time::Instant::now() < deadline, "never dead-lettered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The whole list is never shown: one page of 50, with a next page.
    let dom = rendered(&chromium, &format!("http://{http}/")).await;
    let rows = dom.matches("<tr class=\"topic").count();
    assert_eq!(rows, 50, "{dom}");
    assert!(dom.contains("<td class=\"name\">bulk/000</td>"), "{dom}");
    assert!(!dom.contains("<td class=\"name\">bulk/119</td>"), "{dom}");
    let next = &dom[dom.find("id=\"next-page\"").unwrap()..];
    assert!(
        !next[..next.find('>').unwrap()].contains("disabled"),
        "{dom}"
    );

    // A prefix (from the page's address) narrows it; the dead-letter figure is red while the
    // queue holds one.
    let dom = rendered(&chromium, &format!("http://{http}/?prefix=dashboard/")).await;
    assert_eq!(dom.matches("<tr class=\"topic").count(), 1, "{dom}");
    assert!(
        dom.contains("<td class=\"name\">dashboard/dead</td>"),
        "{dom}"
    );
    assert!(dom.contains("<td class=\"dead warn\""), "{dom}");
    let dead = &dom[dom.find("<td class=\"dead warn\"").unwrap()..];
    assert!(dead.contains(">1</td>"), "{dom}");

    // Emptied: 0, not red, although one was dead-lettered since start.
    let dlq = broker.dead_letters("dashboard/dead").unwrap();
    assert_eq!(
        tokio::task::spawn_blocking(move || dlq.purge())
            .await
            .unwrap(),
        1
    );
    let dom = rendered(&chromium, &format!("http://{http}/?prefix=dashboard/")).await;
    assert!(!dom.contains("<td class=\"dead warn\""), "{dom}");
    let dead = &dom[dom.find("<td class=\"dead\"").unwrap()..];
    assert!(dead[..dead.find("</td>").unwrap()].ends_with(">0"), "{dom}");
    drop(sub);
    server.shutdown().await;
}
