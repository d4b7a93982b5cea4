#!/usr/bin/env bash
# Compares two builds in one call on a GPU machine, building nothing: the parity test of the
# new one, then the kernel microbenchmarks and the decode benchmark of each, alternating
# (base, new, base, new, ...) so that both see the same machine and the same noise.
#
#   tools/gpu-compare.sh BASE_DIST NEW_DIST      (directories made by tools/build-dist.sh)
#
# ROUNDS (default 2) sets the alternations; DECODE_ARGS goes to tools/gpu_decode_bench.py.
# Logs go to $OUT (default /tmp/gpu-compare): parity.log, base.log and new.log, each with
# every round's kernel table, decode table and time per phase, and each run's decode JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
base=$1
new=$2
out=${OUT:-/tmp/gpu-compare}
rounds=${ROUNDS:-2}
work=$(mktemp -d)
mkdir -p "$out"
export FLASH_MOE_FIXTURES=$PWD/tests/fixtures

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/parity.log"
"$new/cuda_parity" --nocapture --test-threads 1 >>"$out/parity.log" 2>&1
parity=$?
grep -E "test result|panicked|SKIPPED" "$out/parity.log"

for round in $(seq "$rounds"); do
  for name in base new; do
    dist=${!name}
    log="$out/$name.log"
    echo "=== round $round: $name ($dist)" | tee -a "$log"
    "$dist/cuda_kernels" >"$work/kernels.log" 2>&1
    cat "$work/kernels.log" >>"$log"
    hbm=$(grep 'device-to-device' "$work/kernels.log" | grep -oE '[0-9.]+ GB/s' | head -1 | cut -d' ' -f1)
    h2d=$(grep 'pinned' "$work/kernels.log" | grep -oE '[0-9.]+ GB/s' | head -1 | cut -d' ' -f1)
    # shellcheck disable=SC2086
    python3 tools/gpu_decode_bench.py --bin "$dist/flash-moe" --hbm-gbps "$hbm" --h2d-gbps "$h2d" \
      --out "$work" ${DECODE_ARGS:-} >"$work/decode.log" 2>&1
    grep -vE '^\$ ' "$work/decode.log" | grep -E '^  K=|\||^decode benchmark' >>"$log"
    cp "$work/decode-bench.json" "$out/$name-round$round.json"
    tail -n 6 "$work/decode.log"
  done
done
echo "parity exit status: $parity"
exit "$parity"
