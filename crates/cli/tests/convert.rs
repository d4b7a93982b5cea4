//! `flash-moe convert` and `verify`, and expert streaming: a packed model gives the same
//! logits as its source bit for bit, whatever the I/O mode; damage to expert files is
//! reported with the file and layer, never turned into wrong tokens.

mod common;

use std::path::Path;

use common::{fixture_ids, fixtures, flash_moe, logits_bytes, read_npy, stderr, temp_dir};

const FIXTURES: [&str; 6] = [
    "hf-qwen35-f32-per-expert",
    "hf-qwen35-bf16-fused",
    "hf-qwen3next-f32-sharded",
    "mlx-qwen35-4bit",
    "mlx-qwen35-mixed-2-6",
    "mlx-qwen3next-4bit-f16",
];

fn convert(from: &Path, to: &Path, extra: &[&str]) {
    let mut args = vec![
        "convert",
        "--from",
        from.to_str().unwrap(),
        "--to",
        to.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let run = flash_moe(&args);
    assert!(run.status.success(), "convert {}: {}", from.display(), stderr(&run));
}

#[test]
fn packed_models_give_bit_identical_logits_in_every_io_mode() {
    let out = temp_dir();
    for name in FIXTURES {
        let source = fixtures().join(name);
        let packed = out.path().join(name);
        // Quantized experts are copied by default; float experts only with `keep`.
        convert(&source, &packed, &["--expert-bits", "keep"]);
        let ids = fixture_ids(&source);
        let expected = logits_bytes(&source, &ids, &["--io", "mmap"]);
        for model in [&source, &packed] {
            for io in [
                &["--io", "page-cache"][..],
                &["--io", "direct"],
                &["--io", "mmap"],
                &["--expert-cache-mib", "1"],
            ] {
                let got = logits_bytes(model, &ids, io);
                assert!(
                    got == expected,
                    "{name}: {} with {io:?} differs from the resident source",
                    model.display()
                );
            }
        }
        let run = flash_moe(&["verify", packed.to_str().unwrap()]);
        assert!(run.status.success(), "verify {name}: {}", stderr(&run));
    }
}

#[test]
fn hf_to_4bit_conversion_matches_mlx_lm_own_conversion() {
    let source = fixtures().join("hf-qwen3next-f32-sharded");
    let out = temp_dir();
    let packed = out.path().join("q4");
    convert(&source, &packed, &["--expert-bits", "4", "--dense-bits", "4"]);
    let npy = out.path().join("q4.npy");
    let ids = fixture_ids(&source);
    let run = flash_moe(&[
        "logits",
        "--model",
        packed.to_str().unwrap(),
        "--ids",
        &ids,
        "--out",
        npy.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let (_, ours) = read_npy(&npy);
    let (_, reference) = read_npy(&source.join("reference-mlx-q4-full.npy"));
    let diff: f64 = ours.iter().zip(&reference).map(|(a, b)| f64::from(a - b).powi(2)).sum();
    let norm: f64 = reference.iter().map(|b| f64::from(*b).powi(2)).sum();
    let rel = (diff / norm).sqrt();
    assert!(rel < 1e-4, "relative L2 to mlx-lm's 4-bit conversion: {rel:.3e}");
}

#[test]
fn existing_destination_is_refused_and_left_alone() {
    let out = temp_dir();
    let dst = out.path().join("taken");
    std::fs::create_dir(&dst).unwrap();
    std::fs::write(dst.join("keep.txt"), "mine").unwrap();
    let source = fixtures().join("mlx-qwen35-4bit");
    let run = flash_moe(&[
        "convert",
        "--from",
        source.to_str().unwrap(),
        "--to",
        dst.to_str().unwrap(),
    ]);
    assert!(!run.status.success());
    assert!(stderr(&run).contains("already exists"), "{}", stderr(&run));
    assert_eq!(std::fs::read_to_string(dst.join("keep.txt")).unwrap(), "mine");
}

/// A packed copy of the 4-bit fixture to damage.
fn packed_copy() -> (tempfile::TempDir, std::path::PathBuf) {
    let out = temp_dir();
    let packed = out.path().join("m");
    convert(&fixtures().join("mlx-qwen35-4bit"), &packed, &[]);
    (out, packed)
}

fn logits_error(model: &Path, extra: &[&str]) -> String {
    let ids = fixture_ids(&fixtures().join("mlx-qwen35-4bit"));
    let out = temp_dir();
    let npy = out.path().join("x.npy");
    let mut args = vec![
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        &ids,
        "--out",
        npy.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let run = flash_moe(&args);
    assert!(!run.status.success(), "expected a failure");
    let err = stderr(&run);
    assert_eq!(err.trim_end().lines().count(), 1, "one line expected:\n{err}");
    err
}

#[test]
fn corrupted_expert_record_is_an_error_naming_file_and_layer() {
    let (_keep, packed) = packed_copy();
    let file = packed.join("experts/layer-002.bin");
    let mut bytes = std::fs::read(&file).unwrap();
    // Damage every record, so whichever experts the tokens route to are hit.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(packed.join("flash-moe.json")).unwrap()).unwrap();
    let record = manifest["layers"][2]["record_bytes"].as_u64().unwrap() as usize;
    for start in (0..bytes.len()).step_by(record) {
        bytes[start + 100] ^= 0x5a;
    }
    std::fs::write(&file, bytes).unwrap();
    for io in ["page-cache", "direct", "mmap", "auto"] {
        let err = logits_error(&packed, &["--io", io]);
        assert!(
            err.contains("layer-002.bin") && err.contains("layer 2") && err.contains("corrupted"),
            "{err}"
        );
    }
    let run = flash_moe(&["verify", packed.to_str().unwrap()]);
    assert!(!run.status.success());
    assert!(stderr(&run).contains("layer-002.bin"), "{}", stderr(&run));
}

#[test]
fn truncated_or_missing_layer_file_is_an_error_naming_it() {
    let (_keep, packed) = packed_copy();
    let file = packed.join("experts/layer-001.bin");
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len - 4096)
        .unwrap();
    let err = logits_error(&packed, &[]);
    assert!(
        err.contains("layer-001.bin") && err.contains("layer 1") && err.contains("truncated"),
        "{err}"
    );
    std::fs::remove_file(&file).unwrap();
    let err = logits_error(&packed, &[]);
    assert!(err.contains("layer-001.bin") && err.contains("layer 1"), "{err}");
}

#[test]
fn a_directory_without_its_manifest_does_not_load() {
    let (_keep, packed) = packed_copy();
    std::fs::remove_file(packed.join("flash-moe.json")).unwrap();
    let err = logits_error(&packed, &[]);
    assert!(err.contains("switch_mlp") || err.contains("not found"), "{err}");
}
