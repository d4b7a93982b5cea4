// gated_delta_chunks (kernels.cu) emulated on the CPU: 256 std::threads per block, a
// std::barrier for __syncthreads, compared with the recurrence token by token. Built and run by
// run.sh, which extracts the kernel's part of kernels.cu into part.cu. Exits 1 when the
// relative L2 of the outputs or the state exceeds 1e-5.
#include <cmath>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <barrier>
#include <vector>
#include <algorithm>
using std::min;
struct Dim { unsigned x, y, z; };
thread_local Dim threadIdx, blockIdx;
Dim blockDim{256, 1, 1};
std::barrier<>* bar;
#define __syncthreads() bar->arrive_and_wait()
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
struct alignas(16) float4 { float x, y, z, w; };
float* smem_heap;
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }
// cp.async as copies done at once (landed by any later wait), zeros when not valid.
template <int BYTES> void cp_async(void* dst, const void* src, bool valid) {
    if (valid) memcpy(dst, src, BYTES); else memset(dst, 0, BYTES);
}
inline void cp_async_commit() {}
template <int N> void cp_async_wait() {}
// Warp 0's shuffles (the only warp that shuffles): lanes trade through an array between two
// barriers of 32.
std::barrier<>* warp0_bar;
float warp0_lanes[32];
inline float __shfl_up_sync(unsigned, float v, int delta) {
    int lane = threadIdx.x;
    warp0_lanes[lane] = v;
    warp0_bar->arrive_and_wait();
    float up = lane >= delta ? warp0_lanes[lane - delta] : v;
    warp0_bar->arrive_and_wait();
    return up;
}
#include "part.cu"

static unsigned long long seed = 7;
float rnd(float s) { seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17; return ((seed >> 40) / float(1 << 24) * 2 - 1) * s; }

int main(int argc, char** argv) {
    int dk = atoi(argv[1]), dv = atoi(argv[2]), nk = atoi(argv[3]), nv = atoi(argv[4]), T = atoi(argv[5]);
    int key_dim = nk * dk, conv = 2 * key_dim + nv * dv;
    std::vector<float> qkv(T * conv), a(T * nv), b(T * nv), alog(nv), dt(nv), st(nv * dk * dv);
    for (auto& x : qkv) x = rnd(1); for (auto& x : a) x = rnd(3); for (auto& x : b) x = rnd(3);
    for (auto& x : alog) x = rnd(1); for (auto& x : dt) x = rnd(1); for (auto& x : st) x = rnd(0.5);
    std::vector<float> st_ref = st, out(T * nv * dv, NAN), out_ref(T * nv * dv);
    // The reference: the recurrence, as the CPU backend's `recurrence`.
    for (int h = 0; h < nv; ++h) {
        int kh = h / (nv / nk);
        float* S = &st_ref[h * dk * dv];
        for (int t = 0; t < T; ++t) {
            const float* row = &qkv[t * conv];
            std::vector<float> q(dk), k(dk), d(dv);
            float sq = 0, sk = 0;
            for (int i = 0; i < dk; ++i) sq += row[kh*dk+i]*row[kh*dk+i], sk += row[key_dim+kh*dk+i]*row[key_dim+kh*dk+i];
            for (int i = 0; i < dk; ++i) q[i] = row[kh*dk+i] / std::sqrt(sq + 1e-6f) / std::sqrt((float)dk), k[i] = row[key_dim+kh*dk+i] / std::sqrt(sk + 1e-6f);
            float av = a[t*nv+h] + dt[h];
            float g = -std::exp(alog[h]) * (av > 20 ? av : std::log1p(std::exp(av)));
            float beta = 1 / (1 + std::exp(-b[t*nv+h]));
            for (int i = 0; i < dk*dv; ++i) S[i] *= std::exp(g);
            for (int c = 0; c < dv; ++c) { float r = 0; for (int i = 0; i < dk; ++i) r += S[i*dv+c]*k[i]; d[c] = (row[2*key_dim+h*dv+c] - r) * beta; }
            for (int c = 0; c < dv; ++c) { float o = 0; for (int i = 0; i < dk; ++i) { S[i*dv+c] += k[i]*d[c]; o += S[i*dv+c]*q[i]; } out_ref[t*nv*dv+h*dv+c] = o; }
        }
    }
    // As delta_chunks_shared_bytes in linear_attention.rs.
    int floats = dk * 32 + 3 * 32 * (dk + 4) + 2 * 32 * 32 + 4 * 32 + 2 * 32 * 33 + 3 * 32 * 32 + 5 * 32;
    std::vector<float, std::allocator<float>> shared_mem(floats, NAN);
    smem_heap = shared_mem.data();
    std::barrier<> br(256), br0(32);
    bar = &br;
    warp0_bar = &br0;
    for (int bx = 0; bx < nv; ++bx)
        for (int by = 0; by < (dv + 31) / 32; ++by) {
            std::vector<std::thread> th;
            for (int tid = 0; tid < 256; ++tid)
                th.emplace_back([&, tid] {
                    threadIdx = {(unsigned)tid, 0, 0};
                    blockIdx = {(unsigned)bx, (unsigned)by, 0};
                    gated_delta_chunks(qkv.data(), a.data(), b.data(), alog.data(), dt.data(), st.data(), T, nk, nv, dk, dv, out.data());
                });
            for (auto& t : th) t.join();
        }
    auto rel = [](const std::vector<float>& x, const std::vector<float>& y) {
        double d = 0, n = 0; for (size_t i = 0; i < x.size(); ++i) { d += (x[i]-y[i])*(x[i]-y[i]); n += y[i]*y[i]; } return std::sqrt(d / n); };
    double out_err = rel(out, out_ref), state_err = rel(st, st_ref);
    printf("dk %d dv %d heads %d/%d T %d: out rel L2 %.3g, state rel L2 %.3g\n", dk, dv, nk, nv, T, out_err, state_err);
    return out_err < 1e-5 && state_err < 1e-5 ? 0 : 1;
}
