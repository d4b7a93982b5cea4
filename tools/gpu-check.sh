#!/usr/bin/env bash
# One call on a GPU machine, building nothing: CUDA-vs-CPU parity on every fixture, the server
# on both devices, kernel microbenchmarks, and the decode benchmark on synthetic Qwen3.5-397B shapes. Takes the
# binaries tools/build-dist.sh puts in $DIST (default dist/): flash-moe, cuda_parity,
# cuda_memory and cuda_kernels. Logs go to $OUT (default /tmp/gpu-check); a short table comes last.
#
# DECODE_ARGS passes options to tools/gpu_decode_bench.py (e.g. "--layers 2 --experts 64",
# "--layers 4,8" for the 60-layer estimate from two depths, or "--context 32768" to decode
# after a long prompt).
set -uo pipefail
cd "$(dirname "$0")/.."
dist=${DIST:-dist}
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
export FLASH_MOE_FIXTURES=$PWD/tests/fixtures

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

echo "== parity: CUDA against CPU"
"$dist/cuda_parity" --nocapture --test-threads 1 >"$out/parity.log" 2>&1
parity=$?
grep -E "relative L2|test result|panicked|SKIPPED" "$out/parity.log" | tail -60

echo "== a full GPU: experts give memory back to the sequence state"
"$dist/cuda_memory" --nocapture >"$out/memory.log" 2>&1
memory=$?
grep -E "cuda_memory|test result|panicked" "$out/memory.log"
[ "$parity" = 0 ] && parity=$memory

echo "== the server on the GPU against the server on the CPU"
python3 tools/gpu_server_check.py --bin "$dist/flash-moe" 2>&1 | tee "$out/server.log"
server=${PIPESTATUS[0]}
[ "$parity" = 0 ] && parity=$server

echo "== kernel microbenchmarks"
"$dist/cuda_kernels" 2>&1 | tee "$out/kernels.log"
hbm=$(grep 'device-to-device' "$out/kernels.log" | grep -oE '[0-9.]+ GB/s' | head -1 | cut -d' ' -f1)
h2d=$(grep 'pinned' "$out/kernels.log" | grep -oE '[0-9.]+ GB/s' | head -1 | cut -d' ' -f1)

if [ "${SKIP_DECODE:-0}" != 1 ] && [ -n "$hbm" ] && [ -n "$h2d" ]; then
  echo "== decode benchmark"
  # shellcheck disable=SC2086
  python3 tools/gpu_decode_bench.py --bin "$dist/flash-moe" --hbm-gbps "$hbm" --h2d-gbps "$h2d" \
    --out "$out" ${DECODE_ARGS:-} >"$out/decode.log" 2>&1
  tail -n 14 "$out/decode.log"
fi
echo "parity, memory and server checks exit status: $parity"
exit "$parity"
