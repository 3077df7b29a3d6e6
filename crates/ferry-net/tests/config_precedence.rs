//! Configuration precedence: flags > FERRY_* environment > TOML file > defaults.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use ferry_net::config::{LogFormat, Override, ServeConfig};

#[test]
fn flags_beat_env_beat_file_beat_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ferry.toml");
    std::fs::write(
        &file,
        r#"
data_dir = "/from/file"
log_format = "json"
[mqtt]
listen = "127.0.0.1:1999"
max_connections = 5
max_inflight = 7
[http]
listen = "127.0.0.1:8999"
"#,
    )
    .unwrap();

    // File over defaults.
    let c = ServeConfig::resolve(Some(&file), Vec::<(String, String)>::new(), &[])
        .unwrap()
        .config;
    assert_eq!(c.data_dir, PathBuf::from("/from/file"));
    assert_eq!(c.log_format, LogFormat::Json);
    assert_eq!(c.mqtt.listen.port(), 1999);
    assert_eq!(c.mqtt.max_connections, 5);
    assert_eq!(c.mqtt.max_packet_size, 1 << 20, "default kept");

    // Environment over the file.
    let env = [
        ("FERRY_MQTT_LISTEN", "127.0.0.1:2000"),
        ("FERRY_MQTT_MAX_CONNECTIONS", "6"),
        ("FERRY_LOG_FORMAT", "text"),
        ("FERRY_MEMORY", "true"),
        ("UNRELATED", "x"),
    ];
    let c = ServeConfig::resolve(Some(&file), env, &[]).unwrap().config;
    assert_eq!(c.mqtt.listen.port(), 2000);
    assert_eq!(c.mqtt.max_connections, 6);
    assert_eq!(c.log_format, LogFormat::Text);
    assert!(c.memory);
    assert_eq!(c.mqtt.max_inflight, 7, "file value kept");
    assert_eq!(c.http.listen.port(), 8999);

    // Flags over the environment.
    let flags = [
        Override::flag("mqtt.listen", "127.0.0.1:2001", "--mqtt-listen"),
        Override::parse_set("mqtt.max_inflight=9").unwrap(),
    ];
    let c = ServeConfig::resolve(Some(&file), env, &flags)
        .unwrap()
        .config;
    assert_eq!(c.mqtt.listen.port(), 2001);
    assert_eq!(c.mqtt.max_inflight, 9);
    assert_eq!(c.mqtt.max_connections, 6, "env value kept");

    // FERRY_CONFIG names the file when no flag does.
    let env = [("FERRY_CONFIG", file.to_str().unwrap())];
    let c = ServeConfig::resolve(None, env, &[]).unwrap().config;
    assert_eq!(c.mqtt.listen.port(), 1999);
}

#[test]
fn invalid_values_are_errors() {
    let e = ServeConfig::resolve(None, [("FERRY_MQTT_MAX_INFLIGHT", "0")], &[]).unwrap_err();
    assert!(e.to_string().contains("max_inflight"), "{e}");
    let e = ServeConfig::resolve(None, [("FERRY_MQTT_LISTEN", "nope")], &[]).unwrap_err();
    assert!(e.to_string().contains("FERRY_MQTT_LISTEN"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[mqtt]\nusers = [{ username = \"a\", password_hash = \"plain\" }]\n",
    )
    .unwrap();
    let e = ServeConfig::resolve(Some(&file), Vec::<(String, String)>::new(), &[]).unwrap_err();
    assert!(e.to_string().contains("PHC"), "{e}");
}

/// The settings reference lists every setting once, with its variable and default, and nothing
/// that is not a setting.
#[test]
fn the_settings_reference_is_complete() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/settings.md"
    ))
    .unwrap();
    let rows: Vec<&str> = doc.lines().filter(|l| l.starts_with("| `")).collect();
    let all = ferry_net::config::settings();
    for s in &all {
        let head = format!("| `{}` |", s.key);
        let row = rows
            .iter()
            .find(|r| r.starts_with(&head))
            .unwrap_or_else(|| panic!("docs/settings.md has no row for {}", s.key));
        assert!(row.contains(&format!("`{}`", s.env)), "{row}");
        match &s.default {
            Some(d) => assert!(
                row.contains(&format!("`{d}`")),
                "default {d} missing: {row}"
            ),
            None => assert!(row.contains("not set"), "{row}"),
        }
    }
    for r in rows {
        assert!(
            all.iter()
                .any(|s| r.starts_with(&format!("| `{}` |", s.key))),
            "docs/settings.md lists a setting that does not exist: {r}"
        );
    }
}
