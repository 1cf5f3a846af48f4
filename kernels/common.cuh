// Helpers shared by Arbiter's kernels: f32 loads and stores of f32 or bf16 data (one element, or
// 16 bytes at once), the counter-based dropout mask (`dropout::keep` is the CPU's copy) and the
// tensor-core product.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16* p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, size_t i, float v) { p[i] = __float2bfloat16(v); }

// Elements per 16-byte access.
template <typename T>
struct Vec {
    static constexpr int n = 16 / sizeof(T);
};

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// The 16 bytes at p (aligned) as floats, and back.
__device__ __forceinline__ void load16(const float* p, float* v) {
    const float4 x = *reinterpret_cast<const float4*>(p);
    v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
}
__device__ __forceinline__ void load16(const __nv_bfloat16* p, float* v) {
    const uint4 x = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&x);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __bfloat1622float2(h[i]);
        v[2 * i] = f.x, v[2 * i + 1] = f.y;
    }
}
__device__ __forceinline__ void store16(float* p, const float* v) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store16(__nv_bfloat16* p, const float* v) {
    uint4 x;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&x);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = x;
}

// The 32-bit hash behind the masks: pair k's index mixed with the seed (lowbias32: two
// multiplies, three shifts). `dropout::keep` is the CPU's copy.
__device__ __forceinline__ uint32_t pair_hash(uint64_t seed, uint64_t k) {
    uint32_t z = ((uint32_t)k ^ (uint32_t)seed) + (uint32_t)(k >> 32) * 0x9e3779b9u;
    z ^= (uint32_t)(seed >> 32);
    z ^= z >> 16;
    z *= 0x7feb352du;
    z ^= z >> 15;
    z *= 0x846ca68bu;
    z ^= z >> 16;
    return z;
}

// Which elements of pair k (elements 2k and 2k + 1) the mask seeded with `seed` keeps: bit 1
// for 2k, bit 0 for 2k + 1. Element 2k is kept iff the hash's upper 16 bits reach the threshold
// (p * 2^16), element 2k + 1 iff the lower 16 do.
__device__ __forceinline__ uint32_t pair_keep(uint64_t seed, uint64_t k, uint32_t threshold) {
    const uint32_t z = pair_hash(seed, k);
    return ((z >> 16) >= threshold ? 2u : 0u) | ((z & 0xffffu) >= threshold ? 1u : 0u);
}

// `pair_keep`'s decisions as a mask of a bf16 pair's word (threshold below 2^16): 0xffff in the
// low half where element 2k is kept, in the high half where 2k + 1 is. A word ANDed with it is
// the pair masked, unscaled.
__device__ __forceinline__ uint32_t pair_halves(uint64_t seed, uint64_t k, uint32_t threshold) {
    const uint32_t z = pair_hash(seed, k), t = threshold << 16;
    return (z >= t ? 0x0000ffffu : 0u) | ((z << 16) >= t ? 0xffff0000u : 0u);
}

// c (16x8 f32) += a (16x16 bf16, row-major) * b (16x8 bf16, column-major): mma.sync m16n8k16.
// Lane l holds, with g = l / 4 and i = l % 4: a0 (row g, columns 2i, 2i+1), a1 (row g+8, the
// same columns), a2 and a3 (columns 2i+8, 2i+9); b0 (rows 2i, 2i+1 of column g), b1 (rows 2i+8,
// 2i+9); c0, c1 (row g, columns 2i, 2i+1), c2, c3 (row g+8). The low half of a 32-bit register
// is the lower row or column.
__device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
