#!/usr/bin/env bash
# Prompt prefill on the GPU: tok/s of one long prompt at several chunk sizes (--prefill-chunk),
# with every expert in VRAM and with the VRAM cache off (experts from the pinned host cache),
# on a synthetic model with Qwen3.5-397B shapes (4 layers: 3 linear-attention, 1 full; 256
# experts per layer; random routing). Builds nothing: takes $DIST/flash-moe (default dist/).
# WORDS sets the prompt's length in words (default 1500), CHUNKS the chunk sizes (default
# "512 2048 8192"), TIERS the tiers (default "vram host"; "part" caps the VRAM cache at
# PART_GIB, default 2, with the rest in the host cache, so that it evicts). LEAVE_GIB, when
# set, first fills the GPU from another process (tools/gpu_fill.py) until that many GiB are
# free, as on a smaller card, so that the expert cache has to give memory back to the prompt's
# activations. DECODE=N also decodes N tokens after the prompt and prints their rate (decode
# at the prompt's context length). Logs and each run's stats JSON go to $OUT (default
# /tmp/gpu-prefill).
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/gpu-common.sh
bin=${DIST:-dist}/flash-moe
out=${OUT:-/tmp/gpu-prefill}
work=${WORK:-/root/flash-moe-prefill}
mkdir -p "$out" "$work"
model=$(synth_model 4 256)
if [ -n "${LEAVE_GIB:-}" ]; then
  python3 tools/gpu_fill.py "$LEAVE_GIB" "$out/filled" &
  trap 'kill %1' EXIT
  while [ ! -f "$out/filled" ]; do sleep 1; done
fi
prompt=$(python3 -c "
import random
random.seed(0)
words = 'the of and to in is was for on that with as by at from his her they this which or had an be are not but'.split()
print(' '.join(random.choice(words) for _ in range(${WORDS:-1500})))")
for tier in ${TIERS:-vram host}; do
  cache=()
  [ "$tier" = host ] && cache=(--gpu-expert-cache-gib 0 --expert-cache-mib 16000)
  [ "$tier" = part ] && cache=(--gpu-expert-cache-gib "${PART_GIB:-2}" --expert-cache-mib 16000)
  for chunk in ${CHUNKS:-512 2048 8192}; do
    name=$tier-${WORDS:-1500}w-$chunk
    # The warm-up prefills the same prompt once (kernels compiled, buffers and caches filled).
    "$bin" generate --model "$model" --device cuda --prompt "$prompt" --max-tokens "${DECODE:-1}" --warmup-tokens 1 \
      --prefill-chunk "$chunk" --prefetch-experts "${cache[@]}" --stats-json "$out/$name.json" >"$out/$name.log" 2>&1 ||
      { echo "$name: failed"; tail -3 "$out/$name.log"; continue; }
    echo "$tier, chunk $chunk: $(grep -oE 'prompt: [0-9]+ tokens, [0-9.]+ tok/s( \| decode: [0-9]+ tokens, [0-9.]+ tok/s)?' "$out/$name.log")"
    grep -h "GPU memory is short" "$out/$name.log" | tail -1 || true
  done
done
