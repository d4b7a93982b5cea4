//! Chat templates rendered by minijinja against transformers' `apply_chat_template` on the
//! same conversations (tests/fixtures/chat/cases.json, made by tools/make_chat_fixtures.py).

use std::path::{Path, PathBuf};

use flash_moe_engine::chat::{ChatTemplate, Message, ToolCall, ToolCallFormat};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat")
}

/// A message in the HF/OpenAI shape (tool calls nested under `function`) to ours.
fn message(v: &Value) -> Message {
    let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    let calls = v
        .get("tool_calls")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    Message {
        role: text("role").expect("role"),
        content: text("content").unwrap_or_default(),
        reasoning_content: text("reasoning_content"),
        tool_calls: calls
            .iter()
            .map(|c| ToolCall {
                id: c["id"].as_str().unwrap_or_default().to_string(),
                name: c["function"]["name"].as_str().expect("name").to_string(),
                arguments: c["function"]["arguments"].clone(),
            })
            .collect(),
        tool_call_id: text("tool_call_id"),
        name: text("name"),
    }
}

#[test]
fn templates_render_like_transformers() {
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("cases.json")).expect("cases.json"))
            .expect("JSON");
    let cases = cases["cases"].as_array().expect("cases");
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let file = fixtures().join(case["template"].as_str().expect("template"));
        let source = std::fs::read_to_string(&file).expect("template file");
        let template = ChatTemplate::new(source, file, false, None, None).expect("template parses");
        let messages: Vec<Message> = case["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(message)
            .collect();
        let tools = case["tools"].as_array().cloned().unwrap_or_default();
        let rendered = template.render(
            &messages,
            &tools,
            case["add_generation_prompt"].as_bool().expect("flag"),
            case["enable_thinking"].as_bool(),
        );
        match (rendered, case.get("expected").and_then(Value::as_str)) {
            (Ok(text), Some(expected)) if text == expected => {}
            (Err(_), None) => {}
            (got, expected) => failures.push(format!("{name}:\n  got      {got:?}\n  expected {expected:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn tool_call_format_is_read_from_the_template() {
    let read = |f: &str| {
        let file = fixtures().join(f);
        ChatTemplate::new(
            std::fs::read_to_string(&file).expect("template"),
            file,
            false,
            None,
            None,
        )
        .expect("parses")
        .tool_call_format()
    };
    assert_eq!(read("qwen35_style.jinja"), ToolCallFormat::QwenXml);
    assert_eq!(read("qwen3_style.jinja"), ToolCallFormat::HermesJson);
}

#[test]
fn forced_tool_calls_close_thinking_and_prime_the_parser() {
    use flash_moe_engine::chat::{ChatEvent, ToolChoice, build_prompt};
    use flash_moe_engine::tokenizer::Tokenizer;
    let file = fixtures().join("qwen35_style.jinja");
    let template = ChatTemplate::new(
        std::fs::read_to_string(&file).expect("template"),
        file,
        false,
        None,
        None,
    )
    .expect("parses");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-qwen35moe-4bit");
    let tokenizer = Tokenizer::from_dir(&model, &[]).expect("tokenizer");
    let tool = serde_json::json!({"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"days": {"type": "integer"}}}}});
    let messages = [Message::text("user", "Weather?")];
    let choice = ToolChoice::Function("get_weather".into());
    let mut built = build_prompt(&template, &tokenizer, &messages, &[tool], &choice, None).expect("builds");
    let text = tokenizer.decode(&built.prompt).expect("decodes");
    assert!(
        text.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n<function=get_weather>\n"),
        "{text:?}"
    );
    let head = tokenizer
        .decode(&built.prompt[..built.checkpoints[0]])
        .expect("decodes");
    assert!(
        head.ends_with("Weather?<|im_end|>\n"),
        "checkpoint at the end of the conversation: {head:?}"
    );
    let mut events = built
        .parser
        .push("<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>");
    events.extend(built.parser.finish());
    match events.as_slice() {
        [ChatEvent::ToolCall(call)] => {
            assert_eq!(call.name, "get_weather");
            assert_eq!(call.arguments, serde_json::json!({"days": 3}));
        }
        other => panic!("expected one tool call, got {other:?}"),
    }
    let plain = build_prompt(&template, &tokenizer, &messages, &[], &ToolChoice::Auto, Some(false)).expect("builds");
    assert!(
        tokenizer
            .decode(&plain.prompt)
            .expect("decodes")
            .ends_with("<think>\n\n</think>\n\n")
    );
}
