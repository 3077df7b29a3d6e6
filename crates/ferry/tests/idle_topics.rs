//! Idle topics are unloaded: a durable topic keeps only its log's entry in the store and is
//! loaded again, intact, on its next use; an in-memory topic with nothing retained is forgotten.
//! Anything that holds a topic (a subscription, a publisher handle) keeps it loaded.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ferry::disk::{DiskConfig, Durability};
use ferry::{Broker, BrokerConfig, Message, StartPosition, TopicConfig};

const TOPICS: usize = 500;

/// Unloads topics at the first maintenance pass that finds them unused.
fn unload_at_once() -> BrokerConfig {
    BrokerConfig {
        unload_idle_topics_after: Some(Duration::ZERO),
        ..BrokerConfig::default()
    }
}

fn disk() -> DiskConfig {
    DiskConfig {
        durability: Durability::Never,
        ..DiskConfig::default()
    }
}

fn topic(i: usize) -> String {
    format!("fleet/{}/node-{i:04}", i % 7)
}

fn msg(i: usize, n: u64) -> Message {
    Message::from(format!("{i}:{n}"))
}

async fn recv_payload(sub: &mut ferry::Subscription) -> (String, u64, String) {
    let d = tokio::time::timeout(Duration::from_secs(10), sub.recv())
        .await
        .expect("a delivery within 10 s")
        .unwrap();
    let text = String::from_utf8(d.message().payload().to_vec()).unwrap();
    (d.topic().to_string(), d.offset(), text)
}

#[tokio::test]
async fn durable_idle_topics_are_unloaded_and_load_again_intact() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open_with(dir.path(), unload_at_once(), disk()).unwrap();
    for i in 0..TOPICS {
        broker.publish(&topic(i), msg(i, 0)).await.unwrap();
    }
    assert_eq!(broker.stats().loaded_topics, TOPICS);
    broker.maintain();
    let stats = broker.stats();
    assert_eq!(stats.loaded_topics, 0, "nothing holds the topics");
    assert_eq!(stats.topics, TOPICS, "unloaded topics still exist");
    assert_eq!(stats.depth, TOPICS, "their records are still counted");
    assert_eq!(stats.counters.published, TOPICS as u64, "counters are kept");
    assert_eq!(broker.topics().len(), TOPICS);
    assert_eq!(broker.health().topics, TOPICS);

    // Stats of one topic load it; so does a publish, which continues its offsets.
    let one = broker.topic_stats(&topic(3)).unwrap();
    assert_eq!((one.first_offset, one.next_offset), (0, 1));
    let offset = broker.publish(&topic(3), msg(3, 1)).await.unwrap();
    assert_eq!(offset, 1, "offsets continue after a reload");
    assert_eq!(broker.stats().loaded_topics, 1);
    assert!(!broker
        .create_topic(&topic(4), TopicConfig::default())
        .unwrap());

    // A wildcard subscription from the earliest offset sees every unloaded topic's records,
    // and holds the topics it matches: they stay loaded.
    let mut sub = broker
        .subscription("fleet/2/#")
        .start(StartPosition::Earliest)
        .build()
        .unwrap();
    let matching = (0..TOPICS).filter(|i| i % 7 == 2).count();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..matching {
        let (t, offset, text) = recv_payload(&mut sub).await;
        assert_eq!(offset, 0);
        let i: usize = text.split(':').next().unwrap().parse().unwrap();
        assert_eq!(t, topic(i));
        assert!(seen.insert(i), "{t} delivered twice");
    }
    broker.maintain();
    assert_eq!(
        broker.stats().loaded_topics,
        matching,
        "the subscription holds what it matches"
    );
    drop(sub);
    // A read the subscription started on an I/O thread may hold its topic for a moment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while broker.stats().loaded_topics > 0 && tokio::time::Instant::now() < deadline {
        broker.maintain();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(broker.stats().loaded_topics, 0);
    broker.shutdown(Duration::from_secs(5)).await;
    drop(broker);

    // After a restart nothing is loaded until used, and everything is there.
    let broker = Broker::open_with(dir.path(), unload_at_once(), disk()).unwrap();
    assert_eq!(broker.stats().loaded_topics, 0);
    assert_eq!(broker.topics().len(), TOPICS);
    let mut sub = broker
        .subscription(&topic(3))
        .start(StartPosition::Earliest)
        .build()
        .unwrap();
    assert_eq!(recv_payload(&mut sub).await.2, "3:0");
    assert_eq!(recv_payload(&mut sub).await.2, "3:1");
    broker.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_latest_subscription_does_not_replay_an_unloaded_topic() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open_with(dir.path(), unload_at_once(), disk()).unwrap();
    broker.publish("a/old", Message::from("old")).await.unwrap();
    broker.maintain();
    assert_eq!(broker.stats().loaded_topics, 0);
    let mut sub = broker.subscribe("a/#").unwrap();
    broker.publish("a/old", Message::from("new")).await.unwrap();
    let (_, offset, text) = recv_payload(&mut sub).await;
    assert_eq!((offset, text.as_str()), (1, "new"));
    broker.shutdown(Duration::from_secs(5)).await;
}

/// A member of the manual-ack group "workers" on `jobs/#`, from the earliest offset.
fn workers(broker: &Broker) -> ferry::Subscription {
    broker
        .subscription("jobs/#")
        .group("workers")
        .manual_ack()
        .start(StartPosition::Earliest)
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_group_resumes_on_an_unloaded_topic_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let broker = Broker::open_with(dir.path(), unload_at_once(), disk()).unwrap();
        let mut g = workers(&broker);
        for n in 0..4 {
            broker.publish("jobs/a", msg(0, n)).await.unwrap();
        }
        for n in 0..2 {
            let d = tokio::time::timeout(Duration::from_secs(10), g.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(d.offset(), n);
            d.ack().unwrap();
        }
        broker.flush().unwrap();
        drop(g);
        broker.shutdown(Duration::from_secs(5)).await;
    }
    let broker = Broker::open_with(dir.path(), unload_at_once(), disk()).unwrap();
    broker.maintain();
    let mut g = workers(&broker);
    let d = tokio::time::timeout(Duration::from_secs(10), g.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.offset(), 2, "the group resumes where it acknowledged");
    drop((d, g));
    broker.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn in_memory_topics_with_nothing_retained_are_forgotten() {
    let broker = Broker::new(unload_at_once());
    broker
        .create_topic(
            "kept",
            TopicConfig {
                keep_consumed: true,
                ..TopicConfig::default()
            },
        )
        .unwrap();
    broker.publish("kept", Message::from("x")).await.unwrap();
    for i in 0..TOPICS {
        // Nobody listens: nothing is retained.
        broker.publish(&topic(i), msg(i, 0)).await.unwrap();
    }
    let held = broker.publisher("held").unwrap();
    let _sub = broker.subscribe("watched/#").unwrap();
    broker
        .publish("watched/a", Message::from("w"))
        .await
        .unwrap();
    assert_eq!(broker.health().topics, TOPICS + 3);
    broker.maintain();
    let stats = broker.stats();
    assert_eq!(
        broker.topics(),
        vec!["held", "kept", "watched/a"],
        "what holds records or is held stays"
    );
    assert_eq!(stats.counters.published, TOPICS as u64 + 2);
    drop(held);
    broker.maintain();
    assert_eq!(broker.topics(), vec!["kept", "watched/a"]);
    // A forgotten topic is simply new again.
    assert_eq!(broker.publish(&topic(1), msg(1, 1)).await.unwrap(), 0);
}

#[tokio::test]
async fn unloading_is_off_with_none_and_waits_for_the_idle_time() {
    let broker = Broker::new(BrokerConfig {
        unload_idle_topics_after: None,
        ..BrokerConfig::default()
    });
    broker.publish("a", Message::from("x")).await.unwrap();
    broker.maintain();
    assert_eq!(broker.topics(), vec!["a"]);

    let broker = Broker::new(BrokerConfig::default());
    broker.publish("a", Message::from("x")).await.unwrap();
    broker.maintain();
    assert_eq!(broker.topics(), vec!["a"], "used less than a minute ago");
}

/// Calls the maintenance pass until it has also applied the retention of unloaded stored
/// topics (every tenth pass) once.
fn maintain_with_stored_retention(broker: &Broker) {
    for _ in 0..10 {
        broker.maintain();
    }
}

#[tokio::test]
async fn durable_topics_whose_records_are_all_gone_are_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let expiring = ferry::Retention {
        max_age: Some(Duration::from_millis(200)),
        ..ferry::Retention::default()
    };
    let mut config = unload_at_once();
    config.topic_defaults.retention = expiring.clone();
    let broker = Broker::open_with(dir.path(), config.clone(), disk()).unwrap();
    // Created with settings of its own: kept even when empty.
    let own = TopicConfig {
        retention: expiring,
        ..TopicConfig::default()
    };
    broker.create_topic("kept/own", own).unwrap();
    for (i, t) in ["dev/1", "dev/2", "kept/own"].iter().enumerate() {
        assert_eq!(broker.publish(t, msg(i, 0)).await.unwrap(), 0);
        assert_eq!(broker.publish(t, msg(i, 1)).await.unwrap(), 1);
    }
    // A group reads dev/1 to its end; after a restart (a group that exists holds its topics)
    // only its saved position remains.
    {
        let mut g = broker
            .subscription("dev/1")
            .group("g")
            .start(StartPosition::Earliest)
            .build()
            .unwrap();
        for _ in 0..2 {
            let d = tokio::time::timeout(Duration::from_secs(10), g.recv())
                .await
                .unwrap()
                .unwrap();
            d.ack().unwrap();
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    maintain_with_stored_retention(&broker);
    let names: Vec<String> = broker.topics().iter().map(|t| t.to_string()).collect();
    assert_eq!(
        names,
        ["dev/1", "kept/own"],
        "dev/2 is forgotten; the group holds dev/1; kept/own has settings of its own"
    );
    assert_eq!(broker.stats().topics, 2);
    broker.shutdown(Duration::from_secs(5)).await;
    let broker = Broker::open_with(dir.path(), config.clone(), disk()).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    maintain_with_stored_retention(&broker);
    assert!(
        !broker.topics().iter().any(|t| t.as_str() == "dev/1"),
        "no group is live after the restart: dev/1 is forgotten"
    );
    // Published to again, a forgotten topic is new: offsets from 0, read by the group from
    // its start.
    assert_eq!(broker.publish("dev/1", msg(9, 0)).await.unwrap(), 0);
    let mut g = broker
        .subscription("dev/1")
        .group("g")
        .start(StartPosition::Latest)
        .build()
        .unwrap();
    let (topic, offset, text) = recv_payload(&mut g).await;
    assert_eq!((topic.as_str(), offset, text.as_str()), ("dev/1", 0, "9:0"));
    drop(g);
    broker.shutdown(Duration::from_secs(5)).await;
    // After a restart (without the short retention): the same topics.
    let broker = Broker::open_with(dir.path(), unload_at_once(), disk()).unwrap();
    assert!(broker.topics().iter().any(|t| t.as_str() == "dev/1"));
    let one = broker.topic_stats("dev/1").unwrap();
    assert_eq!((one.first_offset, one.next_offset), (0, 1));
    broker.shutdown(Duration::from_secs(5)).await;

    // With forgetting off, an empty stored topic stays.
    let dir = tempfile::tempdir().unwrap();
    let config = BrokerConfig {
        forget_empty_topics: false,
        ..config
    };
    let broker = Broker::open_with(dir.path(), config, disk()).unwrap();
    broker.publish("dev/3", msg(3, 0)).await.unwrap();
    broker.maintain();
    tokio::time::sleep(Duration::from_millis(300)).await;
    maintain_with_stored_retention(&broker);
    let one = broker.topic_stats("dev/3").unwrap();
    assert_eq!((one.first_offset, one.next_offset), (1, 1));
    broker.shutdown(Duration::from_secs(5)).await;
}
