//! Conversations: the model's chat template, and the model's output split into reasoning,
//! answer and tool calls. Shared by every front end (terminal chat, HTTP server).

pub mod output;
pub mod template;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::Result;
use crate::tokenizer::Tokenizer;

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

/// How the model may use tools.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ToolChoice {
    #[default]
    Auto,
    /// Tools are left out of the prompt.
    None,
    /// Some tool call must come first.
    Required,
    /// A call of this function must come first.
    Function(String),
}

/// A conversation made ready for generation.
pub struct ChatPrompt {
    pub prompt: Vec<u32>,
    /// Where the conversation ends before the assistant's header: the point a later turn of
    /// the same conversation shares, worth a snapshot.
    pub checkpoints: Vec<usize>,
    /// The parser for the answer, primed with what the prompt already opened.
    pub parser: OutputParser,
}

/// Renders a conversation with the model's template and tokenizes it. Forced tool use
/// (`Required` or a named function) writes the start of the call into the prompt, closing an
/// open thinking block first.
pub fn build_prompt(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    messages: &[Message],
    tools: &[Value],
    choice: &ToolChoice,
    enable_thinking: Option<bool>,
) -> Result<ChatPrompt> {
    let tools: &[Value] = if *choice == ToolChoice::None { &[] } else { tools };
    let full = template.render(messages, tools, true, enable_thinking)?;
    let head = template.render(messages, tools, false, enable_thinking)?;
    let header = match full.strip_prefix(head.as_str()) {
        Some(header) => header,
        None => full.rsplit("<|im_start|>").next().unwrap_or(""),
    };
    let in_reasoning = header.rfind("<think>") > header.rfind("</think>");
    let forced = forced_call_prefix(choice, in_reasoning, template.tool_call_format());
    let prompt = tokenizer.encode(&format!("{full}{forced}"))?;
    let head_ids = tokenizer.encode(&head)?;
    let checkpoints = if prompt.starts_with(&head_ids) {
        vec![head_ids.len()]
    } else {
        Vec::new()
    };
    let mut parser = OutputParser::new(tools, in_reasoning, format!("call_{}_", random_id(8)));
    parser.push(&forced);
    Ok(ChatPrompt {
        prompt,
        checkpoints,
        parser,
    })
}

fn forced_call_prefix(choice: &ToolChoice, in_reasoning: bool, format: ToolCallFormat) -> String {
    let name = match choice {
        ToolChoice::Auto | ToolChoice::None => return String::new(),
        ToolChoice::Required => None,
        ToolChoice::Function(name) => Some(name),
    };
    let mut prefix = String::from(if in_reasoning {
        "\n</think>\n\n<tool_call>\n"
    } else {
        "<tool_call>\n"
    });
    if let Some(name) = name {
        match format {
            ToolCallFormat::QwenXml => prefix.push_str(&format!("<function={name}>\n")),
            ToolCallFormat::HermesJson => {
                prefix.push_str(&format!("{{\"name\": {}, \"arguments\": ", Value::String(name.clone())))
            }
        }
    }
    prefix
}

/// Random alphanumerics, for ids of calls and responses.
pub fn random_id(len: usize) -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}
