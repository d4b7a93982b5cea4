// Softmax attention: its inputs, decode (split over the keys) and prompts (flash). Compiled
// after common.cuh, as one NVRTC program.

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
