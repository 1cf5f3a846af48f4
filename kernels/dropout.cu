// Dropout with a counter-based mask: elements 2k and 2k+1 are kept iff the upper and the lower
// 32 bits of the k-th output of the SplitMix64 stream seeded with `seed` are >= `threshold`
// (= p * 2^32), and kept elements are scaled by `scale` (= 1 / (1 - p)). The mask is a pure
// function of (seed, i), so the backward applies the same kernel to the gradient and no mask
// tensor is ever stored. Matches `dropout::keep` on the CPU bit for bit in which elements are
// kept. Each thread takes a pair of elements, one hash for both.

#include <cuda_bf16.h>
#include <stdint.h>

#include "common.cuh"

namespace {

template <typename T>
__device__ void dropout(const T* x, T* y, size_t n, uint64_t seed, uint32_t threshold, float scale) {
    const size_t pairs = (n + 1) / 2;
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < pairs; k += (size_t)blockDim.x * gridDim.x) {
        const uint64_t z = dropout_bits(seed, k);
        const size_t i = 2 * k;
        store(y, i, (uint32_t)(z >> 32) >= threshold ? load(x, i) * scale : 0.0f);
        if (i + 1 < n) store(y, i + 1, (uint32_t)z >= threshold ? load(x, i + 1) * scale : 0.0f);
    }
}

// dst += dropout(src), in place
template <typename T>
__device__ void dropout_add(T* dst, const T* src, size_t n, uint64_t seed, uint32_t threshold, float scale) {
    const size_t pairs = (n + 1) / 2;
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < pairs; k += (size_t)blockDim.x * gridDim.x) {
        const uint64_t z = dropout_bits(seed, k);
        const size_t i = 2 * k;
        if ((uint32_t)(z >> 32) >= threshold) store(dst, i, load(dst, i) + load(src, i) * scale);
        if (i + 1 < n && (uint32_t)z >= threshold) store(dst, i + 1, load(dst, i + 1) + load(src, i + 1) * scale);
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
