//! `flash-moe tokenize` gives the ids Python's `tokenizers` gives for the same
//! tokenizer.json (tools/make_fixtures.py wrote the expected ids).

mod common;

use common::{fixtures, flash_moe, stderr};

#[test]
fn ids_match_python_tokenizers() {
    let model = fixtures().join("mlx-qwen35-4bit");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("tokenizer-reference.json")).unwrap()).unwrap();
    for case in cases.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<String> = case["ids"].as_array().unwrap().iter().map(|v| v.to_string()).collect();
        let run = flash_moe(&["tokenize", "--model", model.to_str().unwrap(), "--text", text]);
        assert!(run.status.success(), "{}", stderr(&run));
        assert_eq!(
            String::from_utf8_lossy(&run.stdout).trim(),
            expected.join(","),
            "text {text:?}"
        );
    }
}

#[test]
fn generate_streams_text_and_reports_speed() {
    let model = fixtures().join("mlx-qwen35-4bit");
    let run = flash_moe(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "def main():",
        "--max-tokens",
        "8",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let err = stderr(&run);
    assert!(
        err.contains("prompt:") && err.contains("decode:") && err.contains("tok/s"),
        "{err}"
    );
    // Greedy decoding is deterministic.
    let again = flash_moe(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "def main():",
        "--max-tokens",
        "8",
    ]);
    assert_eq!(run.stdout, again.stdout);
}
