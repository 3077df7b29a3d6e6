//! The HTTP admin API (axum): health, stats, Prometheus metrics, publishing, dead letters, and
//! its OpenAPI description at `/openapi.json`.
//!
//! Topic names contain `/`: in `/topics/{topic}/...` they are percent-encoded (`a%2Fb`); in
//! `/stats/{topic}` they may also be written plainly (`/stats/a/b`).

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use ferry::{Broker, DeadLetterError, Message, Priority, PublishError, TopicStats};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::mqtt::MqttHandle;

/// Prefix of request headers copied into the message's headers (`Ferry-Header-Env: prod` sets
/// header `env`).
pub const HEADER_PREFIX: &str = "ferry-header-";
/// How long a publish over HTTP may wait for room in a full topic.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct AppState {
    broker: Broker,
    mqtt: Option<MqttHandle>,
}

/// The API's router.
pub fn router(broker: Broker, mqtt: Option<MqttHandle>) -> Router {
    Router::new()
        .merge(crate::dashboard::router())
        .route("/health", get(health))
        .route("/stats", get(stats))
        .route("/stats/{*topic}", get(topic_stats))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/topics/{topic}/messages", post(publish))
        .route(
            "/topics/{topic}/dead-letters",
            get(list_dead_letters).delete(purge_dead_letters),
        )
        .route("/topics/{topic}/dead-letters/redrive", post(redrive))
        .with_state(AppState { broker, mqtt })
}

/// An error answer: `{"error": code, "message": text}`.
struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1, "message": self.2}))).into_response()
    }
}

impl From<PublishError> for ApiError {
    fn from(e: PublishError) -> Self {
        let status = match &e {
            PublishError::InvalidTopic(_) | PublishError::SystemTopic(_) => StatusCode::BAD_REQUEST,
            PublishError::BatchTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            PublishError::Full { .. } | PublishError::MemoryLimit { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            PublishError::Closed | PublishError::Timeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            PublishError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.code(), e.to_string())
    }
}

impl From<DeadLetterError> for ApiError {
    fn from(e: DeadLetterError) -> Self {
        match e {
            DeadLetterError::InvalidTopic(t) => {
                ApiError(StatusCode::BAD_REQUEST, "invalid_topic", t.to_string())
            }
            DeadLetterError::Publish(p) => p.into(),
            DeadLetterError::Closed => ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "closed",
                "broker is closed".into(),
            ),
        }
    }
}

async fn health(State(s): State<AppState>) -> Response {
    let h = s.broker.health();
    let status = if h.status == "running" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(h)).into_response()
}

fn all_topic_stats(broker: &Broker) -> Vec<TopicStats> {
    let mut topics = broker.topics();
    topics.sort();
    topics
        .iter()
        .filter_map(|t| broker.topic_stats(t.as_str()))
        .collect()
}

async fn stats(State(s): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "broker": s.broker.stats(),
        "topics": all_topic_stats(&s.broker),
        "subscriptions": s.broker.subscription_stats(),
        "mqtt": s.mqtt.as_ref().map(MqttHandle::stats),
    }))
}

async fn topic_stats(
    State(s): State<AppState>,
    Path(topic): Path<String>,
) -> Result<Json<TopicStats>, ApiError> {
    s.broker.topic_stats(&topic).map(Json).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "unknown_topic",
            format!("no topic {topic:?}"),
        )
    })
}

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

/// The Prometheus text exposition of the broker's and the MQTT front end's counters.
pub fn prometheus(broker: &Broker, mqtt: Option<&MqttHandle>) -> String {
    let mut out = String::new();
    let b = broker.stats();
    let topics = all_topic_stats(broker);
    let per_topic = |f: &dyn Fn(&TopicStats) -> f64| -> Vec<(String, f64)> {
        let mut v = Vec::with_capacity(topics.len());
        for t in &topics {
            v.push((format!("{{topic=\"{}\"}}", label(&t.topic)), f(t)));
        }
        v
    };
    macro_rules! counter {
        ($field:ident, $help:literal) => {{
            let name = concat!("ferry_", stringify!($field), "_total");
            let mut samples = vec![(String::new(), b.counters.$field as f64)];
            samples.extend(per_topic(&|t| t.counters.$field as f64));
            metric(&mut out, name, "counter", $help, &samples);
        }};
    }
    counter!(published, "Messages published (no label: all user topics).");
    counter!(delivered, "Deliveries handed to subscribers.");
    counter!(acked, "Deliveries acknowledged.");
    counter!(nacked, "Deliveries negatively acknowledged.");
    counter!(redelivered, "Redeliveries.");
    counter!(dead_lettered, "Messages dead-lettered.");
    counter!(
        dropped,
        "Messages dropped (no subscriber, overflow, shutdown)."
    );
    counter!(expired, "Messages expired before delivery.");
    counter!(filtered, "Messages skipped by header filters.");
    counter!(errors, "Handler errors.");
    let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
        metric(out, name, "gauge", help, &[(String::new(), v)]);
    };
    gauge(
        &mut out,
        "ferry_uptime_seconds",
        "Broker uptime.",
        b.uptime.as_secs_f64(),
    );
    gauge(&mut out, "ferry_topics", "User topics.", b.topics as f64);
    gauge(
        &mut out,
        "ferry_subscriptions",
        "Subscriptions and consumer groups.",
        b.subscriptions as f64,
    );
    gauge(
        &mut out,
        "ferry_dead_letters",
        "Records in dead-letter queues.",
        b.dead_letters as f64,
    );
    gauge(
        &mut out,
        "ferry_max_lag",
        "Largest subscription lag.",
        b.lag.max_lag as f64,
    );
    let mut depth = vec![(String::new(), b.depth as f64)];
    depth.extend(per_topic(&|t| t.depth as f64));
    metric(&mut out, "ferry_depth", "gauge", "Records stored.", &depth);
    let mut bytes = vec![(String::new(), b.bytes as f64)];
    bytes.extend(per_topic(&|t| t.bytes as f64));
    metric(&mut out, "ferry_bytes", "gauge", "Bytes stored.", &bytes);
    metric(
        &mut out,
        "ferry_topic_subscribers",
        "gauge",
        "Subscriptions reading a topic.",
        &per_topic(&|t| t.subscribers as f64),
    );
    if let Some(m) = mqtt {
        let m = m.stats();
        let c = |out: &mut String, name: &str, help: &str, v: u64| {
            metric(out, name, "counter", help, &[(String::new(), v as f64)]);
        };
        c(
            &mut out,
            "ferry_mqtt_connections_accepted_total",
            "MQTT connections accepted.",
            m.accepted,
        );
        c(
            &mut out,
            "ferry_mqtt_connections_refused_total",
            "MQTT CONNECTs refused.",
            m.refused,
        );
        c(
            &mut out,
            "ferry_mqtt_protocol_errors_total",
            "MQTT connections closed for protocol errors.",
            m.protocol_errors,
        );
        c(
            &mut out,
            "ferry_mqtt_keep_alive_timeouts_total",
            "MQTT connections closed by keep-alive expiry.",
            m.keep_alive_timeouts,
        );
        c(
            &mut out,
            "ferry_mqtt_publish_received_total",
            "MQTT PUBLISH packets received.",
            m.publish_received,
        );
        c(
            &mut out,
            "ferry_mqtt_publish_sent_total",
            "MQTT PUBLISH packets sent.",
            m.publish_sent,
        );
        c(
            &mut out,
            "ferry_mqtt_wills_published_total",
            "MQTT will messages published.",
            m.wills_published,
        );
        gauge(
            &mut out,
            "ferry_mqtt_connections",
            "Open MQTT connections.",
            m.active as f64,
        );
        gauge(
            &mut out,
            "ferry_mqtt_sessions_online",
            "Connected MQTT sessions.",
            m.sessions_online as f64,
        );
        gauge(
            &mut out,
            "ferry_mqtt_sessions_offline",
            "Persistent MQTT sessions of disconnected clients.",
            m.sessions_offline as f64,
        );
        gauge(
            &mut out,
            "ferry_mqtt_retained_messages",
            "Retained MQTT messages.",
            m.retained as f64,
        );
    }
    out
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        prometheus(&s.broker, s.mqtt.as_ref()),
    )
        .into_response()
}

/// Query parameters of a publish.
#[derive(Debug, Default, Deserialize)]
struct PublishQuery {
    /// Time to live in milliseconds.
    ttl_ms: Option<u64>,
    /// Delivery delay in milliseconds.
    delay_ms: Option<u64>,
    /// lowest, low, normal, high or highest.
    priority: Option<String>,
    /// Message key.
    key: Option<String>,
}

fn parse_priority(p: &str) -> Option<Priority> {
    Some(match p.to_ascii_lowercase().as_str() {
        "lowest" => Priority::Lowest,
        "low" => Priority::Low,
        "normal" => Priority::Normal,
        "high" => Priority::High,
        "highest" => Priority::Highest,
        _ => return None,
    })
}

#[derive(Serialize)]
struct Published {
    topic: String,
    offset: u64,
}

async fn publish(
    State(s): State<AppState>,
    Path(topic): Path<String>,
    Query(q): Query<PublishQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Published>), ApiError> {
    let mut b = Message::builder().payload(body).producer("http");
    for (name, value) in &headers {
        if let Some(h) = name.as_str().strip_prefix(HEADER_PREFIX) {
            let value = value.to_str().map_err(|_| {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    "invalid_header",
                    format!("header {name} is not visible ASCII"),
                )
            })?;
            b = b.header(h, value);
        }
    }
    if let Some(ms) = q.ttl_ms {
        b = b.ttl(Duration::from_millis(ms));
    }
    if let Some(ms) = q.delay_ms {
        b = b.delay(Duration::from_millis(ms));
    }
    if let Some(p) = &q.priority {
        let p = parse_priority(p).ok_or_else(|| {
            ApiError(
                StatusCode::BAD_REQUEST,
                "invalid_priority",
                format!("unknown priority {p:?} (lowest, low, normal, high, highest)"),
            )
        })?;
        b = b.priority(p);
    }
    if let Some(k) = q.key {
        b = b.key(Bytes::from(k));
    }
    let offset =
        match tokio::time::timeout(PUBLISH_TIMEOUT, s.broker.publish(&topic, b.build())).await {
            Ok(r) => r?,
            Err(_) => return Err(PublishError::Timeout(topic).into()),
        };
    Ok((StatusCode::CREATED, Json(Published { topic, offset })))
}

#[derive(Debug, Deserialize)]
struct MaxQuery {
    max: Option<usize>,
}

#[derive(Serialize)]
struct DeadLetterView {
    offset: u64,
    source_topic: String,
    source_offset: u64,
    reason: &'static str,
    detail: String,
    attempts: u32,
    dead_lettered_at_ms: u64,
    message_id: String,
    headers: Vec<(String, String)>,
    /// The payload as UTF-8 when it is, else `null` (see `payload_base16`).
    payload: Option<String>,
    payload_base16: String,
}

fn millis(t: SystemTime) -> u64 {
    u64::try_from(
        t.duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
}

async fn list_dead_letters(
    State(s): State<AppState>,
    Path(topic): Path<String>,
    Query(q): Query<MaxQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let dlq = s
        .broker
        .dead_letters(&topic)
        .map_err(DeadLetterError::from)?;
    let items: Vec<DeadLetterView> = dlq
        .list(q.max.unwrap_or(100))
        .into_iter()
        .map(|d| DeadLetterView {
            offset: d.offset,
            source_topic: d.source_topic,
            source_offset: d.source_offset,
            reason: d.reason.kind(),
            detail: match &d.reason {
                ferry::DeadLetterReason::Rejected(r) => r.clone(),
                _ => String::new(),
            },
            attempts: d.attempts,
            dead_lettered_at_ms: millis(d.dead_lettered_at),
            message_id: d.message.id().to_string(),
            headers: d
                .message
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            payload: std::str::from_utf8(d.message.payload())
                .ok()
                .map(str::to_string),
            payload_base16: crate::mqtt::convert::to_hex(d.message.payload()),
        })
        .collect();
    Ok(Json(
        json!({"topic": topic, "len": dlq.len(), "dead_letters": items}),
    ))
}

async fn redrive(
    State(s): State<AppState>,
    Path(topic): Path<String>,
    Query(q): Query<MaxQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let dlq = s
        .broker
        .dead_letters(&topic)
        .map_err(DeadLetterError::from)?;
    let n = dlq.redrive(q.max.unwrap_or(usize::MAX)).await?;
    Ok(Json(json!({"topic": topic, "redriven": n})))
}

async fn purge_dead_letters(
    State(s): State<AppState>,
    Path(topic): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let dlq = s
        .broker
        .dead_letters(&topic)
        .map_err(DeadLetterError::from)?;
    Ok(Json(json!({"topic": topic, "purged": dlq.purge()})))
}

async fn openapi() -> Json<serde_json::Value> {
    Json(openapi_document())
}

/// The OpenAPI 3.0 description of this API.
pub fn openapi_document() -> serde_json::Value {
    let topic_param = json!({
        "name": "topic", "in": "path", "required": true,
        "description": "Topic name, percent-encoded (a%2Fb for a/b)",
        "schema": {"type": "string"}
    });
    let max_param = |d: &str| json!({"name": "max", "in": "query", "required": false, "description": d, "schema": {"type": "integer", "minimum": 0}});
    let error = json!({"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let obj = |d: &str| json!({"description": d, "content": {"application/json": {"schema": {"type": "object"}}}});
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Ferry admin API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Health, stats, metrics, publishing and dead letters of a Ferry broker."
        },
        "paths": {
            "/health": {"get": {"summary": "Broker health", "responses": {
                "200": obj("running"), "503": obj("draining or closed")}}},
            "/stats": {"get": {"summary": "Broker, topic, subscription and MQTT stats", "responses": {"200": obj("Stats")}}},
            "/stats/{topic}": {"get": {"summary": "One topic's stats", "parameters": [topic_param],
                "responses": {"200": obj("TopicStats"), "404": error}}},
            "/metrics": {"get": {"summary": "Prometheus text exposition", "responses": {
                "200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": obj("OpenAPI")}}},
            "/topics/{topic}/messages": {"post": {
                "summary": "Publish a message (the body is the payload)",
                "parameters": [
                    topic_param,
                    {"name": "ttl_ms", "in": "query", "schema": {"type": "integer"}, "description": "Time to live (ms)"},
                    {"name": "delay_ms", "in": "query", "schema": {"type": "integer"}, "description": "Delivery delay (ms)"},
                    {"name": "priority", "in": "query", "schema": {"type": "string", "enum": ["lowest", "low", "normal", "high", "highest"]}},
                    {"name": "key", "in": "query", "schema": {"type": "string"}, "description": "Message key"}
                ],
                "description": "Request headers named Ferry-Header-<name> become message header <name>.",
                "requestBody": {"required": false, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                "responses": {
                    "201": {"description": "Published", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Published"}}}},
                    "400": error, "413": error, "429": error, "503": error, "500": error
                }
            }},
            "/topics/{topic}/dead-letters": {
                "get": {"summary": "List dead letters", "parameters": [topic_param, max_param("At most this many (default 100)")],
                    "responses": {"200": obj("Dead letters"), "400": error}},
                "delete": {"summary": "Purge dead letters", "parameters": [topic_param],
                    "responses": {"200": obj("{topic, purged}"), "400": error}}
            },
            "/topics/{topic}/dead-letters/redrive": {"post": {
                "summary": "Publish dead letters back to their topic",
                "parameters": [topic_param, max_param("At most this many (default all)")],
                "responses": {"200": obj("{topic, redriven}"), "400": error, "503": error}
            }}
        },
        "components": {"schemas": {
            "Error": {"type": "object", "required": ["error", "message"], "properties": {
                "error": {"type": "string", "description": "Stable code (invalid_topic, queue_full, ...)"},
                "message": {"type": "string"}}},
            "Published": {"type": "object", "required": ["topic", "offset"], "properties": {
                "topic": {"type": "string"}, "offset": {"type": "integer"}}}
        }}
    })
}
