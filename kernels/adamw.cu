// AdamW in two in-place passes per variable (f32), as torch.optim.AdamW computes it:
//   adamw_moments  state = [m; v]:  m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2
//   adamw_update   p = p (1 - lr wd) - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
// instead of about sixteen element-wise launches.

#include <stdint.h>

extern "C" __global__ void adamw_moments(float* state, const float* g, size_t n, float b1, float b2) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)blockDim.x * gridDim.x) {
        const float gv = g[i];
        state[i] = b1 * state[i] + (1.0f - b1) * gv;
        state[n + i] = b2 * state[n + i] + (1.0f - b2) * gv * gv;
    }
}

extern "C" __global__ void adamw_update(float* p, const float* state, size_t n, float lr, float decay, float bc1, float sqrt_bc2, float eps) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)blockDim.x * gridDim.x) {
        const float denom = sqrtf(state[n + i]) / sqrt_bc2 + eps;
        p[i] = p[i] * decay - lr / bc1 * state[i] / denom;
    }
}
