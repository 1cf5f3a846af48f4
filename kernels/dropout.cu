// Dropout with a counter-based mask: which elements of pair (2k, 2k + 1) are kept is a hash of
// k and the seed (`pair_keep`, threshold = p * 2^16), and kept elements are scaled by `scale`
// (= 1 / (1 - p)). The mask is a pure function of (seed, i), so the backward applies the same
// kernel to the gradient and no mask tensor is ever stored. Matches `dropout::keep` on the CPU
// bit for bit in which elements are kept. One hash per pair of elements; a thread takes 16 bytes
// (8 bf16 or 4 f32) at a time.

#include <cuda_bf16.h>
#include <stdint.h>

#include "common.cuh"

namespace {

// Sixteen bytes per thread where every pointer is 16-byte aligned, then the rest one pair per
// thread.
template <typename T>
__device__ void dropout(const T* x, T* y, size_t n, uint64_t seed, uint32_t threshold, float scale) {
    constexpr int V = Vec<T>::n;
    const size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)blockDim.x * gridDim.x;
    const size_t full = aligned16(x) && aligned16(y) ? n / V : 0;
    for (size_t c = tid; c < full; c += stride) {
        float v[V];
        load16(x + c * V, v);
#pragma unroll
        for (int j = 0; j < V; j += 2) {
            const uint32_t m = pair_keep(seed, (c * V + j) / 2, threshold);
            v[j] = m & 2 ? v[j] * scale : 0.0f;
            v[j + 1] = m & 1 ? v[j + 1] * scale : 0.0f;
        }
        store16(y + c * V, v);
    }
    for (size_t k = full * V / 2 + tid; 2 * k < n; k += stride) {
        const uint32_t m = pair_keep(seed, k, threshold);
        const size_t i = 2 * k;
        store(y, i, m & 2 ? load(x, i) * scale : 0.0f);
        if (i + 1 < n) store(y, i + 1, m & 1 ? load(x, i + 1) * scale : 0.0f);
    }
}

// dst += dropout(src), in place
template <typename T>
__device__ void dropout_add(T* dst, const T* src, size_t n, uint64_t seed, uint32_t threshold, float scale) {
    constexpr int V = Vec<T>::n;
    const size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)blockDim.x * gridDim.x;
    const size_t full = aligned16(dst) && aligned16(src) ? n / V : 0;
    for (size_t c = tid; c < full; c += stride) {
        float d[V], v[V];
        load16(dst + c * V, d);
        load16(src + c * V, v);
#pragma unroll
        for (int j = 0; j < V; j += 2) {
            const uint32_t m = pair_keep(seed, (c * V + j) / 2, threshold);
            if (m & 2) d[j] += v[j] * scale;
            if (m & 1) d[j + 1] += v[j + 1] * scale;
        }
        store16(dst + c * V, d);
    }
    for (size_t k = full * V / 2 + tid; 2 * k < n; k += stride) {
        const uint32_t m = pair_keep(seed, k, threshold);
        const size_t i = 2 * k;
        if (m & 2) store(dst, i, load(dst, i) + load(src, i) * scale);
        if (i + 1 < n && (m & 1)) store(dst, i + 1, load(dst, i + 1) + load(src, i + 1) * scale);
    }
}

}  // namespace

extern "C" __global__ void dropout_f32(const float* x, float* y, size_t n, uint64_t seed, uint32_t threshold, float scale) {
    dropout<float>(x, y, n, seed, threshold, scale);
}

extern "C" __global__ void dropout_add_f32(float* dst, const float* src, size_t n, uint64_t seed, uint32_t threshold, float scale) {
    dropout_add<float>(dst, src, n, seed, threshold, scale);
}

extern "C" __global__ void dropout_add_bf16(__nv_bfloat16* dst, const __nv_bfloat16* src, size_t n, uint64_t seed, uint32_t threshold, float scale) {
    dropout_add<__nv_bfloat16>(dst, src, n, seed, threshold, scale);
}

extern "C" __global__ void dropout_bf16(const __nv_bfloat16* x, __nv_bfloat16* y, size_t n, uint64_t seed, uint32_t threshold, float scale) {
    dropout<__nv_bfloat16>(x, y, n, seed, threshold, scale);
}
