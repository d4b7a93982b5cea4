//! The model's own chat template (Jinja, as Hugging Face ships it), rendered with minijinja
//! set up to match transformers' `apply_chat_template` byte for byte: trimmed and
//! left-stripped blocks, Python string and dict methods, `tojson` as Python's `json.dumps`,
//! `raise_exception` and `strftime_now`.

use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Value as JinjaValue};
use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde_json::Value;

use super::Message;
use crate::error::{Error, Result};

/// ChatML, used when a model ships no template.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] \
    + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// How a model writes tool calls, told from its template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolCallFormat {
    /// Qwen3.5 / Qwen3-Coder: `<tool_call><function=NAME><parameter=P>value</parameter></function></tool_call>`.
    QwenXml,
    /// Qwen3 / Hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
    HermesJson,
}

/// A model's chat template, ready to render.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    path: PathBuf,
    fallback: bool,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl ChatTemplate {
    /// Reads `chat_template.jinja`, else `chat_template` in `tokenizer_config.json` (a string, or
    /// a list of named templates of which `default` is taken), else falls back to ChatML.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Option<Value> = match std::fs::read_to_string(&config_path) {
            Ok(text) => Some(serde_json::from_str(&text).map_err(|error| Error::Json {
                path: config_path.clone(),
                error,
            })?),
            Err(_) => None,
        };
        let token = |key: &str| {
            config
                .as_ref()
                .and_then(|c| c.get(key))
                .and_then(|t| t.as_str().or_else(|| t.get("content")?.as_str()))
                .map(str::to_string)
        };
        let jinja_path = dir.join("chat_template.jinja");
        let (source, path, fallback) = if let Ok(text) = std::fs::read_to_string(&jinja_path) {
            (text, jinja_path, false)
        } else if let Some(t) = config.as_ref().and_then(|c| c.get("chat_template")) {
            let text = match t {
                Value::String(s) => Some(s.clone()),
                Value::Array(list) => list
                    .iter()
                    .find(|e| e.get("name").and_then(Value::as_str) == Some("default"))
                    .or_else(|| list.first())
                    .and_then(|e| e.get("template")?.as_str())
                    .map(str::to_string),
                _ => None,
            };
            let text = text.ok_or_else(|| Error::InvalidField {
                path: config_path.clone(),
                field: "chat_template".into(),
                message: "expected a string or a list of {name, template}".into(),
            })?;
            (text, config_path, false)
        } else {
            (CHATML.to_string(), dir.join("(built-in ChatML)"), true)
        };
        Self::new(source, path, fallback, token("bos_token"), token("eos_token"))
    }

    /// A template from its source text.
    pub fn new(
        source: String,
        path: PathBuf,
        fallback: bool,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| template_error(&path, e))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_filter("tojson", tojson);
        env.add_filter("string", python_string);
        env.add_test("iterable", is_python_iterable);
        env.set_formatter(|out, state, value| match python_scalar(value) {
            Some(text) => out
                .write_str(&text)
                .map_err(|e| JinjaError::new(ErrorKind::WriteFailure, e.to_string())),
            None => minijinja::escape_formatter(out, state, value),
        });
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", source.clone())
            .map_err(|e| template_error(&path, e))?;
        Ok(ChatTemplate {
            env,
            source,
            path,
            fallback,
            bos_token,
            eos_token,
        })
    }

    /// True when the model had no template and ChatML is used.
    pub fn is_fallback(&self) -> bool {
        self.fallback
    }

    /// How the model writes tool calls, as its template shows them.
    pub fn tool_call_format(&self) -> ToolCallFormat {
        if self.source.contains("<function=") || self.source.contains("<parameter=") {
            ToolCallFormat::QwenXml
        } else {
            ToolCallFormat::HermesJson
        }
    }

    /// Renders a conversation. `tools` are OpenAI-style tool definitions
    /// (`{"type": "function", "function": {...}}`); `enable_thinking` is passed only when set.
    pub fn render(
        &self,
        messages: &[Message],
        tools: &[Value],
        add_generation_prompt: bool,
        enable_thinking: Option<bool>,
    ) -> Result<String> {
        let messages: Vec<Value> = messages.iter().map(Message::to_template_value).collect();
        let mut ctx = serde_json::Map::new();
        ctx.insert("messages".into(), Value::Array(messages));
        // transformers passes `tools` and `documents` as None when there are none.
        let tools = if tools.is_empty() {
            Value::Null
        } else {
            Value::Array(tools.to_vec())
        };
        ctx.insert("tools".into(), tools);
        ctx.insert("documents".into(), Value::Null);
        ctx.insert("add_generation_prompt".into(), Value::Bool(add_generation_prompt));
        if let Some(t) = enable_thinking {
            ctx.insert("enable_thinking".into(), Value::Bool(t));
        }
        for (key, value) in [("bos_token", &self.bos_token), ("eos_token", &self.eos_token)] {
            if let Some(v) = value {
                ctx.insert(key.into(), Value::String(v.clone()));
            }
        }
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| template_error(&self.path, e))?;
        template
            .render(JinjaValue::from(minijinja::value::Serde(&ctx)))
            .map_err(|e| template_error(&self.path, e))
    }
}

fn template_error(path: &Path, e: JinjaError) -> Error {
    Error::InvalidInput(format!("chat template {}: {e:#}", path.display()))
}

/// A scalar as Python's `str` writes it where minijinja differs: floats (`1e-05`, `3.0`),
/// `None`, `True`, `False`. None for anything else.
fn python_scalar(value: &JinjaValue) -> Option<String> {
    use minijinja::value::ValueKind;
    match value.kind() {
        ValueKind::None => Some("None".into()),
        ValueKind::Bool => Some(if value.is_true() { "True" } else { "False" }.into()),
        ValueKind::Number if !value.is_integer() => f64::try_from(value.clone()).ok().map(python_float),
        _ => None,
    }
}

/// `|string` with Python's formatting of scalars.
fn python_string(state: &minijinja::State, value: &JinjaValue) -> std::result::Result<JinjaValue, JinjaError> {
    match python_scalar(value) {
        Some(text) => Ok(JinjaValue::from(text)),
        None => minijinja::filters::string(state, value),
    }
}

/// `is iterable` as in Python: none, undefined, numbers and booleans are not (minijinja
/// iterates none as an empty sequence).
fn is_python_iterable(value: &JinjaValue) -> bool {
    use minijinja::value::ValueKind;
    !matches!(
        value.kind(),
        ValueKind::None | ValueKind::Undefined | ValueKind::Number | ValueKind::Bool
    ) && value.try_iter().is_ok()
}

fn raise_exception(message: String) -> std::result::Result<JinjaValue, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

/// The current UTC time formatted with the common strftime directives.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let (year, month, day) = civil_from_days(days);
    let (h, m, s) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let month_name = MONTHS[(month - 1) as usize];
    let day_name = DAYS[days.rem_euclid(7) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('M') => out.push_str(&format!("{m:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(day_name),
            Some('a') => out.push_str(&day_name[..3]),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=..., ...)`,
/// with Python's separators and no HTML escaping.
fn tojson(value: JinjaValue, kwargs: Kwargs) -> std::result::Result<JinjaValue, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let json: Value =
        serde_json::to_value(&value).map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let json = if sort_keys == Some(true) { sorted(json) } else { json };
    let mut out = String::new();
    python_json(&json, indent, 0, &mut out);
    Ok(JinjaValue::from_safe_string(out))
}

fn sorted(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// Writes `v` the way Python's `json.dumps` does (", " and ": " separators, or one item per
/// line with `indent`).
fn python_json(v: &Value, indent: Option<usize>, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v {
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        Value::Number(n) if n.is_f64() => out.push_str(&python_float(n.as_f64().unwrap_or(0.0))),
        other => out.push_str(&other.to_string()),
    }
}

/// Python's `repr` of a float (`1.0`, `1e-05`, `0.1`).
fn python_float(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e16 {
        return format!("{f:.1}");
    }
    let s = format!("{f:e}");
    let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        format!("{f}")
    } else {
        format!("{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_writes_python_style() {
        let v: Value =
            serde_json::from_str(r#"{"b": [1, 2.5, "<x&y>"], "a": {"k": null, "t": true}, "e": 1e-5}"#).unwrap();
        let mut out = String::new();
        python_json(&v, None, 0, &mut out);
        assert_eq!(
            out,
            r#"{"b": [1, 2.5, "<x&y>"], "a": {"k": null, "t": true}, "e": 1e-05}"#
        );
        let mut out = String::new();
        python_json(&serde_json::json!({"a": [1]}), Some(2), 0, &mut out);
        assert_eq!(out, "{\n  \"a\": [\n    1\n  ]\n}");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_779), (2026, 11, 22));
    }

    #[test]
    fn python_scalars_and_iterables() {
        let t = ChatTemplate::new(
            "{% for k, v in messages[0].tool_calls[0].function.arguments|items %}[{{ v|string }}|{{ v }}|{{ v is iterable }}]{% endfor %}".into(),
            PathBuf::from("x"),
            false,
            None,
            None,
        )
        .unwrap();
        let mut m = Message::text("assistant", "");
        m.tool_calls.push(crate::chat::ToolCall {
            id: "a".into(),
            name: "f".into(),
            arguments: serde_json::json!({"a": null, "b": 1e-5, "c": true, "d": [1], "e": "s", "f": 2}),
        });
        assert_eq!(
            t.render(&[m], &[], false, None).unwrap(),
            "[None|None|False][1e-05|1e-05|False][True|True|False][[1]|[1]|True][s|s|True][2|2|False]"
        );
    }

    #[test]
    fn chatml_fallback_renders() {
        let t = ChatTemplate::new(CHATML.into(), PathBuf::from("x"), true, None, None).unwrap();
        let m = [Message::text("user", "hi")];
        assert_eq!(
            t.render(&m, &[], true, None).unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
