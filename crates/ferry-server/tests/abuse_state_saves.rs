//! The server's own state saves failing, for real: `ferry serve` on a data directory where the
//! temporary file of an atomic replace (`mqtt-retained.json.tmp`, `mqtt-sessions.json.tmp`) is
//! a directory, so that every save of that file fails (EISDIR) without privileges (the tests
//! may run as root, where permissions would not stop a write). A retained publish is then
//! answered in doubt (MQTT 5 PUBACK 0x80, reason string "in doubt ... retained ..."): it was
//! delivered, but whether it stays the retained message across a restart is not known.
//! `/health` answers 503 `"degraded"` with what failed (retained messages, MQTT sessions)
//! while those saves fail, other clients keep being served, and once the obstacle is gone the
//! next save (the once-a-second one) succeeds and `/health` answers 200 `"running"` again; the
//! retained message is then on disk and survives a crash.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::raw::Raw;

const WAIT: Duration = Duration::from_secs(15);

async fn health(http: SocketAddr) -> (u16, Value) {
    let r = reqwest::get(format!("http://{http}/health")).await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Polls `/health` until `done` holds for it; panics with the last answer after [`WAIT`].
async fn health_until(http: SocketAddr, what: &str, done: impl Fn(u16, &Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, h) = health(http).await;
        if done(status, &h) {
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: /health still answers {status} {h}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Makes every save of `file` in `dir` fail: its temporary file is a directory.
fn block_saves(dir: &Path, file: &str) -> std::path::PathBuf {
    let tmp = dir.join(format!("{file}.tmp"));
    std::fs::create_dir_all(tmp.join("obstacle")).unwrap();
    tmp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_state_saves_are_in_doubt_and_degrade_health_until_a_save_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = common::serve(&data, &[]).unwrap_or_else(|e| panic!("{e}"));
    let (mqtt, http) = (server.mqtt, server.http);
    assert_eq!(health(http).await.0, 200);

    let mut watcher = Raw::connect(mqtt, "watcher", None);
    assert_eq!(watcher.subscribe(1, "state/#"), 1);
    let mut publisher = Raw::connect(mqtt, "publisher", None);

    let retained_tmp = block_saves(&data, "mqtt-retained.json");
    let sessions_tmp = block_saves(&data, "mqtt-sessions.json");

    // The retained publish is delivered, but answered in doubt: not known to be kept.
    let (code, reason) = publisher.publish(1, "state/lamp", b"on", true);
    assert_eq!(code, 0x80, "{reason}");
    assert!(reason.starts_with("in doubt"), "{reason}");
    assert!(reason.contains("retained"), "{reason}");
    assert_eq!(
        watcher.next_publish(),
        ("state/lamp".to_string(), b"on".to_vec())
    );
    // A persistent session's subscription cannot be saved either (its SUBACK still comes:
    // MQTT has no refusal for it), and health says so.
    let mut persistent = Raw::connect(mqtt, "persistent", Some(3600));
    assert_eq!(persistent.subscribe(1, "other/#"), 1);

    let h = health_until(http, "saves failing", |status, h| {
        status == 503
            && h["reason"]
                .as_str()
                .is_some_and(|r| r.contains("MQTT sessions"))
    })
    .await;
    assert_eq!(h["status"], "degraded", "{h}");
    let why = h["reason"].as_str().unwrap();
    assert!(why.contains("saving retained messages failed"), "{h}");
    assert!(why.contains("mqtt-retained.json"), "{h}");

    // Everything else is served meanwhile.
    let (code, reason) = publisher.publish(2, "state/plain", b"x", false);
    assert_eq!((code, reason.as_str()), (0, ""));
    assert_eq!(
        watcher.next_publish(),
        ("state/plain".to_string(), b"x".to_vec())
    );

    // The obstacle goes: the next once-a-second save succeeds, and health recovers.
    std::fs::remove_dir_all(&retained_tmp).unwrap();
    std::fs::remove_dir_all(&sessions_tmp).unwrap();
    let h = health_until(http, "saves working again", |status, _| status == 200).await;
    assert_eq!(h["status"], "running", "{h}");
    assert!(h.get("reason").is_none(), "{h}");

    // The retained message is on disk now (saved by the server while running): it survives
    // a crash.
    server.crash();
    let server = common::serve(&data, &[]).unwrap_or_else(|e| panic!("{e}"));
    let mut late = Raw::connect(server.mqtt, "late", None);
    assert_eq!(late.subscribe(1, "state/#"), 1);
    assert_eq!(
        late.next_publish(),
        ("state/lamp".to_string(), b"on".to_vec())
    );
}
