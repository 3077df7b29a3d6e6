//! Message groups and a task queue, on top of subscriptions and consumer groups.
//!
//! - **Groups** (seed 002's grouped messages): messages that carry a group id and the group's
//!   size ([`MessageBuilder::in_group`](crate::MessageBuilder::in_group)) are collected by a
//!   [`GroupCollector`] until the group is complete, then handed over together.
//! - **Tasks** (seed 004's task processor): a [`TaskQueue`] publishes named tasks with a
//!   priority to a topic and runs registered async handlers for them over a consumer group with
//!   a worker limit; a task nobody registered is dead-lettered with reason `unknown task <name>`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use crate::broker::Broker;
use crate::error::{PublishError, RecvError, SubscribeError};
use crate::handler::{HandlerError, HandlerHandle, HandlerOptions};
use crate::message::{Message, Priority};
use crate::subscription::{Delivery, Subscription};

/// Header names used by groups and tasks.
pub mod headers {
    /// The id of the group a message belongs to.
    pub const GROUP_ID: &str = "ferry-group-id";
    /// How many messages the group has.
    pub const GROUP_SIZE: &str = "ferry-group-size";
    /// The name of the task a message carries.
    pub const TASK: &str = "ferry-task";
}

/// Collects grouped messages from a subscription and yields each group once complete.
/// Messages without a group id (or with an unreadable size) are yielded on their own.
#[derive(Debug)]
pub struct GroupCollector {
    sub: Subscription,
    partial: HashMap<String, (usize, Vec<Delivery>)>,
}

impl GroupCollector {
    /// Collects from `sub`.
    pub fn new(sub: Subscription) -> Self {
        GroupCollector {
            sub,
            partial: HashMap::new(),
        }
    }

    /// Groups still incomplete, and how many of their messages have arrived.
    pub fn pending(&self) -> Vec<(String, usize, usize)> {
        self.partial
            .iter()
            .map(|(id, (size, got))| (id.clone(), got.len(), *size))
            .collect()
    }

    /// The next complete group (in arrival order within the group).
    pub async fn next_group(&mut self) -> Result<Vec<Delivery>, RecvError> {
        loop {
            let d = self.sub.recv().await?;
            let group = d.header(headers::GROUP_ID).map(str::to_string);
            let size = d
                .header(headers::GROUP_SIZE)
                .and_then(|s| s.parse::<usize>().ok())
                .filter(|s| *s > 0);
            let (Some(id), Some(size)) = (group, size) else {
                return Ok(vec![d]);
            };
            let entry = self.partial.entry(id.clone()).or_insert((size, Vec::new()));
            entry.1.push(d);
            if entry.1.len() >= entry.0 {
                if let Some((_, group)) = self.partial.remove(&id) {
                    return Ok(group);
                }
            }
        }
    }
}

type TaskFn = Arc<
    dyn Fn(Bytes) -> Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send>> + Send + Sync,
>;

/// A queue of named tasks processed by a pool of workers (a consumer group).
#[derive(Clone)]
pub struct TaskQueue {
    broker: Broker,
    topic: String,
    handlers: HashMap<String, TaskFn>,
}

impl std::fmt::Debug for TaskQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.handlers.keys().collect();
        names.sort();
        f.debug_struct("TaskQueue")
            .field("topic", &self.topic)
            .field("tasks", &names)
            .finish()
    }
}

impl TaskQueue {
    /// A task queue on `topic`.
    pub fn new(broker: &Broker, topic: impl Into<String>) -> Self {
        TaskQueue {
            broker: broker.clone(),
            topic: topic.into(),
            handlers: HashMap::new(),
        }
    }

    /// Registers the handler of tasks named `name`; it receives the task's payload.
    pub fn register<F, Fut>(mut self, name: impl Into<String>, handler: F) -> Self
    where
        F: Fn(Bytes) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let f: TaskFn = Arc::new(move |payload| Box::pin(handler(payload)));
        self.handlers.insert(name.into(), f);
        self
    }

    /// Submits a task. Returns its offset in the queue's topic.
    pub async fn submit(
        &self,
        name: &str,
        payload: impl Into<Bytes>,
        priority: Priority,
    ) -> Result<u64, PublishError> {
        let message = Message::builder()
            .payload(payload)
            .header(headers::TASK, name)
            .priority(priority)
            .build();
        self.broker.publish(&self.topic, message).await
    }

    /// Starts `workers` workers (a consumer group named `tasks:<topic>`, at-least-once).
    pub fn start(&self, workers: usize) -> Result<HandlerHandle, SubscribeError> {
        let handlers = Arc::new(self.handlers.clone());
        self.broker
            .subscription(&self.topic)
            .group(format!("tasks:{}", self.topic))
            .manual_ack()
            .batch_size(1)
            .handle(
                HandlerOptions {
                    concurrency: workers,
                },
                move |d| {
                    let handlers = handlers.clone();
                    async move {
                        let name = d.header(headers::TASK).unwrap_or("").to_string();
                        match handlers.get(&name) {
                            Some(h) => h(d.payload().clone()).await,
                            None => Err(HandlerError::reject(format!("unknown task {name:?}"))),
                        }
                    }
                },
            )
    }
}
