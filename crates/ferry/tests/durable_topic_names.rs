//! Topic names are data, never file names: any valid name (path-like, dot-only, very long,
//! non-ASCII) survives a restart with its records intact and in order, and the data directory
//! holds only the commit log (`store/`, segment files named by offset) and `positions.json`.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use ferry::disk::{DiskConfig, Durability};
use ferry::topic::MAX_TOPIC_LEN;
use ferry::{
    Broker, BrokerConfig, DeadLetterReason, Message, PublishError, StartPosition, TopicName,
};
use proptest::prelude::*;

/// Names that would be dangerous or ambiguous as paths, always part of the property's input.
const AWKWARD: &[&str] = &[
    ".",
    "..",
    "...",
    "a/../b",
    "../../../../etc/passwd",
    "/",
    "//",
    "/abs/path",
    "a/",
    "a//b",
    "./a",
    "store",
    "store/../positions.json",
    "positions.json",
    "topics",
    "store.migrating",
    "starts.json",
    "%2E%2E",
    "%",
    "a%2Fb",
    "a\\b",
    "C:\\con\\nul",
    "con",
    " ",
    "trailing.",
    "ü/ß/日本語/🚀",
    "\u{200b}",
    "\u{feff}bom",
    "e\u{301}",
    "é",
];

/// A valid topic name (see `TopicName::new`): non-empty, at most `MAX_TOPIC_LEN` bytes, no
/// control characters, no `+ # *`, not starting with `$`.
fn valid(name: String) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_control() || matches!(c, '+' | '#' | '*') {
                '_'
            } else {
                c
            }
        })
        .collect();
    // Reserved first levels ($SYS, $dlq, ...) are refused; other `$` names are user topics.
    let first = s.split(['/', '.']).next().unwrap_or_default();
    if ferry::RESERVED_LEVELS
        .iter()
        .any(|r| first.eq_ignore_ascii_case(r))
    {
        s.insert(0, 'x');
    }
    while s.len() > MAX_TOPIC_LEN {
        s.pop();
    }
    if s.is_empty() {
        s.push('e');
    }
    s
}

fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(".".to_string()),
        Just("..".to_string()),
        Just("/".to_string()),
        Just("%".to_string()),
        Just("%2F".to_string()),
        Just("\\".to_string()),
        Just("$".to_string()),
        Just("ü".to_string()),
        Just("日本".to_string()),
        Just("🚀".to_string()),
        "[a-z0-9_-]{1,8}",
        "\\PC{1,8}",
    ]
}

/// Any valid name: pieces joined (paths, dots, escapes), arbitrary printable Unicode, or a long
/// repetition up to the maximum length.
fn topic_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::collection::vec(piece(), 1..8).prop_map(|p| valid(p.concat())),
        2 => "\\PC{1,40}".prop_map(valid),
        1 => (piece(), 1000usize..=MAX_TOPIC_LEN).prop_map(|(p, len)| {
            let mut s = String::new();
            while s.len() < len {
                s.push_str(&p);
            }
            valid(s)
        }),
    ]
}

/// The names of one case: a few awkward ones, the generated ones, and one of exactly the
/// maximum length (multibyte characters up to the last byte).
fn names() -> impl Strategy<Value = Vec<String>> {
    (
        prop::sample::subsequence(AWKWARD, 3),
        prop::collection::vec(topic_name(), 1..6),
        prop::sample::select(vec!["a", "ü", "日", "🚀"]),
    )
        .prop_map(|(awkward, generated, unit)| {
            let mut longest = unit.repeat(MAX_TOPIC_LEN / unit.len());
            while longest.len() < MAX_TOPIC_LEN {
                longest.push('.');
            }
            let mut all: Vec<String> = awkward.into_iter().map(str::to_string).collect();
            all.extend(generated);
            all.push(longest);
            let mut seen = BTreeSet::new();
            all.retain(|n| seen.insert(n.clone()));
            all
        })
}

fn message(topic: &str, i: usize) -> Message {
    Message::builder()
        .payload(payload(topic, i))
        .key(topic.to_string())
        .header("topic", topic)
        .header("n", i.to_string())
        .build()
}

/// A payload that names its topic and sequence number, of varying length.
fn payload(topic: &str, i: usize) -> Vec<u8> {
    let mut p = format!("{i}:").into_bytes();
    p.extend_from_slice(topic.as_bytes());
    p.extend((0..(i * 37 % 300)).map(|k| (k * 7 + i) as u8));
    p
}

fn disk() -> DiskConfig {
    DiskConfig {
        durability: Durability::Never,
        ..DiskConfig::default()
    }
}

/// Every path under `dir`, relative to it.
fn walk(dir: &Path, base: &Path, out: &mut Vec<(String, bool)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        let is_dir = entry.file_type().unwrap().is_dir();
        let rel = path
            .strip_prefix(base)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        out.push((rel, is_dir));
        if is_dir {
            walk(&path, base, out);
        }
    }
}

/// A file of the commit log: a segment file (20 digits and a known extension), or the index
/// checkpoint.
fn is_segment_file(name: &str) -> bool {
    name == "streams.checkpoint"
        || name.split_once('.').is_some_and(|(stem, ext)| {
            stem.len() == 20
                && stem.bytes().all(|b| b.is_ascii_digit())
                && matches!(ext, "log" | "index" | "timeindex")
        })
}

fn check_layout(dir: &Path, names: &[String]) -> Result<(), TestCaseError> {
    let mut entries = Vec::new();
    walk(dir, dir, &mut entries);
    for (rel, is_dir) in &entries {
        let ok = match rel.split_once('/') {
            None => (rel == "store" && *is_dir) || (rel == "positions.json" && !*is_dir),
            Some(("store", file)) => !*is_dir && is_segment_file(file),
            Some(_) => false,
        };
        prop_assert!(ok, "unexpected entry {:?} in the data directory", rel);
        let file = rel.rsplit('/').next().unwrap();
        prop_assert!(
            rel == "store"
                || rel == "positions.json"
                || !names.iter().any(|n| n == file || n == rel),
            "an entry named after a topic: {:?}",
            rel
        );
    }
    prop_assert!(
        entries
            .iter()
            .any(|(rel, _)| rel == "store/00000000000000000000.log"),
        "no commit log: {:?}",
        entries
    );
    Ok(())
}

fn run(names: Vec<String>, shutdown: bool) -> Result<(), TestCaseError> {
    const PER_TOPIC: usize = 3;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        for n in &names {
            prop_assert!(
                TopicName::new(n).is_ok(),
                "generated an invalid name {:?}",
                n
            );
        }
        // The first name also gets a dead letter: `$dlq/<name>` is a stream too.
        let dead = names[0].clone();
        {
            let broker = Broker::open_with(dir.path(), BrokerConfig::default(), disk()).unwrap();
            let mut sub = broker.subscription(&dead).manual_ack().build().unwrap();
            broker
                .publish(&dead, Message::builder().payload("doomed").build())
                .await
                .unwrap();
            sub.recv().await.unwrap().reject("bad").unwrap();
            // Unsubscribed before more is published to it, so that shutdown has nothing to wait for.
            drop(sub);
            for name in &names {
                for i in 0..PER_TOPIC {
                    broker.publish(name, message(name, i)).await.unwrap();
                }
            }
            // Names longer than the maximum are refused, not stored.
            for len in [10 << 10, 64 << 10] {
                let long = "l".repeat(len);
                let refused = broker.publish(&long, "x").await;
                prop_assert!(
                    matches!(refused, Err(PublishError::InvalidTopic(_))),
                    "{:?}",
                    refused.map_err(|e| e.to_string())
                );
            }
            if shutdown {
                broker.shutdown(Duration::from_secs(1)).await;
            }
            // Otherwise dropped as is: the process "ends" here.
        }
        check_layout(dir.path(), &names)?;

        let broker = Broker::open_with(dir.path(), BrokerConfig::default(), disk()).unwrap();
        let listed: BTreeSet<String> = broker.topics().iter().map(|t| t.to_string()).collect();
        let expected: BTreeSet<String> = names.iter().cloned().collect();
        prop_assert_eq!(listed, expected);
        for name in &names {
            let mut sub = broker
                .subscription(name)
                .start(StartPosition::Earliest)
                .build()
                .unwrap();
            let skip = usize::from(*name == dead);
            let mut got = Vec::new();
            while got.len() < PER_TOPIC + skip {
                let batch = sub.recv_batch(16, Duration::from_secs(5)).await.unwrap();
                prop_assert!(!batch.is_empty(), "{:?}: only {} records", name, got.len());
                got.extend(batch);
            }
            prop_assert!(
                sub.try_recv().is_err(),
                "{:?}: records beyond the end",
                name
            );
            for (i, d) in got.iter().skip(skip).enumerate() {
                prop_assert_eq!(d.offset(), (i + skip) as u64);
                prop_assert_eq!(d.topic().as_str(), name.as_str());
                let want = payload(name, i);
                prop_assert_eq!(d.payload().as_ref(), want.as_slice());
                prop_assert_eq!(d.key().map(|k| k.as_ref()), Some(name.as_bytes()));
                prop_assert_eq!(d.header("topic"), Some(name.as_str()));
                let n = i.to_string();
                prop_assert_eq!(d.header("n"), Some(n.as_str()));
            }
        }
        let letters = broker.dead_letters(&dead).unwrap().list(10);
        prop_assert_eq!(letters.len(), 1);
        prop_assert_eq!(&letters[0].source_topic, &dead);
        prop_assert_eq!(letters[0].source_offset, 0);
        prop_assert_eq!(
            &letters[0].reason,
            &DeadLetterReason::Rejected("bad".into())
        );
        prop_assert_eq!(letters[0].message.payload().as_ref(), b"doomed");
        broker.shutdown(Duration::from_secs(1)).await;
        drop(broker);
        check_layout(dir.path(), &names)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn any_valid_topic_name_survives_a_restart_and_names_no_file(
        names in names(),
        shutdown in any::<bool>(),
    ) {
        run(names, shutdown)?;
    }
}
