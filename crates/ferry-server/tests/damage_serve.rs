//! Damage test of a real `ferry serve` process on a damaged data directory.
//!
//! A server with small commit-log segments (`--segment-bytes`) gets records published over HTTP
//! to a few topics, interleaved so that every segment holds batches of several topics, and is
//! stopped with SIGTERM. The test then reads the segment files itself (file header, then
//! batches: length, CRC, log offset, record count, ..., stream id and stream offset, records)
//! and, for each kind of damage, damages a copy of that data directory:
//! - in a sealed segment in the middle of the log: a byte flipped in the segment's file header,
//!   in each field of a batch header (length, CRC, log offset, record count, stream id, stream
//!   offset), in a record body, and in the last batch of the segment;
//! - in the active (last) segment: a cut in the middle of its last batch, and its tail zeroed
//!   from the middle of its last batch;
//! - in the first (oldest, sealed) segment, which also holds the definitions of the streams (a
//!   topic's name and id, at its start): a byte flipped in its file header, in each field of a
//!   batch header and in a record body of a batch in its middle, and in its last batch; the
//!   segment cut in the middle of that batch, and zeroed from there on.
//!
//! On each copy it starts `ferry serve` and checks that the server
//! - starts and answers `/health`;
//! - reports the damage in its log (WARN/ERROR lines naming the damaged segment: at least one,
//!   a handful at most, none more while idle);
//! - serves every record outside the damaged range, each once, in order, intact, read by a
//!   consumer group from the start of each topic. The damaged range is the damaged batch alone
//!   when the batches around it still chain (a CRC that fails, in its header or its records),
//!   else the rest of its segment from it on (a damaged file header, length, log offset or
//!   record count: nothing after it in that segment can be trusted);
//! - gives new publishes offsets above every offset it handed out before the damage, and a
//!   reader then sees them after the old records with no offset twice;
//! - does not spin (CPU time over 2 s of idleness) and exits with status 0 within a few seconds
//!   of SIGTERM.
//!
//! Damage to the definitions themselves (a topic's name lost) is checked by `ferry-log`'s
//! `tests/first_segment.rs`: the store cannot serve a stream whose name is lost.
//!
//! Run with `-- --nocapture` to see one line per case and the server's complaints.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;
use common::Server;

/// Segment size of the commit log (the server's minimum).
const SEGMENT_BYTES: u64 = 1 << 20;
/// The topics: every one of them is published to throughout.
const TOPICS: [&str; 4] = ["victim", "bystander-0", "bystander-1", "bystander-2"];
/// The consumer group made on every topic before anything was published: its saved position
/// (0) makes it read each topic from its start after every restart.
const GROUP: &str = "reader";
/// Marks a payload in the segment files: `FERRYDMG|<topic index>|<seq>|` then filler.
const MARK: &[u8] = b"FERRYDMG|";
/// Idle time over which the server's CPU use is measured...
const IDLE: Duration = Duration::from_secs(2);
/// ...and the most CPU time it may use meanwhile, in clock ticks (1/100 s): a quarter of a
/// core; a thread in a loop uses all of one.
const IDLE_TICKS: u64 = 50;
/// The most WARN/ERROR lines naming the damaged segment.
const MAX_REPORTS: usize = 6;

// ---------------------------------------------------------------------------------------------
// The server process

/// Starts `ferry serve` on `dir` (ephemeral ports, small segments) and waits until it serves;
/// `Err` with its log if it does not.
fn serve(dir: &Path) -> Result<Server, String> {
    common::serve(dir, &["--segment-bytes", &SEGMENT_BYTES.to_string()])
}

// ---------------------------------------------------------------------------------------------
// HTTP

fn url(server: SocketAddr, topic: &str, rest: &str) -> String {
    format!(
        "http://{server}/topics/{}/{rest}",
        topic.replace('/', "%2F")
    )
}

/// Payload number `seq` of topic `t`: marked, of a size between 200 B and 14 KiB, so that
/// some batches are smaller than a stream's index interval and some much larger.
fn payload(t: usize, seq: u64) -> String {
    let head = format!("FERRYDMG|{t}|{seq:06}|");
    let size = 200 + (seq as usize * 7919 + t * 1237) % 14_000;
    let fill = char::from(b'a' + ((seq as usize + t) % 26) as u8);
    let mut s = head;
    while s.len() < size {
        s.push(fill);
    }
    s
}

/// Publishes `body` to `topic`; returns the offset the server gave it.
async fn publish(http: &reqwest::Client, server: SocketAddr, topic: &str, body: String) -> u64 {
    let r = http
        .post(url(server, topic, "messages"))
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(status, 201, "publish to {topic}: {v}");
    v["offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("no offset: {v}"))
}

/// Fetches (and acks) everything group [`GROUP`] has on `topic` until a fetch waits in vain;
/// returns `(offset, payload)` in the order delivered.
async fn drain(http: &reqwest::Client, server: SocketAddr, topic: &str) -> Vec<(u64, String)> {
    let mut got = Vec::new();
    let began = Instant::now();
    loop {
        assert!(
            began.elapsed() < Duration::from_secs(20),
            "reading {topic} does not end: {} records so far",
            got.len()
        );
        let r = http
            .post(url(
                server,
                topic,
                // Long enough that a fetch waiting in vain means the end, also on a busy
                // machine (a fetch returns as soon as records are there).
                &format!("groups/{GROUP}/fetch?max=1000&wait_ms=1000"),
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "fetch from {topic}");
        let v: serde_json::Value = r.json().await.unwrap();
        let messages = v["messages"].as_array().cloned().unwrap_or_default();
        if messages.is_empty() {
            return got;
        }
        let mut receipts = Vec::new();
        for m in &messages {
            receipts.push(m["receipt"].as_str().unwrap().to_string());
            got.push((
                m["offset"].as_u64().unwrap(),
                m["payload"].as_str().unwrap_or("<not UTF-8>").to_string(),
            ));
        }
        let r = http
            .post(url(server, topic, &format!("groups/{GROUP}/ack")))
            .json(&serde_json::json!({ "receipts": receipts }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "ack on {topic}");
    }
}

async fn health(http: &reqwest::Client, server: SocketAddr) -> u16 {
    match http.get(format!("http://{server}/health")).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

// ---------------------------------------------------------------------------------------------
// The segment files

// Batch header fields (see the ferry-log crate docs, FORMAT): a stream batch.
const LENGTH_AT: u64 = 0;
const CRC_AT: u64 = 4;
const BASE_OFFSET_AT: u64 = 11;
const COUNT_AT: u64 = 19;
const STREAM_ID_AT: u64 = 43;
const STREAM_OFFSET_AT: u64 = 47;
const STREAM_HEADER_LEN: u64 = 55;
const SEGMENT_HEADER_LEN: u64 = 32;

/// One batch of a segment file.
#[derive(Debug, Clone)]
struct Batch {
    /// Where it starts in its file.
    pos: u64,
    /// Its bytes (length field included).
    len: u64,
    stream_id: u32,
    stream_offset: u64,
    count: u32,
    /// The topic and sequence number of its record, read from the payload (none for the
    /// store's control records).
    record: Option<(usize, u64)>,
}

/// One segment file and its batches.
#[derive(Debug, Clone)]
struct Segment {
    name: String,
    batches: Vec<Batch>,
}

fn le_u32(b: &[u8], at: u64) -> u32 {
    let at = at as usize;
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le_u64(b: &[u8], at: u64) -> u64 {
    let at = at as usize;
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads the batches of every segment file of `store` (in offset order).
fn read_segments(store: &Path) -> Vec<Segment> {
    let mut names: Vec<String> = std::fs::read_dir(store)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".log"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let bytes = std::fs::read(store.join(&name)).unwrap();
            let mut batches = Vec::new();
            let mut pos = SEGMENT_HEADER_LEN;
            while pos + STREAM_HEADER_LEN <= bytes.len() as u64 {
                let b = &bytes[pos as usize..];
                let len = 4 + u64::from(le_u32(b, LENGTH_AT));
                assert_eq!(b[8], 2, "{name} at {pos}: not a stream batch");
                let body = &b[STREAM_HEADER_LEN as usize..len as usize];
                let record = find(body, MARK).map(|at| {
                    let rest = std::str::from_utf8(&body[at + MARK.len()..at + MARK.len() + 16])
                        .unwrap_or_default();
                    let mut f = rest.split('|');
                    let t = f.next().unwrap().parse().unwrap();
                    let seq = f.next().unwrap().parse().unwrap();
                    (t, seq)
                });
                batches.push(Batch {
                    pos,
                    len,
                    stream_id: le_u32(b, STREAM_ID_AT),
                    stream_offset: le_u64(b, STREAM_OFFSET_AT),
                    count: le_u32(b, COUNT_AT),
                    record,
                });
                pos += len;
            }
            assert_eq!(
                pos,
                bytes.len() as u64,
                "{name}: batches do not end the file"
            );
            Segment { name, batches }
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// Flips (complements) the byte at `pos` of `file`.
fn flip(file: &Path, pos: u64) {
    let mut bytes = std::fs::read(file).unwrap();
    bytes[pos as usize] ^= 0xff;
    std::fs::write(file, bytes).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The cases

#[derive(Debug, Clone, Copy)]
enum Damage {
    /// Flips the byte at this distance from the start of the batch (or of the file header).
    Flip(u64),
    /// Cuts the file there.
    Cut,
    /// Zeroes the file from there to its end.
    Zero,
}

/// What the damage may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lost {
    /// The records of the damaged batch.
    Batch,
    /// Those of the rest of the segment from the damaged batch on.
    RestOfSegment,
}

struct Case {
    name: &'static str,
    /// Index of the segment damaged.
    segment: usize,
    /// Index of the batch damaged in it (`None`: its file header).
    batch: Option<usize>,
    damage: Damage,
    lost: Lost,
}

/// What was published before the damage: per topic, the payload of each offset.
type Published = Vec<Vec<String>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_data_directory_is_served_around_its_damage() {
    let began = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let pristine = tmp.path().join("pristine");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();

    // 1. A data directory of several segments, every topic in each.
    let mut server = serve(&pristine).unwrap();
    for topic in TOPICS {
        // The group starts at the topic's start (position 0, saved before this returns).
        let r = http
            .post(url(
                server.http,
                topic,
                &format!("groups/{GROUP}/fetch?max=1&wait_ms=0"),
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "making group {GROUP} on {topic}");
    }
    let mut published: Published = vec![Vec::new(); TOPICS.len()];
    let mut bytes = 0u64;
    let mut seq = 0u64;
    while bytes < 4 * SEGMENT_BYTES + SEGMENT_BYTES / 2 {
        // One record per topic at a time, concurrently (so that their fsyncs are shared).
        let tasks: Vec<_> = TOPICS
            .iter()
            .enumerate()
            .map(|(t, topic)| {
                let (http, server, p) = (http.clone(), server.http, payload(t, seq));
                tokio::spawn(async move { publish(&http, server, topic, p).await })
            })
            .collect();
        for (t, task) in tasks.into_iter().enumerate() {
            let offset = task.await.unwrap();
            assert_eq!(offset, seq, "{}: offsets follow on", TOPICS[t]);
            let p = payload(t, seq);
            bytes += p.len() as u64;
            published[t].push(p);
        }
        seq += 1;
    }
    // The last batches of the log are the victim's.
    for _ in 0..3 {
        let n = published[0].len() as u64;
        let p = payload(0, n);
        assert_eq!(publish(&http, server.http, TOPICS[0], p.clone()).await, n);
        published[0].push(p);
    }
    let stopped = server.stop("the first server");
    drop(server);
    let setup = began.elapsed();

    let segments = read_segments(&pristine.join("store"));
    assert!(
        segments.len() >= 5,
        "{} segments: expected at least 4 sealed ones",
        segments.len()
    );
    for s in &segments[..segments.len() - 1] {
        let topics: BTreeSet<usize> = s
            .batches
            .iter()
            .filter_map(|b| b.record.map(|r| r.0))
            .collect();
        assert!(topics.len() >= 2, "{}: topics {topics:?}", s.name);
    }
    // Every data batch holds one record, at the offset its publish was given, in the stream
    // of its topic.
    let mut stream_of: BTreeMap<usize, u32> = BTreeMap::new();
    for s in &segments {
        for b in &s.batches {
            if let Some((t, seq)) = b.record {
                assert_eq!(
                    (b.count, b.stream_offset),
                    (1, seq),
                    "{} at {}",
                    s.name,
                    b.pos
                );
                let id = *stream_of.entry(t).or_insert(b.stream_id);
                assert_eq!(
                    id, b.stream_id,
                    "{} at {}: stream of {}",
                    s.name, b.pos, TOPICS[t]
                );
            }
        }
    }
    eprintln!(
        "setup: {} records in {} segments in {:.1} s (stop took {} ms)",
        published.iter().map(Vec::len).sum::<usize>(),
        segments.len(),
        setup.as_secs_f64(),
        stopped.as_millis()
    );

    // 2. The cases: a sealed segment in the middle of the log (not the first, which holds the
    // definitions of the streams), and the active one.
    let sealed = segments.len() / 2;
    let active = segments.len() - 1;
    // A batch of the victim in the middle of the sealed segment.
    let middle = {
        let bs = &segments[sealed].batches;
        (bs.len() / 2..bs.len())
            .find(|&i| bs[i].record.is_some_and(|r| r.0 == 0))
            .unwrap()
    };
    // A batch of the victim in the middle of the first segment, after the definitions.
    let first_middle = {
        let bs = &segments[0].batches;
        (bs.len() / 2..bs.len())
            .find(|&i| bs[i].record.is_some_and(|r| r.0 == 0))
            .unwrap()
    };
    let last_first = segments[0].batches.len() - 1;
    let last_sealed = segments[sealed].batches.len() - 1;
    let last_active = segments[active].batches.len() - 1;
    assert_eq!(
        segments[active].batches[last_active].record.map(|r| r.0),
        Some(0),
        "the victim's batch ends the log"
    );
    let cases = [
        Case {
            name: "segment header",
            segment: sealed,
            batch: None,
            damage: Damage::Flip(13),
            lost: Lost::RestOfSegment,
        },
        Case {
            name: "batch length",
            segment: sealed,
            batch: Some(middle),
            damage: Damage::Flip(LENGTH_AT + 1),
            lost: Lost::RestOfSegment,
        },
        Case {
            name: "batch crc",
            segment: sealed,
            batch: Some(middle),
            damage: Damage::Flip(CRC_AT + 2),
            lost: Lost::Batch,
        },
        Case {
            name: "batch log offset",
            segment: sealed,
            batch: Some(middle),
            damage: Damage::Flip(BASE_OFFSET_AT),
            lost: Lost::RestOfSegment,
        },
        Case {
            name: "batch record count",
            segment: sealed,
            batch: Some(middle),
            damage: Damage::Flip(COUNT_AT),
            lost: Lost::RestOfSegment,
        },
        Case {
            name: "batch stream id",
            segment: sealed,
            batch: Some(middle),
            damage: Damage::Flip(STREAM_ID_AT),
            lost: Lost::Batch,
        },
        Case {
            name: "batch stream offset",
            segment: sealed,
            batch: Some(middle),
            damage: Damage::Flip(STREAM_OFFSET_AT),
            lost: Lost::Batch,
        },
        Case {
            name: "record body",
            segment: sealed,
            batch: Some(middle),
            damage: Damage::Flip(STREAM_HEADER_LEN + 40),
            lost: Lost::Batch,
        },
        Case {
            name: "last batch of a sealed segment",
            segment: sealed,
            batch: Some(last_sealed),
            damage: Damage::Flip(STREAM_HEADER_LEN + 40),
            lost: Lost::Batch,
        },
        Case {
            name: "first segment header",
            segment: 0,
            batch: None,
            damage: Damage::Flip(13),
            // Its batches are read without it.
            lost: Lost::Batch,
        },
        Case {
            name: "first segment batch length",
            segment: 0,
            batch: Some(first_middle),
            damage: Damage::Flip(LENGTH_AT + 1),
            lost: Lost::RestOfSegment,
        },
        Case {
            name: "first segment batch crc",
            segment: 0,
            batch: Some(first_middle),
            damage: Damage::Flip(CRC_AT + 2),
            lost: Lost::Batch,
        },
        Case {
            name: "first segment batch log offset",
            segment: 0,
            batch: Some(first_middle),
            damage: Damage::Flip(BASE_OFFSET_AT),
            lost: Lost::RestOfSegment,
        },
        Case {
            name: "first segment batch record count",
            segment: 0,
            batch: Some(first_middle),
            damage: Damage::Flip(COUNT_AT),
            lost: Lost::RestOfSegment,
        },
        Case {
            name: "first segment batch stream id",
            segment: 0,
            batch: Some(first_middle),
            damage: Damage::Flip(STREAM_ID_AT),
            lost: Lost::Batch,
        },
        Case {
            name: "first segment batch stream offset",
            segment: 0,
            batch: Some(first_middle),
            damage: Damage::Flip(STREAM_OFFSET_AT),
            lost: Lost::Batch,
        },
        Case {
            name: "first segment record body",
            segment: 0,
            batch: Some(first_middle),
            damage: Damage::Flip(STREAM_HEADER_LEN + 40),
            lost: Lost::Batch,
        },
        Case {
            name: "first segment last batch",
            segment: 0,
            batch: Some(last_first),
            damage: Damage::Flip(STREAM_HEADER_LEN + 40),
            lost: Lost::Batch,
        },
        Case {
            name: "first segment cut",
            segment: 0,
            batch: Some(first_middle),
            damage: Damage::Cut,
            lost: Lost::RestOfSegment,
        },
        Case {
            name: "first segment zeroed",
            segment: 0,
            batch: Some(first_middle),
            damage: Damage::Zero,
            lost: Lost::RestOfSegment,
        },
        Case {
            name: "active segment cut",
            segment: active,
            batch: Some(last_active),
            damage: Damage::Cut,
            lost: Lost::Batch,
        },
        Case {
            name: "active segment zeroed tail",
            segment: active,
            batch: Some(last_active),
            damage: Damage::Zero,
            lost: Lost::Batch,
        },
    ];

    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let dir = tmp.path().join(format!("case-{i}"));
        match run_case(&http, &pristine, &dir, &segments, &published, case).await {
            Ok(line) => eprintln!("{:<32} ok: {line}", case.name),
            Err(why) => {
                eprintln!("{:<32} FAILED: {why}", case.name);
                failures.push(format!("{}: {why}", case.name));
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    eprintln!(
        "{} cases in {:.1} s",
        cases.len(),
        began.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Damages a copy of `pristine` in `dir` as `case` says, serves it and checks it; `Ok` with a
/// summary, or what went wrong.
async fn run_case(
    http: &reqwest::Client,
    pristine: &Path,
    dir: &Path,
    segments: &[Segment],
    published: &Published,
    case: &Case,
) -> Result<String, String> {
    copy_dir(pristine, dir);
    let seg = &segments[case.segment];
    let file: PathBuf = dir.join("store").join(&seg.name);
    let damaged_from = case.batch.map_or(0, |b| seg.batches[b].pos);
    match (case.damage, case.batch) {
        (Damage::Flip(at), None) => flip(&file, at),
        (Damage::Flip(at), Some(b)) => flip(&file, seg.batches[b].pos + at),
        (Damage::Cut, Some(b)) => {
            let b = &seg.batches[b];
            let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
            f.set_len(b.pos + b.len / 2).unwrap();
        }
        (Damage::Zero, Some(b)) => {
            let b = &seg.batches[b];
            let mut bytes = std::fs::read(&file).unwrap();
            let from = (b.pos + b.len / 2) as usize;
            bytes[from..].fill(0);
            std::fs::write(&file, bytes).unwrap();
        }
        _ => unreachable!(),
    }
    // The records that may be lost: those of the damaged batch, or of the rest of the segment.
    let mut lost: Vec<Vec<bool>> = published.iter().map(|p| vec![false; p.len()]).collect();
    for b in &seg.batches {
        let in_range = match case.lost {
            Lost::Batch => b.pos == damaged_from,
            Lost::RestOfSegment => b.pos >= damaged_from,
        };
        if let (true, Some((t, seq))) = (in_range, b.record) {
            lost[t][seq as usize] = true;
        }
    }

    let mut server = serve(dir)?;
    let status = health(http, server.http).await;
    if status != 200 {
        return Err(format!("/health answered {status}\n{}", server.log_text()));
    }

    // Every record outside the damaged range, once, in order, intact.
    let mut problems = Vec::new();
    let mut lost_counts = Vec::new();
    // The topics are read at the same time.
    let reads: Vec<_> = TOPICS
        .iter()
        .map(|topic| {
            let (http, server) = (http.clone(), server.http);
            tokio::spawn(async move { drain(&http, server, topic).await })
        })
        .collect();
    for ((t, topic), read) in TOPICS.iter().enumerate().zip(reads) {
        let got = read.await.unwrap();
        let mut last = None;
        let mut served = vec![false; published[t].len()];
        for (offset, p) in &got {
            if last.is_some_and(|l| *offset <= l) {
                problems.push(format!("{topic}: offset {offset} after {last:?}"));
            }
            last = Some(*offset);
            match published[t].get(*offset as usize) {
                Some(orig) if orig == p => served[*offset as usize] = true,
                Some(_) => problems.push(format!("{topic}: offset {offset} altered")),
                None => problems.push(format!("{topic}: offset {offset} never published")),
            }
        }
        let missing: Vec<usize> = (0..served.len())
            .filter(|&o| !served[o] && !lost[t][o])
            .collect();
        if !missing.is_empty() {
            problems.push(format!(
                "{topic}: {} records outside the damaged range not served: offsets {:?}",
                missing.len(),
                &missing[..missing.len().min(12)]
            ));
        }
        lost_counts.push(served.iter().filter(|s| !**s).count());
    }

    // New publishes: offsets above everything handed out before, read after the old records.
    for (t, topic) in TOPICS.iter().enumerate() {
        let before = published[t].len() as u64;
        let p = format!("FERRYDMG|{t}|new|");
        let offset = publish(http, server.http, topic, p.clone()).await;
        if offset < before {
            problems.push(format!(
                "{topic}: new record got offset {offset}, already given out (next was {before})"
            ));
        }
        let got = drain(http, server.http, topic).await;
        if got != [(offset, p)] {
            problems.push(format!(
                "{topic}: after the new record at {offset} the reader got {:?}",
                got.iter()
                    .map(|(o, p)| (o, &p[..p.len().min(24)]))
                    .collect::<Vec<_>>()
            ));
        }
    }

    // Idle: no CPU burnt, no more reports.
    let reports_before = server.complaints().len();
    let cpu_before = server.cpu_ticks();
    tokio::time::sleep(IDLE).await;
    let idle_ticks = server.cpu_ticks().saturating_sub(cpu_before);
    let complaints = server.complaints();
    if idle_ticks > IDLE_TICKS {
        problems.push(format!(
            "{idle_ticks} CPU ticks used in {IDLE:?} of idleness"
        ));
    }
    if complaints.len() > reports_before {
        problems.push(format!(
            "new WARN/ERROR lines while idle: {:?}",
            &complaints[reports_before..]
        ));
    }
    let naming: Vec<&String> = complaints
        .iter()
        .filter(|l| l.contains(&seg.name))
        .collect();
    if naming.is_empty() || naming.len() > MAX_REPORTS {
        problems.push(format!(
            "{} WARN/ERROR lines name {} (expected 1..={MAX_REPORTS}): {naming:#?}",
            naming.len(),
            seg.name
        ));
    }

    let stopped = server.stop(case.name);
    let log = server.log_text();
    if !problems.is_empty() {
        return Err(format!("{}\nserver log:\n{log}", problems.join("\n")));
    }
    Ok(format!(
        "lost per topic {lost_counts:?}, {} reports, idle CPU {idle_ticks} ticks, stop {} ms; \
         WARN/ERROR lines:\n    {}",
        naming.len(),
        stopped.as_millis(),
        complaints.join("\n    ")
    ))
}
