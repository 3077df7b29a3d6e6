//! The brokers under test, each a child process on a free loopback port: Ferry (`ferry serve
//! --memory`, the binary built from this workspace) and Mosquitto (the system binary, with a
//! generated configuration). Never the system Mosquitto on 1883: each run starts its own broker
//! and kills it afterwards, so that every measurement starts from a fresh process.

use std::fmt;
use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

/// How long a broker may take to accept connections after its start.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A broker under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Ferry: `ferry serve --memory --no-http`.
    Ferry,
    /// Ferry on a fresh data directory with its defaults (fsync before every acknowledgement,
    /// shared by concurrent publishes): `ferry serve --data-dir DIR --no-http`.
    FerryDurable,
    /// Mosquitto, the system binary.
    Mosquitto,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Ferry => "ferry",
            Kind::FerryDurable => "ferry-durable",
            Kind::Mosquitto => "mosquitto",
        })
    }
}

/// Where the broker binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The `ferry` binary.
    pub ferry: PathBuf,
    /// The `mosquitto` binary.
    pub mosquitto: PathBuf,
}

impl Binaries {
    /// `ferry` from `explicit`, else next to this executable (`target/release/ferry` when the
    /// bench runs from `target/release`); `mosquitto` from `mosquitto`. Checks that the binaries
    /// of `kinds` exist.
    pub fn find(explicit: Option<&Path>, mosquitto: &Path, kinds: &[Kind]) -> Result<Self> {
        let ferry = match explicit {
            Some(p) => p.to_path_buf(),
            None => std::env::current_exe()
                .context("locating the ferry-bench executable")?
                .parent()
                .map(|dir| dir.join("ferry"))
                .context("the ferry-bench executable has no parent directory")?,
        };
        let wants_ferry = kinds.contains(&Kind::Ferry) || kinds.contains(&Kind::FerryDurable);
        if wants_ferry && !ferry.is_file() {
            bail!(
                "no ferry binary at {} : build it first with `cargo build --release -p \
                 ferry-server` (same CARGO_TARGET_DIR as the bench), or pass --ferry-bin PATH",
                ferry.display()
            );
        }
        if kinds.contains(&Kind::Mosquitto) && !mosquitto.is_file() {
            bail!(
                "no mosquitto binary at {} (apt-get install mosquitto, or --mosquitto-bin PATH, \
                 or --systems ferry)",
                mosquitto.display()
            );
        }
        Ok(Binaries {
            ferry,
            mosquitto: mosquitto.to_path_buf(),
        })
    }
}

/// A free TCP port on 127.0.0.1 (bound, then released: another process could take it in
/// between, which the readiness check would notice as a failure to start).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// A running broker process, killed when dropped.
pub struct BrokerProcess {
    /// Which broker.
    pub kind: Kind,
    /// Where it listens for MQTT.
    pub addr: SocketAddr,
    child: Child,
    /// Holds the configuration file and the log; deleted with the process.
    dir: tempfile::TempDir,
}

impl BrokerProcess {
    /// Starts `kind` on a free loopback port, allowing at least `max_connections` connections,
    /// and waits until it accepts TCP connections.
    pub fn start(kind: Kind, bins: &Binaries, max_connections: usize) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("ferry-bench-mqtt-")
            .tempdir()
            .context("creating a temporary directory")?;
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = File::create(dir.path().join("broker.log")).context("creating the log")?;
        let mut cmd = match kind {
            Kind::Ferry | Kind::FerryDurable => {
                let mut c = Command::new(&bins.ferry);
                c.arg("serve");
                if kind == Kind::Ferry {
                    c.arg("--memory");
                } else {
                    c.arg("--data-dir").arg(dir.path().join("data"));
                }
                c.args(["--no-http", "--mqtt-listen"])
                    .arg(addr.to_string())
                    .arg("--max-connections")
                    .arg(max_connections.to_string())
                    // Every benchmark client comes from the loopback address (Mosquitto has no
                    // per-address cap either).
                    .args(["--set", "mqtt.max_connections_per_address=0"])
                    .env("FERRY_LOG", "warn");
                c
            }
            Kind::Mosquitto => {
                let conf = dir.path().join("mosquitto.conf");
                std::fs::write(&conf, mosquitto_config(port)).context("writing mosquitto.conf")?;
                let mut c = Command::new(&bins.mosquitto);
                c.arg("-c").arg(&conf);
                c
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {kind} ({:?})", cmd.get_program()))?;
        let mut broker = BrokerProcess {
            kind,
            addr,
            child,
            dir,
        };
        broker.wait_ready()?;
        Ok(broker)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited at start ({status}); its log:\n{}",
                    self.kind,
                    self.log_tail()
                );
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not accept connections on {} within {READY_TIMEOUT:?}; its log:\n{}",
                    self.kind,
                    self.addr,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last lines of the broker's output.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Resident memory now (`VmRSS`), in bytes.
    pub fn rss(&self) -> Result<u64> {
        self.status_kib("VmRSS:").map(|k| k * 1024)
    }

    /// Peak resident memory since the start (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> Result<u64> {
        self.status_kib("VmHWM:").map(|k| k * 1024)
    }

    /// Threads of the process now.
    pub fn threads(&self) -> Result<u64> {
        self.status_field("Threads:")
    }

    fn status_kib(&self, field: &str) -> Result<u64> {
        self.status_field(field)
    }

    /// A numeric field of `/proc/<pid>/status` (without its `kB` unit, if any).
    fn status_field(&self, field: &str) -> Result<u64> {
        let path = format!("/proc/{}/status", self.child.id());
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .map(|v| v.trim().trim_end_matches("kB").trim())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {field} in {path}"))
    }

    /// CPU time (user + system, all threads) the broker has used so far (10 ms resolution).
    pub fn cpu_time(&self) -> Option<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        let rest = stat.get(stat.rfind(')')? + 1..)?;
        let mut fields = rest.split_whitespace().skip(11);
        let utime: u64 = fields.next()?.parse().ok()?;
        let stime: u64 = fields.next()?.parse().ok()?;
        Some(Duration::from_millis((utime + stime) * 10))
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Mosquitto's configuration: one loopback listener on `port`, anonymous clients, nothing on
/// disk, no connection limit, queues deep enough that QoS 1 messages are never dropped for an
/// online client, and Ferry's defaults where they differ (64 QoS 1 messages in flight per
/// client, `TCP_NODELAY`).
fn mosquitto_config(port: u16) -> String {
    format!(
        "listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         persistence false\n\
         max_connections -1\n\
         max_inflight_messages 64\n\
         max_queued_messages 10000000\n\
         max_queued_bytes 0\n\
         set_tcp_nodelay true\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n"
    )
}

/// Raises this process's open-file limit to its hard limit (brokers started afterwards inherit
/// it); returns the new soft limit.
pub fn raise_nofile_limit() -> Result<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let raised = Rlimit {
        current: lim.maximum,
        maximum: lim.maximum,
    };
    setrlimit(Resource::Nofile, raised).context("raising the open-file limit")?;
    Ok(lim.maximum.unwrap_or(u64::MAX))
}
