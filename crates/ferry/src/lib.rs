//! Ferry: an embeddable, log-structured message broker.
//!
//! Every topic is an append-only log of shared records; every subscription is a cursor on it.
//! A fanout subscription has a cursor of its own, a consumer group shares one cursor among its
//! members, so publishing costs the same whatever the number of subscribers and nothing is copied
//! per subscriber. At-least-once delivery keeps an in-flight table per cursor that drives
//! acknowledgement timeouts, redelivery, maximum attempts and then the topic's dead-letter queue.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use ferry::{Broker, Message};
//!
//! let broker = Broker::default();
//! let mut sub = broker.subscribe("telemetry/+/gpu")?;
//! let offset = broker.publish("telemetry/node1/gpu", Message::json(&42)?).await?;
//! let delivery = sub.recv().await?;
//! assert_eq!(delivery.offset(), offset);
//! assert_eq!(delivery.decode::<u32>()?, 42);
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`message`]: messages, ids, headers and records;
//! - [`topic`], [`filter`]: topic names and subscription filters (exact, MQTT wildcards, glob,
//!   regex), and a trie index that finds the filters matching a topic;
//! - `log`: a topic's in-memory log, holds and retention;
//! - `consumer`: cursors, the in-flight table, redelivery and dead-lettering;
//! - [`subscription`]: the consumer-side handle, its builder and deliveries;
//! - [`handler`]: handler pools with a concurrency limit and panic isolation;
//! - [`middleware`]: `tower` layers for handlers (timeouts, retries, limits, batches, dedup);
//! - [`dlq`]: dead-letter queues; [`stats`]: counters and snapshots; [`events`]: lifecycle events;
//! - `broker`: the registry, publishing, stats, maintenance and graceful shutdown;
//! - `signal`: the publisher-to-consumer wake-up hand-off (checked with loom);
//! - `io`: a durable broker's I/O threads, where storage work that waits for the disk runs.

#![deny(missing_docs)]

mod broker;
mod commit;
mod config;
mod consumer;
pub mod disk;
pub mod dlq;
mod error;
pub mod events;
pub mod fault;
pub mod filter;
mod filter_index;
pub mod handler;
mod headers_filter;
mod io;
mod loaded;
mod log;
pub mod message;
pub mod middleware;
mod router;
mod signal;
pub mod stats;
pub mod storage;
pub mod subscription;
mod sync;
pub mod tasks;
mod timers;
pub mod topic;
mod tx;

pub use broker::{Broker, Pipelined, Publisher, ShutdownReport, PAGE_SCAN_BUDGET};
pub use config::{BrokerConfig, HotWindow, Overflow, Retention, TopicConfig};
pub use consumer::AckMode;
pub use dlq::{DeadLetter, DeadLetterQueue, DeadLetterReason};
pub use error::{AckError, DeadLetterError, PublishError, RecvError, SubscribeError, TryRecvError};
pub use events::{BrokerEvent, EventReceiver};
pub use filter::{Scope, TopicFilter};
pub use handler::{
    BoxError, HandlerError, HandlerHandle, HandlerOptions, HandlerStats, Rejected, RetryAfter,
};
pub use headers_filter::HeaderMatch;
pub use message::{Headers, Message, MessageBuilder, MessageId, PayloadError, Priority, Record};
pub use router::Router;
pub use stats::{
    BrokerStats, CounterSnapshot, Health, LagStats, SubscriptionStats, TopicPage, TopicStats,
};
pub use subscription::{Delivery, Envelope, StartPosition, Subscription, SubscriptionBuilder};
pub use tasks::{GroupCollector, TaskQueue};
pub use topic::{TopicError, TopicName, RESERVED_LEVELS};
pub use tx::{Transaction, TxError, TxStatus};

pub use bytes::Bytes;
