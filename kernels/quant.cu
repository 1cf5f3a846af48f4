// GGML weight blocks dequantized straight to bf16, one thread per block of 32 weights, for the
// 4-bit frozen linears' GEMMs on the GPU (candle's dequantize writes f32, then a cast halves it:
// four times the bytes). Every block starts with its f16 scale d:
//   q4_0  18 bytes: d, 16 bytes of nibbles; weight j (< 16) is the low nibble of byte j and
//         weight j + 16 its high nibble: (q - 8) * d
//   q4_1  20 bytes: d, m (f16), the same nibbles: q * d + m
//   q8_0  34 bytes: d, 32 signed bytes: q * d
// The products are exact in f32 (at most 8 by 11 significant bits), so each weight is rounded
// once, to nearest even, as the f32 dequantization followed by a cast rounds it.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "common.cuh"

namespace {

__device__ __forceinline__ float f16_at(const uint8_t* b) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(b[0] | (b[1] << 8))));
}

// Blocks of WORDS 16-bit words (every block size is even, so blocks are 2-byte aligned), each
// decoded into 32 floats and stored as four 16-byte bf16 writes.
template <int WORDS, typename Decode>
__device__ void dequant_blocks(const uint16_t* q, __nv_bfloat16* out, size_t blocks, Decode decode) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < blocks; i += (size_t)blockDim.x * gridDim.x) {
        uint16_t w[WORDS];
#pragma unroll
        for (int k = 0; k < WORDS; ++k) w[k] = q[i * WORDS + k];
        const uint8_t* b = reinterpret_cast<const uint8_t*>(w);
        float v[32];
        decode(b, v);
#pragma unroll
        for (int k = 0; k < 4; ++k) store16(out + i * 32 + k * 8, v + k * 8);
    }
}

}  // namespace

extern "C" __global__ void dequant_q4_0_bf16(const uint16_t* q, __nv_bfloat16* out, size_t blocks) {
    dequant_blocks<9>(q, out, blocks, [](const uint8_t* b, float* v) {
        const float d = f16_at(b);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            v[j] = (float)((b[2 + j] & 15) - 8) * d;
            v[j + 16] = (float)((b[2 + j] >> 4) - 8) * d;
        }
    });
}

extern "C" __global__ void dequant_q4_1_bf16(const uint16_t* q, __nv_bfloat16* out, size_t blocks) {
    dequant_blocks<10>(q, out, blocks, [](const uint8_t* b, float* v) {
        const float d = f16_at(b), m = f16_at(b + 2);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            v[j] = (float)(b[4 + j] & 15) * d + m;
            v[j + 16] = (float)(b[4 + j] >> 4) * d + m;
        }
    });
}

extern "C" __global__ void dequant_q8_0_bf16(const uint16_t* q, __nv_bfloat16* out, size_t blocks) {
    dequant_blocks<17>(q, out, blocks, [](const uint8_t* b, float* v) {
        const float d = f16_at(b);
#pragma unroll
        for (int j = 0; j < 32; ++j) v[j] = (float)static_cast<int8_t>(b[2 + j]) * d;
    });
}
