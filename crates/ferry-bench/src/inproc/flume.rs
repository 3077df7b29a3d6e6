//! `flume`: bounded channels of payload `Bytes`, used through the async API. Fanout is one channel
//! per subscriber, each producer sending a clone of every payload to each of them; a group is one
//! MPMC channel whose receivers compete for the messages. `send_async` waits while a channel is
//! full, like Ferry's `publish`.

use std::time::Instant;

use anyhow::{anyhow, Result};

use super::{Clock, RunSpec};
use crate::measure::{join_all, ConsumerTally, Outcome, PayloadSource, ProducerTally};

/// Runs `spec` on fresh channels.
pub async fn run(spec: &RunSpec, clock: Clock) -> Result<Outcome> {
    let (senders, receivers) =
        super::topology(spec.shape, || flume::bounded::<bytes::Bytes>(spec.capacity));

    let mut consumers = Vec::with_capacity(receivers.len());
    for rx in receivers {
        let mut tally = ConsumerTally::new(clock.clone())?;
        consumers.push(tokio::spawn(async move {
            // `Err` once every sender is dropped and the channel is drained.
            while let Ok(payload) = rx.recv_async().await {
                tally.observe(&payload);
            }
            Ok(tally)
        }));
    }

    let mut producers = Vec::with_capacity(spec.shape.producers);
    for _ in 0..spec.shape.producers {
        let txs = senders.clone();
        let mut payloads = PayloadSource::new(spec.template, spec.sample_every, clock.clone());
        let (n, clock) = (spec.per_producer, clock.clone());
        producers.push(tokio::spawn(async move {
            let first = Instant::now();
            for _ in 0..n {
                let payload = payloads.next_payload();
                for tx in &txs {
                    tx.send_async(payload.clone())
                        .await
                        .map_err(|_| anyhow!("flume: the receivers are gone"))?;
                }
            }
            Ok(ProducerTally {
                first,
                finish: clock.producer_done(),
            })
        }));
    }
    drop(senders);

    let producers = join_all(producers).await?;
    let consumers = join_all(consumers).await?;
    Outcome::combine(&producers, consumers)
}
