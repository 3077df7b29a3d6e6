//! Ferry: one topic, a [`Publisher`](::ferry::Publisher) per producer awaiting `publish` (it waits
//! under backpressure), subscribers reading with `recv().await` in a loop (the subscription takes
//! records from the topic in batches). Producers build each message with `Message::new(Bytes)`,
//! so the id and timestamp every Ferry message carries are part of the cost. The run ends with a
//! graceful `shutdown`, after which every `recv` returns an error once the subscription is
//! drained.
//!
//! The delivery-control scenarios publish in other ways (see [`Mode`]), and their subscribers
//! check that they receive every offset exactly once.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use ferry::{
    Broker, BrokerConfig, Message, Priority, PublishError, Publisher, TopicConfig, TxError,
};

use super::{Clock, RunSpec};
use crate::measure::{chunks, join_all, ConsumerTally, Outcome, PayloadSource, ProducerTally};

/// The topic every run publishes to.
pub const TOPIC: &str = "bench/inproc";
const GROUP: &str = "bench-group";

/// How the producers publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `Publisher::publish(Message::new(payload))`, the peers' equivalent (scenarios a-c).
    Plain,
    /// `Publisher::publish` of messages made with `Message::builder()`, their priority cycling
    /// over the levels.
    Priorities(&'static [Priority]),
    /// `Publisher::publish_batch` of this many `Message::new`s at a time.
    Batch(u64),
    /// Transactions of this many messages: `Broker::begin`, a `Transaction::publish` of a
    /// `Message::new` each, `commit` (which does not wait for space: a commit refused because
    /// the topic is full is retried after yielding to the scheduler).
    Transaction(u64),
}

/// Runs `spec` on a fresh broker, publishing in `mode`. Except in [`Mode::Plain`], a subscriber
/// that receives every message (not a group member) also checks that it receives every offset
/// exactly once.
pub async fn run(spec: &RunSpec, clock: Clock, mode: Mode) -> Result<Outcome> {
    let broker = Broker::new(BrokerConfig {
        topic_defaults: TopicConfig {
            capacity: spec.capacity,
            ..TopicConfig::default()
        },
        ..BrokerConfig::default()
    });

    let mut consumers = Vec::with_capacity(spec.shape.consumers);
    for _ in 0..spec.shape.consumers {
        let builder = broker.subscription(TOPIC);
        let builder = if spec.shape.group {
            builder.group(GROUP)
        } else {
            builder
        };
        let mut sub = builder.build()?;
        let mut tally = ConsumerTally::new(clock.clone())?;
        if mode != Mode::Plain && !spec.shape.group {
            // One producer per topic writes offsets 0..published (several interleave them).
            tally = tally.exactly_once(spec.published());
        }
        consumers.push(tokio::spawn(async move {
            // `Err` once the broker has closed and this subscription is drained.
            while let Ok(delivery) = sub.recv().await {
                tally.observe(delivery.payload());
                tally.observe_seq(delivery.offset());
            }
            Ok(tally)
        }));
    }

    let mut producers = Vec::with_capacity(spec.shape.producers);
    for _ in 0..spec.shape.producers {
        let (broker, publisher) = (broker.clone(), broker.publisher(TOPIC)?);
        let mut payloads = PayloadSource::new(spec.template, spec.sample_every, clock.clone());
        let (n, clock) = (spec.per_producer, clock.clone());
        producers.push(tokio::spawn(async move {
            let first = Instant::now();
            produce(&broker, &publisher, mode, n, &mut payloads).await?;
            Ok(ProducerTally {
                first,
                finish: clock.producer_done(),
            })
        }));
    }

    let producers = join_all(producers).await?;
    let report = broker.shutdown(Duration::from_secs(60)).await;
    let consumers = join_all(consumers).await?;
    if !report.drained {
        bail!("the subscribers did not drain within the shutdown timeout: {report:?}");
    }
    Outcome::combine(&producers, consumers)
}

/// Publishes `n` messages to the benchmark topic in `mode` (through `publisher`, or in
/// transactions of `broker`).
async fn produce(
    broker: &Broker,
    publisher: &Publisher,
    mode: Mode,
    n: u64,
    payloads: &mut PayloadSource,
) -> Result<()> {
    match mode {
        Mode::Plain => {
            for _ in 0..n {
                publisher
                    .publish(Message::new(payloads.next_payload()))
                    .await?;
            }
        }
        Mode::Priorities(levels) => {
            if levels.is_empty() {
                bail!("no priority levels to cycle over");
            }
            for &priority in levels.iter().cycle().take(usize::try_from(n)?) {
                let message = Message::builder()
                    .payload(payloads.next_payload())
                    .priority(priority)
                    .build();
                publisher.publish(message).await?;
            }
        }
        Mode::Batch(size) => {
            for len in chunks(n, size) {
                let batch = (0..len).map(|_| Message::new(payloads.next_payload()));
                publisher.publish_batch(batch).await?;
            }
        }
        Mode::Transaction(size) => {
            for len in chunks(n, size) {
                let tx = broker.begin()?;
                for _ in 0..len {
                    tx.publish(TOPIC, Message::new(payloads.next_payload()))?;
                }
                // `commit` cannot wait for space: retry until the subscriber has made room.
                while let Err(e) = tx.commit() {
                    match e {
                        TxError::Publish(PublishError::Full { .. }) => {
                            tokio::task::yield_now().await;
                        }
                        e => return Err(e.into()),
                    }
                }
            }
        }
    }
    Ok(())
}
