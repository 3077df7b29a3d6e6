//! `tokio::sync::broadcast`: one channel, a cloned `Sender` per producer, a `Receiver` per
//! subscriber. Broadcast has no backpressure (a full ring overwrites the oldest value and slow
//! receivers get `Lagged`), so the ring is sized to hold every message of the run: no receiver can
//! lag, and any `Lagged` would be counted as lost. Values are the payload `Bytes`.

use std::time::Instant;

use anyhow::{anyhow, Result};
use bytes::Bytes;
use tokio::sync::broadcast::{self, error::RecvError};

use super::{Clock, RunSpec};
use crate::measure::{join_all, ConsumerTally, Outcome, PayloadSource, ProducerTally};

/// Runs `spec` on a fresh channel.
pub async fn run(spec: &RunSpec, clock: Clock) -> Result<Outcome> {
    let capacity = usize::try_from(spec.published())?
        .max(1)
        .checked_next_power_of_two()
        .ok_or_else(|| anyhow!("too many messages for one broadcast ring"))?;
    let (tx, _) = broadcast::channel::<Bytes>(capacity);

    let mut consumers = Vec::with_capacity(spec.shape.consumers);
    for _ in 0..spec.shape.consumers {
        let mut rx = tx.subscribe();
        let mut tally = ConsumerTally::new(clock.clone())?;
        consumers.push(tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(payload) => tally.observe(&payload),
                    Err(RecvError::Lagged(n)) => tally.lost += n,
                    Err(RecvError::Closed) => break,
                }
            }
            Ok(tally)
        }));
    }

    let mut producers = Vec::with_capacity(spec.shape.producers);
    for _ in 0..spec.shape.producers {
        let tx = tx.clone();
        let mut payloads = PayloadSource::new(spec.template, spec.sample_every, clock.clone());
        let (n, clock) = (spec.per_producer, clock.clone());
        producers.push(tokio::spawn(async move {
            let first = Instant::now();
            for _ in 0..n {
                tx.send(payloads.next_payload())
                    .map_err(|_| anyhow!("broadcast: every receiver is gone"))?;
            }
            Ok(ProducerTally {
                first,
                finish: clock.producer_done(),
            })
        }));
    }
    // The receivers see `Closed` once the producers' senders are dropped too.
    drop(tx);

    let producers = join_all(producers).await?;
    let consumers = join_all(consumers).await?;
    Outcome::combine(&producers, consumers)
}
