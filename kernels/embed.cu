// Rows of a token embedding table held in page-locked host memory, mapped into the device's
// address space: the GPU reads each looked-up row over the bus, in stream order, so no host
// copy or synchronisation stands between a batch's ids (on the device) and its embeddings. The
// same kernels gather the rows of a table held on the device itself.
//
//   embed_gather_16  rows whose byte size is a multiple of 16 and a 16-byte aligned table:
//                    16-byte loads and stores
//   embed_gather_2   any other two-byte rows (bf16, f16)
//
// out[i] = table[ids[i]] for i < n; an id at or past `vocab` gives a row of zeros (never a read
// outside the table). One block per row, grid-strided.

#include <stdint.h>

template <typename T>
__device__ void gather(const T* table, const uint32_t* ids, T* out, long long n, int row_units, uint32_t vocab) {
    for (long long i = blockIdx.x; i < n; i += gridDim.x) {
        const uint32_t id = ids[i];
        T* dst = out + i * row_units;
        if (id >= vocab) {
            for (int c = threadIdx.x; c < row_units; c += blockDim.x) dst[c] = T{};
            continue;
        }
        const T* src = table + (long long)id * row_units;
        for (int c = threadIdx.x; c < row_units; c += blockDim.x) dst[c] = src[c];
    }
}

extern "C" __global__ void embed_gather_16(const uint4* table, const uint32_t* ids, uint4* out, long long n,
                                           int row_units, uint32_t vocab) {
    gather(table, ids, out, n, row_units, vocab);
}

extern "C" __global__ void embed_gather_2(const uint16_t* table, const uint32_t* ids, uint16_t* out, long long n,
                                          int row_units, uint32_t vocab) {
    gather(table, ids, out, n, row_units, vocab);
}
