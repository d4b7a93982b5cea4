// One-token products (dequantized rows, affine and dense matvecs, a token's experts in one
// launch with their routing). Compiled after common.cuh, as one NVRTC program.

// ---------------------------------------------------------------------------------------
// Decoding rows to float32 (embeddings, and weights for the batched prefill GEMM).

// out[n, cols] = decoded rows; row r of the output is weight row ids[r] (or first + r when
// ids is null). bits == 0 means a dense matrix of `dtype`; else affine with scales of `dtype`.
extern "C" __global__ void dequant_rows(const u8* w, const u8* scales, const u8* biases, int bits, int group,
                                        int dtype, const int* ids, long long first, int cols, float* out) {
    long long r = ids ? (long long)ids[blockIdx.x] : first + blockIdx.x;
    float* dst = out + (long long)blockIdx.x * cols;
    if (bits == 0) {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = load_float(w, dtype, r * cols + c);
        return;
    }
    const u8* row = w + r * (long long)cols * bits / 8;
    int groups = cols / group;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        long long g = r * groups + c / group;
        float s = load_float(scales, dtype, g), b = load_float(biases, dtype, g);
        dst[c] = s * (float)load_code(row, bits, c) + b;
    }
}

// ---------------------------------------------------------------------------------------
// One-token matrix-vector products: y[r] = W[r, :] . x

// Affine weights with 2, 4 or 8 bits, one token: y[r] = epilogue(W[r, :] . x).
//
// Each lane reads 16 bytes of codes at a time (a "piece": 128 / BITS codes); a warp's 32
// loads are one coalesced 512-byte read, and each lane has ROWS_UNROLL pieces (of each
// matrix) in flight, with their scales and biases, before it uses the first.
//
// The products are integer dot products: dp4a multiplies four code bytes by four bytes of x
// and adds, exactly, in one instruction. For that, x is staged in shared memory as fixed
// point: per piece, X = rint(x * 2^(22 - E)) where every |x| of the piece is below 2^E (so
// |X| <= 2^22, an absolute error of at most 2^(E - 23), about f32's own rounding of the
// piece's largest element), split exactly into three bytes, X = 2^16 d2 + 2^8 d1 + d0 (the
// limbs: d0 and d1 X's low bytes, unsigned, d2 signed). A piece's product is then exact,
//   codes . X = 2^16 D2 + 2^8 D1 + D0,   D_l = sum of dp4a(codes, limb l),
// and   row . x = sum over pieces of scale * (codes . X) * 2^(E - 22) + bias * sum(x).
// One mask (and a shift) unpacks four codes of a 32-bit word into bytes, so a 4-bit code
// costs about 1.5 instructions; converting each code to a float cost about four, which bound
// the kernels (instruction issue, not memory); see docs/perf.md.
//
// Staged layout, per piece (a "record"): limb l in 16 M bytes, M = 8 / BITS: for code word
// j of the piece and unpacking k (codes k, k + M, k + 2M, k + 3M of the word), the 4-byte
// word j * M + k. Records are padded to an odd number of 16-byte units, so that the 16-byte
// reads of 8 neighbouring lanes hit distinct banks. After the records: per piece, the f32 sum
// of x and 2^(E - 22).
#define ROWS_UNROLL 4

struct Affine {
    const u8* w;
    const u8* scales;
    const u8* biases;
};

// Bytes of a staged piece's record.
__host__ __device__ constexpr int staged_record(int bits) {
    return 3 * 16 * (8 / bits) + ((3 * (8 / bits)) % 2 == 0 ? 16 : 0);
}

// Bytes of shared memory one staged vector of `cols` takes (a multiple of 16).
__host__ __device__ constexpr int staged_bytes(int bits, int cols) {
    return ((cols / (128 / bits)) * (staged_record(bits) + 8) + 15) & ~15;
}

// d + the four byte products of unsigned `codes` and `limbs` (signed bytes when `is_signed`;
// the callers' unrolled loops make it a constant).
__device__ __forceinline__ int dp4a(u32 codes, u32 limbs, int d, bool is_signed) {
    int r;
    if (is_signed) asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(r) : "r"(codes), "r"(limbs), "r"(d));
    else asm("dp4a.u32.u32 %0, %1, %2, %3;" : "=r"(r) : "r"(codes), "r"(limbs), "r"(d));
    return r;
}

// codes . X over one piece of `a` (and of `b` when DUAL), exactly, as floats.
template <int BITS, bool DUAL>
__device__ __forceinline__ void piece_dot(uint4 va, uint4 vb, const u8* rec, float& da, float& db) {
    constexpr int M = 8 / BITS, WORDS = 4 * M;  // limb words per limb
    constexpr u32 MASK = ((1u << BITS) - 1u) * 0x01010101u;
    const uint4* limbs = (const uint4*)rec;
    u32 wa[4] = {va.x, va.y, va.z, va.w}, wb[4] = {vb.x, vb.y, vb.z, vb.w};
    int sa[3] = {0, 0, 0}, sb[3] = {0, 0, 0};
#pragma unroll
    for (int l = 0; l < 3; ++l) {
        u32 xw[WORDS];
#pragma unroll
        for (int i = 0; i < WORDS / 4; ++i) {
            uint4 t = limbs[l * (WORDS / 4) + i];
            xw[4 * i] = t.x, xw[4 * i + 1] = t.y, xw[4 * i + 2] = t.z, xw[4 * i + 3] = t.w;
        }
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int k = 0; k < M; ++k) {
                sa[l] = dp4a((wa[j] >> (BITS * k)) & MASK, xw[j * M + k], sa[l], l == 2);
                if (DUAL) sb[l] = dp4a((wb[j] >> (BITS * k)) & MASK, xw[j * M + k], sb[l], l == 2);
            }
    }
    // (2^8 D2 + D1) is exact in f32 at 2 and 4 bits, so the piece's sum is rounded once.
    da = (float)(sa[2] * 256 + sa[1]) * 256.0f + (float)sa[0];
    if (DUAL) db = (float)(sb[2] * 256 + sb[1]) * 256.0f + (float)sb[0];
}

// rint(v) for |v| <= 2^22, as __float2int_rn but on the FMA and integer pipes (a float-to-int
// conversion issues at an eighth of their rate): v + 1.5 2^23 lies in [2^23, 2^24], where a
// float's ulp is 1, so the addition rounds v to the nearest integer (ties to even), which
// the float's bits hold above the constant's.
__device__ __forceinline__ int rint_fixed(float v) {
    return __float_as_int(v + 12582912.0f) - 0x4B400000;
}

// The limbs of four fixed-point values (|X| <= 2^22) as byte lanes: X = 2^16 d2 + 2^8 d1 + d0
// with d0, d1 X's two low bytes (unsigned) and d2 its third (signed: X >> 16 lies in
// [-64, 64]); byte n of each limb word is value n's. Seven byte permutes for four values.
__device__ __forceinline__ void split_limbs(int a, int b, int c, int d, u32& d0, u32& d1, u32& d2) {
    u32 ab = __byte_perm(a, b, 0x5410), cd = __byte_perm(c, d, 0x5410);  // bytes 0, 1 of each
    d0 = __byte_perm(ab, cd, 0x6420);
    d1 = __byte_perm(ab, cd, 0x7531);
    d2 = __byte_perm(__byte_perm(a, b, 0x0062), __byte_perm(c, d, 0x0062), 0x5410);
}

// One code word's 4 M values of x as fixed point: their limbs, and their piece's sum of x
// and unit 2^(E - 22). The 4 lanes of a piece (neighbouring lanes, one word each) meet by
// shuffles, so the whole warp calls it.
template <int BITS>
struct StagedWord {
    u32 limb[3][8 / BITS];
    float sum, unit;
};

template <int BITS>
__device__ __forceinline__ StagedWord<BITS> stage_word(const float* f) {
    constexpr int M = 8 / BITS, COLS = 4 * M;
    float m = 0.0f, sum = 0.0f;
#pragma unroll
    for (int i = 0; i < COLS; ++i) m = fmaxf(m, fabsf(f[i])), sum += f[i];
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    // |x| < 2^e: e from m's exponent field, kept where 2^(22 - e) and 2^(e - 22) are normal
    // floats (a piece of zeros or tiny values needs no precision).
    int e = min(max((int)((__float_as_uint(m) >> 23) & 0xff) - 126, -100), 128);
    float up = __uint_as_float((u32)(149 - e) << 23);
    StagedWord<BITS> w;
    w.sum = sum;
    w.unit = __uint_as_float((u32)(105 + e) << 23);
#pragma unroll
    for (int k = 0; k < M; ++k) {  // codes k, k + M, k + 2M, k + 3M of the word: unpacking k
        auto fixed = [&](int i) { return rint_fixed(f[k + i * M] * up); };
        split_limbs(fixed(0), fixed(1), fixed(2), fixed(3), w.limb[0][k], w.limb[1][k], w.limb[2][k]);
    }
    return w;
}

// Word `word` (of 4) of piece `p` into a staged vector of `pieces` pieces at `staged`; the
// piece's first word also stores its sum and unit.
template <int BITS>
__device__ __forceinline__ void store_word(u8* staged, int pieces, int p, int word, const StagedWord<BITS>& w) {
    constexpr int M = 8 / BITS, REC = staged_record(BITS);
    u8* rec = staged + p * REC;
#pragma unroll
    for (int l = 0; l < 3; ++l)
#pragma unroll
        for (int k = 0; k < M; ++k) ((u32*)(rec + 16 * M * l))[word * M + k] = w.limb[l][k];
    if (word == 0) ((float2*)(staged + pieces * REC))[p] = make_float2(w.sum, w.unit);
}

// Stages `count` vectors of `cols` floats (the inputs of a batch of experts, one after the
// other) into shared memory as described above, vector e at smem + e * stride bytes; no
// barrier. A thread converts the 4 M columns of one code word at a time, a pass of words'
// loads in flight; the 4 threads of a piece (neighbouring lanes) meet by shuffles. x is
// 16-byte aligned; blockDim is a multiple of 32.
#define STAGE_WORDS 4

// RMSNorm applied while staging (NORM): x * inv * weight, as the rms_norm kernel computes it;
// when `out` is set, block 0 also writes the normalized vector there.
struct StageNorm {
    const float* weight;
    float inv;
    float* out;
};

// PASS words per thread at a time; by default, with the norm, as many loads in flight as one
// 4-word pass of 8-bit codes, so that the norm's weights fit in the registers too (a
// 4096-wide x still takes one pass).
template <int BITS, bool NORM = false, int PASS = (NORM ? STAGE_WORDS * BITS / 8 : STAGE_WORDS)>
__device__ __forceinline__ void stage_x_async(const float* x, int count, int cols, int stride, u8* smem,
                                              StageNorm norm = {}) {
    constexpr int M = 8 / BITS, COLS = 4 * M, PF = 128 / BITS;
    int pieces = cols / PF, words = count * cols / COLS;
    for (int base = 0; base < words; base += PASS * blockDim.x) {
        float4 v[PASS][M];
#pragma unroll
        for (int s = 0; s < PASS; ++s) {
            int c = base + s * blockDim.x + threadIdx.x;
#pragma unroll
            for (int i = 0; i < M; ++i)
                v[s][i] = c < words ? ((const float4*)x)[(long long)c * M + i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
        if (NORM) {
#pragma unroll
            for (int s = 0; s < PASS; ++s) {
                long long c = base + s * blockDim.x + threadIdx.x;
                if (c >= words) break;
#pragma unroll
                for (int i = 0; i < M; ++i) {
                    float4 w = ((const float4*)norm.weight)[c * M + i], &x4 = v[s][i];
                    x4 = make_float4(x4.x * norm.inv * w.x, x4.y * norm.inv * w.y, x4.z * norm.inv * w.z,
                                     x4.w * norm.inv * w.w);
                    if (norm.out && blockIdx.x == 0) ((float4*)norm.out)[c * M + i] = x4;
                }
            }
        }
#pragma unroll
        for (int s = 0; s < PASS; ++s) {
            if (base + s * blockDim.x >= words) break;  // the same for the whole block
            int c = base + s * blockDim.x + threadIdx.x;
            StagedWord<BITS> staged = stage_word<BITS>((const float*)v[s]);
            if (c < words) {
                int piece = c / 4, vec = piece / pieces;
                store_word(smem + vec * stride, pieces, piece % pieces, c % 4, staged);
            }
        }
    }
}

// One vector of `cols` floats, then a barrier.
template <int BITS>
__device__ __forceinline__ void stage_x(const float* x, int cols, u8* xs) {
    stage_x_async<BITS>(x, 1, cols, 0, xs);
    __syncthreads();
}

// This lane's share of row r of `a` (and of `b` when DUAL) dotted with the staged x: lane l
// takes pieces l, l + 32, ..., UNROLL at a time. Two matrices at a time hold twice the
// registers per load in flight: by default half as many keep the occupancy (and so the loads
// in flight per multiprocessor) up. The caller sums over the warp.
template <int BITS, bool DUAL, int UNROLL = (DUAL ? ROWS_UNROLL / 2 : ROWS_UNROLL)>
__device__ __forceinline__ void row_dot(const Affine& a, const Affine& b, long long r, int pieces, int group,
                                        int dtype, const u8* xs, float& acc_a, float& acc_b) {
    constexpr int PF = 128 / BITS, REC = staged_record(BITS);
    const float2* meta = (const float2*)(xs + pieces * REC);
    int lane = threadIdx.x & 31;
    int group_shift = __ffs(group) - 1;  // groups are powers of two (checked by the host)
    long long first_group = r * (((long long)pieces * PF) >> group_shift);
    const uint4* ra = (const uint4*)a.w + r * pieces;
    const uint4* rb = (const uint4*)b.w + r * pieces;
    // Scales and biases are loaded with the codes: loaded where they are used, each was a
    // memory round trip of its own in the middle of the arithmetic.
    for (int base = 0; base < pieces; base += 32 * UNROLL) {
        uint4 va[UNROLL], vb[UNROLL];
        u32 sa[UNROLL], ba[UNROLL], sb[UNROLL], bb[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            int p = base + u * 32 + lane;
            if (p < pieces) {
                long long g = first_group + ((p * PF) >> group_shift);
                va[u] = ra[p];
                sa[u] = load_raw(a.scales, dtype, g);
                ba[u] = load_raw(a.biases, dtype, g);
                if (DUAL) {
                    vb[u] = rb[p];
                    sb[u] = load_raw(b.scales, dtype, g);
                    bb[u] = load_raw(b.biases, dtype, g);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            int p = base + u * 32 + lane;
            if (p >= pieces) break;
            float2 mt = meta[p];  // (sum of x, 2^(E - 22))
            float da, db;
            piece_dot<BITS, DUAL>(va[u], vb[u], xs + p * REC, da, db);
            acc_a += raw_to_float(sa[u], dtype) * (da * mt.y) + raw_to_float(ba[u], dtype) * mt.x;
            if (DUAL) acc_b += raw_to_float(sb[u], dtype) * (db * mt.y) + raw_to_float(bb[u], dtype) * mt.x;
        }
    }
}

// `a` one row on: row r of the result is row r + 1 of `a`, so that row_dot's DUAL path takes
// two neighbouring rows of one matrix, and each piece of staged x it reads from shared memory
// serves both.
template <int BITS>
__device__ __forceinline__ Affine next_row(const Affine& a, int cols, int group, int dtype) {
    long long scale_bytes = (long long)(cols / group) * (dtype == DT_F32 ? 4 : 2);
    return {a.w + (long long)cols * BITS / 8, a.scales + scale_bytes, a.biases + scale_bytes};
}

// Rows r and r + 1 (when below `rows`) of `a` dotted with the staged x, summed over the warp.
template <int BITS>
__device__ __forceinline__ void row_pair_dot(const Affine& a, int r, int rows, int cols, int group, int dtype,
                                             const u8* xs, float& acc_a, float& acc_b) {
    acc_a = 0.0f, acc_b = 0.0f;
    row_dot<BITS, true>(a, r + 1 < rows ? next_row<BITS>(a, cols, group, dtype) : a, r, cols / (128 / BITS), group,
                        dtype, xs, acc_a, acc_b);
    acc_a = warp_sum(acc_a);
    acc_b = warp_sum(acc_b);
}

// y = alpha * (W x) + beta * y, a row per warp, or a pair of neighbouring rows (PAIRS: the
// host takes them for matrices tall enough to give every multiprocessor a block of pairs).
template <int BITS, bool PAIRS>
__device__ void matvec_pow2(Affine a, int group, int dtype, const float* x, int rows, int cols, float* y, float alpha,
                            float beta) {
    extern __shared__ uint4 smem_vec[];
    u8* smem = (u8*)smem_vec;
    stage_x<BITS>(x, cols, smem);
    constexpr int STEP = PAIRS ? 2 : 1;
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int r = STEP * (blockIdx.x * warps + (threadIdx.x >> 5)); r < rows; r += STEP * gridDim.x * warps) {
        float acc_a = 0.0f, acc_b = 0.0f;
        if (PAIRS) {
            row_pair_dot<BITS>(a, r, rows, cols, group, dtype, smem, acc_a, acc_b);
        } else {
            row_dot<BITS, false>(a, a, r, cols / (128 / BITS), group, dtype, smem, acc_a, acc_b);
            acc_a = warp_sum(acc_a);
        }
        if (lane == 0) {
            y[r] = alpha * acc_a + (beta != 0.0f ? beta * y[r] : 0.0f);
            if (PAIRS && r + 1 < rows) y[r + 1] = alpha * acc_b + (beta != 0.0f ? beta * y[r + 1] : 0.0f);
        }
    }
}

// silu(W x) * (W2 x) (gate and up of a SwiGLU; W2 of the same shape and format).
template <int BITS>
__device__ void swiglu_pow2(Affine a, Affine b, int group, int dtype, const float* x, int rows, int cols, float* y) {
    extern __shared__ uint4 smem_vec[];
    u8* smem = (u8*)smem_vec;
    stage_x<BITS>(x, cols, smem);
    int pieces = cols / (128 / BITS);
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < rows; r += gridDim.x * warps) {
        float acc_a = 0.0f, acc_b = 0.0f;
        row_dot<BITS, true>(a, b, r, pieces, group, dtype, smem, acc_a, acc_b);
        acc_a = warp_sum(acc_a);
        acc_b = warp_sum(acc_b);
        if (lane == 0) y[r] = siluf(acc_a) * acc_b;
    }
}

// One row per warp (matvec_q) or pairs of neighbouring rows (matvec_pairs_q).
#define MATVEC_ENTRY(NAME, BITS, PAIRS)                                                                          \
    extern "C" __global__ void NAME(const u8* w, const u8* scales, const u8* biases, int group, int dtype,       \
                                    const float* x, int rows, int cols, float* y, float alpha, float beta) {     \
        Affine a = {w, scales, biases};                                                                          \
        matvec_pow2<BITS, PAIRS>(a, group, dtype, x, rows, cols, y, alpha, beta);                                \
    }

#define MATVEC_POW2(BITS, MIN_BLOCKS)                                                                            \
    MATVEC_ENTRY(matvec_q##BITS, BITS, false)                                                                    \
    MATVEC_ENTRY(matvec_pairs_q##BITS, BITS, true)                                                               \
    extern "C" __global__ void __launch_bounds__(256, MIN_BLOCKS)                                                \
        swiglu_q##BITS(const u8* w, const u8* scales, const u8* biases, const u8* w2, const u8* scales2,         \
                       const u8* biases2, int group, int dtype, const float* x, int rows, int cols, float* y) {  \
        Affine a = {w, scales, biases}, b = {w2, scales2, biases2};                                              \
        swiglu_pow2<BITS>(a, b, group, dtype, x, rows, cols, y);                                                 \
    }
// Blocks per multiprocessor the SwiGLU kernel is compiled for: as many as fit without spills.
MATVEC_POW2(2, 2)
MATVEC_POW2(4, 3)
MATVEC_POW2(8, 3)

// Up to MAX_MULTI matrices that read the same x (same encoding and width, any heights) in
// one launch: x is staged once per block and the rows are numbered across the matrices.
#define MAX_MULTI 4

struct MatvecMulti {
    const u8* w[MAX_MULTI][3];  // codes, scales, biases
    float* y[MAX_MULTI];
    int rows[MAX_MULTI];
    int count;
};

// With `norm_weight` set, x is first RMS-normalized with it (and eps), and the normalized x
// is written to `normed` as well (the RMSNorm before a layer's projections, in the same
// launch: the same arithmetic as the rms_norm kernel, so the same bits).
template <int BITS>
__device__ void matvec_multi(const MatvecMulti& m, int group, int dtype, const float* x, int cols,
                             const float* norm_weight, float eps, float* normed) {
    extern __shared__ uint4 smem_vec[];
    u8* smem = (u8*)smem_vec;
    if (norm_weight) {
        __shared__ float scratch[32];
        float4 unused[RMS_VECS];
        StageNorm norm = {norm_weight, rms_inverse(x, cols, eps, scratch, unused), normed};
        stage_x_async<BITS, true>(x, 1, cols, 0, smem, norm);
        __syncthreads();
    } else {
        stage_x<BITS>(x, cols, smem);
    }
    // One row per warp: in pairs, as matvec_pairs takes them, the extra registers (three blocks
    // per multiprocessor instead of four) cost more than the shared x reads saved here
    // (docs/perf.md).
    int pieces = cols / (128 / BITS);
    int total = 0;
    for (int k = 0; k < m.count; ++k) total += m.rows[k];
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int rr = blockIdx.x * warps + (threadIdx.x >> 5); rr < total; rr += gridDim.x * warps) {
        int k = 0, r = rr;
        while (r >= m.rows[k]) r -= m.rows[k++];
        Affine a = {m.w[k][0], m.w[k][1], m.w[k][2]};
        float acc = 0.0f, unused = 0.0f;
        row_dot<BITS, false>(a, a, r, pieces, group, dtype, smem, acc, unused);
        acc = warp_sum(acc);
        if (lane == 0) m.y[k][r] = acc;
    }
}

#define MATVEC_MULTI(BITS)                                                                                 \
    extern "C" __global__ void matvec_multi_q##BITS(MatvecMulti m, int group, int dtype, const float* x,    \
                                                    int cols, const float* norm_weight, float eps,           \
                                                    float* normed) {                                         \
        matvec_multi<BITS>(m, group, dtype, x, cols, norm_weight, eps, normed);                              \
    }
MATVEC_MULTI(2)
MATVEC_MULTI(4)
MATVEC_MULTI(8)

// All routed experts of a layer for one token, in two launches. The pointers travel in the
// kernel parameters; experts are summed in batch order, so results do not depend on which
// experts were already on the device.
#define MAX_BATCH 16

struct ExpertBatch {
    const u8* w[MAX_BATCH][9];  // gate w/s/b, up w/s/b, down w/s/b
    float weight[MAX_BATCH];
    // The shared expert's slot (-1 for none), weighted by sigmoid(*shared_logit) instead.
    const float* shared_logit;
    int count;
    int shared_slot;
};

// act[e, r] = silu(gate_e[r] . x) * (up_e[r] . x) for every expert e of the batch: one warp
// per (expert, row), x staged once per block.
template <int BITS>
__device__ void swiglu_batch(const ExpertBatch& batch, int group, int dtype, const float* x, int rows, int cols,
                             float* act) {
    extern __shared__ uint4 smem_vec[];
    u8* smem = (u8*)smem_vec;
    stage_x<BITS>(x, cols, smem);
    int pieces = cols / (128 / BITS);
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int rr = blockIdx.x * warps + (threadIdx.x >> 5); rr < batch.count * rows; rr += gridDim.x * warps) {
        int e = rr / rows, r = rr % rows;
        Affine gate = {batch.w[e][0], batch.w[e][1], batch.w[e][2]};
        Affine up = {batch.w[e][3], batch.w[e][4], batch.w[e][5]};
        float acc_g = 0.0f, acc_u = 0.0f;
        row_dot<BITS, true>(gate, up, r, pieces, group, dtype, smem, acc_g, acc_u);
        acc_g = warp_sum(acc_g);
        acc_u = warp_sum(acc_u);
        if (lane == 0) act[(long long)e * rows + r] = siluf(acc_g) * acc_u;
    }
}

// Loads in flight per lane in the batched down product: its grid gives a multiprocessor about
// two blocks, so registers do not bound the blocks resident (8: 121-123 registers), and a
// lane's 11 pieces of a row (ten experts and the shared one, 1024 columns at 4 bits) take two
// round trips instead of three.
#define DOWN_UNROLL 8
// Words per thread per staging pass in the batched down product: ten experts and the shared
// one, 1024 columns at 4 bits, are staged in one memory round trip instead of two.
#define DOWN_STAGE_WORDS 6
// out[r] += sum over experts e of weight_e * (down_e[r] . act[e]). One warp per row; the
// lanes walk the (expert, piece) pairs of the row in order, DOWN_UNROLL loads in flight each,
// so a row of a narrow matrix (1024 columns: one piece per lane per expert) still keeps
// several loads in flight.
template <int BITS>
__device__ void down_batch(const ExpertBatch& batch, int group, int dtype, const float* act, int rows, int cols,
                           float* out) {
    constexpr int PF = 128 / BITS, REC = staged_record(BITS);
    extern __shared__ uint4 smem_vec[];
    u8* smem = (u8*)smem_vec;
    int pieces = cols / PF;
    int stride = staged_bytes(BITS, cols);  // per expert
    stage_x_async<BITS, false, DOWN_STAGE_WORDS>(act, batch.count, cols, stride, smem);
    __syncthreads();
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    int group_shift = __ffs(group) - 1;  // groups are powers of two (checked by the host)
    long long groups = cols >> group_shift;
    int items = batch.count * pieces;
    float shared_weight = batch.shared_slot >= 0 ? sigmoidf(*batch.shared_logit) : 0.0f;
    for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < rows; r += gridDim.x * warps) {
        float total = 0.0f;
        int e = lane / pieces, p = lane % pieces;  // this lane's next (expert, piece)
        for (int base = 0; base < items; base += 32 * DOWN_UNROLL) {
            uint4 v[DOWN_UNROLL];
            u32 sc[DOWN_UNROLL], bi[DOWN_UNROLL];
            int ue[DOWN_UNROLL], up[DOWN_UNROLL];
#pragma unroll
            for (int u = 0; u < DOWN_UNROLL; ++u) {
                ue[u] = e;
                up[u] = p;
                if (base + u * 32 + lane < items) {
                    long long g = r * groups + ((p * PF) >> group_shift);
                    v[u] = ((const uint4*)batch.w[e][6] + (long long)r * pieces)[p];
                    sc[u] = load_raw(batch.w[e][7], dtype, g);
                    bi[u] = load_raw(batch.w[e][8], dtype, g);
                }
                for (p += 32; p >= pieces; p -= pieces) ++e;
            }
#pragma unroll
            for (int u = 0; u < DOWN_UNROLL; ++u) {
                if (base + u * 32 + lane >= items) break;
                int ex = ue[u], px = up[u];
                const u8* xs = smem + ex * stride;
                float2 mt = ((const float2*)(xs + pieces * REC))[px];  // (sum of x, 2^(E - 22))
                float d, unused;
                piece_dot<BITS, false>(v[u], v[u], xs + px * REC, d, unused);
                float dot = raw_to_float(sc[u], dtype) * (d * mt.y) + raw_to_float(bi[u], dtype) * mt.x;
                total += (ex == batch.shared_slot ? shared_weight : batch.weight[ex]) * dot;
            }
        }
        total = warp_sum(total);
        if (lane == 0) out[r] += total;
    }
}

// Routing: the top k of one token's router softmax, ranked as the CPU ranks it (the larger
// probability first, the lower expert on ties). A router probability's key orders that way
// as an unsigned integer; a NaN ranks as a probability of 0, so that k distinct experts are
// chosen whatever the logits.
__device__ __forceinline__ unsigned long long route_key(float p, int e) {
    u32 bits = isnan(p) ? 0u : __float_as_uint(p);  // p >= 0: the bits order as the values
    return ((unsigned long long)(bits | 0x80000000u) << 32) | (u32)~(u32)e;
}

// 32 keys, one per lane, sorted descending across the warp by a bitonic network of shuffles.
__device__ __forceinline__ unsigned long long warp_sort_keys(unsigned long long v) {
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int size = 2; size <= 32; size <<= 1)
#pragma unroll
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            unsigned long long o = __shfl_xor_sync(0xffffffffu, v, stride);
            // Runs descend where bit `size` of the lane is clear (the whole warp at the end);
            // there the lower lane of a pair keeps the larger key.
            bool larger = ((lane & stride) == 0) == ((lane & size) == 0);
            v = larger ? max(v, o) : min(v, o);
        }
    return v;
}

// The 32 largest of two descending runs of 32 keys (one per lane), descending: the larger of
// a[i] and b[31 - i] form a bitonic run that holds them, which halving steps sort.
__device__ __forceinline__ unsigned long long warp_merge_keys(unsigned long long a, unsigned long long b) {
    int lane = threadIdx.x & 31;
    unsigned long long v = max(a, __shfl_sync(0xffffffffu, b, 31 - lane));
#pragma unroll
    for (int stride = 16; stride > 0; stride >>= 1) {
        unsigned long long o = __shfl_xor_sync(0xffffffffu, v, stride);
        v = (lane & stride) == 0 ? max(v, o) : min(v, o);
    }
    return v;
}

// Routing blocks have this many threads; a token takes at most ROUTE_MAX_K experts.
#define ROUTE_THREADS 256
#define ROUTE_MAX_K 32

struct RouteScratch {
    unsigned long long runs[ROUTE_THREADS / 32][32];
    float reduce[32];
    int chosen[ROUTE_MAX_K];  // experts by rank
    float weight[ROUTE_MAX_K];
};

// The top k (1 <= k <= ROUTE_MAX_K <= experts) of one token's `experts` router logits, by a
// block of ROUTE_THREADS threads, into s.chosen and s.weight by rank: each warp sorts slices
// of 64 probabilities and keeps the 32 largest it has seen, and the warps' runs are merged
// pairwise. Weights as the CPU computes them: probability over the sum of all, and with
// `renormalize` over the sum of the chosen ones. Ends with a barrier.
__device__ void top_k_block(const float* row, int experts, int k, int renormalize, RouteScratch& s) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float m = NEG_INF;
    for (int e = threadIdx.x; e < experts; e += blockDim.x) m = fmaxf(m, row[e]);
    m = block_max(m, s.reduce);
    float sum = 0.0f;
    unsigned long long best = 0ull;  // below every expert's key
    for (int base = warp * 64; base < experts; base += warps * 64) {
        int e0 = base + lane, e1 = e0 + 32;
        float p0 = e0 < experts ? expf(row[e0] - m) : 0.0f, p1 = e1 < experts ? expf(row[e1] - m) : 0.0f;
        sum += p0 + p1;
        unsigned long long a = e0 < experts ? route_key(p0, e0) : 0ull, b = e1 < experts ? route_key(p1, e1) : 0ull;
        best = warp_merge_keys(best, warp_merge_keys(warp_sort_keys(a), warp_sort_keys(b)));
    }
    sum = block_sum(sum, s.reduce);
    s.runs[warp][lane] = best;
    __syncthreads();
    int active = min(warps, (experts + 63) / 64);
    for (int half = 1; half < active; half <<= 1) {
        if ((warp & (2 * half - 1)) == 0 && warp + half < active)
            s.runs[warp][lane] = warp_merge_keys(s.runs[warp][lane], s.runs[warp + half][lane]);
        __syncthreads();
    }
    if (warp == 0) {
        unsigned long long key = s.runs[0][lane];
        float w = lane < k ? __uint_as_float((u32)(key >> 32) & 0x7fffffffu) / sum : 0.0f;
        if (renormalize) w /= warp_sum(w);
        if (lane < k) {
            s.chosen[lane] = (int)~(u32)key;
            s.weight[lane] = w;
        }
    }
    __syncthreads();
}

// One block per token.
extern "C" __global__ void __launch_bounds__(ROUTE_THREADS) route_top_k(const float* logits, int experts, int k,
                                                                      int renormalize, int* idx, float* weights) {
    __shared__ RouteScratch s;
    top_k_block(logits + (long long)blockIdx.x * experts, experts, k, renormalize, s);
    for (int r = threadIdx.x; r < k; r += blockDim.x) {
        idx[(long long)blockIdx.x * k + r] = s.chosen[r];
        weights[(long long)blockIdx.x * k + r] = s.weight[r];
    }
}

// The device addresses of one expert's gate, up and down (codes, scales, biases each).
struct ExpertPtrs {
    const u8* w[9];
};

// What routing one token on the device reads: its router logits, the table of the layer's
// experts (all in VRAM), the shared expert (w[0] null for none) and its gate logit; `batch`
// is where the batch goes for the down launch.
struct DeviceRoute {
    const float* logits;
    const ExpertPtrs* table;
    ExpertPtrs shared;
    const float* shared_logit;
    ExpertBatch* batch;
    int experts, k, renormalize;
};

// The top k of the router logits as the ExpertBatch of the layer's experts, in expert order
// with the shared expert last, exactly as the host-routed path builds it (so both give the
// same sums). Ends with a barrier.
__device__ void route_batch(const DeviceRoute& route, RouteScratch& s, ExpertBatch& batch) {
    top_k_block(route.logits, route.experts, route.k, route.renormalize, s);
    int k = route.k, t = threadIdx.x;
    bool has_shared = route.shared.w[0] != nullptr;
    if (t < 9 * k) {
        int r = t / 9, m = t % 9, e = s.chosen[r], slot = 0;  // this expert's place in index order
        for (int j = 0; j < k; ++j) slot += s.chosen[j] < e;
        batch.w[slot][m] = route.table[e].w[m];
        if (m == 0) batch.weight[slot] = s.weight[r];
    } else if (has_shared) {
        // Constant indices: a kernel parameter indexed at run time is copied to the stack.
#pragma unroll
        for (int m = 0; m < 9; ++m)
            if (t == 9 * k + m) batch.w[k][m] = route.shared.w[m];
    }
    if (t == 0) {
        batch.shared_logit = route.shared_logit;
        batch.shared_slot = has_shared ? k : -1;
        batch.count = has_shared ? k + 1 : k;
    }
    __syncthreads();
}

// A batch copied word by word by the block's threads, between shared and device memory.
__device__ __forceinline__ void copy_batch(const ExpertBatch* from, ExpertBatch* to) {
    for (int i = threadIdx.x; i < (int)(sizeof(ExpertBatch) / 4); i += blockDim.x)
        ((u32*)to)[i] = ((const u32*)from)[i];
}

// The batched kernels take the batch by value (host-routed), or route the token themselves
// (device-routed: every block of the gate/up launch takes the same decision, block 0 writes
// it for the down launch, which reads it from device memory). Routing in the gate/up launch
// saves a launch of its own, whose single block left the GPU idle (6 us per layer).
#define EXPERT_BATCH(BITS, MIN_BLOCKS)                                                                     \
    extern "C" __global__ void __launch_bounds__(256, MIN_BLOCKS)                                            \
        swiglu_batch_q##BITS(ExpertBatch batch, int group, int dtype, const float* x, int rows, int cols,    \
                             float* act) {                                                                   \
        swiglu_batch<BITS>(batch, group, dtype, x, rows, cols, act);                                         \
    }                                                                                                        \
    extern "C" __global__ void down_batch_q##BITS(ExpertBatch batch, int group, int dtype, const float* act, \
                                                  int rows, int cols, float* out) {                          \
        down_batch<BITS>(batch, group, dtype, act, rows, cols, out);                                         \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(256, MIN_BLOCKS)                                            \
        route_swiglu_batch_q##BITS(DeviceRoute route, int group, int dtype, const float* x, int rows, int cols, \
                                   float* act) {                                                             \
        __shared__ ExpertBatch local;                                                                        \
        __shared__ RouteScratch scratch;                                                                     \
        route_batch(route, scratch, local);                                                                  \
        if (blockIdx.x == 0) copy_batch(&local, route.batch); /* for the down launch */                      \
        swiglu_batch<BITS>(local, group, dtype, x, rows, cols, act);                                         \
    }                                                                                                        \
    extern "C" __global__ void down_batch_dev_q##BITS(const ExpertBatch* batch, int group, int dtype,        \
                                                      const float* act, int rows, int cols, float* out) {    \
        __shared__ ExpertBatch local;                                                                        \
        copy_batch(batch, &local); /* read as fast as a kernel parameter */                                  \
        __syncthreads();                                                                                     \
        down_batch<BITS>(local, group, dtype, act, rows, cols, out);                                         \
    }
// Blocks per multiprocessor the gate/up kernel is compiled for: as many as fit without spills.
EXPERT_BATCH(2, 2)
EXPERT_BATCH(4, 3)
EXPERT_BATCH(8, 3)

// Affine weights of any width (3, 5, 6 bits): one warp per row, one group per lane step.
extern "C" __global__ void matvec_affine_any(const u8* w, const u8* scales, const u8* biases, int bits, int group,
                                             int dtype, const float* x, int rows, int cols, float* y) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp >= rows) return;
    long long r = warp;
    int groups = cols / group;
    const u8* row = w + r * (long long)cols * bits / 8;
    float acc = 0.0f;
    for (int g = lane; g < groups; g += 32) {
        float dot = 0.0f, xs = 0.0f;
        for (int j = 0; j < group; ++j) {
            float xv = x[g * group + j];
            dot += (float)load_code(row, bits, (long long)g * group + j) * xv;
            xs += xv;
        }
        long long gi = r * groups + g;
        acc += load_float(scales, dtype, gi) * dot + load_float(biases, dtype, gi) * xs;
    }
    acc = warp_sum(acc);
    if (lane == 0) y[r] = acc;
}

// Dense weights: one warp per row.
extern "C" __global__ void matvec_dense(const u8* w, int dtype, const float* x, int rows, int cols, float* y) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp >= rows) return;
    long long base = (long long)warp * cols;
    float acc = 0.0f;
    for (int c = lane; c < cols; c += 32) acc += load_float(w, dtype, base + c) * x[c];
    acc = warp_sum(acc);
    if (lane == 0) y[warp] = acc;
}
