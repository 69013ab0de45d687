// Score modifier: turns the raw q.k accumulator into the softmax operand x,
// applies softcap / ALiBi, and the element mask on boundary blocks.
//
// Units. The softmax computes p = exp2(x * c - max(x) * c), c = log2_factor:
//   plain:            x = q.k,                        c = scale * log2(e)
//   softcap or ALiBi: x = cap * tanh(scale q.k / cap) (or scale q.k)
//                         - slope * |i + diag_offset - j|,   c = log2(e)
// so the plain path costs one FFMA + one EX2 per score, as in FA3.
#pragma once

#include <cmath>

#include "cuda/sm90/mask.h"
#include "cuda/sm90/ptx.h"

namespace steelattn::sm90 {

// Fragment layout of an m64nBN fp32 accumulator (per thread, see PTX ISA
// "wgmma register fragments"): element s[4*jb + e] sits at
//   row = 16*warp + lane/4 + 8*(e>>1),   col = 8*jb + 2*(lane%4) + (e&1).
template <bool Softcap, bool Band, int BlockM, int BlockN, bool Pack = false>
struct ScoreMod {
  float scale, cap, cap_arg;
  bool has_alibi;
  float slope;  // this tile's head's ALiBi slope (0 when absent)
  int off;

  __device__ ScoreMod(const FwdParams& p, int b, int h)
      : scale(p.scale), cap(p.softcap), cap_arg(p.softcap_inv), has_alibi(p.alibi != nullptr), slope(0.f),
        off(p.diag_offset) {
    if (has_alibi) slope = p.alibi[b * p.alibi_stride_b + h * p.alibi_stride_h];
  }

  // row0: absolute query row of this thread's first row; col0: absolute key
  // column of this thread's first element (block start + 2*(lane%4)).
  // apply_rows with rows {row0, row0 + 8} and one slope computes the same, but
  // routing this through it made ptxas serialise the D64 causal kernel's wgmmas
  // (C7511, register pressure), so the unpacked form keeps its own loops.
  template <bool Masked, int NS>
  __device__ __forceinline__ void apply(float (&s)[NS], int row0, int col0,
                                        const MaskPolicy<Band, BlockM, BlockN, Pack>& mask) const {
    if constexpr (Softcap) {
#pragma unroll
      for (int e = 0; e < NS; ++e) s[e] = cap * tanh_approx(s[e] * cap_arg);
    }
    if (has_alibi) {
#pragma unroll
      for (int e = 0; e < NS; ++e) {
        const int row = row0 + 8 * ((e >> 1) & 1);
        const int col = col0 + 8 * (e >> 2) + (e & 1);
        const float dist = static_cast<float>(abs(row + off - col));
        const float x = Softcap ? s[e] : s[e] * scale;
        s[e] = fmaf(-slope, dist, x);
      }
    }
    if constexpr (Masked) {
      const int rows[2] = {row0, row0 + 8};
      mask_elements(s, rows, col0, mask);
    }
  }

  // Element mask: each row's visible key range, relative to col0, against the
  // element's compile-time column offset: two compares and a select per score
  // (the per-element test costs ~6 instructions). Softcap keeps the per-element
  // test: with the range form ptxas serialised the D64 causal softcap kernel's
  // wgmmas for lack of registers (C7511).
  template <int NS>
  __device__ __forceinline__ static void mask_elements(float (&s)[NS], const int (&row)[2], int col0,
                                                       const MaskPolicy<Band, BlockM, BlockN, Pack>& mask) {
    if constexpr (Softcap) {
#pragma unroll
      for (int e = 0; e < NS; ++e)
        if (!mask.visible(row[(e >> 1) & 1], col0 + 8 * (e >> 2) + (e & 1))) s[e] = -INFINITY;
    } else {
      int lo[2], hi[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mask.row_bounds(row[r], lo[r], hi[r]);
        lo[r] -= col0;
        hi[r] -= col0;
      }
#pragma unroll
      for (int e = 0; e < NS; ++e) {
        const int r = (e >> 1) & 1;
        const int c = 8 * (e >> 2) + (e & 1);
        if (c < lo[r] || c > hi[r]) s[e] = -INFINITY;
      }
    }
  }
  // GQA-packed tiles: a thread's two rows (e>>1 & 1) may be different queries
  // of different heads, so each has its own query index and ALiBi slope.
  template <bool Masked, int NS>
  __device__ __forceinline__ void apply_rows(float (&s)[NS], const int (&row)[2], const float (&slope_r)[2], int col0,
                                             const MaskPolicy<Band, BlockM, BlockN, Pack>& mask) const {
    if constexpr (Softcap) {
#pragma unroll
      for (int e = 0; e < NS; ++e) s[e] = cap * tanh_approx(s[e] * cap_arg);
    }
    if (has_alibi) {
#pragma unroll
      for (int e = 0; e < NS; ++e) {
        const int r = (e >> 1) & 1;
        const int col = col0 + 8 * (e >> 2) + (e & 1);
        const float dist = static_cast<float>(abs(row[r] + off - col));
        const float x = Softcap ? s[e] : s[e] * scale;
        s[e] = fmaf(-slope_r[r], dist, x);
      }
    }
    if constexpr (Masked) mask_elements(s, row, col0, mask);
  }
};

}  // namespace steelattn::sm90
