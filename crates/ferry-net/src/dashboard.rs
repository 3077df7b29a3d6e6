//! A small web dashboard at `GET /`: one self-contained HTML page (no external assets) whose
//! script polls `/stats` (and `/stats/{topic}` for the topic clicked) every second and shows
//! the server's totals, one page of 50 topics (a prefix filter, `?prefix=` in the page's own
//! address too, next/first page buttons, or the topics in use with the most stored) with their
//! publish and delivery rates (from successive counters), depth, lag and the records in their
//! dead-letter queue now (red while there are any), subscriptions, and the open MQTT
//! connections (`mqtt.active` in `/stats`). It never asks for the whole topic list, so it works
//! the same with a million topics; a caller who may not see the totals sees "n/a" there.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

/// The page, built into the binary.
pub const PAGE: &str = include_str!("dashboard.html");

/// The dashboard's route (`GET /`), to merge into the API's router.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/", get(page))
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}
