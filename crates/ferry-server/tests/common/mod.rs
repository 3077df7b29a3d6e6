//! A real `ferry serve` process for the process tests: started on a data directory with
//! ephemeral ports, its log kept, killed (SIGKILL) and reaped when dropped.
#![allow(dead_code, clippy::unwrap_used)]

pub mod raw;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// The `ferry` binary: `FERRY_BIN` when set (CI points it at the release build for the abuse
/// suite), else the one cargo built for this test.
pub fn bin() -> std::path::PathBuf {
    std::env::var_os("FERRY_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_ferry").into())
}
/// How long a server start may take.
pub const START_WAIT: Duration = Duration::from_secs(20);
/// How long the server may take to exit after SIGTERM.
pub const STOP_WAIT: Duration = Duration::from_secs(5);

/// A running `ferry serve`.
pub struct Server {
    pub child: Child,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    /// The MQTT TLS listener, when configured.
    pub mqtt_tls: Option<SocketAddr>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The text in `line` after `key`, up to `end`.
pub fn after<'a>(line: &'a str, key: &str, end: char) -> Option<&'a str> {
    let start = line.find(key)? + key.len();
    let rest = line.get(start..)?;
    Some(rest.split(end).next().unwrap_or(rest))
}

/// Starts `ferry serve --data-dir dir` on ephemeral ports with `extra` arguments (and no
/// `FERRY_*` variable of the test's environment) and waits until it serves; `Err` with its
/// log if it does not.
pub fn serve(dir: &Path, extra: &[&str]) -> Result<Server, String> {
    serve_via(&[], dir, extra)
}

/// [`serve`] through a `wrapper` command that ends by running the binary with its arguments
/// (`unshare ... sh -c '... exec "$@"' sh`): `wrapper` then the binary's path then its arguments.
pub fn serve_via(wrapper: &[&str], dir: &Path, extra: &[&str]) -> Result<Server, String> {
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(bin());
            c
        }
        None => Command::new(bin()),
    };
    for (k, _) in std::env::vars() {
        if k.starts_with("FERRY_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .args(["serve", "--data-dir"])
        .arg(dir)
        .args([
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(extra)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel();
    let kept = log.clone();
    // Drains stderr for the life of the process (a full pipe would block the server).
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("ferry serving") {
                let _ = tx.send(line.clone());
            }
            kept.lock().unwrap().push(line);
        }
    });
    let mut server = Server {
        child,
        mqtt: "0.0.0.0:0".parse().unwrap(),
        http: "0.0.0.0:0".parse().unwrap(),
        mqtt_tls: None,
        log,
    };
    let line = match rx.recv_timeout(START_WAIT) {
        Ok(line) => line,
        Err(e) => {
            std::thread::sleep(Duration::from_millis(200));
            return Err(format!(
                "ferry serve on {} did not start ({e}; exit {:?}); its log:\n{}",
                dir.display(),
                server.child.try_wait(),
                server.log_text()
            ));
        }
    };
    server.mqtt = after(&line, "mqtt=", ' ').unwrap().parse().unwrap();
    server.http = after(&line, "http=Some(", ')').unwrap().parse().unwrap();
    server.mqtt_tls = after(&line, "mqtt_tls=Some(", ')').map(|a| a.parse().unwrap());
    Ok(server)
}

impl Server {
    /// SIGKILL, then reaps the process.
    pub fn crash(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// WARN and ERROR lines so far.
    pub fn complaints(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .cloned()
            .collect()
    }

    /// The whole log so far (for failure messages).
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// CPU time used so far (utime + stime, clock ticks).
    pub fn cpu_ticks(&self) -> u64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // utime and stime: fields 14 and 15, counted after the ")" that ends the name.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
    }

    /// SIGTERM, then waits for the exit; panics unless it is status 0 within [`STOP_WAIT`].
    /// Returns how long it took.
    pub fn stop(&mut self, what: &str) -> Duration {
        self.stop_with("-TERM", what)
    }

    /// Every log line so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// [`stop`](Self::stop) with `signal` (as `kill` takes it: `-TERM`, `-INT`).
    pub fn stop_with(&mut self, signal: &str, what: &str) -> Duration {
        let began = Instant::now();
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "{what}: kill {signal} failed");
        let exit = loop {
            if let Some(exit) = self.child.try_wait().unwrap() {
                break exit;
            }
            assert!(
                began.elapsed() < STOP_WAIT,
                "{what}: still running {STOP_WAIT:?} after {signal}; its log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        std::thread::sleep(Duration::from_millis(50)); // the last lines of stderr
        assert!(
            exit.success(),
            "{what}: exit {exit:?} after {signal}; its log:\n{}",
            self.log_text()
        );
        began.elapsed()
    }
}

/// An MQTT 5 client (rumqttc) whose incoming packets arrive on a channel; `persistent` asks for
/// a session that outlives the connection (an hour).
pub fn client(
    addr: SocketAddr,
    id: &str,
    persistent: bool,
) -> (
    rumqttc::v5::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Packet>,
) {
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    if persistent {
        o.set_clean_start(false);
        let mut props = rumqttc::v5::mqttbytes::v5::ConnectProperties::new();
        props.session_expiry_interval = Some(3600);
        o.set_connect_properties(props);
    }
    let (client, mut el) = AsyncClient::new(o, 10);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            if let Event::Incoming(p) = ev {
                if tx.send(p).is_err() {
                    return;
                }
            }
        }
    });
    (client, rx)
}

/// The next packet from a [`client`] that `f` accepts (within 15 s).
pub async fn next_where(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Packet>,
    f: impl Fn(&rumqttc::v5::mqttbytes::v5::Packet) -> bool,
) -> rumqttc::v5::mqttbytes::v5::Packet {
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let p = rx.recv().await.expect("client ended");
            if f(&p) {
                return p;
            }
        }
    })
    .await
    .expect("timed out")
}
