// Dropout with a counter-based mask: element i is kept iff the upper 32 bits of the i-th output
// of the SplitMix64 stream seeded with `seed` are >= `threshold` (= p * 2^32), and kept
// elements are scaled by `scale` (= 1 / (1 - p)). The mask is a pure function of (seed, i), so
// the backward applies the same kernel to the gradient and no mask tensor is ever stored.
// Matches `ops::dropout` on the CPU bit for bit in which elements are kept.

#include <cuda_bf16.h>
#include <stdint.h>

#include "common.cuh"

namespace {


template <typename T>
__device__ void dropout(const T* x, T* y, size_t n, uint64_t seed, uint32_t threshold, float scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)blockDim.x * gridDim.x) {
        store(y, i, dropout_keep(seed, i, threshold) ? load(x, i) * scale : 0.0f);
    }
}

// dst += dropout(src), in place
template <typename T>
__device__ void dropout_add(T* dst, const T* src, size_t n, uint64_t seed, uint32_t threshold, float scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)blockDim.x * gridDim.x) {
        if (dropout_keep(seed, i, threshold)) store(dst, i, load(dst, i) + load(src, i) * scale);
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
