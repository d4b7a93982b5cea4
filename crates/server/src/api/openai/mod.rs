//! The OpenAI API: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use flash_moe_engine::chat::{Message, OutputParser, ToolCall, ToolChoice, parse_arguments};
use flash_moe_engine::engine::session::{Completion, FinishReason, GenerationRequest};
use flash_moe_engine::tokenizer::Tokenizer;
use serde::Deserialize;
use serde_json::{Value, json};

use super::common::{
    Answer, AnswerStream, ChatInput, SamplingInput, SharedState, parse_body, prepare_chat, random_id, unix_time,
};
use super::errors::{ApiError, ErrorKind, Flavor};
use super::logprobs as token_logprobs;
use stream::{stream_chat, stream_completion};

mod stream;

const FLAVOR: Flavor = Flavor::OpenAi;

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    tools: Vec<Tool>,
    tool_choice: Option<Value>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    #[serde(flatten)]
    sampling: Sampling,
    stop: Option<Stop>,
    n: Option<usize>,
    logprobs: Option<bool>,
    top_logprobs: Option<usize>,
    chat_template_kwargs: Option<TemplateKwargs>,
    reasoning_effort: Option<String>,
    response_format: Option<ResponseFormat>,
}

#[derive(Deserialize)]
struct Sampling {
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    seed: Option<u64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
}

impl Sampling {
    fn input(self) -> SamplingInput {
        SamplingInput {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            seed: self.seed,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            repetition_penalty: self.repetition_penalty,
        }
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct TemplateKwargs {
    enable_thinking: Option<bool>,
}

#[derive(Deserialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
struct Tool {
    #[serde(rename = "type")]
    kind: String,
    function: FunctionDef,
}

#[derive(Deserialize, serde::Serialize)]
struct FunctionDef {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
    reasoning_content: Option<String>,
    reasoning: Option<String>,
    tool_calls: Option<Vec<CallIn>>,
    tool_call_id: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
struct CallIn {
    id: Option<String>,
    function: CallFunction,
}

#[derive(Deserialize)]
struct CallFunction {
    name: String,
    #[serde(default)]
    arguments: Value,
}

fn content_text(content: Option<Content>) -> Result<String, ApiError> {
    match content {
        None => Ok(String::new()),
        Some(Content::Text(t)) => Ok(t),
        Some(Content::Parts(parts)) => parts
            .into_iter()
            .map(|p| match (p.kind.as_str(), p.text) {
                ("text", Some(t)) => Ok(t),
                (kind, _) => Err(ApiError::invalid(
                    FLAVOR,
                    format!("content parts of type `{kind}` are not supported (text only)"),
                )
                .with_param("messages")),
            })
            .collect(),
    }
}

fn to_message(m: ChatMessage) -> Result<Message, ApiError> {
    let role = match m.role.as_str() {
        "developer" => "system".to_string(),
        "system" | "user" | "assistant" | "tool" => m.role.clone(),
        other => {
            return Err(ApiError::invalid(FLAVOR, format!("unknown message role `{other}`")).with_param("messages"));
        }
    };
    let tool_calls = m
        .tool_calls
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, c)| ToolCall {
            id: c.id.unwrap_or_else(|| format!("call_{i}")),
            name: c.function.name,
            arguments: match c.function.arguments {
                Value::String(s) => parse_arguments(&s),
                Value::Null => json!({}),
                other => other,
            },
        })
        .collect();
    Ok(Message {
        role,
        content: content_text(m.content)?,
        reasoning_content: m.reasoning_content.or(m.reasoning),
        tool_calls,
        tool_call_id: m.tool_call_id,
        name: m.name,
    })
}

fn tool_choice(value: Option<Value>) -> Result<ToolChoice, ApiError> {
    let bad = || {
        ApiError::invalid(FLAVOR, "`tool_choice` must be none, auto, required or a function").with_param("tool_choice")
    };
    Ok(match value {
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            _ => return Err(bad()),
        },
        Some(v) => ToolChoice::Function(
            v.pointer("/function/name")
                .and_then(Value::as_str)
                .ok_or_else(bad)?
                .to_string(),
        ),
    })
}

pub async fn chat_completions(State(state): State<SharedState>, body: Result<Bytes, BytesRejection>) -> Response {
    match chat(state, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn chat(state: SharedState, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let req: ChatRequest = parse_body(body, FLAVOR)?;
    state.check_model(&req.model, FLAVOR)?;
    let n = choice_count(req.n)?;
    let wanted_logprobs = match (req.logprobs, req.top_logprobs) {
        (Some(true), top) => Some(token_logprobs::check_top(top.unwrap_or(0), "top_logprobs")?),
        (_, Some(_)) => {
            return Err(
                ApiError::invalid(FLAVOR, "`top_logprobs` needs `logprobs` set to true").with_param("top_logprobs")
            );
        }
        _ => None,
    };
    unsupported(
        req.response_format.as_ref().is_some_and(|f| f.kind != "text"),
        "response_format",
        "only the `text` response format is supported",
    )?;
    if let Some(t) = req.tools.iter().find(|t| t.kind != "function") {
        return Err(
            ApiError::invalid(FLAVOR, format!("tools of type `{}` are not supported", t.kind)).with_param("tools"),
        );
    }
    let choice = tool_choice(req.tool_choice)?;
    if let ToolChoice::Function(name) = &choice
        && !req.tools.iter().any(|t| &t.function.name == name)
    {
        return Err(ApiError::invalid(
            FLAVOR,
            format!("`tool_choice` names `{name}`, which is not among the tools"),
        )
        .with_param("tool_choice"));
    }
    let enable_thinking = req
        .chat_template_kwargs
        .and_then(|k| k.enable_thinking)
        .or(req.reasoning_effort.map(|e| e != "none"));
    let input = ChatInput {
        messages: req.messages.into_iter().map(to_message).collect::<Result<_, _>>()?,
        tools: req
            .tools
            .into_iter()
            .map(|t| json!({"type": "function", "function": t.function}))
            .collect(),
        tool_choice: choice,
        enable_thinking,
        max_tokens: req.max_completion_tokens.or(req.max_tokens),
        sampling: req.sampling.input().resolve(&state.defaults, FLAVOR)?,
        stop: req.stop.map(Stop::into_vec).unwrap_or_default(),
        logprobs: wanted_logprobs,
    };
    let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
    let prepared = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || prepare_chat(&state, input, FLAVOR))
            .await
            .map_err(|e| ApiError::new(FLAVOR, ErrorKind::Internal, e.to_string()))??
    };
    let answers = submit_choices(&state, &prepared.request, n, Some(&prepared.parser))?;
    let meta = ResponseMeta {
        id: format!("chatcmpl-{}", random_id(24)),
        created: unix_time(),
        model: state.model_names[0].clone(),
    };
    let logprobs_tokenizer = wanted_logprobs.map(|_| state.tokenizer.clone());
    if req.stream {
        return Ok(stream_chat(answers, meta, include_usage, logprobs_tokenizer));
    }
    let (mut choices, mut dones) = (Vec::new(), Vec::new());
    for (index, answer) in answers.into_iter().enumerate() {
        let mut answer = answer.collect(FLAVOR).await?;
        let done = answer
            .done
            .take()
            .ok_or_else(|| ApiError::new(FLAVOR, ErrorKind::Internal, "generation did not finish"))?;
        choices.push(chat_choice(index, &answer, &done, logprobs_tokenizer.as_deref()));
        dones.push(done);
    }
    Ok(Json(json!({
        "id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
        "choices": choices, "usage": usage(&dones),
    }))
    .into_response())
}

/// One choice of a chat completion.
fn chat_choice(index: usize, answer: &Answer, done: &Completion, logprobs: Option<&Tokenizer>) -> Value {
    let mut message = json!({"role": "assistant", "content": (!answer.content.is_empty() || answer.tool_calls.is_empty()).then_some(&answer.content)});
    if !answer.reasoning.is_empty() {
        message["reasoning_content"] = json!(answer.reasoning);
    }
    if !answer.tool_calls.is_empty() {
        message["tool_calls"] = Value::Array(
            answer
                .tool_calls
                .iter()
                .enumerate()
                .map(|(i, c)| call_json(i, c, false))
                .collect(),
        );
    }
    let finish = finish_reason(done, !answer.tool_calls.is_empty());
    json!({"index": index, "message": message, "finish_reason": finish,
        "logprobs": logprobs.map(|t| token_logprobs::chat(t, &answer.logprobs))})
}

/// Most choices (`n`) one request may ask for.
const MAX_CHOICES: usize = 16;

fn choice_count(n: Option<usize>) -> Result<usize, ApiError> {
    match n.unwrap_or(1) {
        n @ 1..=MAX_CHOICES => Ok(n),
        n => {
            Err(ApiError::invalid(FLAVOR, format!("`n` must be between 1 and {MAX_CHOICES}, not {n}")).with_param("n"))
        }
    }
}

/// Queues the generations of `n` choices: `request` once per choice, one after another on the
/// engine (the later ones find the prompt in the prefix cache), choice i sampling with the
/// request's seed plus i so that sampled choices differ (greedy ones agree), each with its own
/// tool-call ids. A full queue refuses the request: the choices queued already are dropped
/// with it and never run.
fn submit_choices(
    state: &SharedState,
    request: &GenerationRequest,
    n: usize,
    parser: Option<&OutputParser>,
) -> Result<Vec<AnswerStream>, ApiError> {
    (0..n)
        .map(|i| {
            let mut choice = request.clone();
            choice.sampling.seed = choice.sampling.seed.wrapping_add(i as u64);
            // Tool calls numbered apart in each choice.
            let parser = parser.cloned().map(|mut p| {
                p.set_id_prefix(format!("{}{}_", FLAVOR.tool_call_id_prefix(), random_id(16)));
                p
            });
            Ok(AnswerStream::new(state.submit(choice, FLAVOR)?, parser))
        })
        .collect()
}

fn unsupported(bad: bool, param: &str, message: &str) -> Result<(), ApiError> {
    if bad {
        Err(ApiError::invalid(FLAVOR, message).with_param(param))
    } else {
        Ok(())
    }
}

struct ResponseMeta {
    id: String,
    created: u64,
    model: String,
}

fn call_json(index: usize, call: &ToolCall, streamed: bool) -> Value {
    let mut v =
        json!({"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments_json()}});
    if streamed {
        v["index"] = json!(index);
    }
    v
}

fn finish_reason(done: &Completion, called: bool) -> &'static str {
    match done.finish {
        FinishReason::Length => "length",
        _ if called => "tool_calls",
        _ => "stop",
    }
}

/// The usage of a response's choices: the prompt counted once (as the first choice read it),
/// the completions' tokens summed.
fn usage(choices: &[Completion]) -> Value {
    let (prompt, cached) = choices.first().map_or((0, 0), |c| (c.prompt_tokens, c.cached_tokens));
    let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

#[derive(Deserialize)]
struct CompletionRequest {
    model: String,
    prompt: Prompt,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<usize>,
    #[serde(flatten)]
    sampling: Sampling,
    stop: Option<Stop>,
    n: Option<usize>,
    logprobs: Option<u32>,
    #[serde(default)]
    echo: bool,
    suffix: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

/// The default of OpenAI's legacy completions API.
const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

pub async fn completions(State(state): State<SharedState>, body: Result<Bytes, BytesRejection>) -> Response {
    match complete(state, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn complete(state: SharedState, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_body(body, FLAVOR)?;
    state.check_model(&req.model, FLAVOR)?;
    let n = choice_count(req.n)?;
    let wanted_logprobs = req
        .logprobs
        .map(|n| token_logprobs::check_top(n as usize, "logprobs"))
        .transpose()?;
    unsupported(req.echo && req.stream, "echo", "echo is not supported with stream")?;
    unsupported(req.suffix.is_some(), "suffix", "suffix is not supported")?;
    let (prompt, text) = match req.prompt {
        Prompt::Tokens(ids) => (Ok(ids), None),
        Prompt::Text(text) => (state.tokenizer.encode(&text), Some(text)),
        Prompt::Texts(mut texts) if texts.len() == 1 => {
            let text = texts.remove(0);
            (state.tokenizer.encode(&text), Some(text))
        }
        Prompt::Texts(_) => {
            return Err(ApiError::invalid(FLAVOR, "only one prompt per request is supported").with_param("prompt"));
        }
    };
    let prompt = prompt.map_err(|e| ApiError::invalid(FLAVOR, e.to_string()))?;
    if prompt.is_empty() {
        return Err(ApiError::invalid(FLAVOR, "the prompt is empty").with_param("prompt"));
    }
    if let Some(&id) = prompt.iter().find(|&&id| id as usize >= state.tokenizer.vocab_size()) {
        return Err(ApiError::invalid(FLAVOR, format!("token id {id} is out of range")).with_param("prompt"));
    }
    if prompt.len() >= state.max_context {
        return Err(state.context_error(prompt.len(), FLAVOR).with_param("prompt"));
    }
    let request = GenerationRequest {
        prompt,
        checkpoints: Vec::new(),
        max_tokens: req.max_tokens.unwrap_or(COMPLETIONS_DEFAULT_MAX_TOKENS),
        sampling: req.sampling.input().resolve(&state.defaults, FLAVOR)?,
        stop: req.stop.map(Stop::into_vec).unwrap_or_default(),
        logprobs: wanted_logprobs,
        prompt_logprobs: wanted_logprobs.filter(|_| req.echo),
    };
    // With echo, the prompt's first token (which has no log-probability) opens the list.
    let echoed = match req.echo {
        true => Some(match text {
            Some(text) => text,
            None => state
                .tokenizer
                .decode(&request.prompt)
                .map_err(|e| ApiError::invalid(FLAVOR, e.to_string()).with_param("prompt"))?,
        }),
        false => None,
    };
    let first_prompt_token = echoed.as_ref().map(|_| request.prompt[0]);
    let answers = submit_choices(&state, &request, n, None)?;
    let logprobs_tokenizer = wanted_logprobs.map(|_| state.tokenizer.clone());
    let meta = ResponseMeta {
        id: format!("cmpl-{}", random_id(24)),
        created: unix_time(),
        model: state.model_names[0].clone(),
    };
    if req.stream {
        return Ok(stream_completion(
            answers,
            meta,
            req.stream_options.is_some_and(|o| o.include_usage),
            logprobs_tokenizer,
        ));
    }
    let (mut choices, mut dones) = (Vec::new(), Vec::new());
    for (index, answer) in answers.into_iter().enumerate() {
        let answer = answer.collect(FLAVOR).await?;
        let done = answer
            .done
            .ok_or_else(|| ApiError::new(FLAVOR, ErrorKind::Internal, "generation did not finish"))?;
        let logprobs = logprobs_tokenizer
            .as_deref()
            .map(|t| token_logprobs::completion(t, first_prompt_token, &answer.logprobs, &mut 0));
        choices.push(
            json!({"index": index, "text": echoed.clone().unwrap_or_default() + &answer.content,
            "finish_reason": finish_reason(&done, false), "logprobs": logprobs}),
        );
        dones.push(done);
    }
    Ok(Json(json!({
        "id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
        "choices": choices, "usage": usage(&dones),
    }))
    .into_response())
}

pub async fn list_models(State(state): State<SharedState>) -> Json<Value> {
    let data: Vec<Value> = state.model_names.iter().map(|name| model_json(&state, name)).collect();
    Json(json!({"object": "list", "data": data}))
}

pub async fn get_model(State(state): State<SharedState>, Path(id): Path<String>) -> Response {
    match state.check_model(&id, FLAVOR) {
        Ok(()) => Json(model_json(&state, &id)).into_response(),
        Err(e) => e.into_response(),
    }
}

fn model_json(state: &SharedState, name: &str) -> Value {
    json!({"id": name, "object": "model", "created": state.started, "owned_by": "flash-moe", "max_model_len": state.max_context})
}
