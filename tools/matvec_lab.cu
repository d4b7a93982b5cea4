// Kernel lab for the one-token quantized products: times the engine's own kernels
// (crates/engine/src/backend/cuda/kernels.cu, included as is) at the sizes decode uses,
// against a device-to-device copy and a read-only stream measured in the same run (the
// products under two grid sizings), checks each result against the plain warp-per-row kernel
// (matvec_affine_any: integer codes, per-group scale and bias, x from global memory), and
// times experts held in page-locked host memory (copied, or read by the kernels directly).
// A place to try a variant beside the engine's before moving it into kernels.cu.
//
// Built and run on a GPU machine (no cargo needed):
//   nvcc -O3 -std=c++17 -arch=sm_90 tools/matvec_lab.cu -o lab && ./lab
// (`./lab bulk` runs only the bulk-copy experiment, `./lab persistent` only the persistent
// chain, the chained products shape by shape and the kernel boundary against a grid barrier,
// `./lab unroll` only the row pairs with more pieces in flight per lane.)
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include <cooperative_groups.h>

#include "../crates/engine/src/backend/cuda/kernels.cu"

// ---------------------------------------------------------------------------------------
// Experimental, not used by the engine yet: programmatic dependent launch (Hopper).
//
// A decode step is a chain of products, each reading the output of the one before, and the
// mid-size ones lose much of their time to the ramp (launch, staging x, first loads) and the
// tail. Launched with programmatic stream serialization, a kernel may start while the one
// before it finishes: here it prefetches its warps' first rows into L2 (weights do not
// depend on the previous kernel), lets its own successor launch, and waits
// (griddepcontrol.wait: the previous grid complete, its writes visible) before it reads x.
// Without the launch attribute both instructions do nothing.
#define PDL_PREFETCH_ROWS 2
extern "C" __global__ void matvec_q4_pdl(const u8* w, const u8* scales, const u8* biases, int group, int dtype,
                                         const float* x, int rows, int cols, float* y, float alpha) {
    int warps = blockDim.x >> 5, lane = threadIdx.x & 31;
    long long row_bytes = cols / 2, scale_bytes = (long long)(cols / group) * 2;
    for (int k = 0; k < PDL_PREFETCH_ROWS; ++k) {
        long long r = (long long)blockIdx.x * warps + (threadIdx.x >> 5) + (long long)k * gridDim.x * warps;
        if (r >= rows) break;
        for (long long off = lane * 128; off < row_bytes; off += 32 * 128)
            asm volatile("prefetch.global.L2 [%0];" ::"l"(w + r * row_bytes + off));
        if (lane == 0) {
            asm volatile("prefetch.global.L2 [%0];" ::"l"(scales + r * scale_bytes));
            asm volatile("prefetch.global.L2 [%0];" ::"l"(biases + r * scale_bytes));
        }
    }
    asm volatile("griddepcontrol.launch_dependents;");
    asm volatile("griddepcontrol.wait;" ::: "memory");
    Affine a = {w, scales, biases};
    matvec_pow2<4, false>(a, group, dtype, x, rows, cols, y, alpha, 0.0f);
}

// Experimental, not used by the engine: x staged once per token in global memory (one block
// converts it), and each block of the product copies the staged bytes into shared memory with
// cp.async (no registers, no conversion) instead of converting x itself. With PRELOAD, a
// warp's first row of weights is loaded into registers before it waits for that copy.
extern "C" __global__ void prestage_q4(const float* x, int cols, u8* staged) {
    stage_x_async<4>(x, 1, cols, 0, staged);
}

template <bool PRELOAD>
__global__ void matvec_q4_prestaged(const u8* w, const u8* scales, const u8* biases, int group, int dtype,
                                    const u8* staged, int rows, int cols, float* y, float alpha) {
    constexpr int PF = 32, REC = staged_record(4), U = ROWS_UNROLL;
    extern __shared__ uint4 smem_vec[];
    u8* smem = (u8*)smem_vec;
    int chunks = staged_bytes(4, cols) / 16;
    for (int i = threadIdx.x; i < chunks; i += blockDim.x) {
        unsigned dst = (unsigned)__cvta_generic_to_shared(smem + 16 * i);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(staged + 16 * i));
    }
    asm volatile("cp.async.commit_group;");
    int pieces = cols / PF, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    int group_shift = __ffs(group) - 1;
    const float2* meta = (const float2*)(smem + pieces * REC);
    uint4 v[U];
    u32 sc[U], bi[U];
    auto load = [&](long long r, int base) {
        long long first_group = r * (((long long)pieces * PF) >> group_shift);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            int p = base + u * 32 + lane;
            if (p < pieces) {
                long long g = first_group + ((p * PF) >> group_shift);
                v[u] = ((const uint4*)w + r * pieces)[p];
                sc[u] = load_raw(scales, dtype, g);
                bi[u] = load_raw(biases, dtype, g);
            }
        }
    };
    int first = blockIdx.x * warps + (threadIdx.x >> 5);
    if (PRELOAD && first < rows) load(first, 0);
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();
    for (int r = first; r < rows; r += gridDim.x * warps) {
        float acc = 0.0f;
        for (int base = 0; base < pieces; base += 32 * U) {
            if (!PRELOAD || base > 0 || r != first) load(r, base);
#pragma unroll
            for (int u = 0; u < U; ++u) {
                int p = base + u * 32 + lane;
                if (p >= pieces) break;
                float2 mt = meta[p];
                float d, unused;
                piece_dot<4, false>(v[u], v[u], smem + p * REC, d, unused);
                acc += raw_to_float(sc[u], dtype) * (d * mt.y) + raw_to_float(bi[u], dtype) * mt.x;
            }
        }
        acc = warp_sum(acc);
        if (lane == 0) y[r] = alpha * acc;
    }
}

// Experimental, not used by the engine: the weights streamed into shared memory by the bulk
// copy engine (cp.async.bulk, completing on an mbarrier) instead of register loads. A block
// takes a contiguous range of rows in stages of BULK_ROWS rows (one per warp), and asks for
// its first stages before it stages x, so that the weights' latency overlaps the staging and
// up to `stages` stages are always in flight without holding registers. Same arithmetic and
// order as matvec_q4 (bf16 scales and biases, group 64), so the same bits.
#define BULK_ROWS 8
__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void bulk_load(void* dst, const void* src, unsigned bytes, unsigned long long* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     smem_addr(dst)),
                 "l"(src), "r"(bytes), "r"(smem_addr(bar))
                 : "memory");
}

__device__ __forceinline__ void bar_wait(unsigned long long* bar, unsigned parity) {
    asm volatile(
        "{\n .reg .pred p;\n wait_%=:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra wait_%=;\n}" ::"r"(
            smem_addr(bar)),
        "r"(parity)
        : "memory");
}

__global__ void matvec_q4_bulk(const u8* w, const u8* scales, const u8* biases, const float* x, int rows, int cols,
                               int rows_per_block, int stages, float* y, float alpha) {
    constexpr int PF = 32, REC = staged_record(4), U = ROWS_UNROLL;
    extern __shared__ uint4 smem_vec[];
    u8* smem = (u8*)smem_vec;
    __shared__ unsigned long long bars[8];
    int pieces = cols / PF, xbytes = staged_bytes(4, cols);
    int row_bytes = cols / 2, group_bytes = (cols / 64) * 2;
    int stage_bytes = BULK_ROWS * (row_bytes + 2 * group_bytes);
    u8* buf = smem + xbytes;
    int first = blockIdx.x * rows_per_block, last = min(rows, first + rows_per_block);
    int count = (last - first + BULK_ROWS - 1) / BULK_ROWS;
    auto issue = [&](int k) {  // stage k of this block into buffer k % stages
        int a = first + k * BULK_ROWS, n = min(BULK_ROWS, last - a);
        u8* b = buf + (k % stages) * stage_bytes;
        unsigned long long* bar = &bars[k % stages];
        unsigned tx = n * (row_bytes + 2 * group_bytes);
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(tx) : "memory");
        bulk_load(b, w + (long long)a * row_bytes, n * row_bytes, bar);
        bulk_load(b + BULK_ROWS * row_bytes, scales + (long long)a * group_bytes, n * group_bytes, bar);
        bulk_load(b + BULK_ROWS * (row_bytes + group_bytes), biases + (long long)a * group_bytes, n * group_bytes,
                  bar);
    };
    if (threadIdx.x == 0) {
        for (int i = 0; i < stages; ++i)
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(&bars[i])) : "memory");
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        for (int k = 0; k < min(stages, count); ++k) issue(k);
    }
    stage_x<4>(x, cols, smem);  // ends with a barrier, which also publishes the mbarriers' init
    const float2* meta = (const float2*)(smem + pieces * REC);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int k = 0; k < count; ++k) {
        bar_wait(&bars[k % stages], (k / stages) & 1);
        u8* b = buf + (k % stages) * stage_bytes;
        int r = first + k * BULK_ROWS + warp;
        if (r < last) {
            const uint4* codes = (const uint4*)(b + warp * row_bytes);
            const u16* sc = (const u16*)(b + BULK_ROWS * row_bytes + warp * group_bytes);
            const u16* bi = (const u16*)(b + BULK_ROWS * (row_bytes + group_bytes) + warp * group_bytes);
            float acc = 0.0f;
            for (int base = 0; base < pieces; base += 32 * U) {
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    int p = base + u * 32 + lane;
                    if (p >= pieces) break;
                    float2 mt = meta[p];
                    float d, unused;
                    piece_dot<4, false>(codes[p], codes[p], smem + p * REC, d, unused);
                    int g = p >> 1;  // 32 codes per piece, 64 per group
                    acc += bf16_to_f32(sc[g]) * (d * mt.y) + bf16_to_f32(bi[g]) * mt.x;
                }
            }
            acc = warp_sum(acc);
            if (lane == 0) y[r] = alpha * acc;
        }
        __syncthreads();  // the buffer is free again
        if (threadIdx.x == 0 && k + stages < count) issue(k + stages);
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

// ---------------------------------------------------------------------------------------
// Experimental, not used by the engine: a chain of dependent one-token products in one
// persistent launch. Every block stays resident and runs each step's rows as matvec_q4 /
// matvec_pairs_q4 would, then arrives on the step's counter; before step s + 1 stages its x
// it waits until every block has arrived on step s (a grid barrier through global memory).
// No launch ramp between steps, and (PREFETCH) a block that has finished its rows of a step
// asks L2 for its rows of the next one while the stragglers finish. The last block out sets
// the counters back to 0, so that the launch can be replayed.
struct ChainStep {
    const u8 *w, *s, *b;
    const float* x;
    float* y;
    int rows, cols, pairs;
};

__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// This warp's rows of `st` (as the row loop below takes them) asked into L2.
__device__ void prefetch_rows(const ChainStep& st) {
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5, step = st.pairs ? 2 : 1;
    long long row_bytes = st.cols / 2, scale_bytes = st.cols / 64 * 2;
    for (int r = step * (blockIdx.x * warps + (threadIdx.x >> 5)); r < st.rows; r += step * gridDim.x * warps) {
        int n = min(step, st.rows - r);
        const u8* w = st.w + r * row_bytes;
        for (long long o = 128LL * lane; o < n * row_bytes; o += 32 * 128) prefetch_l2(w + o);
        if (lane < n) prefetch_l2(st.s + (r + lane) * scale_bytes), prefetch_l2(st.b + (r + lane) * scale_bytes);
    }
}

template <bool PREFETCH>
__global__ void __launch_bounds__(256, 3) chain_persistent_q4(const ChainStep* steps, int n, unsigned* done,
                                                               float alpha) {
    extern __shared__ uint4 smem_vec[];
    u8* smem = (u8*)smem_vec;
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int s = 0; s < n; ++s) {
        ChainStep st = steps[s];
        if (s > 0) {
            if (threadIdx.x == 0) {
                while (load_acquire(&done[s - 1]) < gridDim.x) {
                }
            }
            __syncthreads();
        }
        stage_x<4>(st.x, st.cols, smem);
        Affine a = {st.w, st.s, st.b};
        int step = st.pairs ? 2 : 1;
        for (int r = step * (blockIdx.x * warps + (threadIdx.x >> 5)); r < st.rows; r += step * gridDim.x * warps) {
            float acc_a = 0.0f, acc_b = 0.0f;
            if (st.pairs) {
                row_pair_dot<4>(a, r, st.rows, st.cols, 64, DT_BF16, smem, acc_a, acc_b);
            } else {
                row_dot<4, false>(a, a, r, st.cols / 32, 64, DT_BF16, smem, acc_a, acc_b);
                acc_a = warp_sum(acc_a);
            }
            if (lane == 0) {
                st.y[r] = alpha * acc_a;
                if (st.pairs && r + 1 < st.rows) st.y[r + 1] = alpha * acc_b;
            }
        }
        if (PREFETCH && s + 1 < n) prefetch_rows(steps[s + 1]);
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();
            atomicAdd(&done[s], 1u);
        }
    }
    if (threadIdx.x == 0 && atomicAdd(&done[n], 1u) == gridDim.x - 1) {
        for (int s = 0; s <= n; ++s) done[s] = 0;
        __threadfence();
    }
}

// Row pairs with UNROLL pieces of each row in flight per lane (the engine's kernel: 2), for
// matrices whose grid leaves room on the multiprocessors anyway (4096 rows: two blocks each).
template <int UNROLL>
__global__ void matvec_pairs_unroll_q4(const u8* w, const u8* scales, const u8* biases, const float* x, int rows,
                                       int cols, float* y, float alpha) {
    extern __shared__ uint4 smem_vec[];
    u8* smem = (u8*)smem_vec;
    stage_x<4>(x, cols, smem);
    Affine a = {w, scales, biases};
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int r = 2 * (blockIdx.x * warps + (threadIdx.x >> 5)); r < rows; r += 2 * gridDim.x * warps) {
        float acc_a = 0.0f, acc_b = 0.0f;
        row_dot<4, true, UNROLL>(a, r + 1 < rows ? next_row<4>(a, cols, 64, DT_BF16) : a, r, cols / 32, 64, DT_BF16,
                                 smem, acc_a, acc_b);
        acc_a = warp_sum(acc_a);
        acc_b = warp_sum(acc_b);
        if (lane == 0) {
            y[r] = alpha * acc_a;
            if (r + 1 < rows) y[r + 1] = alpha * acc_b;
        }
    }
}

// The grid barrier of chain_persistent_q4 alone, `n` times, for its cost against a kernel
// boundary in a graph.
__global__ void barrier_chain(int n, unsigned* done) {
    for (int s = 0; s < n; ++s) {
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();
            atomicAdd(&done[s], 1u);
            while (load_acquire(&done[s]) < gridDim.x) {
            }
        }
    }
    __syncthreads();
    if (threadIdx.x == 0 && atomicAdd(&done[n], 1u) == gridDim.x - 1) {
        for (int s = 0; s <= n; ++s) done[s] = 0;
        __threadfence();
    }
}

__global__ void noop() {}

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
    size_t code_bytes() const { return (size_t)rows * cols * bits / 8; }
    size_t scale_bytes() const { return (size_t)rows * (cols / 64) * 2; }  // bf16, group 64
    size_t bytes() const { return code_bytes() + 2 * scale_bytes(); }
};

static Matrix make_matrix(int rows, int cols, int bits, u32 seed) {
    Matrix m{nullptr, nullptr, nullptr, rows, cols, bits};
    size_t code_bytes = m.code_bytes(), groups = m.scale_bytes() / 2;
    CHECK(cudaMalloc(&m.w, code_bytes));
    CHECK(cudaMalloc(&m.s, groups * 2));
    CHECK(cudaMalloc(&m.b, groups * 2));
    fill_random<<<1024, 256>>>((u32*)m.w, code_bytes / 4, seed);
    fill_bf16<<<1024, 256>>>((u32*)m.s, groups / 2, seed + 1, 0.001f, 0.02f);
    fill_bf16<<<1024, 256>>>((u32*)m.b, groups / 2, seed + 2, -0.1f, 0.2f);
    CHECK(cudaGetLastError());
    return m;
}

static size_t smem_bytes(int bits, int cols) { return (size_t)staged_bytes(bits, cols); }

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

static void launch_matvec(const Matrix& m, const float* x, float* y, int grid, int threads = THREADS) {
    size_t smem = smem_bytes(m.bits, m.cols);
    if (m.bits == 4)
        matvec_q4<<<grid, threads, smem>>>(m.w, m.s, m.b, 64, DT_BF16, x, m.rows, m.cols, y, 1.0f, 0.0f);
    else
        matvec_q2<<<grid, threads, smem>>>(m.w, m.s, m.b, 64, DT_BF16, x, m.rows, m.cols, y, 1.0f, 0.0f);
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

static void bench_matvec(const char* name, int rows, int cols, int bits, int copies) {
    std::vector<Matrix> ms;
    for (int i = 0; i < copies; ++i) ms.push_back(make_matrix(rows, cols, bits, 1000 + 17 * i));
    float *x, *y, *ref;
    CHECK(cudaMalloc(&x, cols * 4));
    CHECK(cudaMalloc(&y, (size_t)rows * 4));
    CHECK(cudaMalloc(&ref, (size_t)rows * 4));
    fill_float<<<64, 256>>>(x, cols, 7);
    reference_matvec(ms[0], x, ref);
    const void* kernel = bits == 4 ? (const void*)matvec_q4 : (const void*)matvec_q2;
    for (int resident = 0; resident < 2; ++resident) {
        int grid = grid_for(kernel, smem_bytes(bits, cols), rows, resident);
        char label[128];
        snprintf(label, sizeof label, "%s, %s grid %d", name, resident ? "resident (engine)" : "8 per SM", grid);
        check_and_time(label, ms, y, ref, [&](const Matrix& m) { launch_matvec(m, x, y, grid); });
    }
    // Bigger blocks: x staged once per 16 or 32 warps instead of 8.
    for (int threads : {512, 1024}) {
        int per_sm = 0;
        CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem_bytes(bits, cols)));
        if (per_sm == 0) continue;  // too many registers for a block that size
        int grid = std::min((rows + threads / 32 - 1) / (threads / 32), per_sm * g_sms);
        char label[128];
        snprintf(label, sizeof label, "%s, %d threads grid %d", name, threads, grid);
        check_and_time(label, ms, y, ref, [&](const Matrix& m) { launch_matvec(m, x, y, grid, threads); });
    }
    for (auto& m : ms) cudaFree(m.w), cudaFree(m.s), cudaFree(m.b);
    cudaFree(x), cudaFree(y), cudaFree(ref);
}

// The batched experts with the engine's grids: gate/up in two whole waves, down 16 rows per block.
static void launch_experts(const ExpertBatch& batch, int bits, const float* x, float* act, float* out) {
    int inter = 1024, hidden = 4096, count = batch.count;
    size_t up_smem = smem_bytes(bits, hidden), down_smem = smem_bytes(bits, inter) * count;
    const void* sw = bits == 4 ? (const void*)swiglu_batch_q4 : (const void*)swiglu_batch_q2;
    int per_sm = 0;
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, sw, THREADS, up_smem));
    int g1 = std::min((count * inter + 7) / 8, 2 * per_sm * g_sms);
    int g2 = (hidden + 15) / 16;
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
        CHECK(cudaMemset(out, 0, hidden * 4));
        launch_experts(batches[0], bits, x, act, out);
        double err = rel_l2(fetch(out, hidden), fetch(ref, hidden));
        int i = 0;
        double us = median_us(7, (int)batches.size(), [&] { launch_experts(batches[i++ % batches.size()], bits, x, act, out); });
        char label[128];
        snprintf(label, sizeof label, "%d experts %d-bit batched (err %.1e)", k, bits, err);
        row(label, us, k * expert_bytes);
    }
    for (int e = 0; e < n; ++e)
        for (Matrix* m : {&gate[e], &up[e], &down[e]}) cudaFree(m->w), cudaFree(m->s), cudaFree(m->b);
    cudaFree(x), cudaFree(act), cudaFree(out), cudaFree(ref), cudaFree(g), cudaFree(u), cudaFree(a), cudaFree(d);
}

// A matrix in page-locked host memory, which kernels read over PCIe (zero-copy: with
// unified addressing the host pointer is valid on the device).
static Matrix make_host_matrix(int rows, int cols, int bits, u32 seed) {
    Matrix d = make_matrix(rows, cols, bits, seed), h = d;
    size_t code_bytes = d.code_bytes(), scale_bytes = d.scale_bytes();
    CHECK(cudaHostAlloc(&h.w, code_bytes, cudaHostAllocMapped));
    CHECK(cudaHostAlloc(&h.s, scale_bytes, cudaHostAllocMapped));
    CHECK(cudaHostAlloc(&h.b, scale_bytes, cudaHostAllocMapped));
    CHECK(cudaMemcpy(h.w, d.w, code_bytes, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(h.s, d.s, scale_bytes, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(h.b, d.b, scale_bytes, cudaMemcpyDeviceToHost));
    cudaFree(d.w), cudaFree(d.s), cudaFree(d.b);
    return h;
}


// Experts held in page-locked host memory, K per token: copied to the device and then
// computed (what the engine does for a miss, less the host's wait for the routing), against
// the batched kernels reading the host memory directly, and the copies alone.
static void bench_zero_copy(int bits) {
    const int n = 32, inter = 1024, hidden = 4096;
    std::vector<Matrix> host[3];
    for (int e = 0; e < n; ++e)
        for (int m = 0; m < 3; ++m)
            host[m].push_back(m < 2 ? make_host_matrix(inter, hidden, bits, 70000 + 3 * e + m)
                                    : make_host_matrix(hidden, inter, bits, 70000 + 3 * e + m));
    double expert_bytes = (double)(host[0][0].bytes() + host[1][0].bytes() + host[2][0].bytes());
    // Device slots for one batch of up to 16 experts.
    Matrix slot[16][3];
    for (int j = 0; j < 16; ++j)
        for (int m = 0; m < 3; ++m) {
            slot[j][m] = host[m][0];
            CHECK(cudaMalloc(&slot[j][m].w, host[m][0].code_bytes()));
            CHECK(cudaMalloc(&slot[j][m].s, host[m][0].scale_bytes()));
            CHECK(cudaMalloc(&slot[j][m].b, host[m][0].scale_bytes()));
        }
    float *x, *act, *out, *ref;
    CHECK(cudaMalloc(&x, hidden * 4));
    CHECK(cudaMalloc(&act, 16 * inter * 4));
    CHECK(cudaMalloc(&out, hidden * 4));
    CHECK(cudaMalloc(&ref, hidden * 4));
    fill_float<<<64, 256>>>(x, hidden, 11);
    auto batch_of = [&](int first, int k, bool on_device) {
        ExpertBatch bt{};
        bt.count = k;
        bt.shared_slot = -1;
        for (int j = 0; j < k; ++j) {
            for (int m = 0; m < 3; ++m) {
                const Matrix& src = on_device ? slot[j][m] : host[m][(first + j) % n];
                bt.w[j][3 * m] = src.w, bt.w[j][3 * m + 1] = src.s, bt.w[j][3 * m + 2] = src.b;
            }
            bt.weight[j] = 0.05f + 0.01f * j;
        }
        return bt;
    };
    auto copy_in = [&](int first, int k) {
        for (int j = 0; j < k; ++j)
            for (int m = 0; m < 3; ++m) {
                const Matrix& src = host[m][(first + j) % n];
                CHECK(cudaMemcpyAsync(slot[j][m].w, src.w, src.code_bytes(), cudaMemcpyHostToDevice));
                CHECK(cudaMemcpyAsync(slot[j][m].s, src.s, src.scale_bytes(), cudaMemcpyHostToDevice));
                CHECK(cudaMemcpyAsync(slot[j][m].b, src.b, src.scale_bytes(), cudaMemcpyHostToDevice));
            }
    };
    for (int k : {4, 10}) {
        int batches = n / k;
        CHECK(cudaMemset(ref, 0, hidden * 4));
        copy_in(0, k);
        launch_experts(batch_of(0, k, true), bits, x, act, ref);
        CHECK(cudaMemset(out, 0, hidden * 4));
        launch_experts(batch_of(0, k, false), bits, x, act, out);
        double err = rel_l2(fetch(out, hidden), fetch(ref, hidden));
        int i = 0;
        double copy_us = median_us(7, batches, [&] { copy_in(k * (i++ % batches), k); });
        double both_us = median_us(7, batches, [&] {
            int first = k * (i++ % batches);
            copy_in(first, k);
            launch_experts(batch_of(first, k, true), bits, x, act, out);
        });
        double zero_us = median_us(7, batches, [&] {
            launch_experts(batch_of(k * (i++ % batches), k, false), bits, x, act, out);
        });
        char label[128];
        snprintf(label, sizeof label, "%d experts %d-bit from host: copies only", k, bits);
        row(label, copy_us, k * expert_bytes);
        snprintf(label, sizeof label, "%d experts %d-bit from host: copies, then kernels", k, bits);
        row(label, both_us, k * expert_bytes);
        snprintf(label, sizeof label, "%d experts %d-bit from host: kernels read host (err %.1e)", k, bits, err);
        row(label, zero_us, k * expert_bytes);
    }
    for (int m = 0; m < 3; ++m)
        for (auto& h : host[m]) cudaFreeHost(h.w), cudaFreeHost(h.s), cudaFreeHost(h.b);
    for (auto& js : slot)
        for (auto& d : js) cudaFree(d.w), cudaFree(d.s), cudaFree(d.b);
    cudaFree(x), cudaFree(act), cudaFree(out), cudaFree(ref);
}

// Captures what `launch(stream)` enqueues into a graph, for replays.
template <class F>
static cudaGraphExec_t capture(F launch) {
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaGraph_t g;
    CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    launch(s);
    CHECK(cudaStreamEndCapture(s, &g));
    cudaGraphExec_t exec;
    CHECK(cudaGraphInstantiate(&exec, g, 0));
    CHECK(cudaGraphDestroy(g));
    CHECK(cudaStreamDestroy(s));
    return exec;
}

// Sixteen in_proj-sized matrices and the buffers of a chain of products through them, each
// reading the one before's output (as a decode step does); x in buf[0].
struct InProjChain {
    static const int rows = 12288, cols = 4096, n = 16;
    std::vector<Matrix> ms;
    std::vector<float*> buf;
    InProjChain() : buf(n + 1) {
        for (int i = 0; i < n; ++i) ms.push_back(make_matrix(rows, cols, 4, 9000 + 7 * i));
        for (auto& b : buf) CHECK(cudaMalloc(&b, (size_t)rows * 4));
        fill_float<<<64, 256>>>(buf[0], cols, 13);
    }
    ~InProjChain() {
        for (auto& m : ms) cudaFree(m.w), cudaFree(m.s), cudaFree(m.b);
        for (auto& b : buf) cudaFree(b);
    }
};

// The in_proj chain: plain launches; the prefetching kernel launched for programmatic
// dependent launch; and both captured into a CUDA graph and replayed (no host launch cost, shorter gaps). All
// must give the same bits. Outputs are scaled by 1/64 so that 16 products stay finite.
static void bench_chain() {
    InProjChain c;
    const int rows = c.rows, cols = c.cols, chain = c.n;
    std::vector<Matrix>& ms = c.ms;
    std::vector<float*>& buf = c.buf;
    size_t smem = smem_bytes(4, cols);
    int per_sm = 0;
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, (const void*)matvec_q4_pdl, THREADS, smem));
    int grid = std::min((rows + 7) / 8, per_sm * g_sms);
    const float alpha = 1.0f / 64;
    auto run = [&](bool pdl, cudaStream_t s) {
        for (int i = 0; i < chain; ++i) {
            const Matrix& m = ms[i];
            if (!pdl) {
                matvec_q4<<<grid, THREADS, smem, s>>>(m.w, m.s, m.b, 64, DT_BF16, buf[i], rows, cols, buf[i + 1],
                                                      alpha, 0.0f);
                continue;
            }
            cudaLaunchConfig_t cfg = {};
            cfg.gridDim = dim3(grid);
            cfg.blockDim = dim3(THREADS);
            cfg.dynamicSmemBytes = smem;
            cfg.stream = s;
            cudaLaunchAttribute attr[1];
            attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
            attr[0].val.programmaticStreamSerializationAllowed = 1;
            cfg.attrs = attr;
            cfg.numAttrs = 1;
            CHECK(cudaLaunchKernelEx(&cfg, matvec_q4_pdl, (const u8*)m.w, (const u8*)m.s, (const u8*)m.b, 64,
                                     DT_BF16, (const float*)buf[i], rows, cols, buf[i + 1], alpha));
        }
    };
    const char* names[4] = {"plain launches", "L2 prefetch, dependent launch", "plain, graph replay",
                            "L2 prefetch, dependent launch, graph replay"};
    std::vector<float> want;
    for (int how = 0; how < 4; ++how) {
        bool pdl = how & 1;
        cudaGraphExec_t exec = nullptr;
        if (how >= 2) exec = capture([&](cudaStream_t s) { run(pdl, s); });
        auto once = [&] {
            if (exec) CHECK(cudaGraphLaunch(exec, 0));
            else run(pdl, 0);
        };
        once();
        std::vector<float> got = fetch(buf[chain], rows);
        if (how == 0) want = got;
        double us = median_us(7, 1, once) / chain;
        char label[128];
        snprintf(label, sizeof label, "%d chained in_proj products, %s (err %.1e)", chain, names[how],
                 rel_l2(got, want));
        row(label, us, (double)ms[0].bytes());
        if (exec) CHECK(cudaGraphExecDestroy(exec));
    }
}

// The in_proj chain with x pre-staged per product (a one-block staging launch, then the
// product copying the staged x), replayed from a graph, against the engine's kernel in the
// same chain; and the pre-staged products alone (x staged once, untimed).
static void bench_prestaged() {
    InProjChain c;
    const int rows = c.rows, cols = c.cols, chain = c.n;
    std::vector<Matrix>& ms = c.ms;
    std::vector<float*>& buf = c.buf;
    u8* staged;
    CHECK(cudaMalloc(&staged, staged_bytes(4, cols)));
    size_t smem = smem_bytes(4, cols);
    const void* kernels[3] = {(const void*)matvec_q4, (const void*)matvec_q4_prestaged<false>,
                              (const void*)matvec_q4_prestaged<true>};
    const char* names[3] = {"engine kernel", "pre-staged x", "pre-staged x, first row preloaded"};
    std::vector<float> want;
    for (int how = 0; how < 3; ++how) {
        int per_sm = 0;
        CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernels[how], THREADS, smem));
        int grid = std::min((rows + 7) / 8, per_sm * g_sms);
        auto product = [&](int i, cudaStream_t s) {
            const Matrix& m = ms[i];
            if (how == 0) {
                matvec_q4<<<grid, THREADS, smem, s>>>(m.w, m.s, m.b, 64, DT_BF16, buf[i], rows, cols, buf[i + 1],
                                                      1.0f / 64, 0.0f);
                return;
            }
            prestage_q4<<<1, THREADS, 0, s>>>(buf[i], cols, staged);
            if (how == 1)
                matvec_q4_prestaged<false><<<grid, THREADS, smem, s>>>(m.w, m.s, m.b, 64, DT_BF16, staged, rows,
                                                                       cols, buf[i + 1], 1.0f / 64);
            else
                matvec_q4_prestaged<true><<<grid, THREADS, smem, s>>>(m.w, m.s, m.b, 64, DT_BF16, staged, rows,
                                                                      cols, buf[i + 1], 1.0f / 64);
        };
        cudaGraphExec_t exec = capture([&](cudaStream_t s) {
            for (int i = 0; i < chain; ++i) product(i, s);
        });
        CHECK(cudaGraphLaunch(exec, 0));
        std::vector<float> got = fetch(buf[chain], rows);
        if (how == 0) want = got;
        double us = median_us(7, 1, [&] { CHECK(cudaGraphLaunch(exec, 0)); }) / chain;
        char label[160];
        snprintf(label, sizeof label, "16 chained in_proj, graph, %s (err %.1e)", names[how], rel_l2(got, want));
        row(label, us, (double)ms[0].bytes());
        CHECK(cudaGraphExecDestroy(exec));
        if (how > 0) {
            prestage_q4<<<1, THREADS>>>(buf[0], cols, staged);
            int i = 0;
            double alone = median_us(7, 16, [&] {
                const Matrix& m = ms[i++ % chain];
                if (how == 1)
                    matvec_q4_prestaged<false><<<grid, THREADS, smem>>>(m.w, m.s, m.b, 64, DT_BF16, staged, rows,
                                                                        cols, buf[1], 1.0f);
                else
                    matvec_q4_prestaged<true><<<grid, THREADS, smem>>>(m.w, m.s, m.b, 64, DT_BF16, staged, rows,
                                                                       cols, buf[1], 1.0f);
            });
            snprintf(label, sizeof label, "in_proj product alone, %s, grid %d", names[how], grid);
            row(label, alone, (double)ms[0].bytes());
        }
    }
    cudaFree(staged);
}

// The bulk-copy product against the engine's kernel: alone (over copies of the matrix, so
// none is in L2) and in a chain of 16 replayed from a graph, for in_proj and out_proj.
static void bench_bulk() {
    for (int which = 0; which < 2; ++which) {
        const int rows = which == 0 ? 12288 : 4096, cols = which == 0 ? 4096 : 8192, chain = 16;
        const char* name = which == 0 ? "in_proj 12288x4096" : "out_proj 4096x8192";
        std::vector<Matrix> ms;
        for (int i = 0; i < chain; ++i) ms.push_back(make_matrix(rows, cols, 4, 7000 + 11 * i));
        std::vector<float*> buf(chain + 1);
        for (auto& b : buf) CHECK(cudaMalloc(&b, (size_t)std::max(rows, cols) * 4));
        fill_float<<<64, 256>>>(buf[0], cols, 21);
        size_t smem = smem_bytes(4, cols);
        int per_sm = 0;
        CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, (const void*)matvec_q4, THREADS, smem));
        int grid = std::min((rows + 7) / 8, per_sm * g_sms);
        int row_bytes = cols / 2, group_bytes = cols / 64 * 2;
        size_t stage = BULK_ROWS * (row_bytes + 2 * group_bytes);
        CHECK(cudaFuncSetAttribute(matvec_q4_bulk, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
        for (int stages : {2, 3, 4, 6}) {
            size_t bsmem = smem + stages * stage;
            if (bsmem > 200 * 1024) continue;
            int bper = 0;
            CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&bper, (const void*)matvec_q4_bulk, THREADS, bsmem));
            int bgrid = bper * g_sms;
            int rpb = ((rows + bgrid - 1) / bgrid + BULK_ROWS - 1) / BULK_ROWS * BULK_ROWS;
            bgrid = (rows + rpb - 1) / rpb;
            auto product = [&](int how, int i, const float* in, float* out, float alpha, cudaStream_t s) {
                const Matrix& m = ms[i];
                if (how == 0)
                    matvec_q4<<<grid, THREADS, smem, s>>>(m.w, m.s, m.b, 64, DT_BF16, in, rows, cols, out, alpha, 0.0f);
                else
                    matvec_q4_bulk<<<bgrid, THREADS, bsmem, s>>>(m.w, m.s, m.b, in, rows, cols, rpb, stages, out, alpha);
            };
            for (int how = 0; how < 2; ++how) {
                if (how == 0 && stages != 2) continue;
                // Alone: the same x, the matrices in turn.
                product(how, 0, buf[0], buf[1], 1.0f, 0);
                std::vector<float> got = fetch(buf[1], rows);
                product(0, 0, buf[0], buf[1], 1.0f, 0);
                double err = rel_l2(got, fetch(buf[1], rows));
                int i = 0;
                double alone = median_us(7, chain, [&] { product(how, i++ % chain, buf[0], buf[1], 1.0f, 0); });
                char label[192];
                snprintf(label, sizeof label, "%s %s alone (err %.1e)", name,
                         how == 0 ? "engine kernel" : "bulk copies", err);
                if (how == 1) snprintf(label + strlen(label), 40, ", %d stages, %d blocks", stages, bgrid);
                row(label, alone, (double)ms[0].bytes());
                // A chain (square matrices only: the output feeds the next product).
                if (rows != cols && which == 1) continue;
                cudaGraphExec_t exec = capture([&](cudaStream_t s) {
                    for (int j = 0; j < chain; ++j) product(how, j, buf[j], buf[j + 1], 1.0f / 64, s);
                });
                double us = median_us(7, 1, [&] { CHECK(cudaGraphLaunch(exec, 0)); }) / chain;
                snprintf(label, sizeof label, "%s %s, 16 chained, graph", name, how == 0 ? "engine kernel" : "bulk copies");
                row(label, us, (double)ms[0].bytes());
                CHECK(cudaGraphExecDestroy(exec));
            }
        }
        for (auto& m : ms) cudaFree(m.w), cudaFree(m.s), cudaFree(m.b);
        for (auto& b : buf) cudaFree(b);
    }
}

// What one launch that only reads `bytes` achieves, in a chain of 16 launches over distinct
// buffers (so that L2 holds none of them), launched plainly and replayed from a graph: the
// ceiling for a product of that size.
static void bench_read_sizes() {
    const int chain = 16;
    u32* sink;
    CHECK(cudaMalloc(&sink, 4));
    for (size_t bytes : {2359296ul, 7077888ul, 28311552ul, 113246208ul}) {
        std::vector<u8*> bufs(chain);
        for (auto& b : bufs) {
            CHECK(cudaMalloc(&b, bytes));
            fill_random<<<256, 256>>>((u32*)b, bytes / 4, 5);
        }
        auto run = [&](cudaStream_t s) {
            for (auto* b : bufs) read_only<<<g_sms * 8, 256, 0, s>>>((const uint4*)b, bytes / 16, sink);
        };
        cudaGraphExec_t exec = capture(run);
        double plain = median_us(7, 1, [&] { run(0); }) / chain;
        double graph = median_us(7, 1, [&] { CHECK(cudaGraphLaunch(exec, 0)); }) / chain;
        char label[128];
        snprintf(label, sizeof label, "read-only %.1f MB x %d, plain launches", bytes / 1e6, chain);
        row(label, plain, (double)bytes);
        snprintf(label, sizeof label, "read-only %.1f MB x %d, graph replay", bytes / 1e6, chain);
        row(label, graph, (double)bytes);
        CHECK(cudaGraphExecDestroy(exec));
        for (auto* b : bufs) cudaFree(b);
    }
    cudaFree(sink);
}

// A named one-token product shape, and 16 distinct matrices of it with the buffers of a chain
// of products through them (each reading the one before's output, buf[0] the first input).
struct Shape {
    const char* name;
    int rows, cols;
};

struct ShapeChain {
    static const int n = 16;
    std::vector<Matrix> ms;
    std::vector<float*> buf;
    explicit ShapeChain(const Shape& sh) : buf(n + 1) {
        int len = std::max(sh.rows, sh.cols);
        for (auto& b : buf) {
            CHECK(cudaMalloc(&b, len * 4));
            fill_float<<<64, 256>>>(b, len, 23);
        }
        for (int i = 0; i < n; ++i) ms.push_back(make_matrix(sh.rows, sh.cols, 4, 15000 + 13 * i));
    }
    ~ShapeChain() {
        for (auto& m : ms) cudaFree(m.w), cudaFree(m.s), cudaFree(m.b);
        for (auto& b : buf) cudaFree(b);
    }
};

// Per product of one shape: 16 distinct matrices chained (each reading the one before's
// output) with the engine's kernels and grids, replayed from a graph; then a kernel boundary
// (32 empty kernels from a graph) against the persistent kernel's grid barrier (32 in one
// launch of as many blocks as the products take).
static void bench_chain_shapes() {
    const Shape shapes[] = {{"in_proj 12288x4096", 12288, 4096},   {"in_proj_z 8192x4096", 8192, 4096},
                            {"out_proj 4096x8192", 4096, 8192},    {"router 512x4096", 512, 4096},
                            {"10 experts' gate+up 20480x4096", 20480, 4096}, {"10 experts' down 4096x10240", 4096, 10240},
                            {"one expert's down 4096x1024", 4096, 1024}, {"one expert's gate 1024x4096", 1024, 4096}};
    const int n = ShapeChain::n;
    float alpha = 1.0f / 64;
    for (const Shape& sh : shapes) {
        ShapeChain c(sh);
        std::vector<Matrix>& ms = c.ms;
        std::vector<float*>& buf = c.buf;
        size_t smem = smem_bytes(4, sh.cols);
        bool pairs = sh.rows / 16 >= g_sms;
        int per_sm = 0;
        CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &per_sm, pairs ? (const void*)matvec_pairs_q4 : (const void*)matvec_q4, THREADS, smem));
        int grid = pairs ? std::min(sh.rows / 16, per_sm * g_sms) : std::min((sh.rows + 7) / 8, per_sm * g_sms);
        cudaGraphExec_t exec = capture([&](cudaStream_t s) {
            for (int i = 0; i < n; ++i) {
                const Matrix& m = ms[i];
                if (pairs)
                    matvec_pairs_q4<<<grid, THREADS, smem, s>>>(m.w, m.s, m.b, 64, DT_BF16, buf[i], m.rows, m.cols,
                                                                buf[i + 1], alpha, 0.0f);
                else
                    matvec_q4<<<grid, THREADS, smem, s>>>(m.w, m.s, m.b, 64, DT_BF16, buf[i], m.rows, m.cols,
                                                          buf[i + 1], alpha, 0.0f);
            }
        });
        double us = median_us(9, 2, [&] { CHECK(cudaGraphLaunch(exec, 0)); }) / n;
        char label[128];
        snprintf(label, sizeof label, "%s, %d chained, graph (%d blocks)", sh.name, n, grid);
        row(label, us, (double)ms[0].bytes());
        CHECK(cudaGraphExecDestroy(exec));
    }
    const int k = 32, grid = 3 * g_sms;
    cudaGraphExec_t empty = capture([&](cudaStream_t s) {
        for (int i = 0; i < k; ++i) noop<<<grid, THREADS, 0, s>>>();
    });
    printf("kernel boundary (32 empty kernels of %d blocks, graph): %.2f us each\n", grid,
           median_us(9, 2, [&] { CHECK(cudaGraphLaunch(empty, 0)); }) / k);
    unsigned* done;
    CHECK(cudaMalloc(&done, (k + 1) * 4));
    CHECK(cudaMemset(done, 0, (k + 1) * 4));
    printf("grid barrier (32 in one launch of %d blocks): %.2f us each\n", grid,
           median_us(9, 2, [&] { barrier_chain<<<grid, THREADS>>>(k, done); }) / k);
    CHECK(cudaGraphExecDestroy(empty));
    cudaFree(done);
}

// Row pairs with 2 (the engine's), 4 and 8 pieces in flight per lane, chained per shape as
// in bench_chain_shapes, each on its own grid (as many blocks as fit, at most rows / 16).
static void bench_pairs_unroll() {
    const Shape shapes[] = {{"out_proj 4096x8192", 4096, 8192},
                            {"10 experts' down 4096x10240", 4096, 10240},
                            {"in_proj 12288x4096", 12288, 4096},
                            {"in_proj+z 20480x4096", 20480, 4096},
                            {"one expert's down 4096x1024", 4096, 1024}};
    const int n = ShapeChain::n;
    float alpha = 1.0f / 64;
    for (const Shape& sh : shapes) {
        ShapeChain c(sh);
        std::vector<Matrix>& ms = c.ms;
        std::vector<float*>& buf = c.buf;
        size_t smem = smem_bytes(4, sh.cols);
        std::vector<float> want;
        auto variant = [&](const char* label, const void* kernel, auto launch) {
            int per_sm = 0;
            CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
            CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, THREADS, smem));
            int grid = std::min(sh.rows / 16, per_sm * g_sms);
            cudaGraphExec_t exec = capture([&](cudaStream_t s) {
                for (int i = 0; i < n; ++i) launch(ms[i], buf[i], buf[i + 1], grid, s);
            });
            CHECK(cudaGraphLaunch(exec, 0));
            std::vector<float> got = fetch(buf[n], sh.rows);
            if (want.empty()) want = got;
            double us = median_us(9, 2, [&] { CHECK(cudaGraphLaunch(exec, 0)); }) / n;
            char full[160];
            snprintf(full, sizeof full, "%s, %s (%d/SM, err %.0e)", sh.name, label, per_sm, rel_l2(got, want));
            row(full, us, (double)ms[0].bytes());
            CHECK(cudaGraphExecDestroy(exec));
        };
        variant("engine pairs", (const void*)matvec_pairs_q4,
                [&](const Matrix& m, const float* x, float* y, int grid, cudaStream_t s) {
                    matvec_pairs_q4<<<grid, THREADS, smem, s>>>(m.w, m.s, m.b, 64, DT_BF16, x, m.rows, m.cols, y,
                                                                alpha, 0.0f);
                });
        variant("pairs, 4 in flight", (const void*)matvec_pairs_unroll_q4<4>,
                [&](const Matrix& m, const float* x, float* y, int grid, cudaStream_t s) {
                    matvec_pairs_unroll_q4<4><<<grid, THREADS, smem, s>>>(m.w, m.s, m.b, x, m.rows, m.cols, y, alpha);
                });
        variant("pairs, 8 in flight", (const void*)matvec_pairs_unroll_q4<8>,
                [&](const Matrix& m, const float* x, float* y, int grid, cudaStream_t s) {
                    matvec_pairs_unroll_q4<8><<<grid, THREADS, smem, s>>>(m.w, m.s, m.b, x, m.rows, m.cols, y, alpha);
                });
    }
}

// Four layers' worth of one-token products (in_proj 12288x4096, out_proj 4096x8192, router
// 512x4096, ten experts' gate and up as one 20480x4096, their down as one 4096x10240), each
// reading the one before's output: the engine's kernels on its grids replayed from a graph,
// against the whole chain in one persistent launch, without and with the L2 prefetch of each
// block's next rows. All must give the same bits.
static void bench_persistent() {
    struct Dims {
        int rows, cols;
    };
    const Dims layer[5] = {{12288, 4096}, {4096, 8192}, {512, 4096}, {20480, 4096}, {4096, 10240}};
    const int layers = 4, n = 5 * layers;
    std::vector<Matrix> ms;
    std::vector<float*> buf(n + 1);
    for (auto& b : buf) CHECK(cudaMalloc(&b, 20480 * 4));
    fill_float<<<64, 256>>>(buf[0], 20480, 17);
    std::vector<ChainStep> host(n);
    size_t smem = 0;
    double bytes = 0;
    for (int i = 0; i < n; ++i) {
        Dims sh = layer[i % 5];
        ms.push_back(make_matrix(sh.rows, sh.cols, 4, 12000 + 11 * i));
        bytes += ms[i].bytes();
        smem = std::max(smem, smem_bytes(4, sh.cols));
        host[i] = {ms[i].w, ms[i].s, ms[i].b, buf[i], buf[i + 1], sh.rows, sh.cols, sh.rows / 16 >= g_sms};
    }
    ChainStep* steps;
    unsigned* done;
    CHECK(cudaMalloc(&steps, n * sizeof(ChainStep)));
    CHECK(cudaMemcpy(steps, host.data(), n * sizeof(ChainStep), cudaMemcpyHostToDevice));
    CHECK(cudaMalloc(&done, (n + 1) * 4));
    CHECK(cudaMemset(done, 0, (n + 1) * 4));
    int single = 0, pair = 0, per_sm[2] = {0, 0};
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&single, (const void*)matvec_q4, THREADS, smem));
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&pair, (const void*)matvec_pairs_q4, THREADS, smem));
    CHECK(cudaFuncSetAttribute(chain_persistent_q4<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    CHECK(cudaFuncSetAttribute(chain_persistent_q4<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm[0], chain_persistent_q4<false>, THREADS, smem));
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm[1], chain_persistent_q4<true>, THREADS, smem));
    printf("persistent chain: %d steps, %.0f MB, blocks per SM %d/%d (engine kernels %d/%d)\n", n, bytes / 1e6,
           per_sm[0], per_sm[1], single, pair);
    const float alpha = 1.0f / 64;
    auto engine = [&](cudaStream_t s) {
        for (int i = 0; i < n; ++i) {
            const ChainStep& st = host[i];
            size_t sm = smem_bytes(4, st.cols);
            if (st.pairs) {
                int grid = std::min(st.rows / 16, pair * g_sms);
                matvec_pairs_q4<<<grid, THREADS, sm, s>>>(st.w, st.s, st.b, 64, DT_BF16, st.x, st.rows, st.cols, st.y,
                                                          alpha, 0.0f);
            } else {
                int grid = std::min((st.rows + 7) / 8, single * g_sms);
                matvec_q4<<<grid, THREADS, sm, s>>>(st.w, st.s, st.b, 64, DT_BF16, st.x, st.rows, st.cols, st.y, alpha,
                                                    0.0f);
            }
        }
    };
    auto persistent = [&](bool prefetch, cudaStream_t s) {
        if (prefetch)
            chain_persistent_q4<true><<<per_sm[1] * g_sms, THREADS, smem, s>>>(steps, n, done, alpha);
        else
            chain_persistent_q4<false><<<per_sm[0] * g_sms, THREADS, smem, s>>>(steps, n, done, alpha);
    };
    const char* names[3] = {"engine kernels, graph replay", "persistent", "persistent, L2 prefetch"};
    std::vector<float> want;
    for (int how = 0; how < 3; ++how) {
        cudaGraphExec_t exec = capture([&](cudaStream_t s) {
            if (how == 0) engine(s);
            else persistent(how == 2, s);
        });
        auto once = [&] { CHECK(cudaGraphLaunch(exec, 0)); };
        CHECK(cudaMemset(buf[n], 0xff, 4096 * 4));
        once();
        CHECK(cudaDeviceSynchronize());
        std::vector<float> got = fetch(buf[n], 4096);
        if (how == 0) want = got;
        double us = median_us(9, 4, once);
        char label[128];
        snprintf(label, sizeof label, "4 layers' products, %s (err %.1e)", names[how], rel_l2(got, want));
        row(label, us, bytes);
        CHECK(cudaGraphExecDestroy(exec));
    }
    for (auto& m : ms) cudaFree(m.w), cudaFree(m.s), cudaFree(m.b);
    for (auto& b : buf) cudaFree(b);
    cudaFree(steps), cudaFree(done);
}

// ---------------------------------------------------------------------------------------
// Experimental, not used by the engine: x staged by a thread-block cluster. Each of the C
// blocks of a cluster converts every C-th pass-slice of x's words and writes the records into
// the shared memory of all C blocks (distributed shared memory), so that x is read from L2
// and converted once per cluster instead of once per block. STAGE = false skips the staging
// (wrong results: a bound on what staging costs).
namespace cg = cooperative_groups;

template <int BITS, int C>
__device__ void stage_x_cluster(const float* x, int cols, u8* smem) {
    constexpr int M = 8 / BITS, COLS = 4 * M, PF = 128 / BITS, PASS = STAGE_WORDS;
    cg::cluster_group cluster = cg::this_cluster();
    int rank = (int)cluster.block_rank();
    u8* dst[C];
#pragma unroll
    for (int r = 0; r < C; ++r) dst[r] = cluster.map_shared_rank(smem, r);
    int pieces = cols / PF, words = cols / COLS;
    for (int base = 0; base < words; base += PASS * C * blockDim.x) {
        float4 v[PASS][M];
#pragma unroll
        for (int s = 0; s < PASS; ++s) {
            int c = base + (s * C + rank) * blockDim.x + threadIdx.x;
#pragma unroll
            for (int i = 0; i < M; ++i)
                v[s][i] = c < words ? ((const float4*)x)[(long long)c * M + i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
#pragma unroll
        for (int s = 0; s < PASS; ++s) {
            if (base + (s * C + rank) * blockDim.x >= words) break;
            int c = base + (s * C + rank) * blockDim.x + threadIdx.x;
            StagedWord<BITS> staged = stage_word<BITS>((const float*)v[s]);
            if (c < words)
#pragma unroll
                for (int r = 0; r < C; ++r) store_word(dst[r], pieces, c / 4, c % 4, staged);
        }
    }
}

template <int C, bool STAGE>
__global__ void __cluster_dims__(C, 1, 1) matvec_pairs_cluster_q4(const u8* w, const u8* scales, const u8* biases,
                                                                  int group, int dtype, const float* x, int rows,
                                                                  int cols, float* y, float alpha) {
    extern __shared__ uint4 smem_vec[];
    u8* smem = (u8*)smem_vec;
    if (STAGE) stage_x_cluster<4, C>(x, cols, smem);
    cg::this_cluster().sync();
    Affine a = {w, scales, biases};
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int r = 2 * (blockIdx.x * warps + (threadIdx.x >> 5)); r < rows; r += 2 * gridDim.x * warps) {
        float acc_a = 0.0f, acc_b = 0.0f;
        row_pair_dot<4>(a, r, rows, cols, group, dtype, smem, acc_a, acc_b);
        if (lane == 0) {
            y[r] = alpha * acc_a;
            if (r + 1 < rows) y[r + 1] = alpha * acc_b;
        }
    }
}

// Shapes whose grids give two blocks per multiprocessor, chained as in bench_chain_shapes:
// the engine's pair kernel against x staged once per cluster of 2 and 4 blocks, without
// staging at all, and the engine's single-row kernel on as many blocks as fit.
static void bench_cluster() {
    const Shape shapes[] = {{"out_proj 4096x8192", 4096, 8192}, {"down-sized 4096x10240", 4096, 10240},
                            {"in_proj 12288x4096", 12288, 4096}};
    const int n = 16;
    float alpha = 1.0f / 64;
    for (const Shape& sh : shapes) {
        ShapeChain c(sh);
        size_t smem = smem_bytes(4, sh.cols);
        const void* kernels[6] = {(const void*)matvec_pairs_q4,
                                  (const void*)matvec_pairs_cluster_q4<2, true>,
                                  (const void*)matvec_pairs_cluster_q4<4, true>,
                                  (const void*)matvec_pairs_cluster_q4<2, false>,
                                  (const void*)matvec_pairs_cluster_q4<1, true>,
                                  (const void*)matvec_q4};
        const char* names[6] = {"engine pairs", "cluster of 2", "cluster of 4", "cluster of 2, no staging (bound)",
                                "cluster of 1", "engine single rows"};
        for (auto k : {kernels[1], kernels[2], kernels[3], kernels[4]})
            CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        std::vector<float> want;
        for (int v = 0; v < 6; ++v) {
            int per_sm = 0;
            CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernels[v], THREADS, smem));
            int grid = std::min(sh.rows / (v == 5 ? 8 : 16), std::max(per_sm, 1) * g_sms);
            grid -= grid % 4;
            auto run = [&](cudaStream_t s) {
                int group = 64, dtype = DT_BF16;
                float beta = 0.0f;
                for (int i = 0; i < n; ++i) {
                    const Matrix& m = c.ms[i];
                    // The engine's kernels also take beta; the cluster variants do not.
                    void* args[] = {(void*)&m.w,    (void*)&m.s,    (void*)&m.b, &group,
                                    &dtype,         (void*)&c.buf[i], (void*)&m.rows, (void*)&m.cols,
                                    &c.buf[i + 1], &alpha,          &beta};
                    CHECK(cudaLaunchKernel(kernels[v], grid, THREADS, args, smem, s));
                }
            };
            run(0);
            CHECK(cudaDeviceSynchronize());
            std::vector<float> got = fetch(c.buf[1], sh.rows);
            if (v == 0) want = got;
            cudaGraphExec_t exec = capture(run);
            double us = median_us(9, 2, [&] { CHECK(cudaGraphLaunch(exec, 0)); }) / n;
            char label[160];
            snprintf(label, sizeof label, "%s, %s (%d blocks, err %.1e)", sh.name, names[v], grid, rel_l2(got, want));
            row(label, us, (double)c.ms[0].bytes());
            CHECK(cudaGraphExecDestroy(exec));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Experimental, not used by the engine: the batched gate/up product with its loads software
// pipelined. A warp's work is a sequence of (row, round) items, a round being U pieces of
// each matrix per lane; the next item's codes, scales and biases are loaded before this
// item's arithmetic, so that a warp always has a round of loads in flight (two register
// sets). Assumes whole rounds per row (cols a multiple of
// 32 U pieces).
template <int BITS, int U>
struct PipeRound {
    uint4 va[U], vb[U];
    u32 sa[U], ba[U], sb[U], bb[U];
};

template <int BITS, int U, int MIN_BLOCKS>
__global__ void __launch_bounds__(256, MIN_BLOCKS) swiglu_batch_pipe(ExpertBatch batch, int group, int dtype, const float* x,
                                                            int rows, int cols, float* act) {
    constexpr int PF = 128 / BITS, REC = staged_record(BITS);
    extern __shared__ uint4 smem_vec[];
    u8* smem = (u8*)smem_vec;
    stage_x<BITS>(x, cols, smem);
    int pieces = cols / PF, rounds = pieces / (32 * U);
    const float2* meta = (const float2*)(smem + pieces * REC);
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    int first = blockIdx.x * warps + (threadIdx.x >> 5), stride = gridDim.x * warps, total = batch.count * rows;
    if (first >= total) return;
    int items = (total - first + stride - 1) / stride * rounds;
    int group_shift = __ffs(group) - 1;
    long long groups = (long long)cols >> group_shift;
    auto load = [&](int item, PipeRound<BITS, U>& b) {
        int rr = first + item / rounds * stride, q = item % rounds, e = rr / rows, r = rr % rows;
        const u8* const* w = batch.w[e];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            int p = (q * U + u) * 32 + lane;
            long long g = r * groups + ((p * PF) >> group_shift);
            b.va[u] = ((const uint4*)w[0])[(long long)r * pieces + p];
            b.sa[u] = load_raw(w[1], dtype, g);
            b.ba[u] = load_raw(w[2], dtype, g);
            b.vb[u] = ((const uint4*)w[3])[(long long)r * pieces + p];
            b.sb[u] = load_raw(w[4], dtype, g);
            b.bb[u] = load_raw(w[5], dtype, g);
        }
    };
    float acc_g = 0.0f, acc_u = 0.0f;
    auto compute = [&](int item, const PipeRound<BITS, U>& b) {
        int q = item % rounds;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            int p = (q * U + u) * 32 + lane;
            float2 mt = meta[p];
            float dg, du;
            piece_dot<BITS, true>(b.va[u], b.vb[u], smem + p * REC, dg, du);
            acc_g += raw_to_float(b.sa[u], dtype) * (dg * mt.y) + raw_to_float(b.ba[u], dtype) * mt.x;
            acc_u += raw_to_float(b.sb[u], dtype) * (du * mt.y) + raw_to_float(b.bb[u], dtype) * mt.x;
        }
        if (q == rounds - 1) {
            float g = warp_sum(acc_g), v = warp_sum(acc_u);
            if (lane == 0) act[first + item / rounds * stride] = siluf(g) * v;
            acc_g = 0.0f, acc_u = 0.0f;
        }
    };
    PipeRound<BITS, U> b0, b1;
    load(0, b0);
    for (int item = 0; item < items; item += 2) {
        if (item + 1 < items) load(item + 1, b1);
        compute(item, b0);
        if (item + 2 < items) load(item + 2, b0);
        if (item + 1 < items) compute(item + 1, b1);
    }
}

// The batched gate/up product alone (K experts of 1024x4096, 4-bit), each launch on a new
// batch of experts: the engine's kernel against the software-pipelined one, one wave each.
static void bench_pipe() {
    const int n = 200, inter = 1024, hidden = 4096;
    std::vector<Matrix> gate, up;
    for (int e = 0; e < n; ++e) {
        gate.push_back(make_matrix(inter, hidden, 4, 70000 + 2 * e));
        up.push_back(make_matrix(inter, hidden, 4, 70001 + 2 * e));
    }
    float *x, *act;
    CHECK(cudaMalloc(&x, hidden * 4));
    CHECK(cudaMalloc(&act, 16 * inter * 4));
    fill_float<<<64, 256>>>(x, hidden, 9);
    size_t smem = smem_bytes(4, hidden);
    for (int k : {4, 10, 11}) {
        std::vector<ExpertBatch> batches;
        for (int f = 0; f + k <= n; f += k) {
            ExpertBatch bt{};
            bt.count = k;
            bt.shared_slot = -1;
            for (int j = 0; j < k; ++j) {
                const Matrix* mats[2] = {&gate[f + j], &up[f + j]};
                for (int m = 0; m < 2; ++m) {
                    bt.w[j][3 * m] = mats[m]->w;
                    bt.w[j][3 * m + 1] = mats[m]->s;
                    bt.w[j][3 * m + 2] = mats[m]->b;
                }
            }
            batches.push_back(bt);
        }
        std::vector<float> want;
        for (int v = 0; v < 3; ++v) {
            const void* kern = v == 0 ? (const void*)swiglu_batch_q4
                                      : v == 1 ? (const void*)swiglu_batch_pipe<4, 2, 2> : (const void*)swiglu_batch_pipe<4, 1, 3>;
            int per_sm = 0;
            CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, THREADS, smem));
            int grid = std::min((k * inter + 7) / 8, per_sm * g_sms);
            auto launch = [&](const ExpertBatch& bt) {
                int group = 64, dtype = DT_BF16, rows = inter, cols = hidden;
                void* args[] = {(void*)&bt, &group, &dtype, &x, &rows, &cols, &act};
                CHECK(cudaLaunchKernel(kern, grid, THREADS, args, smem, 0));
            };
            CHECK(cudaMemset(act, 0xff, 16 * inter * 4));
            launch(batches[0]);
            std::vector<float> got = fetch(act, k * inter);
            if (v == 0) want = got;
            int i = 0;
            double us = median_us(7, (int)batches.size(), [&] { launch(batches[i++ % batches.size()]); });
            char label[160];
            snprintf(label, sizeof label, "gate/up K=%d, %s (%d blocks, err %.1e)", k,
                     v == 0 ? "engine" : v == 1 ? "pipelined, 2 pieces a round" : "pipelined, 1 piece a round", grid,
                     rel_l2(got, want));
            row(label, us, 2.0 * k * gate[0].bytes());
        }
    }
    for (int e = 0; e < n; ++e)
        for (Matrix* m : {&gate[e], &up[e]}) cudaFree(m->w), cudaFree(m->s), cudaFree(m->b);
    cudaFree(x), cudaFree(act);
}

int main(int argc, char** argv) {
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
    const std::pair<const char*, void (*)()> single[] = {
        {"bulk", bench_bulk}, {"unroll", bench_pairs_unroll}, {"pipe", bench_pipe}, {"cluster", bench_cluster}};
    for (const auto& [name, bench] : single)
        if (argc > 1 && std::string(argv[1]) == name) {
            bench();
            return 0;
        }
    if (argc > 1 && std::string(argv[1]) == "persistent") {
        bench_persistent();
        bench_chain_shapes();
        return 0;
    }
    bench_matvec("lm_head 248320x4096 4-bit", 248320, 4096, 4, 1);
    bench_matvec("in_proj 12288x4096 4-bit", 12288, 4096, 4, 8);
    bench_matvec("out_proj 4096x8192 4-bit", 4096, 8192, 4, 8);
    bench_matvec("lm_head 248320x4096 2-bit", 248320, 4096, 2, 1);
    bench_experts(4);
    bench_experts(2);
    // Against the host-to-device copy rate: one 256 MiB copy from page-locked memory.
    {
        size_t m = 256u << 20;
        u8 *h, *d;
        CHECK(cudaHostAlloc(&h, m, 0));
        CHECK(cudaMalloc(&d, m));
        double us = median_us(5, 2, [&] { CHECK(cudaMemcpyAsync(d, h, m, cudaMemcpyHostToDevice)); });
        printf("host-to-device copy 256 MiB, page-locked: %.1f GB/s (percentages below: of d2d)\n", m / us / 1e3);
        cudaFreeHost(h), cudaFree(d);
    }
    bench_zero_copy(4);
    bench_chain();
    bench_read_sizes();
    bench_prestaged();
    return 0;
}
