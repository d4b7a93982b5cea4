//! Helpers shared by the CLI integration tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `tests/fixtures` at the workspace root.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Runs the `flash-moe` binary with `args`.
pub fn flash_moe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flash-moe"))
        .args(args)
        .output()
        .expect("the flash-moe binary runs")
}

/// Reads a little-endian f32 `.npy` file written by numpy or by us.
pub fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    flash_moe_engine::storage::npy::read_f32(path).unwrap_or_else(|e| panic!("{e}"))
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A temporary directory on the same disk as the build (not a tmpfs /tmp, where O_DIRECT
/// fails).
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir")
}

/// The token ids a fixture's reference was computed on, comma-separated.
pub fn fixture_ids(model: &Path) -> String {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("reference.json")).expect("reference.json"))
            .expect("valid JSON");
    let ids: Vec<String> = meta["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.to_string())
        .collect();
    ids.join(",")
}

/// Runs `flash-moe logits` and returns the .npy bytes; panics with stderr on failure.
pub fn logits_bytes(model: &Path, ids: &str, extra: &[&str]) -> Vec<u8> {
    let out = temp_dir();
    let npy = out.path().join("logits.npy");
    let mut args = vec![
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        ids,
        "--out",
        npy.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let run = flash_moe(&args);
    assert!(run.status.success(), "{}: {}", model.display(), stderr(&run));
    std::fs::read(&npy).expect("logits written")
}

/// Copies a fixture model into a fresh temporary directory, for tests that damage it.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = temp_dir();
    for entry in std::fs::read_dir(fixtures().join(name)).expect("fixture exists") {
        let path = entry.expect("dir entry").path();
        std::fs::copy(&path, dir.path().join(path.file_name().expect("file name"))).expect("copy");
    }
    dir
}

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}
