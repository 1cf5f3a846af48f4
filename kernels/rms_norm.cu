// RMSNorm, one warp per row (eight rows per 256-thread block), f32 arithmetic, 16 bytes per
// access where the rows allow it, the lanes keeping their pieces of a row of up to 96 such
// pieces in registers between the reduction and the output; long rows (a large model's hidden
// size) take a block each and keep their pieces in registers (`_row` kernels). The forward's
// output rows lie ldy elements apart (ldy >= n: the norm may fill the first columns of a wider
// matrix).
//
// forward:  y = x * r * w with r = 1 / sqrt(mean(x^2) + eps)
// backward: with u = g * w, dx = r * u - x * r^3 * mean(u * x), plus the residual stream's
//           gradient `res` when given (not null): the block's two residual sums are folded into
//           the norms' backward. Two reductions and one write per row, instead of the dozen f32
//           element-wise passes of the unfused formula and a sum.

#include <cuda_bf16.h>
#include <stdint.h>

#include "common.cuh"

namespace {

// 16-byte pieces of a row that a warp's lanes keep in registers (three each, at most): rows of
// up to 768 bf16 elements (384 f32) are read once.
constexpr int WARP_PIECES = 3;

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// Whether a row of n elements can move 16 bytes at a time: n a multiple of the vector width and
// every row pointer (c and d optional) aligned.
template <typename T>
__device__ __forceinline__ bool rows_vectorized(int n, const void* a, const void* b, const void* c, const void* d) {
    return n % Vec<T>::n == 0 && aligned16(a) && aligned16(b) && (!c || aligned16(c)) && (!d || aligned16(d));
}

template <typename T>
__device__ void rms_norm_fwd(const T* x, const T* w, T* y, int rows, int n, int ldy, float eps) {
    constexpr int V = Vec<T>::n;
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* xr = x + (size_t)row * n;
    T* yr = y + (size_t)row * ldy;
    const bool vec = rows_vectorized<T>(n, xr, yr, w, nullptr);
    float ss = 0.0f;
    if (vec && n / V <= 32 * WARP_PIECES) {
        // the lane's pieces of the row kept in registers: x read once
        uint4 xs[WARP_PIECES];
#pragma unroll
        for (int p = 0; p < WARP_PIECES; ++p) {
            const int c = lane + 32 * p;
            if (c >= n / V) break;
            xs[p] = *reinterpret_cast<const uint4*>(xr + c * V);
        }
#pragma unroll
        for (int p = 0; p < WARP_PIECES; ++p) {
            if (lane + 32 * p >= n / V) break;
            float v[V];
            load16(reinterpret_cast<const T*>(&xs[p]), v);
#pragma unroll
            for (int j = 0; j < V; ++j) ss += v[j] * v[j];
        }
        const float r = rsqrtf(warp_sum(ss) / n + eps);
#pragma unroll
        for (int p = 0; p < WARP_PIECES; ++p) {
            const int c = lane + 32 * p;
            if (c >= n / V) break;
            float v[V], wv[V];
            load16(reinterpret_cast<const T*>(&xs[p]), v);
            load16(w + c * V, wv);
#pragma unroll
            for (int j = 0; j < V; ++j) v[j] *= r * wv[j];
            store16(yr + c * V, v);
        }
        return;
    }
    if (vec) {
        for (int c = lane; c < n / V; c += 32) {
            float v[V];
            load16(xr + c * V, v);
#pragma unroll
            for (int j = 0; j < V; ++j) ss += v[j] * v[j];
        }
    } else {
        for (int j = lane; j < n; j += 32) ss += load(xr, j) * load(xr, j);
    }
    const float r = rsqrtf(warp_sum(ss) / n + eps);
    if (vec) {
        for (int c = lane; c < n / V; c += 32) {
            float v[V], wv[V];
            load16(xr + c * V, v);
            load16(w + c * V, wv);
#pragma unroll
            for (int j = 0; j < V; ++j) v[j] *= r * wv[j];
            store16(yr + c * V, v);
        }
    } else {
        for (int j = lane; j < n; j += 32) store(yr, j, load(xr, j) * r * load(w, j));
    }
}

template <typename T>
__device__ void rms_norm_bwd(const T* x, const T* g, const T* w, const T* res, T* dx, int rows, int n, float eps) {
    constexpr int V = Vec<T>::n;
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    const size_t base = (size_t)row * n;
    const T* xr = x + base;
    const T* gr = g + base;
    const T* rr = res ? res + base : nullptr;
    T* out = dx + base;
    const bool vec = rows_vectorized<T>(n, xr, gr, out, rr) && aligned16(w);
    float sxx = 0.0f, sux = 0.0f;
    if (vec && n / V <= 32 * WARP_PIECES) {
        // the lane's pieces of x and g kept in registers: each read once
        uint4 xs[WARP_PIECES], gs[WARP_PIECES];
#pragma unroll
        for (int p = 0; p < WARP_PIECES; ++p) {
            const int c = lane + 32 * p;
            if (c >= n / V) break;
            xs[p] = *reinterpret_cast<const uint4*>(xr + c * V);
            gs[p] = *reinterpret_cast<const uint4*>(gr + c * V);
        }
#pragma unroll
        for (int p = 0; p < WARP_PIECES; ++p) {
            const int c = lane + 32 * p;
            if (c >= n / V) break;
            float xv[V], gv[V], wv[V];
            load16(reinterpret_cast<const T*>(&xs[p]), xv);
            load16(reinterpret_cast<const T*>(&gs[p]), gv);
            load16(w + c * V, wv);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                sxx += xv[j] * xv[j];
                sux += gv[j] * wv[j] * xv[j];
            }
        }
        const float r = rsqrtf(warp_sum(sxx) / n + eps);
        const float c3 = r * r * r * warp_sum(sux) / n;
#pragma unroll
        for (int p = 0; p < WARP_PIECES; ++p) {
            const int c = lane + 32 * p;
            if (c >= n / V) break;
            float xv[V], gv[V], wv[V], rv[V];
            load16(reinterpret_cast<const T*>(&xs[p]), xv);
            load16(reinterpret_cast<const T*>(&gs[p]), gv);
            load16(w + c * V, wv);
            if (rr) load16(rr + c * V, rv);
#pragma unroll
            for (int j = 0; j < V; ++j) xv[j] = r * gv[j] * wv[j] - xv[j] * c3 + (rr ? rv[j] : 0.0f);
            store16(out + c * V, xv);
        }
        return;
    }
    if (vec) {
        for (int c = lane; c < n / V; c += 32) {
            float xv[V], gv[V], wv[V];
            load16(xr + c * V, xv);
            load16(gr + c * V, gv);
            load16(w + c * V, wv);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                sxx += xv[j] * xv[j];
                sux += gv[j] * wv[j] * xv[j];
            }
        }
    } else {
        for (int j = lane; j < n; j += 32) {
            const float xv = load(xr, j);
            sxx += xv * xv;
            sux += load(gr, j) * load(w, j) * xv;
        }
    }
    const float r = rsqrtf(warp_sum(sxx) / n + eps);
    const float c3 = r * r * r * warp_sum(sux) / n;
    if (vec) {
        for (int c = lane; c < n / V; c += 32) {
            float xv[V], gv[V], wv[V], rv[V];
            load16(xr + c * V, xv);
            load16(gr + c * V, gv);
            load16(w + c * V, wv);
            if (rr) load16(rr + c * V, rv);
#pragma unroll
            for (int j = 0; j < V; ++j) xv[j] = r * gv[j] * wv[j] - xv[j] * c3 + (rr ? rv[j] : 0.0f);
            store16(out + c * V, xv);
        }
    } else {
        for (int j = lane; j < n; j += 32) {
            const float v = r * load(gr, j) * load(w, j) - load(xr, j) * c3;
            store(out, j, rr ? v + load(rr, j) : v);
        }
    }
}

// A block of ROW_THREADS per row, for long rows of 16-byte pieces (every pointer aligned; the
// caller checks): each thread keeps its pieces of the row (at most ROW_PIECES) in registers
// between the reduction and the output, so x and g are read from memory once, not twice.
constexpr int ROW_THREADS = 128, ROW_PIECES = 8;

__device__ __forceinline__ float block_sum(float v, float* red) {
    v = warp_sum(v);
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) red[warp] = v;
    __syncthreads();
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < ROW_THREADS / 32; ++w) s += red[w];
    return s;
}

template <typename T>
__device__ void rms_norm_fwd_row(const T* x, const T* w, T* y, int n, int ldy, float eps) {
    constexpr int V = Vec<T>::n;
    __shared__ float red[ROW_THREADS / 32];
    const size_t base = (size_t)blockIdx.x * n;
    const int pieces = n / V;
    uint4 xs[ROW_PIECES];
    float ss = 0.0f;
#pragma unroll
    for (int p = 0; p < ROW_PIECES; ++p) {
        const int c = threadIdx.x + p * ROW_THREADS;
        if (c >= pieces) break;
        xs[p] = *reinterpret_cast<const uint4*>(x + base + c * V);
        float v[V];
        load16(reinterpret_cast<const T*>(&xs[p]), v);
#pragma unroll
        for (int j = 0; j < V; ++j) ss += v[j] * v[j];
    }
    const float r = rsqrtf(block_sum(ss, red) / n + eps);
#pragma unroll
    for (int p = 0; p < ROW_PIECES; ++p) {
        const int c = threadIdx.x + p * ROW_THREADS;
        if (c >= pieces) break;
        float v[V], wv[V];
        load16(reinterpret_cast<const T*>(&xs[p]), v);
        load16(w + c * V, wv);
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] *= r * wv[j];
        store16(y + (size_t)blockIdx.x * ldy + c * V, v);
    }
}

template <typename T>
__device__ void rms_norm_bwd_row(const T* x, const T* g, const T* w, const T* res, T* dx, int n, float eps) {
    constexpr int V = Vec<T>::n;
    __shared__ float red[2][ROW_THREADS / 32];
    const size_t base = (size_t)blockIdx.x * n;
    const int pieces = n / V;
    uint4 xs[ROW_PIECES], us[ROW_PIECES];
    float sxx = 0.0f, sux = 0.0f;
#pragma unroll
    for (int p = 0; p < ROW_PIECES; ++p) {
        const int c = threadIdx.x + p * ROW_THREADS;
        if (c >= pieces) break;
        xs[p] = *reinterpret_cast<const uint4*>(x + base + c * V);
        float xv[V], gv[V], wv[V];
        load16(reinterpret_cast<const T*>(&xs[p]), xv);
        load16(g + base + c * V, gv);
        load16(w + c * V, wv);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            gv[j] *= wv[j];
            sxx += xv[j] * xv[j];
            sux += gv[j] * xv[j];
        }
        // u = g * w, kept as f32 where a piece is four floats, else rounded like the data
        if (V == 4) {
            us[p] = make_uint4(__float_as_uint(gv[0]), __float_as_uint(gv[1]), __float_as_uint(gv[2]), __float_as_uint(gv[3]));
        } else {
            us[p] = *reinterpret_cast<const uint4*>(g + base + c * V);
        }
    }
    const float r = rsqrtf(block_sum(sxx, red[0]) / n + eps);
    const float c3 = r * r * r * block_sum(sux, red[1]) / n;
#pragma unroll
    for (int p = 0; p < ROW_PIECES; ++p) {
        const int c = threadIdx.x + p * ROW_THREADS;
        if (c >= pieces) break;
        float xv[V], uv[V], rv[V];
        load16(reinterpret_cast<const T*>(&xs[p]), xv);
        if (V == 4) {
            uv[0] = __uint_as_float(us[p].x), uv[1] = __uint_as_float(us[p].y), uv[2] = __uint_as_float(us[p].z), uv[3] = __uint_as_float(us[p].w);
        } else {
            float wv[V];
            load16(reinterpret_cast<const T*>(&us[p]), uv);
            load16(w + c * V, wv);
#pragma unroll
            for (int j = 0; j < V; ++j) uv[j] *= wv[j];
        }
        if (res) load16(res + base + c * V, rv);
#pragma unroll
        for (int j = 0; j < V; ++j) xv[j] = r * uv[j] - xv[j] * c3 + (res ? rv[j] : 0.0f);
        store16(dx + base + c * V, xv);
    }
}

}  // namespace

#define RMS_NORM_ROW(SUFFIX, T)                                                                             \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS) rms_norm_fwd_row_##SUFFIX(const T* x, const T* w, \
                                                                                      T* y, int n, int ldy,     \
                                                                                      float eps) {              \
        rms_norm_fwd_row<T>(x, w, y, n, ldy, eps);                                                         \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS) rms_norm_bwd_row_##SUFFIX(                   \
        const T* x, const T* g, const T* w, const T* res, T* dx, int n, float eps) {                      \
        rms_norm_bwd_row<T>(x, g, w, res, dx, n, eps);                                                     \
    }

RMS_NORM_ROW(f32, float)
RMS_NORM_ROW(bf16, __nv_bfloat16)

#define RMS_NORM(SUFFIX, T)                                                                          \
    extern "C" __global__ void rms_norm_fwd_##SUFFIX(const T* x, const T* w, T* y, int rows, int n, \
                                                     int ldy, float eps) {                           \
        rms_norm_fwd<T>(x, w, y, rows, n, ldy, eps);                                                 \
    }                                                                                                \
    extern "C" __global__ void rms_norm_bwd_##SUFFIX(const T* x, const T* g, const T* w, const T* res, \
                                                     T* dx, int rows, int n, float eps) {            \
        rms_norm_bwd<T>(x, g, w, res, dx, rows, n, eps);                                             \
    }

RMS_NORM(f32, float)
RMS_NORM(bf16, __nv_bfloat16)
