// Sampling on the device: the sampler's penalties, the argmax, a draw's candidates. Compiled
// after common.cuh, as one NVRTC program.

// The sampler's penalties on a row of logits, one thread per penalized token (each token at
// most once): as LogitPenalty::apply, (token, repetition bits, minus bits) triples.
extern "C" __global__ void penalize_logits(float* x, long long cols, const u32* penalties, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    u32 token = penalties[3 * i];
    float repetition = __uint_as_float(penalties[3 * i + 1]), minus = __uint_as_float(penalties[3 * i + 2]);
    if ((long long)token >= cols) return;
    float l = x[token];
    l = l > 0.0f ? l / repetition : l * repetition;
    x[token] = l - minus;
}

// A value and its index as one key that orders as (value, lower index first): the value's
// bits made to order as unsigned integers (f32's total order: -0 below +0) over the index's
// complement. NaN (never chosen) is 0, below every key of a value.
__device__ __forceinline__ unsigned long long value_key(float v, long long i) {
    if (isnan(v)) return 0ull;
    u32 b = __float_as_uint(v);
    u32 ordered = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return ((unsigned long long)ordered << 32) | (u32)~(u32)i;
}

// Greedy decoding's choice: the index of the largest of `n` floats, the first one on ties,
// NaNs passed over, as the host's argmax (zeros of either sign as +0: they compare equal).
// Each block's largest key goes to *key (0 before the launch) by atomicMax; *key stays 0 when
// every value is NaN.
extern "C" __global__ void argmax_f32(const float* x, long long n, unsigned long long* key) {
    __shared__ unsigned long long warp_best[32];
    unsigned long long best = 0ull;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        best = max(best, value_key(x[i] == 0.0f ? 0.0f : x[i], i));
    for (int o = 16; o > 0; o >>= 1) best = max(best, __shfl_xor_sync(0xffffffffu, best, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_best[warp] = best;
    __syncthreads();
    if (warp == 0) {
        best = lane < (blockDim.x >> 5) ? warp_best[lane] : 0ull;
        for (int o = 16; o > 0; o >>= 1) best = max(best, __shfl_xor_sync(0xffffffffu, best, o));
        if (lane == 0 && best != 0ull) atomicMax(key, best);
    }
}

// The largest value a key of argmax_f32 stands for (zeros as +0).
__device__ __forceinline__ float argmax_value(unsigned long long key) {
    u32 ordered = (u32)(key >> 32);
    return __uint_as_float((ordered & 0x80000000u) ? (ordered ^ 0x80000000u) : ~ordered);
}

// A temperature draw's candidates: every value at least the largest (from argmax_f32's *key)
// minus `span`, as (index, value bits) at out[2 + 2 slot] for the first `cap` found, in no
// order; out[0] counts every one found. A warp takes its slots with one atomic. Nothing when
// every value is NaN (*key 0).
extern "C" __global__ void logits_near_max(const float* x, long long n, const unsigned long long* key, float span,
                                           int cap, u32* out) {
    unsigned long long k = *key;
    if (k == 0ull) return;
    float floor = argmax_value(k) - span;
    int lane = threadIdx.x & 31;
    long long stride = (long long)gridDim.x * blockDim.x;
    // Warp-uniform trip count: every lane takes part in the ballot.
    for (long long base = blockIdx.x * (long long)blockDim.x + (threadIdx.x & ~31); base < n; base += stride) {
        long long i = base + lane;
        float v = i < n ? x[i] : NEG_INF;
        bool keep = i < n && v >= floor;
        u32 mask = __ballot_sync(0xffffffffu, keep);
        if (mask == 0u) continue;
        int leader = __ffs(mask) - 1;
        u32 first = 0u;
        if (lane == leader) first = atomicAdd(out, (u32)__popc(mask));
        first = __shfl_sync(0xffffffffu, first, leader);
        u32 slot = first + __popc(mask & ((1u << lane) - 1u));
        if (keep && slot < (u32)cap) {
            out[2 + 2 * slot] = (u32)i;
            out[3 + 2 * slot] = __float_as_uint(v);
        }
    }
}

// A temperature draw's top k: each block's k largest of its TOP_BLOCK values (by value_key:
// ties to the lower index) as (index, value bits) at out[2 (k block + j)], index 0xffffffff
// where the block has fewer than k values that are not NaN. A bitonic sort of the block's
// keys in shared memory, descending.
#define TOP_BLOCK 1024
extern "C" __global__ void top_keys(const float* x, long long n, int k, u32* out) {
    __shared__ unsigned long long keys[TOP_BLOCK];
    long long first = blockIdx.x * (long long)TOP_BLOCK;
    for (int i = threadIdx.x; i < TOP_BLOCK; i += blockDim.x)
        keys[i] = first + i < n ? value_key(x[first + i], first + i) : 0ull;
    __syncthreads();
    for (int size = 2; size <= TOP_BLOCK; size <<= 1)
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < TOP_BLOCK / 2; i += blockDim.x) {
                int lo = 2 * i - (i & (stride - 1)), hi = lo + stride;  // lo: bit `stride` clear
                unsigned long long a = keys[lo], b = keys[hi];
                // Descending runs where bit `size` of lo is clear: the whole array at the end.
                if (((lo & size) == 0) == (a < b)) keys[lo] = b, keys[hi] = a;
            }
            __syncthreads();
        }
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
        unsigned long long key = keys[j];
        u32 index = key == 0ull ? 0xffffffffu : ~(u32)key;
        long long at = 2 * ((long long)blockIdx.x * k + j);
        out[at] = index;
        out[at + 1] = key == 0ull ? 0u : __float_as_uint(x[index]);
    }
}
