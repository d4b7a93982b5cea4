#!/usr/bin/env bash
# Builds the release binary, the CUDA parity and memory tests and the kernel benchmark, and
# copies them into dist/ (ignored by git) for tools/gpu-check.sh on a GPU machine without cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p dist
cargo build --release
cp target/release/flash-moe dist/
exe() { jq -r 'select(.executable != null and .target.name == "'"$1"'") | .executable' | tail -1; }
cp "$(cargo test --release --no-run -p flash-moe-engine --test cuda_parity --message-format=json 2>/dev/null | exe cuda_parity)" dist/cuda_parity
cp "$(cargo test --release --no-run -p flash-moe-engine --test cuda_memory --message-format=json 2>/dev/null | exe cuda_memory)" dist/cuda_memory
cp "$(cargo bench --no-run -p flash-moe-engine --bench cuda_kernels --message-format=json 2>/dev/null | exe cuda_kernels)" dist/cuda_kernels
strip dist/*
ls -la dist
