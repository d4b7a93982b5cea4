// flash-moe CUDA kernels, compiled at start-up with NVRTC for the GPU found.
//
// Activations are row-major float32 [rows, cols]. Weights stay in their stored encoding:
// dense f32/f16/bf16 (dtype code 0/1/2), or MLX affine quantization (codes packed low bits
// first in a little-endian bit stream along each row; per group a scale and a bias stored
// as f32/f16/bf16). No CUDA headers are needed: half conversions use PTX.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float bf16_to_f32(u16 v) { return __uint_as_float(((u32)v) << 16); }

__device__ __forceinline__ float f16_to_f32(u16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}

// Element i of a float array stored as `dtype`.
__device__ __forceinline__ float load_float(const u8* p, int dtype, long long i) {
    if (dtype == DT_F32) return ((const float*)p)[i];
    u16 v = ((const u16*)p)[i];
    return dtype == DT_BF16 ? bf16_to_f32(v) : f16_to_f32(v);
}

// The raw bits of element i of a float array stored as `dtype` (f32: 32 bits, f16/bf16: the
// low 16), so that a kernel can issue the load with others and convert when it needs the value.
__device__ __forceinline__ u32 load_raw(const u8* p, int dtype, long long i) {
    return dtype == DT_F32 ? ((const u32*)p)[i] : (u32)((const u16*)p)[i];
}

__device__ __forceinline__ float raw_to_float(u32 v, int dtype) {
    if (dtype == DT_F32) return __uint_as_float(v);
    return dtype == DT_BF16 ? bf16_to_f32((u16)v) : f16_to_f32((u16)v);
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float siluf(float x) { return x * sigmoidf(x); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum (or max) over the block; `scratch` holds 32 floats. All threads get the result.
__device__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < warps; ++w) total += scratch[w];
    return total;
}

// block_sum of two values at once (each summed in block_sum's order); `scratch` holds 32.
__device__ float2 block_sum2(float2 v, float2* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v.x = warp_sum(v.x);
    v.y = warp_sum(v.y);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float2 total = make_float2(0.0f, 0.0f);
    for (int w = 0; w < warps; ++w) total.x += scratch[w].x, total.y += scratch[w].y;
    return total;
}

// RMSNorm's 1 / sqrt(mean(x^2) + eps) for one row of n floats, the same in every block that
// computes it (the fused products compute it per block); a barrier. When the row is loaded
// as float4s (rms_vectorized), this thread's RMS_VECS of them are left in v.
#define RMS_VECS 4
__device__ __forceinline__ bool rms_vectorized(int n) {
    return (n & 3) == 0 && n <= 4 * RMS_VECS * (int)blockDim.x;
}
__device__ __forceinline__ float rms_inverse(const float* src, int n, float eps, float* scratch,
                                             float4 (&v)[RMS_VECS]) {
    float ss = 0.0f;
    if (rms_vectorized(n)) {
#pragma unroll
        for (int j = 0; j < RMS_VECS; ++j) {
            int c = 4 * (j * blockDim.x + threadIdx.x);
            v[j] = c < n ? *(const float4*)(src + c) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            ss += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
        }
    } else {
        for (int i = threadIdx.x; i < n; i += blockDim.x) ss += src[i] * src[i];
    }
    return rsqrtf(block_sum(ss, scratch) / n + eps);
}

// dst[i] = src[i] * inv * weight[i] over a row of n floats (RMSNorm's scaling), from the
// float4s rms_inverse left in v when the row was loaded vectorized; dst may be global or
// shared memory.
__device__ __forceinline__ void rms_scale(const float* src, const float* weight, int n, float inv,
                                          const float4 (&v)[RMS_VECS], float* dst) {
    if (rms_vectorized(n)) {
#pragma unroll
        for (int j = 0; j < RMS_VECS; ++j) {
            int c = 4 * (j * blockDim.x + threadIdx.x);
            if (c >= n) break;
            float4 w = *(const float4*)(weight + c);
            *(float4*)(dst + c) = make_float4(v[j].x * inv * w.x, v[j].y * inv * w.y, v[j].z * inv * w.z,
                                              v[j].w * inv * w.w);
        }
        return;
    }
    for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i] * inv * weight[i];
}

__device__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float m = NEG_INF;
    for (int w = 0; w < warps; ++w) m = fmaxf(m, scratch[w]);
    return m;
}

// Code `i` (bits wide) of a little-endian bit stream.
// Never reads past the byte holding the code's last bit. Widths up to 8 bits.
__device__ __forceinline__ u32 load_code(const u8* row, int bits, long long i) {
    long long bit = i * bits;
    long long byte = bit >> 3;
    int shift = (int)(bit & 7);
    u32 window = (u32)row[byte];
    if (shift + bits > 8) window |= (u32)row[byte + 1] << 8;
    return (window >> shift) & ((1u << bits) - 1u);
}

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

// a (low half) and b (high half) as two limbs of an MMA operand word, bf16 or f16: hi, the
// pair rounded, and lo, what rounding left.
template <bool BF16>
__device__ __forceinline__ void limb_pair(float a, float b, u32& hi, u32& lo) {
#if __CUDA_ARCH__ >= 800
    if constexpr (BF16) {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(hi) : "f"(b), "f"(a));
        float ha = bf16_to_f32((u16)(hi & 0xffffu)), hb = bf16_to_f32((u16)(hi >> 16));
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(lo) : "f"(b - hb), "f"(a - ha));
    } else {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(hi) : "f"(b), "f"(a));
        float ha = f16_to_f32((u16)(hi & 0xffffu)), hb = f16_to_f32((u16)(hi >> 16));
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(lo) : "f"(b - hb), "f"(a - ha));
    }
#endif
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

// BYTES (4, 8 or 16) from global to shared memory, asynchronously; zeros when not valid.
// 16-byte copies bypass L1 (.cg); smaller ones may only go through it (.ca).
template <int BYTES>
__device__ __forceinline__ void cp_async(void* smem, const void* global, bool valid) {
#if __CUDA_ARCH__ >= 800
    u32 dst = (u32)__cvta_generic_to_shared(smem);
    int bytes = valid ? BYTES : 0;  // 0: the BYTES bytes are zero-filled
    if constexpr (BYTES == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(global), "r"(bytes));
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], %3, %2;" ::"r"(dst), "l"(global), "r"(bytes), "n"(BYTES));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
#endif
}

// d += a . b on the tensor cores (m16n8k16, f16 in, f32 accumulate).
__device__ __forceinline__ void mma_f16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
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

// ---------------------------------------------------------------------------------------
// Norms and elementwise operations.

// RMSNorm over each `n`-wide group (one block per group), times weight[n].
// One block per row. A row of up to 16 floats per thread (4096 with 256 threads) is read
// once, as float4s all in flight together, and kept in registers; longer rows loop.
extern "C" __global__ void rms_norm(const float* x, const float* weight, int n, float eps, float* out) {
    __shared__ float scratch[32];
    const float* src = x + (long long)blockIdx.x * n;
    float* dst = out + (long long)blockIdx.x * n;
    float4 v[RMS_VECS];
    float inv = rms_inverse(src, n, eps, scratch, v);
    rms_scale(src, weight, n, inv, v, dst);
}
extern "C" __global__ void gated_rms_norm(const float* x, const float* z, const float* weight, int n, float eps,
                                          float* out) {
    __shared__ float scratch[32];
    long long base = (long long)blockIdx.x * n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += x[base + i] * x[base + i];
    float inv = rsqrtf(block_sum(ss, scratch) / n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        out[base + i] = weight[i] * (x[base + i] * inv) * siluf(z[base + i]);
}

// y += alpha * x (with `transposed_unused` kept 0: the signature leaves room for strides).
extern "C" __global__ void axpy(float* y, const float* x, float alpha, int transposed_unused, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += alpha * x[i];
}

extern "C" __global__ void add_assign(float* x, const float* y, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// x *= sigmoid(gate); a gate of one column (`gate_cols == 1`) scales whole rows.
extern "C" __global__ void mul_sigmoid(float* x, const float* gate, int cols, int gate_cols, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = gate_cols == 1 ? gate[i / cols] : gate[i];
    x[i] *= sigmoidf(g);
}

extern "C" __global__ void silu_mul(const float* gate, const float* up, float* out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = siluf(gate[i]) * up[i];
}

// Splits heads holding [query (d) | gate (d)] into two [rows, heads * d] tensors.
extern "C" __global__ void split_query_gate(const float* qg, int heads, int d, float* q, float* gate, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long long head = i / d;
    int k = i % d;
    q[i] = qg[head * 2 * d + k];
    gate[i] = qg[head * 2 * d + d + k];
}

extern "C" __global__ void gather_rows(const float* x, const int* rows, int cols, float* out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = x[(long long)rows[i / cols] * cols + i % cols];
}

// out[rows[i]] += weights[i] * y[i]; the rows of one call are distinct.
extern "C" __global__ void scatter_add_rows(float* out, const float* y, const int* rows, const float* weights,
                                           int cols, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long long r = i / cols;
    out[(long long)rows[r] * cols + i % cols] += weights[r] * y[i];
}

// out[t] += weight[j] * y[pos[j]] for j = start[u], ..., start[u + 1] - 1, in that order, for
// each token t = tokens[u] with outputs in y: each token's routed experts added one after
// another, as scatter_add_rows adds them expert by expert (the same arithmetic, so the same
// bits).
extern "C" __global__ void combine_rows(float* out, const float* y, const int* tokens, const int* start,
                                       const int* pos, const float* weight, int cols, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long long u = i / cols, c = i % cols;
    float* o = out + (long long)tokens[u] * cols + c;
    float acc = *o;
    for (int j = start[u]; j < start[u + 1]; ++j) acc += weight[j] * y[(long long)pos[j] * cols + c];
    *o = acc;
}

// ---------------------------------------------------------------------------------------
// Attention.

// Rotate-half RoPE on the first `rot` dims of each head; row t is at position pos0 + t.
// Angles as the reference computes them: float(position) * float(inv_freq), cos/sin taken
// in double of that float angle.
extern "C" __global__ void rope(float* x, int cols, int head_dim, int rot, float theta, int pos0, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // over rows * heads * rot/2
    int half = rot / 2;
    if (i >= n) return;
    int k = i % half;
    long long rh = i / half;
    int heads = cols / head_dim;
    long long row = rh / heads;
    int head = rh % heads;
    float inv_freq = 1.0f / powf(theta, (float)(2 * k) / (float)rot);
    float angle = (float)(pos0 + row) * inv_freq;
    float c = (float)cos((double)angle), s = (float)sin((double)angle);
    float* h = x + row * cols + (long long)head * head_dim;
    float a = h[k], b = h[k + half];
    h[k] = a * c - b * s;
    h[k + half] = b * c + a * s;
}

// A full-attention layer's inputs for `rows` rows at positions pos0..: block (t, j) takes
// query head j < heads (split from its gate, RMS-normalized, rotated), key head j - heads
// (normalized, rotated, written to the cache at row at + t) or value head j - heads -
// kv_heads (copied to the cache). The same arithmetic as split_query_gate, rms_norm and
// rope one after another, in one launch instead of seven. Shared memory: d floats.
extern "C" __global__ void attention_inputs(const float* qg, const float* k, const float* v, const float* q_norm,
                                            const float* k_norm, float eps, int heads, int kv_heads, int d, int rot,
                                            float theta, int pos0, long long at, float* q, float* gate, float* keys,
                                            float* values) {
    extern __shared__ float head[];
    __shared__ float scratch[32];
    int per_row = heads + 2 * kv_heads;
    int t = blockIdx.x / per_row, j = blockIdx.x % per_row;
    long long kvd = (long long)kv_heads * d;
    if (j >= heads + kv_heads) {
        const float* src = v + t * kvd + (long long)(j - heads - kv_heads) * d;
        float* dst = values + (at + t) * kvd + (long long)(j - heads - kv_heads) * d;
        for (int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = src[i];
        return;
    }
    bool query = j < heads;
    int h = query ? j : j - heads;
    const float* src = query ? qg + ((long long)t * heads + h) * 2 * d : k + t * kvd + (long long)h * d;
    const float* w = query ? q_norm : k_norm;
    float* dst = query ? q + ((long long)t * heads + h) * d : keys + (at + t) * kvd + (long long)h * d;
    if (query)
        for (int i = threadIdx.x; i < d; i += blockDim.x) gate[((long long)t * heads + h) * d + i] = src[d + i];
    float4 vec[RMS_VECS];
    float inv = rms_inverse(src, d, eps, scratch, vec);
    rms_scale(src, w, d, inv, vec, head);
    __syncthreads();
    int half = rot / 2;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        if (i >= rot) {
            dst[i] = head[i];
            continue;
        }
        int kk = i < half ? i : i - half;
        float inv_freq = 1.0f / powf(theta, (float)(2 * kk) / (float)rot);
        float angle = (float)(pos0 + t) * inv_freq;
        float c = (float)cos((double)angle), s = (float)sin((double)angle);
        float a = head[kk], b = head[kk + half];
        dst[i] = i < half ? a * c - b * s : b * c + a * s;
    }
}

// Four floats of a row from column i: one 16-byte load when rows are 16-byte aligned (d a
// multiple of 4), else one at a time, zero past the row's d.
__device__ __forceinline__ float4 load_quad(const float* row, int i, int d, bool aligned) {
    if (aligned) return *reinterpret_cast<const float4*>(row + i);
    return make_float4(i < d ? row[i] : 0.0f, i + 1 < d ? row[i + 1] : 0.0f, i + 2 < d ? row[i + 2] : 0.0f,
                       i + 3 < d ? row[i + 3] : 0.0f);
}

// Attention for a few queries (decode), split over the keys as flash-decoding does: block
// (t, kv, c) takes keys [c * chunk, (c + 1) * chunk) of query row t for the g query heads of
// KV head kv, so that each key and value row is read once for all of them. Scores: a thread
// per key holds its g dot products in registers, the queries broadcast from shared memory,
// so no sum crosses lanes. Values: a thread per 4 heads x 4 columns walks the keys (several
// threads split them when there are fewer such items than threads). Per head it leaves the
// chunk's values weighted by exp(score - m), then m (the chunk's largest score) and the sum
// of those weights: attention_combine merges the chunks. G: g rounded up to 4, 8, 16 or 32.
// Shared memory: max(G * d4, 16 * threads) floats (the queries, then the values' partial
// sums), then chunk rows of G + 4 scores (16-byte aligned, staggered across banks).
#define SPLIT_THREADS 256
template <int G>
__device__ void attention_split(const float* q, const float* k, const float* v, int heads, int kv_heads, int d,
                                int pos0, int chunk, int chunks, float scale, float* partial) {
    extern __shared__ float4 split_smem4[];
    float* qs = reinterpret_cast<float*>(split_smem4);
    __shared__ float stats[2 * G];
    const int g = heads / kv_heads, d4 = (d + 3) & ~3, stride = G + 4;
    float* s = qs + max(G * d4, 16 * SPLIT_THREADS);
    int c = blockIdx.x % chunks, kv = (blockIdx.x / chunks) % kv_heads, t = blockIdx.x / (chunks * kv_heads);
    int h0 = kv * g;
    long long kvd = (long long)kv_heads * d;
    int j0 = c * chunk, n = max(min(j0 + chunk, pos0 + t + 1) - j0, 0);
    bool aligned = (d & 3) == 0;
    for (int i = threadIdx.x; i < G * d4; i += blockDim.x) {
        int h = i / d4, e = i % d4;
        qs[i] = h < g && e < d ? q[((long long)t * heads + h0 + h) * d + e] * scale : 0.0f;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float* kj = k + (long long)(j0 + j) * kvd + (long long)kv * d;
        float acc[G];
#pragma unroll
        for (int h = 0; h < G; ++h) acc[h] = 0.0f;
        // A batch of the row's columns in flight at once: fewer round trips in a thread's
        // chain of loads, which is what a short context waits on (a long one is bound by
        // issuing the FMAs: docs/perf.md).
        constexpr int BATCH = G >= 32 ? 4 : 8;
        for (int i0 = 0; i0 < d4; i0 += 4 * BATCH) {
            float4 kk[BATCH];
#pragma unroll
            for (int u = 0; u < BATCH; ++u)
                kk[u] = i0 + 4 * u < d4 ? load_quad(kj, i0 + 4 * u, d, aligned) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
            for (int u = 0; u < BATCH; ++u) {
                if (i0 + 4 * u >= d4) break;
#pragma unroll
                for (int h = 0; h < G; ++h) {
                    float4 qq = *reinterpret_cast<const float4*>(qs + h * d4 + i0 + 4 * u);
                    acc[h] = fmaf(qq.x, kk[u].x, acc[h]);
                    acc[h] = fmaf(qq.y, kk[u].y, acc[h]);
                    acc[h] = fmaf(qq.z, kk[u].z, acc[h]);
                    acc[h] = fmaf(qq.w, kk[u].w, acc[h]);
                }
            }
        }
#pragma unroll
        for (int h = 0; h < G; h += 4)
            *reinterpret_cast<float4*>(s + j * stride + h) = make_float4(acc[h], acc[h + 1], acc[h + 2], acc[h + 3]);
    }
    __syncthreads();
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int h = warp; h < g; h += warps) {
        float m = NEG_INF;
        for (int j = lane; j < n; j += 32) m = fmaxf(m, s[j * stride + h]);
        m = warp_max(m);
        float l = 0.0f;
        for (int j = lane; j < n; j += 32) {
            float e = expf(s[j * stride + h] - m);
            s[j * stride + h] = e;
            l += e;
        }
        l = warp_sum(l);
        if (lane == 0) stats[2 * h] = m, stats[2 * h + 1] = l;
    }
    __syncthreads();
    // Item (hq, i4): heads 4 hq.. and columns i4..; `splits` threads per item when few.
    const int dq = d4 / 4, items = (g + 3) / 4 * dq, splits = max((int)blockDim.x / items, 1);
    float* sums = qs; // the queries are no longer read
    auto write = [&](int item, const float* acc) {
        int hq = item / dq, i4 = (item % dq) * 4;
        for (int u = 0; u < 4 && 4 * hq + u < g; ++u) {
            float* rec = partial + (((long long)t * heads + h0 + 4 * hq + u) * chunks + c) * (d + 2);
            for (int e = 0; e < 4 && i4 + e < d; ++e) rec[i4 + e] = acc[4 * u + e];
        }
    };
    for (int w = threadIdx.x; w < items * splits; w += blockDim.x) {
        int item = w % items, part = w / items, hq = item / dq, i4 = (item % dq) * 4;
        const float* vi = v + (long long)kv * d;
        float acc[16];
#pragma unroll
        for (int u = 0; u < 16; ++u) acc[u] = 0.0f;
        constexpr int VBATCH = 16; // value rows in flight per thread
        for (int j0v = part; j0v < n; j0v += splits * VBATCH) {
            float4 vv[VBATCH];
#pragma unroll
            for (int u = 0; u < VBATCH; ++u) {
                int j = j0v + u * splits;
                vv[u] = j < n ? load_quad(vi + (long long)(j0 + j) * kvd, i4, d, aligned)
                              : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            }
#pragma unroll
            for (int u = 0; u < VBATCH; ++u) {
                int j = j0v + u * splits;
                if (j >= n) break;
                float4 p = *reinterpret_cast<const float4*>(s + j * stride + 4 * hq);
                float pu[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
                for (int w4 = 0; w4 < 4; ++w4) {
                    acc[4 * w4] = fmaf(pu[w4], vv[u].x, acc[4 * w4]);
                    acc[4 * w4 + 1] = fmaf(pu[w4], vv[u].y, acc[4 * w4 + 1]);
                    acc[4 * w4 + 2] = fmaf(pu[w4], vv[u].z, acc[4 * w4 + 2]);
                    acc[4 * w4 + 3] = fmaf(pu[w4], vv[u].w, acc[4 * w4 + 3]);
                }
            }
        }
        if (splits == 1) {
            write(item, acc);
        } else {
#pragma unroll
            for (int u = 0; u < 16; ++u) sums[w * 16 + u] = acc[u];
        }
    }
    if (splits > 1) {
        __syncthreads();
        for (int item = threadIdx.x; item < items; item += blockDim.x) {
            float acc[16];
#pragma unroll
            for (int u = 0; u < 16; ++u) acc[u] = sums[item * 16 + u];
            for (int part = 1; part < splits; ++part)
#pragma unroll
                for (int u = 0; u < 16; ++u) acc[u] += sums[(part * items + item) * 16 + u];
            write(item, acc);
        }
    }
    for (int h = threadIdx.x; h < g; h += blockDim.x) {
        float* rec = partial + (((long long)t * heads + h0 + h) * chunks + c) * (d + 2);
        rec[d] = stats[2 * h];
        rec[d + 1] = stats[2 * h + 1];
    }
}

#define ATTENTION_SPLIT(G)                                                                                        \
    extern "C" __global__ void __launch_bounds__(SPLIT_THREADS, 2)                                                \
        attention_split_g##G(const float* q, const float* k, const float* v, int heads, int kv_heads, int d,      \
                             int pos0, int chunk, int chunks, float scale, float* partial) {                      \
        attention_split<G>(q, k, v, heads, kv_heads, d, pos0, chunk, chunks, scale, partial);                     \
    }
ATTENTION_SPLIT(4)
ATTENTION_SPLIT(8)
ATTENTION_SPLIT(16)
ATTENTION_SPLIT(32)

// out row (t, h) from its chunks' partial results: weights exp(m_c - M) with M the largest
// chunk max (a chunk past the query's position has m = -inf and weight 0). Block (row, y)
// takes columns [32 y, 32 y + 32), an eighth of the chunks per 32 threads, summed in order:
// many blocks and short chains of loads, since a long context has hundreds of chunks.
// Shared memory: one float per chunk.
#define COMBINE_COLUMNS 32
extern "C" __global__ void attention_combine(const float* partial, int d, int chunks, float* out) {
    extern __shared__ float weights[];
    __shared__ float scratch[32];
    __shared__ float sums[256];
    const float* p = partial + (long long)blockIdx.x * chunks * (d + 2);
    float m = NEG_INF;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) m = fmaxf(m, p[(long long)c * (d + 2) + d]);
    m = block_max(m, scratch);
    float l = 0.0f;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        const float* rec = p + (long long)c * (d + 2);
        float w = rec[d + 1] > 0.0f ? expf(rec[d] - m) : 0.0f;
        weights[c] = w;
        l += w * rec[d + 1];
    }
    float inv = 1.0f / block_sum(l, scratch);
    int i = blockIdx.y * COMBINE_COLUMNS + threadIdx.x % COMBINE_COLUMNS;
    int part = threadIdx.x / COMBINE_COLUMNS, parts = blockDim.x / COMBINE_COLUMNS;
    float acc = 0.0f;
    if (i < d)
#pragma unroll 8
        for (int c = part; c < chunks; c += parts) acc += weights[c] * p[(long long)c * (d + 2) + i];
    sums[threadIdx.x] = acc;
    __syncthreads();
    if (part == 0 && i < d) {
        for (int u = 1; u < parts; ++u) acc += sums[u * COMBINE_COLUMNS + threadIdx.x];
        out[(long long)blockIdx.x * d + i] = acc * inv;
    }
}

// Row (h, t) of scores (`rows` query rows per head, `cap` keys each, already scaled) into
// attention weights: softmax over the keys up to the query's position pos0 + t, zero past it
// (the products that follow take every one of the `cap` keys).
extern "C" __global__ void attention_softmax(float* scores, int rows, int pos0, int cap) {
    __shared__ float scratch[32];
    int t = blockIdx.x % rows;
    int len = min(pos0 + t + 1, cap);
    float* p = scores + (long long)blockIdx.x * cap;
    float m = NEG_INF;
    for (int j = threadIdx.x; j < len; j += blockDim.x) m = fmaxf(m, p[j]);
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < len; j += blockDim.x) sum += expf(p[j] - m);
    float inv = 1.0f / block_sum(sum, scratch);
    for (int j = threadIdx.x; j < cap; j += blockDim.x) p[j] = j < len ? expf(p[j] - m) * inv : 0.0f;
}

extern "C" __global__ void attention_values(float* scores, const float* v, int heads, int kv_heads, int d, int pos0,
                                            int keys_cap, float* out) {
    __shared__ float scratch[32];
    int t = blockIdx.x / heads, h = blockIdx.x % heads;
    int kv = h / (heads / kv_heads);
    int len = pos0 + t + 1;
    float* p = scores + (long long)blockIdx.x * keys_cap;
    float m = NEG_INF;
    for (int j = threadIdx.x; j < len; j += blockDim.x) m = fmaxf(m, p[j]);
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        float e = expf(p[j] - m);
        p[j] = e;
        sum += e;
    }
    sum = block_sum(sum, scratch);
    __syncthreads();
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < len; ++j) acc += p[j] * v[((long long)j * kv_heads + kv) * d + i];
        out[((long long)t * heads + h) * d + i] = acc / sum;
    }
}

// ---------------------------------------------------------------------------------------
// Prompt attention on the tensor cores (flash attention): per KV head, blocks of FA_ROWS
// rows (query, head of the group) walk the keys in tiles of FA_KEYS with an online softmax,
// so that no scores reach memory and the causal tiles past a block's last query are never
// read. The operands are f32 split into two 16-bit limbs (x = hi + lo) by attention_limbs,
// and each product takes three MMAs (hi.hi + hi.lo + lo.hi), which keeps the result near
// f32: queries and keys as f16 limbs scaled by a power of two per row (the scores feed an
// exponential, so they get f16's longer mantissa, 2^-22 for the pair), the weights and
// values as bf16 limbs (2^-17; any value's range, no scaling needed).

// A block's 8 warps take its rows 16 at a time, in two halves of each tile's keys: each warp
// keeps its own running softmax and output, and the halves merge at the end. (Four warps
// taking whole tiles ran as fast, but spilled registers at a head dim of 256.)
#define FA_WARPS 8
#define FA_ROWS 64
#define FA_KEYS 32
#define FA_WARP_KEYS 16

__device__ __forceinline__ u16 f32_to_f16(float v) {
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(v));
    return r;
}

__device__ __forceinline__ u16 f32_to_bf16(float v) {
    u16 r = 0;
#if __CUDA_ARCH__ >= 800
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(v));
#endif
    return r;
}

// Row r of head h of x (rows of `heads * d` floats) as two limbs, hi[d] then lo[d], at
// limb row (h / group, r, h % group) of `rows * group` rows per KV head. f16 limbs are of
// the row scaled into [2^14, 2^15), and `scales` gets `extra` over that factor.
extern "C" __global__ void attention_limbs(const float* x, int rows, int heads, int group, int d, int as_f16,
                                           float extra, u16* limbs, float* scales) {
    __shared__ float scratch[32];
    int r = blockIdx.x / heads, h = blockIdx.x % heads;
    const float* src = x + ((long long)r * heads + h) * d;
    long long out_row = ((long long)(h / group) * rows + r) * group + h % group;
    u16* dst = limbs + out_row * 2 * d;
    float f = 1.0f;
    if (as_f16) {
        float m = 0.0f;
        for (int i = threadIdx.x; i < d; i += blockDim.x) m = fmaxf(m, fabsf(src[i]));
        m = block_max(m, scratch);
        int e = m > 0.0f ? max(ilogbf(m), -100) : 0;
        f = ldexpf(1.0f, 14 - e);
        if (threadIdx.x == 0) scales[out_row] = ldexpf(extra, e - 14);
    }
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = src[i] * f;
        u16 hi, lo;
        if (as_f16) {
            hi = f32_to_f16(v);
            lo = f32_to_f16(v - f16_to_f32(hi));
        } else {
            hi = f32_to_bf16(v);
            lo = f32_to_bf16(v - bf16_to_f32(hi));
        }
        dst[i] = hi;
        dst[d + i] = lo;
    }
}

// d += a . b on the tensor cores (m16n8k16, bf16 in, f32 accumulate).
__device__ __forceinline__ void mma_bf16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Four 8x8 matrices of 16-bit values from shared memory: lane l gives the address of row
// l % 8 of matrix l / 8 and gets, of each matrix, row l / 4 (columns 2 (l % 4), +1), or with
// TRANS column l / 4 (rows 2 (l % 4), +1).
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const u16* p) {
#if __CUDA_ARCH__ >= 800
    u32 a = (u32)__cvta_generic_to_shared(p);
    if constexpr (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
#endif
}

// Halves per limb row (hi, lo, then 16 bytes that keep ldmatrix's eight rows on distinct banks).
template <int D>
__device__ constexpr int fa_stride() {
    return 2 * D + 8;
}

// Copies the limb rows of keys and values k0.. of a tile, and the keys' scales, into `stage`.
// Each thread takes one 16-byte column of every (32 FA_WARPS / (D / 4))-th row, so that its
// copies differ by constant offsets (the index arithmetic per copy once cost more
// instructions than the tile's MMAs).
template <int D>
__device__ __forceinline__ void fa_load_tile(u16* stage, const u16* kl, const float* ks, const u16* vl, int k0,
                                             int keys) {
    constexpr int S = fa_stride<D>(), CHUNKS = 2 * D / 8, PASS = 32 * FA_WARPS / CHUNKS;
    static_assert(PASS >= 1 && FA_KEYS % PASS == 0, "a pass covers whole rows of the tile");
    int r = threadIdx.x / CHUNKS, c = (threadIdx.x % CHUNKS) * 8;
    const u16* k_src = kl + (long long)(k0 + r) * 2 * D + c;
    const u16* v_src = vl + (long long)(k0 + r) * 2 * D + c;
    u16* dst = stage + r * S + c;
#pragma unroll
    for (int p = 0; p < FA_KEYS / PASS; ++p) {
        bool valid = k0 + r + p * PASS < keys;
        cp_async<16>(dst + p * PASS * S, valid ? k_src + p * PASS * 2 * D : kl, valid);
        cp_async<16>(dst + (FA_KEYS + p * PASS) * S, valid ? v_src + p * PASS * 2 * D : vl, valid);
    }
    float* sc = (float*)(stage + 2 * FA_KEYS * S);
    if (threadIdx.x < FA_KEYS) {
        bool valid = k0 + threadIdx.x < keys;
        cp_async<4>(sc + threadIdx.x, valid ? ks + k0 + threadIdx.x : ks, valid);
    }
}

// One warp's 16 rows against its 16 keys of a tile: the raw scores into s.
template <int D>
__device__ __forceinline__ void fa_scores(const u16* qw, const u16* kt, int lane, float (&s)[2][4]) {
    constexpr int S = fa_stride<D>();
    float sx[2][4] = {};
    const u16* qa = qw + ((lane & 7) + ((lane >> 3) & 1) * 8) * S + (lane >> 4) * 8;
    const u16* kb = kt + ((lane >> 4) * 8 + (lane & 7)) * S + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        u32 qh[4], ql[4], kh[4], klo[4];
        ldmatrix_x4<false>(qh, qa + kk * 16);
        ldmatrix_x4<false>(ql, qa + kk * 16 + D);
        ldmatrix_x4<false>(kh, kb + kk * 16);
        ldmatrix_x4<false>(klo, kb + kk * 16 + D);
        mma_f16(s[0], qh, kh[0], kh[1]);
        mma_f16(s[1], qh, kh[2], kh[3]);
        mma_f16(sx[0], qh, klo[0], klo[1]);
        mma_f16(sx[1], qh, klo[2], klo[3]);
        mma_f16(sx[0], ql, kh[0], kh[1]);
        mma_f16(sx[1], ql, kh[2], kh[3]);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] += sx[j][e];
}

// o += p . v for one warp: p (16 rows by its 16 keys, in the layout of the scores) as bf16
// limbs, v's limb rows from the tile.
template <int D>
__device__ __forceinline__ void fa_values(const float (&p)[2][4], const u16* vt, int lane, float (&o)[D / 8][4]) {
    constexpr int S = fa_stride<D>();
    const u16* vb = vt + (((lane >> 3) & 1) * 8 + (lane & 7)) * S + (lane >> 4) * 8;
    u32 ph[4], pl[4];
    limb_pair<true>(p[0][0], p[0][1], ph[0], pl[0]);
    limb_pair<true>(p[0][2], p[0][3], ph[1], pl[1]);
    limb_pair<true>(p[1][0], p[1][1], ph[2], pl[2]);
    limb_pair<true>(p[1][2], p[1][3], ph[3], pl[3]);
#pragma unroll
    for (int np = 0; np < D / 16; ++np) {
        u32 vh[4], vlo[4];
        ldmatrix_x4<true>(vh, vb + np * 16);
        ldmatrix_x4<true>(vlo, vb + np * 16 + D);
        mma_bf16(o[2 * np], ph, vh[0], vh[1]);
        mma_bf16(o[2 * np + 1], ph, vh[2], vh[3]);
        mma_bf16(o[2 * np], ph, vlo[0], vlo[1]);
        mma_bf16(o[2 * np + 1], ph, vlo[2], vlo[3]);
        mma_bf16(o[2 * np], pl, vh[0], vh[1]);
        mma_bf16(o[2 * np + 1], pl, vh[2], vh[3]);
    }
}

// A warp's running softmax over its keys: the maximum (log2 units) and the sum of this
// lane's weights, for rows g and g + 8 of its 16.
struct RunningSoftmax {
    float max[2] = {NEG_INF, NEG_INF}, sum[2] = {0.0f, 0.0f};
};

// Folds a warp's scores s (already scaled and masked) into its running softmax and output,
// leaving the weights in s.
template <int D>
__device__ __forceinline__ void fa_softmax(float (&s)[2][4], RunningSoftmax& run, float (&o)[D / 8][4]) {
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float m = fmaxf(fmaxf(s[0][2 * h], s[0][2 * h + 1]), fmaxf(s[1][2 * h], s[1][2 * h + 1]));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
        m = fmaxf(fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2)), run.max[h]);
        // A row with no key seen yet (the warp's half of the first tile lies past it) keeps
        // its empty state: weights of zero against a maximum of 0.
        alpha[h] = m == NEG_INF ? 1.0f : exp2f(run.max[h] - m);
        run.max[h] = m;
        run.sum[h] *= alpha[h];
    }
    if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
        for (int n = 0; n < D / 8; ++n) o[n][0] *= alpha[0], o[n][1] *= alpha[0], o[n][2] *= alpha[1], o[n][3] *= alpha[1];
    }
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float m = run.max[e >> 1];
            s[j][e] = m == NEG_INF ? 0.0f : exp2f(s[j][e] - m);
            run.sum[e >> 1] += s[j][e];
        }
}

// Block (x, kv): rows of KV head kv's `queries * group` limb rows (query q, head g at row
// q group + g), the longest blocks first; keys and values of the first pos0 + queries
// positions. Query q sits at position pos0 + q and sees the keys up to it. The output is
// rows of `heads * D` floats, one per query.
template <int D>
__device__ void attention_flash(const u16* ql, const float* qs, const u16* kl, const float* ks, const u16* vl,
                                int queries, int group, int pos0, int heads, float* out) {
#if __CUDA_ARCH__ >= 800
    constexpr int S = fa_stride<D>(), CHUNKS = 2 * D / 8, STAGE = 2 * FA_KEYS * S + 2 * FA_KEYS;
    extern __shared__ uint4 smem_vec[];
    u16* qsm = (u16*)smem_vec;
    u16* stages = qsm + FA_ROWS * S;
    int kv = blockIdx.y, keys = pos0 + queries, m_rows = queries * group;
    int r0 = (gridDim.x - 1 - blockIdx.x) * FA_ROWS;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    // This warp's 16 rows (from r0 + 16 tile) and its half of each tile's keys.
    int tile_rows = warp & 3, half = warp >> 2;
    ql += (long long)kv * m_rows * 2 * D;
    qs += (long long)kv * m_rows;
    kl += (long long)kv * keys * 2 * D;
    ks += (long long)kv * keys;
    vl += (long long)kv * keys * 2 * D;
    int tiles = (pos0 + (min(r0 + FA_ROWS, m_rows) - 1) / group + 1 + FA_KEYS - 1) / FA_KEYS;
    for (int i = threadIdx.x; i < FA_ROWS * CHUNKS; i += blockDim.x) {
        int r = i / CHUNKS, c = i % CHUNKS;
        bool valid = r0 + r < m_rows;
        cp_async<16>(qsm + r * S + c * 8, ql + (long long)(valid ? r0 + r : 0) * 2 * D + c * 8, valid);
    }
    fa_load_tile<D>(stages, kl, ks, vl, 0, keys);
    cp_async_commit();
    // This lane's rows (a: g, b: g + 8 of the warp's 16), the last key each sees, its scale.
    int row_a = r0 + tile_rows * 16 + g, row_b = row_a + 8;
    int last_a = pos0 + row_a / group, last_b = pos0 + row_b / group;
    float scale_a = row_a < m_rows ? qs[row_a] : 0.0f, scale_b = row_b < m_rows ? qs[row_b] : 0.0f;
    int warp_first = min(r0 + tile_rows * 16, m_rows - 1), warp_last = min(r0 + tile_rows * 16 + 15, m_rows - 1);
    int warp_keys = pos0 + warp_last / group + 1, warp_min_last = pos0 + warp_first / group;
    bool busy = r0 + tile_rows * 16 < m_rows;
    float o[D / 8][4] = {};
    RunningSoftmax run;
    for (int tile = 0; tile < tiles; ++tile) {
        if (tile + 1 < tiles) fa_load_tile<D>(stages + ((tile + 1) & 1) * STAGE, kl, ks, vl, (tile + 1) * FA_KEYS, keys);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const u16* kt = stages + (tile & 1) * STAGE + half * FA_WARP_KEYS * S;
        const float* kscale = (const float*)(stages + (tile & 1) * STAGE + 2 * FA_KEYS * S) + half * FA_WARP_KEYS;
        int k0 = tile * FA_KEYS + half * FA_WARP_KEYS;
        if (busy && k0 < warp_keys) {
            float s[2][4] = {};
            fa_scores<D>(qsm + tile_rows * 16 * S, kt, lane, s);
            bool edge = k0 + FA_WARP_KEYS - 1 > warp_min_last;
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    int c = 8 * j + 2 * t + (e & 1);
                    s[j][e] *= (e < 2 ? scale_a : scale_b) * kscale[c];
                    if (edge && k0 + c > (e < 2 ? last_a : last_b)) s[j][e] = NEG_INF;
                }
            fa_softmax<D>(s, run, o);
            fa_values<D>(s, kt + FA_KEYS * S, lane, o);
        }
        __syncthreads();  // every warp is done with the buffer the next tile's load refills
    }
    cp_async_wait<0>();
    __syncthreads();
    // The second half's warps hand their state to the first's (in the stages' room: per
    // value, the block's 128 lanes side by side), which merge and store.
    float* merge = (float*)stages;
    int slot = tile_rows * 32 + lane;
    constexpr int SLOTS = 4 * 32;
    if (half == 1) {
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) merge[(n * 4 + e) * SLOTS + slot] = o[n][e];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            merge[(D / 2 + h) * SLOTS + slot] = run.max[h];
            merge[(D / 2 + 2 + h) * SLOTS + slot] = run.sum[h];
        }
    }
    __syncthreads();
    if (half == 1 || !busy) return;
    float keep[2], take[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float other_max = merge[(D / 2 + h) * SLOTS + slot], other_sum = merge[(D / 2 + 2 + h) * SLOTS + slot];
        float m = fmaxf(run.max[h], other_max);  // finite: the first half of tile 0 holds key 0
        keep[h] = exp2f(run.max[h] - m);
        take[h] = other_max == NEG_INF ? 0.0f : exp2f(other_max - m);
        run.sum[h] = run.sum[h] * keep[h] + other_sum * take[h];
        run.sum[h] += __shfl_xor_sync(0xffffffffu, run.sum[h], 1);
        run.sum[h] += __shfl_xor_sync(0xffffffffu, run.sum[h], 2);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        int row = h ? row_b : row_a;
        if (row >= m_rows) continue;
        float inv = 1.0f / run.sum[h];
        float* dst = out + ((long long)(row / group) * heads + kv * group + row % group) * D + 2 * t;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            float x = o[n][2 * h] * keep[h] + merge[(n * 4 + 2 * h) * SLOTS + slot] * take[h];
            float y = o[n][2 * h + 1] * keep[h] + merge[(n * 4 + 2 * h + 1) * SLOTS + slot] * take[h];
            *(float2*)(dst + 8 * n) = make_float2(x * inv, y * inv);
        }
    }
#endif
}

#define ATTENTION_FLASH(D)                                                                                       \
    extern "C" __global__ void __launch_bounds__(32 * FA_WARPS, 1)                                               \
        attention_flash_d##D(const u16* ql, const float* qs, const u16* kl, const float* ks, const u16* vl,       \
                             int queries, int group, int pos0, int heads, float* out) {                           \
        attention_flash<D>(ql, qs, kl, ks, vl, queries, group, pos0, heads, out);                                 \
    }
ATTENTION_FLASH(32)
ATTENTION_FLASH(64)
ATTENTION_FLASH(128)
ATTENTION_FLASH(256)

// Decode attention on the tensor cores (compute capability 8.0 and later; up to 16 query
// heads per KV head, head dims of 64, 128 or 256), with the same blocks and partial results
// as attention_split. f32 operands go in as pairs of tf32 (hi: a float's top 19 bits, lo: the
// rest, truncated again), three MMAs per product (hi.hi + hi.lo + lo.hi): about 2^-20 per
// element, near f32, without a limb copy of the cache. A block's keys come in tiles of 32
// through a ring of three stages of cp.async (two tiles in flight while one is computed: the
// kernel is bound by the cache's bytes). Per tile each of the 8 warps takes the scores of 8
// keys over half the dims for the group's heads padded to 16 (S = Q Kᵀ), all warps fold the
// tile's scores into the same running softmax, and each warp takes half the keys' values for
// a quarter of the output's columns (Oᵀ += Vᵀ Pᵀ). The MMAs' k index runs over head dims and
// keys in an order chosen so that a lane's operands are adjacent floats (16- and 8-byte
// loads from shared memory). 8 warps rather than 4 (one block per multiprocessor at heads of
// 256): 7-9% faster on an H200 (docs/perf.md).
#define DT_WARPS 8
#define DT_KEYS 32
#define DT_STAGES 3
#define DT_SCORE_STRIDE (DT_KEYS + 8)  // floats per head row of a tile's scores: no bank conflicts

// Floats per key row of a stage: keys padded by 16 floats, values by 4, which keeps the
// loads of the scores' and of the values' fragments free of bank conflicts.
template <int D>
__device__ constexpr int dt_key_stride() {
    return D + 16;
}
template <int D>
__device__ constexpr int dt_value_stride() {
    return D + 4;
}
template <int D>
__device__ constexpr int dt_stage_floats() {
    return DT_KEYS * (dt_key_stride<D>() + dt_value_stride<D>());
}

// x as hi + lo, both tf32 (the tensor cores read a register's top 19 bits).
__device__ __forceinline__ void tf32_pair(float x, u32& hi, u32& lo) {
    hi = __float_as_uint(x) & 0xffffe000u;
    lo = __float_as_uint(x - __uint_as_float(hi)) & 0xffffe000u;
}

// d += a . b on the tensor cores (m16n8k8, tf32 in, f32 accumulate).
__device__ __forceinline__ void mma_tf32(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// a . b for f32 fragments (as tf32 pairs, three MMAs): the large term into d, the small ones
// into e.
__device__ __forceinline__ void mma_f32x3(float (&d)[4], float (&e)[4], const float (&a)[4], float b0, float b1) {
    u32 ah[4], al[4], bh0, bl0, bh1, bl1;
#pragma unroll
    for (int i = 0; i < 4; ++i) tf32_pair(a[i], ah[i], al[i]);
    tf32_pair(b0, bh0, bl0);
    tf32_pair(b1, bh1, bl1);
    mma_tf32(d, ah, bh0, bh1);
    mma_tf32(e, ah, bl0, bl1);
    mma_tf32(e, al, bh0, bh1);
}

// Keys and values k0.. of a tile (`keys` of the chunk's valid) into a stage: each thread takes
// one 16-byte column of every (128 / (D / 4))-th row, so that its copies differ by constant
// offsets.
template <int D>
__device__ __forceinline__ void dt_load_tile(float* stage, const float* kc, const float* vc, long long stride, int k0,
                                             int keys) {
    constexpr int CHUNKS = D / 4, PASS = 32 * DT_WARPS / CHUNKS;
    static_assert(PASS >= 1 && DT_KEYS % PASS == 0, "a pass covers whole rows of the tile");
    int r = threadIdx.x / CHUNKS, c = (threadIdx.x % CHUNKS) * 4;
    float* kd = stage + r * dt_key_stride<D>() + c;
    float* vd = stage + DT_KEYS * dt_key_stride<D>() + r * dt_value_stride<D>() + c;
    const float* ks = kc + (k0 + r) * stride + c;
    const float* vs = vc + (k0 + r) * stride + c;
#pragma unroll
    for (int p = 0; p < DT_KEYS / PASS; ++p) {
        bool valid = k0 + r + p * PASS < keys;
        cp_async<16>(kd + p * PASS * dt_key_stride<D>(), valid ? ks + p * PASS * stride : kc, valid);
        cp_async<16>(vd + p * PASS * dt_value_stride<D>(), valid ? vs + p * PASS * stride : vc, valid);
    }
}

// One warp's part of the scores: its 8 keys of a tile (rows of kt, from its half of the
// dims) against the 16 heads, as S fragments (heads gi, gi + 8; keys 2t, 2t + 1). q: this
// lane's dims 16p + 4t .. +3 of the half, heads gi and gi + 8, already scaled.
template <int D>
__device__ __forceinline__ void dt_scores(const float* kt, const float (&q)[D / 32][2][4], float (&s)[4]) {
    int lane = threadIdx.x & 31, gi = lane >> 2, t = lane & 3;
    const float* row = kt + gi * dt_key_stride<D>() + 4 * t;
    float sx[4] = {};
#pragma unroll
    for (int p = 0; p < D / 32; ++p) {
        float4 k = *reinterpret_cast<const float4*>(row + 16 * p);
        float x[2][4];
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                x[h][e] = q[p][h][e];
                // Opaque to the compiler, so that the queries' tf32 pairs are made here for
                // each tile rather than kept for all tiles (twice the registers).
                asm volatile("" : "+f"(x[h][e]));
            }
        mma_f32x3(s, sx, {x[0][0], x[1][0], x[0][1], x[1][1]}, k.x, k.y);
        mma_f32x3(s, sx, {x[0][2], x[1][2], x[0][3], x[1][3]}, k.z, k.w);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) s[e] += sx[e];
}

// Folds a tile's scores (the two halves' sums: 16 head rows of DT_SCORE_STRIDE each) into
// the running softmax of heads gi and gi + 8 (every warp keeps the same maximum, and the sum
// of its own keys' weights), leaving this lane's weights of the keys in its half kh in w:
// keys 8j + 2t and 8j + 2t + 1 (j = 2 kh + jj) of head 8h + gi at w[h][jj][0..1]. Returns the
// factors for the output's heads 2t, 2t + 1, 8 + 2t, 9 + 2t.
__device__ __forceinline__ float4 dt_softmax(const float* st, int kh, RunningSoftmax& run, float (&w)[2][2][2]) {
    int lane = threadIdx.x & 31, gi = lane >> 2, t = lane & 3;
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const float* row = st + (8 * h + gi) * DT_SCORE_STRIDE + 2 * t;
        float x[DT_KEYS / 8][2], m = NEG_INF;
#pragma unroll
        for (int j = 0; j < DT_KEYS / 8; ++j) {
            float2 a = *reinterpret_cast<const float2*>(row + 8 * j);
            float2 b = *reinterpret_cast<const float2*>(row + 16 * DT_SCORE_STRIDE + 8 * j);
            x[j][0] = a.x + b.x, x[j][1] = a.y + b.y;
            m = fmaxf(m, fmaxf(x[j][0], x[j][1]));
        }
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
        m = fmaxf(fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2)), run.max[h]);
        // m is finite: a tile's first key is always one the query sees.
        alpha[h] = exp2f(run.max[h] - m);
        run.max[h] = m;
        run.sum[h] *= alpha[h];
#pragma unroll
        for (int jj = 0; jj < 2; ++jj)
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                w[h][jj][u] = exp2f((kh ? x[2 + jj][u] : x[jj][u]) - m);
                run.sum[h] += w[h][jj][u];
            }
    }
    // Head 2t's factor lives in lane 8t (gi = 2t), head 2t + 1's in lane 8t + 4.
    return make_float4(__shfl_sync(0xffffffffu, alpha[0], 8 * t), __shfl_sync(0xffffffffu, alpha[0], 8 * t + 4),
                       __shfl_sync(0xffffffffu, alpha[1], 8 * t), __shfl_sync(0xffffffffu, alpha[1], 8 * t + 4));
}

// Up to four adjacent floats from shared memory.
template <int N>
__device__ __forceinline__ void dt_floats(const float* p, float (&x)[N]) {
    if constexpr (N == 4) {
        float4 v = *reinterpret_cast<const float4*>(p);
        x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
    } else if constexpr (N == 2) {
        float2 v = *reinterpret_cast<const float2*>(p);
        x[0] = v.x, x[1] = v.y;
    } else {
        x[0] = *p;
    }
}

// o += (this warp's columns of its half of the tile's values)ᵀ . weightsᵀ: column tile c of
// the warp's MT holds columns MT r + c of its quarter (r: the MMA row), so that a lane's
// values of the MT tiles are adjacent. vt: the half's first value row at the warp's first
// column.
template <int D>
__device__ __forceinline__ void dt_values(const float* vt, const float (&w)[2][2][2], float (&o)[D / 64][2][4]) {
    constexpr int MT = D / 64, S = dt_value_stride<D>();
    int lane = threadIdx.x & 31, gi = lane >> 2, t = lane & 3;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const float* r0 = vt + (8 * j + 2 * t) * S;  // keys 8j + 2t and the next
        float a[MT], b[MT], c[MT], d[MT];
        dt_floats<MT>(r0 + MT * gi, a);
        dt_floats<MT>(r0 + MT * (gi + 8), b);
        dt_floats<MT>(r0 + S + MT * gi, c);
        dt_floats<MT>(r0 + S + MT * (gi + 8), d);
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
            for (int h = 0; h < 2; ++h) mma_f32x3(o[m][h], o[m][h], {a[m], b[m], c[m], d[m]}, w[h][j][0], w[h][j][1]);
    }
}

// Blocks per multiprocessor of attention_decode<D>, by its shared memory and registers.
#define DT_MIN_BLOCKS(D) ((D) >= 256 ? 1 : (D) >= 128 ? 2 : 3)

// Block (t, kv, c) as in attention_split (g <= 16 query heads per KV head, head dim D; the
// kernels take attention_split's parameters, d = D). Warp w takes the scores of keys
// 8 (w % 4).. of each tile over half kh = w / 4 of the dims, and the values of half kh of the
// tile's keys for quarter w % 4 of the columns: the two halves' outputs add up at the end (all
// warps keep the same maximum). Shared memory: DT_STAGES stages of key and value rows, then
// the two halves' scores of a tile.
template <int D>
__device__ void attention_decode(const float* q, const float* k, const float* v, int heads, int kv_heads, int pos0,
                                 int chunk, int chunks, float scale, float* partial) {
#if __CUDA_ARCH__ >= 800
    constexpr int MT = D / 64;
    extern __shared__ float4 decode_smem[];
    float* stages = reinterpret_cast<float*>(decode_smem);
    float* scores = stages + DT_STAGES * dt_stage_floats<D>();
    const int g = heads / kv_heads;
    int c = blockIdx.x % chunks, kv = (blockIdx.x / chunks) % kv_heads, tq = blockIdx.x / (chunks * kv_heads);
    int h0 = kv * g, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gi = lane >> 2, t = lane & 3;
    int quarter = warp & 3, kh = warp >> 2;
    long long stride = (long long)kv_heads * D;
    int j0 = c * chunk, n = max(min(j0 + chunk, pos0 + tq + 1) - j0, 0), tiles = (n + DT_KEYS - 1) / DT_KEYS;
    const float* kc = k + (long long)j0 * stride + (long long)kv * D;
    const float* vc = v + (long long)j0 * stride + (long long)kv * D;
#pragma unroll
    for (int s = 0; s < DT_STAGES - 1; ++s) {
        if (s < tiles) dt_load_tile<D>(stages + s * dt_stage_floats<D>(), kc, vc, stride, s * DT_KEYS, n);
        cp_async_commit();
    }
    // This lane's query values (heads gi and gi + 8, dims 16p + 4t .. +3 of half kh), scaled
    // by log2(e) / sqrt(D): the softmax is in powers of two.
    float qr[D / 32][2][4];
    const float* qb = q + ((long long)tq * heads + h0) * D + kh * (D / 2) + 4 * t;
    scale *= 1.4426950408889634f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        bool real = 8 * h + gi < g;
#pragma unroll
        for (int p = 0; p < D / 32; ++p) {
            float4 x = real ? *reinterpret_cast<const float4*>(qb + (8 * h + gi) * D + 16 * p)
                            : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            qr[p][h][0] = x.x * scale, qr[p][h][1] = x.y * scale, qr[p][h][2] = x.z * scale, qr[p][h][3] = x.w * scale;
        }
    }
    float o[MT][2][4] = {};
    RunningSoftmax run;
    for (int tile = 0; tile < tiles; ++tile) {
        cp_async_wait<DT_STAGES - 2>();
        __syncthreads();  // the tile is in; every warp is done with the last one and its scores
        if (tile + DT_STAGES - 1 < tiles)
            dt_load_tile<D>(stages + (tile + DT_STAGES - 1) % DT_STAGES * dt_stage_floats<D>(), kc, vc, stride,
                            (tile + DT_STAGES - 1) * DT_KEYS, n);
        cp_async_commit();
        const float* stage = stages + tile % DT_STAGES * dt_stage_floats<D>();
        int k0 = tile * DT_KEYS;
        float s[4] = {};
        dt_scores<D>(stage + 8 * quarter * dt_key_stride<D>() + kh * (D / 2), qr, s);
        int key = 8 * quarter + 2 * t;
        bool v0 = k0 + key < n, v1 = k0 + key + 1 < n;
        float* st = scores + kh * 16 * DT_SCORE_STRIDE;
        *reinterpret_cast<float2*>(st + gi * DT_SCORE_STRIDE + key) = make_float2(v0 ? s[0] : NEG_INF, v1 ? s[1] : NEG_INF);
        *reinterpret_cast<float2*>(st + (gi + 8) * DT_SCORE_STRIDE + key) =
            make_float2(v0 ? s[2] : NEG_INF, v1 ? s[3] : NEG_INF);
        __syncthreads();
        float w[2][2][2];
        float4 alpha = dt_softmax(scores, kh, run, w);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            o[m][0][0] *= alpha.x, o[m][0][1] *= alpha.y, o[m][0][2] *= alpha.x, o[m][0][3] *= alpha.y;
            o[m][1][0] *= alpha.z, o[m][1][1] *= alpha.w, o[m][1][2] *= alpha.z, o[m][1][3] *= alpha.w;
        }
        dt_values<D>(stage + DT_KEYS * dt_key_stride<D>() + kh * 16 * dt_value_stride<D>() + quarter * (D / 4), w, o);
    }
    cp_async_wait<0>();
    __syncthreads();
    // The second half's warps hand their outputs and sums to the first's (in the stages'
    // room: per value, the 128 lanes side by side).
    float* merge = stages;
    int slot = quarter * 32 + lane;
    if (kh == 1) {
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int e = 0; e < 4; ++e) merge[((m * 2 + h) * 4 + e) * 128 + slot] = o[m][h][e];
        merge[(MT * 8) * 128 + slot] = run.sum[0];
        merge[(MT * 8 + 1) * 128 + slot] = run.sum[1];
    }
    __syncthreads();
    if (kh == 1) return;
    auto record = [&](int head) { return partial + (((long long)tq * heads + h0 + head) * chunks + c) * (D + 2); };
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int head = 8 * h + 2 * t + (e & 1), col = quarter * (D / 4) + MT * (gi + 8 * (e >> 1)) + m;
                if (head < g) record(head)[col] = o[m][h][e] + merge[((m * 2 + h) * 4 + e) * 128 + slot];
            }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float sum = run.sum[h] + merge[(MT * 8 + h) * 128 + slot];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        int head = 8 * h + gi;
        if (warp == 0 && t == 0 && head < g) {
            // attention_combine takes the maximum in natural-log units.
            record(head)[D] = run.max[h] * 0.6931471805599453f;
            record(head)[D + 1] = sum;
        }
    }
#endif
}

#define ATTENTION_DECODE(D)                                                                                      \
    extern "C" __global__ void __launch_bounds__(32 * DT_WARPS, DT_MIN_BLOCKS(D))                                \
        attention_decode_d##D(const float* q, const float* k, const float* v, int heads, int kv_heads, int d,     \
                              int pos0, int chunk, int chunks, float scale, float* partial) {                     \
        attention_decode<D>(q, k, v, heads, kv_heads, pos0, chunk, chunks, scale, partial);                       \
    }
ATTENTION_DECODE(64)
ATTENTION_DECODE(128)
ATTENTION_DECODE(256)

// ---------------------------------------------------------------------------------------
// Gated DeltaNet.

// Causal depthwise convolution with SiLU over [state rows | x rows] (the state holds the
// previous kernel - 1 input rows, [kernel - 1, C]), and the state moved on to the last
// kernel - 1 inputs, in one pass: one thread per channel walks the rows with the window in
// registers (kernel <= CONV_KERNEL_MAX).
#define CONV_KERNEL_MAX 8
extern "C" __global__ void causal_conv1d_silu(const float* x, const float* w, float* state, int rows, int c,
                                              int kernel, float* out) {
    int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    int keep = kernel - 1;
    float taps[CONV_KERNEL_MAX], window[CONV_KERNEL_MAX];
#pragma unroll
    for (int j = 0; j < CONV_KERNEL_MAX; ++j) {
        taps[j] = j < kernel ? w[(long long)ch * kernel + j] : 0.0f;
        window[j] = j < keep ? state[(long long)j * c + ch] : 0.0f;
    }
    for (int t = 0; t < rows; ++t) {
        float v = x[(long long)t * c + ch];
        float acc = 0.0f;
#pragma unroll
        for (int j = 0; j < CONV_KERNEL_MAX - 1; ++j)
            if (j < keep) acc += taps[j] * window[j];
#pragma unroll
        for (int j = 0; j < CONV_KERNEL_MAX; ++j)
            if (j == keep) acc += taps[j] * v;
        out[(long long)t * c + ch] = siluf(acc);
#pragma unroll
        for (int j = 0; j < CONV_KERNEL_MAX - 1; ++j)
            if (j + 1 < keep) window[j] = window[j + 1];
            else if (j + 1 == keep) window[j] = v;
    }
#pragma unroll
    for (int j = 0; j < CONV_KERNEL_MAX - 1; ++j)
        if (j < keep) state[(long long)j * c + ch] = window[j];
}

// The same conv over a prompt: a thread per channel and CONV_ROWS consecutive rows, so that
// the grid covers rows as well as channels and each thread has its rows' loads in flight
// together (the kernel above walks every row of a channel in one thread, a round trip per row).
// Reads the state, does not move it: the caller copies the last kernel - 1 rows of x into it
// (rows >= kernel - 1), after this launch.
#define CONV_ROWS 16
extern "C" __global__ void causal_conv1d_silu_rows(const float* __restrict__ x, const float* __restrict__ w,
                                                   const float* __restrict__ state, int rows, int c, int kernel,
                                                   float* __restrict__ out) {
    int ch = blockIdx.x * blockDim.x + threadIdx.x;
    int t0 = blockIdx.y * CONV_ROWS;
    if (ch >= c) return;
    int keep = kernel - 1;
    // u[j] is input row t0 - keep + j: from x, or before the prompt from the state's rows.
    float taps[CONV_KERNEL_MAX], u[CONV_KERNEL_MAX - 1 + CONV_ROWS];
#pragma unroll
    for (int j = 0; j < CONV_KERNEL_MAX; ++j) taps[j] = j < kernel ? w[(long long)ch * kernel + j] : 0.0f;
#pragma unroll
    for (int j = 0; j < CONV_KERNEL_MAX - 1 + CONV_ROWS; ++j) {
        int t = t0 - keep + j;
        bool live = j < keep + CONV_ROWS && t < rows;
        u[j] = !live ? 0.0f : t >= 0 ? x[(long long)t * c + ch] : state[(long long)(keep + t) * c + ch];
    }
#pragma unroll
    for (int r = 0; r < CONV_ROWS; ++r) {
        if (t0 + r >= rows) break;
        float acc = 0.0f;
#pragma unroll
        for (int j = 0; j < CONV_KERNEL_MAX; ++j)
            if (j < kernel) acc += taps[j] * u[r + j];
        out[(long long)(t0 + r) * c + ch] = siluf(acc);
    }
}

#define DELTA_KEY_MAX 256
#define DELTA_ROWS_PER_WARP 16

// The gated delta rule. Per token: S *= exp(g); delta = (v - S^T k) * beta; S += k delta^T;
// o = S^T q, for each value head's state S [dk, dv] (dk <= 256).
// Grid: (value heads, blocks of 32 value columns); block: one warp per 16 key rows. Lane l of
// every warp owns column col0 + l, so each row of state a warp reads or writes is one
// coalesced 128-byte line; the sums over key rows are taken within each thread, then across
// the block's warps through shared memory.
extern "C" __global__ void gated_delta_rule(const float* qkv, const float* a, const float* b, const float* a_log,
                                            const float* dt_bias, float* state, int rows, int nk, int nv, int dk,
                                            int dv, float* out) {
    __shared__ float qs[DELTA_KEY_MAX], ks[DELTA_KEY_MAX];
    __shared__ float part[DELTA_KEY_MAX / DELTA_ROWS_PER_WARP][32];
    __shared__ float2 scratch2[32];
    int h = blockIdx.x;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int col = blockIdx.y * 32 + lane;
    bool live = col < dv;
    int row0 = warp * DELTA_ROWS_PER_WARP;
    int kh = h / (nv / nk);
    int key_dim = nk * dk, conv_dim = 2 * key_dim + nv * dv;
    float* S = state + (long long)h * dk * dv;
    float s[DELTA_ROWS_PER_WARP];
#pragma unroll
    for (int r = 0; r < DELTA_ROWS_PER_WARP; ++r) {
        int i = row0 + r;
        s[r] = (live && i < dk) ? S[(long long)i * dv + col] : 0.0f;
    }
    float q_scale = rsqrtf((float)dk);
    float A = expf(a_log[h]);
    // The block has at least 2 dk threads (one warp per 16 rows): thread i < dk loads q_i, k_i.
    int i = threadIdx.x;
    for (int t = 0; t < rows; ++t) {
        const float* row = qkv + (long long)t * conv_dim;
        // Every load of the token first, so that they travel together rather than one after
        // each barrier.
        float qv = i < dk ? row[kh * dk + i] : 0.0f;
        float kv = i < dk ? row[key_dim + kh * dk + i] : 0.0f;
        float v = live ? row[2 * key_dim + h * dv + col] : 0.0f;
        float av = a[(long long)t * nv + h] + dt_bias[h];
        float bv = b[(long long)t * nv + h];
        float2 sq = block_sum2(make_float2(qv * qv, kv * kv), scratch2);
        float qn = rsqrtf(sq.x + 1e-6f) * q_scale;
        float kn = rsqrtf(sq.y + 1e-6f);
        // Rows past dk (up to the last warp's 16) read zeros.
        if (i < warps * DELTA_ROWS_PER_WARP) {
            qs[i] = qv * qn;
            ks[i] = kv * kn;
        }
        float softplus = av > 20.0f ? av : log1pf(expf(av));
        float decay = expf(-A * softplus);
        float beta = sigmoidf(bv);
        __syncthreads();
        float read = 0.0f;
#pragma unroll
        for (int r = 0; r < DELTA_ROWS_PER_WARP; ++r) {
            s[r] *= decay;
            read += s[r] * ks[row0 + r];
        }
        part[warp][lane] = read;
        __syncthreads();
        read = 0.0f;
        for (int w = 0; w < warps; ++w) read += part[w][lane];
        float delta = (v - read) * beta;
        float o = 0.0f;
#pragma unroll
        for (int r = 0; r < DELTA_ROWS_PER_WARP; ++r) {
            s[r] += ks[row0 + r] * delta;
            o += s[r] * qs[row0 + r];
        }
        __syncthreads();  // every warp has read `part`
        part[warp][lane] = o;
        __syncthreads();
        if (warp == 0 && live) {
            o = 0.0f;
            for (int w = 0; w < warps; ++w) o += part[w][lane];
            out[(long long)t * nv * dv + h * dv + col] = o;
        }
        __syncthreads();  // before the next token rewrites qs, ks and part
    }
#pragma unroll
    for (int r = 0; r < DELTA_ROWS_PER_WARP; ++r) {
        int i = row0 + r;
        if (live && i < dk) S[(long long)i * dv + col] = s[r];
    }
}

// The gated delta rule over a prompt in chunks of DC tokens, as products of the chunk's rows
// (the CPU backend's `delta_chunks.rs` derives the form). Grid: (value heads, blocks of DCOLS
// value columns); DELTA_CHUNK_THREADS threads. The block keeps its columns of the head's state
// in shared memory. Keys and queries stay raw in shared memory (k^ = kn k, q^ = qn q): their
// norms scale the products instead. Per chunk, phases between barriers, each a function of
// the thread index:
//   products  the raw pairs k_t.k_j and q_t.k_j with the norms, a tile of eight pairs per
//             thread; S0^T k_t and S0^T q_t, a tile of two tokens by four columns per thread;
//             warp 0 the log decays' running sums G_t (a warp scan) and the strengths beta_t;
//   scale     gram = beta_t exp(G_t - G_j) k^_t.k^_j (j < t), score = exp(G_t - G_j) q^_t.k^_j
//             (j <= t), rk = exp(G_t) S0^T k^_t, rq = exp(G_t) S0^T q^_t, from the tiles the
//             same threads kept in registers;
//   solve     the deltas by forward substitution, a thread per column (warp 0);
//   finish    the outputs (four tokens by one column per thread) and the state
//             exp(G_last) S0 + sum_t exp(G_last - G_t) k^_t delta_t^T (four key rows by four
//             columns per thread).
// The next chunk's k, v, a and b are copied (cp.async) into the other of two buffers while
// this chunk computes, its q into the one q buffer once the products have read it.
#define DC 32  // tokens per chunk: one per lane of warp 0 in the scan and the solve
#define DCOLS 32
#define DELTA_CHUNK_THREADS 256  // DC rows of eight pair threads
#define DELTA_FLUSH_BELOW -40.0f

// exp(log_decay), or zero below exp(-40), as the CPU backend does: products of smaller decays
// with small values are subnormal, and what they scale is under f32 resolution.
__device__ __forceinline__ float chunk_decay(float log_decay) {
    return log_decay < DELTA_FLUSH_BELOW ? 0.0f : expf(log_decay);
}

// A chunk's keys, values, decay and strength inputs in shared memory (two sets: one computed
// on while the next chunk's are copied into the other).
struct ChunkInputs {
    float* ks;                      // [DC][dk + 4] raw keys
    float* vs;                      // [DC][DCOLS] values
    float *as, *bs;                 // [DC]
};

struct DeltaChunk {
    // Global inputs and outputs.
    const float *qkv, *a, *b;
    float* out;
    int rows, t0, n;                // the prompt's length; the chunk's first token and length (<= DC)
    int h, kh, col0, dk, dv, nv, key_dim, conv_dim;
    float A, dt_bias, q_scale;
    // Shared memory.
    float* S;                       // [dk][DCOLS] the block's columns of the state
    ChunkInputs in, next;           // this chunk's keys, values, a and b; the next chunk's
    float* qs;                      // [DC][dk + 4] raw queries
    float *gram, *score;            // [DC][DC + 1] weighted pairs
    float *dl, *rk, *rq;            // [DC][DCOLS] deltas; what S0 gives k^ and q^
    float *cum, *beta, *kn, *qn;    // [DC] G_t, strengths, norms
    float* to_end;                  // [DC] exp(G_last - G_t) kn_t
};
// (`delta_chunks_shared_bytes` in linear_attention.rs sizes this layout.)

__device__ __forceinline__ int delta_ks_stride(int dk) { return dk + 4; }
__device__ __forceinline__ float4 ld4(const float* p) { return *(const float4*)p; }

// Starts copying rows t0.. of the chunk's keys or queries (at `offset` in a row of qkv) into
// `dst`, zeros past the prompt.
__device__ void delta_chunk_fetch_rows(const DeltaChunk& c, int t0, float* dst, int offset, int tid) {
    int stride = delta_ks_stride(c.dk), quads = c.dk / 4;
    for (int e = tid; e < DC * quads; e += DELTA_CHUNK_THREADS) {
        int t = e / quads, i = e % quads * 4;
        bool live = t0 + t < c.rows;
        const float* row = c.qkv + (long long)(live ? t0 + t : 0) * c.conv_dim;
        cp_async<16>(dst + t * stride + i, row + offset + i, live);
    }
}

// Starts copying chunk t0's keys, values, decay and strength inputs into `in`.
__device__ void delta_chunk_fetch_kv(const DeltaChunk& c, int t0, const ChunkInputs& in, int tid) {
    delta_chunk_fetch_rows(c, t0, in.ks, c.key_dim + c.kh * c.dk, tid);
    for (int e = tid; e < DC * DCOLS / 4; e += DELTA_CHUNK_THREADS) {
        int t = e / (DCOLS / 4), col = e % (DCOLS / 4) * 4;
        bool live = t0 + t < c.rows && c.col0 + col < c.dv;
        const float* row = c.qkv + (long long)(live ? t0 + t : 0) * c.conv_dim + 2 * c.key_dim;
        cp_async<16>(in.vs + t * DCOLS + col, row + (live ? c.h * c.dv + c.col0 + col : 0), live);
    }
    if (tid < DC) {
        bool live = t0 + tid < c.rows;
        long long at = (long long)(live ? t0 + tid : 0) * c.nv + c.h;
        cp_async<4>(in.as + tid, c.a + at, live);
        cp_async<4>(in.bs + tid, c.b + at, live);
    }
}

// Warp 0, lane t: G_t, the running sum of the chunk's log decays (zero past its end), and
// beta_t.
__device__ void delta_chunk_decays(const DeltaChunk& c, int lane) {
    float av = c.in.as[lane] + c.dt_bias;
    float softplus = av > 20.0f ? av : log1pf(expf(av));
    float g = lane < c.n ? -c.A * softplus : 0.0f;
#pragma unroll
    for (int d = 1; d < DC; d <<= 1) {
        float up = __shfl_up_sync(0xffffffffu, g, d);
        if (lane >= d) g += up;
    }
    c.cum[lane] = g;
    c.beta[lane] = sigmoidf(c.in.bs[lane]);
}

// Thread (t, jg): the raw pairs k_t.k_j and q_t.k_j for j = jg + 8m, and |k_t|^2, |q_t|^2.
struct ChunkPairs {
    float kk[4], qk[4], k_sq, q_sq;
};

__device__ ChunkPairs delta_chunk_pairs(const DeltaChunk& c, int tid) {
    int stride = delta_ks_stride(c.dk), t = tid >> 3, jg = tid & 7;
    const float* k = c.in.ks;
    const float *kt = k + t * stride, *qt = c.qs + t * stride;
    ChunkPairs r = {};
    for (int i = 0; i < c.dk; i += 4) {
        float4 x = ld4(kt + i), q = ld4(qt + i);
        r.k_sq += x.x * x.x;
        r.k_sq += x.y * x.y;
        r.k_sq += x.z * x.z;
        r.k_sq += x.w * x.w;
        r.q_sq += q.x * q.x;
        r.q_sq += q.y * q.y;
        r.q_sq += q.z * q.z;
        r.q_sq += q.w * q.w;
#pragma unroll
        for (int m = 0; m < 4; ++m) {
            float4 y = ld4(k + (jg + 8 * m) * stride + i);
            r.kk[m] += x.x * y.x;
            r.kk[m] += x.y * y.y;
            r.kk[m] += x.z * y.z;
            r.kk[m] += x.w * y.w;
            r.qk[m] += q.x * y.x;
            r.qk[m] += q.y * y.y;
            r.qk[m] += q.z * y.z;
            r.qk[m] += q.w * y.w;
        }
    }
    return r;
}

// Thread (which, tg, cg): S0^T x for x the raw keys (which 0) or queries (1) of tokens 2tg and
// 2tg + 1, columns 4cg to 4cg + 3.
struct ChunkReads {
    float r[2][4];
};

__device__ __forceinline__ void add_scaled4(float* acc, float x, float4 s) {
    acc[0] += x * s.x;
    acc[1] += x * s.y;
    acc[2] += x * s.z;
    acc[3] += x * s.w;
}

__device__ ChunkReads delta_chunk_state_reads(const DeltaChunk& c, int tid) {
    int stride = delta_ks_stride(c.dk), which = tid >> 7, t = ((tid >> 3) & 15) * 2, col = (tid & 7) * 4;
    const float* x = (which ? c.qs : c.in.ks) + t * stride;
    ChunkReads r = {};
    for (int i = 0; i < c.dk; i += 4) {
        float4 s0 = ld4(c.S + i * DCOLS + col), s1 = ld4(c.S + (i + 1) * DCOLS + col);
        float4 s2 = ld4(c.S + (i + 2) * DCOLS + col), s3 = ld4(c.S + (i + 3) * DCOLS + col);
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            float4 v = ld4(x + u * stride + i);
            add_scaled4(r.r[u], v.x, s0);
            add_scaled4(r.r[u], v.y, s1);
            add_scaled4(r.r[u], v.z, s2);
            add_scaled4(r.r[u], v.w, s3);
        }
    }
    return r;
}

// The pairs and the state's reads scaled by the norms and decays, written out.
__device__ void delta_chunk_scale(const DeltaChunk& c, const ChunkPairs& pairs, const ChunkReads& reads, int tid) {
    int t = tid >> 3, jg = tid & 7;
    float ct = c.cum[t], bk = c.beta[t] * c.kn[t], qn = c.qn[t];
#pragma unroll
    for (int m = 0; m < 4; ++m) {
        int j = jg + 8 * m;
        float w = chunk_decay(ct - c.cum[j]) * c.kn[j];
        c.gram[t * (DC + 1) + j] = j < t ? bk * w * pairs.kk[m] : 0.0f;
        c.score[t * (DC + 1) + j] = j <= t ? qn * w * pairs.qk[m] : 0.0f;
    }
    int which = tid >> 7, t2 = ((tid >> 3) & 15) * 2, col = (tid & 7) * 4;
#pragma unroll
    for (int u = 0; u < 2; ++u) {
        float f = chunk_decay(c.cum[t2 + u]) * (which ? c.qn : c.kn)[t2 + u];
#pragma unroll
        for (int v = 0; v < 4; ++v) (which ? c.rq : c.rk)[(t2 + u) * DCOLS + col + v] = f * reads.r[u][v];
    }
    if (tid < DC) c.to_end[tid] = tid < c.n ? chunk_decay(c.cum[c.n - 1] - c.cum[tid]) * c.kn[tid] : 0.0f;
}

// delta_t = beta_t (v_t - exp(G_t) S0^T k^_t) - sum_{j<t} gram[t][j] delta_j, one thread per
// column with its deltas in registers (the loops unrolled), so that the chain waits only on
// its own FMAs.
__device__ void delta_chunk_solve(const DeltaChunk& c, int tid) {
    if (tid >= DCOLS) return;
    const float* v = c.in.vs;
    float d[DC];
#pragma unroll
    for (int t = 0; t < DC; ++t) {
        if (t < c.n) {
            float x = c.beta[t] * (v[t * DCOLS + tid] - c.rk[t * DCOLS + tid]);
#pragma unroll
            for (int j = 0; j < t; ++j) x -= c.gram[t * (DC + 1) + j] * d[j];
            d[t] = x;
            c.dl[t * DCOLS + tid] = x;
        }
    }
}

// The outputs, four tokens by one column per thread; the state, four key rows by four columns.
__device__ void delta_chunk_finish(const DeltaChunk& c, int tid) {
    int col = tid & 31, t0 = (tid >> 5) * 4;
    float o[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) o[u] = c.rq[(t0 + u) * DCOLS + col];
    // Pairs past a token are zero in `score`; tokens past the chunk have no delta.
    for (int j = 0; j < min(t0 + 4, c.n); ++j) {
        float d = c.dl[j * DCOLS + col];
#pragma unroll
        for (int u = 0; u < 4; ++u) o[u] += c.score[(t0 + u) * (DC + 1) + j] * d;
    }
#pragma unroll
    for (int u = 0; u < 4; ++u)
        if (t0 + u < c.n && c.col0 + col < c.dv)
            c.out[(long long)(c.t0 + t0 + u) * c.nv * c.dv + c.h * c.dv + c.col0 + col] = o[u];
    int stride = delta_ks_stride(c.dk), cg = (tid & 7) * 4;
    float kept = chunk_decay(c.cum[c.n - 1]);
    const float* k = c.in.ks;
    for (int i = (tid >> 3) * 4; i < c.dk; i += DELTA_CHUNK_THREADS / 2) {
        float u[4][4] = {};
        for (int t = 0; t < c.n; ++t) {
            float4 d = ld4(c.dl + t * DCOLS + cg), x = ld4(k + t * stride + i);
            float w = c.to_end[t];
            d.x *= w, d.y *= w, d.z *= w, d.w *= w;
            add_scaled4(u[0], x.x, d);
            add_scaled4(u[1], x.y, d);
            add_scaled4(u[2], x.z, d);
            add_scaled4(u[3], x.w, d);
        }
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            float* s = c.S + (i + r) * DCOLS + cg;
#pragma unroll
            for (int v = 0; v < 4; ++v) s[v] = s[v] * kept + u[r][v];
        }
    }
}

extern "C" __global__ void __launch_bounds__(DELTA_CHUNK_THREADS, 2) gated_delta_chunks(
    const float* qkv, const float* a, const float* b, const float* a_log, const float* dt_bias, float* state,
    int rows, int nk, int nv, int dk, int dv, float* out) {
    extern __shared__ float smem[];
    DeltaChunk c;
    c.qkv = qkv, c.a = a, c.b = b, c.out = out, c.rows = rows;
    c.h = blockIdx.x, c.kh = c.h / (nv / nk), c.col0 = blockIdx.y * DCOLS;
    c.dk = dk, c.dv = dv, c.nv = nv, c.key_dim = nk * dk, c.conv_dim = 2 * nk * dk + nv * dv;
    c.A = expf(a_log[c.h]), c.dt_bias = dt_bias[c.h], c.q_scale = rsqrtf((float)dk);
    int rows_floats = DC * delta_ks_stride(dk);
    c.S = smem;
    c.in.ks = c.S + dk * DCOLS;
    c.next.ks = c.in.ks + rows_floats;
    c.qs = c.next.ks + rows_floats;
    c.in.vs = c.qs + rows_floats;
    c.next.vs = c.in.vs + DC * DCOLS;
    c.in.as = c.next.vs + DC * DCOLS;
    c.next.as = c.in.as + DC;
    c.in.bs = c.next.as + DC;
    c.next.bs = c.in.bs + DC;
    c.gram = c.next.bs + DC;
    c.score = c.gram + DC * (DC + 1);
    c.dl = c.score + DC * (DC + 1);
    c.rk = c.dl + DC * DCOLS;
    c.rq = c.rk + DC * DCOLS;
    c.cum = c.rq + DC * DCOLS;
    c.beta = c.cum + DC;
    c.kn = c.beta + DC;
    c.qn = c.kn + DC;
    c.to_end = c.qn + DC;
    int tid = threadIdx.x;
    float* head = state + (long long)c.h * dk * dv;
    for (int e = tid; e < dk * DCOLS; e += DELTA_CHUNK_THREADS) {
        int col = c.col0 + e % DCOLS;
        c.S[e] = col < dv ? head[(long long)(e / DCOLS) * dv + col] : 0.0f;
    }
    delta_chunk_fetch_kv(c, 0, c.in, tid);
    delta_chunk_fetch_rows(c, 0, c.qs, c.kh * dk, tid);
    cp_async_commit();
    for (c.t0 = 0; c.t0 < rows; c.t0 += DC) {
        c.n = min(DC, rows - c.t0);
        bool next = c.t0 + DC < rows;
        cp_async_wait<0>();
        __syncthreads();  // the chunk landed; the last one is done with the other buffer and S
        if (next) delta_chunk_fetch_kv(c, c.t0 + DC, c.next, tid);
        cp_async_commit();
        if (tid < DC) delta_chunk_decays(c, tid);
        ChunkPairs pairs = delta_chunk_pairs(c, tid);
        ChunkReads reads = delta_chunk_state_reads(c, tid);
        if ((tid & 7) == 0) {
            c.kn[tid >> 3] = rsqrtf(pairs.k_sq + 1e-6f);
            c.qn[tid >> 3] = rsqrtf(pairs.q_sq + 1e-6f) * c.q_scale;
        }
        __syncthreads();
        if (next) delta_chunk_fetch_rows(c, c.t0 + DC, c.qs, c.kh * dk, tid);  // the products have read q
        cp_async_commit();
        delta_chunk_scale(c, pairs, reads, tid);
        __syncthreads();
        delta_chunk_solve(c, tid);
        __syncthreads();
        delta_chunk_finish(c, tid);
        ChunkInputs done = c.in;
        c.in = c.next, c.next = done;
    }
    __syncthreads();
    for (int e = tid; e < dk * DCOLS; e += DELTA_CHUNK_THREADS) {
        int col = c.col0 + e % DCOLS;
        if (col < dv) head[(long long)(e / DCOLS) * dv + col] = c.S[e];
    }
}

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

