//! Bad input never panics: each case exits non-zero with one line on stderr that names the
//! file, tensor or field at fault.

mod common;

use std::collections::HashMap;

use common::{copy_fixture, fixtures, flash_moe, stderr};
use safetensors::tensor::{Dtype, TensorView};

/// Runs `logits` on `model` and returns the single error line.
fn logits_error(model: &str, ids: &str) -> String {
    let out = tempfile::tempdir().unwrap();
    let npy = out.path().join("x.npy");
    let run = flash_moe(&["logits", "--model", model, "--ids", ids, "--out", npy.to_str().unwrap()]);
    let err = stderr(&run);
    assert!(!run.status.success(), "expected a failure, got success");
    assert_eq!(run.status.code(), Some(1), "exit code for: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line expected:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn missing_model_directory() {
    let err = logits_error("/nonexistent/model", "1,2");
    assert!(err.contains("/nonexistent/model/config.json"), "{err}");
    assert_eq!(
        err.matches("No such file").count(),
        1,
        "the cause is printed once: {err}"
    );
}

#[test]
fn unknown_model_type() {
    let dir = copy_fixture("hf-qwen35-f32-per-expert");
    let config = dir.path().join("config.json");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("qwen3_5_moe_text", "llama");
    std::fs::write(&config, text).unwrap();
    let err = logits_error(dir.path().to_str().unwrap(), "1");
    assert!(err.contains("config.json") && err.contains("llama"), "{err}");
}

#[test]
fn missing_config_field() {
    let dir = copy_fixture("hf-qwen35-f32-per-expert");
    let config = dir.path().join("config.json");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("\"num_experts\"", "\"num_experts_renamed\"");
    std::fs::write(&config, text).unwrap();
    let err = logits_error(dir.path().to_str().unwrap(), "1");
    assert!(err.contains("num_experts"), "{err}");
}

#[test]
fn truncated_safetensors() {
    let dir = copy_fixture("hf-qwen35-bf16-fused");
    let file = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let err = logits_error(dir.path().to_str().unwrap(), "1");
    assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");
}

#[test]
fn missing_shard() {
    let dir = copy_fixture("hf-qwen3next-f32-sharded");
    std::fs::remove_file(dir.path().join("model-00002-of-00004.safetensors")).unwrap();
    let err = logits_error(dir.path().to_str().unwrap(), "1");
    assert!(err.contains("model-00002-of-00004.safetensors"), "{err}");
}

#[test]
fn tensor_of_the_wrong_shape() {
    let dir = copy_fixture("hf-qwen35-f32-per-expert");
    let config = dir.path().join("config.json");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("\"moe_intermediate_size\": 16", "\"moe_intermediate_size\": 24");
    std::fs::write(&config, text).unwrap();
    let err = logits_error(dir.path().to_str().unwrap(), "1");
    assert!(
        err.contains("mlp.experts.0.gate_proj.weight") && err.contains("[24, 64]"),
        "{err}"
    );
}

/// Rewrites one tensor of a single-file checkpoint with another dtype of the same width.
#[test]
fn tensor_of_the_wrong_dtype() {
    let dir = copy_fixture("hf-qwen35-bf16-fused");
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let target = "model.language_model.layers.0.mlp.gate.weight";
    let views: HashMap<String, TensorView<'_>> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let view = if name == target {
                TensorView::new(Dtype::I16, view.shape().to_vec(), view.data()).unwrap()
            } else {
                view
            };
            (name, view)
        })
        .collect();
    let rewritten = safetensors::serialize(&views, None).unwrap();
    std::fs::write(&file, rewritten).unwrap();
    let err = logits_error(dir.path().to_str().unwrap(), "1");
    assert!(err.contains(target) && err.contains("I16"), "{err}");
}

#[test]
fn token_id_out_of_range() {
    let model = fixtures().join("hf-qwen35-f32-per-expert");
    let err = logits_error(model.to_str().unwrap(), "1,999999");
    assert!(err.contains("999999") && err.contains("256"), "{err}");
}

#[test]
fn unparsable_ids_are_a_usage_error() {
    let model = fixtures().join("hf-qwen35-f32-per-expert");
    let run = flash_moe(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        "1,x",
        "--out",
        "/tmp/unused.npy",
    ]);
    assert!(!run.status.success());
    assert!(stderr(&run).contains("--ids"), "{}", stderr(&run));
}

#[test]
fn too_many_experts_per_token_names_the_limit() {
    let model = fixtures().join("hf-qwen35-f32-per-expert");
    let out = tempfile::tempdir().unwrap();
    let npy = out.path().join("x.npy");
    let run = flash_moe(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        "1,2",
        "--out",
        npy.to_str().unwrap(),
        "--device",
        "cpu",
        "--experts-per-token",
        "7",
    ]);
    let err = stderr(&run);
    assert_eq!(run.status.code(), Some(1), "{err}");
    assert!(
        err.contains("experts per token must be between 1 and 6 (6 experts per layer), not 7"),
        "{err}"
    );
}
