//! Content-based routing (seed 004's `TopicRouter`): forward messages to other topics by topic
//! pattern (`game.*`, `player.*.joined`, `#`) or by a predicate on the message.
//!
//! [`Router::destinations`] is the pure decision; [`Router::start`] runs it as a handler pool on
//! a source filter and republishes each message to every destination (at least once: the
//! source delivery is acknowledged only after every forward succeeded). A router never forwards
//! messages of its own target topics, so a catch-all route cannot loop.

use std::sync::Arc;

use crate::broker::Broker;
use crate::error::SubscribeError;
use crate::filter::TopicFilter;
use crate::handler::{HandlerError, HandlerHandle, HandlerOptions};
use crate::message::Message;
use crate::topic::{TopicError, TopicName};

type Predicate = Arc<dyn Fn(&str, &Message) -> bool + Send + Sync>;

#[derive(Clone)]
enum When {
    Topic(TopicFilter),
    Predicate(Predicate),
}

#[derive(Clone)]
struct Route {
    when: When,
    target: TopicName,
}

/// A set of routes, evaluated in order; a message goes to every matching route's target.
#[derive(Clone, Default)]
pub struct Router {
    routes: Vec<Route>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let targets: Vec<&str> = self.routes.iter().map(|r| r.target.as_str()).collect();
        f.debug_struct("Router").field("targets", &targets).finish()
    }
}

impl Router {
    /// A router without routes.
    pub fn new() -> Self {
        Router::default()
    }

    /// Routes messages whose topic matches `pattern` (see [`TopicFilter::parse`]) to `target`.
    pub fn route(mut self, pattern: &str, target: &str) -> Result<Self, TopicError> {
        self.routes.push(Route {
            when: When::Topic(TopicFilter::parse(pattern)?),
            target: TopicName::new(target)?,
        });
        Ok(self)
    }

    /// Routes messages for which `predicate(topic, message)` holds to `target`.
    pub fn route_if(
        mut self,
        predicate: impl Fn(&str, &Message) -> bool + Send + Sync + 'static,
        target: &str,
    ) -> Result<Self, TopicError> {
        self.routes.push(Route {
            when: When::Predicate(Arc::new(predicate)),
            target: TopicName::new(target)?,
        });
        Ok(self)
    }

    /// The targets of a message published to `topic`, in route order, each once. Messages of
    /// the router's own targets go nowhere.
    pub fn destinations(&self, topic: &str, message: &Message) -> Vec<TopicName> {
        if self.routes.iter().any(|r| r.target.as_str() == topic) {
            return Vec::new();
        }
        let mut out: Vec<TopicName> = Vec::new();
        for r in &self.routes {
            let hit = match &r.when {
                When::Topic(f) => f.matches(topic),
                When::Predicate(p) => p(topic, message),
            };
            if hit && !out.contains(&r.target) {
                out.push(r.target.clone());
            }
        }
        out
    }

    /// Subscribes to `source` (consumer group `group`, so that several router instances share
    /// the work) and forwards every message to its destinations.
    pub fn start(
        self,
        broker: &Broker,
        source: &str,
        group: &str,
        options: HandlerOptions,
    ) -> Result<HandlerHandle, SubscribeError> {
        let router = Arc::new(self);
        let publisher = broker.clone();
        broker
            .subscription(source)
            .group(group)
            .handle(options, move |d| {
                let (router, broker) = (router.clone(), publisher.clone());
                async move {
                    for target in router.destinations(d.topic().as_str(), d.message()) {
                        broker
                            .publish(target.as_str(), d.message().clone())
                            .await
                            .map_err(HandlerError::retry)?;
                    }
                    Ok(())
                }
            })
    }
}
