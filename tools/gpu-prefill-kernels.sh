#!/usr/bin/env bash
# Where a prompt's GPU time goes, kernel by kernel: Nsight Compute (clocks left alone, caches
# left warm) times every launch of one prefill on the synthetic model tools/gpu-prefill.sh
# builds (Qwen3.5-397B shapes, 4 layers of 256 experts, every expert in VRAM), and the launches
# are summed by kernel. Builds nothing: takes $DIST/flash-moe (default dist/). WORDS sets the
# prompt's length in words (default 500: about 1930 tokens), CHUNK the --prefill-chunk
# (default 2048). Logs go to $OUT (default /tmp/gpu-prefill-kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/gpu-common.sh
bin=${DIST:-dist}/flash-moe
out=${OUT:-/tmp/gpu-prefill-kernels}
work=${WORK:-/root/flash-moe-prefill}
ncu=$(find_ncu)
mkdir -p "$out" "$work"
model=$(synth_model 4 256)
prompt=$(python3 -c "
import random
random.seed(0)
words = 'the of and to in is was for on that with as by at from his her they this which or had an be are not but'.split()
print(' '.join(random.choice(words) for _ in range(${WORDS:-500})))")
"$ncu" --clock-control none --cache-control none --csv --print-units base --metrics gpu__time_duration.sum \
  --log-file "$out/ncu.csv" "$bin" generate --model "$model" --device cuda --prompt "$prompt" --max-tokens 1 \
  --prefill-chunk "${CHUNK:-2048}" --prefetch-experts >"$out/profiled.log" 2>&1
grep -oE 'prompt: [0-9]+ tokens' "$out/profiled.log"
python3 - "$out/ncu.csv" <<'PY'
import csv, sys
from collections import defaultdict

rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"'))
        if r["Metric Name"] == "gpu__time_duration.sum"]
by_name = defaultdict(lambda: [0, 0.0])
for r in rows:
    name = r["Kernel Name"].split("(")[0]
    by_name[name][0] += 1
    by_name[name][1] += float(r["Metric Value"].replace(",", "")) / 1e6
total = sum(ms for _, ms in by_name.values())
print(f"{len(rows)} launches, kernel time {total:.1f} ms")
print(f"{'kernel':48} {'launches':>8} {'ms':>8} {'share':>6}")
for name, (n, ms) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:16]:
    print(f"{name[:48]:48} {n:8d} {ms:8.2f} {100 * ms / total:5.1f}%")
PY
