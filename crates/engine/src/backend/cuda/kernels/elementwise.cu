// Norms and elementwise operations. Compiled after common.cuh, as one NVRTC program.

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
