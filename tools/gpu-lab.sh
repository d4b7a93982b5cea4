#!/usr/bin/env bash
# Kernel lab on a GPU machine: builds tools/matvec_lab.cu with the machine's nvcc, prints
# ptxas's register report for the one-token kernels, runs the lab, and with NCU=1 profiles
# those kernels with Nsight Compute (hardware counters; clocks left alone). Logs go to $OUT
# (default /tmp/gpu-lab).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-lab}
mkdir -p "$out"
kernels="matvec_q4|matvec_q4_pdl|matvec_multi_q4|swiglu_batch_q4|down_batch_q4"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
# 1556: the kernels' `extern __shared__` arrays share one name, as they may.
nvcc -O3 -std=c++17 -arch=sm_90 -diag-suppress 1556 -Xptxas -v tools/matvec_lab.cu -o "$out/lab" >"$out/ptxas.log" 2>&1 ||
  { tail -20 "$out/ptxas.log"; exit 1; }
grep -A2 -E "properties for ($kernels)$" "$out/ptxas.log" | grep -E "for|Used|spill"
"$out/lab" | tee "$out/lab.log"
if [ "${NCU:-0}" = 1 ]; then
  sections="--section SpeedOfLight --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis --section InstructionStats --section SchedulerStats"
  # The first launch of each kernel: lm_head size for the matvecs, K=10 for the expert batch.
  for k in ${NCU_KERNELS:-matvec_q4 swiglu_batch_q4 down_batch_q4}; do
    # shellcheck disable=SC2086
    LAB_K=10 ncu --clock-control none -k regex:"^$k\$" -c 1 $sections "$out/lab" >"$out/ncu-$k.log" 2>&1
  done
  grep -E "^  [a-z_]+[0-9]|Duration|DRAM Throughput|Issue Slots Busy|Achieved Occupancy|Block Limit Reg" \
    "$out"/ncu-*.log
fi
rm -f "$out/lab"
