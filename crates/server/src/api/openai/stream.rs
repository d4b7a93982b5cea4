//! The OpenAI API's server-sent event streams: chat completion chunks and legacy completion
//! chunks, a response's choices one after another.

use std::sync::Arc;

use axum::response::Response;
use axum::response::sse::Event;
use flash_moe_engine::tokenizer::Tokenizer;
use serde_json::{Value, json};

use super::{FLAVOR, ResponseMeta, call_json, finish_reason, usage};
use crate::api::common::{AnswerStream, EventSender, Piece, event_stream, send_all};
use crate::api::errors::{ApiError, ErrorKind};
use crate::api::logprobs as token_logprobs;

/// Streams chunks as server-sent events, the choices one after another (each chunk names its
/// choice's index). A client that disconnects closes the channel, which drops the answer
/// streams, which stops the engine. With `logprobs` (the tokenizer, when they were asked for)
/// each chunk carries the log-probabilities of the tokens generated since the last one.
pub(super) fn stream_chat(
    answers: Vec<AnswerStream>,
    meta: ResponseMeta,
    include_usage: bool,
    logprobs: Option<Arc<Tokenizer>>,
) -> Response {
    event_stream(|tx| async move {
        let mut dones = Vec::new();
        for (index, mut answer) in answers.into_iter().enumerate() {
            let mut logprobs = token_logprobs::Pending::new(logprobs.clone());
            let chunk = |delta: Value, logprobs: Value, finish: Option<&str>| {
                let body = json!({"id": meta.id, "object": "chat.completion.chunk", "created": meta.created,
                    "model": meta.model,
                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]});
                Event::default().data(body.to_string())
            };
            let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), Value::Null, None)];
            let mut calls = 0;
            loop {
                if !send_all(&tx, events.drain(..)).await {
                    return;
                }
                let piece = tokio::select! {
                    piece = answer.next() => piece,
                    () = tx.closed() => return,
                };
                let Some(piece) = piece else { break };
                match piece {
                    Piece::Logprob(l) => logprobs.push(l),
                    Piece::Reasoning(t) => events.push(chunk(json!({"reasoning_content": t}), logprobs.chat(), None)),
                    Piece::Content(t) => events.push(chunk(json!({"content": t}), logprobs.chat(), None)),
                    Piece::ToolCall(c) => {
                        let delta = json!({"tool_calls": [call_json(calls, &c, true)]});
                        events.push(chunk(delta, logprobs.chat(), None));
                        calls += 1;
                    }
                    Piece::Done(done) => {
                        if logprobs.any() {
                            events.push(chunk(json!({}), logprobs.chat(), None));
                        }
                        events.push(chunk(json!({}), Value::Null, Some(finish_reason(&done, calls > 0))));
                        dones.push(done);
                    }
                    Piece::Failed(message) => return fail_stream(&tx, message).await,
                }
            }
        }
        end_stream(
            &tx,
            &meta,
            "chat.completion.chunk",
            include_usage.then(|| usage(&dones)),
        )
        .await;
    })
}

/// The end of a stream: with `usage`, a chunk of `object` that carries it and no choices; then
/// `[DONE]`.
async fn end_stream(tx: &EventSender, meta: &ResponseMeta, object: &str, usage: Option<Value>) {
    let usage = usage.map(|usage| {
        json!({"id": meta.id, "object": object, "created": meta.created, "model": meta.model, "choices": [],
            "usage": usage})
        .to_string()
    });
    let events = usage.into_iter().chain(["[DONE]".to_string()]);
    send_all(tx, events.map(|e| Event::default().data(e))).await;
}

/// A failed generation ends its stream: the error, then `[DONE]`.
async fn fail_stream(tx: &EventSender, message: String) {
    let error = ApiError::new(FLAVOR, ErrorKind::Internal, message);
    let events = [error.body().to_string(), "[DONE]".to_string()];
    send_all(tx, events.into_iter().map(|e| Event::default().data(e))).await;
}

/// Streams a completion's choices one after another; with `logprobs` (the tokenizer, when
/// they were asked for) each chunk carries the log-probabilities of the tokens generated since
/// the last one.
pub(super) fn stream_completion(
    answers: Vec<AnswerStream>,
    meta: ResponseMeta,
    include_usage: bool,
    logprobs: Option<Arc<Tokenizer>>,
) -> Response {
    event_stream(|tx| async move {
        let mut dones = Vec::new();
        for (index, mut answer) in answers.into_iter().enumerate() {
            let mut logprobs = token_logprobs::Pending::new(logprobs.clone());
            let chunk = |text: &str, logprobs: Value, finish: Option<&str>| {
                let body = json!({"id": meta.id, "object": "text_completion", "created": meta.created,
                    "model": meta.model,
                    "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]});
                Event::default().data(body.to_string())
            };
            loop {
                let piece = tokio::select! {
                    piece = answer.next() => piece,
                    () = tx.closed() => return,
                };
                let mut out = Vec::new();
                match piece {
                    None => break,
                    Some(Piece::Logprob(l)) => logprobs.push(l),
                    Some(Piece::Content(t)) => out.push(chunk(&t, logprobs.completion(), None)),
                    Some(Piece::Done(done)) => {
                        if logprobs.any() {
                            out.push(chunk("", logprobs.completion(), None));
                        }
                        out.push(chunk("", Value::Null, Some(finish_reason(&done, false))));
                        dones.push(done);
                    }
                    Some(Piece::Failed(message)) => return fail_stream(&tx, message).await,
                    Some(_) => {}
                }
                if !send_all(&tx, out).await {
                    return;
                }
            }
        }
        end_stream(&tx, &meta, "text_completion", include_usage.then(|| usage(&dones))).await;
    })
}
