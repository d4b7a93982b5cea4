//! Splits the model's streamed text into reasoning, answer and tool calls, as it arrives, so
//! that no `<think>` or `<tool_call>` markup ever reaches a client.
//!
//! Two call formats are read, whatever the template: Qwen3.5's XML
//! (`<function=NAME><parameter=P>value</parameter></function>`, values typed by the tool's JSON
//! schema) and Qwen3's JSON (`{"name": ..., "arguments": {...}}`).

use std::collections::HashMap;

use serde_json::{Map, Number, Value};

use super::ToolCall;

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";

/// A piece of parsed output.
#[derive(Clone, Debug, PartialEq)]
pub enum ChatEvent {
    Reasoning(String),
    Content(String),
    ToolCall(ToolCall),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Section {
    Reasoning,
    Content,
    ToolCall,
}

/// The incremental parser of one response.
#[derive(Clone)]
pub struct OutputParser {
    section: Section,
    /// Text received but not yet classified.
    pending: String,
    /// No visible character of the current section has been emitted yet.
    section_start: bool,
    /// Whitespace held back: emitted only if more text of the same section follows.
    held_space: String,
    /// Parameter types per tool, from the tools' JSON schemas.
    schemas: HashMap<String, Map<String, Value>>,
    id_prefix: String,
    calls: usize,
}

impl OutputParser {
    /// `tools` are OpenAI-style tool definitions (for typing XML parameters).
    /// `in_reasoning` is true when the prompt ended inside an open `<think>` block.
    pub fn new(tools: &[Value], in_reasoning: bool, id_prefix: impl Into<String>) -> Self {
        let schemas = tools
            .iter()
            .filter_map(|t| {
                let f = t.get("function").unwrap_or(t);
                let name = f.get("name")?.as_str()?.to_string();
                let props = f
                    .get("parameters")
                    .or_else(|| f.get("input_schema"))
                    .and_then(|p| p.get("properties"))
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                Some((name, props))
            })
            .collect();
        OutputParser {
            section: if in_reasoning {
                Section::Reasoning
            } else {
                Section::Content
            },
            pending: String::new(),
            section_start: true,
            held_space: String::new(),
            schemas,
            id_prefix: id_prefix.into(),
            calls: 0,
        }
    }

    /// Tool calls parsed so far.
    pub fn tool_calls(&self) -> usize {
        self.calls
    }

    /// Feeds the next piece of text; returns what it completes.
    pub fn push(&mut self, text: &str) -> Vec<ChatEvent> {
        self.pending.push_str(text);
        let mut events = Vec::new();
        loop {
            let before = (self.section, self.pending.len());
            self.step(&mut events, false);
            if (self.section, self.pending.len()) == before {
                return events;
            }
        }
    }

    /// Ends the response: flushes held text. An unfinished tool call is returned as content.
    pub fn finish(&mut self) -> Vec<ChatEvent> {
        let mut events = Vec::new();
        if self.section == Section::ToolCall {
            let space = std::mem::take(&mut self.held_space);
            let text = format!("{space}{CALL_OPEN}{}", std::mem::take(&mut self.pending));
            events.push(ChatEvent::Content(text.trim_end().to_string()));
            self.enter(Section::Content);
        } else {
            self.step(&mut events, true);
        }
        events
    }

    fn step(&mut self, events: &mut Vec<ChatEvent>, at_end: bool) {
        match self.section {
            Section::Reasoning => self.scan(&[THINK_CLOSE], events, at_end),
            Section::Content => self.scan(&[CALL_OPEN, THINK_OPEN], events, at_end),
            Section::ToolCall => {
                if let Some(end) = self.pending.find(CALL_CLOSE) {
                    let body: String = self.pending.drain(..end + CALL_CLOSE.len()).collect();
                    let call = self.parse_call(&body[..end]);
                    match call {
                        Some(call) => events.push(ChatEvent::ToolCall(call)),
                        None => {
                            self.section = Section::Content;
                            self.section_start = false;
                            self.emit(&format!("{CALL_OPEN}{body}"), events);
                        }
                    }
                    self.enter(Section::Content);
                }
            }
        }
    }

    /// Emits text of the current section up to the first of `tags` (switching section there),
    /// keeping back a tail that could be the start of a tag.
    fn scan(&mut self, tags: &[&str], events: &mut Vec<ChatEvent>, at_end: bool) {
        let found = tags
            .iter()
            .filter_map(|t| self.pending.find(t).map(|at| (at, *t)))
            .min_by_key(|(at, _)| *at);
        if let Some((at, tag)) = found {
            let text: String = self.pending.drain(..at + tag.len()).collect();
            self.emit(&text[..at], events);
            self.enter(match tag {
                THINK_CLOSE => Section::Content,
                THINK_OPEN => Section::Reasoning,
                _ => Section::ToolCall,
            });
            return;
        }
        let keep = if at_end {
            0
        } else {
            partial_tag_len(&self.pending, tags)
        };
        let text: String = self.pending.drain(..self.pending.len() - keep).collect();
        self.emit(&text, events);
        if at_end {
            self.held_space.clear();
        }
    }

    /// Switches section. Whitespace held before a tool call is kept in case the call turns
    /// out to be unfinished text.
    fn enter(&mut self, section: Section) {
        if section != Section::ToolCall {
            self.held_space.clear();
        }
        self.section = section;
        self.section_start = true;
    }

    /// Emits `text` in the current section: leading whitespace of a section is dropped and
    /// trailing whitespace waits until more text follows (templates put newlines around tags).
    fn emit(&mut self, text: &str, events: &mut Vec<ChatEvent>) {
        let text = if self.section_start { text.trim_start() } else { text };
        if text.is_empty() {
            return;
        }
        let body = text.trim_end();
        let trailing = &text[body.len()..];
        if body.is_empty() {
            self.held_space.push_str(trailing);
            return;
        }
        let out = format!("{}{body}", std::mem::take(&mut self.held_space));
        self.held_space.push_str(trailing);
        self.section_start = false;
        events.push(match self.section {
            Section::Reasoning => ChatEvent::Reasoning(out),
            _ => ChatEvent::Content(out),
        });
    }

    /// Tool calls parsed from here on are numbered after `prefix` (an API's own form of ids).
    pub fn set_id_prefix(&mut self, prefix: impl Into<String>) {
        self.id_prefix = prefix.into();
    }

    fn parse_call(&mut self, body: &str) -> Option<ToolCall> {
        let body = body.trim();
        let (name, arguments) = if body.starts_with('{') {
            parse_json_call(body)?
        } else {
            self.parse_xml_call(body)?
        };
        let id = format!("{}{}", self.id_prefix, self.calls);
        self.calls += 1;
        Some(ToolCall { id, name, arguments })
    }

    fn parse_xml_call(&self, body: &str) -> Option<(String, Value)> {
        let rest = body.strip_prefix("<function=")?;
        let (name, mut rest) = rest.split_once('>')?;
        let name = name.trim().to_string();
        let schema = self.schemas.get(&name);
        let mut arguments = Map::new();
        while let Some(start) = rest.find("<parameter=") {
            let after = &rest[start + "<parameter=".len()..];
            let (param, after) = after.split_once('>')?;
            let (value, after) = match after.find("</parameter>") {
                Some(end) => (&after[..end], &after[end + "</parameter>".len()..]),
                // A missing close tag: the value runs to the next parameter or the function's end.
                None => {
                    let end = after
                        .find("<parameter=")
                        .or_else(|| after.find("</function>"))
                        .unwrap_or(after.len());
                    (&after[..end], &after[end..])
                }
            };
            let value = value.strip_prefix('\n').unwrap_or(value);
            let value = value.strip_suffix('\n').unwrap_or(value);
            let param = param.trim().to_string();
            let typed = typed_value(value, schema.and_then(|s| s.get(&param)));
            arguments.insert(param, typed);
            rest = after;
        }
        Some((name, Value::Object(arguments)))
    }
}

fn parse_json_call(body: &str) -> Option<(String, Value)> {
    let v: Value = serde_json::from_str(body).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
        Some(Value::String(s)) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
        Some(other) => other.clone(),
        None => Value::Object(Map::new()),
    };
    Some((name, arguments))
}

/// A parameter value written as text, typed by its JSON schema (`type`, a list of types,
/// or `anyOf`/`oneOf`); untyped values stay strings.
fn typed_value(text: &str, schema: Option<&Value>) -> Value {
    let types: Vec<&str> = match schema {
        None => Vec::new(),
        Some(s) => match s.get("type") {
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
            _ => ["anyOf", "oneOf"]
                .iter()
                .filter_map(|k| s.get(*k)?.as_array())
                .flatten()
                .filter_map(|alt| alt.get("type")?.as_str())
                .collect(),
        },
    };
    for t in &types {
        let parsed = match *t {
            "string" => return Value::String(text.to_string()),
            "integer" => text.trim().parse::<i64>().ok().map(Value::from),
            "number" => parse_number(text.trim()),
            "boolean" => match text.trim().to_ascii_lowercase().as_str() {
                "true" => Some(Value::Bool(true)),
                "false" => Some(Value::Bool(false)),
                _ => None,
            },
            "null" => (text.trim() == "null" || text.trim() == "None").then_some(Value::Null),
            "object" | "array" => serde_json::from_str(text).ok(),
            _ => None,
        };
        if let Some(v) = parsed {
            return v;
        }
    }
    Value::String(text.to_string())
}

fn parse_number(text: &str) -> Option<Value> {
    if let Ok(i) = text.parse::<i64>() {
        return Some(Value::from(i));
    }
    text.parse::<f64>().ok().and_then(Number::from_f64).map(Value::Number)
}

/// The length of the longest tail of `text` that is a proper prefix of one of `tags`.
fn partial_tag_len(text: &str, tags: &[&str]) -> usize {
    let longest = tags.iter().map(|t| t.len()).max().unwrap_or(0);
    (1..longest.min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && tags.iter().any(|t| t.starts_with(&text[text.len() - n..])))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn weather_tool() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
                "hours": {"type": "array"}}}}})
    }

    /// Feeds `text` one character at a time and merges consecutive events of one kind.
    fn run(parser: &mut OutputParser, text: &str) -> Vec<ChatEvent> {
        let mut events = Vec::new();
        for c in text.chars() {
            events.extend(parser.push(&c.to_string()));
        }
        events.extend(parser.finish());
        let mut merged: Vec<ChatEvent> = Vec::new();
        for e in events {
            match (merged.last_mut(), e) {
                (Some(ChatEvent::Content(a)), ChatEvent::Content(b)) => a.push_str(&b),
                (Some(ChatEvent::Reasoning(a)), ChatEvent::Reasoning(b)) => a.push_str(&b),
                (_, e) => merged.push(e),
            }
        }
        merged
    }

    #[test]
    fn reasoning_then_xml_call_typed_by_schema() {
        let mut p = OutputParser::new(&[weather_tool()], true, "call_");
        let text = "Need weather.\n</think>\n\nLet me check.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=metric>\nTrue\n</parameter>\n<parameter=hours>\n[1, 2]\n</parameter>\n</function>\n</tool_call>";
        assert_eq!(
            run(&mut p, text),
            vec![
                ChatEvent::Reasoning("Need weather.".into()),
                ChatEvent::Content("Let me check.".into()),
                ChatEvent::ToolCall(ToolCall {
                    id: "call_0".into(),
                    name: "get_weather".into(),
                    arguments: json!({"city": "New York", "days": 3, "metric": true, "hours": [1, 2]}),
                }),
            ]
        );
    }

    #[test]
    fn hermes_json_calls_and_string_arguments() {
        let mut p = OutputParser::new(&[], false, "c");
        let text = "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": \"{\\\"y\\\": \\\"z\\\"}\"}\n</tool_call>";
        let events = run(&mut p, text);
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(
            events[1],
            ChatEvent::ToolCall(ToolCall {
                id: "c1".into(),
                name: "b".into(),
                arguments: json!({"y": "z"})
            })
        );
    }

    #[test]
    fn text_like_tags_passes_through() {
        let mut p = OutputParser::new(&[], false, "c");
        assert_eq!(
            run(&mut p, "a < b <tool and <th"),
            vec![ChatEvent::Content("a < b <tool and <th".into())]
        );
    }

    #[test]
    fn model_opened_think_block_and_unfinished_call() {
        let mut p = OutputParser::new(&[], false, "c");
        assert_eq!(
            run(&mut p, "<think>\nhmm\n</think>\n\nok <tool_call>\n{\"name\": "),
            vec![
                ChatEvent::Reasoning("hmm".into()),
                ChatEvent::Content("ok <tool_call>\n{\"name\":".into()),
            ]
        );
    }

    #[test]
    fn untyped_values_stay_strings() {
        assert_eq!(typed_value("3", None), json!("3"));
        assert_eq!(typed_value("2.5", Some(&json!({"type": "number"}))), json!(2.5));
        assert_eq!(typed_value("x", Some(&json!({"type": "integer"}))), json!("x"));
        assert_eq!(
            typed_value("{\"a\":1}", Some(&json!({"anyOf": [{"type": "object"}]}))),
            json!({"a": 1})
        );
    }
}
