//! `flash-moe chat` fed from a pipe: commands, multi-turn reuse of the conversation, and
//! `/save` / `/load`.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

fn chat(input: &str, extra: &[&str]) -> (String, String) {
    let model = common::repo_root().join("models/tiny-qwen35moe-4bit");
    let mut child = Command::new(env!("CARGO_BIN_EXE_flash-moe"))
        .args(["chat", "--device", "cpu", "--max-tokens", "12"])
        .args(extra)
        .arg("--model")
        .arg(&model)
        .env("HOME", common::temp_dir().path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flash-moe runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("input written");
    let out = child.wait_with_output().expect("chat ends");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).into_owned(), common::stderr(&out));
    assert!(out.status.success(), "chat failed:\n{stdout}\n{stderr}");
    (stdout, stderr)
}

#[test]
fn turns_reuse_the_conversation_and_sessions_round_trip() {
    let dir = common::temp_dir();
    let saved = dir.path().join("conversation.json");
    let saved = saved.to_str().expect("utf-8 path");
    let input =
        format!("/system Answer in Python.\ndef main\nimport os\n/save {saved}\n/clear\n/load {saved}\n/quit\n");
    let (stdout, stderr) = chat(&input, &[]);
    assert!(stdout.contains("(system prompt set)"), "{stdout}");
    assert!(stdout.contains("(saved 4 messages"), "{stdout}");
    assert!(stdout.contains("(loaded 4 messages"), "{stdout}");
    // Every turn reports its prompt; the second must reuse all of the first turn's prompt.
    let reused: Vec<usize> = stderr
        .lines()
        .filter_map(|l| l.split(", ").last()?.strip_suffix(" reused)")?.parse().ok())
        .collect();
    assert_eq!(reused.len(), 2, "{stderr}");
    assert_eq!(reused[0], 0);
    assert!(reused[1] > 10, "the second turn recomputed the first: {stderr}");
    let conversation: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(saved).expect("saved file")).expect("JSON");
    assert_eq!(conversation["system"], "Answer in Python.");
    let roles: Vec<&str> = conversation["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["role"].as_str().expect("role"))
        .collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
}

#[test]
fn bad_commands_and_files_are_reported_not_fatal() {
    let (_, stderr) = chat("/nonsense\n/load /no/such/file.json\n/quit\n", &[]);
    assert!(stderr.contains("unknown command /nonsense"), "{stderr}");
    assert!(stderr.contains("/no/such/file.json"), "{stderr}");
}
