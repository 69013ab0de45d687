// Band mask policy: which key tiles a query tile visits, and the per-element test.
//
// Query i is aligned with key i + diag_offset and sees keys in
// [i + off - window_left, i + off + window_right] (a side < 0 is unbounded).
// A query tile [m0, m1) therefore only needs keys in
// [m0 + off - left, (m1 - 1) + off + right]; tiles outside that range are never
// loaded. Inside it, the element test removes the rest.
#pragma once

#include <cstdint>

#include "kernel_params.h"

namespace steelattn::cuda_generic {

struct KeyRange {
  int64_t lo, hi;  // inclusive key indices; empty when hi < lo
};

__host__ __device__ __forceinline__ KeyRange band_key_range(const KernelParams& p, int64_t m0,
                                                            int64_t m_last) {
  int64_t lo = 0, hi = int64_t(p.S) - 1;
  if (p.window_left >= 0) {
    const int64_t l = m0 + p.diag_offset - p.window_left;
    lo = l > lo ? l : lo;
  }
  if (p.window_right >= 0) {
    const int64_t h = m_last + p.diag_offset + p.window_right;
    hi = h < hi ? h : hi;
  }
  return {lo, hi};
}

// Key tiles [first, end) of width `block_n` that a query tile [m0, m_last] visits.
struct TileRange {
  int32_t first, end;
};

__device__ __forceinline__ TileRange key_tile_range(const KernelParams& p, int64_t m0,
                                                    int64_t m_last, int block_n) {
  const KeyRange r = band_key_range(p, m0, m_last);
  if (r.hi < r.lo) return {0, 0};
  return {int32_t(r.lo / block_n), int32_t(r.hi / block_n) + 1};
}

__device__ __forceinline__ bool band_visible(const KernelParams& p, int64_t i, int64_t j) {
  const int64_t a = i + p.diag_offset;
  return (p.window_left < 0 || j >= a - p.window_left) &&
         (p.window_right < 0 || j <= a + p.window_right);
}

}  // namespace steelattn::cuda_generic
