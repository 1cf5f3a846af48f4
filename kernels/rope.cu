// Half-split rotary embedding of q and k in one launch, in place. q is [rows, hq, d] and k
// [rows, hk, d] (rows = b * t), each row's heads contiguous and rows ldq (ldk) elements apart
// (hq * d for a contiguous q; more where q is some heads of a wider packed row); element j < d/2 of a head pairs with element
// j + d/2: (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos), with sin negated for the backward
// (the inverse rotation). The tables are [t, d/2] (every row of the batch starts at position
// 0) or [b, t, d/2], in the data's dtype. Products and sums in f32, rounded once. A thread
// rotates 16 bytes of each half at a time, so d/2 must be a multiple of 16 bytes' worth of
// elements and every pointer 16-byte aligned (the caller checks).

#include <cuda_bf16.h>
#include <stdint.h>

#include "common.cuh"

namespace {

// I: the index type of the work items (32 bits where they fit: 64-bit divisions cost dozens of
// instructions each).
template <typename T, typename I>
__device__ void rope_qk(T* q, T* k, const T* cos, const T* sin, size_t rows, size_t ldq, size_t ldk, int t, int hq,
                        int hk, int d, int per_row_tables, float sign) {
    constexpr int V = Vec<T>::n;
    const int half = d / 2, chunks = half / V, heads = hq + hk;
    const I n = (I)(rows * heads * chunks);
    const I tid = blockIdx.x * (I)blockDim.x + threadIdx.x, stride = (I)blockDim.x * gridDim.x;
    for (I i = tid; i < n; i += stride) {
        const int c = i % (I)chunks;
        const I rest = i / (I)chunks;
        const int h = rest % (I)heads;
        const size_t row = rest / (I)heads;
        T* p = h < hq ? q + row * ldq + h * d : k + row * ldk + (h - hq) * d;
        const size_t cs = (per_row_tables ? row : (size_t)((I)row % (I)t)) * half + c * V;
        float x1[V], x2[V], cv[V], sv[V], y1[V], y2[V];
        load16(p + c * V, x1);
        load16(p + half + c * V, x2);
        load16(cos + cs, cv);
        load16(sin + cs, sv);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            const float s = sign * sv[j];
            y1[j] = x1[j] * cv[j] - x2[j] * s;
            y2[j] = x1[j] * s + x2[j] * cv[j];
        }
        store16(p + c * V, y1);
        store16(p + half + c * V, y2);
    }
}

}  // namespace

#define ROPE(SUFFIX, T)                                                                                   \
    extern "C" __global__ void rope_qk_##SUFFIX(T* q, T* k, const T* cos, const T* sin, size_t rows,       \
                                                size_t ldq, size_t ldk, int t, int hq, int hk, int d,     \
                                                int per_row_tables, float sign) {                         \
        if (rows * (hq + hk) * (d / 2 / Vec<T>::n) + (size_t)blockDim.x * gridDim.x < ((size_t)1 << 32)) \
            rope_qk<T, uint32_t>(q, k, cos, sin, rows, ldq, ldk, t, hq, hk, d, per_row_tables, sign);     \
        else                                                                                              \
            rope_qk<T, size_t>(q, k, cos, sin, rows, ldq, ldk, t, hq, hk, d, per_row_tables, sign);       \
    }

ROPE(f32, float)
ROPE(bf16, __nv_bfloat16)
