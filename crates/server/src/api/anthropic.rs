//! The Anthropic Messages API: `/v1/messages`, streaming and not, with `tool_use` and
//! `tool_result` blocks and thinking blocks.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use flash_moe_engine::chat::{Message, ToolCall, ToolChoice};
use flash_moe_engine::engine::session::{Completion, FinishReason};
use serde::Deserialize;
use serde_json::{Value, json};

use super::common::{
    AnswerStream, ChatInput, Piece, SamplingInput, SharedState, event_stream, parse_body, prepare_chat, random_id,
    send_all,
};
use super::errors::{ApiError, ErrorKind, Flavor};

const FLAVOR: Flavor = Flavor::Anthropic;

#[derive(Deserialize)]
struct MessagesRequest {
    model: String,
    max_tokens: usize,
    messages: Vec<InMessage>,
    system: Option<TextOrBlocks>,
    #[serde(default)]
    tools: Vec<Tool>,
    tool_choice: Option<InToolChoice>,
    #[serde(default)]
    stream: bool,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    #[serde(default)]
    stop_sequences: Vec<String>,
    thinking: Option<Thinking>,
}

#[derive(Deserialize)]
struct InMessage {
    role: String,
    content: TextOrBlocks,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TextOrBlocks {
    Text(String),
    Blocks(Vec<Block>),
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        text: String,
    },
    Thinking {
        thinking: String,
    },
    RedactedThinking {},
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        content: Option<TextOrBlocks>,
        #[serde(default)]
        is_error: bool,
    },
    #[serde(other)]
    Unsupported,
}

#[derive(Deserialize)]
struct Tool {
    name: String,
    description: Option<String>,
    input_schema: Value,
}

#[derive(Deserialize)]
struct InToolChoice {
    #[serde(rename = "type")]
    kind: String,
    name: Option<String>,
}

#[derive(Deserialize)]
struct Thinking {
    #[serde(rename = "type")]
    kind: String,
}

/// The text of a string or of the text blocks of a list.
fn plain_text(content: TextOrBlocks) -> Result<String, ApiError> {
    match content {
        TextOrBlocks::Text(t) => Ok(t),
        TextOrBlocks::Blocks(blocks) => blocks
            .into_iter()
            .map(|b| match b {
                Block::Text { text } => Ok(text),
                _ => Err(unsupported_block()),
            })
            .collect(),
    }
}

fn unsupported_block() -> ApiError {
    ApiError::invalid(
        FLAVOR,
        "unsupported content block here (text, thinking, tool_use and tool_result are supported)",
    )
    .with_param("messages")
}

/// Anthropic messages to chat-template messages: tool results become `tool` turns (before the
/// user's own text), thinking becomes `reasoning_content`, tool_use blocks become tool calls.
fn to_messages(system: Option<TextOrBlocks>, input: Vec<InMessage>) -> Result<Vec<Message>, ApiError> {
    let mut out = Vec::new();
    if let Some(system) = system {
        out.push(Message::text("system", plain_text(system)?));
    }
    for m in input {
        let blocks = match m.content {
            TextOrBlocks::Text(t) => vec![Block::Text { text: t }],
            TextOrBlocks::Blocks(b) => b,
        };
        match m.role.as_str() {
            "user" => {
                let mut text = String::new();
                for block in blocks {
                    match block {
                        Block::Text { text: t } => text.push_str(&t),
                        Block::ToolResult {
                            tool_use_id,
                            content,
                            is_error,
                        } => {
                            let result = content.map(plain_text).transpose()?.unwrap_or_default();
                            let result = if is_error { format!("Error: {result}") } else { result };
                            out.push(Message {
                                tool_call_id: Some(tool_use_id),
                                ..Message::text("tool", result)
                            });
                        }
                        _ => return Err(unsupported_block()),
                    }
                }
                if !text.is_empty() {
                    out.push(Message::text("user", text));
                }
            }
            "assistant" => {
                let mut message = Message::text("assistant", "");
                for block in blocks {
                    match block {
                        Block::Text { text } => message.content.push_str(&text),
                        Block::Thinking { thinking } => message.reasoning_content = Some(thinking),
                        Block::RedactedThinking {} => {}
                        Block::ToolUse { id, name, input } => message.tool_calls.push(ToolCall {
                            id,
                            name,
                            arguments: input,
                        }),
                        _ => return Err(unsupported_block()),
                    }
                }
                out.push(message);
            }
            other => {
                return Err(
                    ApiError::invalid(FLAVOR, format!("unknown role `{other}` (user or assistant)"))
                        .with_param("messages"),
                );
            }
        }
    }
    Ok(out)
}

fn tool_choice(choice: Option<InToolChoice>) -> Result<ToolChoice, ApiError> {
    Ok(match choice {
        None => ToolChoice::Auto,
        Some(c) => match (c.kind.as_str(), c.name) {
            ("auto", _) => ToolChoice::Auto,
            ("none", _) => ToolChoice::None,
            ("any", _) => ToolChoice::Required,
            ("tool", Some(name)) => ToolChoice::Function(name),
            _ => {
                return Err(ApiError::invalid(
                    FLAVOR,
                    "`tool_choice.type` must be auto, any, tool (with a name) or none",
                )
                .with_param("tool_choice"));
            }
        },
    })
}

pub async fn messages(State(state): State<SharedState>, body: Result<Bytes, BytesRejection>) -> Response {
    match respond(state, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn respond(state: SharedState, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let req: MessagesRequest = parse_body(body, FLAVOR)?;
    state.check_model(&req.model, FLAVOR)?;
    let choice = tool_choice(req.tool_choice)?;
    let tools = req
        .tools
        .into_iter()
        .map(|t| {
            let mut function = json!({"name": t.name, "parameters": t.input_schema});
            if let Some(d) = t.description {
                function["description"] = json!(d);
            }
            json!({"type": "function", "function": function})
        })
        .collect();
    let stops = req.stop_sequences;
    let sampling = SamplingInput {
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        ..Default::default()
    };
    let input = ChatInput {
        messages: to_messages(req.system, req.messages)?,
        tools,
        tool_choice: choice,
        enable_thinking: req.thinking.and_then(|t| match t.kind.as_str() {
            "enabled" | "adaptive" => Some(true),
            "disabled" => Some(false),
            _ => None,
        }),
        max_tokens: Some(req.max_tokens),
        sampling: sampling.resolve(&state.defaults, FLAVOR)?,
        stop: stops.clone(),
        logprobs: None,
    };
    let prepared = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || prepare_chat(&state, input, FLAVOR))
            .await
            .map_err(|e| ApiError::new(FLAVOR, ErrorKind::Internal, e.to_string()))??
    };
    let prompt_tokens = prepared.request.prompt.len();
    let answer = AnswerStream::new(state.submit(prepared.request, FLAVOR)?, Some(prepared.parser));
    let id = format!("msg_{}", random_id(24));
    let model = state.model_names[0].clone();
    if req.stream {
        return Ok(stream(answer, id, model, prompt_tokens, stops));
    }
    let answer = answer.collect(FLAVOR).await?;
    let done = answer
        .done
        .ok_or_else(|| ApiError::new(FLAVOR, ErrorKind::Internal, "generation did not finish"))?;
    let mut content = Vec::new();
    if !answer.reasoning.is_empty() {
        content.push(json!({"type": "thinking", "thinking": answer.reasoning, "signature": ""}));
    }
    if !answer.content.is_empty() {
        content.push(json!({"type": "text", "text": answer.content}));
    }
    for call in &answer.tool_calls {
        content.push(json!({"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}));
    }
    Ok(Json(json!({
        "id": id, "type": "message", "role": "assistant", "model": model, "content": content,
        "stop_reason": stop_reason(&done, !answer.tool_calls.is_empty()),
        "stop_sequence": stop_sequence(&done, &stops),
        "usage": usage(&done),
    }))
    .into_response())
}

fn stop_reason(done: &Completion, called: bool) -> &'static str {
    match done.finish {
        FinishReason::Length => "max_tokens",
        FinishReason::StopString(_) => "stop_sequence",
        _ if called => "tool_use",
        _ => "end_turn",
    }
}

/// The stop sequence that ended the message, if one did.
fn stop_sequence(done: &Completion, stops: &[String]) -> Value {
    match done.finish {
        FinishReason::StopString(i) => stops.get(i).map_or(Value::Null, |s| json!(s)),
        _ => Value::Null,
    }
}

fn usage(done: &Completion) -> Value {
    json!({
        "input_tokens": done.prompt_tokens - done.cached_tokens,
        "cache_read_input_tokens": done.cached_tokens,
        "cache_creation_input_tokens": 0,
        "output_tokens": done.completion_tokens,
    })
}

/// The kind of an open streamed text block.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Open {
    Thinking,
    Text,
}

fn event(name: &str, body: Value) -> Event {
    Event::default().event(name).data(body.to_string())
}

/// Streams the message as Anthropic's server-sent events.
fn stream(mut answer: AnswerStream, id: String, model: String, prompt_tokens: usize, stops: Vec<String>) -> Response {
    event_stream(|tx| async move {
        let start = json!({"type": "message_start", "message": {"id": id, "type": "message", "role": "assistant",
            "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}});
        let mut blocks = BlockWriter::default();
        blocks.events.push(event("message_start", start));
        loop {
            if !send_all(&tx, blocks.events.drain(..)).await {
                return;
            }
            let piece = tokio::select! {
                piece = answer.next() => piece,
                () = tx.closed() => return,
            };
            match piece {
                None => return,
                Some(Piece::Reasoning(t)) => blocks.delta(Open::Thinking, &t),
                Some(Piece::Content(t)) => blocks.delta(Open::Text, &t),
                Some(Piece::ToolCall(call)) => blocks.tool_use(&call),
                // The Anthropic API has no log-probabilities (none are asked for).
                Some(Piece::Logprob(_)) => {}
                Some(Piece::Done(done)) => {
                    blocks.close();
                    let delta = json!({"type": "message_delta",
                        "delta": {"stop_reason": stop_reason(&done, blocks.called),
                            "stop_sequence": stop_sequence(&done, &stops)},
                        "usage": {"output_tokens": done.completion_tokens}});
                    blocks.events.push(event("message_delta", delta));
                    blocks
                        .events
                        .push(event("message_stop", json!({"type": "message_stop"})));
                }
                Some(Piece::Failed(message)) => {
                    let error = ApiError::new(FLAVOR, ErrorKind::Internal, message);
                    blocks.events.push(event("error", error.body()));
                }
            }
        }
    })
}

/// Content blocks as stream events: start, deltas, stop, with running indices.
#[derive(Default)]
struct BlockWriter {
    events: Vec<Event>,
    open: Option<Open>,
    index: usize,
    called: bool,
}

impl BlockWriter {
    fn delta(&mut self, kind: Open, text: &str) {
        if self.open != Some(kind) {
            self.close();
            let block = match kind {
                Open::Thinking => json!({"type": "thinking", "thinking": ""}),
                Open::Text => json!({"type": "text", "text": ""}),
            };
            self.start(block);
            self.open = Some(kind);
        }
        let delta = match kind {
            Open::Thinking => json!({"type": "thinking_delta", "thinking": text}),
            Open::Text => json!({"type": "text_delta", "text": text}),
        };
        self.events.push(event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": self.index, "delta": delta}),
        ));
    }

    fn tool_use(&mut self, call: &ToolCall) {
        self.close();
        self.start(json!({"type": "tool_use", "id": call.id, "name": call.name, "input": {}}));
        let delta = json!({"type": "input_json_delta", "partial_json": call.arguments_json()});
        self.events.push(event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": self.index, "delta": delta}),
        ));
        self.open = Some(Open::Text);
        self.close();
        self.called = true;
    }

    fn start(&mut self, block: Value) {
        self.events.push(event(
            "content_block_start",
            json!({"type": "content_block_start", "index": self.index, "content_block": block}),
        ));
    }

    fn close(&mut self) {
        if self.open.take().is_some() {
            self.events.push(event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": self.index}),
            ));
            self.index += 1;
        }
    }
}
