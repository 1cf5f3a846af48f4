// RMSNorm backward, one block per row: with r = 1 / sqrt(mean(x^2) + eps) and u = g * w,
// dx = r * u - x * r^3 * mean(u * x), plus the residual stream's gradient `res` when given (not
// null): the block's two residual sums are folded into the norms' backward. Two reductions and
// one write per row, f32 arithmetic, instead of the dozen f32 element-wise passes of the
// unfused formula and a sum.

#include <cuda_bf16.h>
#include <stdint.h>

#include "common.cuh"

namespace {

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

template <typename T>
__device__ void rms_norm_bwd(const T* x, const T* g, const T* w, const T* res, T* dx, int rows, int n, float eps) {
    const int row = blockIdx.x;
    if (row >= rows) return;
    const size_t base = (size_t)row * n;
    float sxx = 0.0f, sux = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float xv = load(x, base + j);
        sxx += xv * xv;
        sux += load(g, base + j) * load(w, j) * xv;
    }
    sxx = block_sum(sxx);
    sux = block_sum(sux);
    const float r = rsqrtf(sxx / n + eps);
    const float c = r * r * r * sux / n;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float v = r * load(g, base + j) * load(w, j) - load(x, base + j) * c;
        store(dx, base + j, res ? v + load(res, base + j) : v);
    }
}

}  // namespace

extern "C" __global__ void rms_norm_bwd_f32(const float* x, const float* g, const float* w, const float* res, float* dx, int rows, int n, float eps) {
    rms_norm_bwd<float>(x, g, w, res, dx, rows, n, eps);
}

extern "C" __global__ void rms_norm_bwd_bf16(const __nv_bfloat16* x, const __nv_bfloat16* g, const __nv_bfloat16* w, const __nv_bfloat16* res, __nv_bfloat16* dx, int rows, int n, float eps) {
    rms_norm_bwd<__nv_bfloat16>(x, g, w, res, dx, rows, n, eps);
}
