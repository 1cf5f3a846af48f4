// AdamW over every trained variable in one launch, as torch.optim.AdamW computes it, with the
// gradients' global norm clipped on the device:
//   g = c g,  m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2,
//   p = p (1 - lr wd) - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
// where c = max_norm / (norm + 1e-6) when the norm of all gradients exceeds max_norm (> 0), else
// 1. The variables come as a table of segments, six u64 each: the variable, its gradient, its
// state [m; v] (2n floats), n, and the gradient's row length and row stride (both n for a
// contiguous one; a gradient may be a block of a wider matrix, its rows that far apart). Block
// row y of the grid walks segment y.

#include <cuda_bf16.h>
#include <stdint.h>

struct Segment {
    float* p;
    const float* g;
    float* state;
    uint64_t n, cols, ld;

    // element i of the gradient
    __device__ __forceinline__ float grad(uint64_t i) const { return cols == n ? g[i] : g[(i / cols) * ld + i % cols]; }
};

__device__ __forceinline__ Segment segment(const uint64_t* table, unsigned y) {
    const uint64_t* s = table + 6 * (size_t)y;
    return Segment{reinterpret_cast<float*>(s[0]), reinterpret_cast<const float*>(s[1]), reinterpret_cast<float*>(s[2]), s[3], s[4], s[5]};
}

// partial[y * gridDim.x + x] = the sum of g^2 over block (x, y)'s elements of segment y
// (256 threads).
extern "C" __global__ void grad_sq_partials(const uint64_t* table, float* partial) {
    __shared__ float red[256];
    const Segment s = segment(table, blockIdx.y);
    float acc = 0.0f;
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < s.n; i += (uint64_t)blockDim.x * gridDim.x) {
        const float g = s.grad(i);
        acc += g * g;
    }
    red[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned w = 128; w > 0; w >>= 1) {
        if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.y * (size_t)gridDim.x + blockIdx.x] = red[0];
}

// out[0] = the sum of the n partials, in a fixed order (one block of 256 threads), so the norm
// and the clipping are the same from run to run.
extern "C" __global__ void sum_partials(const float* partial, uint64_t n, float* out) {
    __shared__ float red[256];
    float acc = 0.0f;
    for (uint64_t i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
    red[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned w = 128; w > 0; w >>= 1) {
        if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = red[0];
}

// One AdamW step of segment blockIdx.y; `sum_sq` is the gradients' summed squares (read only
// when max_norm > 0).
extern "C" __global__ void adamw_step(const uint64_t* table, const float* sum_sq, float max_norm, float b1, float b2, float lr, float decay, float bc1, float sqrt_bc2, float eps) {
    const Segment s = segment(table, blockIdx.y);
    float c = 1.0f;
    if (max_norm > 0.0f) {
        const float norm = sqrtf(*sum_sq);
        if (norm > max_norm) c = max_norm / (norm + 1e-6f);
    }
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < s.n; i += (uint64_t)blockDim.x * gridDim.x) {
        const float g = s.grad(i) * c;
        const float m = b1 * s.state[i] + (1.0f - b1) * g;
        const float v = b2 * s.state[s.n + i] + (1.0f - b2) * g * g;
        s.state[i] = m;
        s.state[s.n + i] = v;
        const float denom = sqrtf(v) / sqrt_bc2 + eps;
        s.p[i] = s.p[i] * decay - lr / bc1 * m / denom;
    }
}

// The trained factors in bf16 for a step's forwards, every one in one launch: segment y of the
// table (six u64: the f32 source, the bf16 destination, n, the scale's f32 bits, cols, ld)
// becomes bf16(bf16(x) * scale), the scale already rounded to bf16 by the host; element i goes to
// row i / cols, column i % cols of a destination whose rows lie ld apart (cols = ld = n: a
// contiguous one; else some columns of a wider matrix). A product of two bf16
// values is exact in f32, so this is the one rounding of a bf16 multiply: the same values as a
// cast followed by a scaling in bf16.
extern "C" __global__ void factor_casts(const uint64_t* table) {
    const uint64_t* s = table + 6 * (size_t)blockIdx.y;
    const float* x = reinterpret_cast<const float*>(s[0]);
    __nv_bfloat16* y = reinterpret_cast<__nv_bfloat16*>(s[1]);
    const uint64_t n = s[2], cols = s[4], ld = s[5];
    const float scale = __uint_as_float((uint32_t)s[3]);
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)blockDim.x * gridDim.x) {
        y[(i / cols) * ld + i % cols] = __float2bfloat16(__bfloat162float(__float2bfloat16(x[i])) * scale);
    }
}
