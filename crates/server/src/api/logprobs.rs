//! OpenAI's two shapes of `logprobs`: chat completions' list of token entries and the legacy
//! completions' parallel arrays.

use std::sync::Arc;

use flash_moe_engine::engine::logprobs::{MAX_TOP_LOGPROBS, TokenLogprob};
use flash_moe_engine::tokenizer::Tokenizer;
use serde_json::{Map, Value, json};

use super::errors::{ApiError, Flavor};

/// Checks a request's number of alternatives.
pub fn check_top(top: usize, param: &str) -> Result<usize, ApiError> {
    if top > MAX_TOP_LOGPROBS {
        return Err(ApiError::invalid(
            Flavor::OpenAi,
            format!("`{param}` is {top}; at most {MAX_TOP_LOGPROBS} are supported"),
        )
        .with_param(param));
    }
    Ok(top)
}

/// A token's text (lossy where it holds part of a character) and bytes.
fn token_text(tokenizer: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let bytes = tokenizer.token_bytes(id);
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

fn chat_entry(tokenizer: &Tokenizer, id: u32, logprob: f32) -> Map<String, Value> {
    let (token, bytes) = token_text(tokenizer, id);
    let mut entry = Map::new();
    entry.insert("token".into(), json!(token));
    entry.insert("logprob".into(), finite(logprob));
    entry.insert("bytes".into(), json!(bytes));
    entry
}

/// Chat completions' `logprobs` object for `tokens`.
pub fn chat(tokenizer: &Tokenizer, tokens: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut entry = chat_entry(tokenizer, t.token, t.logprob);
            let top: Vec<Value> = t
                .top
                .iter()
                .map(|&(id, lp)| Value::Object(chat_entry(tokenizer, id, lp)))
                .collect();
            entry.insert("top_logprobs".into(), Value::Array(top));
            Value::Object(entry)
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// The legacy completions' `logprobs` object for `tokens`, whose text starts `offset`
/// characters into the completion; `offset` moves past them. With `echo`, the prompt's first
/// token opens the lists, with null where its log-probabilities would be.
pub fn completion(tokenizer: &Tokenizer, echo: Option<u32>, tokens: &[TokenLogprob], offset: &mut usize) -> Value {
    let top = |t: &TokenLogprob| -> Value {
        let entries: Map<String, Value> = t
            .top
            .iter()
            .map(|&(id, lp)| (token_text(tokenizer, id).0, finite(lp)))
            .collect();
        Value::Object(entries)
    };
    let first = echo.map(|id| (id, Value::Null, Value::Null));
    let rest = tokens.iter().map(|t| (t.token, finite(t.logprob), top(t)));
    let (mut texts, mut logprobs, mut tops, mut offsets) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (id, logprob, alternatives) in first.into_iter().chain(rest) {
        let (text, _) = token_text(tokenizer, id);
        offsets.push(*offset);
        *offset += text.chars().count();
        texts.push(text);
        logprobs.push(logprob);
        tops.push(alternatives);
    }
    json!({"tokens": texts, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets})
}

/// JSON has no infinity: an impossible token's log-probability is reported as OpenAI's
/// floor, -9999.
fn finite(logprob: f32) -> Value {
    json!(if logprob.is_finite() { logprob } else { -9999.0 })
}

/// Log-probabilities received for a stream's next chunk (none kept when the request did not
/// ask for them: then there is no tokenizer).
pub struct Pending {
    tokenizer: Option<Arc<Tokenizer>>,
    tokens: Vec<TokenLogprob>,
    /// Characters of the completion before the pending tokens (legacy completions).
    offset: usize,
}

impl Pending {
    pub fn new(tokenizer: Option<Arc<Tokenizer>>) -> Self {
        Pending {
            tokenizer,
            tokens: Vec::new(),
            offset: 0,
        }
    }

    pub fn push(&mut self, token: TokenLogprob) {
        if self.tokenizer.is_some() {
            self.tokens.push(token);
        }
    }

    pub fn any(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The pending tokens as chat completions' `logprobs` (null when not asked for).
    pub fn chat(&mut self) -> Value {
        let tokens = std::mem::take(&mut self.tokens);
        self.tokenizer.as_ref().map_or(Value::Null, |t| chat(t, &tokens))
    }

    /// The pending tokens as the legacy completions' `logprobs` (null when not asked for).
    pub fn completion(&mut self) -> Value {
        let tokens = std::mem::take(&mut self.tokens);
        match &self.tokenizer {
            Some(t) => completion(t, None, &tokens, &mut self.offset),
            None => Value::Null,
        }
    }
}
