//! `ferry pub` and `ferry sub`: MQTT clients in the style of `mosquitto_pub`/`mosquitto_sub`
//! (same short flags), on `rumqttc`, speaking MQTT 5 (default) or 3.1.1 (`-V 311`).

use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{ArgAction, Args, ValueEnum};
use rumqttc::v5;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet as P5, PublishProperties};

/// The MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Version {
    /// MQTT 3.1.1.
    #[value(name = "311")]
    V311,
    /// MQTT 5.
    #[value(name = "5")]
    V5,
}

/// Connection options shared by `pub` and `sub`.
#[derive(Debug, Args)]
pub struct ConnArgs {
    /// Broker host.
    #[arg(short = 'h', long, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker port.
    #[arg(short = 'p', long, default_value_t = 1883)]
    pub port: u16,
    /// Client identifier [default: ferry-pub-<random> / ferry-sub-<random>].
    #[arg(short = 'i', long = "id")]
    pub id: Option<String>,
    /// User name.
    #[arg(short = 'u', long)]
    pub username: Option<String>,
    /// Password.
    #[arg(short = 'P', long, requires = "username")]
    pub password: Option<String>,
    /// Protocol version: 5 or 311.
    #[arg(
        short = 'V',
        long = "protocol-version",
        value_enum,
        default_value = "5"
    )]
    pub version: Version,
    /// Keep alive in seconds.
    #[arg(short = 'k', long, default_value_t = 60)]
    pub keepalive: u16,
    /// Connect over TLS, trusting the CA certificates of this PEM file (as mosquitto_pub's
    /// --cafile; the server's port is then usually 8883).
    #[arg(long, value_name = "PATH")]
    pub cafile: Option<PathBuf>,
    /// PEM client certificate for TLS client authentication (with --key and --cafile).
    #[arg(long, value_name = "PATH", requires_all = ["key", "cafile"])]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, value_name = "PATH", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Print help.
    #[arg(long, action = ArgAction::Help)]
    pub help: Option<bool>,
}

impl ConnArgs {
    fn address(&self) -> String {
        format!("connecting to {}:{}", self.host, self.port)
    }

    fn client_id(&self, role: &str) -> String {
        self.id
            .clone()
            .unwrap_or_else(|| format!("ferry-{role}-{:08x}", std::process::id()))
    }

    /// TCP, or TLS with --cafile (and a client certificate with --cert/--key).
    fn transport(&self) -> anyhow::Result<rumqttc::Transport> {
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let Some(ca) = &self.cafile else {
            return Ok(rumqttc::Transport::Tcp);
        };
        let client_auth = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            _ => None,
        };
        Ok(rumqttc::Transport::tls(read(ca)?, client_auth, None))
    }

    fn options5(&self, role: &str) -> anyhow::Result<v5::MqttOptions> {
        let mut o = v5::MqttOptions::new(self.client_id(role), &self.host, self.port);
        o.set_keep_alive(Duration::from_secs(u64::from(self.keepalive.max(5))));
        if let Some(u) = &self.username {
            o.set_credentials(u, self.password.clone().unwrap_or_default());
        }
        o.set_transport(self.transport()?);
        Ok(o)
    }

    fn options4(&self, role: &str) -> anyhow::Result<rumqttc::MqttOptions> {
        let mut o = rumqttc::MqttOptions::new(self.client_id(role), &self.host, self.port);
        o.set_keep_alive(Duration::from_secs(u64::from(self.keepalive.max(5))));
        if let Some(u) = &self.username {
            o.set_credentials(u, self.password.clone().unwrap_or_default());
        }
        o.set_transport(self.transport()?);
        Ok(o)
    }
}

fn qos5(q: u8) -> anyhow::Result<v5::mqttbytes::QoS> {
    Ok(match q {
        0 => v5::mqttbytes::QoS::AtMostOnce,
        1 => v5::mqttbytes::QoS::AtLeastOnce,
        2 => v5::mqttbytes::QoS::ExactlyOnce,
        _ => bail!("QoS must be 0, 1 or 2"),
    })
}

fn qos4(q: u8) -> anyhow::Result<rumqttc::QoS> {
    Ok(match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        2 => rumqttc::QoS::ExactlyOnce,
        _ => bail!("QoS must be 0, 1 or 2"),
    })
}

/// `ferry pub`: publish one message, a file, or one message per line of stdin.
#[derive(Debug, Args)]
pub struct PubArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Topic to publish to.
    #[arg(short = 't', long)]
    pub topic: String,
    /// The message.
    #[arg(short = 'm', long, group = "payload")]
    pub message: Option<String>,
    /// Send the content of this file as one message.
    #[arg(short = 'f', long, group = "payload")]
    pub file: Option<PathBuf>,
    /// Send each line of standard input as a message.
    #[arg(short = 'l', long, group = "payload")]
    pub lines: bool,
    /// Send all of standard input as one message.
    #[arg(short = 's', long, group = "payload")]
    pub stdin: bool,
    /// Send an empty message.
    #[arg(short = 'n', long, group = "payload")]
    pub null_message: bool,
    /// QoS: 0, 1 or 2.
    #[arg(short = 'q', long, default_value_t = 0)]
    pub qos: u8,
    /// Retain the message.
    #[arg(short = 'r', long)]
    pub retain: bool,
    /// A header (MQTT 5 user property) `key=value`; repeatable.
    #[arg(long = "header", value_name = "K=V")]
    pub headers: Vec<String>,
}

impl PubArgs {
    fn payloads(&self) -> anyhow::Result<Vec<Bytes>> {
        if let Some(m) = &self.message {
            return Ok(vec![Bytes::from(m.clone())]);
        }
        if let Some(f) = &self.file {
            let b = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            return Ok(vec![Bytes::from(b)]);
        }
        if self.lines {
            let mut out = Vec::new();
            for line in std::io::stdin().lock().lines() {
                out.push(Bytes::from(line.context("reading stdin")?));
            }
            return Ok(out);
        }
        if self.stdin {
            let mut b = Vec::new();
            std::io::stdin()
                .read_to_end(&mut b)
                .context("reading stdin")?;
            return Ok(vec![Bytes::from(b)]);
        }
        if self.null_message {
            return Ok(vec![Bytes::new()]);
        }
        bail!("nothing to publish: give -m, -f, -l, -s or -n")
    }

    fn headers(&self) -> anyhow::Result<Vec<(String, String)>> {
        self.headers
            .iter()
            .map(|h| match h.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
                _ => bail!("--header {h:?}: expected key=value"),
            })
            .collect()
    }
}

/// How long to wait for the broker at each step.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `ferry pub`.
pub async fn publish(args: PubArgs) -> anyhow::Result<ExitCode> {
    let payloads = args.payloads()?;
    let headers = args.headers()?;
    let n = payloads.len();
    match args.conn.version {
        Version::V5 => publish5(&args, payloads, headers).await?,
        Version::V311 => {
            if !headers.is_empty() {
                bail!("--header needs MQTT 5 (-V 5)");
            }
            publish4(&args, payloads).await?
        }
    }
    tracing::info!(messages = n, topic = args.topic, "published");
    Ok(ExitCode::SUCCESS)
}

/// Runs `fut` with the step timeout.
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(STEP_TIMEOUT, fut)
        .await
        .with_context(|| format!("timed out {what}"))
}

async fn publish5(
    args: &PubArgs,
    payloads: Vec<Bytes>,
    headers: Vec<(String, String)>,
) -> anyhow::Result<()> {
    let qos = qos5(args.qos)?;
    let (client, mut el) = v5::AsyncClient::new(args.conn.options5("pub")?, payloads.len() + 10);
    // Publishes are queued before the connection exists; the event loop sends them in order.
    within("connecting", async {
        loop {
            match el.poll().await.with_context(|| args.conn.address())? {
                v5::Event::Incoming(P5::ConnAck(_)) => return Ok::<_, anyhow::Error>(()),
                _ => continue,
            }
        }
    })
    .await??;
    let expected = if args.qos == 0 { 0 } else { payloads.len() };
    let properties = PublishProperties {
        user_properties: headers,
        ..PublishProperties::default()
    };
    let pump = async {
        let mut acked = 0;
        let mut sent = 0;
        let total = payloads.len();
        let mut queue = payloads.into_iter();
        loop {
            // Keep the request channel fed without blocking the event loop.
            while sent < total && sent - acked.min(sent) < 64 {
                let Some(p) = queue.next() else { break };
                client
                    .try_publish_with_properties(
                        args.topic.clone(),
                        qos,
                        args.retain,
                        p,
                        properties.clone(),
                    )
                    .context("queueing a publish")?;
                sent += 1;
            }
            if sent == total && acked >= expected {
                break;
            }
            match el.poll().await.context("publishing")? {
                v5::Event::Incoming(P5::PubAck(_) | P5::PubComp(_)) => acked += 1,
                v5::Event::Outgoing(rumqttc::Outgoing::Publish(_)) if args.qos == 0 => acked += 1,
                _ => {}
            }
        }
        client.try_disconnect().context("disconnecting")?;
        loop {
            match el.poll().await {
                Ok(v5::Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        Ok::<_, anyhow::Error>(())
    };
    within("publishing", pump).await?
}

async fn publish4(args: &PubArgs, payloads: Vec<Bytes>) -> anyhow::Result<()> {
    let qos = qos4(args.qos)?;
    let (client, mut el) =
        rumqttc::AsyncClient::new(args.conn.options4("pub")?, payloads.len() + 10);
    within("connecting", async {
        loop {
            match el.poll().await.with_context(|| args.conn.address())? {
                rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) => {
                    return Ok::<_, anyhow::Error>(())
                }
                _ => continue,
            }
        }
    })
    .await??;
    let expected = if args.qos == 0 { 0 } else { payloads.len() };
    let pump = async {
        let mut acked = 0;
        let mut sent = 0;
        let total = payloads.len();
        let mut queue = payloads.into_iter();
        loop {
            while sent < total && sent - acked.min(sent) < 64 {
                let Some(p) = queue.next() else { break };
                client
                    .try_publish(args.topic.clone(), qos, args.retain, p)
                    .context("queueing a publish")?;
                sent += 1;
            }
            if sent == total && acked >= expected {
                break;
            }
            match el.poll().await.context("publishing")? {
                rumqttc::Event::Incoming(
                    rumqttc::Packet::PubAck(_) | rumqttc::Packet::PubComp(_),
                ) => acked += 1,
                rumqttc::Event::Outgoing(rumqttc::Outgoing::Publish(_)) if args.qos == 0 => {
                    acked += 1
                }
                _ => {}
            }
        }
        client.try_disconnect().context("disconnecting")?;
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        Ok::<_, anyhow::Error>(())
    };
    within("publishing", pump).await?
}

/// `ferry sub`: subscribe and print messages.
#[derive(Debug, Args)]
pub struct SubArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Topic filter (MQTT wildcards); repeatable.
    #[arg(short = 't', long = "topic", required = true)]
    pub topics: Vec<String>,
    /// QoS of the subscriptions: 0, 1 or 2.
    #[arg(short = 'q', long, default_value_t = 0)]
    pub qos: u8,
    /// Exit after this many messages.
    #[arg(short = 'C', long)]
    pub count: Option<u64>,
    /// Print the topic before each payload.
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Print each message as a JSON object (topic, payload, qos, retain, headers).
    #[arg(long)]
    pub json: bool,
}

/// One received message.
struct Received {
    topic: String,
    payload: Bytes,
    qos: u8,
    retain: bool,
    headers: Vec<(String, String)>,
}

impl Received {
    fn line(&self, args: &SubArgs) -> String {
        let payload = String::from_utf8_lossy(&self.payload);
        if args.json {
            let headers: serde_json::Map<String, serde_json::Value> = self
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            serde_json::json!({
                "topic": self.topic,
                "payload": payload,
                "qos": self.qos,
                "retain": self.retain,
                "headers": headers,
            })
            .to_string()
        } else if args.verbose {
            format!("{} {payload}", self.topic)
        } else {
            payload.into_owned()
        }
    }
}

/// Runs `ferry sub` until `-C` messages arrived, or Ctrl-C.
pub async fn subscribe(args: SubArgs) -> anyhow::Result<ExitCode> {
    let mut seen = 0u64;
    let done = |seen: u64| args.count.is_some_and(|c| seen >= c);
    let mut out = std::io::stdout().lock();
    // True when no more messages are wanted: the count is reached, or whoever reads the output
    // has gone (`ferry sub ... | head -1`), which ends the command quietly.
    let mut print = |r: Received| -> anyhow::Result<bool> {
        match writeln!(out, "{}", r.line(&args)).and_then(|()| out.flush()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(true),
            Err(e) => return Err(e).context("writing to standard output"),
        }
        seen += 1;
        Ok(done(seen))
    };
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    match args.conn.version {
        Version::V5 => {
            let qos = qos5(args.qos)?;
            let (client, mut el) = v5::AsyncClient::new(args.conn.options5("sub")?, 10);
            client
                .subscribe_many(args.topics.iter().map(|t| Filter::new(t.clone(), qos)))
                .await
                .context("subscribing")?;
            loop {
                let event = tokio::select! {
                    _ = &mut stop => break,
                    e = el.poll() => e.context("MQTT connection")?,
                };
                if let v5::Event::Incoming(P5::Publish(p)) = event {
                    let r = Received {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload,
                        qos: p.qos as u8,
                        retain: p.retain,
                        headers: p.properties.map(|p| p.user_properties).unwrap_or_default(),
                    };
                    if print(r)? {
                        break;
                    }
                }
            }
            let _ = client.try_disconnect();
            // Let the event loop send the last acknowledgement and the DISCONNECT.
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while let Ok(e) = el.poll().await {
                    if matches!(e, v5::Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                        break;
                    }
                }
            })
            .await;
        }
        Version::V311 => {
            let qos = qos4(args.qos)?;
            let (client, mut el) = rumqttc::AsyncClient::new(args.conn.options4("sub")?, 10);
            client
                .subscribe_many(
                    args.topics
                        .iter()
                        .map(|t| rumqttc::SubscribeFilter::new(t.clone(), qos)),
                )
                .await
                .context("subscribing")?;
            loop {
                let event = tokio::select! {
                    _ = &mut stop => break,
                    e = el.poll() => e.context("MQTT connection")?,
                };
                if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = event {
                    let r = Received {
                        topic: p.topic,
                        payload: p.payload,
                        qos: p.qos as u8,
                        retain: p.retain,
                        headers: Vec::new(),
                    };
                    if print(r)? {
                        break;
                    }
                }
            }
            let _ = client.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while let Ok(e) = el.poll().await {
                    if matches!(e, rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                        break;
                    }
                }
            })
            .await;
        }
    }
    Ok(ExitCode::SUCCESS)
}
