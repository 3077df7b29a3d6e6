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
