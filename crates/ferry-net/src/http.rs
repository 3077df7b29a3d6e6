//! The HTTP admin API (axum): health, stats, Prometheus metrics, publishing, dead letters, and
//! its OpenAPI description at `/openapi.json`.
//!
//! Topic names contain `/`: in `/topics/{topic}/...` they may be written plainly
//! (`/topics/a/b/messages`: [`topic_path`] takes the route's known suffix off the end) or
//! percent-encoded (`a%2Fb`); in `/stats/{topic}` likewise.
//!
//! Every error is the JSON `{"error": code, "message": text}`, also those axum and the
//! limits answer (unknown route, wrong method, bad query, body too large or of the wrong type,
//! request timeout): [`with_json_errors`].

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use ferry::{Broker, DeadLetterError, Message, Priority, PublishError, TopicPage, TopicStats};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::bridge::Bridge;
use crate::config::{HttpConfig, MetricsTopics};
use crate::consume::{ConsumeError, FetchOptions, HttpConsumers, Settle, Settled, MAX_WAIT};
use crate::http_auth::{Caller, Denied, HttpAccess};
use crate::metrics::ServerMetrics;
use crate::mqtt::MqttHandle;
use crate::unix_time::unix_ms;
use tower_http::timeout::TimeoutLayer;

/// Prefix of request headers copied into the message's headers (`Ferry-Header-Env: prod` sets
/// header `env`).
pub const HEADER_PREFIX: &str = "ferry-header-";
/// How long a publish over HTTP may wait for room in a full topic.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct AppState {
    broker: Broker,
    mqtt: Option<MqttHandle>,
    bridge: Option<Arc<Bridge>>,
    consumers: Arc<HttpConsumers>,
    access: HttpAccess,
    metrics: ServerMetrics,
    metrics_topics: MetricsTopics,
    metrics_topic_limit: usize,
}

/// The API's router, each request limited to `http.request_timeout_secs` (a group fetch to
/// that plus the longest fetch wait).
/// With `bridge`, publishes go to the backend the server runs over.
pub fn router(
    broker: Broker,
    mqtt: Option<MqttHandle>,
    bridge: Option<Arc<Bridge>>,
    http: &HttpConfig,
) -> Router {
    let limit = Duration::from_secs(http.request_timeout_secs);
    let timeout = |d| TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, d);
    // A fetch waits up to its wait_ms for a first message before it answers.
    let fetches = Router::new()
        .route("/topics/{topic}/groups/{group}/fetch", post(fetch))
        .layer(timeout(limit.saturating_add(MAX_WAIT)));
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
        .route("/topics/{topic}/groups/{group}/ack", post(ack))
        .route("/topics/{topic}/groups/{group}/nack", post(nack))
        .route("/topics/{topic}/groups/{group}/reject", post(reject))
        .layer(timeout(limit))
        .merge(fetches)
        .with_state(AppState {
            consumers: Arc::new(HttpConsumers::new(broker.clone(), bridge.clone())),
            access: match &mqtt {
                Some(m) => HttpAccess::new(m.shared.auth.clone(), m.shared.acl.clone()),
                None => HttpAccess::open(),
            },
            metrics: mqtt
                .as_ref()
                .map(|m| m.server_metrics().clone())
                .unwrap_or_default(),
            metrics_topics: http.metrics_topics,
            metrics_topic_limit: http.metrics_topic_limit,
            broker,
            mqtt,
            bridge,
        })
}

/// `app` with the request body limit (`http.max_body_bytes`) and every error answer in the
/// API's JSON shape: what the handlers answer already is; what axum's extractors, its router
/// (unknown route, wrong method) and the timeout answer as plain text or nothing is rewritten
/// to `{"error": code, "message": text}` with the same status.
pub fn with_json_errors(app: Router, http: &HttpConfig) -> Router {
    app.layer(axum::middleware::from_fn(json_errors))
        .layer(DefaultBodyLimit::max(http.max_body_bytes))
}

/// The stable code of an error status the API's handlers do not answer themselves.
fn status_code_name(status: StatusCode) -> String {
    match status {
        StatusCode::BAD_REQUEST => "bad_request".into(),
        StatusCode::NOT_FOUND => "not_found".into(),
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed".into(),
        StatusCode::REQUEST_TIMEOUT => "request_timeout".into(),
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large".into(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type".into(),
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_body".into(),
        StatusCode::UPGRADE_REQUIRED => "upgrade_required".into(),
        StatusCode::INTERNAL_SERVER_ERROR => "internal".into(),
        StatusCode::SERVICE_UNAVAILABLE => "unavailable".into(),
        s => format!("http_{}", s.as_u16()),
    }
}

/// The middleware of [`with_json_errors`].
async fn json_errors(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let res = next.run(req).await;
    let status = res.status();
    let is_json = res
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    // Rejection texts are a line; anything longer is cut.
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = match (status, text.is_empty()) {
        (StatusCode::NOT_FOUND, true) => format!("no route {method} {path}"),
        (StatusCode::METHOD_NOT_ALLOWED, true) => {
            let allow = parts
                .headers
                .get(axum::http::header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            format!("{path} does not take {method} (allowed: {allow})")
        }
        (StatusCode::REQUEST_TIMEOUT, true) => {
            "the request did not complete within http.request_timeout_secs".to_string()
        }
        (_, true) => status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase(),
        (_, false) => text,
    };
    let body = json!({"error": status_code_name(status), "message": message}).to_string();
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts.headers.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// The route's part of a `/topics/` path after the topic, when the path ends in one:
/// `(topic, suffix)`.
fn split_topic_path(rest: &str) -> Option<(&str, &str)> {
    for suffix in ["/dead-letters/redrive", "/dead-letters", "/messages"] {
        if let Some(topic) = rest.strip_suffix(suffix) {
            return Some((topic, suffix));
        }
    }
    let (head, op) = rest.rsplit_once('/')?;
    if !matches!(op, "fetch" | "ack" | "nack" | "reject") {
        return None;
    }
    let (head, _group) = head.rsplit_once('/')?;
    let topic = head.strip_suffix("/groups")?;
    Some((topic, rest.get(topic.len()..)?))
}

/// Lets `/topics/{topic}/...` paths carry a topic with plain slashes: the route's known suffix
/// (`/messages`, `/dead-letters`, `/dead-letters/redrive`, `/groups/{group}/fetch|ack|nack|
/// reject`) is taken off the end and the slashes of what precedes it percent-encoded, before
/// routing. Other paths are left as they are.
pub fn topic_path<B>(req: &mut axum::http::Request<B>) {
    let Some(rest) = req.uri().path().strip_prefix("/topics/") else {
        return;
    };
    let Some((topic, suffix)) = split_topic_path(rest) else {
        return;
    };
    if !topic.contains('/') {
        return;
    }
    let mut path = format!("/topics/{}{suffix}", topic.replace('/', "%2F"));
    if let Some(q) = req.uri().query() {
        path.push('?');
        path.push_str(q);
    }
    let mut parts = req.uri().clone().into_parts();
    let Ok(pq) = axum::http::uri::PathAndQuery::try_from(path) else {
        return;
    };
    parts.path_and_query = Some(pq);
    if let Ok(uri) = axum::http::Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// The code of [`PublishError::InDoubt`], whose answer also says `"in_doubt": true`.
const IN_DOUBT: &str = "in_doubt";

/// An error answer: `{"error": code, "message": text}` (and `"in_doubt": true` for a publish
/// that may have been stored although it failed).
struct ApiError(StatusCode, &'static str, String);

impl From<Denied> for ApiError {
    fn from(d: Denied) -> Self {
        match d {
            Denied::Unauthenticated(why) => {
                ApiError(StatusCode::UNAUTHORIZED, "unauthenticated", why.to_string())
            }
            Denied::Forbidden(why) => ApiError(StatusCode::FORBIDDEN, "forbidden", why),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.0 == StatusCode::UNAUTHORIZED {
            return (
                self.0,
                [(
                    axum::http::header::WWW_AUTHENTICATE,
                    "Basic realm=\"ferry\"",
                )],
                Json(json!({"error": self.1, "message": self.2})),
            )
                .into_response();
        }
        let mut body = json!({"error": self.1, "message": self.2});
        if self.1 == IN_DOUBT {
            // A publish that may have been stored (every other error: not published).
            body["in_doubt"] = json!(true);
        }
        (self.0, Json(body)).into_response()
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
            // Not a passing condition (429 would invite retries): the broker is out of topics
            // until some are removed or the limit is raised.
            PublishError::TopicLimit { .. } => StatusCode::INSUFFICIENT_STORAGE,
            PublishError::Closed | PublishError::Timeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            PublishError::Storage(_) | PublishError::InDoubt { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError(status, e.code(), e.to_string())
    }
}

impl From<ConsumeError> for ApiError {
    fn from(e: ConsumeError) -> Self {
        let (status, code) = match &e {
            ConsumeError::Subscribe(_) => (StatusCode::BAD_REQUEST, "invalid_subscription"),
            ConsumeError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ConsumeError::Closed => (StatusCode::SERVICE_UNAVAILABLE, "closed"),
        };
        ApiError(status, code, e.to_string())
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
    let mut h = s.broker.health();
    // A failing save of the server's own state (sessions, retained messages, consumer
    // positions) degrades it as a failing engine write does.
    if let Some(failure) = s.mqtt.as_ref().and_then(|m| m.shared.save_failure()) {
        if matches!(h.status, "running" | "degraded") {
            h.status = "degraded";
            h.reason = Some(match h.reason.take() {
                Some(engine) => format!("{engine}; {failure}"),
                None => failure,
            });
        }
    }
    let status = if h.status == "running" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(h)).into_response()
}

/// Topics in a `/stats` page unless `limit` says otherwise.
pub const STATS_PAGE_DEFAULT: usize = 100;
/// The most topics (and subscriptions) in one `/stats` page.
pub const STATS_PAGE_MAX: usize = 1000;

/// Query parameters of `/stats`.
#[derive(Debug, Default, Deserialize)]
struct StatsQuery {
    /// Only topics whose name starts with this.
    prefix: Option<String>,
    /// Topics after this name (the `next` of the previous page).
    after: Option<String>,
    /// At most this many topics (1..=1000, default 100).
    limit: Option<usize>,
    /// `name` (default: pages in name order) or `depth` (the topics in use with the most
    /// records stored; one page, no cursor).
    sort: Option<String>,
}

fn invalid(what: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, "invalid_request", what)
}

/// The caller's topic page of `q` (on a blocking thread: it reads the store's catalog).
async fn topic_page(
    broker: &Broker,
    caller: Caller,
    q: StatsQuery,
) -> Result<(TopicPage, Caller), ApiError> {
    let limit = q.limit.unwrap_or(STATS_PAGE_DEFAULT);
    if limit == 0 || limit > STATS_PAGE_MAX {
        return Err(invalid(format!(
            "limit {limit} is outside 1..={STATS_PAGE_MAX}"
        )));
    }
    let by_depth = match q.sort.as_deref() {
        None | Some("name") => false,
        Some("depth") => true,
        Some(other) => return Err(invalid(format!("unknown sort {other:?} (name, depth)"))),
    };
    if by_depth && q.after.is_some() {
        return Err(invalid("sort=depth is one page: no after".into()));
    }
    let broker = broker.clone();
    blocking(move || {
        let prefix = q.prefix.unwrap_or_default();
        let visible = |t: &str| caller.may_see(t);
        let page = if by_depth {
            TopicPage {
                topics: broker.top_topics(&prefix, limit, &visible),
                next: None,
            }
        } else {
            broker.topic_page(&prefix, q.after.as_deref(), limit, &visible)
        };
        (page, caller)
    })
    .await
}

async fn stats(
    State(s): State<AppState>,
    q: Result<Query<StatsQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = s.access.caller(&headers).await?;
    // A malformed query (`limit=abc`) gets the API's error body too.
    let Query(q) = q.map_err(|e| invalid(e.body_text()))?;
    let (page, caller) = topic_page(&s.broker, caller, q).await?;
    let everything = caller.sees_all();
    // Server totals and subscriptions only for those who see every topic: they tell about
    // everyone's traffic and clients.
    let (broker, subscriptions, mqtt) = if everything {
        let broker = s.broker.clone();
        let (b, subs) = blocking(move || {
            let mut subs = broker.subscription_stats();
            subs.truncate(STATS_PAGE_MAX);
            (broker.stats(), subs)
        })
        .await?;
        (Some(b), subs, s.mqtt.as_ref().map(MqttHandle::stats))
    } else {
        (None, Vec::new(), None)
    };
    Ok(Json(json!({
        "broker": broker,
        "topics": page.topics,
        "next": page.next,
        "subscriptions": subscriptions,
        "mqtt": mqtt,
    })))
}

async fn topic_stats(
    State(s): State<AppState>,
    Path(topic): Path<String>,
    headers: HeaderMap,
) -> Result<Json<TopicStats>, ApiError> {
    let caller = s.access.caller(&headers).await?;
    let unknown = || {
        ApiError(
            StatusCode::NOT_FOUND,
            "unknown_topic",
            format!("no topic {topic:?}"),
        )
    };
    // A topic the caller may not consume is as unknown as one that does not exist: its
    // existence is not told either.
    if !caller.may_see(&topic) {
        return Err(unknown());
    }
    let broker = s.broker.clone();
    let name = topic.clone();
    // It may load a stored topic (on the broker's I/O threads): not on an async worker.
    blocking(move || broker.topic_stats(&name))
        .await?
        .map(Json)
        .ok_or_else(unknown)
}

/// The OpenMetrics exposition of what `caller` may see: server totals and MQTT figures when
/// it sees every topic, and series of the topics `http.metrics_topics` selects among those it
/// may see.
async fn exposition(s: &AppState, caller: Caller) -> Result<String, ApiError> {
    let broker = s.broker.clone();
    let (kind, limit) = (s.metrics_topics, s.metrics_topic_limit);
    let (stats, topics) = blocking(move || {
        let stats = caller.sees_all().then(|| broker.stats());
        let visible = |t: &str| caller.may_see(t);
        let topics = match kind {
            MetricsTopics::None => Vec::new(),
            MetricsTopics::Top => broker.top_topics("", limit, &visible),
        };
        (stats, topics)
    })
    .await?;
    let mqtt = match (&stats, &s.mqtt) {
        (Some(_), Some(m)) => Some(m.stats()),
        _ => None,
    };
    Ok(crate::metrics::encode(&crate::metrics::Exposition {
        server: &s.metrics,
        broker: stats.as_ref(),
        mqtt: mqtt.as_ref(),
        topics: &topics,
    }))
}

async fn metrics(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let caller = match s.access.caller(&headers).await {
        Ok(c) => c,
        Err(d) => return ApiError::from(d).into_response(),
    };
    match exposition(&s, caller).await {
        Ok(text) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
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
    /// The offset in the topic; `null` over a backend, whose positions are its own.
    offset: Option<u64>,
}

async fn publish(
    State(s): State<AppState>,
    Path(topic): Path<String>,
    Query(q): Query<PublishQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Published>), ApiError> {
    s.access.caller(&headers).await?.may_publish(&topic)?;
    let received = std::time::Instant::now();
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
    let message = b.build();
    let offset = match &s.bridge {
        Some(bridge) => {
            // Topic names are the engine's either way.
            ferry::TopicName::new(&topic).map_err(PublishError::InvalidTopic)?;
            match tokio::time::timeout(PUBLISH_TIMEOUT, bridge.publish(&topic, &message)).await {
                Ok(r) => r.map(|()| None)?,
                // Sent or not, the backend may still take it.
                Err(_) => {
                    return Err(PublishError::InDoubt {
                        reason: format!("backend did not confirm within {PUBLISH_TIMEOUT:?}"),
                        topic,
                    }
                    .into())
                }
            }
        }
        // A timeout waiting for space stores nothing; one waiting for the sync is in doubt.
        None => match s
            .broker
            .publish_timeout(&topic, message, PUBLISH_TIMEOUT)
            .await
        {
            Ok(offset) => Some(offset),
            Err(e) => {
                if matches!(e, PublishError::TopicLimit { .. }) {
                    s.metrics.refused("topic_limit");
                }
                return Err(e.into());
            }
        },
    };
    s.metrics.publish_acked("http", received);
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

async fn list_dead_letters(
    State(s): State<AppState>,
    Path(topic): Path<String>,
    Query(q): Query<MaxQuery>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    s.access.caller(&headers).await?.may_subscribe(&topic)?;
    let dlq = s
        .broker
        .dead_letters(&topic)
        .map_err(DeadLetterError::from)?;
    let max = q.max.unwrap_or(100);
    // Listing may read the store (on the broker's I/O threads): not on an async worker.
    let (listed, len) = blocking(move || (dlq.list(max), dlq.len())).await?;
    let items: Vec<DeadLetterView> = listed
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
            dead_lettered_at_ms: unix_ms(d.dead_lettered_at),
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
        json!({"topic": topic, "len": len, "dead_letters": items}),
    ))
}

async fn redrive(
    State(s): State<AppState>,
    Path(topic): Path<String>,
    Query(q): Query<MaxQuery>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    s.access.caller(&headers).await?.may_publish(&topic)?;
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
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    s.access.caller(&headers).await?.may_publish(&topic)?;
    let dlq = s
        .broker
        .dead_letters(&topic)
        .map_err(DeadLetterError::from)?;
    let purged = blocking(move || dlq.purge()).await?;
    Ok(Json(json!({"topic": topic, "purged": purged})))
}

/// Runs `work`, which waits for the broker's storage threads, on a blocking thread rather than
/// an async worker.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the request's work failed: {e}"),
        )
    })
}

#[derive(Debug, Deserialize)]
struct FetchQuery {
    max: Option<usize>,
    wait_ms: Option<u64>,
    ack_timeout_ms: Option<u64>,
    max_attempts: Option<u32>,
}

#[derive(Serialize)]
struct FetchedView {
    receipt: String,
    topic: String,
    offset: u64,
    attempt: u32,
    message_id: String,
    timestamp_ms: u64,
    headers: Vec<(String, String)>,
    key: Option<String>,
    /// The payload as UTF-8 when it is, else `null` (see `payload_base16`).
    payload: Option<String>,
    payload_base16: String,
}

async fn fetch(
    State(s): State<AppState>,
    Path((topic, group)): Path<(String, String)>,
    Query(q): Query<FetchQuery>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    s.access.caller(&headers).await?.may_subscribe(&topic)?;
    let d = FetchOptions::default();
    let o = FetchOptions {
        max: q.max.unwrap_or(d.max),
        wait: q.wait_ms.map_or(d.wait, Duration::from_millis),
        ack_timeout: q
            .ack_timeout_ms
            .map_or(d.ack_timeout, Duration::from_millis),
        max_attempts: q.max_attempts.unwrap_or(d.max_attempts),
    };
    let fetched = s.consumers.fetch(&group, &topic, o).await?;
    let messages: Vec<FetchedView> = fetched
        .into_iter()
        .map(|f| {
            let e = &f.envelope;
            let m = e.message();
            FetchedView {
                receipt: f.receipt,
                topic: e.topic().as_str().to_string(),
                offset: e.offset(),
                attempt: e.attempt(),
                message_id: m.id().to_string(),
                timestamp_ms: unix_ms(m.timestamp()),
                headers: m
                    .headers()
                    .iter()
                    .filter(|(k, _)| !k.starts_with(crate::mqtt::convert::MQTT_HEADER_PREFIX))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                payload: std::str::from_utf8(m.payload()).ok().map(str::to_string),
                payload_base16: crate::mqtt::convert::to_hex(m.payload()),
            }
        })
        .collect();
    Ok(Json(
        json!({"topic": topic, "group": group, "messages": messages}),
    ))
}

#[derive(Debug, Deserialize)]
struct SettleBody {
    receipts: Vec<String>,
    delay_ms: Option<u64>,
    reason: Option<String>,
}

/// Settles receipts of messages of `topic` (receipts of other topics are `unknown` here).
async fn settle(
    s: &AppState,
    topic: &str,
    headers: &HeaderMap,
    receipts: &[String],
    how: Settle,
) -> Result<Json<Settled>, ApiError> {
    s.access.caller(headers).await?.may_subscribe(topic)?;
    Ok(Json(s.consumers.settle(topic, receipts, &how)))
}

async fn ack(
    State(s): State<AppState>,
    Path((topic, _group)): Path<(String, String)>,
    headers: HeaderMap,
    Json(b): Json<SettleBody>,
) -> Result<Json<Settled>, ApiError> {
    settle(&s, &topic, &headers, &b.receipts, Settle::Ack).await
}

async fn nack(
    State(s): State<AppState>,
    Path((topic, _group)): Path<(String, String)>,
    headers: HeaderMap,
    Json(b): Json<SettleBody>,
) -> Result<Json<Settled>, ApiError> {
    let delay = b.delay_ms.map(Duration::from_millis);
    settle(&s, &topic, &headers, &b.receipts, Settle::Nack(delay)).await
}

async fn reject(
    State(s): State<AppState>,
    Path((topic, _group)): Path<(String, String)>,
    headers: HeaderMap,
    Json(b): Json<SettleBody>,
) -> Result<Json<Settled>, ApiError> {
    let reason = b.reason.unwrap_or_else(|| "rejected over HTTP".into());
    settle(&s, &topic, &headers, &b.receipts, Settle::Reject(reason)).await
}

async fn openapi() -> Json<serde_json::Value> {
    Json(openapi_document())
}

/// The OpenAPI 3.0 description of this API.
pub fn openapi_document() -> serde_json::Value {
    let topic_param = json!({
        "name": "topic", "in": "path", "required": true,
        "description": "Topic name, with its slashes as they are (a/b) or percent-encoded (a%2Fb)",
        "schema": {"type": "string"}
    });
    let group_param = json!({
        "name": "group", "in": "path", "required": true,
        "description": "Consumer group name (no '/', '+' or '#')",
        "schema": {"type": "string"}
    });
    let settle_body = |d: &str| json!({"required": true, "description": d, "content": {"application/json": {"schema": {"type": "object"}}}});
    let max_param = |d: &str| json!({"name": "max", "in": "query", "required": false, "description": d, "schema": {"type": "integer", "minimum": 0}});
    let error = json!({"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let obj = |d: &str| json!({"description": d, "content": {"application/json": {"schema": {"type": "object"}}}});
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Ferry admin API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Health, stats, metrics, publishing and dead letters of a Ferry broker. Every error is an Error object: also 404 (unknown route), 405 (wrong method), 408 (request not complete within http.request_timeout_secs), 413 (body over http.max_body_bytes), 415/422/400 (body or query not as described) and 503 too_many_connections (past http.max_connections or http.max_connections_per_address)."
        },
        "paths": {
            "/health": {"get": {"summary": "Broker health", "responses": {
                "200": obj("running"), "503": obj("draining or closed, or degraded: a storage write or a state save is failing (see reason)")}}},
            "/stats": {"get": {"summary": "Broker totals, one page of topic stats, subscriptions and MQTT stats",
                "description": "Topics come a page at a time, in name order: follow `next` (pass it as `after`) until it is null. A page may be short (or empty) with a `next` when many topics the caller may not see were skipped. Callers see only the topics they may consume; `broker`, `subscriptions` and `mqtt` are null/empty unless the caller may consume every topic or is an administrator.",
                "parameters": [
                    {"name": "prefix", "in": "query", "schema": {"type": "string"}, "description": "Only topics whose name starts with this"},
                    {"name": "after", "in": "query", "schema": {"type": "string"}, "description": "Topics after this name (the previous page's next)"},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": STATS_PAGE_MAX}, "description": "At most this many topics (default 100)"},
                    {"name": "sort", "in": "query", "schema": {"type": "string", "enum": ["name", "depth"]}, "description": "depth: the topics in use with the most records stored (one page, no after)"}
                ],
                "responses": {"200": obj("{broker, topics: [TopicStats], next, subscriptions, mqtt}"), "400": error}}},
            "/stats/{topic}": {"get": {"summary": "One topic's stats", "parameters": [topic_param],
                "responses": {"200": obj("TopicStats"), "404": error}}},
            "/metrics": {"get": {"summary": "OpenMetrics text exposition (server totals, the per-topic series http.metrics_topics selects, latency histograms)", "responses": {
                "200": {"description": "Metrics", "content": {"application/openmetrics-text": {"schema": {"type": "string"}}}}}}},
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
                    "400": error, "408": error, "413": error, "429": error, "507": error, "503": error, "500": error
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
            }},
            "/topics/{topic}/groups/{group}/fetch": {"post": {
                "summary": "Take messages for a consumer group (the same group as MQTT $share/<group>/<topic>)",
                "description": "Each message carries a receipt; settle it with ack, nack or reject before the ack timeout, else it goes back to the group and comes again with a higher attempt.",
                "parameters": [
                    topic_param, group_param,
                    {"name": "max", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}, "description": "At most this many (default 10)"},
                    {"name": "wait_ms", "in": "query", "schema": {"type": "integer", "maximum": 30000}, "description": "Wait this long for the first message (default 0)"},
                    {"name": "ack_timeout_ms", "in": "query", "schema": {"type": "integer", "minimum": 100}, "description": "Ack timeout of this server's member, when it is made (default 30000)"},
                    {"name": "max_attempts", "in": "query", "schema": {"type": "integer", "minimum": 1}, "description": "Attempts before dead-lettering, when the member is made (default 3)"}
                ],
                "responses": {"200": obj("{topic, group, messages: [{receipt, topic, offset, attempt, message_id, timestamp_ms, headers, key, payload, payload_base16}]}"), "400": error, "503": error}
            }},
            "/topics/{topic}/groups/{group}/ack": {"post": {
                "summary": "Acknowledge fetched messages", "parameters": [topic_param, group_param],
                "requestBody": settle_body("{receipts: [string]}"),
                "responses": {"200": {"description": "Settled", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Settled"}}}}, "400": error, "415": error, "422": error}
            }},
            "/topics/{topic}/groups/{group}/nack": {"post": {
                "summary": "Return fetched messages to the group, now or after delay_ms", "parameters": [topic_param, group_param],
                "requestBody": settle_body("{receipts: [string], delay_ms?: integer}"),
                "responses": {"200": {"description": "Settled", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Settled"}}}}, "400": error, "415": error, "422": error}
            }},
            "/topics/{topic}/groups/{group}/reject": {"post": {
                "summary": "Dead-letter fetched messages with a reason", "parameters": [topic_param, group_param],
                "requestBody": settle_body("{receipts: [string], reason?: string}"),
                "responses": {"200": {"description": "Settled", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Settled"}}}}, "400": error, "415": error, "422": error}
            }}
        },
        "security": [{}, {"basic": []}],
        "components": {
          "securitySchemes": {"basic": {"type": "http", "scheme": "basic",
            "description": "The server's users (argon2 hashes in its config) with their topic ACLs; needed unless anonymous access is on. /health is always open."}},
          "schemas": {
            "Error": {"type": "object", "required": ["error", "message"], "properties": {
                "error": {"type": "string", "description": "Stable code (invalid_topic, queue_full, ...)"},
                "message": {"type": "string"},
                "in_doubt": {"type": "boolean", "description": "Present (true) when a failed publish may have been stored (error in_doubt); any other error means not published"}}},
            "Published": {"type": "object", "required": ["topic", "offset"], "properties": {
                "topic": {"type": "string"}, "offset": {"type": "integer", "nullable": true, "description": "null when serving over a backend"}}},
            "Settled": {"type": "object", "required": ["settled", "unknown"], "properties": {
                "settled": {"type": "integer"},
                "unknown": {"type": "array", "items": {"type": "string"}, "description": "Receipts no longer in flight (ack timeout passed, already settled) or never issued"}}}
          }
        }
    })
}
