//! The server's Prometheus metrics (`prometheus-client`): latency histograms and refusal
//! counters recorded as work happens, and the `/metrics` exposition that adds the engine's and
//! the MQTT front end's figures of the moment.
//!
//! Names (OpenMetrics text; counters end in `_total`):
//! - server totals, no labels: `ferry_published_total`, `ferry_delivered_total`,
//!   `ferry_acked_total`, `ferry_nacked_total`, `ferry_redelivered_total`,
//!   `ferry_dead_lettered_total`, `ferry_dropped_total`, `ferry_expired_total`,
//!   `ferry_filtered_total`, `ferry_errors_total`; gauges `ferry_uptime_seconds`,
//!   `ferry_topics`, `ferry_loaded_topics`, `ferry_subscriptions`, `ferry_depth`,
//!   `ferry_bytes`, `ferry_dead_letters`, `ferry_max_lag`; `ferry_mqtt_*` for the MQTT front
//!   end;
//! - per topic, label `topic`, only for the topics `http.metrics_topics` selects (at most
//!   `http.metrics_topic_limit`): `ferry_topic_published_total`, `ferry_topic_delivered_total`,
//!   `ferry_topic_acked_total`, `ferry_topic_dead_lettered_total`, `ferry_topic_dropped_total`,
//!   `ferry_topic_depth`, `ferry_topic_bytes`, `ferry_topic_subscribers`,
//!   `ferry_topic_max_lag`, `ferry_topic_dead_letters` (records in its dead-letter queue now).
//!   Summing a `ferry_topic_*` series never double-counts a total: totals have other names;
//! - histograms: `ferry_publish_ack_seconds{protocol="mqtt"|"http"}` (a QoS 1/2 PUBLISH
//!   decoded, or an HTTP publish received, to its acknowledgement queued once the engine
//!   confirmed the write) and `ferry_delivery_seconds` (a record's timestamp to its PUBLISH
//!   written for an MQTT subscriber; redeliveries and old records count their whole age);
//! - `ferry_refused_total{reason}`: requests refused by a limit, counted through
//!   [`ServerMetrics::refused`] by whoever enforces it.

use std::time::{Instant, SystemTime};

use ferry::{BrokerStats, TopicStats};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::mqtt::MqttStats;

/// The `protocol` label of the publish latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabel {
    protocol: &'static str,
}

/// The `reason` label of refusals.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The `topic` label of per-topic series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicLabel {
    topic: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs to about 6.5 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

/// What the server records as it works (shared by the MQTT and HTTP front ends).
#[derive(Debug, Clone)]
pub struct ServerMetrics {
    publish_ack: HistogramFamily<ProtocolLabel>,
    delivery: Histogram,
    refused: Family<ReasonLabel, Counter>,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        let m = ServerMetrics {
            publish_ack: Family::new_with_constructor(latency_histogram),
            delivery: latency_histogram(),
            refused: Family::default(),
        };
        // Both series exist from the start (an empty family is not shown at all).
        for protocol in ["mqtt", "http"] {
            drop(m.publish_ack.get_or_create(&ProtocolLabel { protocol }));
        }
        m
    }
}

impl ServerMetrics {
    /// A publish received at `received` over `protocol` ("mqtt", "http") is acknowledged now.
    pub fn publish_acked(&self, protocol: &'static str, received: Instant) {
        self.publish_ack
            .get_or_create(&ProtocolLabel { protocol })
            .observe(received.elapsed().as_secs_f64());
    }

    /// A record stamped `timestamp` is written to a subscriber now.
    pub fn delivered(&self, timestamp: SystemTime) {
        let age = SystemTime::now()
            .duration_since(timestamp)
            .unwrap_or_default();
        self.delivery.observe(age.as_secs_f64());
    }

    /// A request was refused by the limit `reason` (a short stable name, such as
    /// `"max_connections"`): `ferry_refused_total{reason}`.
    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// How many refusals `reason` counted.
    pub fn refused_count(&self, reason: &'static str) -> u64 {
        self.refused.get_or_create(&ReasonLabel { reason }).get()
    }
}

/// What one exposition shows.
pub struct Exposition<'a> {
    /// Recorded metrics.
    pub server: &'a ServerMetrics,
    /// Server totals (`None`: the caller may not see them).
    pub broker: Option<&'a BrokerStats>,
    /// MQTT front end figures (`None`: no MQTT, or the caller may not see them).
    pub mqtt: Option<&'a MqttStats>,
    /// Topics with series of their own.
    pub topics: &'a [TopicStats],
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c: Counter = Counter::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g: Gauge = Gauge::default();
    g.set(value);
    registry.register(name, help, g);
}

fn gauge_f64(registry: &mut Registry, name: &str, help: &str, value: f64) {
    let g: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
    g.set(value);
    registry.register(name, help, g);
}

fn int(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The OpenMetrics text of `e`.
pub fn encode(e: &Exposition<'_>) -> String {
    let mut r = Registry::default();
    r.register(
        "ferry_publish_ack_seconds",
        "Publish received to acknowledgement, after the engine confirmed the write",
        e.server.publish_ack.clone(),
    );
    r.register(
        "ferry_delivery_seconds",
        "Record timestamp to its delivery written to an MQTT subscriber",
        e.server.delivery.clone(),
    );
    r.register(
        "ferry_refused",
        "Requests refused by a limit, by limit",
        e.server.refused.clone(),
    );
    if let Some(b) = e.broker {
        let c = &b.counters;
        counter(
            &mut r,
            "ferry_published",
            "Messages published to user topics",
            c.published,
        );
        counter(
            &mut r,
            "ferry_delivered",
            "Deliveries handed to subscribers",
            c.delivered,
        );
        counter(&mut r, "ferry_acked", "Deliveries acknowledged", c.acked);
        counter(
            &mut r,
            "ferry_nacked",
            "Deliveries negatively acknowledged",
            c.nacked,
        );
        counter(&mut r, "ferry_redelivered", "Redeliveries", c.redelivered);
        counter(
            &mut r,
            "ferry_dead_lettered",
            "Messages dead-lettered",
            c.dead_lettered,
        );
        counter(
            &mut r,
            "ferry_dropped",
            "Messages dropped (no subscriber, overflow, shutdown)",
            c.dropped,
        );
        counter(
            &mut r,
            "ferry_expired",
            "Messages expired before delivery",
            c.expired,
        );
        counter(
            &mut r,
            "ferry_filtered",
            "Messages skipped by header filters",
            c.filtered,
        );
        counter(&mut r, "ferry_errors", "Handler errors", c.errors);
        gauge_f64(
            &mut r,
            "ferry_uptime_seconds",
            "Broker uptime",
            b.uptime.as_secs_f64(),
        );
        gauge(&mut r, "ferry_topics", "User topics", int(b.topics));
        gauge(
            &mut r,
            "ferry_loaded_topics",
            "Topics loaded in memory",
            int(b.loaded_topics),
        );
        gauge(
            &mut r,
            "ferry_subscriptions",
            "Subscriptions and consumer groups",
            int(b.subscriptions),
        );
        gauge(
            &mut r,
            "ferry_depth",
            "Records stored in user topics",
            int(b.depth),
        );
        gauge(
            &mut r,
            "ferry_bytes",
            "Bytes stored in user topics",
            int(b.bytes),
        );
        gauge(
            &mut r,
            "ferry_dead_letters",
            "Records in dead-letter queues",
            int(b.dead_letters),
        );
        gauge(
            &mut r,
            "ferry_max_lag",
            "Largest subscription lag",
            i64::try_from(b.lag.max_lag).unwrap_or(i64::MAX),
        );
    }
    if let Some(m) = e.mqtt {
        let c = |r: &mut Registry, name: &str, help: &str, v: u64| counter(r, name, help, v);
        c(
            &mut r,
            "ferry_mqtt_connections_accepted",
            "MQTT connections accepted",
            m.accepted,
        );
        c(
            &mut r,
            "ferry_mqtt_connections_refused",
            "MQTT CONNECTs refused",
            m.refused,
        );
        c(
            &mut r,
            "ferry_mqtt_protocol_errors",
            "MQTT connections closed for protocol errors",
            m.protocol_errors,
        );
        c(
            &mut r,
            "ferry_mqtt_keep_alive_timeouts",
            "MQTT connections closed by keep-alive expiry",
            m.keep_alive_timeouts,
        );
        c(
            &mut r,
            "ferry_mqtt_slow_consumer_disconnects",
            "MQTT connections closed because more than max_queued_bytes waited for their socket",
            m.slow_consumer_disconnects,
        );
        c(
            &mut r,
            "ferry_mqtt_slow_consumer_dropped",
            "QoS 0 messages dropped for MQTT connections over max_queued_bytes (drop_oldest)",
            m.slow_consumer_dropped,
        );
        c(
            &mut r,
            "ferry_mqtt_publish_received",
            "MQTT PUBLISH packets received",
            m.publish_received,
        );
        c(
            &mut r,
            "ferry_mqtt_publish_sent",
            "MQTT PUBLISH packets sent",
            m.publish_sent,
        );
        c(
            &mut r,
            "ferry_mqtt_wills_published",
            "MQTT will messages published",
            m.wills_published,
        );
        c(
            &mut r,
            "ferry_mqtt_acl_denied",
            "MQTT PUBLISH packets and SUBSCRIBE filters refused by the ACL",
            m.acl_denied,
        );
        gauge(
            &mut r,
            "ferry_mqtt_connections",
            "Open MQTT connections",
            int(m.active),
        );
        gauge(
            &mut r,
            "ferry_mqtt_sessions_online",
            "Connected MQTT sessions",
            int(m.sessions_online),
        );
        gauge(
            &mut r,
            "ferry_mqtt_sessions_offline",
            "Persistent MQTT sessions of disconnected clients",
            int(m.sessions_offline),
        );
        gauge(
            &mut r,
            "ferry_mqtt_retained_messages",
            "Retained MQTT messages",
            int(m.retained),
        );
    }
    if !e.topics.is_empty() {
        let family = |r: &mut Registry, name: &str, help: &str, v: &dyn Fn(&TopicStats) -> u64| {
            let f: Family<TopicLabel, Counter> = Family::default();
            for t in e.topics {
                f.get_or_create(&TopicLabel {
                    topic: t.topic.clone(),
                })
                .inc_by(v(t));
            }
            r.register(name, help, f);
        };
        family(
            &mut r,
            "ferry_topic_published",
            "Messages published to the topic",
            &|t| t.counters.published,
        );
        family(
            &mut r,
            "ferry_topic_delivered",
            "Deliveries of the topic's records",
            &|t| t.counters.delivered,
        );
        family(
            &mut r,
            "ferry_topic_acked",
            "Deliveries of the topic acknowledged",
            &|t| t.counters.acked,
        );
        family(
            &mut r,
            "ferry_topic_dead_lettered",
            "Records of the topic dead-lettered",
            &|t| t.counters.dead_lettered,
        );
        family(
            &mut r,
            "ferry_topic_dropped",
            "Records of the topic dropped",
            &|t| t.counters.dropped,
        );
        let gauges = |r: &mut Registry, name: &str, help: &str, v: &dyn Fn(&TopicStats) -> u64| {
            let f: Family<TopicLabel, Gauge> = Family::default();
            for t in e.topics {
                f.get_or_create(&TopicLabel {
                    topic: t.topic.clone(),
                })
                .set(i64::try_from(v(t)).unwrap_or(i64::MAX));
            }
            r.register(name, help, f);
        };
        gauges(
            &mut r,
            "ferry_topic_depth",
            "Records stored in the topic",
            &|t| t.depth as u64,
        );
        gauges(
            &mut r,
            "ferry_topic_bytes",
            "Bytes stored in the topic",
            &|t| t.bytes as u64,
        );
        gauges(
            &mut r,
            "ferry_topic_subscribers",
            "Subscriptions reading the topic",
            &|t| t.subscribers as u64,
        );
        gauges(
            &mut r,
            "ferry_topic_max_lag",
            "Largest lag on the topic",
            &|t| t.lag.max_lag,
        );
        gauges(
            &mut r,
            "ferry_topic_dead_letters",
            "Records in the topic's dead-letter queue now",
            &|t| t.dead_letters as u64,
        );
    }
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &r) {
        tracing::error!(error = %e, "encoding the metrics failed");
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn recorded_metrics_are_exposed() {
        let m = ServerMetrics::default();
        m.publish_acked("mqtt", Instant::now());
        m.delivered(SystemTime::now());
        m.refused("max_connections");
        m.refused("max_connections");
        assert_eq!(m.refused_count("max_connections"), 2);
        let text = encode(&Exposition {
            server: &m,
            broker: None,
            mqtt: None,
            topics: &[],
        });
        assert!(
            text.contains("ferry_publish_ack_seconds_count{protocol=\"mqtt\"} 1"),
            "{text}"
        );
        assert!(text.contains("ferry_delivery_seconds_count 1"), "{text}");
        assert!(
            text.contains("ferry_refused_total{reason=\"max_connections\"} 2"),
            "{text}"
        );
        assert!(!text.contains("ferry_published_total"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
