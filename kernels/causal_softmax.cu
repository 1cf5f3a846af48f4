// Fused causal softmax for chunked attention, forward and backward, one block per score row.
//
// Scores of one query chunk are laid out [b, kv_heads, rep * c, cols] (grouped-query order),
// row-major and contiguous; query i of the chunk is c0 + row % c, its batch row is
// row / rows_per_batch. Key j is visible to query i of batch row r iff starts[r] <= j <= i; a
// padding query before its row's start sees only itself (its output is never used). The mask
// is computed here from those indices, so no mask tensor is read or added.
//
// forward:  p = softmax(scale * s) over the visible keys, 0 elsewhere
// backward: p as above and ds = scale * p * (dp - dsum[row]), the gradient of the unscaled
//           scores s, written to out[n..2n]
// Arithmetic is in f32 whatever the storage type.

#include <cuda_bf16.h>
#include <stdint.h>

#include "common.cuh"

namespace {

// Reduce over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
template <bool IsMax>
__device__ float block_reduce(float v) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_xor_sync(0xffffffff, v, o);
        v = IsMax ? fmaxf(v, w) : v + w;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();  // partial[] may still be read by a previous reduction
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : (IsMax ? -INFINITY : 0.0f);
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_xor_sync(0xffffffff, v, o);
        v = IsMax ? fmaxf(v, w) : v + w;
    }
    return v;
}

template <typename T, bool Backward>
__device__ void causal_softmax(
    const T* s, const T* dp, const float* dsum, T* out,
    int rows, int cols, int c, int c0, int rows_per_batch, const uint32_t* starts, float scale) {
    const int row = blockIdx.x;
    if (row >= rows) return;
    const int q = c0 + row % c;
    const int start = (int)starts[row / rows_per_batch];
    const int lo = q < start ? q : start, hi = q;
    const size_t base = (size_t)row * cols;
    float m = -INFINITY;
    for (int j = lo + threadIdx.x; j <= hi; j += blockDim.x) m = fmaxf(m, scale * load(s, base + j));
    m = block_reduce<true>(m);
    float sum = 0.0f;
    for (int j = lo + threadIdx.x; j <= hi; j += blockDim.x) sum += __expf(scale * load(s, base + j) - m);
    const float inv = 1.0f / block_reduce<false>(sum);
    const size_t n = (size_t)rows * cols;
    const float d = Backward ? dsum[row] : 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        const bool seen = j >= lo && j <= hi;
        const float p = seen ? __expf(scale * load(s, base + j) - m) * inv : 0.0f;
        store(out, base + j, p);
        if (Backward) store(out, n + base + j, seen ? scale * p * (load(dp, base + j) - d) : 0.0f);
    }
}

}  // namespace

#define CAUSAL_SOFTMAX(SUFFIX, T)                                                                 \
    extern "C" __global__ void causal_softmax_fwd_##SUFFIX(                                       \
        const T* s, T* out, int rows, int cols, int c, int c0, int rows_per_batch,               \
        const uint32_t* starts, float scale) {                                                   \
        causal_softmax<T, false>(s, nullptr, nullptr, out, rows, cols, c, c0, rows_per_batch,    \
                                 starts, scale);                                                 \
    }                                                                                            \
    extern "C" __global__ void causal_softmax_bwd_##SUFFIX(                                       \
        const T* s, const T* dp, const float* dsum, T* out, int rows, int cols, int c, int c0,  \
        int rows_per_batch, const uint32_t* starts, float scale) {                               \
        causal_softmax<T, true>(s, dp, dsum, out, rows, cols, c, c0, rows_per_batch, starts,     \
                                scale);                                                          \
    }

CAUSAL_SOFTMAX(f32, float)
CAUSAL_SOFTMAX(bf16, __nv_bfloat16)
