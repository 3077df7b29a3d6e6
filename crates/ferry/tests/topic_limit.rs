//! `BrokerConfig::max_topics`: a publish (or publisher, `create_topic`, transaction) that would
//! create one topic more than the limit is refused with `PublishError::TopicLimit` and stores
//! nothing; existing topics keep working; stored topics count whether loaded or not (also
//! after a restart), and a forgotten in-memory topic gives its place back.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ferry::disk::{DiskConfig, Durability};
use ferry::{Broker, BrokerConfig, Message, PublishError, TopicConfig};

fn limited(max: usize) -> BrokerConfig {
    BrokerConfig {
        max_topics: Some(max),
        unload_idle_topics_after: Some(Duration::ZERO),
        ..BrokerConfig::default()
    }
}

fn is_limit(r: Result<impl std::fmt::Debug, PublishError>) -> bool {
    matches!(r, Err(PublishError::TopicLimit { limit: 2, .. }))
}

#[tokio::test]
async fn past_the_limit_new_topics_are_refused_and_existing_ones_work() {
    let broker = Broker::new(limited(2));
    let mut sub = broker.subscribe("#").unwrap();
    broker.publish("a", Message::from("1")).await.unwrap();
    broker.publish("b", Message::from("2")).await.unwrap();
    let err = broker.publish("c", Message::from("3")).await.unwrap_err();
    assert_eq!(err.code(), "topic_limit");
    assert!(err.to_string().contains("limit of 2 topics"), "{err}");
    assert!(is_limit(broker.try_publish("c", Message::from("3"))));
    assert!(is_limit(broker.publisher("c")));
    assert!(is_limit(broker.create_topic("c", TopicConfig::default())));
    let tx = broker.begin().unwrap();
    assert!(
        tx.publish("c", Message::from("3")).is_err(),
        "a transaction cannot create it"
    );
    tx.rollback().unwrap();
    assert_eq!(broker.topics().len(), 2, "nothing of c exists");
    broker.publish("a", Message::from("4")).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let d = tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .unwrap()
            .unwrap();
        got.push(String::from_utf8(d.message().payload().to_vec()).unwrap());
    }
    got.sort();
    assert_eq!(got, ["1", "2", "4"], "a and b still work, nothing of c");
}

#[tokio::test]
async fn a_forgotten_in_memory_topic_gives_its_place_back() {
    let broker = Broker::new(limited(2));
    broker.publish("a", Message::from("1")).await.unwrap();
    broker.publish("b", Message::from("2")).await.unwrap();
    assert!(is_limit(
        broker.publish("c", Message::from("3")).await.map(|_| ())
    ));
    // Nobody listens: nothing is retained, so the maintenance pass forgets both.
    broker.maintain();
    assert!(broker.topics().is_empty(), "{:?}", broker.topics());
    broker.publish("c", Message::from("3")).await.unwrap();
}

#[tokio::test]
async fn stored_topics_count_loaded_or_not_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let disk = || DiskConfig {
        durability: Durability::Never,
        ..DiskConfig::default()
    };
    {
        let broker = Broker::open_with(dir.path(), limited(2), disk()).unwrap();
        broker.publish("a", Message::from("1")).await.unwrap();
        broker.publish("b", Message::from("2")).await.unwrap();
        // Unloaded while idle, still there.
        broker.maintain();
        assert!(is_limit(
            broker.publish("c", Message::from("3")).await.map(|_| ())
        ));
        broker.shutdown(Duration::from_secs(1)).await;
    }
    let broker = Broker::open_with(dir.path(), limited(2), disk()).unwrap();
    assert!(is_limit(
        broker.publish("c", Message::from("3")).await.map(|_| ())
    ));
    broker.publish("b", Message::from("4")).await.unwrap();
    assert_eq!(broker.topics().len(), 2);
    broker.shutdown(Duration::from_secs(1)).await;
}
