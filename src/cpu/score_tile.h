// Score tiles shared by the CPU forward and backward kernels: constants, element
// access for any dtype, the per-row table of a packed row block (the band-mask range
// of a row block is core/band.h's), and the score transform (softcap, ALiBi, bias, masks).
//
// Scores are held transposed, St[key][row], with rows on the SIMD lanes.
// Internal linkage: see flash_fwd_impl.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>

#include "core/band.h"  // band_range
#include "cpu/simd.h"
#include "steelattn/steelattn.h"

namespace steelattn::cpu {
namespace {

constexpr int64_t kBlockRows = 64;   // packed query rows per task (multiple of 2 * W)
constexpr int64_t kBlockKeys = 128;  // keys per K/V tile
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;
template <class T>
constexpr T neg_inf() { return -std::numeric_limits<T>::infinity(); }

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Reads element e of a `dtype` array.
template <class T = float>
inline T load_elem(const void* base, DType t, int64_t e) {
  switch (t) {
    case DType::f32: return T(static_cast<const float*>(base)[e]);
    case DType::f64: return T(static_cast<const double*>(base)[e]);
    case DType::f16: return T(f16_to_float(static_cast<const uint16_t*>(base)[e]));
    default: return T(bf16_to_float(static_cast<const uint16_t*>(base)[e]));
  }
}
template <class T>
inline void store_elem(void* base, DType t, int64_t e, T x) {
  switch (t) {
    case DType::f32: static_cast<float*>(base)[e] = float(x); break;
    case DType::f64: static_cast<double*>(base)[e] = double(x); break;
    case DType::f16: static_cast<uint16_t*>(base)[e] = float_to_f16(float(x)); break;
    default: static_cast<uint16_t*>(base)[e] = float_to_bf16(float(x)); break;
  }
}
// Element offset of [a, b, c, d] in a 4-d (or leading-dims) tensor.
inline int64_t offset4(const TensorRef& t, int64_t a, int64_t b, int64_t c, int64_t d = 0) {
  return a * t.stride[0] + b * t.stride[1] + c * t.stride[2] + (t.ndim > 3 ? d * t.stride[3] : 0);
}
inline const char* elem_ptr(const TensorRef& t, int64_t a, int64_t b, int64_t c) {
  return static_cast<const char*>(t.data) +
         (a * t.stride[0] + b * t.stride[1] + c * t.stride[2]) * dtype_size(t.dtype);
}

inline bool tile_fully_visible(const AttentionParams& p, int64_t i_lo, int64_t i_hi, int64_t k0,
                               int64_t k1) {
  return (p.window_left < 0 || k0 >= i_hi + p.diag_offset - p.window_left) &&
         (p.window_right < 0 || k1 - 1 <= i_lo + p.diag_offset + p.window_right);
}

// Per-lane table of a block of packed rows: row r is query i[r] of head h[r].
struct RowInfo {
  int64_t i[kBlockRows];
  int64_t h[kBlockRows];
  double alibi_log2[kBlockRows];  // slope * log2(e), 0 without ALiBi
};

// Packed rows [r_begin, r_begin + nrows) of kv head hk (G query heads per kv head).
// Padding lanes up to `lanes` repeat the last real row so masks stay sane there.
inline void fill_rows(const AttentionParams& p, int64_t b, int64_t hk, int64_t G, int64_t r_begin,
                      int64_t nrows, int64_t lanes, RowInfo* ri) {
  for (int64_t r = 0; r < lanes; ++r) {
    const int64_t pr = r_begin + std::min(r, nrows - 1);
    ri->i[r] = pr / G;
    ri->h[r] = hk * G + pr % G;
    ri->alibi_log2[r] = 0.0f;
    if (p.alibi_slopes.present()) {
      const TensorRef& t = p.alibi_slopes;
      ri->alibi_log2[r] = kLog2e * load_elem<double>(t.data, t.dtype, b * t.stride[0] + ri->h[r] * t.stride[1]);
    }
  }
}

// What p.block_mask says about the rows of the block against keys [k0, k1): no pair
// active (the tile is skipped: never loaded, never multiplied), all active (no element
// test needed), or mixed (each score tested). No block mask: all active.
enum class BlockActivity { none, mixed, all };
inline BlockActivity block_tile_activity(const AttentionParams& p, int64_t b, const RowInfo& ri, int64_t nrows,
                                         int64_t k0, int64_t k1) {
  if (!p.block_mask.present()) return BlockActivity::all;
  const TensorRef& t = p.block_mask;
  const uint8_t* m = static_cast<const uint8_t*>(t.data);
  const int64_t kb0 = k0 / p.block_k, kb1 = (k1 - 1) / p.block_k;
  bool any = false, all = true;
  for (int64_t r = 0; r < nrows; ++r) {
    const uint8_t* row = m + b * t.stride[0] + ri.h[r] * t.stride[1] + (ri.i[r] / p.block_q) * t.stride[2];
    for (int64_t kb = kb0; kb <= kb1; ++kb) {
      const bool on = row[kb * t.stride[3]] != 0;
      any |= on;
      all &= on;
    }
  }
  return !any ? BlockActivity::none : all ? BlockActivity::all : BlockActivity::mixed;
}

// Applies softcap, ALiBi, bias, boolean mask and the band to a score tile held
// transposed (St[j][r]), turning raw dots into log2-domain logits. With softcap,
// `dcap` (same layout, may be null) receives d(cap*tanh(t))/d(cap*t) = 1 - tanh^2.
// `blocks`: test each score against p.block_mask (a tile of mixed block activity).
template <bool kFull, class T>
void transform_tile(const AttentionParams& p, T cap_log2, const RowInfo& ri, int64_t b, int64_t k0, int64_t nk,
                    int64_t lanes, T* st, int64_t ld, T* dcap = nullptr, bool blocks = false) {
  const bool cap = p.softcap > 0.0f;
  const bool alibi = p.alibi_slopes.present();
  const bool bias = p.bias.present();
  const bool bmask = p.bool_mask.present();
  for (int64_t j = 0; j < nk; ++j) {
    const int64_t kj = k0 + j;
    T* row = st + j * ld;
    for (int64_t r = 0; r < lanes; ++r) {
      const int64_t i = ri.i[r];
      T x = row[r];
      if (cap) {
        const T th = std::tanh(x);
        x = cap_log2 * th;
        if (dcap) dcap[j * ld + r] = T(1) - th * th;
      }
      if (alibi) x -= T(ri.alibi_log2[r]) * T(std::llabs(i + p.diag_offset - kj));
      if (bias) {
        const TensorRef& t = p.bias;
        x += T(kLog2e) * load_elem<T>(t.data, t.dtype, offset4(t, b, ri.h[r], i, kj));
      }
      if (bmask) {
        const TensorRef& t = p.bool_mask;
        if (!static_cast<const uint8_t*>(t.data)[offset4(t, b, ri.h[r], i, kj)]) x = neg_inf<T>();
      }
      if (blocks) {
        const TensorRef& t = p.block_mask;
        if (!static_cast<const uint8_t*>(t.data)[offset4(t, b, ri.h[r], i / p.block_q, kj / p.block_k)])
          x = neg_inf<T>();
      }
      if (!kFull) {
        const int64_t a = i + p.diag_offset;
        if ((p.window_left >= 0 && kj < a - p.window_left) || (p.window_right >= 0 && kj > a + p.window_right))
          x = neg_inf<T>();
      }
      row[r] = x;
    }
  }
}


}  // namespace
}  // namespace steelattn::cpu
