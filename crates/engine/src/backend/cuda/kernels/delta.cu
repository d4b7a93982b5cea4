// Gated DeltaNet: the causal conv and the delta rule. Compiled after common.cuh, as one NVRTC
// program.

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
