//! One publish/subscribe API over embedded Ferry, NATS JetStream, Redis Streams, RabbitMQ and
//! Kafka.
//!
//! A [`Backend`] publishes [`BackendMessage`]s to topics and makes subscriptions
//! ([`BackendSubscription`]) — fanout, or members of a consumer group — whose [`Delivery`]s are
//! settled with `ack`, `nack(delay)` or `reject`, with an ack timeout, attempt counts and dead
//! letters after `max_attempts`. [`connect`] picks the backend from a URL and returns an
//! `Arc<dyn Backend>`:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), ferry_backends::BackendError> {
//! use std::time::Duration;
//! use ferry_backends::{connect, BackendMessage, SubscribeOptions};
//!
//! let backend = connect("memory://").await?; // or nats://, redis://, amqp://, file:///dir
//! let mut workers = backend
//!     .subscribe(SubscribeOptions::new("orders").group("billing").ack_timeout(Duration::from_secs(5)))
//!     .await?;
//! backend.publish("orders", BackendMessage::new("order 1").with_key("customer-7")).await?;
//! let delivery = workers.next().await?;
//! assert_eq!(&delivery.payload[..], b"order 1");
//! delivery.ack().await?;
//! backend.close().await?;
//! # Ok(()) }
//! ```
//!
//! # Capabilities
//!
//! Every adapter states what it does natively, what the adapter emulates, and what it cannot do
//! ([`Backend::capabilities`], and `capabilities()` on each adapter type). The conformance suite
//! (`tests/conformance.rs`) runs the same cases on every backend and skips those whose
//! capability is unsupported.
//!
//! | capability | Ferry (`memory://`, `file://`) | NATS JetStream | Redis Streams | RabbitMQ | Kafka (feature `kafka`) |
//! | --- | --- | --- | --- | --- | --- |
//! | fanout | native | native (ephemeral consumer each) | native (a group each) | native (a queue each) | native (a consumer group each) |
//! | groups | native | native (durable pull consumer) | native (consumer group) | native (quorum queue) | native |
//! | ordering (per key / single subscriber) | native | native | native | native | native (per partition) |
//! | ack timeout | native | native (`ack_wait`) | emulated (`XAUTOCLAIM`) | emulated (timer, requeue) | unsupported |
//! | nack delay | native | native (`-NAK` delay) | emulated (capped at the ack timeout) | emulated (TTL queue) | emulated (in-process wait) |
//! | dead letters | native (`$dlq/<topic>`) | emulated (`<prefix>.dlq.<topic>`) | emulated (`<topic>:dlq`) | native (DLX, delivery limit) | emulated (`<topic>.dlq`) |
//! | wildcards (`a.*`, `a.#`) | native | native | unsupported | native | native (regex subscription) |
//! | replay (`Start::Earliest`) | native (retained records) | native | native | unsupported | native |
//! | durable groups | native (`file://`; in memory while the process lives) | native | native | native | native |
//! | atomic batch | native | unsupported | native (`MULTI`) | unsupported | unsupported |
//! | retries with backoff ([`Queue::serve`]) | native (nack delay) | native (`-NAK` delay) | emulated (delays capped at the ack timeout) | emulated (TTL delay queues) | emulated (in-process wait) |
//! | dead-letter redrive / purge | native | emulated (drain; acked dead letters are deleted) | emulated (drain; acked dead letters are `XDEL`ed) | emulated (drain) | unsupported |
//! | TTL (`ferry-expires-at`) | native (engine skips expired) | emulated (dropped on receipt) | emulated (dropped on receipt) | emulated (dropped on receipt) | emulated (dropped on receipt) |
//! | delayed delivery (`ferry-deliver-at`) | native | emulated (`-NAK` delay) | emulated (re-nacks, each at most the ack timeout) | emulated (TTL delay queues) | emulated (in-process wait) |
//! | priority lanes (`ferry-priority`) | native (engine priorities) | emulated (lane topics) | emulated (lane topics) | emulated (lane topics) | emulated (lane topics) |
//! | de-duplication | emulated (per handle) | native (`Nats-Msg-Id`, 2 min window) | emulated (per handle) | emulated (per handle) | emulated (per handle) |
//! | handler middleware (tower) | emulated (in-process) | emulated (in-process) | emulated (in-process) | emulated (in-process) | emulated (in-process) |
//! | stats | emulated (in-process) | emulated (in-process) | emulated (in-process) | emulated (in-process) | emulated (in-process) |
//!
//! The rows from "retries" down are the features above the contract, provided by a [`Queue`]
//! over any backend ([`queue`] documents how each is emulated, and what that costs). Expired
//! messages are dropped (acknowledged and counted), not dead-lettered.
//!
//! Each adapter module documents its mapping and limits: [`adapters::embedded`],
//! [`adapters::nats`], [`adapters::redis`], [`adapters::rabbitmq`] and (with the `kafka`
//! feature) `adapters::kafka`.
//!
//! # Filters
//!
//! Topics are `.`-separated levels. The portable wildcard syntax is `*` for exactly one level
//! and a trailing `#` for one or more levels ([`filter`]).
//!
//! # Errors
//!
//! Every operation returns a typed [`BackendError`] (`Unreachable`, `Timeout`, `Rejected`,
//! `InDoubt`, `Closed`, `Unsupported`, `Invalid`, `Stale`, ...) with a stable
//! [`code`](BackendError::code). Connecting retries transient failures with exponential backoff
//! ([`RetryPolicy`]); a service that refuses, drops or never answers the connection is
//! `Unreachable` once the attempts run out.
//!
//! # Losing the service
//!
//! A publish returns `Ok` only once the service confirmed the message, and is bounded by
//! [`ConnectOptions::operation_timeout`]. A failed publish says whether the message may have
//! been stored: [`BackendError::InDoubt`] (code `in_doubt`, [`BackendError::is_in_doubt`]) when
//! it was sent but its confirmation did not arrive (a confirmation timeout, the connection lost
//! after the send; NATS also counts a message its client buffered for the reconnect; the
//! embedded engine a store write or sync that failed), and any other error when it certainly
//! was not (transient while the service is away: `Unreachable`, or `Timeout` before the send;
//! a refusal: `Rejected`). [`Queue::publish`] sends an in-doubt publish again with the same id
//! only where the backend de-duplicates natively (NATS), and reports it elsewhere. When the
//! service is back:
//! NATS reconnects by itself (async-nats) and its subscriptions resume; the Redis adapter opens a
//! new connection on the next call, and its subscriptions reconnect their readers; the RabbitMQ
//! adapter opens a new connection on the next publish or subscribe, and its subscriptions
//! consume again on a new channel, declaring their queue again (with a backoff while the
//! service is away). On these three backends the same subscription delivers again once the
//! service is back, and `next` waits meanwhile rather than failing. What a RabbitMQ subscriber
//! may miss: a fanout subscription's queue dies with the connection, so the messages published
//! while it was disconnected are lost to it (as for an ephemeral subscriber); and a delivery
//! received before the loss can no longer be settled ([`BackendError::Stale`]), since RabbitMQ
//! took it back (a group's queue delivers it again). `tests/bad_conditions.rs` checks all of
//! this through a TCP proxy that it kills and restarts.

#![deny(missing_docs)]

pub mod adapters;
mod api;
mod capabilities;
mod connect;
mod error;
pub mod filter;
pub mod queue;

pub use api::{
    Acker, Backend, BackendMessage, BackendSubscription, Delivery, Position, Priority, PublishAck,
    Start, SubscribeOptions, DELIVER_AT_HEADER, DLQ_ATTEMPTS_HEADER, DLQ_REASON_HEADER,
    DLQ_TOPIC_HEADER, EXPIRES_AT_HEADER, PRIORITY_HEADER, REDRIVEN_HEADER,
};
pub use capabilities::{Capabilities, Support};
pub use connect::{connect, connect_with, redact_url, ConnectOptions, RetryPolicy};
pub use error::{BackendError, Result};
pub use queue::{
    Backoff, BoxError, DeadLetterInfo, Job, Permanent, Published, Queue, QueueConfig,
    QueueSubscription, Stats, Worker,
};
