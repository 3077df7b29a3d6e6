//! The ways to consume: `Stream`, `recv_batch`, `try_recv`, wildcard subscriptions across topics.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ferry::{Broker, BrokerEvent, Message, TopicFilter, TryRecvError};
use futures::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_is_a_stream_that_ends_at_close() {
    let broker = Broker::default();
    let sub = broker.subscribe("t").unwrap();
    for i in 0..5u32 {
        broker
            .publish("t", Message::json(&i).unwrap())
            .await
            .unwrap();
    }
    let reader = tokio::spawn(async move {
        sub.map(|d| d.decode::<u32>().unwrap())
            .collect::<Vec<_>>()
            .await
    });
    let report = broker.shutdown(Duration::from_secs(5)).await;
    assert!(report.drained);
    assert_eq!(reader.await.unwrap(), vec![0, 1, 2, 3, 4]);
}

#[tokio::test(start_paused = true)]
async fn recv_batch_waits_for_the_first_then_takes_what_is_there() {
    let broker = Broker::default();
    let mut sub = broker.subscribe("t").unwrap();
    let empty = sub.recv_batch(10, Duration::from_secs(1)).await.unwrap();
    assert!(empty.is_empty());
    for i in 0..25u32 {
        broker
            .publish("t", Message::json(&i).unwrap())
            .await
            .unwrap();
    }
    let batch = sub.recv_batch(10, Duration::from_secs(1)).await.unwrap();
    assert_eq!(batch.len(), 10);
    assert_eq!(batch[9].offset(), 9);
    assert_eq!(
        sub.recv_batch(100, Duration::from_secs(1))
            .await
            .unwrap()
            .len(),
        15
    );
    assert!(sub
        .recv_batch(0, Duration::from_secs(1))
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_subscriptions_span_topics_created_before_and_after() {
    let broker = Broker::default();
    broker.publish("telemetry/n1/gpu", "before").await.unwrap();
    let mut mqtt = broker.subscribe("telemetry/+/gpu").unwrap();
    let mut everything = broker.subscribe("#").unwrap();
    let mut glob = broker.subscribe("player.*.joined").unwrap();
    let mut regex = broker
        .subscription_to(&TopicFilter::regex("orders-[0-9]+").unwrap())
        .build()
        .unwrap();
    broker.publish("telemetry/n1/gpu", "a").await.unwrap();
    broker.publish("telemetry/n2/gpu", "b").await.unwrap(); // a new topic
    broker.publish("telemetry/n2/cpu", "c").await.unwrap();
    broker.publish("player.42.joined", "d").await.unwrap();
    broker.publish("player.42.left", "e").await.unwrap();
    broker.publish("orders-17", "f").await.unwrap();
    broker.publish("orders-x", "g").await.unwrap();

    let mut got = Vec::new();
    while let Ok(d) = mqtt.try_recv() {
        got.push((d.topic().to_string(), d.payload().clone()));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            ("telemetry/n1/gpu".to_string(), bytes::Bytes::from("a")),
            ("telemetry/n2/gpu".to_string(), bytes::Bytes::from("b")),
        ]
    );
    let mut n = 0;
    while everything.try_recv().is_ok() {
        n += 1;
    }
    assert_eq!(n, 7);
    assert_eq!(glob.recv().await.unwrap().payload().as_ref(), b"d");
    assert_eq!(glob.try_recv().unwrap_err(), TryRecvError::Empty);
    assert_eq!(regex.recv().await.unwrap().payload().as_ref(), b"f");
    assert_eq!(regex.try_recv().unwrap_err(), TryRecvError::Empty);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_events() {
    let broker = Broker::default();
    let mut events = broker.events();
    let first = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, BrokerEvent::Started);
    broker.shutdown(Duration::from_secs(1)).await;
    assert_eq!(events.recv().await.unwrap(), BrokerEvent::ShutdownStarted);
    assert!(matches!(events.recv().await.unwrap(), BrokerEvent::Shutdown(r) if r.drained));
}
