//! Every fixture model, run through `flash-moe logits` in one batch and as prefill plus
//! one-token decode, must match the logits its outside reference implementation
//! (transformers or mlx-lm, see tools/make_fixtures.py) wrote: relative L2 error under 1e-4
//! and the same argmax at every position.

mod common;

use std::path::Path;

use common::{fixtures, flash_moe, read_npy, stderr};

const MAX_RELATIVE_L2: f64 = 1e-4;

fn relative_l2(ours: &[f32], reference: &[f32]) -> f64 {
    let diff: f64 = ours.iter().zip(reference).map(|(a, b)| f64::from(a - b).powi(2)).sum();
    let norm: f64 = reference.iter().map(|b| f64::from(*b).powi(2)).sum();
    (diff / norm).sqrt()
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best })
}

/// Runs `logits` on `model` and checks it against `reference`.
fn check(model: &Path, reference: &str, prefill: Option<usize>) {
    check_with(model, reference, prefill, &[]);
}

/// [`check`] with `extra` arguments for `logits`.
fn check_with(model: &Path, reference: &str, prefill: Option<usize>, extra: &[&str]) {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("reference.json")).unwrap()).unwrap();
    let ids: Vec<String> = meta["ids"].as_array().unwrap().iter().map(|v| v.to_string()).collect();
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("logits.npy");
    let ids = ids.join(",");
    let prefill_text = prefill.map(|p| p.to_string());
    let mut args = vec![
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        &ids,
        "--out",
        out.to_str().unwrap(),
    ];
    if let Some(p) = &prefill_text {
        args.extend(["--prefill", p]);
    }
    args.extend(extra);
    let run = flash_moe(&args);
    assert!(run.status.success(), "{}: {}", model.display(), stderr(&run));
    let (shape, ours) = read_npy(&out);
    let (ref_shape, expected) = read_npy(&model.join(reference));
    assert_eq!(shape, ref_shape, "{}: logits shape", model.display());
    let err = relative_l2(&ours, &expected);
    assert!(
        err < MAX_RELATIVE_L2,
        "{} vs {reference}: relative L2 {err:.3e}",
        model.display()
    );
    let vocab = shape[1];
    for (t, (a, b)) in ours.chunks(vocab).zip(expected.chunks(vocab)).enumerate() {
        assert_eq!(
            argmax(a),
            argmax(b),
            "{} vs {reference}: argmax differs at position {t}",
            model.display()
        );
    }
    eprintln!("{} vs {reference}: relative L2 {err:.2e}", model.display());
}

fn check_fixture(name: &str) {
    let model = fixtures().join(name);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("reference.json")).unwrap()).unwrap();
    let prefill = meta["prefill"].as_u64().unwrap() as usize;
    check(&model, "reference-full.npy", None);
    check(&model, "reference-prefill-decode.npy", Some(prefill));
}

#[test]
fn hf_qwen35_f32_per_expert_non_periodic_layers_matches_transformers() {
    check_fixture("hf-qwen35-f32-per-expert");
}

#[test]
fn hf_qwen35_bf16_fused_language_model_prefix_matches_transformers() {
    check_fixture("hf-qwen35-bf16-fused");
}

#[test]
fn hf_qwen3next_sharded_with_dense_layer_matches_transformers() {
    check_fixture("hf-qwen3next-f32-sharded");
}

#[test]
fn mlx_qwen35_4bit_with_8bit_router_matches_mlx_lm() {
    check_fixture("mlx-qwen35-4bit");
}

#[test]
fn mlx_qwen35_mixed_2_6_matches_mlx_lm() {
    check_fixture("mlx-qwen35-mixed-2-6");
}

#[test]
fn mlx_qwen3next_4bit_f16_matches_mlx_lm() {
    check_fixture("mlx-qwen3next-4bit-f16");
}

/// Missed experts computed on the CPU beside the device's (`--cpu-expert-share`) change only
/// the order of a token's sum; on the CPU backend every routed expert is a miss, so the
/// one-token steps take that path for half of their experts, then for all.
#[test]
fn experts_shared_with_the_cpu_match_mlx_lm() {
    let model = fixtures().join("mlx-qwen35-4bit");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("reference.json")).unwrap()).unwrap();
    let prefill = meta["prefill"].as_u64().unwrap() as usize;
    for share in ["0.5", "1"] {
        let extra = ["--cpu-expert-share", share];
        check_with(&model, "reference-prefill-decode.npy", Some(prefill), &extra);
    }
}

#[test]
fn every_fixture_with_a_reference_has_a_test() {
    let tested = [
        "hf-qwen35-f32-per-expert",
        "hf-qwen35-bf16-fused",
        "hf-qwen3next-f32-sharded",
        "mlx-qwen35-4bit",
        "mlx-qwen35-mixed-2-6",
        "mlx-qwen3next-4bit-f16",
    ];
    for entry in std::fs::read_dir(fixtures()).unwrap() {
        let path = entry.unwrap().path();
        if path.join("reference.json").exists() {
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            assert!(tested.contains(&name.as_str()), "fixture {name} has no test");
        }
    }
}
