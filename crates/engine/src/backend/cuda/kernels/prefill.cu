// A prompt's expert and dense products on the tensor cores. Compiled after common.cuh, as one
// NVRTC program.

// A layer's experts for a batch of tokens (prompt prefill), one matrix of each expert per
// launch, on the tensor cores: y[p, r] = sum_k x[p, k] * w_e[r, k] for the gathered rows p of
// each tile's expert e. As in the one-token kernels, the weights stay codes:
//   row . x = sum over 16-byte pieces of scale * (codes . x) + bias * sum(x),
// and codes . x runs on f16 MMA with f32 accumulation: the codes are small integers, exact
// in f16, and x is split (split_rows_f16) into two f16 limbs per piece, hi + lo, of x scaled
// by a power of two that brings the piece's largest value below 1. The two limbs hold about
// 22 bits of x's 24, and the products are exact in f32, so the result is as close to an
// f32 dot product as the f32 sums allow.
//
// Virtual k order: lane (g, t) of a warp (g = lane / 4, t = lane % 4) holds code word t of
// its rows' piece (M = 32 / BITS codes c_0..c_{M-1}), unpacked into the f16 pairs
// (c_j, c_{j + M/2}), j < M/2, by a mask, an OR with 1024.0's bits and a subtraction; MMA
// step s (of M / 4 per piece) takes pairs 2s (k 2t, 2t + 1) and 2s + 1 (k 2t + 8, 2t + 9).
// split_rows_f16 writes each piece's x in the same order, so that the B fragment is plain
// 8-byte loads: per (token, piece, limb), word t's pairs (x_j, x_{j + M/2}) one after another.
//
// A block takes a tile of MT_ROWS weight rows (4 warps of 32: each x fragment feeds two MMA
// row tiles) by up to MT_TOKENS of one expert's tokens (four MMA columns of 8), MT_PIECES
// pieces of each row at a time; the codes and x of the next MT_STAGES - 1 stages are on
// their way into shared memory (cp.async) while one computes (more or larger stages in
// flight made it slower: docs/perf.md).
#define MT_ROWS 128
#define MT_TOKENS 32
#define MT_PIECES 2
#define MT_STAGES 2
#define MT_WARP_TILES 2  // MMA tiles of 16 rows per warp: MT_ROWS / (16 MT_WARP_TILES) warps

struct ExpertTile {
    int expert;  // the expert's slot in the table
    int first;   // its first gathered row in this tile
    int count;   // rows in this tile (at most MT_TOKENS)
    int unused;
};

// Shared memory of one stage: codes (rows padded by 16 bytes, so that the 4-byte reads of a
// warp's 8 rows by 4 words hit distinct banks), x (tokens padded by 64 bytes, so that the
// 16-byte reads of 8 neighbouring lanes do), per token and piece (factor, sum of x), and per
// row the (scale, bias) of the stage's scale groups (at most MT_SCALE_SLOTS: a group holds
// whole pieces).
__host__ __device__ constexpr int mt_code_stride() { return MT_PIECES * 16 + 16; }
__host__ __device__ constexpr int mt_x_stride(int bits) { return MT_PIECES * 512 / bits + 64; }
#define MT_SCALE_SLOTS MT_PIECES
__host__ __device__ constexpr int mt_stage_bytes(int bits) {
    return MT_ROWS * mt_code_stride() + MT_TOKENS * mt_x_stride(bits) + MT_TOKENS * MT_PIECES * 8 +
           MT_ROWS * MT_SCALE_SLOTS * 8;
}

// Each float of x (rows of `cols`) as the two f16 limbs described above, in the MMA's order:
// per row and piece (128 / bits columns), hi then lo, each 256 / bits bytes; and per row and
// piece (2^e, sum of x), where e and the sum are taken over `lanes` / 4 pieces (1 or 2: the
// pieces of a stage that share a scale group), the same for each. One thread per code
// word's columns (32 / bits); the 4 threads of a piece are neighbouring lanes.
template <int M>
__device__ __forceinline__ void split_word(const float* x, long long w, long long words, int lanes, u32* limbs,
                                           float2* meta) {
#if __CUDA_ARCH__ >= 800
    float v[M];
    float big = 0.0f, sum = 0.0f;
#pragma unroll
    for (int i = 0; i < M; ++i) {
        v[i] = w < words ? x[w * M + i] : 0.0f;
        big = fmaxf(big, fabsf(v[i]));
        sum += v[i];
    }
    big = fmaxf(big, __shfl_xor_sync(0xffffffffu, big, 1));
    big = fmaxf(big, __shfl_xor_sync(0xffffffffu, big, 2));
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    float other_big = __shfl_xor_sync(0xffffffffu, big, 4), other_sum = __shfl_xor_sync(0xffffffffu, sum, 4);
    if (lanes == 8) big = fmaxf(big, other_big), sum += other_sum;
    if (w >= words) return;
    // |x| * 2^-e < 1, with 2^e and 2^-e normal floats.
    int e = big > 0.0f ? min(max(ilogbf(big) + 1, -125), 125) : 0;
    float down = ldexpf(1.0f, -e);
    long long piece = w / 4;
    int t = (int)(w % 4);
    u32* hi = limbs + piece * (4 * M) + t * (M / 2);  // M / 2 pairs per word and limb
    u32* lo = hi + 2 * M;
#pragma unroll
    for (int j = 0; j < M / 2; ++j) {
        limb_pair<false>(v[j] * down, v[j + M / 2] * down, hi[j], lo[j]);
    }
    if (t == 0) meta[piece] = make_float2(ldexpf(1.0f, e), sum);
#endif
}

extern "C" __global__ void split_rows_f16(const float* x, int bits, long long words, int lanes, u32* limbs,
                                          float2* meta) {
    long long w = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (bits == 2) split_word<16>(x, w, words, lanes, limbs, meta);
    else if (bits == 4) split_word<8>(x, w, words, lanes, limbs, meta);
    else split_word<4>(x, w, words, lanes, limbs, meta);
}

// Codes j and j + M/2 of a word as an f16 pair (low half: code j).
template <int BITS>
__device__ __forceinline__ u32 code_pair(u32 word, int j) {
    constexpr u32 MASK = ((1u << BITS) - 1u) * 0x00010001u, ONE_K = 0x64006400u;  // 1024.0 twice
    u32 v = ((word >> (BITS * j)) & MASK) | ONE_K, r;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(v), "r"(ONE_K));
    return r;
}

// N words from shared memory, in 16-byte reads where N allows (8-byte ones otherwise).
template <int N>
__device__ __forceinline__ void load_words(const u8* p, u32 (&w)[N]) {
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int i = 0; i < N / 4; ++i) {
            uint4 v = ((const uint4*)p)[i];
            w[4 * i] = v.x, w[4 * i + 1] = v.y, w[4 * i + 2] = v.z, w[4 * i + 3] = v.w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < N / 2; ++i) {
            uint2 v = ((const uint2*)p)[i];
            w[2 * i] = v.x, w[2 * i + 1] = v.y;
        }
    }
}

// Copies stage `piece0 / MT_PIECES` of the codes, x and meta into `smem`.
template <int BITS>
__device__ __forceinline__ void mt_load_stage(u8* smem, const u8* codes, long long row_bytes, int r0, int rows,
                                              const u8* xl, const float2* meta, int pieces, int first, int count,
                                              int piece0) {
    constexpr int XP = 512 / BITS;  // bytes of one token's piece of x (two limbs)
    u8* cs = smem;
    u8* xs = cs + MT_ROWS * mt_code_stride();
    u8* ms = xs + MT_TOKENS * mt_x_stride(BITS);
    for (int i = threadIdx.x; i < MT_ROWS * MT_PIECES; i += blockDim.x) {
        int r = i / MT_PIECES, p = i % MT_PIECES;
        bool valid = r0 + r < rows;
        const u8* src = codes + (valid ? (long long)(r0 + r) * row_bytes : 0) + (piece0 + p) * 16;
        cp_async<16>(cs + r * mt_code_stride() + p * 16, src, valid);
    }
    constexpr int CHUNKS = MT_PIECES * XP / 16;  // per token
    for (int i = threadIdx.x; i < MT_TOKENS * CHUNKS; i += blockDim.x) {
        int t = i / CHUNKS, c = i % CHUNKS;
        bool valid = t < count;
        const u8* src = xl + ((long long)(first + (valid ? t : 0)) * pieces + piece0) * XP + c * 16;
        cp_async<16>(xs + t * mt_x_stride(BITS) + c * 16, src, valid);
    }
    constexpr int META = MT_PIECES * 8 / 16;  // per token
    for (int i = threadIdx.x; i < MT_TOKENS * META; i += blockDim.x) {
        int t = i / META, c = i % META;
        bool valid = t < count;
        cp_async<16>(ms + i * 16, meta + (long long)(first + (valid ? t : 0)) * pieces + piece0 + 2 * c, valid);
    }
}

// A block's scales and biases for a stage: thread r (one per row of the tile) asks for its
// row's raw values of the stage's groups, then (a stage later, so that the scattered loads
// land while the MMAs run) stores them as floats where the stage's epilogues read them.
struct StageScales {
    u32 raw[MT_SCALE_SLOTS][2];
};

__device__ __forceinline__ StageScales mt_ask_scales(const u8* scales, const u8* biases, int dtype, long long row,
                                                    long long groups, long long g0, int slots) {
    StageScales sc = {};
#pragma unroll
    for (int i = 0; i < MT_SCALE_SLOTS; ++i)
        if (i < slots) {
            sc.raw[i][0] = load_raw(scales, dtype, row * groups + g0 + i);
            sc.raw[i][1] = load_raw(biases, dtype, row * groups + g0 + i);
        }
    return sc;
}

// Where a stage's (scale, bias) pairs start: the end of its shared memory.
__device__ __forceinline__ float2* mt_stage_scales(const u8* stage, int bits) {
    return (float2*)(stage + mt_stage_bytes(bits) - MT_ROWS * MT_SCALE_SLOTS * 8);
}

__device__ __forceinline__ void mt_store_scales(u8* stage, int bits, const StageScales& sc, int dtype) {
    float2* slot = mt_stage_scales(stage, bits) + threadIdx.x * MT_SCALE_SLOTS;
#pragma unroll
    for (int i = 0; i < MT_SCALE_SLOTS; ++i)
        slot[i] = make_float2(raw_to_float(sc.raw[i][0], dtype), raw_to_float(sc.raw[i][1], dtype));
}

template <int BITS>
__device__ void grouped_matmul_mma(const unsigned long long* table, const ExpertTile* tiles, int group, int dtype,
                                   const u32* xl, const float2* meta, int rows, int cols, float* y) {
#if __CUDA_ARCH__ >= 800
    constexpr int M = 32 / BITS, STEPS = M / 4, XP = 512 / BITS, PF = 128 / BITS, WT = MT_WARP_TILES;
    extern __shared__ uint4 smem_vec[];
    u8* smem = (u8*)smem_vec;
    ExpertTile tile = tiles[blockIdx.y];
    const u8* codes = (const u8*)table[3 * tile.expert];
    const u8* scales = (const u8*)table[3 * tile.expert + 1];
    const u8* biases = (const u8*)table[3 * tile.expert + 2];
    int r0 = blockIdx.x * MT_ROWS, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int g = lane >> 2, t = lane & 3;
    int pieces = cols / PF, stages = pieces / MT_PIECES;
    long long row_bytes = (long long)cols * BITS / 8, groups = cols / group;
    int group_shift = __ffs(group) - 1;
    // This lane's rows in the tile: wr + 16 m and wr + 16 m + 8 for each MMA row tile m.
    int wr = warp * 16 * WT + g;
    // Pieces that share a scale group within a stage share x's factor (split_rows_f16's
    // lanes): their products are summed on the tensor cores before the scale is applied.
    int per_factor = min(group / PF, MT_PIECES);
    float out[WT][4][4] = {};
    // Scale groups per stage, and the first group of stage s.
    int slots = max(1, (MT_PIECES * PF) >> group_shift);
    auto first_group = [&](int s) { return ((long long)s * MT_PIECES * PF) >> group_shift; };
    long long my_row = min(r0 + (int)threadIdx.x, rows - 1);
    mt_store_scales(smem, BITS, mt_ask_scales(scales, biases, dtype, my_row, groups, first_group(0), slots), dtype);
    auto load = [&](int s) {
        if (s < stages)
            mt_load_stage<BITS>(smem + (s % MT_STAGES) * mt_stage_bytes(BITS), codes, row_bytes, r0, rows,
                                (const u8*)xl, meta, pieces, tile.first, tile.count, s * MT_PIECES);
        cp_async_commit();  // an empty group past the end keeps the count of groups in flight
    };
    for (int s = 0; s < MT_STAGES - 1; ++s) load(s);
    for (int s = 0; s < stages; ++s) {
        cp_async_wait<MT_STAGES - 2>();  // stage s has landed
        __syncthreads();                 // and every warp is done with the buffer loaded next
        load(s + MT_STAGES - 1);
        StageScales next_scales = {};
        if (s + 1 < stages)
            next_scales = mt_ask_scales(scales, biases, dtype, my_row, groups, first_group(s + 1), slots);
        const u8* cs = smem + (s % MT_STAGES) * mt_stage_bytes(BITS);
        const u8* xs = cs + MT_ROWS * mt_code_stride();
        const float2* ms = (const float2*)(xs + MT_TOKENS * mt_x_stride(BITS));
        const float2* scs = mt_stage_scales(cs, BITS);
        float acc[WT][4][4] = {};
#pragma unroll
        for (int p = 0; p < MT_PIECES; ++p) {
            u32 a[WT][STEPS][4];
#pragma unroll
            for (int m = 0; m < WT; ++m) {
                u32 wa = *(const u32*)(cs + (wr + 16 * m) * mt_code_stride() + p * 16 + 4 * t);
                u32 wb = *(const u32*)(cs + (wr + 16 * m + 8) * mt_code_stride() + p * 16 + 4 * t);
#pragma unroll
                for (int st = 0; st < STEPS; ++st) {
                    a[m][st][0] = code_pair<BITS>(wa, 2 * st), a[m][st][1] = code_pair<BITS>(wb, 2 * st);
                    a[m][st][2] = code_pair<BITS>(wa, 2 * st + 1), a[m][st][3] = code_pair<BITS>(wb, 2 * st + 1);
                }
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const u8* xt = xs + (j * 8 + g) * mt_x_stride(BITS) + p * XP + t * (XP / 8);
                u32 hi[M / 2], lo[M / 2];
                load_words<M / 2>(xt, hi);
                load_words<M / 2>(xt + XP / 2, lo);
#pragma unroll
                for (int st = 0; st < STEPS; ++st)
#pragma unroll
                    for (int m = 0; m < WT; ++m) {
                        mma_f16(acc[m][j], a[m][st], hi[2 * st], hi[2 * st + 1]);
                        mma_f16(acc[m][j], a[m][st], lo[2 * st], lo[2 * st + 1]);
                    }
            }
            if ((p + 1) % per_factor != 0) continue;  // the factor's block goes on
            int slot = (int)((((long long)(s * MT_PIECES + p) * PF) >> group_shift) - first_group(s));
#pragma unroll
            for (int m = 0; m < WT; ++m) {
                float2 sba = scs[(wr + 16 * m) * MT_SCALE_SLOTS + slot], sbb = scs[(wr + 16 * m + 8) * MT_SCALE_SLOTS + slot];
                float sa = sba.x, ba = sba.y, sb = sbb.x, bb = sbb.y;
                // acc[m][j]: rows wr, wr, wr + 8, wr + 8 (+ 16 m) by tokens 8 j + 2 t, 8 j + 2 t + 1 (twice).
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    float2 m0 = ms[(j * 8 + 2 * t) * MT_PIECES + p], m1 = ms[(j * 8 + 2 * t + 1) * MT_PIECES + p];
                    float* o = out[m][j];
                    float* c = acc[m][j];
                    o[0] += sa * (c[0] * m0.x) + ba * m0.y;
                    o[1] += sa * (c[1] * m1.x) + ba * m1.y;
                    o[2] += sb * (c[2] * m0.x) + bb * m0.y;
                    o[3] += sb * (c[3] * m1.x) + bb * m1.y;
                    c[0] = c[1] = c[2] = c[3] = 0.0f;
                }
            }
        }
        // Every warp read the other buffer before this stage's barrier.
        if (s + 1 < stages) mt_store_scales(smem + ((s + 1) % MT_STAGES) * mt_stage_bytes(BITS), BITS, next_scales, dtype);
    }
#pragma unroll
    for (int m = 0; m < WT; ++m)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                int tok = j * 8 + 2 * t + (i & 1), r = r0 + wr + 16 * m + (i >> 1) * 8;
                if (tok < tile.count && r < rows) y[(long long)(tile.first + tok) * rows + r] = out[m][j][i];
            }
#endif
}

#define GROUPED_MATMUL(BITS)                                                                               \
    extern "C" __global__ void __launch_bounds__(MT_ROWS * 2 / MT_WARP_TILES) grouped_matmul_q##BITS(       \
        const unsigned long long* table, const ExpertTile* tiles, int group, int dtype, const u32* xl,      \
        const float2* meta, int rows, int cols, float* y) {                                                  \
        grouped_matmul_mma<BITS>(table, tiles, group, dtype, xl, meta, rows, cols, y);                       \
    }
GROUPED_MATMUL(2)
GROUPED_MATMUL(4)
GROUPED_MATMUL(8)
