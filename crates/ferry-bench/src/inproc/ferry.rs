//! Ferry: one topic, a [`Publisher`](::ferry::Publisher) per producer awaiting `publish` (it waits
//! under backpressure), subscribers reading with `recv().await` in a loop (the subscription takes
//! records from the topic in batches). Producers build each message with `Message::new(Bytes)`,
//! so the id and timestamp every Ferry message carries are part of the cost. The run ends with a
//! graceful `shutdown`, after which every `recv` returns an error once the subscription is
//! drained.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use ferry::{Broker, BrokerConfig, Message, TopicConfig};

use super::{join_all, Clock, RunSpec};
use crate::measure::{ConsumerTally, Outcome, PayloadSource, ProducerTally};

const TOPIC: &str = "bench/inproc";
const GROUP: &str = "bench-group";

/// Runs `spec` on a fresh broker.
pub async fn run(spec: &RunSpec, clock: Clock) -> Result<Outcome> {
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
        consumers.push(tokio::spawn(async move {
            // `Err` once the broker has closed and this subscription is drained.
            while let Ok(delivery) = sub.recv().await {
                tally.observe(delivery.payload());
            }
            Ok(tally)
        }));
    }

    let mut producers = Vec::with_capacity(spec.shape.producers);
    for _ in 0..spec.shape.producers {
        let publisher = broker.publisher(TOPIC)?;
        let mut payloads = PayloadSource::new(spec.template, spec.sample_every, clock.clone());
        let (n, clock) = (spec.per_producer, clock.clone());
        producers.push(tokio::spawn(async move {
            let first = Instant::now();
            for _ in 0..n {
                publisher
                    .publish(Message::new(payloads.next_payload()))
                    .await?;
            }
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
