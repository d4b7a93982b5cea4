//! The HTTP surface: OpenAI and Anthropic endpoints, health and metrics.

pub mod anthropic;
pub mod common;
pub mod errors;
pub mod logprobs;
pub mod openai;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header;
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde_json::json;

use common::SharedState;

/// Every route, behind the API-key check and the request counter.
pub fn router(state: SharedState, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/models/{id}", get(openai::get_model))
        .route("/v1/messages", post(anthropic::messages))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(common::not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), common::guard))
        .with_state(state)
}

async fn health() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

async fn metrics(State(state): State<SharedState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
