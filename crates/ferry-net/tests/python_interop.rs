//! Interoperability with the Eclipse Paho Python client (`tests/python/interop.py`): QoS 2,
//! retained, will and shared subscriptions, in MQTT 3.1.1 and 5.
//!
//! Skipped (with a printed reason) when `python3 -c "import paho.mqtt"` fails, unless
//! `FERRY_REQUIRE_SERVICES=1`, which turns the skip into a failure.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;

fn paho_available() -> Result<(), String> {
    match std::process::Command::new("python3")
        .args(["-c", "import paho.mqtt"])
        .output()
    {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "python3 cannot import paho.mqtt ({}); pip install paho-mqtt",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("python3 not found: {e}")),
    }
}

fn required() -> bool {
    std::env::var("FERRY_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_python_client_v311_and_v5() {
    if let Err(why) = paho_available() {
        if required() {
            panic!("FERRY_REQUIRE_SERVICES=1 but {why}");
        }
        eprintln!("skipping the paho-mqtt interop test: {why}");
        return;
    }
    let server = server().await;
    let addr = server.mqtt_addr();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/interop.py");
    for version in ["311", "5"] {
        let run = tokio::process::Command::new("python3")
            .arg(&script)
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .arg(version)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(90), run)
            .await
            .expect("the interop script timed out")
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("{stdout}");
        assert!(
            out.status.success() && stdout.contains("all ok"),
            "MQTT {version}: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            out.status
        );
    }
    assert!(server.mqtt().stats().wills_published >= 2);
    server.shutdown().await;
}
