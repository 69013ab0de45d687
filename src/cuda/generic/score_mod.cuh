// Score modifier hook shared by the generic kernels.
//
// Takes the raw dot product q.k of one (b, h, i, j) and returns the final score
// the softmax sees, or -inf when the key is hidden. The order is the library's
// contract: scale, softcap, ALiBi, additive bias, boolean mask, band, bounds.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernel_params.h"
#include "mask_policy.cuh"

namespace steelattn::cuda_generic {

// Per-row constants, hoisted out of the element loop.
struct RowCtx {
  int64_t b, h, i;
  float alibi_slope;         // 0 when ALiBi is off
  const float* bias_row;     // bias[b, h, i, :] or null
  const uint8_t* mask_row;   // mask[b, h, i, :] or null
};

__device__ __forceinline__ RowCtx make_row_ctx(const KernelParams& p, int64_t b, int64_t h,
                                               int64_t i) {
  RowCtx r;
  r.b = b;
  r.h = h;
  r.i = i;
  r.alibi_slope = p.alibi ? p.alibi[b * p.alibi_stride[0] + h * p.alibi_stride[1]] : 0.0f;
  r.bias_row = p.bias ? p.bias + b * p.bias_stride[0] + h * p.bias_stride[1] + i * p.bias_stride[2]
                      : nullptr;
  r.mask_row = p.mask ? p.mask + b * p.mask_stride[0] + h * p.mask_stride[1] + i * p.mask_stride[2]
                      : nullptr;
  return r;
}

// `dot` is the raw q.k sum of query r.i and key j. Every term is evaluated per
// element; a tile fully inside the band with no modifiers could skip this
// (not done yet: see the performance notes in the hand-off).
__device__ __forceinline__ float final_score(const KernelParams& p, const RowCtx& r, int64_t j,
                                             float dot) {
  if (r.i >= p.N || j >= p.S || !band_visible(p, r.i, j)) return -INFINITY;
  if (r.mask_row && r.mask_row[j * p.mask_stride[3]] == 0) return -INFINITY;
  float s = dot * p.scale;
  if (p.softcap > 0.0f) s = p.softcap * tanhf(s / p.softcap);
  if (p.alibi) {
    const int64_t d = r.i + p.diag_offset - j;
    s -= r.alibi_slope * float(d < 0 ? -d : d);
  }
  if (r.bias_row) s += r.bias_row[j * p.bias_stride[3]];
  return s;
}

}  // namespace steelattn::cuda_generic
