//! Dead letters: listed, consumed, redriven to their source topic, purged, counted by reason.
#![allow(clippy::unwrap_used)]

use ferry::{Broker, DeadLetter, DeadLetterReason, Message};

async fn dead_letter_n(broker: &Broker, topic: &str, n: u32) {
    let mut sub = broker.subscription(topic).manual_ack().build().unwrap();
    for i in 0..n {
        broker
            .publish(topic, Message::json(&i).unwrap())
            .await
            .unwrap();
    }
    for i in 0..n {
        let d = sub.recv().await.unwrap();
        if i % 2 == 0 {
            d.reject(format!("bad {i}")).unwrap();
        } else {
            d.reject("odd").unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_consume_redrive_purge() {
    let broker = Broker::default();
    dead_letter_n(&broker, "orders", 4).await;
    let dlq = broker.dead_letters("orders").unwrap();
    assert_eq!(dlq.topic().as_str(), "$dlq/orders");
    assert_eq!(dlq.len(), 4);
    let listed = dlq.list(10);
    assert_eq!(listed.len(), 4);
    assert_eq!(listed[0].reason, DeadLetterReason::Rejected("bad 0".into()));
    assert_eq!(listed[1].source_offset, 1);
    assert_eq!(listed[0].message.decode::<u32>().unwrap(), 0);
    assert!(listed[0].dead_lettered_at <= std::time::SystemTime::now());

    // Consume them as a subscription.
    let mut sub = dlq.subscription().build().unwrap();
    let first = DeadLetter::from_record(sub.recv().await.unwrap().record()).unwrap();
    assert_eq!(first, listed[0]);

    // Redrive two: they are republished to the source topic without the dead-letter headers.
    let mut again = broker.subscribe("orders").unwrap();
    assert_eq!(dlq.redrive(2).await.unwrap(), 2);
    assert_eq!(dlq.len(), 2);
    let r = again.recv().await.unwrap();
    assert_eq!(r.decode::<u32>().unwrap(), 0);
    assert!(r.header(ferry::dlq::headers::REASON).is_none());
    assert_eq!(again.recv().await.unwrap().decode::<u32>().unwrap(), 1);

    assert_eq!(dlq.purge(), 2);
    assert!(dlq.is_empty());
    let by_reason = broker.topic_stats("orders").unwrap().dead_letters_by_reason;
    assert_eq!(by_reason.get("rejected"), Some(&4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_topics_are_not_user_topics() {
    let broker = Broker::default();
    dead_letter_n(&broker, "t", 1).await;
    assert!(broker.publish("$dlq/t", "x").await.is_err());
    let all = broker.subscribe("#").unwrap();
    drop(all);
    assert_eq!(broker.topics().len(), 1);
    let s = broker.stats();
    assert_eq!(s.dead_letters, 1);
    assert_eq!(s.counters.dead_lettered, 1);
    assert_eq!(
        s.counters.published, 1,
        "dead letters are not counted as publishes"
    );
}
