//! Timed records racing readers: whether a record needs a timing check is decided after it is
//! read. Real threads and wall-clock time (kept apart from the virtual-time tests, which real
//! load beside them would disturb).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ferry::{Broker, Message, TryRecvError};

/// A delayed message published while a subscriber is in the middle of reading the topic (which
/// had no timed message before) is still held: a reader must not decide that the records it
/// reads need no timing check before it has read them. Real threads, many fresh topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_message_racing_a_reader_is_still_held() {
    const ROUNDS: usize = 100;
    const PLAIN: usize = 2_000;
    let broker = Broker::default();
    for round in 0..ROUNDS {
        let topic = format!("race/{round}");
        let mut sub = broker.subscribe(&topic).unwrap();
        let plain = broker.publisher(&topic).unwrap();
        let timed = broker.publisher(&topic).unwrap();
        let held: Vec<u64> = std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..PLAIN {
                    plain.try_publish(Message::from(vec![0u8; 8])).unwrap();
                    if i == PLAIN / 2 {
                        std::thread::yield_now();
                    }
                }
            });
            s.spawn(|| {
                std::thread::yield_now();
                let later = Message::builder()
                    .payload("later")
                    .delay(Duration::from_secs(3600))
                    .build();
                timed.try_publish(later).unwrap();
            });
            let mut early = Vec::new();
            let mut plain_seen = 0;
            while plain_seen < PLAIN {
                match sub.try_recv() {
                    Ok(d) if d.payload().as_ref() == b"later" => early.push(d.offset()),
                    Ok(_) => plain_seen += 1,
                    Err(TryRecvError::Empty) => std::thread::yield_now(),
                    Err(e) => panic!("{e:?}"),
                }
            }
            early
        });
        assert!(
            held.is_empty(),
            "round {round}: the delayed message at {held:?} was handed over an hour early"
        );
        assert_eq!(sub.try_recv().unwrap_err(), TryRecvError::Empty);
    }
}
