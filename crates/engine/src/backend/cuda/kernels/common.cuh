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
// Tensor-core building blocks (compute capability 8.0 and later; empty before, except
// `cp_async`, which copies synchronously there).

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

// BYTES (4, 8 or 16) from global to shared memory, asynchronously; zeros when not valid.
// 16-byte copies bypass L1 (.cg); smaller ones may only go through it (.ca). Before 8.0 the
// copy is an ordinary load and store (the chunked delta rule runs there too), which the
// block barrier after `cp_async_wait` publishes as it does the asynchronous copies.
template <int BYTES>
__device__ __forceinline__ void cp_async(void* smem, const void* global, bool valid) {
#if __CUDA_ARCH__ >= 800
    u32 dst = (u32)__cvta_generic_to_shared(smem);
    int bytes = valid ? BYTES : 0;  // 0: the BYTES bytes are zero-filled
    if constexpr (BYTES == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(global), "r"(bytes));
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], %3, %2;" ::"r"(dst), "l"(global), "r"(bytes), "n"(BYTES));
#else
    if constexpr (BYTES == 16) {
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (valid) v = *(const uint4*)global;
        *(uint4*)smem = v;
    } else if constexpr (BYTES == 8) {
        uint2 v = make_uint2(0u, 0u);
        if (valid) v = *(const uint2*)global;
        *(uint2*)smem = v;
    } else {
        u32 v = 0u;
        if (valid) v = *(const u32*)global;
        *(u32*)smem = v;
    }
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
