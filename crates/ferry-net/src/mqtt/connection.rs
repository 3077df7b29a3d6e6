//! One MQTT connection: CONNECT, then a loop over socket reads, engine deliveries and the
//! keep-alive deadline, then the end of the session (DISCONNECT with a reason code in MQTT 5,
//! will message, session kept or dropped).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use ferry::{
    Delivery, Message, Pipelined, PublishError, Publisher, SubscribeError, Subscription,
    TopicFilter, TopicName,
};
use ferry_mqtt::{
    decode, decode_connect, encode, encoded_len, AckProperties, ConnAck, ConnAckProperties,
    Connect, DecodeError, Disconnect, DisconnectProperties, Packet, ProtocolVersion, PubAck,
    PubComp, PubRec, PubRel, Publish, QoS, ReasonCode, RetainHandling, SubAck, Subscribe, UnsubAck,
    Unsubscribe, Will,
};
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::convert::{self, Inbound};
use super::session::{self, Kick, StoredSession, SubEntry};
use super::state::{self, InboundQos2, Negotiated, Outbound, Qos2Inbound, TopicAliases};
use super::streams::Streams;
use super::MqttShared;
use crate::acl::ClientAcl;
use crate::auth::AuthOutcome;
use crate::bridge::Bridge;
use crate::config::SlowConsumerPolicy;

/// How long an engine delivery may stay unacknowledged before the engine redelivers it. MQTT
/// retransmits only on reconnect, so this is long; a dropped connection returns its deliveries
/// at once.
const MQTT_ACK_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// How long a new connection waits for the one it takes over to finish.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);
/// How long the final DISCONNECT may take to write.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// DISCONNECT with reason 0: no will.
    Normal,
    /// DISCONNECT with reason 0x04: publish the will.
    NormalWithWill,
    /// The peer closed the socket or it failed.
    Gone(String),
    /// No packet within 1.5 times the keep alive.
    KeepAlive,
    /// The peer broke the protocol (sent to MQTT 5 clients as the DISCONNECT reason).
    Protocol(ReasonCode, String),
    /// Another connection took the session over.
    TakenOver,
    /// The server is shutting down.
    Shutdown,
    /// More than `max_queued_bytes` waited for the socket (a client that does not read).
    SlowConsumer,
}

impl End {
    /// The DISCONNECT the server sends an MQTT 5 client, if any.
    fn disconnect_code(&self) -> Option<ReasonCode> {
        match self {
            End::Normal | End::NormalWithWill | End::Gone(_) => None,
            End::KeepAlive => Some(ReasonCode::KeepAliveTimeout),
            End::Protocol(code, _) => Some(*code),
            End::TakenOver => Some(ReasonCode::SessionTakenOver),
            End::Shutdown => Some(ReasonCode::ServerShuttingDown),
            End::SlowConsumer => Some(ReasonCode::QuotaExceeded),
        }
    }

    fn publishes_will(&self) -> bool {
        !matches!(self, End::Normal | End::Shutdown)
    }
}

/// A message to send that does not come from an engine subscription (retained messages).
struct Pending {
    topic: String,
    message: Message,
    qos: QoS,
    sub_id: Option<u32>,
}

/// The parts of a connection's state that only an active connection uses (subscriptions,
/// messages in flight, QoS 2, topic aliases, publishers): allocated on first use, so that an
/// idle connection holds none of it.
struct Active {
    /// Subscriptions by full filter (with any `$share/` prefix).
    subs: BTreeMap<String, SubEntry>,
    /// Their engine subscriptions, under the same keys.
    streams: Streams<Subscription>,
    outbound: Outbound<Handle>,
    /// Retained messages waiting for room in the outbound window.
    pending: VecDeque<Pending>,
    inbound_qos2: InboundQos2,
    aliases: TopicAliases,
    /// Publishers of the topics this client published to lately (no registry lookup per
    /// message); at most [`PUBLISHERS`], forgotten all at once beyond that.
    publishers: HashMap<String, Publisher>,
    /// Packet ids of messages left unacknowledged by the session's last connection, by
    /// message id: reused when they are resent (MQTT-4.4.0-1).
    resend_ids: HashMap<String, u16>,
    /// QoS 1/2 publishes waiting for durability, in the order they were received: their
    /// PUBACK/PUBREC go out in that order once each is durable, while the connection goes on
    /// reading and appending (pipelining).
    acks: VecDeque<AckDue>,
}

/// QoS 1/2 publishes of a connection that may wait for durability at once (at least; the receive
/// maximum if higher): an MQTT 5 client keeps to the receive maximum, an MQTT 3.1.1 client has
/// no such limit, and the connection stops reading past this one.
const PIPELINED_PUBLISHES: usize = 1024;

/// A QoS 1/2 publish whose acknowledgement is due once its outcome is known.
struct AckDue {
    id: Option<u16>,
    qos: QoS,
    outcome: Outcome,
    /// When the PUBLISH was read (publish-to-acknowledgement latency).
    received: std::time::Instant,
}

/// How a publish ends: the reason code to acknowledge with or why publishing failed, known now
/// or once the engine made the message durable.
enum Outcome {
    Done(Settled),
    Pending(Pipelined),
}

/// The reason code of an acknowledgement, or the failure to report.
type Settled = Result<ReasonCode, PublishError>;

impl AckDue {
    fn poll_outcome(&mut self, cx: &mut Context<'_>) -> Poll<Settled> {
        match &mut self.outcome {
            Outcome::Done(r) => Poll::Ready(std::mem::replace(r, Ok(ReasonCode::Success))),
            Outcome::Pending(p) => p.poll_unpin(cx).map(|r| r.map(|_| ReasonCode::Success)),
        }
    }
}

/// Runs a connection to its end.
///
/// The task's future stays small while the connection waits: the handshake, the handling of
/// input and the goodbye run as boxed futures, the connection's state is boxed, and buffers
/// exist only while they hold bytes. An idle connection costs a few hundred bytes besides its
/// socket.
pub(crate) async fn run<S>(start: Box<Start<S>>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared = start.shared.clone();
    // A connection past a limit holds no place (see `admit`).
    let counted = start.over_limit.is_none();
    // `let else` rather than `if let`: the handshake's result is not kept beside `c`.
    let Some(mut c) = Box::pin(handshake(start)).await else {
        if counted {
            shared.metrics.active.fetch_sub(1, Ordering::AcqRel);
        } else {
            // Its place among the connections being refused (see `spawn_connection`).
            shared.refusing.fetch_sub(1, Ordering::AcqRel);
        }
        return;
    };
    let end = c.run_loop().await;
    // Dropping the state (its hold on the control block) at the end tells a connection
    // taking the session over that this one is done.
    Box::pin(c.finish(end)).await;
    shared.metrics.active.fetch_sub(1, Ordering::AcqRel);
}

/// What a connection task starts from.
pub(crate) struct Start<S> {
    pub(crate) shared: Arc<MqttShared>,
    pub(crate) stream: S,
    pub(crate) peer: SocketAddr,
    /// The connection's number (session registry).
    pub(crate) conn: u64,
    /// The connection limit reached, if any: the CONNECT is refused.
    pub(crate) over_limit: Option<super::Limit>,
}

/// CONNECT to CONNACK: the connection's state (with its session registration), or `None`
/// when the connection ended there.
async fn handshake<S>(start: Box<Start<S>>) -> Option<Box<Conn<S>>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Start {
        shared,
        mut stream,
        peer,
        conn,
        over_limit,
    } = *start;
    // This connection's count on its address, released when the connection ends: by this
    // guard if it ends here, else by the connection state's `Drop`.
    // (A connection past a limit was not counted.)
    let address = over_limit
        .is_none()
        .then(|| super::AddressGuard::new(&shared, peer.ip()));
    let mut rbuf = BytesMut::new();
    let max_packet = shared.config.max_packet_size;
    let connect_timeout = Duration::from_secs(shared.config.connect_timeout_secs.max(1));
    let connect = tokio::select! {
        _ = shared.shutdown.cancelled() => return None,
        r = tokio::time::timeout(connect_timeout, read_connect(&mut stream, &mut rbuf, max_packet)) => r,
    };
    let mut connect = match connect {
        Err(_) => {
            tracing::debug!(%peer, "no CONNECT in time; closing");
            return None;
        }
        Ok(Err(ConnectReadError::Io(e))) => {
            tracing::debug!(%peer, error = %e, "connection closed before CONNECT");
            return None;
        }
        Ok(Err(ConnectReadError::Decode(e))) => {
            shared
                .metrics
                .protocol_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, error = %e, "invalid CONNECT; closing");
            if matches!(e, DecodeError::UnsupportedProtocolVersion { .. }) {
                // Refused in the 3.1.1 layout, which every client version reads.
                let _ = refuse(
                    &mut stream,
                    ProtocolVersion::V311,
                    ReasonCode::UnsupportedProtocolVersion,
                )
                .await;
            }
            return None;
        }
        Ok(Ok(c)) => c,
    };
    let version = connect.protocol_version;
    if let Some(limit) = over_limit {
        shared.metrics.refused.fetch_add(1, Ordering::Relaxed);
        let code = match (limit, version) {
            (super::Limit::Connections, ProtocolVersion::V5) => ReasonCode::ServerBusy,
            (super::Limit::PerAddress, ProtocolVersion::V5) => ReasonCode::QuotaExceeded,
            // 3.1.1 has one code for both.
            (_, ProtocolVersion::V311) => ReasonCode::ServerUnavailable,
        };
        shared.metrics.server.refused(match limit {
            super::Limit::Connections => "mqtt_connections",
            super::Limit::PerAddress => "mqtt_connections_per_address",
        });
        match limit {
            super::Limit::Connections => {
                tracing::warn!(%peer, client = connect.client_id, "max_connections reached; refusing")
            }
            super::Limit::PerAddress => {
                shared
                    .metrics
                    .refused_per_address
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, client = connect.client_id, "max_connections_per_address reached; refusing")
            }
        }
        let _ = refuse(&mut stream, version, code).await;
        return None;
    }
    let (neg, acl) = match accept(&shared, &connect).await {
        Ok(n) => n,
        Err(code) => {
            shared.metrics.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, client = connect.client_id, code = code.description(), "CONNECT refused");
            let _ = refuse(&mut stream, version, code).await;
            return None;
        }
    };
    let registration = shared
        .sessions
        .connect(
            &shared.broker,
            &neg.client_id,
            conn,
            connect.clean_start,
            TAKEOVER_WAIT,
            state::keep_alive_timeout(neg.keep_alive),
        )
        .await;
    let session::Registration { control, resumed } = registration;
    let session_present = resumed.is_some();
    if rbuf.is_empty() {
        rbuf = BytesMut::new();
    }
    // From here the state's `Drop` releases the address.
    if let Some(address) = address {
        address.disarm();
    }
    let mut c = Box::new(Conn {
        version,
        active: None,
        out: None,
        slow: false,
        rbuf,
        stream,
        will: connect.will.take().map(Box::new),
        sent: 0,
        neg,
        acl,
        peer,
        conn,
        shared: shared.clone(),
        control,
    });
    c.send(&Packet::ConnAck(c.connack(session_present)));
    if let Some(resumed) = resumed {
        c.resume(*resumed);
    }
    c.record_session();
    tracing::debug!(
        %peer,
        client = c.neg.client_id,
        version = ?version,
        clean_start = connect.clean_start,
        session_present,
        keep_alive = c.neg.keep_alive,
        "MQTT client connected"
    );
    Some(c)
}

/// The most bytes taken from the socket per read (through a scratch buffer on the stack).
const READ_CHUNK: usize = 16 * 1024;
/// The write buffer's first allocation when a PUBLISH is queued (more usually follow it
/// before the flush); other packets take only their size.
const WRITE_CHUNK: usize = 4096;

/// Reads what the stream has (up to [`READ_CHUNK`] bytes) and appends it to `buf`. The read
/// goes through a scratch buffer on the stack, so a connection that waits for input holds no
/// read buffer; `buf` grows only to what arrived. `Ok(0)`: end of stream.
async fn read_some<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| poll_read_some(reader, buf, cx)).await
}

/// The poll of [`read_some`].
fn poll_read_some<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<usize>> {
    let mut scratch = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
    let mut rb = ReadBuf::uninit(&mut scratch);
    match Pin::new(reader).poll_read(cx, &mut rb) {
        Poll::Ready(Ok(())) => {
            let got = rb.filled();
            buf.extend_from_slice(got);
            Poll::Ready(Ok(got.len()))
        }
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    }
}

/// What the connection's wait ended with.
enum Wake {
    /// Taken over, the server shuts down, or the keep alive expired.
    Kicked(Kick),
    /// Bytes read (0: end of stream), or the read failed.
    Input(std::io::Result<usize>),
    /// A delivery of the subscription with that key.
    Delivery(Arc<str>, Delivery),
    /// The oldest publish waiting for its acknowledgement has its outcome.
    Acked(Settled),
    /// Writing to the socket failed.
    Output(std::io::Error),
}

/// What the connection does after a wake.
enum Next {
    /// Handle the bytes read.
    Input,
    /// Flush and wait again.
    Wait,
    /// End.
    End(End),
}

enum ConnectReadError {
    Io(std::io::Error),
    Decode(DecodeError),
}

async fn read_connect<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    max_packet: usize,
) -> Result<Connect, ConnectReadError> {
    loop {
        match decode_connect(buf, max_packet) {
            Ok(Some(c)) => return Ok(c),
            Ok(None) => {}
            Err(e) => return Err(ConnectReadError::Decode(e)),
        }
        match read_some(reader, buf).await {
            Ok(0) => {
                return Err(ConnectReadError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed",
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(ConnectReadError::Io(e)),
        }
    }
}

/// Sends a refusing CONNACK and closes.
async fn refuse<W: AsyncWrite + Unpin>(
    writer: &mut W,
    version: ProtocolVersion,
    code: ReasonCode,
) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    let ack = ConnAck {
        session_present: false,
        reason_code: code,
        properties: ConnAckProperties::default(),
    };
    if encode(&Packet::ConnAck(ack), version, &mut out).is_ok() {
        tokio::time::timeout(GOODBYE_TIMEOUT, async {
            writer.write_all(&out).await?;
            writer.flush().await
        })
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    }
    writer.shutdown().await
}

/// Checks a CONNECT: negotiation rules, authentication, will topic (valid, and allowed by the
/// client's ACL). Returns what was negotiated and the client's ACL.
async fn accept(
    shared: &Arc<MqttShared>,
    connect: &Connect,
) -> Result<(Negotiated, ClientAcl), ReasonCode> {
    if connect.properties.authentication_method.is_some() {
        return Err(ReasonCode::BadAuthenticationMethod);
    }
    let neg = state::negotiate(connect, &shared.config)?;
    let auth = shared.auth.clone();
    let user = connect.username.clone();
    let password = connect.password.clone();
    // Argon2 takes milliseconds: off the async workers. Everything else (anonymous clients,
    // unknown names) is answered inline, so that a flood of connections does not start a
    // blocking thread each.
    let outcome = if auth.hashes_for(user.as_deref()) {
        tokio::task::spawn_blocking(move || {
            auth.check(user.as_deref(), password.as_ref().map(|p| &p[..]))
        })
        .await
        .unwrap_or(AuthOutcome::BadCredentials)
    } else {
        auth.check(user.as_deref(), password.as_ref().map(|p| &p[..]))
    };
    match outcome {
        AuthOutcome::Allowed => {}
        AuthOutcome::BadCredentials => return Err(ReasonCode::BadUserNameOrPassword),
        AuthOutcome::NotAuthorized => return Err(ReasonCode::NotAuthorized),
    }
    let acl = shared
        .acl
        .for_client(connect.username.as_deref(), &neg.client_id);
    if let Some(will) = &connect.will {
        if TopicName::new(&will.topic).is_err() {
            return Err(ReasonCode::TopicNameInvalid);
        }
        if !acl.may_publish(&will.topic) {
            shared.metrics.acl_denied.fetch_add(1, Ordering::Relaxed);
            return Err(ReasonCode::NotAuthorized);
        }
    }
    Ok((neg, acl))
}

/// The ack handle of an in-flight message: an engine delivery, or nothing for a retained one.
type Handle = Option<Delivery>;

struct Conn<S> {
    shared: Arc<MqttShared>,
    /// The byte stream, read and written by this task only (never at the same time).
    stream: S,
    /// Bytes read and not yet decoded; empty (unallocated) between packets.
    rbuf: BytesMut,
    /// Packets waiting for the socket (none: everything was written and flushed). The socket
    /// is written as it takes bytes, while the connection goes on reading and taking
    /// deliveries, and what waits is bounded by `max_queued_bytes` (see [`Self::send`]).
    out: Option<Box<Outgoing>>,
    /// Set when the queue passed `max_queued_bytes` and the policy closes the connection.
    slow: bool,
    version: ProtocolVersion,
    neg: Negotiated,
    /// What this client may publish and subscribe to.
    acl: ClientAcl,
    peer: SocketAddr,
    conn: u64,
    /// Subscriptions, messages in flight, retained messages to send, the inbound QoS 2 table,
    /// topic aliases and cached publishers: allocated on first use (idle connections never
    /// need them).
    active: Option<Box<Active>>,
    will: Option<Box<Will>>,
    /// The session registration: kicks and input stamps through its control block; dropped
    /// with the state, which tells a connection taking the session over that this one is done.
    control: session::Registered,
    /// PUBLISH packets queued since the last flush (added to the shared counter per flush);
    /// 32 bits, which packs with the small fields and keeps the state in a smaller size class.
    sent: u32,
}

impl<S> Drop for Conn<S> {
    fn drop(&mut self) {
        self.shared
            .addresses
            .release(&self.shared.config, self.peer.ip());
    }
}

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn v5(&self) -> bool {
        self.version == ProtocolVersion::V5
    }

    /// The parts of the state only an active connection uses, allocated on first use.
    fn active(&mut self) -> &mut Active {
        let (config, version) = (&self.shared.config, self.version);
        let window = self.neg.outbound_window;
        self.active.get_or_insert_with(|| {
            Box::new(Active {
                subs: BTreeMap::new(),
                streams: Streams::default(),
                outbound: Outbound::new(window),
                pending: VecDeque::new(),
                inbound_qos2: InboundQos2::new(config.max_inflight, HashSet::new()),
                aliases: TopicAliases::new(if version == ProtocolVersion::V5 {
                    config.topic_alias_maximum
                } else {
                    0
                }),
                publishers: HashMap::new(),
                resend_ids: HashMap::new(),
                acks: VecDeque::new(),
            })
        })
    }

    /// Whether an engine delivery may be sent now: room in the outbound window and no retained
    /// message waiting before it (false without subscriptions, hence without deliveries).
    fn can_send(&self) -> bool {
        self.active
            .as_ref()
            .is_some_and(|a| a.outbound.has_room() && a.pending.is_empty())
    }

    /// Inbound QoS 2 identifiers not released yet.
    fn inbound_qos2_ids(&self) -> HashSet<u16> {
        self.active
            .as_ref()
            .map(|e| e.inbound_qos2.ids().clone())
            .unwrap_or_default()
    }

    fn connack(&self, session_present: bool) -> ConnAck {
        let cfg = &self.shared.config;
        let properties = if self.v5() {
            ConnAckProperties {
                session_expiry_interval: self.neg.session_expiry_capped,
                receive_maximum: Some(cfg.max_inflight),
                maximum_packet_size: u32::try_from(cfg.max_packet_size).ok(),
                assigned_client_identifier: self
                    .neg
                    .assigned_id
                    .then(|| self.neg.client_id.clone()),
                topic_alias_maximum: (cfg.topic_alias_maximum > 0)
                    .then_some(cfg.topic_alias_maximum),
                retain_available: Some(true),
                wildcard_subscription_available: Some(true),
                subscription_identifiers_available: Some(true),
                shared_subscription_available: Some(true),
                server_keep_alive: self.neg.keep_alive_changed.then_some(self.neg.keep_alive),
                ..ConnAckProperties::default()
            }
        } else {
            ConnAckProperties::default()
        };
        ConnAck {
            session_present,
            reason_code: ReasonCode::Success,
            properties,
        }
    }

    /// Queues a packet for writing. Encoding only fails for packets we built wrongly; those
    /// are logged and skipped.
    fn send(&mut self, packet: &Packet) {
        let before = self.queued();
        let out = self.out.get_or_insert_with(Default::default);
        if let Err(e) = encode(packet, self.version, &mut out.buf) {
            tracing::error!(client = self.neg.client_id, packet = %packet.packet_type(), error = %e, "encoding failed");
        }
        self.check_queue(before);
    }

    /// Queues a QoS 0 PUBLISH as a frame of its own, which the `drop_oldest` policy may drop
    /// while it waits for the socket.
    fn send_droppable(&mut self, packet: &Packet) {
        let before = self.queued();
        let out = self.out.get_or_insert_with(Default::default);
        out.seal(false);
        if let Err(e) = encode(packet, self.version, &mut out.buf) {
            tracing::error!(client = self.neg.client_id, packet = %packet.packet_type(), error = %e, "encoding failed");
        }
        out.seal(true);
        self.check_queue(before);
    }

    /// Queues a PUBLISH whose payload was taken out of it: its head is encoded (with the
    /// remaining length the payload adds), and the payload is written from the message's own
    /// buffer, not copied. `droppable`: a frame of its own that `drop_oldest` may drop.
    fn send_with_payload(&mut self, packet: &Packet, payload: Bytes, droppable: bool) {
        let before = self.queued();
        let out = self.out.get_or_insert_with(Default::default);
        if droppable {
            out.seal(false);
        }
        if let Err(e) = encode_head(packet, self.version, payload.len(), &mut out.buf) {
            tracing::error!(client = self.neg.client_id, packet = %packet.packet_type(), error = %e, "encoding failed");
            return;
        }
        if out.buf.is_empty() {
            return;
        }
        let head = std::mem::take(&mut out.buf).freeze();
        out.push(head, payload, droppable);
        self.check_queue(before);
    }

    /// Bytes queued for the socket and not written yet.
    fn queued(&self) -> usize {
        self.out.as_ref().map_or(0, |o| o.buf.len() + o.bytes)
    }

    /// Applies `max_queued_bytes` after a packet was queued (`before`: the bytes queued before
    /// it; a packet is always queued when nothing else is): `drop_oldest` drops the oldest
    /// QoS 0 messages waiting, and when the queue still does not fit the connection is to be
    /// closed ([`End::SlowConsumer`]).
    fn check_queue(&mut self, before: usize) {
        let max = self.shared.config.max_queued_bytes;
        if before == 0 || self.queued() <= max || self.slow {
            return;
        }
        if self.shared.config.slow_consumer == SlowConsumerPolicy::DropOldest {
            let dropped = self.out.as_mut().map_or(0, |o| {
                o.seal(false);
                o.drop_oldest(max)
            });
            if dropped > 0 {
                let m = &self.shared.metrics;
                let total = m
                    .slow_consumer_dropped
                    .fetch_add(dropped, Ordering::Relaxed)
                    + dropped;
                if slow_log_allowed() {
                    tracing::warn!(
                        client = self.neg.client_id,
                        peer = %self.peer,
                        max_queued_bytes = max,
                        dropped_total = total,
                        "slow consumer: QoS 0 messages dropped (logged at most once a second)"
                    );
                }
            }
            if self.queued() <= max {
                return;
            }
        }
        self.slow = true;
    }

    /// Drops what waits for the socket, except a packet partly written already (cutting it
    /// would break the stream): before a final DISCONNECT.
    fn discard_queued(&mut self) {
        if let Some(o) = self.out.as_mut() {
            o.buf.clear();
            o.discard();
        }
    }

    /// Writes what is queued as far as the socket takes it; `Ready(Ok)` once everything is
    /// written and flushed (the queue is then released).
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        loop {
            let Some(out) = self.out.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            out.seal(false);
            if out.frames.is_empty() {
                // TLS and WebSocket streams buffer: push the bytes out.
                std::task::ready!(Pin::new(&mut self.stream).poll_flush(cx))?;
                self.out = None;
                return Poll::Ready(Ok(()));
            }
            let written = if self.stream.is_write_vectored() {
                let mut slices = [std::io::IoSlice::new(&[]); WRITE_SLICES];
                let mut n = 0;
                let parts = out
                    .frames
                    .iter()
                    .flat_map(|f| [&f.head, &f.payload])
                    .filter(|b| !b.is_empty());
                for (slot, part) in slices.iter_mut().zip(parts) {
                    *slot = std::io::IoSlice::new(part);
                    n += 1;
                }
                std::task::ready!(Pin::new(&mut self.stream).poll_write_vectored(cx, &slices[..n]))?
            } else {
                let Some(front) = out.frames.front() else {
                    continue;
                };
                let part = if front.head.is_empty() {
                    &front.payload
                } else {
                    &front.head
                };
                std::task::ready!(Pin::new(&mut self.stream).poll_write(cx, part))?
            };
            if written == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            out.advance(written);
        }
    }

    /// Writes everything queued (the goodbye).
    async fn flush(&mut self) -> std::io::Result<()> {
        self.count_sent();
        std::future::poll_fn(|cx| self.poll_write_out(cx)).await
    }

    /// Adds the PUBLISH packets queued since the last call to the shared counter.
    fn count_sent(&mut self) {
        if self.sent > 0 {
            self.shared
                .metrics
                .publish_sent
                .fetch_add(u64::from(std::mem::take(&mut self.sent)), Ordering::Relaxed);
        }
    }

    /// Restores a persistent session: its subscriptions, QoS 2 state, PUBRELs to resend.
    fn resume(&mut self, s: StoredSession) {
        let max_inflight = self.shared.config.max_inflight;
        let a = self.active();
        a.inbound_qos2 = InboundQos2::new(max_inflight, s.inbound_qos2);
        a.outbound.restore_pubcomp(&s.awaiting_pubcomp);
        a.outbound.reserve(s.unacked.iter().map(|(_, id)| *id));
        a.resend_ids = s.unacked.into_iter().collect();
        for id in &s.awaiting_pubcomp {
            self.send(&Packet::PubRel(PubRel::new(*id)));
        }
        for (key, entry) in s.subscriptions {
            if !self.acl.may_subscribe(&entry.filter) {
                // The ACL changed while the client was away (a restart with a new config).
                tracing::info!(
                    client = self.neg.client_id,
                    filter = key,
                    "subscription no longer allowed by the ACL; dropped"
                );
                if let (None, Some(g)) = (&entry.share, &entry.group) {
                    self.shared.broker.delete_group(g);
                }
                continue;
            }
            match self.engine_subscription(&entry) {
                Ok(sub) => {
                    let a = self.active();
                    a.streams.insert(&key, sub);
                    a.subs.insert(key, entry);
                }
                Err(e) => {
                    tracing::warn!(client = self.neg.client_id, filter = key, error = %e, "could not restore a subscription")
                }
            }
        }
    }

    async fn run_loop(&mut self) -> End {
        // Takeover, shutdown and the keep-alive deadline come through the control block (set by the
        // session registry, which checks every connection's last input once a second): the
        // task holds no timer and no cancellation future of its own.
        //
        // Packets that came in the same reads as the CONNECT (a client may send SUBSCRIBE or
        // PUBLISH without waiting for the CONNACK) are in the read buffer already: they are
        // handled now, after the CONNACK queued before them, not when the socket next has
        // something to read, which it may never have.
        if !self.rbuf.is_empty() {
            if let Some(end) = Box::pin(self.handle_input()).await {
                return end;
            }
        }
        loop {
            self.send_pending();
            self.count_sent();
            if self.slow {
                return End::SlowConsumer;
            }
            let can_send = self.can_send();
            // One hand-written poll rather than `select!`: nothing but a reference to the
            // state is kept across the wait, which keeps an idle connection's task small.
            // The wake is consumed within this block, so that it is not part of the future
            // across the input handling below.
            {
                let wake = std::future::poll_fn(|cx| self.poll_wake(can_send, cx)).await;
                match self.on_wake(wake) {
                    Next::Input => {}
                    Next::Wait => continue,
                    Next::End(end) => return end,
                }
            }
            if let Some(end) = Box::pin(self.handle_input()).await {
                return end;
            }
            if self.slow {
                return End::SlowConsumer;
            }
            if self.rbuf.is_empty() {
                // Release the buffer (decoded packets keep what they use).
                self.rbuf = BytesMut::new();
            }
        }
    }

    /// Handles what the wait of [`Self::run_loop`] ended with, but input.
    fn on_wake(&mut self, wake: Wake) -> Next {
        /// Deliveries taken from the engine per pass before the writes are flushed.
        const DELIVERY_BATCH: usize = 64;
        match wake {
            Wake::Kicked(k) => Next::End(match k {
                Kick::Shutdown => End::Shutdown,
                Kick::TakenOver => End::TakenOver,
                Kick::KeepAlive => End::KeepAlive,
            }),
            Wake::Delivery(key, delivery) => {
                self.deliver(&key, delivery);
                // Take what else is ready before flushing: one write for many PUBLISHes.
                for _ in 1..DELIVERY_BATCH {
                    if self.slow || !self.can_send() {
                        break;
                    }
                    let next = self.active.as_mut().and_then(|a| a.streams.try_next());
                    match next {
                        Some((key, delivery)) => self.deliver(&key, delivery),
                        None => break,
                    }
                }
                Next::Wait
            }
            Wake::Acked(result) => match self.acks_ready(result) {
                Some(end) => Next::End(end),
                None => Next::Wait,
            },
            Wake::Input(Ok(0)) => Next::End(End::Gone("closed by peer".into())),
            Wake::Input(Ok(_)) => Next::Input,
            Wake::Input(Err(e)) => Next::End(End::Gone(e.to_string())),
            Wake::Output(e) => Next::End(End::Gone(e.to_string())),
        }
    }

    /// What the wait of [`Self::run_loop`] ends with: a kick, input, or (when `can_send`) a
    /// delivery.
    fn poll_wake(&mut self, can_send: bool, cx: &mut Context<'_>) -> Poll<Wake> {
        if let Poll::Ready(k) = self.control.poll_kicked(cx) {
            return Poll::Ready(Wake::Kicked(k));
        }
        // Output first, as far as the socket takes it; a client that does not read does not
        // stop the connection from reading its input or taking deliveries (bounded by
        // `max_queued_bytes`).
        if self.out.is_some() {
            if let Poll::Ready(Err(e)) = self.poll_write_out(cx) {
                return Poll::Ready(Wake::Output(e));
            }
        }
        if let Poll::Ready(r) = self.poll_oldest_ack(cx) {
            return Poll::Ready(Wake::Acked(r));
        }
        if let Poll::Ready(r) = poll_read_some(&mut self.stream, &mut self.rbuf, cx) {
            return Poll::Ready(Wake::Input(r));
        }
        if can_send {
            if let Some(a) = self.active.as_mut() {
                if let Poll::Ready((key, d)) = a.streams.poll_next(cx) {
                    return Poll::Ready(Wake::Delivery(key, d));
                }
            }
        }
        Poll::Pending
    }

    /// Decodes and handles every complete packet in the read buffer. The keep-alive clock
    /// restarts when a whole packet has come (MQTT-3.1.2-24 speaks of control packets, not
    /// bytes): a client that dribbles a packet a byte at a time is still timed out.
    async fn handle_input(&mut self) -> Option<End> {
        let mut touched = false;
        loop {
            let packet = match decode(
                &mut self.rbuf,
                self.version,
                self.shared.config.max_packet_size,
            ) {
                Ok(Some(p)) => p,
                Ok(None) => return None,
                Err(e) => {
                    return Some(End::Protocol(
                        e.reason_code(),
                        format!("invalid packet: {e}"),
                    ))
                }
            };
            if !touched {
                self.control.touch();
                touched = true;
            }
            if let Some(end) = self.handle(packet).await {
                return Some(end);
            }
            if self.slow {
                return Some(End::SlowConsumer);
            }
        }
    }

    async fn handle(&mut self, packet: Packet) -> Option<End> {
        match packet {
            Packet::Publish(p) => return self.on_publish(p).await,
            Packet::PubAck(a) => match self.active().outbound.on_puback(a.packet_id) {
                Ok(handle) => settle(handle.flatten()),
                Err(e) => tracing::debug!(
                    client = self.neg.client_id,
                    id = a.packet_id,
                    ?e,
                    "unexpected PUBACK"
                ),
            },
            Packet::PubRec(r) => match self.active().outbound.on_pubrec(r.packet_id, r.reason_code)
            {
                Ok((handle, send_pubrel)) => {
                    settle(handle.flatten());
                    if send_pubrel {
                        self.send(&Packet::PubRel(PubRel::new(r.packet_id)));
                    }
                }
                Err(e) => {
                    tracing::debug!(
                        client = self.neg.client_id,
                        id = r.packet_id,
                        ?e,
                        "unexpected PUBREC"
                    );
                    let mut rel = PubRel::new(r.packet_id);
                    rel.reason_code = ReasonCode::PacketIdentifierNotFound;
                    self.send(&Packet::PubRel(rel));
                }
            },
            Packet::PubRel(r) => {
                let mut comp = PubComp::new(r.packet_id);
                if !self.active().inbound_qos2.on_pubrel(r.packet_id) {
                    comp.reason_code = ReasonCode::PacketIdentifierNotFound;
                }
                self.send(&Packet::PubComp(comp));
            }
            Packet::PubComp(c) => {
                if let Err(e) = self.active().outbound.on_pubcomp(c.packet_id) {
                    tracing::debug!(
                        client = self.neg.client_id,
                        id = c.packet_id,
                        ?e,
                        "unexpected PUBCOMP"
                    );
                }
            }
            Packet::Subscribe(s) => self.on_subscribe(s).await,
            Packet::Unsubscribe(u) => {
                self.on_unsubscribe(u);
                if let Err(e) = self.persist_session().await {
                    // MQTT has no refusal of an UNSUBSCRIBE that took effect: the connection
                    // closes without UNSUBACK, so the client does not take it as saved.
                    return Some(End::Protocol(
                        ReasonCode::UnspecifiedError,
                        format!("saving the session's unsubscription failed: {e}"),
                    ));
                }
            }
            Packet::PingReq => self.send(&Packet::PingResp),
            Packet::Disconnect(d) => return Some(self.on_disconnect(d)),
            Packet::Auth(_) => {
                return Some(End::Protocol(
                    ReasonCode::ProtocolError,
                    "AUTH without an authentication method".into(),
                ))
            }
            other => {
                return Some(End::Protocol(
                    ReasonCode::ProtocolError,
                    format!("unexpected {} from a client", other.packet_type()),
                ))
            }
        }
        None
    }

    async fn on_publish(&mut self, p: Publish) -> Option<End> {
        let received = std::time::Instant::now();
        self.shared
            .metrics
            .publish_received
            .fetch_add(1, Ordering::Relaxed);
        let resolved = match p.properties.topic_alias {
            None => Ok(p.topic.clone()),
            Some(alias) => self.active().aliases.resolve(&p.topic, Some(alias)),
        };
        let topic = match resolved {
            Ok(t) => t,
            Err(code) => return Some(End::Protocol(code, "bad topic alias".into())),
        };
        if let Err(e) = TopicName::new(&topic) {
            // A valid MQTT topic that Ferry does not accept (a reserved first level such as
            // `$SYS`, `$share` or `$dlq`, `*`, control characters): 0x90 with the reason on
            // MQTT 5; MQTT 3.1.1 (and QoS 0) cannot refuse a PUBLISH, so the connection closes.
            if self.v5() && p.qos > QoS::AtMostOnce {
                tracing::debug!(client = self.neg.client_id, topic, error = %e, "PUBLISH refused");
                return self
                    .queue_ack(
                        p.packet_id,
                        p.qos,
                        Outcome::Done(Err(PublishError::InvalidTopic(e))),
                        received,
                    )
                    .await;
            }
            return Some(End::Protocol(
                ReasonCode::TopicNameInvalid,
                format!("topic {topic:?} refused: {e}"),
            ));
        }
        if p.properties.payload_format_indicator == Some(true)
            && std::str::from_utf8(&p.payload).is_err()
        {
            if self.v5() && p.qos > QoS::AtMostOnce {
                return self
                    .queue_ack(
                        p.packet_id,
                        p.qos,
                        Outcome::Done(Ok(ReasonCode::PayloadFormatInvalid)),
                        received,
                    )
                    .await;
            }
            return Some(End::Protocol(
                ReasonCode::PayloadFormatInvalid,
                "payload is not UTF-8".into(),
            ));
        }
        if !self.acl.may_publish(&topic) {
            self.shared
                .metrics
                .acl_denied
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                client = self.neg.client_id,
                topic,
                "PUBLISH denied by the ACL"
            );
            // MQTT 5 says Not authorized; 3.1.1 cannot refuse a PUBLISH without closing, so
            // QoS 1/2 are acknowledged as usual and the message is dropped.
            let code = if self.v5() {
                ReasonCode::NotAuthorized
            } else {
                ReasonCode::Success
            };
            return self
                .queue_ack(p.packet_id, p.qos, Outcome::Done(Ok(code)), received)
                .await;
        }
        if p.qos == QoS::ExactlyOnce {
            let Some(id) = p.packet_id else {
                return Some(End::Protocol(
                    ReasonCode::ProtocolError,
                    "no packet id".into(),
                ));
            };
            match self.active().inbound_qos2.on_publish(id) {
                Qos2Inbound::Publish => {}
                Qos2Inbound::Duplicate => {
                    return self
                        .queue_ack(
                            p.packet_id,
                            p.qos,
                            Outcome::Done(Ok(ReasonCode::Success)),
                            received,
                        )
                        .await;
                }
                Qos2Inbound::ReceiveMaximumExceeded => {
                    return Some(End::Protocol(
                        ReasonCode::ReceiveMaximumExceeded,
                        "too many unreleased QoS 2 messages".into(),
                    ))
                }
            }
        }
        let message = Inbound::from_publish(p.qos, p.retain, &self.neg.client_id, &p.properties)
            .to_message(p.payload.clone());
        let outcome = match self.publish(&topic, message, p.retain).await {
            Ok(Some(pipelined)) => Outcome::Pending(pipelined),
            Ok(None) => Outcome::Done(Ok(ReasonCode::Success)),
            Err(e) => Outcome::Done(Err(e)),
        };
        if p.qos == QoS::AtMostOnce {
            // Nothing to acknowledge: the engine makes it durable and visible on its own.
            if let Outcome::Done(Err(e)) = outcome {
                tracing::warn!(client = self.neg.client_id, topic, error = %e, "publish failed");
            }
            return None;
        }
        self.queue_ack(p.packet_id, p.qos, outcome, received).await
    }

    /// Acknowledges a QoS 1/2 publish now, or after the publishes before it (acknowledgements
    /// go out in the order the publishes came, MQTT-4.6.0-2).
    async fn queue_ack(
        &mut self,
        id: Option<u16>,
        qos: QoS,
        outcome: Outcome,
        received: std::time::Instant,
    ) -> Option<End> {
        let acks = &mut self.active().acks;
        if acks.is_empty() {
            if let Outcome::Done(result) = outcome {
                return self.publish_done(id, qos, result, received);
            }
        }
        acks.push_back(AckDue {
            id,
            qos,
            outcome,
            received,
        });
        // Bounded: past the limit, wait for the oldest before reading more.
        let limit = usize::from(self.shared.config.max_inflight).max(PIPELINED_PUBLISHES);
        while self.active.as_ref().is_some_and(|a| a.acks.len() >= limit) {
            let result = std::future::poll_fn(|cx| self.poll_oldest_ack(cx)).await;
            if let Some(end) = self.acks_ready(result) {
                return Some(end);
            }
        }
        None
    }

    /// The outcome of the oldest publish waiting for its acknowledgement (pending if none).
    fn poll_oldest_ack(&mut self, cx: &mut Context<'_>) -> Poll<Settled> {
        match self.active.as_mut().and_then(|a| a.acks.front_mut()) {
            Some(head) => head.poll_outcome(cx),
            None => Poll::Pending,
        }
    }

    /// Acknowledges the oldest waiting publish with `result`, then every following one whose
    /// outcome is known, in order.
    fn acks_ready(&mut self, mut result: Settled) -> Option<End> {
        loop {
            let due = self.active.as_mut()?.acks.pop_front()?;
            if let Some(end) = self.publish_done(due.id, due.qos, result, due.received) {
                return Some(end);
            }
            let head = self.active.as_mut()?.acks.front_mut()?;
            let waker = futures::task::noop_waker();
            match head.poll_outcome(&mut Context::from_waker(&waker)) {
                Poll::Ready(r) => result = r,
                Poll::Pending => return None,
            }
        }
    }

    /// Sends the acknowledgement of a QoS 1/2 publish given its outcome; a failure on MQTT
    /// 3.1.1, which has no way to say no, closes the connection.
    fn publish_done(
        &mut self,
        id: Option<u16>,
        qos: QoS,
        result: Settled,
        received: std::time::Instant,
    ) -> Option<End> {
        let (code, reason) = match result {
            Ok(code) => {
                if matches!(
                    code,
                    ReasonCode::Success | ReasonCode::NoMatchingSubscribers
                ) {
                    self.shared.metrics.server.publish_acked("mqtt", received);
                }
                (code, None)
            }
            Err(e) => {
                tracing::warn!(client = self.neg.client_id, error = %e, "publish failed");
                if matches!(e, PublishError::TopicLimit { .. }) {
                    self.shared.metrics.server.refused("topic_limit");
                }
                if qos == QoS::ExactlyOnce {
                    if let Some(id) = id {
                        self.active().inbound_qos2.on_pubrel(id);
                    }
                }
                if !self.v5() {
                    return Some(End::Protocol(
                        ReasonCode::ImplementationSpecificError,
                        format!("publish failed: {e}"),
                    ));
                }
                (publish_error_code(&e), Some(publish_error_reason(&e)))
            }
        };
        self.ack(id, qos, code, reason);
        None
    }

    /// Publishes to the engine (and the retained store) through a cached [`Publisher`].
    /// Publishing through the engine is pipelined (`Ok(Some)`: its outcome comes later, see
    /// [`AckDue`]); the other paths are done when this returns (`Ok(None)`).
    async fn publish(
        &mut self,
        topic: &str,
        message: Message,
        retain: bool,
    ) -> Result<Option<Pipelined>, PublishError> {
        if self.shared.bridge.is_some() {
            return publish(&self.shared, topic, message, retain)
                .await
                .map(|()| None);
        }
        self.active();
        let Some(active) = self.active.as_mut() else {
            return publish(&self.shared, topic, message, retain)
                .await
                .map(|()| None);
        };
        let publishers = &mut active.publishers;
        if !publishers.contains_key(topic) {
            if publishers.len() >= PUBLISHERS {
                publishers.clear();
            }
            let publisher = self.shared.broker.publisher(topic)?;
            publishers.insert(topic.to_string(), publisher);
        }
        match publishers.get(topic) {
            Some(publisher) => {
                // Retained only once published: a refused publish leaves the retained set as
                // it was.
                let retained = retain.then(|| message.clone());
                let mut pipelined = publisher.publish_pipelined(message);
                if let Some(message) = retained {
                    // Acknowledged once both the message and the retained set are on disk.
                    (&mut pipelined).await?;
                    self.shared.retained.set(topic, message);
                    return retained_saved(&self.shared, topic).await.map(|()| None);
                }
                if !pipelined.is_appended() {
                    // A full topic: wait for the append before reading on, to keep the order.
                    (&mut pipelined).await?;
                    return Ok(None);
                }
                Ok(Some(pipelined))
            }
            None => publish(&self.shared, topic, message, retain)
                .await
                .map(|()| None),
        }
    }

    /// Sends the PUBACK/PUBREC of a QoS 1/2 publish; `reason` (what failed) goes out as the
    /// Reason String when the client accepts one and the packet stays within its maximum size.
    fn ack(&mut self, id: Option<u16>, qos: QoS, code: ReasonCode, reason: Option<String>) {
        let Some(id) = id else {
            return;
        };
        let properties = AckProperties {
            reason_string: reason.filter(|r| {
                self.v5()
                    && self.neg.problem_information
                    && r.len() + ACK_OVERHEAD <= self.neg.client_max_packet
            }),
            ..AckProperties::default()
        };
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                let mut a = PubAck::new(id);
                a.reason_code = code;
                a.properties = properties;
                self.send(&Packet::PubAck(a));
            }
            QoS::ExactlyOnce => {
                let mut r = PubRec::new(id);
                r.reason_code = code;
                r.properties = properties;
                self.send(&Packet::PubRec(r));
            }
        }
    }

    /// Builds the engine subscription behind an MQTT subscription.
    fn engine_subscription(&self, entry: &SubEntry) -> Result<Subscription, SubscribeError> {
        let filter = engine_filter(&entry.filter)?;
        let mut b = self
            .shared
            .broker
            .subscription_to(&filter)
            .ack_timeout(MQTT_ACK_TIMEOUT)
            .max_attempts(u32::MAX)
            .prefetch(usize::from(self.shared.config.max_inflight));
        if entry.share.is_some() {
            // Members of a share take a few records at a time, so that a steady stream spreads
            // over them instead of going to whichever member woke first.
            b = b.batch_size(SHARE_BATCH);
        }
        if let Some(group) = &entry.group {
            b = b.group(group.clone()).manual_ack();
        } else if entry.granted > QoS::AtMostOnce {
            b = b.manual_ack();
        }
        if let Some(bridge) = &self.shared.bridge {
            // Over a backend, local topics hold what the ingresses wrote: ordinary subscriptions
            // read the fanout copies, a shared one its group's.
            b = b.where_header(match (&entry.share, &entry.group) {
                (Some(share), Some(group)) => bridge.share_condition(share, &entry.filter, group),
                _ => Bridge::fanout_condition(),
            });
        }
        b.build()
    }

    /// Subscribes, then (for a persistent session) waits until the session's subscriptions
    /// are saved before the SUBACK. If they cannot be saved, the subscriptions this packet
    /// made are taken back (a new one removed with its engine group and the retained messages
    /// queued for it, an existing one given its previous options again) and each is answered
    /// 0x80.
    async fn on_subscribe(&mut self, s: Subscribe) {
        let sub_id = s.properties.subscription_identifier;
        let mut codes = Vec::with_capacity(s.subscriptions.len());
        let pending_before = self.active().pending.len();
        let mut before = Vec::with_capacity(s.subscriptions.len());
        for req in &s.subscriptions {
            let previous = self.active().subs.get(&req.filter).cloned();
            let code = self.subscribe_one(&req.filter, req.options, sub_id);
            before.push((req.filter.clone(), previous));
            codes.push(code);
        }
        self.record_session();
        if let Err(e) = self.persist_session().await {
            tracing::warn!(client = self.neg.client_id, error = %e, "SUBSCRIBE refused: the session could not be saved");
            self.active().pending.truncate(pending_before);
            for ((filter, previous), code) in before.into_iter().zip(codes.iter_mut()) {
                if code.is_error() {
                    continue;
                }
                *code = ReasonCode::UnspecifiedError;
                match previous {
                    Some(entry) => {
                        self.active().subs.insert(filter, entry);
                    }
                    None => {
                        let a = self.active();
                        a.streams.remove(&filter);
                        if let Some(entry) = a.subs.remove(&filter) {
                            if let (None, Some(g)) = (&entry.share, &entry.group) {
                                self.shared.broker.delete_group(g);
                            }
                        }
                    }
                }
            }
            // The next save round writes the session as it was.
            self.record_session();
        }
        self.send(&Packet::SubAck(SubAck {
            packet_id: s.packet_id,
            reason_codes: codes,
            properties: Default::default(),
        }));
    }

    /// The persistent session as it stands, for the registry.
    fn stored_session(&self) -> StoredSession {
        StoredSession {
            subscriptions: self
                .active
                .as_ref()
                .map(|a| a.subs.clone())
                .unwrap_or_default(),
            inbound_qos2: self.inbound_qos2_ids(),
            awaiting_pubcomp: self
                .active
                .as_ref()
                .map(|a| a.outbound.awaiting_pubcomp())
                .unwrap_or_default(),
            unacked: Vec::new(),
            expiry: self.neg.session_expiry.unwrap_or_default(),
        }
    }

    /// Tells the registry about the session's subscriptions (persisted with a data directory,
    /// so that they survive a crash); nothing for a session that ends with the connection.
    /// For a persistent session, waits until its subscriptions (and the positions of new
    /// engine groups) are on disk: the SUBACK or UNSUBACK just queued goes out only after that,
    /// so an acknowledged subscription survives a crash.
    async fn persist_session(&mut self) -> Result<(), String> {
        if self.neg.session_expiry.is_some() {
            return self.shared.try_persist().await;
        }
        Ok(())
    }

    fn record_session(&self) {
        if self.neg.session_expiry.is_some() {
            self.shared.sessions.record(
                &self.neg.client_id,
                self.conn,
                Some(self.stored_session()),
            );
        }
    }

    fn subscribe_one(
        &mut self,
        full: &str,
        options: ferry_mqtt::SubscriptionOptions,
        sub_id: Option<u32>,
    ) -> ReasonCode {
        let (share, filter) = match ferry_mqtt::parse_shared_subscription(full) {
            Ok(Some((g, f))) => (Some(g.to_string()), f.to_string()),
            Ok(None) => {
                if ferry_mqtt::validate_topic_filter(full).is_err() {
                    return ReasonCode::TopicFilterInvalid;
                }
                (None, full.to_string())
            }
            Err(_) => return ReasonCode::TopicFilterInvalid,
        };
        if !self.acl.may_subscribe(&filter) {
            self.shared
                .metrics
                .acl_denied
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                client = self.neg.client_id,
                filter = full,
                "SUBSCRIBE denied by the ACL"
            );
            // 0x87 in MQTT 5; encoded as 0x80 (failure) for 3.1.1.
            return ReasonCode::NotAuthorized;
        }
        let granted = options.qos;
        let group = match (&share, self.neg.session_expiry) {
            (Some(g), _) => Some(session::share_group(g, &filter)),
            (None, Some(_)) => Some(session::session_group(&self.neg.client_id, full)),
            (None, None) => None,
        };
        let entry = SubEntry {
            filter,
            share,
            options,
            granted,
            id: sub_id,
            group,
        };
        let max_subs = self.shared.config.max_subscriptions_per_connection;
        let a = self.active();
        let existed = a.subs.contains_key(full);
        if !existed && max_subs > 0 && a.subs.len() >= max_subs {
            tracing::info!(
                client = self.neg.client_id,
                filter = full,
                max = max_subs,
                "SUBSCRIBE refused: max_subscriptions_per_connection reached"
            );
            self.shared.metrics.server.refused("mqtt_subscriptions");
            // 0x97 in MQTT 5; encoded as 0x80 (failure) for 3.1.1.
            return ReasonCode::QuotaExceeded;
        }
        // An existing subscription keeps its engine subscription (and its position) when the
        // acknowledgement mode does not change.
        let keep = a.subs.get(full).is_some_and(|old| {
            old.group.is_some()
                || (old.granted > QoS::AtMostOnce) == (entry.granted > QoS::AtMostOnce)
        }) && a.streams.contains_key(full);
        if !keep {
            a.streams.remove(full);
            match self.engine_subscription(&entry) {
                Ok(sub) => {
                    self.active().streams.insert(full, sub);
                }
                Err(e) => {
                    tracing::debug!(client = self.neg.client_id, filter = full, error = %e, "SUBSCRIBE refused");
                    self.active().subs.remove(full);
                    return match e {
                        SubscribeError::InvalidFilter(_) => ReasonCode::TopicFilterInvalid,
                        _ => ReasonCode::ImplementationSpecificError,
                    };
                }
            }
        }
        let send_retained = entry.share.is_none()
            && match options.retain_handling {
                RetainHandling::SendAtSubscribe => true,
                RetainHandling::SendAtSubscribeIfNew => !existed,
                RetainHandling::DoNotSend => false,
            };
        if send_retained {
            if let Ok(f) = engine_filter(&entry.filter) {
                for (topic, message) in self.shared.retained.matching(&f) {
                    let qos = convert::published_qos(&message).min(granted);
                    self.active().pending.push_back(Pending {
                        topic,
                        message,
                        qos,
                        sub_id,
                    });
                }
            }
        }
        self.active().subs.insert(full.to_string(), entry);
        match granted {
            QoS::AtMostOnce => ReasonCode::GRANTED_QOS_0,
            QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
            QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
        }
    }

    fn on_unsubscribe(&mut self, u: Unsubscribe) {
        let mut codes = Vec::with_capacity(u.filters.len());
        for f in &u.filters {
            let a = self.active();
            a.streams.remove(f);
            match a.subs.remove(f) {
                Some(entry) => {
                    if let (None, Some(g)) = (&entry.share, &entry.group) {
                        self.shared.broker.delete_group(g);
                    }
                    codes.push(ReasonCode::Success);
                }
                None => codes.push(ReasonCode::NoSubscriptionExisted),
            }
        }
        if !self.v5() {
            codes.clear();
        }
        self.send(&Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            reason_codes: codes,
            properties: Default::default(),
        }));
        self.record_session();
    }

    fn on_disconnect(&mut self, d: Disconnect) -> End {
        if let Some(asked) = d.properties.session_expiry_interval {
            if self.neg.session_expiry.is_none() && asked > 0 {
                return End::Protocol(
                    ReasonCode::ProtocolError,
                    "session expiry set at DISCONNECT after 0 at CONNECT".into(),
                );
            }
            let granted = asked.min(self.shared.config.max_session_expiry_secs);
            self.neg.session_expiry =
                (granted > 0).then(|| Duration::from_secs(u64::from(granted)));
        }
        if d.reason_code == ReasonCode::DisconnectWithWillMessage {
            End::NormalWithWill
        } else {
            End::Normal
        }
    }

    /// Sends an engine delivery of subscription `key`.
    fn deliver(&mut self, key: &str, delivery: Delivery) {
        let Some(entry) = self.active.as_ref().and_then(|a| a.subs.get(key)) else {
            // Unsubscribed meanwhile; returned to the engine when dropped.
            return;
        };
        if entry.options.no_local && delivery.producer_id() == Some(self.neg.client_id.as_str()) {
            settle(Some(delivery));
            return;
        }
        let message = delivery.message();
        let qos = convert::published_qos(message).min(entry.granted);
        let retain = entry.options.retain_as_published && convert::published_retained(message);
        let dup = delivery.attempt() > 1;
        let publish = self.build_publish(
            delivery.topic().as_str(),
            message,
            qos,
            retain,
            entry.id,
            dup,
        );
        self.send_publish(publish, Some(delivery));
    }

    /// Sends queued retained messages while the window has room.
    fn send_pending(&mut self) {
        while let Some(a) = self.active.as_mut() {
            if !a.outbound.has_room() {
                break;
            }
            let Some(p) = a.pending.pop_front() else {
                break;
            };
            let publish = self.build_publish(&p.topic, &p.message, p.qos, true, p.sub_id, false);
            self.send_publish(publish, None);
        }
    }

    /// The PUBLISH of `message` (its packet id still to be set), `None` if it has expired.
    fn build_publish(
        &self,
        topic: &str,
        message: &Message,
        qos: QoS,
        retain: bool,
        sub_id: Option<u32>,
        dup: bool,
    ) -> Option<Publish> {
        let properties = if self.v5() {
            let expiry = convert::remaining_expiry(message, SystemTime::now());
            if expiry == Some(0) {
                return None;
            }
            let mut p = convert::outbound_properties(message, expiry);
            p.subscription_identifiers = sub_id.into_iter().collect();
            p
        } else {
            if message.expires_at().is_some()
                && convert::remaining_expiry(message, SystemTime::now()) == Some(0)
            {
                return None;
            }
            Default::default()
        };
        Some(Publish {
            dup: dup && qos > QoS::AtMostOnce,
            qos,
            retain,
            topic: topic.to_string(),
            packet_id: (qos > QoS::AtMostOnce).then_some(1),
            payload: Bytes::clone(message.payload()),
            properties,
        })
    }

    /// Sends a PUBLISH built by [`Self::build_publish`] (`None`: expired, settled at once).
    fn send_publish(&mut self, publish: Option<Publish>, handle: Handle) {
        let Some(publish) = publish else {
            settle(handle);
            return;
        };
        let qos = publish.qos;
        let delivered = handle.as_ref().map(|d| d.message().timestamp());
        let mut packet = Packet::Publish(publish);
        match encoded_len(&packet, self.version) {
            Ok(len) if len <= self.neg.client_max_packet => {}
            Ok(len) => {
                tracing::debug!(
                    client = self.neg.client_id,
                    len,
                    "message larger than the client's maximum packet size; dropped"
                );
                settle(handle);
                return;
            }
            Err(e) => {
                tracing::warn!(client = self.neg.client_id, error = %e, "message cannot be sent over MQTT; dropped");
                settle(handle);
                return;
            }
        }
        if qos > QoS::AtMostOnce {
            let a = self.active();
            let preferred = match &handle {
                Some(d) if !a.resend_ids.is_empty() => {
                    a.resend_ids.remove(&d.message().id().to_string())
                }
                _ => None,
            };
            match a.outbound.start_as(qos, handle, preferred) {
                Some(id) => {
                    if let Packet::Publish(p) = &mut packet {
                        p.packet_id = Some(id);
                    }
                }
                None => return,
            }
        } else {
            settle(handle);
        }
        let droppable = qos == QoS::AtMostOnce
            && self.shared.config.slow_consumer == SlowConsumerPolicy::DropOldest;
        let payload = match &mut packet {
            Packet::Publish(p) if p.payload.len() >= SHARED_PAYLOAD => {
                std::mem::take(&mut p.payload)
            }
            _ => Bytes::new(),
        };
        if !payload.is_empty() {
            self.send_with_payload(&packet, payload, droppable);
        } else if droppable {
            self.send_droppable(&packet);
        } else {
            let out = self.out.get_or_insert_with(Default::default);
            if out.buf.capacity() == 0 {
                out.buf.reserve(WRITE_CHUNK);
            }
            self.send(&packet);
        }
        if let Some(d) = &delivered {
            self.shared.metrics.server.delivered(*d);
        }
        self.sent = self.sent.saturating_add(1);
    }

    /// Ends the connection: goodbye, in-flight deliveries back to the engine, will, session.
    async fn finish(mut self: Box<Self>, end: End) {
        let client = self.neg.client_id.clone();
        let m = &self.shared.metrics;
        match &end {
            End::Protocol(code, why) => {
                m.protocol_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(client, peer = %self.peer, code = code.description(), reason = why, "closing MQTT connection: protocol error");
            }
            End::KeepAlive => {
                m.keep_alive_timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(client, peer = %self.peer, "closing MQTT connection: keep alive expired");
            }
            End::Gone(why) => tracing::debug!(client, reason = why, "MQTT connection lost"),
            End::TakenOver => {
                tracing::debug!(client, "MQTT session taken over by a new connection")
            }
            End::Normal | End::NormalWithWill => {
                tracing::debug!(client, "MQTT client disconnected")
            }
            End::Shutdown => tracing::debug!(client, "closing MQTT connection: shutdown"),
            End::SlowConsumer => {
                m.slow_consumer_disconnects.fetch_add(1, Ordering::Relaxed);
                m.server.refused("mqtt_slow_consumer");
                if slow_log_allowed() {
                    tracing::warn!(client, peer = %self.peer, max_queued_bytes = self.shared.config.max_queued_bytes, "closing MQTT connection: slow consumer (more than max_queued_bytes waiting for its socket; logged at most once a second)");
                }
            }
        }
        // Unsettled deliveries go back to the engine (a persistent session gets them again,
        // under the same packet ids, with those not resent yet), then the engine subscriptions
        // end, before the goodbye: a cursor left while the goodbye waits for a socket that does
        // not drain would hold its topics' records meanwhile.
        let mut unacked: Vec<(String, u16)> = Vec::new();
        let mut awaiting_pubcomp = Vec::new();
        let mut subscriptions = BTreeMap::new();
        // Those not resent in this connection are kept too, within a bound.
        let keep = 4 * usize::from(self.shared.config.max_inflight);
        if let Some(a) = self.active.as_mut() {
            unacked = a
                .outbound
                .unacked(|h| h.as_ref().map(|d| d.message().id().to_string()))
                .into_iter()
                .filter_map(|(k, id)| k.map(|k| (k, id)))
                .collect();
            let room = keep.saturating_sub(unacked.len());
            unacked.extend(a.resend_ids.drain().take(room));
            drop(a.outbound.drain_handles());
            awaiting_pubcomp = a.outbound.awaiting_pubcomp();
            drop(std::mem::take(&mut a.streams));
            subscriptions = std::mem::take(&mut a.subs);
        }
        if self.v5() {
            if let Some(code) = end.disconnect_code() {
                let mut properties = DisconnectProperties::default();
                if matches!(end, End::SlowConsumer) {
                    properties.reason_string = Some(format!(
                        "slow consumer: more than {} bytes waited for the socket",
                        self.shared.config.max_queued_bytes
                    ));
                }
                let d = Disconnect {
                    reason_code: code,
                    properties,
                };
                self.discard_queued();
                self.send(&Packet::Disconnect(d));
            }
        }
        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, async {
            let _ = self.flush().await;
            let _ = self.stream.shutdown().await;
        })
        .await;
        if end.publishes_will() {
            if let Some(will) = self.will.take() {
                let delay = will
                    .properties
                    .will_delay_interval
                    .map(|s| Duration::from_secs(u64::from(s)))
                    .unwrap_or_default()
                    .min(self.neg.session_expiry.unwrap_or_default());
                publish_will(&self.shared, *will, client.clone(), delay).await;
            }
        }
        let stored = StoredSession {
            subscriptions,
            inbound_qos2: self.inbound_qos2_ids(),
            awaiting_pubcomp,
            unacked,
            expiry: self.neg.session_expiry.unwrap_or_default(),
        };
        if self.neg.session_expiry.is_some() {
            self.shared
                .sessions
                .disconnect(&client, self.conn_id(), Some(stored));
        } else {
            session::delete_groups(&self.shared.broker, &stored);
            self.shared
                .sessions
                .disconnect(&client, self.conn_id(), None);
        }
    }

    fn conn_id(&self) -> u64 {
        self.conn
    }
}

/// How many queued frames one vectored write takes at most.
const WRITE_SLICES: usize = 64;

/// Payloads at least this big are written from the message's buffer (shared with the engine's
/// record) rather than copied into the write buffer.
const SHARED_PAYLOAD: usize = 4096;

/// One run of encoded packets waiting for the socket: `head`, then the payload of the PUBLISH
/// it ends with when that payload is shared rather than copied.
struct Frame {
    head: Bytes,
    payload: Bytes,
    /// A QoS 0 PUBLISH alone, which the `drop_oldest` policy may drop.
    droppable: bool,
}

impl Frame {
    fn len(&self) -> usize {
        self.head.len() + self.payload.len()
    }
}

/// Appends the encoding of PUBLISH `packet`, whose payload (`payload_len` bytes) was taken out
/// of it and follows separately: the remaining length counts it.
fn encode_head(
    packet: &Packet,
    version: ProtocolVersion,
    payload_len: usize,
    out: &mut BytesMut,
) -> Result<(), ferry_mqtt::EncodeError> {
    let mut head = BytesMut::new();
    encode(packet, version, &mut head)?;
    // The first byte, the remaining length (a variable byte integer), the rest.
    let (mut len, mut mult, mut at) = (0usize, 1usize, 1usize);
    while let Some(&b) = head.get(at) {
        at += 1;
        len += usize::from(b & 0x7f) * mult;
        mult = mult.saturating_mul(128);
        if b & 0x80 == 0 {
            break;
        }
    }
    let (Some(&first), Some(rest)) = (head.first(), head.get(at..)) else {
        return Ok(());
    };
    out.reserve(head.len() + 4);
    out.extend_from_slice(&[first]);
    let mut n = len + payload_len;
    loop {
        let b = (n % 128) as u8;
        n /= 128;
        out.extend_from_slice(&[if n > 0 { b | 0x80 } else { b }]);
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(rest);
    Ok(())
}

/// What waits for a connection's socket, oldest first.
#[derive(Default)]
struct Outgoing {
    /// Packets encoded since they were last handed to `frames` (taken whole then).
    buf: BytesMut,
    frames: VecDeque<Frame>,
    /// Bytes in `frames`.
    bytes: usize,
    /// Whether the first frame is partly written (it can be neither dropped nor cut).
    started: bool,
}

impl Outgoing {
    /// Hands what was encoded since the last call to `frames`, as one frame.
    fn seal(&mut self, droppable: bool) {
        if !self.buf.is_empty() {
            let head = std::mem::take(&mut self.buf).freeze();
            self.push(head, Bytes::new(), droppable);
        }
    }

    fn push(&mut self, head: Bytes, payload: Bytes, droppable: bool) {
        let frame = Frame {
            head,
            payload,
            droppable,
        };
        self.bytes += frame.len();
        self.frames.push_back(frame);
    }

    /// Takes `n` written bytes off the front.
    fn advance(&mut self, mut n: usize) {
        self.bytes = self.bytes.saturating_sub(n);
        while n > 0 {
            let Some(front) = self.frames.front_mut() else {
                break;
            };
            if n >= front.len() {
                n -= front.len();
                self.frames.pop_front();
                self.started = false;
            } else {
                let from_head = n.min(front.head.len());
                bytes::Buf::advance(&mut front.head, from_head);
                bytes::Buf::advance(&mut front.payload, n - from_head);
                self.started = true;
                n = 0;
            }
        }
    }

    /// Drops the oldest droppable frames until at most `keep` bytes wait; returns how many.
    fn drop_oldest(&mut self, keep: usize) -> u64 {
        let mut dropped = 0;
        let mut i = usize::from(self.started);
        while self.bytes > keep && i < self.frames.len() {
            if self.frames[i].droppable {
                if let Some(f) = self.frames.remove(i) {
                    self.bytes -= f.len();
                    dropped += 1;
                }
            } else {
                i += 1;
            }
        }
        dropped
    }

    /// Drops every frame but a partly written first one.
    fn discard(&mut self) {
        let keep = usize::from(self.started).min(self.frames.len());
        self.frames.truncate(keep);
        self.bytes = self.frames.iter().map(Frame::len).sum();
    }
}

/// At most one slow-consumer log line a second, process-wide (the counters count every case):
/// when it is time for one, the caller logs.
fn slow_log_allowed() -> bool {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = crate::unix_time::unix_ms(std::time::SystemTime::now());
    let last = LAST.load(Ordering::Relaxed);
    now >= last.saturating_add(1000)
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// Acknowledges an engine delivery (if any).
fn settle(handle: Handle) {
    if let Some(d) = handle {
        let _ = d.ack();
    }
}

/// The engine filter of an MQTT topic filter (wildcards: an MQTT filter; otherwise exact).
fn engine_filter(filter: &str) -> Result<TopicFilter, ferry::TopicError> {
    if filter.contains(['+', '#']) {
        TopicFilter::mqtt(filter)
    } else {
        TopicFilter::exact(filter)
    }
}

/// Publishes an inbound message (and stores it as retained when asked).
async fn publish(
    shared: &MqttShared,
    topic: &str,
    message: Message,
    retain: bool,
) -> Result<(), PublishError> {
    // Retained only once published (or taken by the backend): a refused publish leaves the
    // retained set as it was.
    let retained = retain.then(|| message.clone());
    match &shared.bridge {
        Some(bridge) => bridge.publish(topic, &message).await?,
        None => {
            shared.broker.publish(topic, message).await?;
        }
    }
    if let Some(message) = retained {
        shared.retained.set(topic, message);
        if shared.bridge.is_none() {
            return retained_saved(shared, topic).await;
        }
    }
    Ok(())
}

/// Waits until the retained set holding a message just published to `topic` is saved. A
/// failed save is reported as in doubt: the message was published, but whether it stays the
/// retained one across a restart is not known.
async fn retained_saved(shared: &MqttShared, topic: &str) -> Result<(), PublishError> {
    shared
        .try_persist()
        .await
        .map_err(|e| PublishError::InDoubt {
            topic: topic.to_string(),
            reason: format!("published, but saving it as the retained message failed: {e}"),
        })
}

/// How many records a member of a shared subscription takes from its group at a time.
const SHARE_BATCH: usize = 16;

/// How many topics' publishers a connection keeps.
const PUBLISHERS: usize = 64;

/// The bytes of a PUBACK/PUBREC besides its reason string: fixed header (up to 5), packet id,
/// reason code, property length (up to 4), the property's id and string length.
const ACK_OVERHEAD: usize = 5 + 2 + 1 + 4 + 1 + 2;

/// The longest reason string sent on an acknowledgement (bytes).
const MAX_REASON: usize = 512;

/// The PUBACK/PUBREC reason string of a failed publish: what failed, cut to [`MAX_REASON`]
/// bytes at a character boundary.
fn publish_error_reason(e: &PublishError) -> String {
    let mut reason = e.to_string();
    if reason.len() > MAX_REASON {
        let mut end = MAX_REASON;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}

/// The PUBACK/PUBREC reason code of a failed publish.
fn publish_error_code(e: &PublishError) -> ReasonCode {
    match e {
        PublishError::InvalidTopic(_) | PublishError::SystemTopic(_) => {
            ReasonCode::TopicNameInvalid
        }
        PublishError::Full { .. }
        | PublishError::BatchTooLarge { .. }
        | PublishError::MemoryLimit { .. }
        | PublishError::TopicLimit { .. }
        | PublishError::Timeout(_) => ReasonCode::QuotaExceeded,
        PublishError::Closed | PublishError::Storage(_) => ReasonCode::ImplementationSpecificError,
        // May have been stored: the reason string starts with "in doubt".
        PublishError::InDoubt { .. } => ReasonCode::UnspecifiedError,
    }
}

/// Publishes a will, now or after `delay` (cancelled if the client reconnects first).
async fn publish_will(shared: &Arc<MqttShared>, will: Will, client: String, delay: Duration) {
    if delay.is_zero() {
        publish_will_now(shared, &will, &client).await;
        return;
    }
    let shared2 = shared.clone();
    let client2 = client.clone();
    let task = shared.tracker.spawn(async move {
        tokio::select! {
            _ = shared2.shutdown.cancelled() => {}
            _ = tokio::time::sleep(delay) => {
                shared2.sessions.will_published(&client2);
                publish_will_now(&shared2, &will, &client2).await;
            }
        }
    });
    shared
        .sessions
        .add_delayed_will(&client, task.abort_handle());
}

async fn publish_will_now(shared: &MqttShared, will: &Will, client: &str) {
    let message = Inbound::from_will(will, client).to_message(will.payload.clone());
    match publish(shared, &will.topic, message, will.retain).await {
        Ok(()) => {
            shared
                .metrics
                .wills_published
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(client, topic = will.topic, "will published");
        }
        Err(e) => {
            tracing::warn!(client, topic = will.topic, error = %e, "will could not be published")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns (a future's, without making one).
    fn returned_size<A, R>(_: fn(A) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// What every idle connection holds: its task's future, its state and its control block.
    /// These bounds keep `ferry-bench mqtt --scenarios idle` where it is; a change that grows
    /// one should move what it adds to [`Active`] or behind a pointer instead.
    #[test]
    fn an_idle_connection_stays_small() {
        let future = returned_size(run::<tokio::net::TcpStream>);
        assert!(future <= 72, "connection task future: {future} bytes");
        let conn = std::mem::size_of::<Conn<tokio::net::TcpStream>>();
        assert!(conn <= 256, "connection state: {conn} bytes");
        let control = std::mem::size_of::<session::Control>();
        assert!(control <= 48, "control block: {control} bytes");
    }
}
