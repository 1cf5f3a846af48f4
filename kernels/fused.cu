// Element-wise and row kernels of the decoder block, f32 arithmetic on f32 or bf16 data; the
// element-wise ones move 16 bytes per access where every pointer is aligned:
//   add          out = a + b                                     (the residual sums)
//   swiglu_fwd   s = silu(g) * u                                 (one pass instead of three)
//   swiglu_bwd   dg = ds * u * sig(g) * (1 + g * (1 - sig(g))),  du = ds * silu(g)
//                written to one buffer, dg first                 (one pass instead of ~ten)
//   swiglu_bwd_inplace  the same, dg written over g and du over u
//   head_dot     out[r] = sum_j a[r * hd + j] * b[r * hd + j]   (f32 out, one warp per row)
//   copy_rows    a strided view [n0, n1, n2, d] whose rows of d are contiguous (a transpose or
//                a narrow of the leading dims) made contiguous, one warp per row, coalesced on
//                both sides
//   add_prefix   dst[i, :e, :] += src[i] for an f32 accumulator dst [n, t, d] and src [n, e, d],
//                e <= t, in place (attention's key and value gradients over query chunks)

#include <cuda_bf16.h>
#include <stdint.h>

#include "common.cuh"

namespace {

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + __expf(-x)); }

// out = f(a, b) element by element: sixteen bytes per thread where every pointer is 16-byte
// aligned, then the rest one element per thread.
template <typename T, typename F>
__device__ void map2(const T* a, const T* b, T* out, size_t n, F f) {
    constexpr int V = Vec<T>::n;
    const size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)blockDim.x * gridDim.x;
    const size_t full = aligned16(a) && aligned16(b) && aligned16(out) ? n / V : 0;
    for (size_t c = tid; c < full; c += stride) {
        float av[V], bv[V];
        load16(a + c * V, av);
        load16(b + c * V, bv);
#pragma unroll
        for (int j = 0; j < V; ++j) av[j] = f(av[j], bv[j]);
        store16(out + c * V, av);
    }
    for (size_t i = full * V + tid; i < n; i += stride) store(out, i, f(load(a, i), load(b, i)));
}

// Both gradients of silu(g) * u for the output gradient ds, into dg and du, which may be g and u
// themselves (every element is read before it is written, by the same thread). Sixteen bytes
// per thread where every pointer is 16-byte aligned, then the rest one element per thread.
template <typename T>
__device__ void swiglu_bwd(const T* g, const T* u, const T* ds, T* dg, T* du, size_t n) {
    constexpr int V = Vec<T>::n;
    const size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)blockDim.x * gridDim.x;
    const size_t full = aligned16(g) && aligned16(u) && aligned16(ds) && aligned16(dg) && aligned16(du) ? n / V : 0;
    for (size_t c = tid; c < full; c += stride) {
        float gv[V], uv[V], dv[V];
        load16(g + c * V, gv);
        load16(u + c * V, uv);
        load16(ds + c * V, dv);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            const float sg = sigmoid(gv[j]), d = dv[j];
            dv[j] = d * gv[j] * sg;
            gv[j] = d * uv[j] * sg * (1.0f + gv[j] * (1.0f - sg));
        }
        store16(dg + c * V, gv);
        store16(du + c * V, dv);
    }
    for (size_t i = full * V + tid; i < n; i += stride) {
        const float gv = load(g, i), uv = load(u, i), d = load(ds, i);
        const float sg = sigmoid(gv);
        store(dg, i, d * uv * sg * (1.0f + gv * (1.0f - sg)));
        store(du, i, d * gv * sg);
    }
}

template <typename T>
__device__ void head_dot(const T* a, const T* b, float* out, size_t rows, int hd) {
    const size_t row = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    float acc = 0.0f;
    for (int j = lane; j < hd; j += 32) acc += load(a, row * hd + j) * load(b, row * hd + j);
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, o);
    if (lane == 0) out[row] = acc;
}

template <typename T>
__device__ void copy_rows(const T* src, T* dst, size_t rows, int d, int n1, int n2, size_t s0, size_t s1, size_t s2) {
    const size_t row = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const size_t i2 = row % n2, i1 = (row / n2) % n1, i0 = row / ((size_t)n1 * n2);
    const T* from = src + i0 * s0 + i1 * s1 + i2 * s2;
    T* to = dst + row * d;
    for (int j = lane; j < d; j += 32) to[j] = from[j];
}

template <typename T>
__device__ void add_prefix(float* dst, const T* src, size_t n, size_t per_src, size_t per_dst) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)blockDim.x * gridDim.x) {
        dst[(i / per_src) * per_dst + i % per_src] += load(src, i);
    }
}

}  // namespace

#define FUSED(SUFFIX, T)                                                                                  \
    extern "C" __global__ void add_##SUFFIX(const T* a, const T* b, T* out, size_t n) {                  \
        map2<T>(a, b, out, n, [](float x, float y) { return x + y; });                                    \
    }                                                                                                     \
    extern "C" __global__ void swiglu_fwd_##SUFFIX(const T* g, const T* u, T* s, size_t n) {             \
        map2<T>(g, u, s, n, [](float x, float y) { return x * sigmoid(x) * y; });                         \
    }                                                                                                     \
    extern "C" __global__ void swiglu_bwd_##SUFFIX(const T* g, const T* u, const T* ds, T* out, size_t n) { \
        swiglu_bwd<T>(g, u, ds, out, out + n, n);                                                         \
    }                                                                                                     \
    extern "C" __global__ void swiglu_bwd_inplace_##SUFFIX(T* g, T* u, const T* ds, size_t n) {          \
        swiglu_bwd<T>(g, u, ds, g, u, n);                                                                 \
    }                                                                                                     \
    extern "C" __global__ void head_dot_##SUFFIX(const T* a, const T* b, float* out, size_t rows, int hd) { \
        head_dot<T>(a, b, out, rows, hd);                                                                 \
    }                                                                                                     \
    extern "C" __global__ void copy_rows_##SUFFIX(const T* src, T* dst, size_t rows, int d, int n1, int n2, \
                                                 size_t s0, size_t s1, size_t s2) {                      \
        copy_rows<T>(src, dst, rows, d, n1, n2, s0, s1, s2);                                              \
    }                                                                                                     \
    extern "C" __global__ void add_prefix_##SUFFIX(float* dst, const T* src, size_t n, size_t per_src,   \
                                                  size_t per_dst) {                                      \
        add_prefix<T>(dst, src, n, per_src, per_dst);                                                     \
    }

FUSED(f32, float)
FUSED(bf16, __nv_bfloat16)
