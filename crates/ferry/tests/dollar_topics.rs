//! `$` topics (MQTT §4.7.2): user topics starting with `$` are published, counted, dead-lettered
//! and stored like any other, kept away from filters whose first level is a wildcard, while the
//! reserved first levels (`$SYS`, `$share`, `$dlq`, `$ferry`) are refused.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ferry::{Broker, PublishError, TopicError, TryRecvError};

fn payload(d: &ferry::Delivery) -> String {
    String::from_utf8(d.payload().to_vec()).unwrap()
}

/// Waits until `sub` holds a record (or fails after 5 s).
async fn next(sub: &mut ferry::Subscription) -> ferry::Delivery {
    tokio::time::timeout(Duration::from_secs(5), sub.recv())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_dollar_topics_are_published_and_kept_from_leading_wildcards() {
    let broker = Broker::default();
    let mut all = broker.subscribe("#").unwrap();
    let mut plus = broker.subscribe("+/bar").unwrap();
    let mut exact = broker.subscribe("$foo/bar").unwrap();
    let mut named = broker.subscribe("$foo/#").unwrap();
    broker.publish("$foo/bar", "dollar").await.unwrap();
    broker.publish("plain/bar", "plain").await.unwrap();
    assert_eq!(payload(&next(&mut exact).await), "dollar");
    assert_eq!(payload(&next(&mut named).await), "dollar");
    // The leading wildcards get the plain topic only.
    assert_eq!(payload(&next(&mut all).await), "plain");
    assert_eq!(payload(&next(&mut plus).await), "plain");
    assert!(matches!(all.try_recv(), Err(TryRecvError::Empty)));
    assert!(matches!(plus.try_recv(), Err(TryRecvError::Empty)));

    // A user `$` topic is a user topic: listed and counted.
    let names: Vec<String> = broker.topics().iter().map(|t| t.to_string()).collect();
    assert_eq!(names, ["$foo/bar", "plain/bar"]);
    let stats = broker.stats();
    assert_eq!(stats.topics, 2);
    assert_eq!(stats.counters.published, 2);
    assert_eq!(stats.dead_letters, 0);
    assert_eq!(
        broker.topic_stats("$foo/bar").unwrap().counters.published,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_first_levels_are_refused() {
    let broker = Broker::default();
    for bad in [
        "$SYS/broker/uptime",
        "$sys/x",
        "$share/g/t",
        "$dlq/orders",
        "$dlq",
        "$DLQ.orders",
        "$ferry/x",
    ] {
        let err = broker.publish(bad, "x").await.unwrap_err();
        assert!(
            matches!(err, PublishError::InvalidTopic(TopicError::Reserved)),
            "{bad:?}: {err}"
        );
        assert!(broker.try_publish(bad, "x").is_err(), "{bad:?}");
        assert!(broker.publisher(bad).is_err(), "{bad:?}");
        assert!(broker.dead_letters(bad).is_err(), "{bad:?}");
    }
    assert!(broker.topics().is_empty());
    assert_eq!(broker.stats().counters.published, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_dollar_topic_has_its_own_dead_letters() {
    let broker = Broker::default();
    let mut sub = broker.subscription("$jobs").manual_ack().build().unwrap();
    broker.publish("$jobs", "bad").await.unwrap();
    sub.recv().await.unwrap().reject("no").unwrap();
    let dlq = broker.dead_letters("$jobs").unwrap();
    assert_eq!(dlq.topic().as_str(), "$dlq/$jobs");
    assert!(dlq.topic().is_system());
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq.list(1)[0].source_topic, "$jobs");
    // The dead-letter topic is not a user topic; the source is.
    let names: Vec<String> = broker.topics().iter().map(|t| t.to_string()).collect();
    assert_eq!(names, ["$jobs"]);
    let stats = broker.stats();
    assert_eq!((stats.topics, stats.dead_letters), (1, 1));
    // Redrive puts it back on the user topic.
    assert_eq!(dlq.redrive(1).await.unwrap(), 1);
    assert_eq!(payload(&next(&mut sub).await), "bad");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_user_dollar_topic_survives_a_restart_as_a_user_topic() {
    let dir = tempfile::tempdir().unwrap();
    {
        let broker = Broker::open(dir.path()).unwrap();
        let mut sub = broker.subscription("$jobs").manual_ack().build().unwrap();
        broker.publish("$jobs", "one").await.unwrap();
        broker.publish("$jobs", "two").await.unwrap();
        sub.recv().await.unwrap().reject("no").unwrap();
        drop(sub);
        broker.shutdown(Duration::from_secs(5)).await;
    }
    let broker = Broker::open(dir.path()).unwrap();
    let names: Vec<String> = broker.topics().iter().map(|t| t.to_string()).collect();
    assert_eq!(
        names,
        ["$jobs"],
        "the dead-letter stream is not a user topic"
    );
    let stats = broker.stats();
    assert_eq!(stats.topics, 1);
    assert_eq!(stats.dead_letters, 1);
    // Pages of the stored catalog list it (and never its dead-letter stream), before it is
    // loaded.
    for prefix in ["", "$", "$jobs"] {
        let page = broker.topic_page(prefix, None, 10, &|_| true);
        let listed: Vec<&str> = page.topics.iter().map(|t| t.topic.as_str()).collect();
        assert_eq!(listed, ["$jobs"], "prefix {prefix:?}");
        assert_eq!(page.next, None);
    }
    // Its records are there from the start, and a leading wildcard still does not read them.
    let mut all = broker
        .subscription("#")
        .start(ferry::StartPosition::Earliest)
        .build()
        .unwrap();
    let mut again = broker
        .subscription("$jobs")
        .start(ferry::StartPosition::Earliest)
        .build()
        .unwrap();
    assert_eq!(payload(&next(&mut again).await), "one");
    assert_eq!(payload(&next(&mut again).await), "two");
    assert!(matches!(all.try_recv(), Err(TryRecvError::Empty)));
    let dlq = broker.dead_letters("$jobs").unwrap();
    assert_eq!(dlq.list(5)[0].source_topic, "$jobs");
    assert_eq!(broker.publish("$jobs", "three").await.unwrap(), 2);
    drop((all, again));
    broker.shutdown(Duration::from_secs(5)).await;
}
