//! A small web dashboard at `GET /`: one self-contained HTML page (no external assets) whose
//! script polls `/stats` (and `/stats/{topic}` for the topic clicked) every second and shows
//! topics with their publish and delivery rates (from successive counters), depth, lag and dead
//! letters, subscriptions, and the open MQTT connections (`mqtt.active` in `/stats`).

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
