// Helpers shared by Arbiter's kernels: f32 loads and stores of f32 or bf16 data, and the
// counter-based dropout mask (`dropout::keep` is the CPU's copy).
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16* p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, size_t i, float v) { p[i] = __float2bfloat16(v); }

// The 64 mask bits of element pair k (elements 2k and 2k + 1): the k-th output of the
// SplitMix64 stream seeded with `seed`. Element 2k is kept iff the upper 32 bits reach the
// threshold, element 2k + 1 iff the lower ones do: one hash per two elements.
__device__ __forceinline__ uint64_t dropout_bits(uint64_t seed, uint64_t k) {
    uint64_t z = seed + (k + 1) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
