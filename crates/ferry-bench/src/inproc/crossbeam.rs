//! `crossbeam-channel`: bounded channels of payload `Bytes` with the blocking API, so producers and
//! consumers are OS threads (scoped) rather than Tokio tasks. The topology is flume's: one
//! channel per fanout subscriber, or one MPMC channel shared by a group.

use std::thread;
use std::time::Instant;

use anyhow::{anyhow, Result};
use bytes::Bytes;

use super::{topology, Clock, RunSpec};
use crate::measure::{ConsumerTally, Outcome, PayloadSource, ProducerTally};

/// Runs `spec` on fresh channels and threads.
pub fn run(spec: &RunSpec, clock: Clock) -> Result<Outcome> {
    let (senders, receivers) = topology(spec.shape, || {
        crossbeam_channel::bounded::<Bytes>(spec.capacity)
    });
    thread::scope(|s| {
        let mut consumers = Vec::with_capacity(receivers.len());
        for rx in receivers {
            let mut tally = ConsumerTally::new(clock.clone())?;
            consumers.push(s.spawn(move || {
                // `Err` once every sender is dropped and the channel is drained.
                while let Ok(payload) = rx.recv() {
                    tally.observe(&payload);
                }
                tally
            }));
        }
        let mut producers = Vec::with_capacity(spec.shape.producers);
        for _ in 0..spec.shape.producers {
            let txs = senders.clone();
            let mut payloads = PayloadSource::new(spec.template, spec.sample_every, clock.clone());
            let (n, clock) = (spec.per_producer, clock.clone());
            producers.push(s.spawn(move || -> Result<ProducerTally> {
                let first = Instant::now();
                for _ in 0..n {
                    let payload = payloads.next_payload();
                    for tx in &txs {
                        tx.send(payload.clone())
                            .map_err(|_| anyhow!("crossbeam: the receivers are gone"))?;
                    }
                }
                Ok(ProducerTally {
                    first,
                    finish: clock.producer_done(),
                })
            }));
        }
        drop(senders);
        let producers = producers
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow!("a producer thread panicked"))?
            })
            .collect::<Result<Vec<_>>>()?;
        let consumers = consumers
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("a consumer thread panicked")))
            .collect::<Result<Vec<_>>>()?;
        Outcome::combine(&producers, consumers)
    })
}
