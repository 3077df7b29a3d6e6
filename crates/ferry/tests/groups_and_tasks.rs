//! Seed 002's grouped messages (collected until complete) and seed 004's task processor (named
//! task handlers over a consumer group, with priority and a worker limit).
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry::{Broker, DeadLetterReason, GroupCollector, HandlerError, Message, Priority, TaskQueue};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_are_handed_over_once_complete() {
    let broker = Broker::default();
    let mut groups = GroupCollector::new(broker.subscribe("files").unwrap());
    let part = |group: &str, size: usize, n: u32| {
        Message::builder()
            .payload(format!("{group}-{n}"))
            .in_group(group, size)
            .build()
    };
    broker.publish("files", part("a", 3, 0)).await.unwrap();
    broker.publish("files", part("b", 2, 0)).await.unwrap();
    broker.publish("files", "loose").await.unwrap();
    broker.publish("files", part("a", 3, 1)).await.unwrap();
    broker.publish("files", part("b", 2, 1)).await.unwrap();
    broker.publish("files", part("a", 3, 2)).await.unwrap();
    let names = |g: Vec<ferry::Delivery>| -> Vec<String> {
        g.iter()
            .map(|d| String::from_utf8(d.payload().to_vec()).unwrap())
            .collect()
    };
    assert_eq!(names(groups.next_group().await.unwrap()), vec!["loose"]);
    assert_eq!(groups.pending().len(), 2);
    assert_eq!(
        names(groups.next_group().await.unwrap()),
        vec!["b-0", "b-1"]
    );
    assert_eq!(
        names(groups.next_group().await.unwrap()),
        vec!["a-0", "a-1", "a-2"]
    );
    assert!(groups.pending().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_run_by_name_by_priority_with_a_worker_limit() {
    let broker = Broker::default();
    let done = Arc::new(Mutex::new(Vec::new()));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (d, g) = (done.clone(), gate.clone());
    let queue = TaskQueue::new(&broker, "tasks")
        .register("bot_move", move |payload| {
            let d = d.clone();
            async move {
                d.lock()
                    .unwrap()
                    .push(String::from_utf8(payload.to_vec()).unwrap());
                Ok(())
            }
        })
        .register("wait", move |_| {
            let g = g.clone();
            async move {
                // Holds the only worker until the test opens the gate.
                let _permit = g.acquire().await.map_err(HandlerError::retry)?;
                Ok(())
            }
        })
        .register("flaky", |_| async {
            Err(HandlerError::reject("cannot compute"))
        });
    let workers = queue.start(1).unwrap();
    queue.submit("wait", "", Priority::Normal).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The single worker is busy: these wait, and then run by priority.
    queue
        .submit("bot_move", "low", Priority::Low)
        .await
        .unwrap();
    queue
        .submit("bot_move", "high", Priority::High)
        .await
        .unwrap();
    queue
        .submit("nobody", "?", Priority::Highest)
        .await
        .unwrap();
    queue.submit("flaky", "x", Priority::Lowest).await.unwrap();
    queue
        .submit("bot_move", "normal", Priority::Normal)
        .await
        .unwrap();
    gate.add_permits(1);
    let dlq = broker.dead_letters("tasks").unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while done.lock().unwrap().len() < 3 || dlq.len() < 2 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(*done.lock().unwrap(), vec!["high", "normal", "low"]);
    let reasons: Vec<_> = dlq.list(10).into_iter().map(|d| d.reason).collect();
    assert_eq!(
        reasons,
        vec![
            DeadLetterReason::Rejected("unknown task \"nobody\"".into()),
            DeadLetterReason::Rejected("cannot compute".into()),
        ]
    );
    broker.shutdown(Duration::from_secs(5)).await;
    assert_eq!(workers.join().await.succeeded, 4);
}
