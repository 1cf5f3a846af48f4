// The adapter side of up to three LoRA linears that read one input x [rows, K] (bf16), each with
// its own dropout mask (seed), on tensor cores (mma.sync m16n8k16, f32 sums):
//
//   lora_down     h_m = dropout_m(x) A_m^T                  [rows, R] bf16, the forward
//   lora_dx       dx += sum_m dropout_m(gh_m A_m)           in place, the input gradient (or,
//                                                           with accumulate 0, dx = the sum)
//   lora_grad_a   dA_m = gh_m^T dropout_m(x)                per row split, then
//   lora_grad_a_sum                                         the splits summed in a fixed order
//
// with A_m [R, K] bf16 and gh_m = g_m (scale B_m) given as its transpose [R, rows] bf16.
// `lora_grad_a_wide` can write lora_dx's sum (accumulate 0) in the same pass, each mask drawn
// once for both. Unfused, each linear drew its masked copy of x twice (forward, backward) and
// its masked input gradient once, a full-size pass each, besides three skinny GEMMs. Here the
// masks are drawn in registers with `pair_keep` (or `pair_halves`) over the element's index
// row * K + col, as `dropout.cu` and `dropout::keep` do; the products take x masked but not
// scaled (exact in bf16), and the dropout scale multiplies their f32 sums. threshold 0 (no
// dropout) skips the masks. K is a multiple of 16 (of 64 for `lora_down_wide` and
// `lora_down_tiles`, the forward's 16-byte variants), R one of 8, 16, 32, 64, rows * K below
// 2^32 (element indices in 32 bits). x's rows lie ldx elements apart (ldx >= K: x may be some
// columns of a wider matrix, as may h, whose rows lie ldh apart); the masks still index the
// element as row * K + col. A warp takes 16 rows: for the forward, all of a row tile's k-steps
// where the tiles are many (`lora_down_tiles`), else four warps split the k-steps of one row
// tile (and blocks split them further where there are few row tiles); for dx, 64 columns; for
// the gradient of A, 16 columns of x and a split of the rows (`lora_grad_a_wide`, where x's
// rows start on 16-byte boundaries, stages each tile's masked rows in shared memory).

#include <cuda_bf16.h>
#include <stdint.h>

#include "common.cuh"

namespace {

typedef __nv_bfloat16 bf16;

constexpr int MAX_M = 3;

__device__ __forceinline__ uint32_t ld32(const bf16* p) { return *reinterpret_cast<const uint32_t*>(p); }

__device__ __forceinline__ uint32_t pack(bf16 lo, bf16 hi) {
    return (uint32_t)__bfloat16_as_ushort(lo) | ((uint32_t)__bfloat16_as_ushort(hi) << 16);
}

// A's B operand pair for k-step ks, column col (its rows 16 ks + 2i, + 1 and + 8, + 9, zero
// past R), from A [R, K] row-major.
template <int R>
__device__ __forceinline__ void a_operand(uint32_t* b, const bf16* a, int K, int col, int ks, int i) {
    const bf16* p = a + col;
    const int k = ks * 16 + 2 * i;
    b[0] = pack(p[(size_t)k * K], p[(size_t)(k + 1) * K]);
    b[1] = k + 8 < R ? pack(p[(size_t)(k + 8) * K], p[(size_t)(k + 9) * K]) : 0u;
}

// gh's B operand pair for one n-tile (p: its row of gh's transpose) and a tile's rows rr (2i,
// 2i+1, 2i+8, 2i+9 past its first): row pairs adjacent there, read as one word where the tile
// is whole and the pair on a word boundary, else element by element, zero at or past `end`.
__device__ __forceinline__ void gh_operand(uint32_t* b, const bf16* p, const size_t* rr, size_t end, bool whole) {
    const bf16 zero = __float2bfloat16(0.0f);
    if (whole) {
        b[0] = ld32(p + rr[0]);
        b[1] = ld32(p + rr[2]);
    } else {
        b[0] = pack(rr[0] < end ? p[rr[0]] : zero, rr[1] < end ? p[rr[1]] : zero);
        b[1] = pack(rr[2] < end ? p[rr[2]] : zero, rr[3] < end ? p[rr[3]] : zero);
    }
}

// Rows ra (if va) and rb (if vb) of an m16n8 accumulator times mul, as bf16 pairs at column col
// of h (rows ldh apart).
__device__ __forceinline__ void store_pairs(bf16* h, size_t ldh, size_t ra, size_t rb, bool va, bool vb, int col,
                                            const float* acc, float mul) {
    if (va) *reinterpret_cast<__nv_bfloat162*>(h + ra * ldh + col) = __floats2bfloat162_rn(acc[0] * mul, acc[1] * mul);
    if (vb) *reinterpret_cast<__nv_bfloat162*>(h + rb * ldh + col) = __floats2bfloat162_rn(acc[2] * mul, acc[3] * mul);
}

struct Group {
    const bf16* a[MAX_M];
    uint64_t seed[MAX_M];
    int n;
};

// The forward's share of `units` (k-steps or chunks) for warp `warp` of four: blockIdx.y takes
// a split of gridDim.y, its warps a quarter of that each; [x, y), empty past the end.
__device__ __forceinline__ int2 warp_share(int units, int warp) {
    const int per_block = (units + gridDim.y - 1) / gridDim.y;
    const int b0 = min(units, (int)blockIdx.y * per_block), b1 = min(units, b0 + per_block);
    const int per_warp = (b1 - b0 + 3) / 4;
    const int w0 = min(b1, b0 + warp * per_warp);
    return make_int2(w0, min(b1, w0 + per_warp));
}

// The forward's end: the block's four warps sum their products in shared memory and warp 0
// writes h (one split of the k-steps) or its split's f32 part [split, n, rows, R].
template <int R>
__device__ void down_store(float (&acc)[MAX_M][R / 8][4], int n, bf16* const* h, size_t ldh, size_t rows, size_t ra,
                           size_t rb, bool va, bool vb, float scale, float* part) {
    __shared__ float red[3][MAX_M][R / 8][4][32];
    const int lane = threadIdx.x & 31, i = lane & 3, warp = threadIdx.x >> 5;
    if (warp > 0) {
#pragma unroll
        for (int m = 0; m < MAX_M; ++m)
#pragma unroll
            for (int nt = 0; nt < R / 8; ++nt)
#pragma unroll
                for (int j = 0; j < 4; ++j) red[warp - 1][m][nt][j][lane] = acc[m][nt][j];
    }
    __syncthreads();
    if (warp > 0) return;
#pragma unroll
    for (int w = 0; w < 3; ++w)
#pragma unroll
        for (int m = 0; m < MAX_M; ++m)
#pragma unroll
            for (int nt = 0; nt < R / 8; ++nt)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[m][nt][j] += red[w][m][nt][j][lane];
#pragma unroll
    for (int m = 0; m < MAX_M; ++m) {
        if (m >= n) break;
#pragma unroll
        for (int nt = 0; nt < R / 8; ++nt) {
            const int col = nt * 8 + 2 * i;
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[m][nt][j] *= scale;
            if (gridDim.y == 1) {
                store_pairs(h[m], ldh, ra, rb, va, vb, col, acc[m][nt], 1.0f);
            } else {
                float* out = part + ((size_t)blockIdx.y * n + m) * rows * R;
                if (va) *reinterpret_cast<float2*>(out + ra * R + col) = make_float2(acc[m][nt][0], acc[m][nt][1]);
                if (vb) *reinterpret_cast<float2*>(out + rb * R + col) = make_float2(acc[m][nt][2], acc[m][nt][3]);
            }
        }
    }
}

// A block per 16-row tile (blockIdx.x) and split of the k-steps (blockIdx.y of gridDim.y); its
// four warps take a quarter of that split each and sum in shared memory. With one split the
// block writes h, else its f32 part [split, n, rows, R] (summed by lora_down_sum).
template <int R>
__device__ void lora_down(const bf16* x, size_t ldx, size_t rows, int K, Group grp, bf16* h0, bf16* h1, bf16* h2,
                          size_t ldh, uint32_t threshold, float scale, float* part) {
    bf16* h[MAX_M] = {h0, h1, h2};
    const int lane = threadIdx.x & 31, g = lane >> 2, i = lane & 3, warp = threadIdx.x >> 5;
    const size_t r0 = blockIdx.x * (size_t)16;
    const size_t ra = r0 + g, rb = r0 + g + 8;
    const bool va = ra < rows, vb = rb < rows;
    const int2 ws = warp_share(K / 16, warp);
    const int w0 = ws.x, w1 = ws.y;
    float acc[MAX_M][R / 8][4] = {};
    // the loads of STEPS k-steps are issued before their products
    constexpr int STEPS = 4;
    for (int k1 = w0; k1 < w1; k1 += STEPS) {
        uint32_t xs[STEPS][4];
#pragma unroll
        for (int s = 0; s < STEPS; ++s) {
            const int c = (k1 + s) * 16 + 2 * i;
            const bool in = k1 + s < w1;
            xs[s][0] = va && in ? ld32(x + ra * ldx + c) : 0u;
            xs[s][1] = vb && in ? ld32(x + rb * ldx + c) : 0u;
            xs[s][2] = va && in ? ld32(x + ra * ldx + c + 8) : 0u;
            xs[s][3] = vb && in ? ld32(x + rb * ldx + c + 8) : 0u;
        }
#pragma unroll
        for (int s = 0; s < STEPS; ++s) {
            if (k1 + s >= w1) break;
            const int c = (k1 + s) * 16 + 2 * i;
            const uint32_t ea = (uint32_t)ra * K + c, eb = (uint32_t)rb * K + c;
            const uint32_t pair[4] = {ea >> 1, eb >> 1, (ea + 8) >> 1, (eb + 8) >> 1};
#pragma unroll
            for (int m = 0; m < MAX_M; ++m) {
                if (m >= grp.n) break;
                uint32_t af[4];
#pragma unroll
                for (int j = 0; j < 4; ++j) af[j] = threshold ? xs[s][j] & pair_halves(grp.seed[m], pair[j], threshold) : xs[s][j];
                const bf16* a = grp.a[m];
#pragma unroll
                for (int nt = 0; nt < R / 8; ++nt) {
                    const bf16* row = a + (size_t)(nt * 8 + g) * K + c;
                    mma(acc[m][nt], af, ld32(row), ld32(row + 8));
                }
            }
        }
    }
    down_store<R>(acc, grp.n, h, ldh, rows, ra, rb, va, vb, scale, part);
}

// One 64-column chunk of `lora_down_wide`'s products for rows ra, rb: xq holds their columns
// lo..lo+7, hi..hi+7 (lo = 64 ch + 8i, hi = lo + 32), 16 bytes each (row a: xq[0], xq[1]; row b:
// xq[2], xq[3]).
template <int R>
__device__ __forceinline__ void down_chunk(float (&acc)[MAX_M][R / 8][4], const uint4 (&xq)[4], int lo, int hi, size_t ra,
                                           size_t rb, int K, const Group& grp, uint32_t threshold) {
    const int g = (threadIdx.x & 31) >> 2;
    // words 0-3: columns lo..lo+7, words 4-7: hi..hi+7, of row a (xw[0]) and row b (xw[1])
    const uint32_t* xw[2] = {reinterpret_cast<const uint32_t*>(&xq[0]), reinterpret_cast<const uint32_t*>(&xq[2])};
#pragma unroll
    for (int m = 0; m < MAX_M; ++m) {
        if (m >= grp.n) break;
        uint32_t xm[2][8];
#pragma unroll
        for (int rw = 0; rw < 2; ++rw) {
            const uint32_t row = (uint32_t)(rw ? rb : ra);
#pragma unroll
            for (int w = 0; w < 8; ++w) {
                const uint32_t col = (uint32_t)(w < 4 ? lo + 2 * w : hi + 2 * (w - 4));
                xm[rw][w] = threshold ? xw[rw][w] & pair_halves(grp.seed[m], (row * K + col) >> 1, threshold) : xw[rw][w];
            }
        }
        const bf16* a = grp.a[m];
#pragma unroll
        for (int nt = 0; nt < R / 8; ++nt) {
            const bf16* arow = a + (size_t)(nt * 8 + g) * K;
            uint4 aq[2] = {*reinterpret_cast<const uint4*>(arow + lo), *reinterpret_cast<const uint4*>(arow + hi)};
            const uint32_t* aw = reinterpret_cast<const uint32_t*>(aq);
#pragma unroll
            for (int s = 0; s < 4; ++s) {
                const uint32_t af[4] = {xm[0][2 * s], xm[1][2 * s], xm[0][2 * s + 1], xm[1][2 * s + 1]};
                mma(acc[m][nt], af, aw[2 * s], aw[2 * s + 1]);
            }
        }
    }
}

// Columns lo..lo+7 and hi..hi+7 of rows ra (if va) and rb (if vb) of x, 16 bytes each.
__device__ __forceinline__ void down_fetch(uint4 (&xq)[4], const bf16* x, size_t ldx, size_t ra, size_t rb, bool va,
                                           bool vb, int lo, int hi) {
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    xq[0] = va ? *reinterpret_cast<const uint4*>(x + ra * ldx + lo) : zero;
    xq[1] = va ? *reinterpret_cast<const uint4*>(x + ra * ldx + hi) : zero;
    xq[2] = vb ? *reinterpret_cast<const uint4*>(x + rb * ldx + lo) : zero;
    xq[3] = vb ? *reinterpret_cast<const uint4*>(x + rb * ldx + hi) : zero;
}

// As `lora_down` where K is a multiple of 64, in 64-column chunks (blockIdx.y splits the chunks,
// the four warps a quarter of a split each) read 16 bytes at a time. The product sums over k in
// any order, so each chunk's columns are dealt to the mma fragments permuted, the same way for x
// and for A: lane i takes columns 8i..8i+7 and 32+8i..32+8i+7 of the chunk, two 16-byte loads
// per row, and k-step s reads its words 2s and 2s+1 (a0/a1 and a2/a3, b0 and b1). Each word is
// an aligned column pair, masked by its own `pair_halves` as in `lora_down`.
template <int R>
__device__ void lora_down_wide(const bf16* x, size_t ldx, size_t rows, int K, Group grp, bf16* h0, bf16* h1,
                               bf16* h2, size_t ldh, uint32_t threshold, float scale, float* part) {
    bf16* h[MAX_M] = {h0, h1, h2};
    const int lane = threadIdx.x & 31, g = lane >> 2, i = lane & 3, warp = threadIdx.x >> 5;
    const size_t r0 = blockIdx.x * (size_t)16;
    const size_t ra = r0 + g, rb = r0 + g + 8;
    const bool va = ra < rows, vb = rb < rows;
    const int2 ws = warp_share(K / 64, warp);
    float acc[MAX_M][R / 8][4] = {};
    for (int ch = ws.x; ch < ws.y; ++ch) {
        const int lo = ch * 64 + 8 * i, hi = lo + 32;
        uint4 xq[4];
        down_fetch(xq, x, ldx, ra, rb, va, vb, lo, hi);
        down_chunk<R>(acc, xq, lo, hi, ra, rb, K, grp, threshold);
    }
    down_store<R>(acc, grp.n, h, ldh, rows, ra, rb, va, vb, scale, part);
}

// As `lora_down_wide` where the row tiles are many: a warp per tile (four per block) takes all
// of its chunks, the next chunk's x read while the current one is multiplied, and writes its
// rows of h itself (no sums across warps).
template <int R>
__device__ void lora_down_tiles(const bf16* x, size_t ldx, size_t rows, int K, Group grp, bf16* h0, bf16* h1,
                                bf16* h2, size_t ldh, uint32_t threshold, float scale) {
    bf16* h[MAX_M] = {h0, h1, h2};
    const int lane = threadIdx.x & 31, g = lane >> 2, i = lane & 3;
    const size_t r0 = (blockIdx.x * (size_t)(blockDim.x >> 5) + (threadIdx.x >> 5)) * 16;
    if (r0 >= rows) return;
    const size_t ra = r0 + g, rb = r0 + g + 8;
    const bool va = ra < rows, vb = rb < rows;
    const int chunks = K / 64;
    float acc[MAX_M][R / 8][4] = {};
    uint4 next[4];
    down_fetch(next, x, ldx, ra, rb, va, vb, 8 * i, 8 * i + 32);
    for (int ch = 0; ch < chunks; ++ch) {
        const int lo = ch * 64 + 8 * i, hi = lo + 32;
        const uint4 xq[4] = {next[0], next[1], next[2], next[3]};
        if (ch + 1 < chunks) down_fetch(next, x, ldx, ra, rb, va, vb, lo + 64, hi + 64);
        down_chunk<R>(acc, xq, lo, hi, ra, rb, K, grp, threshold);
    }
#pragma unroll
    for (int m = 0; m < MAX_M; ++m) {
        if (m >= grp.n) break;
#pragma unroll
        for (int nt = 0; nt < R / 8; ++nt) {
            store_pairs(h[m], ldh, ra, rb, va, vb, nt * 8 + 2 * i, acc[m][nt], scale);
        }
    }
}

// The A fragment of gh (rows ra, rb; the k-step at column k0, zero past R) from its transpose
// ght [R, rows].
template <int R>
__device__ __forceinline__ void gh_fragment(uint32_t* f, const bf16* ght, size_t rows, size_t ra, size_t rb, bool va, bool vb, int k0, int i) {
    const bf16 zero = __float2bfloat16(0.0f);
    const int c = k0 + 2 * i;
    auto at = [&](int col, size_t row, bool valid) { return valid && col < R ? ght[col * rows + row] : zero; };
    f[0] = pack(at(c, ra, va), at(c + 1, ra, va));
    f[1] = pack(at(c, rb, vb), at(c + 1, rb, vb));
    f[2] = pack(at(c + 8, ra, va), at(c + 9, ra, va));
    f[3] = pack(at(c + 8, rb, vb), at(c + 9, rb, vb));
}

// A warp per 64 columns (COLS / 8 n-tiles) and a range of tiles of 16 rows: the grid's warps are
// dealt out as a whole number of slots per column chunk (the few left over idle), each slot a
// contiguous range of the tiles, so that one wave of warps takes it all with no partial last wave
// (the host sizes the grid to the resident warps). For each tile its dx is loaded first, then the
// products of every adapter added, then stored. A's B operands for the warp's columns do not
// change from tile to tile: at ranks up to 16 (6 registers per n-tile and adapter at most) they
// are loaded once, before the first tile.
template <int R>
__device__ void lora_dx(bf16* dx, size_t rows, int K, Group grp, const bf16* gh0, const bf16* gh1, const bf16* gh2,
                        uint32_t threshold, float scale, int accumulate) {
    const bf16* gh[MAX_M] = {gh0, gh1, gh2};
    constexpr int KS = (R + 15) / 16, COLS = 64, NT = COLS / 8;
    constexpr bool HOIST = R <= 16;
    const int lane = threadIdx.x & 31, g = lane >> 2, i = lane & 3;
    const size_t warp = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5;
    const size_t total = ((size_t)gridDim.x * blockDim.x) >> 5;
    const size_t chunks = (K + COLS - 1) / COLS, slots = total / chunks;
    if (warp >= slots * chunks) return;
    const size_t tiles = (rows + 15) / 16, slot = warp / chunks;
    const size_t first = tiles * slot / slots, last = tiles * (slot + 1) / slots;
    const int c0 = (int)(warp % chunks) * COLS;
    if (first >= last) return;
    // the B operand pair of A at n-tile nt, k-step ks of adapter m
    auto b_of = [&](int m, int nt, int ks, uint32_t* b) { a_operand<R>(b, grp.a[m], K, c0 + nt * 8 + g, ks, i); };
    uint32_t bh[HOIST ? MAX_M : 1][HOIST ? NT : 1][2];
    if constexpr (HOIST) {
#pragma unroll
        for (int m = 0; m < MAX_M; ++m)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
                if (m < grp.n && c0 + nt * 8 < K) b_of(m, nt, 0, bh[m][nt]);
    }
    for (size_t tile = first; tile < last; ++tile) {
        const size_t ra = tile * 16 + g, rb = ra + 8;
        const bool va = ra < rows, vb = rb < rows;
        __nv_bfloat162 da[NT], db[NT];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const int col = c0 + nt * 8 + 2 * i;
            const bool in = c0 + nt * 8 < K;
            da[nt] = db[nt] = __floats2bfloat162_rn(0.0f, 0.0f);
            if (!accumulate) continue;
            if (va && in) da[nt] = *reinterpret_cast<const __nv_bfloat162*>(dx + ra * K + col);
            if (vb && in) db[nt] = *reinterpret_cast<const __nv_bfloat162*>(dx + rb * K + col);
        }
        uint32_t af[MAX_M][KS][4];
#pragma unroll
        for (int m = 0; m < MAX_M; ++m) {
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) {
                if (m < grp.n) gh_fragment<R>(af[m][ks], gh[m], rows, ra, rb, va, vb, ks * 16, i);
            }
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const int n0 = c0 + nt * 8;
            if (n0 >= K) break;
            const int col = n0 + 2 * i;
            float sum[4] = {};
#pragma unroll
            for (int m = 0; m < MAX_M; ++m) {
                if (m >= grp.n) break;
                float c[4] = {};
#pragma unroll
                for (int ks = 0; ks < KS; ++ks) {
                    if constexpr (HOIST) {
                        mma(c, af[m][ks], bh[m][nt][0], bh[m][nt][1]);
                    } else {
                        uint32_t b[2];
                        b_of(m, nt, ks, b);
                        mma(c, af[m][ks], b[0], b[1]);
                    }
                }
                if (threshold) {
                    const uint32_t ka = pair_keep(grp.seed[m], ((uint32_t)ra * K + col) >> 1, threshold);
                    const uint32_t kb = pair_keep(grp.seed[m], ((uint32_t)rb * K + col) >> 1, threshold);
                    sum[0] += ka & 2u ? c[0] * scale : 0.0f;
                    sum[1] += ka & 1u ? c[1] * scale : 0.0f;
                    sum[2] += kb & 2u ? c[2] * scale : 0.0f;
                    sum[3] += kb & 1u ? c[3] * scale : 0.0f;
                } else {
#pragma unroll
                    for (int j = 0; j < 4; ++j) sum[j] += c[j] * scale;
                }
            }
            if (va) {
                const float2 d = __bfloat1622float2(da[nt]);
                da[nt] = __floats2bfloat162_rn(d.x + sum[0], d.y + sum[1]);
            }
            if (vb) {
                const float2 d = __bfloat1622float2(db[nt]);
                db[nt] = __floats2bfloat162_rn(d.x + sum[2], d.y + sum[3]);
            }
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const int col = c0 + nt * 8 + 2 * i;
            const bool in = c0 + nt * 8 < K;
            if (va && in) *reinterpret_cast<__nv_bfloat162*>(dx + ra * K + col) = da[nt];
            if (vb && in) *reinterpret_cast<__nv_bfloat162*>(dx + rb * K + col) = db[nt];
        }
    }
}

// acc (a warp's 16 columns of x by R) += af (the A fragment of x^T over one row tile) times
// gh's B fragment for the tile's rows rr (2i, 2i+1, 2i+8, 2i+9 past its first), from gh's
// transpose [R, rows]: row pairs are adjacent there, read as one word where the tile is whole and
// the pair on a word boundary, else element by element, zero at or past `end`.
template <int R>
__device__ __forceinline__ void grad_a_products(float (&acc)[R / 8][4], const uint32_t* af, const bf16* ght, size_t rows,
                                                const size_t* rr, size_t end, bool whole, int g) {
#pragma unroll
    for (int nt = 0; nt < R / 8; ++nt) {
        uint32_t b[2];
        gh_operand(b, ght + (size_t)(nt * 8 + g) * rows, rr, end, whole);
        mma(acc[nt], af, b[0], b[1]);
    }
}

// A warp's sums for the n adapters (16 columns of x from c0, by R; lane 4g + i) into its
// split's part [splits, n, K, R].
template <int R>
__device__ __forceinline__ void grad_a_store(const float (&acc)[MAX_M][R / 8][4], int n, int K, int c0, int g, int i,
                                             float* part) {
    const int ca = c0 + g, cb = c0 + g + 8;
#pragma unroll
    for (int m = 0; m < MAX_M; ++m) {
        if (m >= n) break;
        float* out = part + ((size_t)blockIdx.y * n + m) * K * R;
#pragma unroll
        for (int nt = 0; nt < R / 8; ++nt) {
            const int c = nt * 8 + 2 * i;
            out[(size_t)ca * R + c] = acc[m][nt][0];
            out[(size_t)ca * R + c + 1] = acc[m][nt][1];
            out[(size_t)cb * R + c] = acc[m][nt][2];
            out[(size_t)cb * R + c + 1] = acc[m][nt][3];
        }
    }
}

// One block: four warps, each 16 columns of x; blockIdx.y: a split of `chunk` rows. The partial
// products go to part [splits, n, K, R] (f32).
template <int R>
__device__ void lora_grad_a(const bf16* x, size_t ldx, size_t rows, int K, Group grp, const bf16* gh0, const bf16* gh1,
                            const bf16* gh2, uint32_t threshold, size_t chunk, float* part) {
    const bf16* gh[MAX_M] = {gh0, gh1, gh2};
    const int lane = threadIdx.x & 31, g = lane >> 2, i = lane & 3;
    const int c0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * 16;
    if (c0 >= K) return;
    const size_t begin = blockIdx.y * chunk, end = min(rows, begin + chunk);
    const int ca = c0 + g, cb = c0 + g + 8;
    // This lane draws the masks of its own rows (2i, 2i+8 for an even g, 2i+1, 2i+9 for an odd
    // one) and gets the other two from lane ^ 4, which shares its column pairs.
    const int odd = g & 1;
    float acc[MAX_M][R / 8][4] = {};
    for (size_t r0 = begin; r0 < end; r0 += 16) {
        const bool whole = r0 + 16 <= end && rows % 2 == 0;
        // rows r0 + {2i, 2i+1, 2i+8, 2i+9}
        const size_t rr[4] = {r0 + 2 * i, r0 + 2 * i + 1, r0 + 2 * i + 8, r0 + 2 * i + 9};
        bf16 xa[4], xb[4];
        const bf16 zero = __float2bfloat16(0.0f);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            xa[j] = rr[j] < end ? x[rr[j] * ldx + ca] : zero;
            xb[j] = rr[j] < end ? x[rr[j] * ldx + cb] : zero;
        }
#pragma unroll
        for (int m = 0; m < MAX_M; ++m) {
            if (m >= grp.n) break;
            uint32_t keep = 0xffu;  // bit 2 * j for column a of row slot j, bit 2 * j + 1 for column b
            if (threshold) {
                // own rows: slots odd and odd + 2; per row a nibble, pair_keep's bits of column
                // pair a (bits 1, 0: even, odd column) and of pair b (bits 3, 2)
                uint32_t own = 0;
#pragma unroll
                for (int s = 0; s < 2; ++s) {
                    const size_t row = rr[0] + odd + 8 * s;
                    const uint32_t pa = pair_keep(grp.seed[m], ((uint32_t)row * K + (ca & ~1)) >> 1, threshold);
                    const uint32_t pb = pair_keep(grp.seed[m], ((uint32_t)row * K + (cb & ~1)) >> 1, threshold);
                    own |= (pa | (pb << 2)) << (4 * s);
                }
                const uint32_t other = __shfl_xor_sync(0xffffffffu, own, 4);
                keep = 0;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const uint32_t nib = ((j & 1) == odd ? own : other) >> (4 * (j >> 1));
                    keep |= (((nib >> (1 - odd)) & 1u) | (((nib >> (3 - odd)) & 1u) << 1)) << (2 * j);
                }
            }
            bf16 va[4], vb[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                va[j] = (keep >> (2 * j)) & 1u ? xa[j] : zero;
                vb[j] = (keep >> (2 * j + 1)) & 1u ? xb[j] : zero;
            }
            const uint32_t af[4] = {pack(va[0], va[1]), pack(vb[0], vb[1]), pack(va[2], va[3]), pack(vb[2], vb[3])};
            grad_a_products<R>(acc[m], af, gh[m], rows, rr, end, whole, g);
        }
    }
    grad_a_store<R>(acc, grp.n, K, c0, g, i, part);
}

// Four 8x8 bf16 matrices from shared memory, transposed, each lane giving one row address
// (ldmatrix x4 .trans); after the stores it reads, which a __syncwarp orders across lanes.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(p)))
                 : "memory");
}

// An 8x8 bf16 matrix of a fragment (lane l: row l / 4, columns 2 (l % 4) and + 1) transposed
// in registers (movmatrix .trans).
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t a) {
    uint32_t d;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(d) : "r"(a));
    return d;
}

// As `lora_grad_a` where x's rows start on 16-byte boundaries (x aligned, K a multiple of 8),
// the same fragments and sums: each lane reads 16 bytes (8 columns) of one of the tile's rows,
// masks them as four column pairs (one `pair_halves` each, no exchange between lanes), and
// stages them in shared memory, from which ldmatrix .trans gives the A fragment of x^T. Without
// dropout the adapters share one staged tile. The next tile's row is read while the current one
// is multiplied.
//
// With dx (not null, [rows, K] contiguous) the same pass writes the adapters' input gradient
// Σ_m dropout_m(gh_m A_m) for the warp's 16 columns of each tile, as `lora_dx` with accumulate 0
// would, each mask drawn once for both: gh's A fragments are its B fragments of the A gradient's
// products transposed in registers (movmatrix), A's B fragments for the warp's columns are loaded
// once, and the keep bits a lane drew for its staged pairs reach the lanes that hold those
// elements of the products by four shuffles.
template <int R>
__device__ void lora_grad_a_wide(const bf16* x, size_t ldx, size_t rows, int K, Group grp, const bf16* gh0, const bf16* gh1,
                                 const bf16* gh2, uint32_t threshold, float scale, size_t chunk, float* part, bf16* dx) {
    // 48-byte rows: ldmatrix's eight row reads fall on distinct banks
    constexpr int PITCH = 24, NT = R / 8, KS = (R + 15) / 16;
    __shared__ __align__(16) bf16 stage[4][MAX_M][16 * PITCH];
    const bf16* gh[MAX_M] = {gh0, gh1, gh2};
    const int lane = threadIdx.x & 31, g = lane >> 2, i = lane & 3, warp = threadIdx.x >> 5;
    const int c0 = (blockIdx.x * (blockDim.x >> 5) + warp) * 16;
    if (c0 >= K) return;
    const size_t begin = blockIdx.y * chunk, end = min(rows, begin + chunk);
    const bool masked = threshold != 0;
    // this lane's share of a tile: row lr, columns col..col+7
    const int lr = lane >> 1, col = c0 + 8 * (lane & 1);
    // its row address for ldmatrix: matrix lane / 8 is rows 8 (lane / 16) and columns
    // 8 ((lane / 8) % 2) of the staged tile (a0: rows 0-7 x columns 0-7, a1: columns 8-15, a2 and
    // a3: rows 8-15)
    const int ld_at = (((lane >> 4) << 3) + (lane & 7)) * PITCH + (((lane >> 3) & 1) << 3);
    bf16* mine = &stage[warp][0][0];
    const uint4 zero4 = make_uint4(0u, 0u, 0u, 0u);
    auto fetch = [&](size_t r0) {
        const size_t row = r0 + lr;
        return row < end ? *reinterpret_cast<const uint4*>(x + row * ldx + col) : zero4;
    };
    // dx's B operands: A_m's rows of k-step ks, the warp's columns c0 + 8 nt2 + g
    uint32_t ba[MAX_M][KS][2][2] = {};
    if (dx) {
#pragma unroll
        for (int m = 0; m < MAX_M; ++m) {
            if (m >= grp.n) break;
#pragma unroll
            for (int ks = 0; ks < KS; ++ks)
#pragma unroll
                for (int nt2 = 0; nt2 < 2; ++nt2) a_operand<R>(ba[m][ks][nt2], grp.a[m], K, c0 + nt2 * 8 + g, ks, i);
        }
    }
    // gh's B fragments for the rows r0 + {2i, 2i+1, 2i+8, 2i+9} of the tile at r0
    auto fetch_gh = [&](size_t r0, uint32_t (&b)[MAX_M][NT][2]) {
        const bool whole = r0 + 16 <= end && rows % 2 == 0;
        const size_t rr[4] = {r0 + 2 * i, r0 + 2 * i + 1, r0 + 2 * i + 8, r0 + 2 * i + 9};
#pragma unroll
        for (int m = 0; m < MAX_M; ++m) {
            if (m >= grp.n) break;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) gh_operand(b[m][nt], gh[m] + (size_t)(nt * 8 + g) * rows, rr, end, whole);
        }
    };
    float acc[MAX_M][NT][4] = {};
    // the next tile's x and gh are read while the current one is multiplied
    uint4 next = begin < end ? fetch(begin) : zero4;
    uint32_t gh_next[MAX_M][NT][2] = {};
    if (begin < end) fetch_gh(begin, gh_next);
    for (size_t r0 = begin; r0 < end; r0 += 16) {
        const uint4 cur = next;
        uint32_t b[MAX_M][NT][2];
#pragma unroll
        for (int m = 0; m < MAX_M; ++m)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) b[m][nt][0] = gh_next[m][nt][0], b[m][nt][1] = gh_next[m][nt][1];
        if (r0 + 16 < end) {
            next = fetch(r0 + 16);
            fetch_gh(r0 + 16, gh_next);
        }
        const uint32_t w[4] = {cur.x, cur.y, cur.z, cur.w};
        const uint32_t row = (uint32_t)(r0 + lr);
        // bit 8 m + 2 e: adapter m keeps the even element of this lane's pair e, + 1 the odd one
        uint32_t bits = 0xffffffu;
        __syncwarp();  // the last tile's ldmatrix reads are done before the stage is overwritten
#pragma unroll
        for (int m = 0; m < MAX_M; ++m) {
            if (m >= grp.n || (m > 0 && !masked)) break;
            uint32_t o[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                if (masked) {
                    const uint32_t keep = pair_halves(grp.seed[m], (row * (uint32_t)K + col + 2 * e) >> 1, threshold);
                    o[e] = w[e] & keep;
                    bits ^= ((~keep & 1u) | ((~keep >> 15) & 2u)) << (8 * m + 2 * e);
                } else {
                    o[e] = w[e];
                }
            }
            *reinterpret_cast<uint4*>(mine + m * 16 * PITCH + lr * PITCH + (col - c0)) = make_uint4(o[0], o[1], o[2], o[3]);
        }
        __syncwarp();
        // the keep bits of the product elements this lane holds: rows g (.x: columns 0-7,
        // .y: 8-15) and g + 8 (.z, .w), pair i of each
        uint4 kb = make_uint4(bits, bits, bits, bits);
        if (dx && masked) {
            kb.x = __shfl_sync(0xffffffffu, bits, 2 * g);
            kb.y = __shfl_sync(0xffffffffu, bits, 2 * g + 1);
            kb.z = __shfl_sync(0xffffffffu, bits, 2 * g + 16);
            kb.w = __shfl_sync(0xffffffffu, bits, 2 * g + 17);
        }
        float sum[2][4] = {};
#pragma unroll
        for (int m = 0; m < MAX_M; ++m) {
            if (m >= grp.n) break;
            uint32_t af[4];
            ldmatrix_x4_trans(af, mine + (masked ? m : 0) * 16 * PITCH + ld_at);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) mma(acc[m][nt], af, b[m][nt][0], b[m][nt][1]);
            if (!dx) continue;
            // gh's A fragment of k-step ks (rows g, g + 8; columns 16 ks + 2i, + 8) from the B
            // fragments of n-tiles 2 ks and 2 ks + 1 (rows 2i and 2i + 8, column g) transposed
            float c[2][4] = {};
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) {
                uint32_t ga[4];
                ga[0] = movmatrix_trans(b[m][2 * ks][0]);
                ga[1] = movmatrix_trans(b[m][2 * ks][1]);
                ga[2] = 2 * ks + 1 < NT ? movmatrix_trans(b[m][(2 * ks + 1) % NT][0]) : 0u;
                ga[3] = 2 * ks + 1 < NT ? movmatrix_trans(b[m][(2 * ks + 1) % NT][1]) : 0u;
#pragma unroll
                for (int nt2 = 0; nt2 < 2; ++nt2) mma(c[nt2], ga, ba[m][ks][nt2][0], ba[m][ks][nt2][1]);
            }
            const int sh = 8 * m + 2 * i;
#pragma unroll
            for (int nt2 = 0; nt2 < 2; ++nt2) {
                const uint32_t ka = (nt2 ? kb.y : kb.x) >> sh, kc = (nt2 ? kb.w : kb.z) >> sh;
                sum[nt2][0] += ka & 1u ? c[nt2][0] : 0.0f;
                sum[nt2][1] += ka & 2u ? c[nt2][1] : 0.0f;
                sum[nt2][2] += kc & 1u ? c[nt2][2] : 0.0f;
                sum[nt2][3] += kc & 2u ? c[nt2][3] : 0.0f;
            }
        }
        if (dx) {
            const size_t ra = r0 + g, rb = ra + 8;
#pragma unroll
            for (int nt2 = 0; nt2 < 2; ++nt2) {
                const int cc = c0 + nt2 * 8 + 2 * i;
                if (ra < end) *reinterpret_cast<__nv_bfloat162*>(dx + ra * K + cc) = __floats2bfloat162_rn(sum[nt2][0] * scale, sum[nt2][1] * scale);
                if (rb < end) *reinterpret_cast<__nv_bfloat162*>(dx + rb * K + cc) = __floats2bfloat162_rn(sum[nt2][2] * scale, sum[nt2][3] * scale);
            }
        }
    }
    grad_a_store<R>(acc, grp.n, K, c0, g, i, part);
}

}  // namespace

// dA_m [R, K] (f32) = scale times the sum of the splits' parts, in split order (the masked x is
// not scaled in the products); added to dA_m with accumulate.
extern "C" __global__ void lora_grad_a_sum(const float* part, int splits, int n, int K, int R, float scale, float* d0,
                                           float* d1, float* d2, int accumulate) {
    const size_t per = (size_t)K * R, total = per * n;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)blockDim.x * gridDim.x) {
        const int m = e / per;
        const size_t kr = e % per;
        float s = 0.0f;
        // in split order; unrolled, the loads go out ahead of the sums
#pragma unroll 8
        for (int sp = 0; sp < splits; ++sp) s += part[((size_t)sp * n + m) * per + kr];
        s *= scale;
        const size_t k = kr / R, r = kr % R;
        float* o = (m == 0 ? d0 : m == 1 ? d1 : d2) + r * K + k;
        *o = accumulate ? *o + s : s;
    }
}

// h_m [rows, R] (bf16, rows ldh apart) = the sum of the forward's k-split parts, in split order.
extern "C" __global__ void lora_down_sum(const float* part, int splits, int n, size_t rows, int R, bf16* h0, bf16* h1,
                                         bf16* h2, size_t ldh) {
    const size_t per = rows * R, total = per * n;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)blockDim.x * gridDim.x) {
        const int m = e / per;
        const size_t at = e % per;
        float s = 0.0f;
        for (int sp = 0; sp < splits; ++sp) s += part[((size_t)sp * n + m) * per + at];
        (m == 0 ? h0 : m == 1 ? h1 : h2)[at / R * ldh + at % R] = __float2bfloat16(s);
    }
}

#define LORA(R)                                                                                                      \
    extern "C" __global__ void lora_down_r##R(const bf16* x, size_t ldx, size_t rows, int K, const bf16* a0,          \
                                              const bf16* a1, const bf16* a2, uint64_t s0, uint64_t s1, uint64_t s2, \
                                              int n, bf16* h0, bf16* h1, bf16* h2, size_t ldh, uint32_t threshold,   \
                                              float scale, float* part) {                                            \
        lora_down<R>(x, ldx, rows, K, Group{{a0, a1, a2}, {s0, s1, s2}, n}, h0, h1, h2, ldh, threshold, scale,       \
                     part);                                                                                          \
    }                                                                                                                \
    extern "C" __global__ void lora_down_wide_r##R(const bf16* x, size_t ldx, size_t rows, int K, const bf16* a0,     \
                                                   const bf16* a1, const bf16* a2, uint64_t s0, uint64_t s1,         \
                                                   uint64_t s2, int n, bf16* h0, bf16* h1, bf16* h2, size_t ldh,     \
                                                   uint32_t threshold, float scale, float* part) {                   \
        lora_down_wide<R>(x, ldx, rows, K, Group{{a0, a1, a2}, {s0, s1, s2}, n}, h0, h1, h2, ldh, threshold, scale,  \
                          part);                                                                                     \
    }                                                                                                                \
    extern "C" __global__ void lora_down_tiles_r##R(const bf16* x, size_t ldx, size_t rows, int K, const bf16* a0,    \
                                                    const bf16* a1, const bf16* a2, uint64_t s0, uint64_t s1,        \
                                                    uint64_t s2, int n, bf16* h0, bf16* h1, bf16* h2, size_t ldh,    \
                                                    uint32_t threshold, float scale) {                               \
        lora_down_tiles<R>(x, ldx, rows, K, Group{{a0, a1, a2}, {s0, s1, s2}, n}, h0, h1, h2, ldh, threshold,        \
                           scale);                                                                                   \
    }                                                                                                                \
    extern "C" __global__ void lora_dx_r##R(bf16* dx, size_t rows, int K, const bf16* a0, const bf16* a1,             \
                                            const bf16* a2, uint64_t s0, uint64_t s1, uint64_t s2, int n,            \
                                            const bf16* gh0, const bf16* gh1, const bf16* gh2, uint32_t threshold,   \
                                            float scale, int accumulate) {                                           \
        lora_dx<R>(dx, rows, K, Group{{a0, a1, a2}, {s0, s1, s2}, n}, gh0, gh1, gh2, threshold, scale, accumulate); \
    }                                                                                                                \
    extern "C" __global__ void lora_grad_a_r##R(const bf16* x, size_t ldx, size_t rows, int K, uint64_t s0,          \
                                                uint64_t s1, uint64_t s2, int n, const bf16* gh0, const bf16* gh1,   \
                                                const bf16* gh2, uint32_t threshold, size_t chunk, float* part) {    \
        lora_grad_a<R>(x, ldx, rows, K, Group{{nullptr, nullptr, nullptr}, {s0, s1, s2}, n}, gh0, gh1, gh2,        \
                       threshold, chunk, part);                                                                      \
    }                                                                                                                \
    extern "C" __global__ void lora_grad_a_wide_r##R(const bf16* x, size_t ldx, size_t rows, int K, const bf16* a0,  \
                                                     const bf16* a1, const bf16* a2, uint64_t s0, uint64_t s1,       \
                                                     uint64_t s2, int n, const bf16* gh0, const bf16* gh1,           \
                                                     const bf16* gh2, uint32_t threshold, float scale, size_t chunk, \
                                                     float* part, bf16* dx) {                                        \
        lora_grad_a_wide<R>(x, ldx, rows, K, Group{{a0, a1, a2}, {s0, s1, s2}, n}, gh0, gh1, gh2, threshold, scale,  \
                            chunk, part, dx);                                                                        \
    }

LORA(8)
LORA(16)
LORA(32)
LORA(64)
