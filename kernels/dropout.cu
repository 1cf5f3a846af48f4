// Dropout with a counter-based mask: element i is kept iff the upper 32 bits of the i-th output
// of the SplitMix64 stream seeded with `seed` are >= `threshold` (= p * 2^32), and kept
// elements are scaled by `scale` (= 1 / (1 - p)). The mask is a pure function of (seed, i), so
// the backward applies the same kernel to the gradient and no mask tensor is ever stored.
// Matches `ops::dropout` on the CPU bit for bit in which elements are kept.

#include <cuda_bf16.h>
#include <stdint.h>

namespace {

__device__ __forceinline__ bool keep(uint64_t seed, uint64_t i, uint32_t threshold) {
    uint64_t z = seed + (i + 1) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (uint32_t)(z >> 32) >= threshold;
}

__device__ __forceinline__ float load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16* p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, size_t i, float v) { p[i] = __float2bfloat16(v); }

template <typename T>
__device__ void dropout(const T* x, T* y, size_t n, uint64_t seed, uint32_t threshold, float scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)blockDim.x * gridDim.x) {
        store(y, i, keep(seed, i, threshold) ? load(x, i) * scale : 0.0f);
    }
}

}  // namespace

extern "C" __global__ void dropout_f32(const float* x, float* y, size_t n, uint64_t seed, uint32_t threshold, float scale) {
    dropout<float>(x, y, n, seed, threshold, scale);
}

extern "C" __global__ void dropout_bf16(const __nv_bfloat16* x, __nv_bfloat16* y, size_t n, uint64_t seed, uint32_t threshold, float scale) {
    dropout<__nv_bfloat16>(x, y, n, seed, threshold, scale);
}
