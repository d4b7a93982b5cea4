#!/usr/bin/env bash
# Decode I/O against the raw disk, in the same run: alternates `flash-moe bench-io` (cold,
# O_DIRECT, k random experts per layer) with `flash-moe generate --io direct --timing`
# (the same k and expert size) and prints the medians and their ratio.
#
# usage: tools/bench_decode_io.sh MODEL_DIR [ROUNDS] [TOKENS] [BINARY]
set -euo pipefail
model=${1:?usage: $0 MODEL_DIR [ROUNDS] [TOKENS] [BINARY]}
rounds=${2:-5}
tokens=${3:-8}
bin=${4:-target/release/flash-moe}

median() { sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }

raw=(); decode=(); tps=(); rss=()
for i in $(seq "$rounds"); do
  raw+=("$("$bin" bench-io --model "$model" --tokens "$tokens" --seed "$i" | grep -oE 'throughput [0-9.]+' | cut -d' ' -f2)")
  report=$("$bin" generate --model "$model" --prompt "The quick brown fox" --max-tokens "$tokens" \
    --io direct --timing 2>&1 >/dev/null)
  decode+=("$(echo "$report" | grep '^experts:' | tail -1 | grep -oE '[0-9.]+ GB/s' | cut -d' ' -f1)")
  tps+=("$(echo "$report" | grep -oE 'decode: [0-9]+ tokens, [0-9.]+' | awk '{print $4}')")
  rss+=("$(echo "$report" | grep -oE 'peak resident memory: [0-9.]+' | awk '{print $4}')")
done
raw_m=$(printf '%s\n' "${raw[@]}" | median)
dec_m=$(printf '%s\n' "${decode[@]}" | median)
echo "bench-io cold (O_DIRECT):   ${raw[*]} GB/s, median $raw_m"
echo "decode I/O (--io direct):   ${decode[*]} GB/s, median $dec_m"
echo "decode tok/s:               ${tps[*]}, median $(printf '%s\n' "${tps[@]}" | median)"
echo "peak resident memory (GiB): ${rss[*]}"
awk -v d="$dec_m" -v r="$raw_m" 'BEGIN {printf "decode I/O / bench-io: %.2f\n", d / r}'
