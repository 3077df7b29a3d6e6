//! Pages of topic stats: name order, prefix, cursor, a visibility filter, stored topics that are
//! not loaded, dead-letter topics left out, and the top topics by depth.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ferry::disk::{DiskConfig, Durability};
use ferry::{Broker, BrokerConfig, Message, PAGE_SCAN_BUDGET};

fn names() -> Vec<String> {
    let mut v: Vec<String> = (0..250)
        .map(|i| format!("{}/t{i:03}", ["a", "b", "c"][i % 3]))
        .collect();
    v.push("!early".into());
    v.push("zz".into());
    v.sort();
    v
}

fn publish_all(broker: &Broker) {
    for (i, n) in names().iter().enumerate() {
        for _ in 0..(i % 4) {
            broker.try_publish(n, Message::new("x")).unwrap();
        }
        if i % 4 == 0 {
            broker.create_topic(n, Default::default()).unwrap();
        }
    }
}

/// Every page of `limit`, followed by its cursor until there is none.
fn walk(
    broker: &Broker,
    prefix: &str,
    limit: usize,
    visible: &dyn Fn(&str) -> bool,
) -> (Vec<String>, usize) {
    let (mut seen, mut after, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let page = broker.topic_page(prefix, after.as_deref(), limit, visible);
        assert!(page.topics.len() <= limit);
        pages += 1;
        seen.extend(page.topics.iter().map(|t| t.topic.clone()));
        match page.next {
            Some(n) => after = Some(n),
            None => return (seen, pages),
        }
        assert!(pages < 10_000, "pages never end");
    }
}

fn check_pages(broker: &Broker) {
    let all = names();
    let everything = |_: &str| true;
    let (seen, pages) = walk(broker, "", 10, &everything);
    assert_eq!(seen, all);
    assert_eq!(pages, all.len().div_ceil(10));
    let (seen, _) = walk(broker, "b/", 7, &everything);
    let b: Vec<String> = all
        .iter()
        .filter(|n| n.starts_with("b/"))
        .cloned()
        .collect();
    assert_eq!(seen, b);
    assert!(!b.is_empty());
    // Only what the caller may see, still every one of them once, in order.
    let only_c = |n: &str| n.starts_with("c/");
    let (seen, _) = walk(broker, "", 10, &only_c);
    let c: Vec<String> = all
        .iter()
        .filter(|n| n.starts_with("c/"))
        .cloned()
        .collect();
    assert_eq!(seen, c);
    let nothing = |_: &str| false;
    let page = broker.topic_page("", None, 10, &nothing);
    assert!(page.topics.is_empty());
    assert_eq!(page.next, None, "fewer names than the scan budget");
    assert!(broker
        .topic_page("nope/", None, 10, &everything)
        .topics
        .is_empty());
    assert!(broker
        .topic_page("", None, 0, &everything)
        .topics
        .is_empty());
    // An `after` past every name, and one before the prefix.
    assert!(broker
        .topic_page("", Some("zzz"), 10, &everything)
        .topics
        .is_empty());
    let page = broker.topic_page("b/", Some("a/zzz"), 3, &everything);
    assert_eq!(
        page.topics
            .iter()
            .map(|t| t.topic.clone())
            .collect::<Vec<_>>(),
        b[..3].to_vec()
    );
    // Depths are the topics' own.
    for (i, name) in all.iter().enumerate() {
        if let Some(t) = broker
            .topic_page("", Some(name), 1, &everything)
            .topics
            .first()
        {
            let expected = all.get(i + 1).unwrap();
            assert_eq!(&t.topic, expected);
        }
    }
    let page = broker.topic_page("a/t000", None, 1, &everything);
    let t = &page.topics[0];
    assert_eq!(t.topic, "a/t000");
    let index = all.iter().position(|n| n == "a/t000").unwrap();
    assert_eq!(t.next_offset as usize, index % 4);
}

#[tokio::test]
async fn pages_of_an_in_memory_broker() {
    let broker = Broker::new(BrokerConfig::default());
    publish_all(&broker);
    check_pages(&broker);
}

#[tokio::test]
async fn pages_of_a_durable_broker_loaded_and_not() {
    let dir = tempfile::tempdir().unwrap();
    let disk = || DiskConfig {
        durability: Durability::Never,
        ..DiskConfig::default()
    };
    {
        let broker = Broker::open_with(dir.path(), BrokerConfig::default(), disk()).unwrap();
        publish_all(&broker);
        // A dead-letter topic is stored too, and never listed.
        let mut sub = broker
            .subscription("a/t000")
            .start(ferry::StartPosition::Earliest)
            .manual_ack()
            .build()
            .unwrap();
        broker.try_publish("a/t000", Message::new("dead")).unwrap();
        let d = tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .unwrap()
            .unwrap();
        d.reject("no").unwrap();
        drop(sub);
        check_pages_with_extra(&broker);
        broker.shutdown(Duration::from_secs(1)).await;
    }
    // Reopened: nothing is loaded; pages come from the store's catalog and load nothing.
    let broker = Broker::open_with(dir.path(), BrokerConfig::default(), disk()).unwrap();
    check_pages_with_extra(&broker);
    assert_eq!(broker.stats().loaded_topics, 0, "a page loads no topic");
    broker.shutdown(Duration::from_secs(1)).await;
}

/// As [`check_pages`], `a/t000` holding one more record.
fn check_pages_with_extra(broker: &Broker) {
    let everything = |_: &str| true;
    let (seen, _) = walk(broker, "", 9, &everything);
    assert_eq!(seen, names());
    let t = &broker.topic_page("a/t000", None, 1, &everything).topics[0];
    let published = names().iter().position(|n| n == "a/t000").unwrap() % 4 + 1;
    assert_eq!(
        (t.first_offset, t.next_offset, t.depth),
        (0, published as u64, published)
    );
}

#[tokio::test]
async fn a_page_looks_at_a_bounded_number_of_names() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open_with(
        dir.path(),
        BrokerConfig::default(),
        DiskConfig {
            durability: Durability::Never,
            ..DiskConfig::default()
        },
    )
    .unwrap();
    let n = PAGE_SCAN_BUDGET + 10;
    for i in 0..n {
        broker
            .create_topic(&format!("h/{i:06}"), Default::default())
            .unwrap();
    }
    broker.create_topic("z/mine", Default::default()).unwrap();
    let mine = |t: &str| t.starts_with("z/");
    let first = broker.topic_page("", None, 10, &mine);
    assert!(first.topics.is_empty());
    let next = first.next.expect("a cursor after the names looked at");
    assert_eq!(next, format!("h/{:06}", PAGE_SCAN_BUDGET - 1));
    let second = broker.topic_page("", Some(&next), 10, &mine);
    assert_eq!(second.topics.len(), 1);
    assert_eq!(second.topics[0].topic, "z/mine");
    assert_eq!(second.next, None);
    broker.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn top_topics_by_depth() {
    let broker = Broker::new(BrokerConfig::default());
    publish_all(&broker);
    for _ in 0..10 {
        broker.try_publish("b/t001", Message::new("x")).unwrap();
    }
    let everything = |_: &str| true;
    let top = broker.top_topics("", 3, &everything);
    assert_eq!(top.len(), 3);
    assert_eq!(top[0].topic, "b/t001");
    assert!(top.windows(2).all(|w| w[0].depth >= w[1].depth));
    // In memory with no subscription, records are not kept: ties on depth go by published.
    assert_eq!(top[1].counters.published, 3, "{top:?}");
    assert_eq!(top[2].counters.published, 3, "{top:?}");
    let only_a = |t: &str| t.starts_with("a/");
    let top = broker.top_topics("", 5, &only_a);
    assert_eq!(top.len(), 5);
    assert!(top
        .iter()
        .all(|t| t.topic.starts_with("a/") && t.counters.published == 3));
    assert!(broker.top_topics("", 0, &everything).is_empty());
    assert_eq!(broker.top_topics("c/", 1000, &everything).len(), 83);
}
