// Global -> shared tile loads for the tensor-core kernel.
//
// A tile is `rows` x `cols_pad` elements of a row-strided global matrix, with
// rows >= rows_valid and columns >= cols_valid zero-filled so that the mma
// loops can run over whole 16-wide steps. Full, aligned 16-byte chunks go
// through cp.async; ragged edges and unaligned views (odd strides or base
// pointers, e.g. [B,N,H,D] storage with odd H*D) fall back to element loads.
#pragma once

#include <cstdint>

#include "mma_sm80.cuh"

namespace steelattn::cuda_generic {

// `smem` has row stride `ld` elements (a multiple of 8, so every chunk is
// 16-byte aligned). `g` points at element (row 0, col 0) of the tile.
template <typename T, int kThreads>
__device__ __forceinline__ void load_tile(T* smem, int ld, int rows, int cols_pad, const T* g,
                                          int64_t row_stride, int rows_valid, int cols_valid,
                                          bool vec) {
  static_assert(sizeof(T) == 2, "16-bit element tiles only");
  constexpr int kChunk = 8;  // elements per 16-byte chunk
  const int chunks_per_row = cols_pad / kChunk;
  const int total = rows * chunks_per_row;
  for (int idx = threadIdx.x; idx < total; idx += kThreads) {
    const int r = idx / chunks_per_row;
    const int c = (idx - r * chunks_per_row) * kChunk;
    T* dst = smem + r * ld + c;
    if (r >= rows_valid || c >= cols_valid) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    } else if (vec && c + kChunk <= cols_valid) {
      cp_async_16(dst, g + r * row_stride + c);
    } else {
      const T* src = g + r * row_stride;
#pragma unroll
      for (int e = 0; e < kChunk; ++e) dst[e] = c + e < cols_valid ? src[c + e] : T(0.0f);
    }
  }
}

}  // namespace steelattn::cuda_generic
