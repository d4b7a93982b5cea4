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

/// Copies a fixture model into a fresh temporary directory, for tests that damage it.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for entry in std::fs::read_dir(fixtures().join(name)).expect("fixture exists") {
        let path = entry.expect("dir entry").path();
        std::fs::copy(&path, dir.path().join(path.file_name().expect("file name"))).expect("copy");
    }
    dir
}
