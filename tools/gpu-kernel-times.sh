#!/usr/bin/env bash
# Where one decoded token's GPU time goes, kernel by kernel: Nsight Compute (clocks left
# alone) times every launch of a short decode on a small synthetic model with Qwen3.5-397B
# shapes (4 layers: 3 linear-attention, 1 full-attention; every expert in VRAM), and the last
# token's launches are summed by kernel. The same decode is also run without the profiler, so
# the table ends with the token's wall time against the sum of its kernels: the difference is
# time the GPU spent idle between launches. Builds nothing: takes $DIST/flash-moe (default
# dist/). Logs go to $OUT (default /tmp/gpu-kernel-times). K sets the experts per token
# (default 10). CACHE=none keeps the caches warm between kernels, as in a real decode, where
# a kernel's input often still sits in L2 (default: all, flushed before every kernel).
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/gpu-common.sh
bin=${DIST:-dist}/flash-moe
out=${OUT:-/tmp/gpu-kernel-times}
work=${WORK:-/root/flash-moe-profile}
k=${K:-10}
ncu=$(find_ncu)
mkdir -p "$out" "$work"
model=$(synth_model 4 32)
decode=(generate --model "$model" --device cuda --prompt The --experts-per-token "$k" --max-tokens 3 --prefetch-experts)
"$bin" "${decode[@]}" --warmup-tokens 8 --stats-json "$out/unprofiled.json" >"$out/unprofiled.log" 2>&1
"$ncu" --clock-control none --cache-control "${CACHE:-all}" --csv --print-units base --metrics gpu__time_duration.sum \
  --log-file "$out/ncu.csv" "$bin" "${decode[@]}" >"$out/profiled.log" 2>&1
python3 - "$out/ncu.csv" "$out/unprofiled.json" <<'EOF'
import csv, json, sys
from collections import defaultdict

rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"'))
        if r["Metric Name"] == "gpu__time_duration.sum"]
launches = [(r["Kernel Name"].split("(")[0], r["Grid Size"], float(r["Metric Value"].replace(",", "")) / 1e3) for r in rows]
# Each token ends with the lm_head product: by far the longest matvec (grids no longer tell
# it apart: every large product runs on as many blocks as the GPU holds).
one_token = ("matvec_q", "matvec_pairs_q")
head = max(us for n, _, us in launches if n.startswith(one_token))
ends = [i for i, (n, _, us) in enumerate(launches) if n.startswith(one_token) and us > head / 2]
token = launches[ends[-2] + 1:ends[-1] + 1]
by_name = defaultdict(lambda: [0, 0.0])
for name, _, us in token:
    by_name[name][0] += 1
    by_name[name][1] += us
total = sum(t for _, t in by_name.values())
print(f"one decoded token, {len(token)} launches, kernel time {total:.1f} us")
print(f"{'kernel':32} {'launches':>8} {'us':>9} {'share':>6}")
for name, (n, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1]):
    print(f"{name:32} {n:8d} {us:9.1f} {100 * us / total:5.1f}%")
s = json.load(open(sys.argv[2]))
wall = 1e6 * s["decode_seconds"] / max(s["decode_calls"], 1)
print(f"wall time per token without the profiler: {wall:.1f} us; kernels {total:.1f} us; "
      f"idle between launches {wall - total:.1f} us ({100 * (wall - total) / wall:.0f}%)")
EOF
