//! Conversations: the model's chat template, and the model's output split into reasoning,
//! answer and tool calls. Shared by every front end (terminal chat, HTTP server).

pub mod output;
pub mod template;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use output::{ChatEvent, OutputParser};
pub use template::{ChatTemplate, ToolCallFormat};

/// A call the assistant asked for. `arguments` is a JSON object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: Value,
}

impl ToolCall {
    /// The arguments as the JSON text the OpenAI API carries.
    pub fn arguments_json(&self) -> String {
        self.arguments.to_string()
    }
}

/// One turn of a conversation, in the shape chat templates expect.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    pub content: String,
    /// The assistant's thinking, kept apart from `content`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For `tool` messages: the call this is the result of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// For `tool` messages: the tool's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    /// A plain text message.
    pub fn text(role: &str, content: impl Into<String>) -> Self {
        Message {
            role: role.to_string(),
            content: content.into(),
            ..Default::default()
        }
    }

    /// The message as transformers hands it to a template: tool calls in the OpenAI shape
    /// with `arguments` as an object.
    pub fn to_template_value(&self) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("role".into(), json!(self.role));
        m.insert("content".into(), json!(self.content));
        if let Some(r) = &self.reasoning_content {
            m.insert("reasoning_content".into(), json!(r));
        }
        if !self.tool_calls.is_empty() {
            let calls: Vec<Value> = self
                .tool_calls
                .iter()
                .map(
                    |c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}),
                )
                .collect();
            m.insert("tool_calls".into(), Value::Array(calls));
        }
        if let Some(id) = &self.tool_call_id {
            m.insert("tool_call_id".into(), json!(id));
        }
        if let Some(name) = &self.name {
            m.insert("name".into(), json!(name));
        }
        Value::Object(m)
    }
}

/// Parses tool-call arguments given as JSON text (the OpenAI wire form) into an object;
/// text that is not JSON is kept as a string.
pub fn parse_arguments(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}
