#!/usr/bin/env bash
# The whole test suite, as CI runs it: every Rust test, including the official `openai` and
# `anthropic` Python SDKs against `flash-moe serve` (installed once into target/client-venv).
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/client-venv
if ! "$venv/bin/python" -c "import openai, anthropic" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check openai==3.54.0 anthropic==2.12.0
fi
export FLASH_MOE_CLIENT_PYTHON="$PWD/$venv/bin/python" FLASH_MOE_REQUIRE_CLIENTS=1
cargo test --workspace --locked "$@"
