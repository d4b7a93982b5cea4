//! What both APIs share: server state, API keys, request bodies, turning a conversation into
//! a prompt, and turning the engine's text back into reasoning, answer and tool calls.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
pub use flash_moe_engine::chat::random_id;
use flash_moe_engine::chat::{ChatEvent, ChatTemplate, Message, OutputParser, ToolCall, ToolChoice, build_prompt};
use flash_moe_engine::engine::logprobs::TokenLogprob;
use flash_moe_engine::engine::sampler::SamplingParams;
use flash_moe_engine::engine::session::{Completion, GenerationRequest};
use flash_moe_engine::tokenizer::Tokenizer;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::errors::{ApiError, ErrorKind, Flavor};
use crate::engine::{EngineEvent, EngineHandle, SubmitError};
use crate::metrics::Metrics;

/// Everything a handler needs.
pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Arc<ChatTemplate>,
    /// Names the model answers to; the first is the one listed.
    pub model_names: Vec<String>,
    pub api_key: Option<String>,
    pub max_context: usize,
    /// Sampling used where a request says nothing (from the model's generation_config.json).
    pub defaults: SamplingParams,
    pub metrics: Arc<Metrics>,
    pub started: u64,
}

pub type SharedState = Arc<AppState>;

/// Rejects requests without the right key (`Authorization: Bearer KEY` or `x-api-key: KEY`),
/// and counts every request by endpoint and status.
pub async fn guard(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    let flavor = Flavor::of_path(&path);
    let open = matches!(path.as_str(), "/health" | "/metrics");
    let response = match &state.api_key {
        Some(key) if !open && presented_key(request.headers()) != Some(key.as_str()) => {
            let message = match presented_key(request.headers()) {
                None => "missing API key: send `Authorization: Bearer KEY` or `x-api-key: KEY`",
                Some(_) => "incorrect API key provided",
            };
            ApiError::new(flavor, ErrorKind::Authentication, message)
                .with_code("invalid_api_key")
                .into_response()
        }
        _ => next.run(request).await,
    };
    let endpoint = match path.as_str() {
        "/v1/chat/completions" | "/v1/completions" | "/v1/messages" | "/v1/models" | "/health" | "/metrics" => &path,
        p if p.starts_with("/v1/models/") => "/v1/models/{id}",
        _ => "other",
    };
    state.metrics.record_request(endpoint, response.status().as_u16());
    response
}

fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    bearer.or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
}

/// JSON for unknown routes.
pub async fn not_found(request: Request) -> ApiError {
    let flavor = Flavor::of_path(request.uri().path());
    let path = request.uri().path();
    ApiError::new(
        flavor,
        ErrorKind::NotFound,
        format!("no such endpoint: {} {path}", request.method()),
    )
}

/// Parses a request body, answering malformed JSON, fields of the wrong type and oversized
/// bodies the way the APIs do (400 naming the field, 413).
pub fn parse_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>, flavor: Flavor) -> Result<T, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(flavor, ErrorKind::TooLarge, "the request body is too large")
        } else {
            ApiError::invalid(flavor, format!("could not read the request body: {rejection}"))
        }
    })?;
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::invalid(flavor, format!("the body is not valid JSON: {inner}"))
        } else if path == "." {
            ApiError::invalid(flavor, format!("invalid request: {inner}"))
        } else {
            ApiError::invalid(flavor, format!("invalid `{path}`: {inner}")).with_param(&path)
        }
    })
}

impl AppState {
    /// Checks the requested model name.
    pub fn check_model(&self, name: &str, flavor: Flavor) -> Result<(), ApiError> {
        if self.model_names.iter().any(|n| n == name) {
            return Ok(());
        }
        Err(ApiError::new(
            flavor,
            ErrorKind::NotFound,
            format!(
                "the model `{name}` does not exist (this server runs `{}`)",
                self.model_names[0]
            ),
        )
        .with_param("model")
        .with_code("model_not_found"))
    }

    pub fn submit(&self, request: GenerationRequest, flavor: Flavor) -> Result<mpsc::Receiver<EngineEvent>, ApiError> {
        self.engine.submit(request).map_err(|e| match e {
            SubmitError::QueueFull(_) => ApiError::new(flavor, ErrorKind::Overloaded, e.to_string()),
            SubmitError::Stopped => ApiError::new(flavor, ErrorKind::Internal, e.to_string()),
        })
    }

    pub fn context_error(&self, tokens: usize, flavor: Flavor) -> ApiError {
        ApiError::invalid(
            flavor,
            format!(
                "This model's maximum context length is {} tokens. However, your request has {tokens} input tokens.",
                self.max_context
            ),
        )
        .with_param("messages")
        .with_code("context_length_exceeded")
    }
}

/// A conversation to answer.
pub struct ChatInput {
    pub messages: Vec<Message>,
    /// OpenAI-style tool definitions.
    pub tools: Vec<Value>,
    pub tool_choice: ToolChoice,
    pub enable_thinking: Option<bool>,
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Log-probabilities of the generated tokens, with this many alternatives.
    pub logprobs: Option<usize>,
}

/// A conversation made ready for the engine.
pub struct PreparedChat {
    pub request: GenerationRequest,
    pub parser: OutputParser,
}

/// Renders and tokenizes the conversation (a template that rejects it is the client's
/// error) and checks it fits the context.
pub fn prepare_chat(state: &AppState, input: ChatInput, flavor: Flavor) -> Result<PreparedChat, ApiError> {
    let built = build_prompt(
        &state.template,
        &state.tokenizer,
        &input.messages,
        &input.tools,
        &input.tool_choice,
        input.enable_thinking,
    )
    .map_err(|e| ApiError::invalid(flavor, e.to_string()).with_param("messages"))?;
    if built.prompt.len() >= state.max_context {
        return Err(state.context_error(built.prompt.len(), flavor));
    }
    let request = GenerationRequest {
        max_tokens: input.max_tokens.unwrap_or(usize::MAX),
        prompt: built.prompt,
        checkpoints: built.checkpoints,
        sampling: input.sampling,
        stop: input.stop,
        logprobs: input.logprobs,
        prompt_logprobs: None,
    };
    let mut parser = built.parser;
    parser.set_id_prefix(format!("{}{}_", flavor.tool_call_id_prefix(), random_id(16)));
    Ok(PreparedChat { request, parser })
}

/// Sampling settings: the request's, else the model's defaults.
#[derive(Default)]
pub struct SamplingInput {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub seed: Option<u64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

impl SamplingInput {
    pub fn resolve(self, defaults: &SamplingParams, flavor: Flavor) -> Result<SamplingParams, ApiError> {
        let d = defaults;
        let p = SamplingParams {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_p: self.top_p.unwrap_or(d.top_p),
            top_k: match self.top_k {
                Some(k) if k <= 0 => 0,
                Some(k) => k as usize,
                None => d.top_k,
            },
            min_p: self.min_p.unwrap_or(d.min_p),
            seed: self.seed.unwrap_or_else(rand::random),
            presence_penalty: self.presence_penalty.unwrap_or(d.presence_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(d.frequency_penalty),
            repetition_penalty: self.repetition_penalty.unwrap_or(d.repetition_penalty),
        };
        let check = |ok: bool, param: &str, rule: &str| {
            if ok {
                Ok(())
            } else {
                Err(ApiError::invalid(flavor, format!("`{param}` must be {rule}")).with_param(param))
            }
        };
        check((0.0..=2.0).contains(&p.temperature), "temperature", "between 0 and 2")?;
        check(p.top_p > 0.0 && p.top_p <= 1.0, "top_p", "in (0, 1]")?;
        check((0.0..=1.0).contains(&p.min_p), "min_p", "between 0 and 1")?;
        check(
            (-2.0..=2.0).contains(&p.presence_penalty),
            "presence_penalty",
            "between -2 and 2",
        )?;
        check(
            (-2.0..=2.0).contains(&p.frequency_penalty),
            "frequency_penalty",
            "between -2 and 2",
        )?;
        check(p.repetition_penalty > 0.0, "repetition_penalty", "positive")?;
        Ok(p)
    }
}

/// A piece of an answer, in the order the client should see it.
#[derive(Debug)]
pub enum Piece {
    Reasoning(String),
    Content(String),
    /// A generated token's log-probabilities: they come in token order, ahead of the token's
    /// text (which the parser or a stop string may hold back).
    Logprob(TokenLogprob),
    ToolCall(ToolCall),
    Done(Completion),
    Failed(String),
}

/// The engine's events for one request, parsed (or passed through raw for plain completions).
pub struct AnswerStream {
    events: mpsc::Receiver<EngineEvent>,
    parser: Option<OutputParser>,
    ready: VecDeque<Piece>,
    finished: bool,
}

impl AnswerStream {
    pub fn new(events: mpsc::Receiver<EngineEvent>, parser: Option<OutputParser>) -> Self {
        AnswerStream {
            events,
            parser,
            ready: VecDeque::new(),
            finished: false,
        }
    }

    pub async fn next(&mut self) -> Option<Piece> {
        loop {
            if let Some(piece) = self.ready.pop_front() {
                return Some(piece);
            }
            if self.finished {
                return None;
            }
            match self.events.recv().await {
                Some(EngineEvent::Text(text)) => self.parsed(|p| p.push(&text), text.clone()),
                Some(EngineEvent::Logprob(logprob)) => self.ready.push_back(Piece::Logprob(logprob)),
                Some(EngineEvent::Done(done)) => {
                    self.parsed(|p| p.finish(), String::new());
                    self.ready.push_back(Piece::Done(done));
                    self.finished = true;
                }
                Some(EngineEvent::Failed(message)) => {
                    self.ready.push_back(Piece::Failed(message));
                    self.finished = true;
                }
                None => {
                    self.ready.push_back(Piece::Failed("the engine stopped".into()));
                    self.finished = true;
                }
            }
        }
    }

    fn parsed(&mut self, run: impl FnOnce(&mut OutputParser) -> Vec<ChatEvent>, raw: String) {
        match &mut self.parser {
            Some(parser) => self.ready.extend(run(parser).into_iter().map(|e| match e {
                ChatEvent::Reasoning(t) => Piece::Reasoning(t),
                ChatEvent::Content(t) => Piece::Content(t),
                ChatEvent::ToolCall(c) => Piece::ToolCall(c),
            })),
            None if !raw.is_empty() => self.ready.push_back(Piece::Content(raw)),
            None => {}
        }
    }
}

/// A whole answer, for non-streaming responses.
#[derive(Default)]
pub struct Answer {
    pub reasoning: String,
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
    pub logprobs: Vec<TokenLogprob>,
    pub done: Option<Completion>,
}

impl AnswerStream {
    pub async fn collect(mut self, flavor: Flavor) -> Result<Answer, ApiError> {
        let mut answer = Answer::default();
        while let Some(piece) = self.next().await {
            match piece {
                Piece::Reasoning(t) => answer.reasoning.push_str(&t),
                Piece::Content(t) => answer.content.push_str(&t),
                Piece::ToolCall(c) => answer.tool_calls.push(c),
                Piece::Logprob(l) => answer.logprobs.push(l),
                Piece::Done(done) => answer.done = Some(done),
                Piece::Failed(message) => return Err(ApiError::new(flavor, ErrorKind::Internal, message)),
            }
        }
        Ok(answer)
    }
}

/// Where a streamed response's events go; sends fail once the client has gone.
pub type EventSender = mpsc::Sender<Result<Event, Infallible>>;

/// A server-sent event response whose events `produce` sends from a task of its own. A client
/// that disconnects closes the channel, which `produce` sees as a failed send (or `closed()`)
/// and stops, dropping the answer it streams, which stops the engine.
pub fn event_stream<F>(produce: impl FnOnce(EventSender) -> F) -> Response
where
    F: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(produce(tx));
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Sends `events` in order; false when the client has gone.
pub async fn send_all(tx: &EventSender, events: impl IntoIterator<Item = Event>) -> bool {
    for event in events {
        if tx.send(Ok(event)).await.is_err() {
            return false;
        }
    }
    true
}

pub fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
