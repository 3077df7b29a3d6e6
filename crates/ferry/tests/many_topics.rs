//! 100,000 topics on one data directory under an open-file limit of 1,024: the commit log's
//! open files do not depend on the number of topics, before or after a restart.
//!
//! Its own test binary, since it lowers the process's open-file limit.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ferry::disk::{DiskConfig, Durability};
use ferry::{Broker, BrokerConfig, Message, StartPosition};
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

const TOPICS: usize = 100_000;
/// Open files the broker may add, whatever the number of topics.
const FD_SLACK: usize = 64;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn topic(i: usize) -> String {
    format!("fleet/{}/node-{i:06}", i % 97)
}

fn payload(i: usize) -> String {
    format!("reading of node {i}")
}

fn disk() -> DiskConfig {
    DiskConfig {
        durability: Durability::Never,
        ..DiskConfig::default()
    }
}

#[test]
fn a_hundred_thousand_topics_under_an_open_file_limit_of_1024() {
    let limit = getrlimit(Resource::Nofile);
    let soft = limit.current.map_or(1024, |c| c.min(1024));
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(soft),
            maximum: limit.maximum,
        },
    )
    .unwrap();
    assert_eq!(getrlimit(Resource::Nofile).current, Some(soft));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let before = open_fds();
        {
            let broker = Broker::open_with(dir.path(), BrokerConfig::default(), disk()).unwrap();
            for i in 0..TOPICS {
                let name = topic(i);
                let m = Message::builder()
                    .payload(payload(i))
                    .header("n", i.to_string())
                    .build();
                assert_eq!(broker.try_publish(&name, m).unwrap(), 0, "{name}");
            }
            assert_eq!(broker.topics().len(), TOPICS);
            let fds = open_fds();
            assert!(
                fds < before + FD_SLACK,
                "{fds} open files after publishing to {TOPICS} topics ({before} before)"
            );
            broker.shutdown(Duration::from_secs(1)).await;
        }
        let broker = Broker::open_with(dir.path(), BrokerConfig::default(), disk()).unwrap();
        assert_eq!(broker.topics().len(), TOPICS);
        let fds = open_fds();
        assert!(
            fds < before + FD_SLACK,
            "{fds} open files after reopening {TOPICS} topics ({before} before)"
        );
        let sample = (0..TOPICS).step_by(1000).chain([1, TOPICS - 1]);
        for i in sample {
            let name = topic(i);
            let stats = broker.topic_stats(&name).unwrap();
            assert_eq!((stats.first_offset, stats.next_offset), (0, 1), "{name}");
            let mut sub = broker
                .subscription(&name)
                .start(StartPosition::Earliest)
                .build()
                .unwrap();
            let d = tokio::time::timeout(Duration::from_secs(5), sub.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(d.offset(), 0, "{name}");
            assert_eq!(d.payload().as_ref(), payload(i).as_bytes(), "{name}");
            assert_eq!(d.header("n"), Some(i.to_string().as_str()), "{name}");
            assert!(sub.try_recv().is_err(), "{name}");
        }
        // A wildcard subscription loads exactly the stored topics it matches: those under
        // `fleet/5/` (more than one chunk of the ordered catalog), not `fleet/50/...`.
        for filter in ["fleet/5/+", "fleet/5/#"] {
            let mut sub = broker
                .subscription(filter)
                .start(StartPosition::Earliest)
                .build()
                .unwrap();
            let want: std::collections::BTreeSet<String> =
                (0..TOPICS).filter(|i| i % 97 == 5).map(payload).collect();
            assert!(want.len() > 1024);
            let mut got = std::collections::BTreeSet::new();
            while got.len() < want.len() {
                let d = tokio::time::timeout(Duration::from_secs(10), sub.recv())
                    .await
                    .unwrap()
                    .unwrap();
                got.insert(String::from_utf8(d.payload().to_vec()).unwrap());
                d.ack().unwrap();
            }
            assert_eq!(got, want, "{filter}");
            assert!(sub.try_recv().is_err(), "{filter}");
        }
        let fds = open_fds();
        assert!(
            fds < before + FD_SLACK,
            "{fds} open files after reading ({before} before)"
        );
        broker.shutdown(Duration::from_secs(1)).await;
    });
}
