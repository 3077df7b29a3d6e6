//! The load generator of the throughput scenarios: a lean MQTT 3.1.1 client of its own, on a
//! raw `tokio::net::TcpStream` and the workspace's sans-io codec ([`ferry_mqtt`]), one task per
//! connection on a multi-threaded Tokio runtime. Both brokers face the same client.
//!
//! * A publisher encodes its PUBLISH once with the codec and copies it into its write buffer for
//!   every message, patching the payload header and (QoS 1) the packet id in place. It writes as
//!   many messages at once as its window, the QoS 1 in-flight limit ([`IN_FLIGHT`]: 100
//!   unacknowledged PUBLISHes, as the rumqttc clients used before had) and a 64 KiB chunk allow:
//!   one `write` system call carries many PUBLISHes. At QoS 1 it reads the PUBACKs that arrived
//!   (without blocking) before each chunk, checking each against the packet ids in flight, and
//!   waits for them when the in-flight limit is reached.
//! * A subscriber reads up to 128 KiB at a time, decodes every complete packet in its buffer
//!   with the codec (a PUBLISH's payload is a zero-copy slice of the buffer; its topic is the
//!   one small allocation per message), and at QoS 1 answers all the PUBLISHes of one read with
//!   one write of their PUBACKs.
//! * Every connection sets `TCP_NODELAY`, connects with a clean session and a 600 s keep-alive
//!   (no PINGREQ is needed: a run is far shorter than the 900 s after which a broker may drop a
//!   silent client), and performs CONNECT/CONNACK (and SUBSCRIBE/SUBACK) within 10 s or fails.
//!
//! Every payload carries, in its first 21 bytes, the send time (nanoseconds since the run's base
//! `Instant`, plus 1; read once per chunk, just before it is written), the publisher's index,
//! its sequence number and the phase (warm-up or measured). Subscribers count measured
//! deliveries per publisher in bitsets, so that loss and duplicates are exact, and record every
//! measured delivery's latency (to the end of the read that brought it).
//!
//! A run: subscribers connect and subscribe, publishers connect; a warm-up phase publishes for
//! `warmup` and waits until its deliveries stop; the measured phase publishes for `duration`,
//! then waits until every expected delivery arrived (or, when messages were lost, until
//! deliveries stop). Throughput is measured deliveries / (last measured delivery - start of the
//! measured phase). Publishers publish as fast as the connection lets them, but keep at most
//! `window` of their messages undelivered (deliveries counted across subscribers), so that a
//! broker without backpressure at QoS 0 cannot queue without bound. A publisher whose window is
//! full waits until half of it is free again (the subscriber whose read gets it there wakes
//! it), so that it writes in chunks of at least half a window, never one message per wake-up.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use ferry_mqtt::bytes::{Bytes, BytesMut};
use ferry_mqtt::{
    decode, encode, Connect, Packet, ProtocolVersion, PubAck, Publish, QoS, Subscribe,
    SubscribeProperties, Subscription,
};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

use super::brokers::BrokerProcess;
use crate::measure::{join_all, new_histogram, process_cpu_time, Outcome};

/// Bytes of the header every payload starts with.
const HEADER: usize = 21;
/// Phase byte of warm-up messages.
const WARMUP: u8 = 0;
/// Phase byte of measured messages.
const MEASURED: u8 = 1;
/// How long deliveries may stop before the drain gives up (messages lost).
const STALL: Duration = Duration::from_secs(2);
/// The longest a drain may last.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);
/// A publisher whose window is full and sees no delivery for this long counts its undelivered
/// messages as lost and goes on (QoS 0 may lose messages).
const WINDOW_STALL: Duration = Duration::from_millis(200);
/// The protocol every client speaks.
const VERSION: ProtocolVersion = ProtocolVersion::V311;
/// The largest packet the clients accept.
const MAX_PACKET: usize = 1 << 20;
/// Keep-alive of every client, seconds.
const KEEP_ALIVE: u16 = 600;
/// The longest a connection, CONNACK or SUBACK may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A publisher writes at most about this many bytes at once.
const WRITE_CHUNK: usize = 64 * 1024;
/// A read asks for up to this many bytes.
const READ_CHUNK: usize = 128 * 1024;
/// Most unacknowledged QoS 1 PUBLISHes per publisher.
const IN_FLIGHT: usize = 100;
/// A blocked publisher looks at its window and the clock at least this often.
const WAIT_TICK: Duration = Duration::from_millis(5);

/// The shape of a throughput scenario.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Publishing connections.
    pub publishers: usize,
    /// Subscribing connections.
    pub subscribers: usize,
    /// Deliveries each message makes (the subscriber count for fan-out, else 1).
    pub fanout: usize,
    /// Whether the subscribers share one subscription (`$share/bench/...`).
    pub shared: bool,
    /// Whether each publisher has a topic of its own (the subscriber uses a `+` wildcard).
    pub topic_per_publisher: bool,
    /// Topic prefix.
    pub topic: &'static str,
}

impl Shape {
    fn publish_topic(&self, publisher: usize) -> String {
        if self.topic_per_publisher {
            format!("{}/{publisher}", self.topic)
        } else {
            self.topic.to_string()
        }
    }

    fn filter(&self) -> String {
        let f = if self.topic_per_publisher {
            format!("{}/+", self.topic)
        } else {
            self.topic.to_string()
        };
        if self.shared {
            format!("$share/bench/{f}")
        } else {
            f
        }
    }
}

/// Settings of one throughput run.
#[derive(Debug, Clone, Copy)]
pub struct LoadSpec {
    /// The scenario's shape.
    pub shape: Shape,
    /// QoS of publishes and subscriptions (0 or 1).
    pub qos: QoS,
    /// Payload size in bytes (at least [`HEADER`]).
    pub payload: usize,
    /// Unmeasured warm-up.
    pub warmup: Duration,
    /// Measured publishing time.
    pub duration: Duration,
    /// Most undelivered messages per publisher (0: no limit).
    pub window: u64,
}

/// The result of one throughput run.
#[derive(Debug)]
pub struct LoadResult {
    /// Deliveries, wall time, latency and broker CPU time.
    pub outcome: Outcome,
    /// Messages published in the measured phase.
    pub published: u64,
    /// Deliveries expected in the measured phase.
    pub expected: u64,
    /// Broker RSS at the end of the measured phase, bytes.
    pub rss: u64,
    /// Broker peak RSS (`VmHWM`), bytes.
    pub peak_rss: u64,
    /// Broker RSS once every client was connected, before any message, bytes.
    pub idle_rss: u64,
    /// CPU time of the load generator (this process) over the measured phase and its drain.
    pub generator_cpu: Option<Duration>,
}

/// The clock and progress counters shared by the clients of a run.
struct Shared {
    base: Instant,
    /// Per publisher: its messages delivered so far (all phases, all subscribers).
    delivered: Vec<AtomicU64>,
    /// Deliveries of warm-up messages.
    warm: AtomicU64,
    /// Deliveries of measured messages.
    measured: AtomicU64,
    /// Nanoseconds since `base` of the latest measured delivery.
    last_ns: AtomicU64,
    /// Per publisher: how it waits for its window to empty.
    waiters: Vec<Waiter>,
}

/// A publisher waiting for its window: it sets `wake_at`, the delivery count it waits for,
/// and the subscriber whose deliveries reach it notifies it.
struct Waiter {
    /// `delivered` of the publisher at which to wake it; `u64::MAX` when it does not wait.
    wake_at: AtomicU64,
    notify: Notify,
}

impl Default for Waiter {
    fn default() -> Self {
        Waiter {
            wake_at: AtomicU64::new(u64::MAX),
            notify: Notify::new(),
        }
    }
}

impl Shared {
    fn nanos(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Sequence numbers seen, per publisher: a growable bitset.
#[derive(Debug, Default, Clone)]
struct Bits {
    words: Vec<u64>,
    ones: u64,
}

impl Bits {
    /// Sets `seq`; false if it was set already.
    fn set(&mut self, seq: u64) -> bool {
        let i = usize::try_from(seq / 64).unwrap_or(usize::MAX);
        if i >= self.words.len() {
            self.words.resize(i + 1, 0);
        }
        let bit = 1u64 << (seq % 64);
        match self.words.get_mut(i) {
            Some(w) if *w & bit == 0 => {
                *w |= bit;
                self.ones += 1;
                true
            }
            _ => false,
        }
    }

    fn union(&mut self, other: &Bits) {
        if other.words.len() > self.words.len() {
            self.words.resize(other.words.len(), 0);
        }
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
        self.ones = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
    }
}

/// What one subscriber saw of the measured phase.
struct SubTally {
    delivered: u64,
    seen: Vec<Bits>,
    hist: Histogram<u64>,
}

/// Sequence numbers at or above this are taken for corrupt payloads (a run publishes far fewer
/// messages; the bitsets must not grow without bound).
const MAX_SEQ: u64 = 1 << 36;

/// One client connection: the stream and the bytes read but not decoded yet.
pub(super) struct Conn {
    stream: TcpStream,
    rbuf: BytesMut,
    /// The client id, for errors.
    name: String,
}

impl Conn {
    /// Connects to `addr` as `client_id` (clean session) and waits for a successful CONNACK.
    pub(super) async fn open(addr: SocketAddr, client_id: String) -> Result<Self> {
        let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                anyhow!("{client_id}: no TCP connection to {addr} within {HANDSHAKE_TIMEOUT:?}")
            })?
            .with_context(|| format!("{client_id}: connecting to {addr}"))?;
        stream
            .set_nodelay(true)
            .with_context(|| format!("{client_id}: setting TCP_NODELAY"))?;
        let mut conn = Conn {
            stream,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            name: client_id,
        };
        let mut connect = Connect::new(VERSION, conn.name.clone());
        connect.keep_alive = KEEP_ALIVE;
        conn.send(&connect.into()).await?;
        match conn.expect("CONNACK").await? {
            Packet::ConnAck(ack) if !ack.reason_code.is_error() => Ok(conn),
            Packet::ConnAck(ack) => bail!("{}: CONNACK refused: {}", conn.name, ack.reason_code),
            other => bail!(
                "{}: expected a CONNACK, got a {}",
                conn.name,
                other.packet_type()
            ),
        }
    }

    /// The connection alone (for a client that reads nothing more), without its read buffer.
    pub(super) fn into_stream(self) -> TcpStream {
        self.stream
    }

    /// Subscribes to `filter` at `qos` and waits for a SUBACK granting it.
    async fn subscribe(&mut self, filter: String, qos: QoS) -> Result<()> {
        let subscribe = Subscribe {
            packet_id: 1,
            subscriptions: vec![Subscription::new(filter.clone(), qos)],
            properties: SubscribeProperties::default(),
        };
        self.send(&subscribe.into()).await?;
        match self.expect("SUBACK").await? {
            Packet::SubAck(ack) if ack.packet_id == 1 => match ack.reason_codes.as_slice() {
                [code] if !code.is_error() => Ok(()),
                codes => bail!("{}: SUBACK to {filter:?} refused: {codes:?}", self.name),
            },
            other => bail!(
                "{}: expected the SUBACK to {filter:?}, got a {}",
                self.name,
                other.packet_type()
            ),
        }
    }

    /// Encodes `packet` and writes it.
    async fn send(&mut self, packet: &Packet) -> Result<()> {
        let mut out = BytesMut::new();
        encode(packet, VERSION, &mut out)
            .with_context(|| format!("{}: encoding a {}", self.name, packet.packet_type()))?;
        self.stream
            .write_all(&out)
            .await
            .with_context(|| format!("{}: writing a {}", self.name, packet.packet_type()))
    }

    /// The next packet from the broker, within [`HANDSHAKE_TIMEOUT`].
    async fn expect(&mut self, what: &str) -> Result<Packet> {
        let next = async {
            loop {
                if let Some(p) = self.decode_one()? {
                    return Ok(p);
                }
                self.fill().await?;
            }
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, next)
            .await
            .map_err(|_| anyhow!("{}: no {what} within {HANDSHAKE_TIMEOUT:?}", self.name))?
    }

    /// The first complete packet of the read buffer, if any.
    fn decode_one(&mut self) -> Result<Option<Packet>> {
        decode(&mut self.rbuf, VERSION, MAX_PACKET)
            .with_context(|| format!("{}: invalid packet from the broker", self.name))
    }

    /// Reads what the socket has (waiting for something); fails at the end of the stream.
    async fn fill(&mut self) -> Result<()> {
        self.make_room();
        let n = self
            .stream
            .read_buf(&mut self.rbuf)
            .await
            .with_context(|| format!("{}: reading", self.name))?;
        if n == 0 {
            bail!("{}: the broker closed the connection", self.name);
        }
        Ok(())
    }

    /// Reads what the socket has without waiting; false if it had nothing.
    fn try_fill(&mut self) -> Result<bool> {
        let mut any = false;
        loop {
            self.make_room();
            match self.stream.try_read_buf(&mut self.rbuf) {
                Ok(0) => bail!("{}: the broker closed the connection", self.name),
                Ok(_) => any = true,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(any),
                Err(e) => return Err(e).with_context(|| format!("{}: reading", self.name)),
            }
        }
    }

    /// Room for a whole read chunk (reclaiming the space of decoded packets when it can).
    fn make_room(&mut self) {
        if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 2 {
            self.rbuf.reserve(READ_CHUNK);
        }
    }
}

/// Reads deliveries until `stop`: counts them, records their latency and, at QoS 1, answers
/// each read's PUBLISHes with one write of their PUBACKs.
async fn subscriber(
    mut conn: Conn,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Result<SubTally> {
    let publishers = shared.delivered.len();
    let mut tally = SubTally {
        delivered: 0,
        seen: vec![Bits::default(); publishers],
        hist: new_histogram()?,
    };
    // Deliveries of this read, per publisher: added to the shared counters once per read.
    let mut counts = vec![0u64; publishers];
    let mut acks = BytesMut::with_capacity(4096);
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => return Ok(tally),
            r = conn.fill() => r?,
        }
        let now = shared.nanos();
        let (mut warm, mut measured) = (0u64, 0u64);
        while let Some(packet) = conn.decode_one()? {
            let p = match packet {
                Packet::Publish(p) => p,
                Packet::PingResp => continue,
                other => bail!(
                    "{}: unexpected {} from the broker",
                    conn.name,
                    other.packet_type()
                ),
            };
            if let Some(id) = p.packet_id {
                encode(&PubAck::new(id).into(), VERSION, &mut acks)
                    .with_context(|| format!("{}: encoding a PUBACK", conn.name))?;
            }
            let h = p
                .payload
                .get(..HEADER)
                .with_context(|| format!("{}: payload shorter than its header", conn.name))?;
            let stamp = u64::from_le_bytes(h[0..8].try_into()?);
            let publisher = u32::from_le_bytes(h[8..12].try_into()?) as usize;
            let seq = u64::from_le_bytes(h[12..20].try_into()?);
            let count = counts.get_mut(publisher).with_context(|| {
                format!("{}: payload of unknown publisher {publisher}", conn.name)
            })?;
            *count += 1;
            if h[20] == MEASURED {
                if seq >= MAX_SEQ {
                    bail!("{}: payload with sequence number {seq}", conn.name);
                }
                measured += 1;
                if let Some(bits) = tally.seen.get_mut(publisher) {
                    bits.set(seq);
                }
                tally
                    .hist
                    .saturating_record(now.saturating_sub(stamp.saturating_sub(1)).max(1));
            } else {
                warm += 1;
            }
        }
        if measured + warm > 0 {
            for ((d, w), c) in shared
                .delivered
                .iter()
                .zip(&shared.waiters)
                .zip(&mut counts)
            {
                if *c > 0 {
                    // SeqCst with the publisher's store of `wake_at` and load of `delivered`:
                    // one of the two sides sees the other's write.
                    let n = std::mem::take(c);
                    let total = d.fetch_add(n, Ordering::SeqCst) + n;
                    if total >= w.wake_at.load(Ordering::SeqCst) {
                        w.wake_at.store(u64::MAX, Ordering::SeqCst);
                        w.notify.notify_one();
                    }
                }
            }
            if measured > 0 {
                tally.delivered += measured;
                shared.measured.fetch_add(measured, Ordering::Relaxed);
                shared.last_ns.fetch_max(now, Ordering::Relaxed);
            }
            if warm > 0 {
                shared.warm.fetch_add(warm, Ordering::Relaxed);
            }
        }
        if !acks.is_empty() {
            conn.stream
                .write_all(&acks)
                .await
                .with_context(|| format!("{}: writing PUBACKs", conn.name))?;
            acks.clear();
        }
    }
}

/// A publisher between phases: its connection, its encoded PUBLISH, and its counts.
struct PubState {
    id: usize,
    conn: Conn,
    /// The PUBLISH every message is a copy of (payload header and packet id patched in).
    packet: Vec<u8>,
    /// Where the payload starts in `packet`.
    payload_at: usize,
    /// Where the packet id is in `packet` (QoS 1).
    packet_id_at: Option<usize>,
    /// The chunk being written.
    wbuf: BytesMut,
    /// Messages sent so far (all phases).
    sent: u64,
    /// Messages given up on (their window stalled).
    written_off: u64,
    /// The next sequence number.
    seq: u64,
    /// QoS 1: which packet ids await their PUBACK.
    unacked: Vec<bool>,
    /// QoS 1: how many.
    in_flight: usize,
    /// QoS 1: the packet id to try next.
    next_id: u16,
}

/// The encoding of a PUBLISH of `payload` bytes on `topic` at `qos` (packet id 1 at QoS 1),
/// where its payload starts and where its packet id is.
fn publish_template(
    topic: &str,
    qos: QoS,
    payload: usize,
) -> Result<(Vec<u8>, usize, Option<usize>)> {
    let mut body = vec![0u8; payload.max(HEADER)];
    for (i, b) in body.iter_mut().enumerate().skip(HEADER) {
        *b = b'a' + (i % 26) as u8;
    }
    let len = body.len();
    let mut publish = Publish::new(topic, Bytes::from(body));
    publish.qos = qos;
    publish.packet_id = (qos != QoS::AtMostOnce).then_some(1);
    let mut out = BytesMut::new();
    encode(&publish.into(), VERSION, &mut out).context("encoding a PUBLISH")?;
    let payload_at = out.len() - len;
    let packet_id_at = (qos != QoS::AtMostOnce).then(|| payload_at - 2);
    Ok((out.to_vec(), payload_at, packet_id_at))
}

impl PubState {
    async fn connect(
        broker: SocketAddr,
        id: usize,
        name: String,
        topic: &str,
        spec: &LoadSpec,
    ) -> Result<Self> {
        let (packet, payload_at, packet_id_at) = publish_template(topic, spec.qos, spec.payload)?;
        let conn = Conn::open(broker, name).await?;
        Ok(PubState {
            id,
            conn,
            packet,
            payload_at,
            packet_id_at,
            wbuf: BytesMut::with_capacity(WRITE_CHUNK * 2),
            sent: 0,
            written_off: 0,
            seq: 0,
            unacked: vec![false; usize::from(u16::MAX) + 1],
            in_flight: 0,
            next_id: 1,
        })
    }

    /// QoS 1: takes the PUBACKs that arrived, without waiting.
    fn take_acks(&mut self) -> Result<()> {
        if !self.conn.try_fill()? {
            return Ok(());
        }
        while let Some(packet) = self.conn.decode_one()? {
            match packet {
                Packet::PubAck(ack) => {
                    match self.unacked.get_mut(usize::from(ack.packet_id)) {
                        Some(u) if *u => *u = false,
                        _ => bail!(
                            "{}: PUBACK for packet id {} that awaits none",
                            self.conn.name,
                            ack.packet_id
                        ),
                    }
                    self.in_flight -= 1;
                }
                Packet::PingResp => {}
                other => bail!(
                    "{}: unexpected {} from the broker",
                    self.conn.name,
                    other.packet_type()
                ),
            }
        }
        Ok(())
    }

    /// QoS 1: a free packet id, marked in flight (the caller checked `in_flight < IN_FLIGHT`).
    fn take_id(&mut self) -> u16 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            if let Some(u) = self.unacked.get_mut(usize::from(id)) {
                if !*u {
                    *u = true;
                    self.in_flight += 1;
                    return id;
                }
            }
        }
    }

    /// Writes `n` messages of `phase` in one chunk.
    async fn write_chunk(&mut self, n: u64, phase: u8, stamp: u64) -> Result<()> {
        let id = u32::try_from(self.id)?.to_le_bytes();
        let stamp = stamp.to_le_bytes();
        for _ in 0..n {
            let at = self.wbuf.len();
            self.wbuf.extend_from_slice(&self.packet);
            let packet_id = self.packet_id_at.map(|o| (o, self.take_id()));
            let msg = &mut self.wbuf[at..];
            if let Some((o, pid)) = packet_id {
                msg[o..o + 2].copy_from_slice(&pid.to_be_bytes());
            }
            let h = &mut msg[self.payload_at..self.payload_at + HEADER];
            h[0..8].copy_from_slice(&stamp);
            h[8..12].copy_from_slice(&id);
            h[12..20].copy_from_slice(&self.seq.to_le_bytes());
            h[20] = phase;
            self.seq += 1;
            self.sent += 1;
        }
        self.conn
            .stream
            .write_all(&self.wbuf)
            .await
            .with_context(|| format!("{}: writing PUBLISHes", self.conn.name))?;
        self.wbuf.clear();
        Ok(())
    }
}

/// Publishes `phase` messages until `until`; returns how many.
///
/// A publisher writes whenever its window has room, as much as it has (up to a chunk); once the
/// window is full, it waits until half of it is free again, so that it writes in chunks of at
/// least half a window rather than one message per wake-up.
async fn publish_phase(
    mut p: PubState,
    spec: LoadSpec,
    shared: Arc<Shared>,
    phase: u8,
    until: Instant,
) -> Result<(PubState, u64)> {
    let fanout = spec.shape.fanout as u64;
    let limit = spec.window.saturating_mul(fanout);
    // Outstanding deliveries at which a publisher with a full window resumes.
    let resume = limit / 2;
    let qos1 = p.packet_id_at.is_some();
    let per_chunk = (WRITE_CHUNK / p.packet.len()).max(1) as u64;
    let waiter = &shared.waiters[p.id];
    let delivered = &shared.delivered[p.id];
    let mut count = 0;
    let mut stalled: Option<(u64, Instant)> = None;
    loop {
        if qos1 {
            p.take_acks()?;
        }
        let now = Instant::now();
        if now >= until {
            break;
        }
        let mut n = per_chunk;
        if qos1 {
            n = n.min((IN_FLIGHT - p.in_flight) as u64);
        }
        let mut window_full = false;
        if limit > 0 {
            let d = delivered.load(Ordering::SeqCst);
            let outstanding = (p.sent * fanout).saturating_sub(d + p.written_off);
            if outstanding >= limit {
                window_full = true;
                n = 0;
                match stalled {
                    Some((seen, since)) if seen == d => {
                        if now.duration_since(since) >= WINDOW_STALL {
                            p.written_off += outstanding;
                            stalled = None;
                            continue;
                        }
                    }
                    _ => stalled = Some((d, now)),
                }
                // Ask to be woken once `resume` are outstanding, then look again (a delivery
                // counted in between would not wake it).
                let wake_at = d + (outstanding - resume);
                waiter.wake_at.store(wake_at, Ordering::SeqCst);
                if delivered.load(Ordering::SeqCst) >= wake_at {
                    waiter.wake_at.store(u64::MAX, Ordering::SeqCst);
                    continue;
                }
            } else {
                stalled = None;
                n = n.min((limit - outstanding).div_ceil(fanout));
            }
        }
        if n > 0 {
            let stamp = shared.nanos().saturating_add(1);
            p.write_chunk(n, phase, stamp).await?;
            count += n;
            continue;
        }
        // Blocked: on the window (the subscribers wake it), on the in-flight limit (PUBACKs
        // wake it), or both; the tick bounds the wait, for the stall check and the end of the
        // phase.
        let in_flight_full = qos1 && p.in_flight >= IN_FLIGHT;
        let wait = tokio::time::sleep(WAIT_TICK.min(until.saturating_duration_since(now)));
        tokio::select! {
            _ = waiter.notify.notified(), if window_full => {}
            r = p.conn.stream.readable(), if in_flight_full => {
                r.with_context(|| format!("{}: waiting for PUBACKs", p.conn.name))?;
            }
            _ = wait => {}
        }
        waiter.wake_at.store(u64::MAX, Ordering::SeqCst);
    }
    Ok((p, count))
}

/// Runs every publisher through one phase; returns the messages each published.
async fn phase(
    pubs: Vec<PubState>,
    spec: LoadSpec,
    shared: &Arc<Shared>,
    phase_byte: u8,
    until: Instant,
) -> Result<(Vec<PubState>, Vec<u64>)> {
    let handles = pubs
        .into_iter()
        .map(|p| tokio::spawn(publish_phase(p, spec, shared.clone(), phase_byte, until)))
        .collect();
    let done = join_all(handles).await?;
    Ok(done.into_iter().unzip())
}

/// Waits until `counter` reaches `expected`, or stops moving for `stall`, or `limit` passed.
async fn drain(counter: &AtomicU64, expected: u64, stall: Duration, limit: Duration) {
    let start = Instant::now();
    let mut last = (counter.load(Ordering::Relaxed), Instant::now());
    loop {
        let n = counter.load(Ordering::Relaxed);
        if n >= expected || start.elapsed() >= limit {
            return;
        }
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() >= stall {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One throughput run against `broker`.
pub async fn run(broker: &BrokerProcess, spec: LoadSpec) -> Result<LoadResult> {
    if spec.qos == QoS::ExactlyOnce {
        bail!("the throughput scenarios publish at QoS 0 or 1");
    }
    let shape = spec.shape;
    let shared = Arc::new(Shared {
        base: Instant::now(),
        delivered: (0..shape.publishers).map(|_| AtomicU64::new(0)).collect(),
        warm: AtomicU64::new(0),
        measured: AtomicU64::new(0),
        last_ns: AtomicU64::new(0),
        waiters: (0..shape.publishers).map(|_| Waiter::default()).collect(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let tag = fastrand_tag();

    // Subscribers first, each subscribed (SUBACK received) before the next connects.
    let mut subs = Vec::with_capacity(shape.subscribers);
    for i in 0..shape.subscribers {
        let mut conn = Conn::open(broker.addr, format!("sub-{tag}-{i}")).await?;
        conn.subscribe(shape.filter(), spec.qos).await?;
        subs.push(tokio::spawn(subscriber(
            conn,
            shared.clone(),
            stop_rx.clone(),
        )));
    }
    let mut pubs = Vec::with_capacity(shape.publishers);
    for i in 0..shape.publishers {
        let topic = shape.publish_topic(i);
        pubs.push(
            PubState::connect(broker.addr, i, format!("pub-{tag}-{i}"), &topic, &spec).await?,
        );
    }
    let idle_rss = broker.rss()?;
    let fanout = shape.fanout as u64;

    // Warm-up, then let its deliveries finish.
    if !spec.warmup.is_zero() {
        let until = Instant::now() + spec.warmup;
        let (p, counts) = phase(pubs, spec, &shared, WARMUP, until).await?;
        pubs = p;
        let warm_sent = counts.iter().sum::<u64>();
        drain(
            &shared.warm,
            warm_sent * fanout,
            Duration::from_millis(500),
            DRAIN_LIMIT,
        )
        .await;
    }
    // A publisher's window counts all its messages: forget warm-up messages that never came.
    for p in &mut pubs {
        p.written_off =
            (p.sent * fanout).saturating_sub(shared.delivered[p.id].load(Ordering::Relaxed));
        p.seq = 0;
    }

    // The measured phase.
    let cpu_before = broker.cpu_time();
    let gen_before = process_cpu_time();
    let start_ns = shared.nanos();
    let until = shared.base + Duration::from_nanos(start_ns) + spec.duration;
    let (pubs, counts) = phase(pubs, spec, &shared, MEASURED, until).await?;
    let published: u64 = counts.iter().sum();
    let expected = published * fanout;
    drain(&shared.measured, expected, STALL, DRAIN_LIMIT).await;
    let cpu_after = broker.cpu_time();
    let gen_after = process_cpu_time();
    let rss = broker.rss()?;
    let peak_rss = broker.peak_rss()?;

    let _ = stop_tx.send(true);
    let tallies = join_all(subs).await?;
    drop(pubs);

    let mut hist = new_histogram()?;
    let mut delivered = 0;
    let mut distinct = 0;
    let mut union: Vec<Bits> = vec![Bits::default(); shape.publishers];
    for t in &tallies {
        delivered += t.delivered;
        hist.add(&t.hist)
            .map_err(|e| anyhow!("merging latency histograms: {e:?}"))?;
        for (u, bits) in union.iter_mut().zip(&t.seen) {
            if shape.shared {
                u.union(bits);
            } else {
                distinct += bits.ones;
            }
        }
    }
    if shape.shared {
        distinct = union.iter().map(|b| b.ones).sum();
    }
    if distinct > expected {
        bail!("{distinct} distinct deliveries but only {expected} expected");
    }
    let last_ns = shared.last_ns.load(Ordering::Relaxed);
    let mut outcome = Outcome::without_latency(
        delivered,
        Some(delivered - distinct),
        Duration::from_nanos(last_ns.saturating_sub(start_ns)),
    )?;
    outcome.latency = hist;
    outcome.cpu = cpu_before.zip(cpu_after).map(|(b, a)| a.saturating_sub(b));
    Ok(LoadResult {
        outcome,
        published,
        expected,
        rss,
        peak_rss,
        idle_rss,
        generator_cpu: gen_before.zip(gen_after).map(|(b, a)| a.saturating_sub(b)),
    })
}

/// A short tag that keeps client ids of successive runs apart.
fn fastrand_tag() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::{Path, PathBuf};

    use super::*;
    use crate::mqtt::brokers::{Binaries, Kind};

    #[test]
    fn bits_count_distinct_and_union() {
        let mut a = Bits::default();
        assert!(a.set(0));
        assert!(a.set(130));
        assert!(!a.set(130));
        let mut b = Bits::default();
        b.set(130);
        b.set(7);
        a.union(&b);
        assert_eq!(a.ones, 3);
    }

    #[test]
    fn shapes_name_their_topics() {
        let s = Shape {
            publishers: 2,
            subscribers: 2,
            fanout: 1,
            shared: true,
            topic_per_publisher: true,
            topic: "t",
        };
        assert_eq!(s.publish_topic(1), "t/1");
        assert_eq!(s.filter(), "$share/bench/t/+");
    }

    /// The patched copies of the encoded PUBLISH decode, with the codec, to the PUBLISHes
    /// they stand for: topic, QoS, packet id and payload header where the subscriber reads them.
    #[test]
    fn patched_publishes_decode_as_sent() {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
            let (packet, payload_at, packet_id_at) =
                publish_template("bench/t/3", qos, 100).unwrap();
            let mut wire = BytesMut::new();
            let mut ids = Vec::new();
            for seq in 0..3u64 {
                let at = wire.len();
                wire.extend_from_slice(&packet);
                let msg = &mut wire[at..];
                if let Some(o) = packet_id_at {
                    let id = 7 + seq as u16;
                    msg[o..o + 2].copy_from_slice(&id.to_be_bytes());
                    ids.push(Some(id));
                } else {
                    ids.push(None);
                }
                let h = &mut msg[payload_at..payload_at + HEADER];
                h[0..8].copy_from_slice(&(1000 + seq).to_le_bytes());
                h[8..12].copy_from_slice(&3u32.to_le_bytes());
                h[12..20].copy_from_slice(&seq.to_le_bytes());
                h[20] = MEASURED;
            }
            for (seq, id) in ids.into_iter().enumerate() {
                let Some(Packet::Publish(p)) = decode(&mut wire, VERSION, MAX_PACKET).unwrap()
                else {
                    panic!("not a PUBLISH");
                };
                assert_eq!(p.topic, "bench/t/3");
                assert_eq!(p.qos, qos);
                assert_eq!(p.packet_id, id);
                assert_eq!(p.payload.len(), 100);
                assert_eq!(p.payload[0..8], (1000 + seq as u64).to_le_bytes());
                assert_eq!(p.payload[8..12], 3u32.to_le_bytes());
                assert_eq!(p.payload[12..20], (seq as u64).to_le_bytes());
                assert_eq!(p.payload[20], MEASURED);
                assert_eq!(p.payload[99], b'a' + 99 % 26);
            }
            assert!(wire.is_empty());
        }
    }

    fn services_required() -> bool {
        std::env::var("FERRY_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
    }

    /// Skips (returns false, saying why) unless `FERRY_REQUIRE_SERVICES=1`, where it fails.
    fn available(what: &str, path: Option<&Path>) -> bool {
        if path.is_some_and(Path::is_file) {
            return true;
        }
        if services_required() {
            panic!("{what} is required (FERRY_REQUIRE_SERVICES=1) but not found");
        }
        eprintln!("skipped: {what} not found (set FERRY_REQUIRE_SERVICES=1 to fail instead)");
        false
    }

    /// The `ferry` binary: `FERRY_BIN`, else `ferry` in this test's profile directory
    /// (`target/debug`), else in `target/release` (`cargo build [--release] -p ferry-server`).
    fn ferry_binary() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("FERRY_BIN") {
            return Some(PathBuf::from(p));
        }
        let exe = std::env::current_exe().ok()?;
        let profile_dir = exe.parent()?.parent()?;
        let candidates = [
            profile_dir.join("ferry"),
            profile_dir.parent()?.join("release").join("ferry"),
        ];
        candidates.into_iter().find(|p| p.is_file())
    }

    /// Tiny runs of every shape at QoS 0 and 1 against `kind`: every message arrives exactly
    /// once (QoS 0 over loopback loses nothing at this rate either), with a latency each.
    fn tiny_runs_count_every_delivery(kind: Kind, bins: &Binaries) {
        for shape in [
            Shape {
                publishers: 2,
                subscribers: 1,
                fanout: 1,
                shared: false,
                topic_per_publisher: true,
                topic: "t/in",
            },
            Shape {
                publishers: 1,
                subscribers: 3,
                fanout: 3,
                shared: false,
                topic_per_publisher: false,
                topic: "t/out",
            },
            Shape {
                publishers: 2,
                subscribers: 2,
                fanout: 1,
                shared: true,
                topic_per_publisher: false,
                topic: "t/shared",
            },
        ] {
            for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
                let broker = BrokerProcess::start(kind, bins, 100).unwrap();
                let spec = LoadSpec {
                    shape,
                    qos,
                    payload: 100,
                    warmup: Duration::from_millis(50),
                    duration: Duration::from_millis(200),
                    window: 50,
                };
                let r = tokio::runtime::Runtime::new()
                    .unwrap()
                    .block_on(run(&broker, spec))
                    .unwrap();
                let what = format!("{kind} {qos:?} {shape:?}");
                assert!(r.published > 0, "{what}");
                assert_eq!(r.expected, r.published * shape.fanout as u64, "{what}");
                assert_eq!(r.outcome.delivered, r.expected, "{what}");
                assert_eq!(r.outcome.duplicates, Some(0), "{what}");
                assert_eq!(r.outcome.latency.len(), r.expected, "{what}");
            }
        }
    }

    /// Against the system's Mosquitto binary.
    #[test]
    fn tiny_runs_against_mosquitto_count_every_delivery() {
        let path = Path::new("/usr/sbin/mosquitto");
        if !available("/usr/sbin/mosquitto", Some(path)) {
            return;
        }
        let bins = Binaries::find(None, path, &[Kind::Mosquitto]).unwrap();
        tiny_runs_count_every_delivery(Kind::Mosquitto, &bins);
    }

    /// Tiny runs against `ferry serve` of `kind`, if the binary is built.
    fn tiny_runs_against_ferry(kind: Kind) {
        let ferry = ferry_binary();
        if !available(
            "the ferry binary (FERRY_BIN, or `cargo build -p ferry-server`)",
            ferry.as_deref(),
        ) {
            return;
        }
        let bins =
            Binaries::find(ferry.as_deref(), Path::new("/usr/sbin/mosquitto"), &[kind]).unwrap();
        tiny_runs_count_every_delivery(kind, &bins);
    }

    /// Against `ferry serve`.
    #[test]
    fn tiny_runs_against_ferry_count_every_delivery() {
        tiny_runs_against_ferry(Kind::Ferry);
    }

    /// Against `ferry serve` on a data directory (pipelined publishes waiting for their fsync).
    #[test]
    fn tiny_runs_against_durable_ferry_count_every_delivery() {
        tiny_runs_against_ferry(Kind::FerryDurable);
    }
}
