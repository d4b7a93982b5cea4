#!/usr/bin/env bash
# Why a kernel runs at the speed it does: Nsight Compute's full set of sections (memory
# throughput, occupancy, warp stall reasons, ...) for a few launches of the kernels whose
# names match $KERNELS, in a short decode of the synthetic model tools/gpu-kernel-times.sh
# uses (every expert in VRAM). The caches are flushed before every pass: Nsight Compute
# replays a kernel once per group of metrics, and with warm caches every pass after the first
# would find the weights in L2. Builds
# nothing: takes $DIST/flash-moe (default dist/). The report goes to $OUT/detail.txt (default
# /tmp/gpu-kernel-detail). SKIP launches of the matching kernels are passed over first
# (default 40: past the prompt and the first recordings), then COUNT are profiled (default 4).
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/gpu-common.sh
bin=${DIST:-dist}/flash-moe
out=${OUT:-/tmp/gpu-kernel-detail}
work=${WORK:-/root/flash-moe-profile}
ncu=$(find_ncu)
mkdir -p "$out" "$work"
model=$(synth_model 4 32)
"$ncu" --set full --clock-control none --cache-control all -k "regex:${KERNELS:?set KERNELS to a regex}" \
  --launch-skip "${SKIP:-40}" --launch-count "${COUNT:-4}" --print-details all \
  "$bin" generate --model "$model" --device cuda --prompt The --experts-per-token "${K:-10}" \
  --max-tokens 6 --prefetch-experts >"$out/detail.txt" 2>&1
grep -E '^  [a-z_0-9]+\(|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Waves Per SM|Eligible Warps|Issued Warp|Warp Cycles Per Issued|No Eligible|Block Limit' \
  "$out/detail.txt" || tail -30 "$out/detail.txt"
