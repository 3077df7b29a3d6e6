//! Seed 000's eleven test cases for the in-memory queue, on the multi-threaded runtime.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry::{
    Broker, BrokerConfig, HandlerError, HandlerOptions, Message, PublishError, TopicConfig,
};

const T: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_pub_sub() {
    let broker = Broker::default();
    let mut sub = broker.subscribe("telemetry.gpu").unwrap();
    let offset = broker
        .publish(
            "telemetry.gpu",
            Message::builder()
                .payload("hello")
                .header("source", "s1")
                .build(),
        )
        .await
        .unwrap();
    let d = tokio::time::timeout(T, sub.recv()).await.unwrap().unwrap();
    assert_eq!(d.payload().as_ref(), b"hello");
    assert_eq!(d.header("source"), Some("s1"));
    assert_eq!(d.offset(), offset);
    assert_eq!(d.topic().as_str(), "telemetry.gpu");
    assert_eq!(d.attempt(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiple_producers() {
    let broker = Broker::default();
    let mut sub = broker.subscribe("t").unwrap();
    let mut tasks = Vec::new();
    for p in 0..10u32 {
        let b = broker.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..100u32 {
                b.publish("t", Message::json(&(p, i)).unwrap())
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut seen = HashSet::new();
    let mut last_per_producer = [None::<u32>; 10];
    for _ in 0..1000 {
        let d = tokio::time::timeout(T, sub.recv()).await.unwrap().unwrap();
        let (p, i): (u32, u32) = d.decode().unwrap();
        assert!(seen.insert((p, i)), "duplicate {p}/{i}");
        // Per-producer order is preserved.
        if let Some(last) = last_per_producer[p as usize] {
            assert!(i > last);
        }
        last_per_producer[p as usize] = Some(i);
    }
    assert_eq!(seen.len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiple_consumers_fanout() {
    let broker = Broker::default();
    let mut subs: Vec<_> = (0..5).map(|_| broker.subscribe("t").unwrap()).collect();
    for i in 0..200u32 {
        broker
            .publish("t", Message::json(&i).unwrap())
            .await
            .unwrap();
    }
    for sub in &mut subs {
        for i in 0..200u32 {
            let d = tokio::time::timeout(T, sub.recv()).await.unwrap().unwrap();
            assert_eq!(d.decode::<u32>().unwrap(), i);
        }
        assert!(sub.try_recv().is_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_producers_and_consumers() {
    let broker = Broker::default();
    let counts: Vec<Arc<AtomicUsize>> = (0..5).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let mut consumers = Vec::new();
    for c in &counts {
        let mut sub = broker.subscribe("t").unwrap();
        let c = c.clone();
        consumers.push(tokio::spawn(async move {
            while c.load(Ordering::Relaxed) < 1000 {
                sub.recv().await.unwrap();
                c.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let producers: Vec<_> = (0..10)
        .map(|_| {
            let p = broker.publisher("t").unwrap();
            tokio::spawn(async move {
                for i in 0..100u32 {
                    p.publish(Message::json(&i).unwrap()).await.unwrap();
                }
            })
        })
        .collect();
    for p in producers {
        p.await.unwrap();
    }
    for c in consumers {
        tokio::time::timeout(T, c).await.unwrap().unwrap();
    }
    for c in &counts {
        assert_eq!(c.load(Ordering::Relaxed), 1000);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_processes_everything() {
    let broker = Broker::default();
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let handle = broker
        .subscription("t")
        .handle(HandlerOptions { concurrency: 8 }, move |_d| {
            let h = h.clone();
            async move {
                tokio::time::sleep(Duration::from_micros(200)).await;
                h.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        })
        .unwrap();
    for i in 0..1000u32 {
        broker
            .publish("t", Message::json(&i).unwrap())
            .await
            .unwrap();
    }
    let report = broker.shutdown(T).await;
    assert!(report.drained, "{report:?}");
    assert_eq!(handled.load(Ordering::Relaxed), 1000);
    assert_eq!(report.counters.published, 1000);
    assert_eq!(report.counters.acked, 1000);
    assert_eq!(report.counters.dropped, 0);
    assert_eq!(report.dropped_at_close, 0);
    let stats = handle.join().await;
    assert_eq!(stats.succeeded, 1000);
    // Publishing after shutdown is a typed error.
    assert_eq!(broker.publish("t", "late").await, Err(PublishError::Closed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_errors_are_counted_and_retried() {
    let broker = Broker::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let handle = broker
        .subscription("t")
        .max_attempts(2)
        .handle(HandlerOptions::default(), move |d| {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::Relaxed);
                if d.payload().as_ref() == b"bad" {
                    Err(HandlerError::retry("cannot process"))
                } else {
                    Ok(())
                }
            }
        })
        .unwrap();
    broker.publish("t", "good").await.unwrap();
    broker.publish("t", "bad").await.unwrap();
    let dlq = broker.dead_letters("t").unwrap();
    tokio::time::timeout(T, async {
        while dlq.is_empty() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .unwrap();
    // good once, bad twice (max_attempts = 2), then dead-lettered.
    assert_eq!(calls.load(Ordering::Relaxed), 3);
    let s = broker.topic_stats("t").unwrap();
    assert_eq!(s.counters.errors, 2);
    assert_eq!(s.counters.acked, 1);
    assert_eq!(s.counters.dead_lettered, 1);
    assert_eq!(handle.stats().failed, 2);
    let dead = dlq.list(10);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.payload().as_ref(), b"bad");
    assert_eq!(dead[0].attempts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_handler_does_not_crash_the_broker() {
    let broker = Broker::default();
    let ok = Arc::new(AtomicUsize::new(0));
    let o = ok.clone();
    let panicky = broker
        .subscription("t")
        .max_attempts(1)
        .handle(HandlerOptions::default(), |d| async move {
            if d.payload().as_ref() == b"boom" {
                panic!("handler panicked on purpose");
            }
            Ok(())
        })
        .unwrap();
    let healthy = broker
        .subscription("t")
        .handle(HandlerOptions::default(), move |_d| {
            let o = o.clone();
            async move {
                o.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        })
        .unwrap();
    broker.publish("t", "boom").await.unwrap();
    broker.publish("t", "fine").await.unwrap();
    let report = broker.shutdown(T).await;
    assert!(report.drained);
    assert_eq!(ok.load(Ordering::Relaxed), 2);
    assert_eq!(panicky.join().await.panicked, 1);
    assert_eq!(healthy.join().await.succeeded, 2);
    assert_eq!(report.counters.errors, 1);
    assert_eq!(report.counters.dead_lettered, 1);
    assert_eq!(report.counters.acked, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_are_isolated() {
    let broker = Broker::default();
    let mut a = broker.subscribe("a").unwrap();
    let mut b = broker.subscribe("b").unwrap();
    broker.publish("a", "for a").await.unwrap();
    broker.publish("b", "for b").await.unwrap();
    assert_eq!(a.recv().await.unwrap().payload().as_ref(), b"for a");
    assert_eq!(b.recv().await.unwrap().payload().as_ref(), b"for b");
    assert!(a.try_recv().is_err());
    assert!(b.try_recv().is_err());
    // Offsets are per topic.
    assert_eq!(broker.publish("a", "x").await.unwrap(), 1);
    assert_eq!(broker.publish("c", "x").await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_loses_nothing() {
    let broker = Broker::new(BrokerConfig {
        topic_defaults: TopicConfig {
            capacity: 2,
            ..TopicConfig::default()
        },
        ..BrokerConfig::default()
    });
    let mut sub = broker.subscribe("t").unwrap();
    broker.publish("t", "1").await.unwrap();
    broker.publish("t", "2").await.unwrap();
    // The topic is full: a publish waits, and cancelling it (timeout) stores nothing.
    let r = tokio::time::timeout(Duration::from_millis(50), broker.publish("t", "3")).await;
    assert!(r.is_err(), "publish should wait while the topic is full");
    assert!(matches!(
        broker.try_publish("t", "3"),
        Err(PublishError::Full { .. })
    ));
    // Cancelling a recv loses nothing either.
    assert_eq!(sub.recv().await.unwrap().payload().as_ref(), b"1");
    let mut empty = broker.subscribe("u").unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(20), empty.recv())
            .await
            .is_err()
    );
    assert_eq!(sub.recv().await.unwrap().payload().as_ref(), b"2");
    // Space was released: publishing works again.
    broker.publish("t", "3").await.unwrap();
    assert_eq!(sub.recv().await.unwrap().payload().as_ref(), b"3");
    assert_eq!(broker.topic_stats("t").unwrap().counters.published, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_stops_delivery_and_releases_records() {
    let broker = Broker::default();
    let mut keep = broker.subscribe("t").unwrap();
    let gone = broker.subscribe("t").unwrap();
    assert_eq!(broker.topic_stats("t").unwrap().subscribers, 2);
    broker.publish("t", "1").await.unwrap();
    gone.unsubscribe();
    assert_eq!(broker.topic_stats("t").unwrap().subscribers, 1);
    assert_eq!(broker.health().subscriptions, 1);
    assert_eq!(keep.recv().await.unwrap().payload().as_ref(), b"1");
    drop(keep);
    let s = broker.topic_stats("t").unwrap();
    assert_eq!(s.subscribers, 0);
    assert_eq!(s.depth, 0, "no cursor needs the record any more");
    // The unsubscribed one's unread record is accounted as dropped, not lost silently.
    assert_eq!(s.counters.dropped, 1);
    assert_eq!(s.counters.acked, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_are_accurate() {
    let broker = Broker::default();
    let mut s1 = broker.subscribe("t").unwrap();
    let mut s2 = broker.subscription("t").manual_ack().build().unwrap();
    for i in 0..10u32 {
        broker
            .publish("t", Message::json(&i).unwrap())
            .await
            .unwrap();
    }
    broker.publish("nobody-listens", "x").await.unwrap();
    for _ in 0..10 {
        s1.recv().await.unwrap();
    }
    for i in 0..10 {
        let d = s2.recv().await.unwrap();
        if i < 7 {
            d.ack().unwrap();
        } else {
            std::mem::forget(d);
        }
    }
    let st = broker.stats();
    assert_eq!(st.counters.published, 11);
    assert_eq!(st.counters.delivered, 20);
    assert_eq!(st.counters.acked, 17);
    assert_eq!(st.counters.dropped, 1, "published with no subscriber");
    assert_eq!(st.topics, 2);
    assert_eq!(st.subscriptions, 2);
    let t = broker.topic_stats("t").unwrap();
    assert_eq!(t.depth, 3, "three records are still unacknowledged");
    assert_eq!(t.subscribers, 2);
    for s in broker.subscription_stats() {
        assert_eq!(s.unaccounted(), 0, "{s:?}");
    }
    let s2s = s2.stats();
    assert_eq!(s2s.in_flight, 3);
    assert_eq!(s2s.lag, 0);
    assert_eq!(broker.health().status, "running");
}
