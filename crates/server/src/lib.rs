//! `flash-moe serve`: an OpenAI- and Anthropic-compatible HTTP server in front of one engine.
//!
//! The model runs on the calling thread; HTTP runs on a tokio runtime of its own. Requests
//! wait in a bounded queue and run one at a time, each starting from the longest prompt prefix
//! the session has kept (see [`flash_moe_engine::engine::session`]).

pub mod api;
pub mod engine;
pub mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;

use flash_moe_engine::backend::Backend;
use flash_moe_engine::chat::ChatTemplate;
use flash_moe_engine::engine::sampler::SamplingParams;
use flash_moe_engine::engine::session::Session;
use flash_moe_engine::model::Model;
use flash_moe_engine::tokenizer::Tokenizer;

use api::common::{AppState, unix_time};
use metrics::{ExtraMetrics, Metrics};

/// How to serve.
pub struct ServerOptions {
    pub host: String,
    pub port: u16,
    /// Required of every client when set (`Authorization: Bearer` or `x-api-key`).
    pub api_key: Option<String>,
    /// Names the model answers to; the first is the one listed by `/v1/models`.
    pub model_names: Vec<String>,
    pub max_queue: usize,
    pub max_body_bytes: usize,
    /// Sampling where a request says nothing.
    pub defaults: SamplingParams,
    /// Metric lines from outside the server, appended to `/metrics`.
    pub extra_metrics: Option<ExtraMetrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {error}")]
    Bind { addr: String, error: std::io::Error },
    #[error("the HTTP server failed: {0}")]
    Http(std::io::Error),
}

/// Serves until Ctrl-C. `on_listening` is told the bound address (useful with port 0).
pub fn serve<B: Backend>(
    model: &Model<B>,
    tokenizer: Arc<Tokenizer>,
    template: Arc<ChatTemplate>,
    mut session: Session<B>,
    options: ServerOptions,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), ServerError> {
    let addr = format!("{}:{}", options.host, options.port);
    let listener = std::net::TcpListener::bind(&addr).map_err(|error| ServerError::Bind {
        addr: addr.clone(),
        error,
    })?;
    let bind_error = |error| ServerError::Bind {
        addr: addr.clone(),
        error,
    };
    listener.set_nonblocking(true).map_err(bind_error)?;
    on_listening(listener.local_addr().map_err(bind_error)?);
    let metrics = Arc::new(Metrics::new(options.extra_metrics));
    let (handle, queue) = engine::job_queue(options.max_queue, Arc::clone(&metrics));
    let state = Arc::new(AppState {
        engine: handle,
        tokenizer: Arc::clone(&tokenizer),
        template,
        model_names: options.model_names,
        api_key: options.api_key,
        max_context: session.max_context(),
        defaults: options.defaults,
        metrics: Arc::clone(&metrics),
        started: unix_time(),
    });
    let app = api::router(state, options.max_body_bytes);
    let http = std::thread::Builder::new()
        .name("http".into())
        .spawn(move || -> Result<(), std::io::Error> {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = tokio::signal::ctrl_c().await;
                    })
                    .await
            })
        })
        .map_err(ServerError::Http)?;
    // The queue closes when the HTTP side is gone (every handle dropped).
    engine::run_engine(model, &tokenizer, &mut session, queue, &metrics);
    match http.join() {
        Ok(result) => result.map_err(ServerError::Http),
        Err(_) => Err(ServerError::Http(std::io::Error::other("the HTTP thread panicked"))),
    }
}
