// Kernel lab for the one-token quantized products: times the engine's own kernels
// (crates/engine/src/backend/cuda/kernels.cu, included as is) at the sizes decode uses,
// against a device-to-device copy and a read-only stream measured in the same run, under
// two grid sizings, together with experimental tensor-core variants defined below (one warp
// per 16-row tile, and split-K with S warps per tile for mid-size matrices), and
// checks each result against the plain warp-per-row kernel (matvec_affine_any: integer
// codes, per-group scale and bias, x from global memory).
//
// Built and run on a GPU machine (no cargo needed):
//   nvcc -O3 -std=c++17 -arch=sm_90 tools/matvec_lab.cu -o lab && ./lab
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../crates/engine/src/backend/cuda/kernels.cu"

// ---------------------------------------------------------------------------------------
// Experimental, not used by the engine: 4-bit, group-64 products with bf16 scales on the
// tensor cores (one token). See docs/perf.md for how it compares with the scalar kernels.
//
// The scalar kernels of kernels.cu spend about five instructions per code (the integer pipe
// and the issue slots, not memory, bound them). Here pairs of codes become the bf16 values
// f = 1 + q/16 (exact) with one shift and one mask, and mma.m16n8k16 multiplies 16 rows at
// once by x. x is split into three bf16 parts (hi + mid + lo = x to about 2^-27), so the
// products keep f32 accuracy; each part sits in its own column of the B operand, and the two
// groups of a 128-column step in separate columns too, so that each group's dot product comes
// out alone and gets its own scale (as in the scalar kernels, with D_G = f . x over group G):
//   row . x = sum over G of 16 scale_G * D_G + (bias_G - 16 scale_G) * sum(x_G).
//
// Fragment layout (PTX ISA, mma.m16n8k16, lane = 4 * g + t): A registers hold rows g and
// g + 8 at k = 2t, 2t+1 (regs 0, 1) and k = 2t+8, 2t+9 (regs 2, 3); B registers hold k = 2t,
// 2t+1 and 2t+8, 2t+9 of column g; D holds rows g, g + 8 at columns 2t, 2t+1. Lane t reads
// 16 bytes (32 codes) of each of its two rows per 128-column step: chunk t of the step. The
// k slots of mma m are the code pairs 2m and 2m+1 of every lane's chunk (pair 4j + kk of a
// chunk: codes kk and kk + 4 of word j); B is staged in that order. B column n (< 6) carries
// part n % 3 of the step's group n / 3; columns 6 and 7 are zero.

#define MMA_STAGE_FLOATS(cols) ((3 * (cols)) / 2 + (cols) / 64)

__device__ __forceinline__ u16 bf16_rn(float f) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

// x as three bf16 parts laid out as the B fragments read them, then the f32 sum of x over
// each group of 64. Ends with a barrier. As in the engine's stage_x_async: float4 loads all in
// flight (one memory round trip), a group's sum by shuffles over the 16 lanes holding it.
__device__ void stage_x_mma(const float* x, int cols, u16* parts, float* gsum) {
    int chunks = cols / 4;
    for (int base = 0; base < chunks; base += STAGE_VECS * blockDim.x) {
        float4 v[STAGE_VECS];
#pragma unroll
        for (int j = 0; j < STAGE_VECS; ++j) {
            int c = base + j * blockDim.x + threadIdx.x;
            v[j] = c < chunks ? ((const float4*)x)[c] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
#pragma unroll
        for (int j = 0; j < STAGE_VECS; ++j) {
            if (base + j * blockDim.x >= chunks) break;  // the same for the whole block
            int c = base + j * blockDim.x + threadIdx.x;
            float sum = (v[j].x + v[j].y) + (v[j].z + v[j].w);
            for (int o = 8; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            if (c >= chunks) continue;
            if ((c & 15) == 0) gsum[c >> 4] = sum;
            float vals[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                int col = 4 * c + i;
                u16 hi = bf16_rn(vals[i]);
                float r1 = vals[i] - bf16_to_f32(hi);
                u16 mid = bf16_rn(r1);
                u16 lo = bf16_rn(r1 - bf16_to_f32(mid));
                // Column col of chunk (col & ~31): word j = (col & 31) / 8, code k = col & 7, pair
                // 4j + (k & 3), low half for k < 4.
                int k = col & 7, pos = (col & ~31) + 2 * (((col & 31) >> 3) * 4 + (k & 3)) + (k >> 2);
                parts[pos] = hi;
                parts[cols + pos] = mid;
                parts[2 * cols + pos] = lo;
            }
        }
    }
    __syncthreads();
}

// Codes kk and kk + 4 of a word as the bf16 pair (1 + q_kk / 16, 1 + q_kk+4 / 16).
__device__ __forceinline__ u32 code_pair(u32 w, int kk) {
    // Code kk to bits 3..6, the top of a bf16 mantissa. The right shifts are multiplications
    // (high word) so that they run on the FMA pipe: the integer pipe is the busier one.
    const int shift = 3 - 4 * kk;
    return ((shift >= 0 ? w << shift : __umulhi(w, 1u << (32 + shift))) & 0x00780078u) | 0x3F803F80u;
}

__device__ __forceinline__ void mma_bf16(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The bf16 of group 2s (low half) or 2s + 1 (high half) of a pair word, as f32.
__device__ __forceinline__ float pick_bf16(u32 pair, bool high) {
    return __uint_as_float(high ? pair & 0xffff0000u : pair << 16);
}

#define MMA_STEPS_IN_FLIGHT 4

// One 128-column step: the 8 mma of the lane's chunks ca (row g) and cb (row g + 8) with the
// staged x of step s, then the per-group scaling into acc_a and acc_b. sc holds this step's
// scale and bias words (two groups each) for the rows g and g + 8.
struct StepScales {
    u32 sa, sb, ba, bb;
};

__device__ __forceinline__ void mma_step(uint4 ca, uint4 cb, StepScales sc, const uint4* xb, bool feeds_b,
                                         const float* gsum, int s, float& acc_a, float& acc_b) {
    int t = threadIdx.x & 3;
    u32 bx[16];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        uint4 v = feeds_b ? xb[s * 16 + i] : make_uint4(0, 0, 0, 0);
        bx[4 * i] = v.x, bx[4 * i + 1] = v.y, bx[4 * i + 2] = v.z, bx[4 * i + 3] = v.w;
    }
    u32 aw[4] = {ca.x, ca.y, ca.z, ca.w}, bw[4] = {cb.x, cb.y, cb.z, cb.w};
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int mm = 0; mm < 8; ++mm) {
        int j = mm >> 1, k0 = (2 * mm) & 3;
        mma_bf16(d, code_pair(aw[j], k0), code_pair(bw[j], k0), code_pair(aw[j], k0 + 1), code_pair(bw[j], k0 + 1),
                 bx[2 * mm], bx[2 * mm + 1]);
    }
    // D columns 2t and 2t+1 belong to the step's group (2t) / 3 and (2t+1) / 3; columns 6, 7
    // (t = 3) are zero. Lanes t = 0, 1 add the bias term of group t.
    bool high0 = t == 2, high1 = t >= 1;
    float use_d = t < 3 ? 16.0f : 0.0f, use_bias = t < 2 ? 1.0f : 0.0f;
    float2 sums = *(const float2*)(gsum + 2 * s);
    float xsum = t == 0 ? sums.x : sums.y;
    acc_a += use_d * (pick_bf16(sc.sa, high0) * d[0] + pick_bf16(sc.sa, high1) * d[1]) +
             use_bias * (pick_bf16(sc.ba, t == 1) - 16.0f * pick_bf16(sc.sa, t == 1)) * xsum;
    acc_b += use_d * (pick_bf16(sc.sb, high0) * d[2] + pick_bf16(sc.sb, high1) * d[3]) +
             use_bias * (pick_bf16(sc.bb, t == 1) - 16.0f * pick_bf16(sc.sb, t == 1)) * xsum;
}

// This lane's share of rows r0 + g (acc_a) and r0 + g + 8 (acc_b) of a 4-bit, group-64
// matrix with bf16 scales times the staged x, over the 128-column steps [s_begin, s_end). The
// loads of MMA_STEPS_IN_FLIGHT steps are issued before the first is used (the arithmetic per
// step is short: without that, latency bounds the kernel). Rows past the end are read as the
// last row; the caller drops them and sums over the four lanes t of each g.
__device__ __forceinline__ void tile_dot_q4(const Affine& m, int r0, int rows, int cols, int s_begin, int s_end,
                                            const u16* parts, const float* gsum, float& acc_a, float& acc_b) {
    int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int ra = min(r0 + g, rows - 1), rb = min(r0 + g + 8, rows - 1);
    int steps = cols >> 7;
    const uint4* wa = (const uint4*)m.w + (long long)ra * (cols >> 5) + t;
    const uint4* wb = (const uint4*)m.w + (long long)rb * (cols >> 5) + t;
    // Scales and biases of a step's two groups, as one 32-bit word per row.
    const u32* sa = (const u32*)m.scales + (long long)ra * steps;
    const u32* sb = (const u32*)m.scales + (long long)rb * steps;
    const u32* ba = (const u32*)m.biases + (long long)ra * steps;
    const u32* bb = (const u32*)m.biases + (long long)rb * steps;
    bool feeds_b = g < 6 && g / 3 == (t >> 1);  // this lane's B column holds its chunk's group
    const uint4* xb = (const uint4*)(parts + (g % 3) * cols + t * 32);
    for (int s0 = s_begin; s0 < s_end; s0 += MMA_STEPS_IN_FLIGHT) {
        uint4 ca[MMA_STEPS_IN_FLIGHT], cb[MMA_STEPS_IN_FLIGHT];
        StepScales sc[MMA_STEPS_IN_FLIGHT];
#pragma unroll
        for (int u = 0; u < MMA_STEPS_IN_FLIGHT; ++u) {
            int s = min(s0 + u, s_end - 1);
            ca[u] = wa[s * 4], cb[u] = wb[s * 4];
            sc[u] = {sa[s], sb[s], ba[s], bb[s]};
        }
#pragma unroll
        for (int u = 0; u < MMA_STEPS_IN_FLIGHT; ++u)
            if (s0 + u < s_end) mma_step(ca[u], cb[u], sc[u], xb, feeds_b, gsum, s0 + u, acc_a, acc_b);
    }
}

// Sums a tile's partial dot products over the four lanes t that share g.
__device__ __forceinline__ float tile_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// y = alpha * (W x) + beta * y, 4-bit group-64 W, one warp per 16 rows.
extern "C" __global__ void matvec_mma_q4(const u8* w, const u8* scales, const u8* biases, const float* x, int rows,
                                         int cols, float* y, float alpha, float beta) {
    extern __shared__ float smem[];
    float* gsum = smem + (3 * cols) / 2;
    stage_x_mma(x, cols, (u16*)smem, gsum);
    Affine m = {w, scales, biases};
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int tile = blockIdx.x * warps + (threadIdx.x >> 5); tile < (rows + 15) / 16; tile += gridDim.x * warps) {
        float a = 0.0f, b = 0.0f;
        tile_dot_q4(m, tile * 16, rows, cols, 0, cols >> 7, (const u16*)smem, gsum, a, b);
        a = tile_sum(a);
        b = tile_sum(b);
        int ra = tile * 16 + (lane >> 2), rb = ra + 8;
        if ((lane & 3) == 0) {
            if (ra < rows) y[ra] = alpha * a + (beta != 0.0f ? beta * y[ra] : 0.0f);
            if (rb < rows) y[rb] = alpha * b + (beta != 0.0f ? beta * y[rb] : 0.0f);
        }
    }
}

// Mid-size matrices: a tile of 16 rows split over S warps along the columns (each warp a
// contiguous range of 128-column steps), the partial sums meeting in shared memory (`meet`:
// 16 floats per warp, after gsum), so that a 12288-row matrix still gives every
// multiprocessor enough warps. A block of 8 warps takes 8 / S tiles at a time.
#define MMA_SPLIT_STAGE_FLOATS(cols) (MMA_STAGE_FLOATS(cols) + 16 * 8)

template <int S>
__global__ void matvec_mma_q4_split(const u8* w, const u8* scales, const u8* biases, const float* x, int rows,
                                    int cols, float* y) {
    extern __shared__ float smem[];
    float* gsum = smem + (3 * cols) / 2;
    float* meet = gsum + cols / 64;
    stage_x_mma(x, cols, (u16*)smem, gsum);
    Affine m = {w, scales, biases};
    constexpr int TILES = 8 / S;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2;
    int tiles = (rows + 15) / 16, steps = cols >> 7, slice = warp % S;
    int s_begin = slice * steps / S, s_end = (slice + 1) * steps / S;
    for (int base = blockIdx.x * TILES; base < tiles; base += gridDim.x * TILES) {
        int tile = base + warp / S;
        float a = 0.0f, b = 0.0f;
        if (tile < tiles) tile_dot_q4(m, tile * 16, rows, cols, s_begin, s_end, (const u16*)smem, gsum, a, b);
        a = tile_sum(a);
        b = tile_sum(b);
        if ((lane & 3) == 0) meet[warp * 16 + g] = a, meet[warp * 16 + g + 8] = b;
        __syncthreads();
        if (slice == 0 && tile < tiles && (lane & 3) == 0) {
            // The tile's S warps are warp, warp + 1, ..., warp + S - 1.
            float sa = 0.0f, sb = 0.0f;
            for (int k = 0; k < S; ++k) sa += meet[(warp + k) * 16 + g], sb += meet[(warp + k) * 16 + g + 8];
            int ra = tile * 16 + g;
            if (ra < rows) y[ra] = sa;
            if (ra + 8 < rows) y[ra + 8] = sb;
        }
        __syncthreads();
    }
}

// silu(gate . x) * (up . x) for 16 rows of a SwiGLU: a pair of warps, the even one on gate and
// the odd one on up, meeting in shared memory (`meet`: 16 floats per pair, after gsum). Every
// thread of the block must call it the same number of times (it holds barriers); a pair with
// no work passes y = nullptr.
#define SWIGLU_PAIRS 4  // per block of 256 threads
#define MMA_SWIGLU_STAGE_FLOATS(cols) (MMA_STAGE_FLOATS(cols) + 16 * SWIGLU_PAIRS)

__device__ __forceinline__ void swiglu_pair_q4(const Affine& gate, const Affine& up, int r0, int rows, int cols,
                                               const u16* parts, const float* gsum, float* meet, float* y) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2;
    float* pair_meet = meet + 16 * (warp >> 1);
    float a = 0.0f, b = 0.0f;
    bool odd = warp & 1;
    Affine m = {odd ? up.w : gate.w, odd ? up.scales : gate.scales, odd ? up.biases : gate.biases};
    if (y) tile_dot_q4(m, r0, rows, cols, 0, cols >> 7, parts, gsum, a, b);
    a = tile_sum(a);
    b = tile_sum(b);
    if (odd && (lane & 3) == 0) pair_meet[g] = a, pair_meet[g + 8] = b;
    __syncthreads();
    if (y && !odd && (lane & 3) == 0) {
        if (r0 + g < rows) y[r0 + g] = siluf(a) * pair_meet[g];
        if (r0 + g + 8 < rows) y[r0 + g + 8] = siluf(b) * pair_meet[g + 8];
    }
    __syncthreads();
}

extern "C" __global__ void swiglu_mma_q4(const u8* w, const u8* scales, const u8* biases, const u8* w2,
                                         const u8* scales2, const u8* biases2, const float* x, int rows, int cols,
                                         float* y) {
    extern __shared__ float smem[];
    float* gsum = smem + (3 * cols) / 2;
    stage_x_mma(x, cols, (u16*)smem, gsum);
    Affine gate = {w, scales, biases}, up = {w2, scales2, biases2};
    int tiles = (rows + 15) / 16;
    for (int base = blockIdx.x * SWIGLU_PAIRS; base < tiles; base += gridDim.x * SWIGLU_PAIRS) {
        int tile = base + (threadIdx.x >> 6);
        swiglu_pair_q4(gate, up, min(tile, tiles - 1) * 16, rows, cols, (const u16*)smem, gsum, gsum + cols / 64,
                       tile < tiles ? y : nullptr);
    }
}

// act[e, r] = silu(gate_e[r] . x) * (up_e[r] . x) for a batch of 4-bit group-64 experts with
// bf16 scales, on the tensor cores: per (expert, 16 rows), two warps (gate and up).
extern "C" __global__ void swiglu_batch_mma_q4(ExpertBatch batch, const float* x, int rows, int cols, float* act) {
    extern __shared__ float smem[];
    float* gsum = smem + (3 * cols) / 2;
    stage_x_mma(x, cols, (u16*)smem, gsum);
    int tiles = (rows + 15) / 16;
    for (int base = blockIdx.x * SWIGLU_PAIRS; base < batch.count * tiles; base += gridDim.x * SWIGLU_PAIRS) {
        int i = min(base + (threadIdx.x >> 6), batch.count * tiles - 1), e = i / tiles;
        Affine gate = {batch.w[e][0], batch.w[e][1], batch.w[e][2]};
        Affine up = {batch.w[e][3], batch.w[e][4], batch.w[e][5]};
        swiglu_pair_q4(gate, up, (i % tiles) * 16, rows, cols, (const u16*)smem, gsum, gsum + cols / 64,
                       base + (threadIdx.x >> 6) < batch.count * tiles ? act + (long long)e * rows : nullptr);
    }
}

#define CHECK(call)                                                                              \
    do {                                                                                         \
        cudaError_t err_ = (call);                                                               \
        if (err_ != cudaSuccess) {                                                               \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
            exit(1);                                                                             \
        }                                                                                        \
    } while (0)

static const int THREADS = 256;
static int g_sms = 0;
static double g_d2d = 0.0;  // bytes per second, read + write

__global__ void fill_random(u32* p, long long n, u32 seed) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        u32 h = (u32)i * 2654435761u ^ seed;
        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        p[i] = h;
    }
}

// bf16 values in [lo, lo + span), two per word.
__global__ void fill_bf16(u32* p, long long n, u32 seed, float lo, float span) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        u32 h = (u32)i * 2654435761u ^ seed;
        h ^= h >> 16;
        h *= 2246822519u;
        float a = lo + span * (float)(h & 0xffff) / 65536.0f, b = lo + span * (float)(h >> 16) / 65536.0f;
        p[i] = (__float_as_uint(a) >> 16) | (__float_as_uint(b) & 0xffff0000u);
    }
}

__global__ void fill_float(float* p, long long n, u32 seed) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        u32 h = (u32)i * 2654435761u ^ seed;
        h ^= h >> 15;
        h *= 2246822519u;
        p[i] = (float)(h & 0xffff) / 32768.0f - 1.0f;
    }
}

// The read ceiling: every byte read once, 16 bytes per lane, four loads in flight.
__global__ void read_only(const uint4* p, long long n, u32* sink) {
    u32 acc = 0;
    long long stride = (long long)gridDim.x * blockDim.x;
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        uint4 a = p[i], b = p[i + stride], c = p[i + 2 * stride], d = p[i + 3 * stride];
        acc ^= a.x ^ a.w ^ b.y ^ b.z ^ c.x ^ c.w ^ d.y ^ d.z;
    }
    for (; i < n; i += stride) acc ^= p[i].x;
    if (acc == 0x12345678u) sink[0] = acc;
}

struct Matrix {
    u8 *w, *s, *b;
    int rows, cols, bits;
    size_t bytes() const { return (size_t)rows * cols * bits / 8 + 2 * (size_t)rows * (cols / 64) * 2; }
};

static Matrix make_matrix(int rows, int cols, int bits, u32 seed) {
    Matrix m{nullptr, nullptr, nullptr, rows, cols, bits};
    size_t code_bytes = (size_t)rows * cols * bits / 8, groups = (size_t)rows * (cols / 64);
    CHECK(cudaMalloc(&m.w, code_bytes));
    CHECK(cudaMalloc(&m.s, groups * 2));
    CHECK(cudaMalloc(&m.b, groups * 2));
    fill_random<<<1024, 256>>>((u32*)m.w, code_bytes / 4, seed);
    fill_bf16<<<1024, 256>>>((u32*)m.s, groups / 2, seed + 1, 0.001f, 0.02f);
    fill_bf16<<<1024, 256>>>((u32*)m.b, groups / 2, seed + 2, -0.1f, 0.2f);
    CHECK(cudaGetLastError());
    return m;
}

static size_t smem_bytes(int bits, int cols) {
    int pf = 128 / bits, pieces = cols / pf;
    return (size_t)((pieces * (pf + PIECE_PAD) + pieces + 3) & ~3) * 4;
}

// Blocks of THREADS for a kernel: "engine" sizing (8 rows per block, at most 8 per SM) or
// "resident" sizing (as many as fit on the GPU at once, by the occupancy calculator).
static int grid_for(const void* kernel, size_t smem, long long rows, bool resident) {
    if (!resident) return (int)std::min<long long>((rows + 7) / 8, 8LL * g_sms);
    int per_sm = 0;
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, THREADS, smem));
    return (int)std::min<long long>((rows + 7) / 8, (long long)per_sm * g_sms);
}

template <class F>
static double median_us(int reps, int calls, F f) {
    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    f();
    std::vector<double> t;
    for (int i = 0; i < reps; ++i) {
        CHECK(cudaEventRecord(a));
        for (int c = 0; c < calls; ++c) f();
        CHECK(cudaEventRecord(b));
        CHECK(cudaEventSynchronize(b));
        float ms = 0;
        CHECK(cudaEventElapsedTime(&ms, a, b));
        t.push_back(ms * 1e3 / calls);
    }
    CHECK(cudaGetLastError());
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

static void row(const char* name, double us, double bytes) {
    double rate = bytes / (us * 1e-6);
    printf("%-52s %9.2f %9.1f %6.0f%%\n", name, us, rate / 1e9, 100.0 * rate / g_d2d);
}

static double rel_l2(const std::vector<float>& got, const std::vector<float>& want) {
    double num = 0, den = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        double d = (double)got[i] - want[i];
        num += d * d;
        den += (double)want[i] * want[i];
        if (!std::isfinite(got[i])) return INFINITY;
    }
    return std::sqrt(num / den);
}

static std::vector<float> fetch(const float* d, size_t n) {
    std::vector<float> h(n);
    CHECK(cudaMemcpy(h.data(), d, n * 4, cudaMemcpyDeviceToHost));
    return h;
}

static void reference_matvec(const Matrix& m, const float* x, float* y) {
    matvec_affine_any<<<(m.rows + 7) / 8, THREADS>>>(m.w, m.s, m.b, m.bits, 64, DT_BF16, x, m.rows, m.cols, y);
}

static void launch_matvec(const Matrix& m, const float* x, float* y, int grid) {
    size_t smem = smem_bytes(m.bits, m.cols);
    if (m.bits == 4)
        matvec_q4<<<grid, THREADS, smem>>>(m.w, m.s, m.b, 64, DT_BF16, x, m.rows, m.cols, y, 1.0f, 0.0f);
    else
        matvec_q2<<<grid, THREADS, smem>>>(m.w, m.s, m.b, 64, DT_BF16, x, m.rows, m.cols, y, 1.0f, 0.0f);
}

// One variant of a product: checked against the reference (y poisoned first), then timed over
// the copies of the matrix in turn (so that a small one is not read from L2), and printed.
template <class F>
static void check_and_time(const char* label, const std::vector<Matrix>& ms, float* y, const float* ref, F launch) {
    int rows = ms[0].rows, copies = (int)ms.size();
    CHECK(cudaMemset(y, 0xff, (size_t)rows * 4));
    launch(ms[0]);
    double err = rel_l2(fetch(y, rows), fetch(ref, rows));
    int i = 0;
    double us = median_us(7, std::max(copies, 8), [&] { launch(ms[i++ % copies]); });
    char full[192];
    snprintf(full, sizeof full, "%s (err %.1e)", label, err);
    row(full, us, (double)ms[0].bytes());
}

// The split-K tensor-core variant with S warps per 16-row tile, checked and timed like the rest.
template <int S>
static void bench_split(const char* name, const std::vector<Matrix>& ms, const float* x, float* y, const float* ref) {
    int rows = ms[0].rows, cols = ms[0].cols;
    size_t smem = MMA_SPLIT_STAGE_FLOATS(cols) * 4;
    const void* kernel = (const void*)matvec_mma_q4_split<S>;
    CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    int per_sm = 0;
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, THREADS, smem));
    int blocks_needed = ((rows + 15) / 16 + 8 / S - 1) / (8 / S);
    int grid = std::min(blocks_needed, per_sm * g_sms);
    char label[128];
    snprintf(label, sizeof label, "%s, tensor cores split %d, grid %d", name, S, grid);
    check_and_time(label, ms, y, ref, [&](const Matrix& m) {
        matvec_mma_q4_split<S><<<grid, THREADS, smem>>>(m.w, m.s, m.b, x, m.rows, m.cols, y);
    });
}

static void bench_matvec(const char* name, int rows, int cols, int bits, int copies) {
    std::vector<Matrix> ms;
    for (int i = 0; i < copies; ++i) ms.push_back(make_matrix(rows, cols, bits, 1000 + 17 * i));
    float *x, *y, *ref;
    CHECK(cudaMalloc(&x, cols * 4));
    CHECK(cudaMalloc(&y, (size_t)rows * 4));
    CHECK(cudaMalloc(&ref, (size_t)rows * 4));
    fill_float<<<64, 256>>>(x, cols, 7);
    reference_matvec(ms[0], x, ref);
    if (bits == 4) {
        size_t smem = MMA_STAGE_FLOATS(cols) * 4;
        CHECK(cudaFuncSetAttribute((const void*)matvec_mma_q4, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   200 * 1024));
        int grid = grid_for((const void*)matvec_mma_q4, smem, rows / 2, true);
        char label[128];
        snprintf(label, sizeof label, "%s, tensor cores, grid %d", name, grid);
        check_and_time(label, ms, y, ref, [&](const Matrix& m) {
            matvec_mma_q4<<<grid, THREADS, smem>>>(m.w, m.s, m.b, x, m.rows, m.cols, y, 1.0f, 0.0f);
        });
        if (rows < 100000) {
            bench_split<2>(name, ms, x, y, ref);
            bench_split<4>(name, ms, x, y, ref);
            bench_split<8>(name, ms, x, y, ref);
        }
    }
    const void* kernel = bits == 4 ? (const void*)matvec_q4 : (const void*)matvec_q2;
    for (int resident = 0; resident < 2; ++resident) {
        int grid = grid_for(kernel, smem_bytes(bits, cols), rows, resident);
        char label[128];
        snprintf(label, sizeof label, "%s, %s grid %d", name, resident ? "resident" : "engine", grid);
        check_and_time(label, ms, y, ref, [&](const Matrix& m) { launch_matvec(m, x, y, grid); });
    }
    for (auto& m : ms) cudaFree(m.w), cudaFree(m.s), cudaFree(m.b);
    cudaFree(x), cudaFree(y), cudaFree(ref);
}

// mode 0: engine grid, 1: resident grid, 2: tensor-core gate/up (4-bit) and resident down.
static void launch_experts(const ExpertBatch& batch, int bits, const float* x, float* act, float* out, int mode) {
    int inter = 1024, hidden = 4096, count = batch.count;
    bool resident = mode != 0;
    size_t up_smem = smem_bytes(bits, hidden), down_smem = smem_bytes(bits, inter) * count;
    if (mode == 2) {
        size_t smem = MMA_SWIGLU_STAGE_FLOATS(hidden) * 4;
        int g1 = grid_for((const void*)swiglu_batch_mma_q4, smem, (long long)count * inter / 2, true);
        int g2 = grid_for((const void*)down_batch_q4, down_smem, hidden, true);
        swiglu_batch_mma_q4<<<g1, THREADS, smem>>>(batch, x, inter, hidden, act);
        down_batch_q4<<<g2, THREADS, down_smem>>>(batch, 64, DT_BF16, act, hidden, inter, out);
        return;
    }
    const void* sw = bits == 4 ? (const void*)swiglu_batch_q4 : (const void*)swiglu_batch_q2;
    const void* dn = bits == 4 ? (const void*)down_batch_q4 : (const void*)down_batch_q2;
    int g1 = grid_for(sw, up_smem, (long long)count * inter, resident);
    int g2 = grid_for(dn, down_smem, hidden, resident);
    if (bits == 4) {
        swiglu_batch_q4<<<g1, THREADS, up_smem>>>(batch, 64, DT_BF16, x, inter, hidden, act);
        down_batch_q4<<<g2, THREADS, down_smem>>>(batch, 64, DT_BF16, act, hidden, inter, out);
    } else {
        swiglu_batch_q2<<<g1, THREADS, up_smem>>>(batch, 64, DT_BF16, x, inter, hidden, act);
        down_batch_q2<<<g2, THREADS, down_smem>>>(batch, 64, DT_BF16, act, hidden, inter, out);
    }
}

static void bench_experts(int bits) {
    const int n = 256, inter = 1024, hidden = 4096;
    std::vector<Matrix> gate, up, down;
    for (int e = 0; e < n; ++e) {
        gate.push_back(make_matrix(inter, hidden, bits, 50000 + 3 * e));
        up.push_back(make_matrix(inter, hidden, bits, 50001 + 3 * e));
        down.push_back(make_matrix(hidden, inter, bits, 50002 + 3 * e));
    }
    CHECK(cudaFuncSetAttribute(bits == 4 ? (const void*)down_batch_q4 : (const void*)down_batch_q2,
                               cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    float *x, *act, *out, *ref, *g, *u, *a, *d;
    CHECK(cudaMalloc(&x, hidden * 4));
    CHECK(cudaMalloc(&act, 16 * inter * 4));
    CHECK(cudaMalloc(&out, hidden * 4));
    CHECK(cudaMalloc(&ref, hidden * 4));
    CHECK(cudaMalloc(&g, inter * 4));
    CHECK(cudaMalloc(&u, inter * 4));
    CHECK(cudaMalloc(&a, inter * 4));
    CHECK(cudaMalloc(&d, hidden * 4));
    fill_float<<<64, 256>>>(x, hidden, 9);
    double expert_bytes = (double)(gate[0].bytes() + up[0].bytes() + down[0].bytes());
    // LAB_K picks the batch sizes (default 4 and 10), e.g. to profile only K=10.
    std::vector<int> ks = {4, 10};
    if (const char* env = getenv("LAB_K")) ks = {atoi(env)};
    for (int k : ks) {
        std::vector<ExpertBatch> batches;
        for (int first = 0; first + k <= n; first += k) {
            ExpertBatch bt{};
            bt.count = k;
            bt.shared_slot = -1;
            for (int j = 0; j < k; ++j) {
                const Matrix* mats[3] = {&gate[first + j], &up[first + j], &down[first + j]};
                for (int m = 0; m < 3; ++m) {
                    bt.w[j][3 * m] = mats[m]->w;
                    bt.w[j][3 * m + 1] = mats[m]->s;
                    bt.w[j][3 * m + 2] = mats[m]->b;
                }
                bt.weight[j] = 0.05f + 0.01f * j;
            }
            batches.push_back(bt);
        }
        // Reference for the first batch: expert by expert with the plain kernel.
        CHECK(cudaMemset(ref, 0, hidden * 4));
        for (int j = 0; j < k; ++j) {
            reference_matvec(gate[j], x, g);
            reference_matvec(up[j], x, u);
            silu_mul<<<(inter + 255) / 256, 256>>>(g, u, a, inter);
            reference_matvec(down[j], a, d);
            axpy<<<(hidden + 255) / 256, 256>>>(ref, d, batches[0].weight[j], 0, hidden);
        }
        for (int mode = 0; mode < (bits == 4 ? 3 : 2); ++mode) {
            CHECK(cudaMemset(out, 0, hidden * 4));
            launch_experts(batches[0], bits, x, act, out, mode);
            double err = rel_l2(fetch(out, hidden), fetch(ref, hidden));
            int i = 0;
            double us = median_us(7, (int)batches.size(), [&] {
                launch_experts(batches[i++ % batches.size()], bits, x, act, out, mode);
            });
            const char* how[3] = {"engine grid", "resident grid", "tensor-core gate/up"};
            char label[128];
            snprintf(label, sizeof label, "%d experts %d-bit batched, %s (err %.1e)", k, bits, how[mode], err);
            row(label, us, k * expert_bytes);
        }
    }
    for (int e = 0; e < n; ++e)
        for (Matrix* m : {&gate[e], &up[e], &down[e]}) cudaFree(m->w), cudaFree(m->s), cudaFree(m->b);
    cudaFree(x), cudaFree(act), cudaFree(out), cudaFree(ref), cudaFree(g), cudaFree(u), cudaFree(a), cudaFree(d);
}

int main() {
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    g_sms = prop.multiProcessorCount;
    printf("device: %s, %d SMs\n", prop.name, g_sms);
    size_t n = 1ull << 30;
    u8 *src, *dst;
    u32* sink;
    CHECK(cudaMalloc(&src, n));
    CHECK(cudaMalloc(&dst, n));
    CHECK(cudaMalloc(&sink, 4));
    fill_random<<<1024, 256>>>((u32*)src, n / 4, 3);
    double copy_us = median_us(7, 4, [&] { CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice)); });
    g_d2d = 2.0 * n / (copy_us * 1e-6);
    printf("%-52s %9s %9s %7s\n", "", "us", "GB/s", "of d2d");
    row("device-to-device copy 1 GiB (read + write)", copy_us, 2.0 * n);
    double read_us = median_us(7, 4, [&] { read_only<<<g_sms * 8, 256>>>((const uint4*)src, n / 16, sink); });
    row("read-only stream 1 GiB", read_us, (double)n);
    CHECK(cudaFree(src));
    CHECK(cudaFree(dst));
    bench_matvec("lm_head 248320x4096 4-bit", 248320, 4096, 4, 1);
    bench_matvec("in_proj 12288x4096 4-bit", 12288, 4096, 4, 8);
    bench_matvec("out_proj 4096x8192 4-bit", 4096, 8192, 4, 8);
    bench_matvec("lm_head 248320x4096 2-bit", 248320, 4096, 2, 1);
    bench_experts(4);
    bench_experts(2);
    return 0;
}
