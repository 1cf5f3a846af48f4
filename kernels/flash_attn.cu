// Causal attention as tiled tensor-core kernels (bf16 data, f32 accumulation), forward and
// backward, with the scores never written to memory.
//
// q is [b, heads, t, d], k and v [b, kv_heads, t, d], d 64 or 128, each in any layout whose rows
// of d are contiguous: element (batch, head, row) of a tensor starts at
// batch * s.b + head * s.h + row * s.r (`Rows`), so a [b, t, heads, d] projection output is read
// in place, and outputs are written the same way. Query head hh reads kv head
// hh / (heads / kv_heads). Key j is visible to query i of batch row r iff starts[r] <= j <= i,
// and a padding query (i < starts[r]) sees only itself: the mask of `causal_softmax.cu`,
// computed from indices.
//
//   flash_fwd   o = softmax(scale * q k^T) v over the visible keys, and per query
//               lse = log2(sum_j exp2(scale * log2(e) * s_ij)) (the row's log-sum-exp, base 2,
//               [b, heads, t] contiguous)
//   flash_dq    dq = scale * ds k, with ds = p * (do v^T - D), p recomputed from lse; it computes
//               D = sum_d do * o per query from o (f32, [b, heads, t] contiguous) and writes it
//   flash_dkv   dk = scale * ds^T q and dv = p^T do, summed over the query heads sharing the kv
//               head; one block owns its keys, so no atomics; it reads dq's D (it runs after)
//
// Given RoPE's tables (`Rope`), dq and dk are rotated back as they are stored: the gradients of
// the projections before RoPE, with no pass of their own.
//
// The grid is (heads, batch rows, tiles), the tile slowest, so that blocks start in the order of
// their work, longest first, across all heads and rows (a tail of long blocks would leave most
// multiprocessors idle). Each block has four warps. The forward and dq kernels give each warp 16
// queries of a 64-query tile (flash_fwd2_64: two such tiles of a 128-query block) and walk the
// key tiles up to the diagonal; dkv gives each warp 16 keys of a 64-key tile and walks the query
// tiles from the diagonal on. Products use mma.sync m16n8k16 (bf16 in, f32
// accumulate), operands staged in shared memory by cp.async (the next tile loads while the
// current one is multiplied) and read with ldmatrix; a product's f32 accumulator is rounded to
// bf16 in registers to become the next product's A operand (the layouts of the m16n8
// accumulator pair and the m16k16 A operand coincide). Shared memory is dynamic: the host sets
// each kernel's size (listed above the entry points, computed in `flash.rs`).

#include <cuda_bf16.h>
#include <stdint.h>
#include "common.cuh"

namespace {

using bf16 = __nv_bfloat16;

constexpr int kThreads = 128;
constexpr int kTile = 64;  // queries (forward, dq) or keys (dkv) per block

// Element strides of a tensor's batch, head and row (its last dimension is contiguous).
struct Rows {
    long long b, h, r;
};

// Queries per step of dkv: 64 for d = 64; 32 for d = 128, whose key and value gradients fill
// more registers.
template <int D>
__host__ __device__ constexpr int dkv_step() {
    return D == 64 ? 64 : 32;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 bf16 matrices from shared memory, each lane giving one row address (ldmatrix x4).
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// The A operand of rows r0..r0+15, columns k0..k0+15 of a row-major tile with `pitch` elements
// per row.
__device__ __forceinline__ void load_a(uint32_t* a, const bf16* tile, int pitch, int r0, int k0) {
    const int lane = threadIdx.x & 31;
    ldmatrix_x4(a, tile + (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * pitch + k0 + (lane >> 4) * 8);
}

// B operands (k0..k0+15) of the two n-tiles n0..n0+7 (b[0], b[1]) and n0+8..n0+15 (b[2], b[3])
// from a tile stored [n][k] (k^T of a row-major k, for q k^T).
__device__ __forceinline__ void load_b_nk(uint32_t* b, const bf16* tile, int pitch, int n0, int k0) {
    const int lane = threadIdx.x & 31;
    ldmatrix_x4(b, tile + (n0 + (lane & 7) + (lane >> 4) * 8) * pitch + k0 + ((lane >> 3) & 1) * 8);
}

// The same from a tile stored [k][n] (a row-major v, for p v), transposed by ldmatrix.
__device__ __forceinline__ void load_b_kn(uint32_t* b, const bf16* tile, int pitch, int k0, int n0) {
    const int lane = threadIdx.x & 31;
    const bf16* p = tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * pitch + n0 + (lane >> 4) * 8;
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                 : "r"(smem_addr(p)));
}

__device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// The A operand (16 rows x 16 columns) from accumulators n and n + 1 of 16x8 each.
__device__ __forceinline__ void to_a(uint32_t* a, const float* lo, const float* hi) {
    a[0] = pack(lo[0], lo[1]);
    a[1] = pack(lo[2], lo[3]);
    a[2] = pack(hi[0], hi[1]);
    a[3] = pack(hi[2], hi[3]);
}

// Starts copying rows r0..r0+rows-1 of a [t, D] matrix with `stride` elements between rows into
// a shared tile of pitch D + 8; rows at or past t become zeros. Completes at `wait`.
template <int D>
__device__ __forceinline__ void load_tile(bf16* dst, const bf16* src, long long stride, int r0, int rows, int t) {
    constexpr int V = D / 8;
    for (int i = threadIdx.x; i < rows * V; i += kThreads) {
        const int r = i / V, c = i % V;
        const bool in = r0 + r < t;
        const bf16* from = in ? src + (r0 + r) * stride + c * 8 : src;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst + r * (D + 8) + c * 8)),
                     "l"(from), "r"(in ? 16 : 0));
    }
}

__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most `N` committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// 2^x with the multi-function unit's one instruction, results below 2^-126 flushed to zero
// (exp2f adds a range fix-up for those around it: three more instructions per score).
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ bool visible(int query, int key, int start) {
    return key <= query && (key >= start || key == query);
}

__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffff, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffff, v, 1);
    return v + __shfl_xor_sync(0xffffffff, v, 2);
}

// Stores rows (r, r + 8) of a warp's 16 x D accumulators, the first times mul0 and the second
// times mul1, as bf16 rows of a [t, D] matrix with `stride` elements between rows.
template <int D>
__device__ __forceinline__ void store_rows(bf16* dst, long long stride, const float (*acc)[4], int r, int t,
                                           float mul0, float mul1) {
    const int c = threadIdx.x & 3;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = r + half * 8;
        if (row >= t) continue;
        const float mul = half ? mul1 : mul0;
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
            *reinterpret_cast<uint32_t*>(dst + row * stride + n * 8 + 2 * c) =
                pack(acc[n][2 * half] * mul, acc[n][2 * half + 1] * mul);
    }
}

// RoPE's tables to rotate a gradient back as it is stored: cos and sin [t, D/2] (or [b, t, D/2]
// with per_row), bf16; a null cos: no rotation.
struct Rope {
    const bf16* cos;
    const bf16* sin;
    int per_row;
};

// The table offset of row `row` of batch row bb.
__device__ __forceinline__ size_t rope_at(const Rope& rope, int bb, int row, int t, int half) {
    return ((rope.per_row ? (size_t)bb * t : 0) + row) * half;
}

// As store_rows with one factor for both rows, each row's halves rotated back by RoPE at its
// position: (x1, x2) -> (x1 cos + x2 sin, x2 cos - x1 sin), element j of the first half pairing
// with j + D/2, which the same lane holds in n-tile n + D/16. The rotation is the inverse RoPE
// pass's arithmetic, in f32 on the unrounded sums, rounded once.
template <int D>
__device__ __forceinline__ void store_rows_unrotated(bf16* dst, long long stride, const float (*acc)[4], int r, int t,
                                                     float mul, const Rope& rope, int bb) {
    constexpr int H = D / 2;
    const int c = threadIdx.x & 3;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = r + half * 8;
        if (row >= t) continue;
        const size_t at = rope_at(rope, bb, row, t, H);
#pragma unroll
        for (int n = 0; n < D / 16; ++n) {
            const int j = n * 8 + 2 * c;
            const float2 cs = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(rope.cos + at + j));
            const float2 sn = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(rope.sin + at + j));
            const float x1a = acc[n][2 * half] * mul, x1b = acc[n][2 * half + 1] * mul;
            const float x2a = acc[n + D / 16][2 * half] * mul, x2b = acc[n + D / 16][2 * half + 1] * mul;
            *reinterpret_cast<uint32_t*>(dst + row * stride + j) = pack(x1a * cs.x + x2a * sn.x, x1b * cs.y + x2b * sn.y);
            *reinterpret_cast<uint32_t*>(dst + row * stride + H + j) = pack(x2a * cs.x - x1a * sn.x, x2b * cs.y - x1b * sn.y);
        }
    }
}

// Stores rows (r, r + 8) of a warp's 16 x D accumulators times mul as f32 rows of D (a partial
// sum of `flash_dkv_sum`).
template <int D>
__device__ __forceinline__ void store_rows_f32(float* dst, const float (*acc)[4], int r, int t, float mul) {
    const int c = threadIdx.x & 3;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = r + half * 8;
        if (row >= t) continue;
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
            *reinterpret_cast<float2*>(dst + (size_t)row * D + n * 8 + 2 * c) =
                make_float2(acc[n][2 * half] * mul, acc[n][2 * half + 1] * mul);
    }
}

template <int N>
__device__ __forceinline__ void zero(float (*acc)[4]) {
#pragma unroll
    for (int n = 0; n < N; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
}

// acc[0] and acc[1] (16 x 8 each, columns n0..n0+15) += a (16 x 16) times the B operand of
// k0..k0+15 from a tile stored [n][k].
__device__ __forceinline__ void mma_nk(float (*acc)[4], const uint32_t* a, const bf16* tile, int pitch, int n0,
                                       int k0) {
    uint32_t b[4];
    load_b_nk(b, tile, pitch, n0, k0);
    mma(acc[0], a, b[0], b[1]);
    mma(acc[1], a, b[2], b[3]);
}

// The same from a tile stored [k][n].
__device__ __forceinline__ void mma_kn(float (*acc)[4], const uint32_t* a, const bf16* tile, int pitch, int k0,
                                       int n0) {
    uint32_t b[4];
    load_b_kn(b, tile, pitch, k0, n0);
    mma(acc[0], a, b[0], b[1]);
    mma(acc[1], a, b[2], b[3]);
}

// acc (16 x N) += p (16 x 16 * KS, held as 2 * KS accumulators of 16 x 8 and rounded to bf16
// as the A operand) times a tile stored [k][n] of 16 * KS rows and N columns.
template <int N, int KS>
__device__ __forceinline__ void mma_p(float (*acc)[4], const float (*p)[4], const bf16* tile, int pitch) {
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
        uint32_t a[4];
        to_a(a, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
        for (int nn = 0; nn < N / 16; ++nn) mma_kn(acc + 2 * nn, a, tile, pitch, kk * 16, nn * 16);
    }
}

// Starts copying the kTile-row k and v tiles from row k0 into kv (k) and kv + kTile * (D + 8)
// (v).
template <int D>
__device__ __forceinline__ void load_kv(bf16* kv, const bf16* k, long long k_stride, const bf16* v,
                                        long long v_stride, int k0, int t) {
    load_tile<D>(kv, k, k_stride, k0, kTile, t);
    load_tile<D>(kv + kTile * (D + 8), v, v_stride, k0, kTile, t);
}

// The two-stage pipeline's step: with `more` steps to come, starts the next stage's copies
// (`fetch`) and waits for the current stage's; on the last step waits for everything. Then the
// whole block sees the current stage.
template <typename F>
__device__ __forceinline__ void next_stage(bool more, F fetch) {
    if (more) {
        fetch();
        commit();
        wait<1>();
    } else {
        wait<0>();
    }
    __syncthreads();
}

// The forward with M query tiles of 16 rows per warp (a block of 64 M queries): each B operand
// read from shared memory (k for the scores, v for p v) serves the warp's M tiles, so M = 2
// halves the shared-memory reads per product, at the registers of twice the scores and sums.
template <int D, int M>
__device__ void flash_fwd(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse, Rows sq, Rows sk,
                          Rows sv, Rows so, int t, int h, int kvh, const uint32_t* starts, float scale_log2) {
    constexpr int P = D + 8, TILE = kTile * P, QT = kTile * M;
    extern __shared__ __align__(16) unsigned char smem[];
    // two stages of (k, v) tiles; q (QT rows) is staged through the second stage
    bf16* buf = reinterpret_cast<bf16*>(smem);
    // the longest rows (last tiles) first
    const int q0 = (gridDim.z - 1 - blockIdx.z) * QT, hh = blockIdx.x, bb = blockIdx.y, kh = hh / (h / kvh);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int start = (int)starts[bb];
    const bf16* qb = q + bb * sq.b + hh * sq.h;
    const bf16* kb = k + bb * sk.b + kh * sk.h;
    const bf16* vb = v + bb * sv.b + kh * sv.h;
    const int first = min(start, q0) / kTile * kTile, last = min(q0 + QT, t) - 1;
    load_tile<D>(buf + 2 * TILE, qb, sq.r, q0, QT, t);
    load_kv<D>(buf, kb, sk.r, vb, sv.r, first, t);
    commit();
    wait<0>();
    __syncthreads();
    // this warp's rows: w0 .. w0 + 16 M - 1, tile i from w0 + 16 i
    const int w0 = q0 + warp * 16 * M;
    uint32_t qf[M][D / 16][4];
#pragma unroll
    for (int i = 0; i < M; ++i)
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) load_a(qf[i][kk], buf + 2 * TILE, P, warp * 16 * M + i * 16, kk * 16);
    __syncthreads();
    float acc[M][D / 8][4];
    float m[M][2], l[M][2];
#pragma unroll
    for (int i = 0; i < M; ++i) {
        zero<D / 8>(acc[i]);
        m[i][0] = m[i][1] = -INFINITY;
        l[i][0] = l[i][1] = 0.0f;
    }
    int stage = 0;
    for (int k0 = first; k0 <= last; k0 += kTile, stage ^= 1) {
        next_stage(k0 + kTile <= last, [&] { load_kv<D>(buf + (stage ^ 1) * 2 * TILE, kb, sk.r, vb, sv.r, k0 + kTile, t); });
        // a tile wholly after the warp's last row is seen by none of its queries
        if (k0 <= w0 + 16 * M - 1) {
            const bf16* ks = buf + stage * 2 * TILE;
            const bf16* vs = ks + TILE;
            // raw scores q k^T; scaled into base 2 with the maximum taken off in one fma below
            float s[M][8][4];
#pragma unroll
            for (int i = 0; i < M; ++i) zero<8>(s[i]);
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
                for (int nn = 0; nn < 4; ++nn) {
                    uint32_t b[4];
                    load_b_nk(b, ks, P, nn * 16, kk * 16);
#pragma unroll
                    for (int i = 0; i < M; ++i) {
                        mma(s[i][2 * nn], qf[i][kk], b[0], b[1]);
                        mma(s[i][2 * nn + 1], qf[i][kk], b[2], b[3]);
                    }
                }
#pragma unroll
            for (int i = 0; i < M; ++i) {
                const int r0 = w0 + i * 16 + g;
                float mx[2] = {-INFINITY, -INFINITY};
                if (k0 + kTile - 1 <= w0 + i * 16 && k0 >= start) {
                    // every query of the tile sees every key: no mask
#pragma unroll
                    for (int n = 0; n < 8; ++n)
#pragma unroll
                        for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[i][n][e]);
                } else {
#pragma unroll
                    for (int n = 0; n < 8; ++n)
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int key = k0 + n * 8 + 2 * c + (e & 1);
                            const float x = visible(r0 + (e >> 1) * 8, key, start) ? s[i][n][e] : -INFINITY;
                            s[i][n][e] = x;
                            mx[e >> 1] = fmaxf(mx[e >> 1], x);
                        }
                }
                float base[2], corr[2];
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    // the scale is positive: the maximum of the scaled scores is the scaled maximum
                    const float mn = fmaxf(m[i][j], quad_max(mx[j]) * scale_log2);
                    base[j] = mn == -INFINITY ? 0.0f : mn;
                    corr[j] = ex2(m[i][j] - base[j]);
                    m[i][j] = mn;
                    l[i][j] *= corr[j];
                }
#pragma unroll
                for (int n = 0; n < 8; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const float p = ex2(fmaf(s[i][n][e], scale_log2, -base[e >> 1]));
                        s[i][n][e] = p;
                        l[i][e >> 1] += p;
                    }
#pragma unroll
                for (int n = 0; n < D / 8; ++n) {
                    acc[i][n][0] *= corr[0];
                    acc[i][n][1] *= corr[0];
                    acc[i][n][2] *= corr[1];
                    acc[i][n][3] *= corr[1];
                }
            }
            // acc += p v, each v operand read once for the warp's tiles
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                uint32_t a[M][4];
#pragma unroll
                for (int i = 0; i < M; ++i) to_a(a[i], s[i][2 * kk], s[i][2 * kk + 1]);
#pragma unroll
                for (int nn = 0; nn < D / 16; ++nn) {
                    uint32_t b[4];
                    load_b_kn(b, vs, P, kk * 16, nn * 16);
#pragma unroll
                    for (int i = 0; i < M; ++i) {
                        mma(acc[i][2 * nn], a[i], b[0], b[1]);
                        mma(acc[i][2 * nn + 1], a[i], b[2], b[3]);
                    }
                }
            }
        }
        __syncthreads();  // this stage is the next prefetch's target
    }
    const size_t lrow = ((size_t)bb * h + hh) * t;
#pragma unroll
    for (int i = 0; i < M; ++i) {
        const int r0 = w0 + i * 16 + g;
        const float l0 = quad_sum(l[i][0]), l1 = quad_sum(l[i][1]);
        store_rows<D>(o + bb * so.b + hh * so.h, so.r, acc[i], r0, t, 1.0f / l0, 1.0f / l1);
        if (c == 0) {
            if (r0 < t) lse[lrow + r0] = m[i][0] + log2f(l0);
            if (r0 + 8 < t) lse[lrow + r0 + 8] = m[i][1] + log2f(l1);
        }
    }
}

template <int D>
__device__ void flash_dq(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const bf16* o,
                         const float* lse, float* dsum, bf16* dq, Rows sq, Rows sk, Rows sv, Rows sdo, Rows so,
                         Rows sdq, int t, int h, int kvh, const uint32_t* starts, float scale_log2, float scale,
                         Rope rope) {
    constexpr int P = D + 8, TILE = kTile * P;
    extern __shared__ __align__(16) unsigned char smem[];
    // q, do, then two stages of (k, v)
    bf16* qs = reinterpret_cast<bf16*>(smem);
    bf16* dos = qs + TILE;
    bf16* buf = dos + TILE;
    const int q0 = (gridDim.z - 1 - blockIdx.z) * kTile, hh = blockIdx.x, bb = blockIdx.y, kh = hh / (h / kvh);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int start = (int)starts[bb];
    const bf16* kb = k + bb * sk.b + kh * sk.h;
    const bf16* vb = v + bb * sv.b + kh * sv.h;
    const int first = min(start, q0) / kTile * kTile, last = min(q0 + kTile, t) - 1;
    load_tile<D>(qs, q + bb * sq.b + hh * sq.h, sq.r, q0, kTile, t);
    load_tile<D>(dos, dout + bb * sdo.b + hh * sdo.h, sdo.r, q0, kTile, t);
    load_kv<D>(buf, kb, sk.r, vb, sv.r, first, t);
    commit();
    const int r0 = q0 + warp * 16 + g;
    const size_t lrow = ((size_t)bb * h + hh) * t;
    // D = sum_d do * o of the warp's 16 rows, lanes 2j and 2j + 1 taking halves of row j, read
    // from global memory while the tiles load; written for flash_dkv, which runs next
    float dot = 0.0f;
    {
        const int row = q0 + warp * 16 + (lane >> 1), half = (lane & 1) * (D / 2);
        if (row < t) {
            const bf16* dp = dout + bb * sdo.b + hh * sdo.h + row * sdo.r + half;
            const bf16* op = o + bb * so.b + hh * so.h + row * so.r + half;
#pragma unroll
            for (int j = 0; j < D / 16; ++j) {
                const uint4 a = *reinterpret_cast<const uint4*>(dp + 8 * j);
                const uint4 b = *reinterpret_cast<const uint4*>(op + 8 * j);
                const __nv_bfloat162* a2 = reinterpret_cast<const __nv_bfloat162*>(&a);
                const __nv_bfloat162* b2 = reinterpret_cast<const __nv_bfloat162*>(&b);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float2 x = __bfloat1622float2(a2[e]), y = __bfloat1622float2(b2[e]);
                    dot = fmaf(x.x, y.x, dot);
                    dot = fmaf(x.y, y.y, dot);
                }
            }
        }
        dot += __shfl_xor_sync(0xffffffff, dot, 1);
        if ((lane & 1) == 0 && row < t) dsum[lrow + row] = dot;
    }
    float lrows[2], drows[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int row = r0 + i * 8;
        // row r0 + 8 i of the warp is row g + 8 i of its 16, summed in lane 2 (g + 8 i)
        drows[i] = __shfl_sync(0xffffffff, dot, 2 * (g + 8 * i));
        lrows[i] = row < t ? lse[lrow + row] : 0.0f;
    }
    float acc[D / 8][4];
    zero<D / 8>(acc);
    int stage = 0;
    for (int k0 = first; k0 <= last; k0 += kTile, stage ^= 1) {
        next_stage(k0 + kTile <= last, [&] { load_kv<D>(buf + (stage ^ 1) * 2 * TILE, kb, sk.r, vb, sv.r, k0 + kTile, t); });
        const bf16* ks = buf + stage * 2 * TILE;
        const bf16* vs = ks + TILE;
        float s[8][4], dp[8][4];
        zero<8>(s);
        zero<8>(dp);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t a[4], ad[4];
            load_a(a, qs, P, warp * 16, kk * 16);
            load_a(ad, dos, P, warp * 16, kk * 16);
#pragma unroll
            for (int nn = 0; nn < 4; ++nn) {
                mma_nk(s + 2 * nn, a, ks, P, nn * 16, kk * 16);
                mma_nk(dp + 2 * nn, ad, vs, P, nn * 16, kk * 16);
            }
        }
        // ds (of the scaled scores) = p * (dp - D), into s; the mask only where some query of the
        // block does not see some key of the tile
        if (k0 + kTile <= q0 && k0 >= start) {
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = e >> 1;
                    s[n][e] = ex2(fmaf(s[n][e], scale_log2, -lrows[i])) * (dp[n][e] - drows[i]);
                }
        } else {
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = e >> 1, key = k0 + n * 8 + 2 * c + (e & 1);
                    const float p = visible(r0 + i * 8, key, start) ? ex2(fmaf(s[n][e], scale_log2, -lrows[i])) : 0.0f;
                    s[n][e] = p * (dp[n][e] - drows[i]);
                }
        }
        mma_p<D, 4>(acc, s, ks, P);
        __syncthreads();  // this stage is the next prefetch's target
    }
    if (rope.cos)
        store_rows_unrotated<D>(dq + bb * sdq.b + hh * sdq.h, sdq.r, acc, r0, t, scale, rope, bb);
    else
        store_rows<D>(dq + bb * sdq.b + hh * sdq.h, sdq.r, acc, r0, t, scale, scale);
}

template <int D>
__device__ void flash_dkv(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,
                          const float* dsum, bf16* dk, bf16* dv, float* part, int splits, Rows sq, Rows sk, Rows sv,
                          Rows sdo, Rows sdk, Rows sdv, int t, int h, int kvh, const uint32_t* starts,
                          float scale_log2, float scale, Rope rope) {
    constexpr int P = D + 8, TILE = kTile * P, Q = dkv_step<D>(), QTILE = Q * P;
    extern __shared__ __align__(16) unsigned char smem[];
    // k, v, then two stages of (q, do) tiles of Q rows, then two stages of (lse, D) of Q queries
    bf16* ks = reinterpret_cast<bf16*>(smem);
    bf16* vs = ks + TILE;
    bf16* buf = vs + TILE;
    float* rows = reinterpret_cast<float*>(buf + 4 * QTILE);
    // the keys with the most queries (first tiles) first; block column x takes part `split` of
    // the query heads sharing kv head kh
    const int k0 = blockIdx.z * kTile, kh = blockIdx.x / splits, split = blockIdx.x % splits, bb = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int start = (int)starts[bb];
    const int rep = h / kvh, heads = rep / splits, head0 = kh * rep + split * heads;
    // keys before the row's start are seen only by themselves (padding queries)
    const int q_end = k0 + kTile <= start ? min(k0 + kTile, t) : t;
    const int steps_per_head = (q_end - k0 + Q - 1) / Q, steps = heads * steps_per_head;
    // starts step n's copies into stage `st`
    auto fetch = [&](int n, int st) {
        const int hh = head0 + n / steps_per_head, q0 = k0 + (n % steps_per_head) * Q;
        bf16* qs = buf + st * 2 * QTILE;
        load_tile<D>(qs, q + bb * sq.b + hh * sq.h, sq.r, q0, Q, t);
        load_tile<D>(qs + QTILE, dout + bb * sdo.b + hh * sdo.h, sdo.r, q0, Q, t);
        if (threadIdx.x < Q) {
            const int row = q0 + threadIdx.x;
            const size_t lrow = ((size_t)bb * h + hh) * t;
            rows[st * 2 * Q + threadIdx.x] = row < t ? lse[lrow + row] : 0.0f;
            rows[st * 2 * Q + Q + threadIdx.x] = row < t ? dsum[lrow + row] : 0.0f;
        }
    };
    load_tile<D>(ks, k + bb * sk.b + kh * sk.h, sk.r, k0, kTile, t);
    load_tile<D>(vs, v + bb * sv.b + kh * sv.h, sv.r, k0, kTile, t);
    fetch(0, 0);
    commit();
    float dka[D / 8][4], dva[D / 8][4];
    zero<D / 8>(dka);
    zero<D / 8>(dva);
    const int key0 = k0 + warp * 16 + g;
    for (int n = 0; n < steps; ++n) {
        const int st = n & 1, q0 = k0 + (n % steps_per_head) * Q;
        next_stage(n + 1 < steps, [&] { fetch(n + 1, st ^ 1); });
        const bf16* qs = buf + st * 2 * QTILE;
        const bf16* dos = qs + QTILE;
        const float* ls = rows + st * 2 * Q;
        const float* dd = ls + Q;
        // s^T = k q^T and dp^T = v do^T: this warp's 16 keys x Q queries
        float s[Q / 8][4], dp[Q / 8][4];
        zero<Q / 8>(s);
        zero<Q / 8>(dp);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t a[4], av[4];
            load_a(a, ks, P, warp * 16, kk * 16);
            load_a(av, vs, P, warp * 16, kk * 16);
#pragma unroll
            for (int nn = 0; nn < Q / 16; ++nn) {
                mma_nk(s + 2 * nn, a, qs, P, nn * 16, kk * 16);
                mma_nk(dp + 2 * nn, av, dos, P, nn * 16, kk * 16);
            }
        }
        // p^T into s, ds^T (of the scaled scores) into dp; the mask only where some query of the
        // step does not see some key of the block (or lies past t)
        if (q0 >= k0 + kTile && k0 >= start && q0 + Q <= t) {
#pragma unroll
            for (int j = 0; j < Q / 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int col = j * 8 + 2 * c + (e & 1);
                    const float p = ex2(fmaf(s[j][e], scale_log2, -ls[col]));
                    s[j][e] = p;
                    dp[j][e] = p * (dp[j][e] - dd[col]);
                }
        } else {
#pragma unroll
            for (int j = 0; j < Q / 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int col = j * 8 + 2 * c + (e & 1), query = q0 + col;
                    const float p = query < t && visible(query, key0 + (e >> 1) * 8, start)
                                        ? ex2(fmaf(s[j][e], scale_log2, -ls[col]))
                                        : 0.0f;
                    s[j][e] = p;
                    dp[j][e] = p * (dp[j][e] - dd[col]);
                }
        }
#pragma unroll
        for (int kk = 0; kk < Q / 16; ++kk) {
            uint32_t ap[4], ad[4];
            to_a(ap, s[2 * kk], s[2 * kk + 1]);
            to_a(ad, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
            for (int nn = 0; nn < D / 16; ++nn) {
                mma_kn(dva + 2 * nn, ap, dos, P, kk * 16, nn * 16);
                mma_kn(dka + 2 * nn, ad, qs, P, kk * 16, nn * 16);
            }
        }
        __syncthreads();  // this stage is the next prefetch's target
    }
    if (splits == 1) {
        if (rope.cos)
            store_rows_unrotated<D>(dk + bb * sdk.b + kh * sdk.h, sdk.r, dka, key0, t, scale, rope, bb);
        else
            store_rows<D>(dk + bb * sdk.b + kh * sdk.h, sdk.r, dka, key0, t, scale, scale);
        store_rows<D>(dv + bb * sdv.b + kh * sdv.h, sdv.r, dva, key0, t, 1.0f, 1.0f);
    } else {
        // partial sums [2][splits][b][kvh][t][D]: dk's, then dv's
        const size_t n = (size_t)gridDim.y * kvh * t * D;
        float* pk = part + split * n + ((size_t)bb * kvh + kh) * t * D;
        store_rows_f32<D>(pk, dka, key0, t, scale);
        store_rows_f32<D>(pk + splits * n, dva, key0, t, 1.0f);
    }
}

}  // namespace

// Dynamic shared memory of each kernel, in bytes, for head size D (pitch D + 8):
//   flash_fwd  2 stages x (k, v) x 64 rows
//   flash_dq   (q, do) x 64 rows + 2 stages x (k, v) x 64 rows
//   flash_dkv  (k, v) x 64 rows + 2 stages x (q, do) x step rows + 2 stages x (lse, D) x step
#define FLASH(D, FWD_BOUNDS, DQ_BOUNDS, DKV_BOUNDS)                                                              \
    extern "C" __global__ void __launch_bounds__ FWD_BOUNDS flash_fwd_##D(                            \
        const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse, Rows sq, Rows sk, Rows sv,     \
        Rows so, int t, int h, int kvh, const uint32_t* starts, float scale_log2) {                      \
        flash_fwd<D, 1>(q, k, v, o, lse, sq, sk, sv, so, t, h, kvh, starts, scale_log2);                \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__ DQ_BOUNDS flash_dq_##D(                               \
        const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const bf16* o, const float* lse,  \
        float* dsum, bf16* dq, Rows sq, Rows sk, Rows sv, Rows sdo, Rows so, Rows sdq, int t, int h,     \
        int kvh, const uint32_t* starts, float scale_log2, float scale, Rope rope) {                     \
        flash_dq<D>(q, k, v, dout, o, lse, dsum, dq, sq, sk, sv, sdo, so, sdq, t, h, kvh, starts,       \
                    scale_log2, scale, rope);                                                            \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__ DKV_BOUNDS flash_dkv_##D(                              \
        const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,                 \
        const float* dsum, bf16* dk, bf16* dv, float* part, int splits, Rows sq, Rows sk, Rows sv,      \
        Rows sdo, Rows sdk, Rows sdv, int t, int h, int kvh, const uint32_t* starts, float scale_log2,  \
        float scale, Rope rope) {                                                                        \
        flash_dkv<D>(q, k, v, dout, lse, dsum, dk, dv, part, DKV_SPLITS, sq, sk, sv, sdo, sdk, sdv, t, \
                     h, kvh, starts, scale_log2, scale, rope);                                           \
    }

// The backward kernels' launch bounds: at head size 64 the register allocation must allow three
// blocks per SM (dkv spills 16 bytes for it); at 128 no minimum, where shared memory (dq) or
// spills (dkv) rule three out. (An explicit minimum of one is not the same as none: it let dq
// take 217 registers instead of 177.)
// dk/dv split over the query heads of a kv head only at head size 128: at 64 the split's
// indices cost the registers that three blocks per SM leave (52 bytes of spills), so there the
// kernel is compiled for one part (`splits` is ignored; the host passes 1).
#define DKV_SPLITS 1
FLASH(64, (kThreads, 4), (kThreads, 3), (kThreads, 3))
#undef DKV_SPLITS
#define DKV_SPLITS splits
FLASH(128, (kThreads), (kThreads), (kThreads))
#undef DKV_SPLITS

// The forward with two query tiles per warp (128-query blocks), head size 64 only: at 128 the
// accumulators alone would take 128 registers a thread.
extern "C" __global__ void __launch_bounds__(kThreads, 2) flash_fwd2_64(
    const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse, Rows sq, Rows sk, Rows sv, Rows so, int t,
    int h, int kvh, const uint32_t* starts, float scale_log2) {
    flash_fwd<64, 2>(q, k, v, o, lse, sq, sk, sv, so, t, h, kvh, starts, scale_log2);
}

// dk and dv from flash_dkv's `splits` partial sums [2][splits][b][kvh][t][d] (f32), two elements
// per thread, written as bf16 rows of their tensors; with rope.cos, dk's rows rotated back as
// `store_rows_unrotated` does (the thread of a pair in the first half also takes its partner in
// the second).
extern "C" __global__ void flash_dkv_sum(const float* part, bf16* dk, bf16* dv, Rows sdk, Rows sdv, int splits, int b,
                                         int kvh, int t, int d, Rope rope) {
    const size_t n = (size_t)b * kvh * t * d;
    const int half = d / 2;
    auto sum = [&](size_t first, size_t i) {
        float2 acc = make_float2(0.0f, 0.0f);
        for (int s = 0; s < splits; ++s) {
            const float2 p = *reinterpret_cast<const float2*>(part + (first + s) * n + i);
            acc.x += p.x, acc.y += p.y;
        }
        return acc;
    };
    for (size_t i = 2 * (blockIdx.x * (size_t)blockDim.x + threadIdx.x); i < n; i += 2 * (size_t)blockDim.x * gridDim.x) {
        const int e = (int)(i % d), row = (int)(i / d % t), kh = (int)(i / ((size_t)d * t) % kvh);
        const int bb = (int)(i / ((size_t)d * t * kvh));
        const float2 sv = sum(splits, i);
        *reinterpret_cast<__nv_bfloat162*>(dv + bb * sdv.b + kh * sdv.h + row * sdv.r + e) = __floats2bfloat162_rn(sv.x, sv.y);
        bf16* out = dk + bb * sdk.b + kh * sdk.h + row * sdk.r;
        if (!rope.cos) {
            const float2 sk = sum(0, i);
            *reinterpret_cast<__nv_bfloat162*>(out + e) = __floats2bfloat162_rn(sk.x, sk.y);
        } else if (e < half) {
            const float2 x1 = sum(0, i), x2 = sum(0, i + half);
            const size_t at = rope_at(rope, bb, row, t, half) + e;
            const float2 cs = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(rope.cos + at));
            const float2 sn = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(rope.sin + at));
            *reinterpret_cast<__nv_bfloat162*>(out + e) = __floats2bfloat162_rn(x1.x * cs.x + x2.x * sn.x, x1.y * cs.y + x2.y * sn.y);
            *reinterpret_cast<__nv_bfloat162*>(out + half + e) = __floats2bfloat162_rn(x2.x * cs.x - x1.x * sn.x, x2.y * cs.y - x1.y * sn.y);
        }
    }
}
