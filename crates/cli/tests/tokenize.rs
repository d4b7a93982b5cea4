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

/// A prompt read from a file or standard input is the same prompt; one that runs past the model's context (a
/// copy of the fixture whose config allows 12 positions) draws a warning, and still runs.
#[test]
fn generate_reads_a_prompt_file_and_warns_past_the_context() {
    let model = common::copy_fixture("mlx-qwen35-4bit");
    let dir = model.path().to_str().unwrap();
    let prompt = model.path().join("prompt.txt");
    std::fs::write(&prompt, "def main():").unwrap();
    let run = |source: &[&str]| flash_moe(&[&["generate", "--model", dir, "--max-tokens", "8"], source].concat());
    let inline = run(&["--prompt", "def main():"]);
    let from_file = run(&["--prompt-file", prompt.to_str().unwrap()]);
    assert!(from_file.status.success(), "{}", stderr(&from_file));
    assert_eq!(inline.stdout, from_file.stdout);
    let mut piped = std::process::Command::new(env!("CARGO_BIN_EXE_flash-moe"))
        .args(["generate", "--model", dir, "--max-tokens", "8", "--prompt-file", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut piped.stdin.take().unwrap(), b"def main():").unwrap();
    assert_eq!(
        piped.wait_with_output().unwrap().stdout,
        inline.stdout,
        "the prompt from standard input"
    );
    assert!(!stderr(&inline).contains("warning"), "{}", stderr(&inline));

    let config = model.path().join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    let short = text.replace("\"max_position_embeddings\": 4096", "\"max_position_embeddings\": 12");
    assert_ne!(text, short, "the fixture's config names its context");
    std::fs::write(&config, short).unwrap();
    let past = run(&["--prompt", "def main():"]);
    assert!(past.status.success(), "{}", stderr(&past));
    assert!(
        stderr(&past).contains("go past the model's context of 12 tokens"),
        "{}",
        stderr(&past)
    );
}

/// The README's first command: the bundled trained model writes text that looks like the
/// Python it was trained on (a random-weight model writes byte soup).
#[test]
fn bundled_model_writes_python() {
    let model = fixtures().join("../../models/tiny-qwen35moe-4bit");
    let run = flash_moe(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "def read_config(path):",
        "--max-tokens",
        "60",
        "--device",
        "cpu",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let text = String::from_utf8_lossy(&run.stdout);
    let printable = text
        .chars()
        .filter(|c| c.is_ascii_graphic() || c.is_ascii_whitespace())
        .count();
    assert!(
        printable * 10 >= text.chars().count() * 9,
        "mostly ASCII expected: {text:?}"
    );
    let words = ["def ", "return", "self", "import", "\"\"\"", "if ", "for ", "None"];
    assert!(words.iter().any(|w| text.contains(w)), "no Python in {text:?}");
}

/// `flash-moe eval` gives the perplexity mlx-lm computes for the bundled model on the first
/// windows of its held-out text (tools/eval_reference.py wrote the reference).
#[test]
fn eval_perplexity_matches_mlx_lm() {
    let root = fixtures().join("../..");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("bundled-eval-reference.json")).unwrap())
            .unwrap();
    let tokens = (reference["window"].as_u64().unwrap() * reference["windows"].as_u64().unwrap()).to_string();
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("eval.json");
    let run = flash_moe(&[
        "eval",
        "--model",
        root.join("models/tiny-qwen35moe-4bit").to_str().unwrap(),
        "--text",
        root.join("models/heldout.txt").to_str().unwrap(),
        "--max-tokens",
        &tokens,
        "--device",
        "cpu",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let ours: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(ours["predictions"], reference["predictions"]);
    let (a, b) = (
        ours["perplexity"].as_f64().unwrap(),
        reference["perplexity"].as_f64().unwrap(),
    );
    assert!((a - b).abs() / b < 1e-4, "flash-moe {a} vs mlx-lm {b}");
}
