#!/usr/bin/env bash
# Runs the chunked delta rule kernel (`gated_delta_chunks` in kernels.cu) on the CPU, one
# std::thread per CUDA thread and a std::barrier for __syncthreads, under AddressSanitizer and
# UBSan (shared memory sized exactly as linear_attention.rs sizes it, float4 alignment
# checked), against the recurrence token by token. For checking the kernel's indexing and
# phases on a machine without a GPU; tests/cuda_parity.rs remains the check on a GPU.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
awk '/^#define DC 32/{p=1} /^\/\/ The sampler.s penalties/{p=0} p' "$here/../../crates/engine/src/backend/cuda/kernels.cu" |
    sed 's/extern __shared__ float smem\[\];/float* smem = smem_heap;/' >"$build/part.cu"
g++ -std=c++20 -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -pthread \
    -I"$build" -o "$build/emulate" "$here/delta_chunks.cpp"
# dk dv key-heads value-heads tokens: partial column blocks, partial chunks, dk 256.
for shape in "16 16 2 4 7" "32 40 2 4 75" "128 128 2 4 75" "24 24 1 2 33" "256 64 1 1 40"; do
    "$build/emulate" $shape
done
