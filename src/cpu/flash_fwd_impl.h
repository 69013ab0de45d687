// CPU flash-attention forward, written once over a SIMD struct (simd.h) and
// instantiated per instruction set in flash_fwd_<isa>.cpp.
//
// Work split: one task = (batch, kv head, block of kBlockRows packed rows).
// Rows pack the G = H / Hkv query heads that share a KV head (row r is query
// r / G of head hkv*G + r % G), so each K/V tile is read once for the whole
// group, and decode (N = 1) still fills the SIMD lanes.
//
// Per task: Q is packed transposed and pre-scaled (Qt[d][r]); K/V tiles of
// kBlockKeys keys stream through. Scores are kept transposed (St[j][r]) so the
// online softmax runs along SIMD lanes with no horizontal reductions:
//   St  = K_tile . Qt          (micro-kernel: key rows x 2 lane vectors)
//   St  = modifiers + mask     (only where needed; log2 domain)
//   m, l, alpha per row        (vectorised over rows)
//   O   = alpha * O + P^T V    (micro-kernel: query rows x output vectors)
// Tiles entirely outside the band mask are never visited; element masking is
// applied only on tiles that straddle the band edge.
//
// Everything here has internal linkage (anonymous namespace): each ISA
// translation unit is compiled with its own -m flags, and shared inline
// functions compiled for AVX-512 must never be linked into the AVX2 path.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/simd.h"
#include "cpu/thread_pool.h"
#include "steelattn/detail/philox.h"
#include "steelattn/steelattn.h"

namespace steelattn::cpu {
namespace {

constexpr int64_t kBlockRows = 64;   // packed query rows per task (multiple of 2 * W)
constexpr int64_t kBlockKeys = 128;  // keys per K/V tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Reads element e of a row of `dtype` as float.
inline float load_elem(const void* base, DType t, int64_t e) {
  switch (t) {
    case DType::f32: return static_cast<const float*>(base)[e];
    case DType::f16: return f16_to_float(static_cast<const uint16_t*>(base)[e]);
    default: return bf16_to_float(static_cast<const uint16_t*>(base)[e]);
  }
}
inline void store_elem(void* base, DType t, int64_t e, float x) {
  switch (t) {
    case DType::f32: static_cast<float*>(base)[e] = x; break;
    case DType::f16: static_cast<uint16_t*>(base)[e] = float_to_f16(x); break;
    default: static_cast<uint16_t*>(base)[e] = float_to_bf16(x); break;
  }
}
inline const char* elem_ptr(const TensorRef& t, int64_t a, int64_t b, int64_t c) {
  return static_cast<const char*>(t.data) +
         (a * t.stride[0] + b * t.stride[1] + c * t.stride[2]) * dtype_size(t.dtype);
}

// ---------------------------------------------------------------------------
// Micro-kernels.

// St[j][c..c+NQV*W) = sum_d K[j][d] * Qt[d][c..], for MR key rows.
template <class Isa, int MR, int NQV>
inline void qk_tile(const float* k, int64_t k_stride, const float* qt, int64_t ld, int64_t D,
                    float* st, int64_t c) {
  using V = typename Isa::V;
  V acc[MR][NQV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NQV; ++v) acc[r][v] = Isa::zero();
  const float* q = qt + c;
  for (int64_t d = 0; d < D; ++d, q += ld) {
    V qv[NQV];
    for (int v = 0; v < NQV; ++v) qv[v] = Isa::load(q + v * Isa::W);
    for (int r = 0; r < MR; ++r) {
      const V kb = Isa::set1(k[r * k_stride + d]);
      for (int v = 0; v < NQV; ++v) acc[r][v] = Isa::fma(kb, qv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NQV; ++v) Isa::store(st + r * ld + c + v * Isa::W, acc[r][v]);
}

template <class Isa, int MR>
inline void qk_rows(const float* k, int64_t k_stride, const float* qt, int64_t ld, int64_t D,
                    float* st, int64_t lanes) {
  constexpr int W = Isa::W;
  int64_t c = 0;
  for (; c + 2 * W <= lanes; c += 2 * W) qk_tile<Isa, MR, 2>(k, k_stride, qt, ld, D, st, c);
  if (c < lanes) qk_tile<Isa, MR, 1>(k, k_stride, qt, ld, D, st, c);
}

// Dispatches the ragged last group of key rows to the right MR.
template <class Isa, int MR>
inline void qk_tail(int mr, const float* k, int64_t ks, const float* qt, int64_t ld, int64_t D,
                    float* st, int64_t lanes) {
  if constexpr (MR > 0) {
    if (mr == MR) return qk_rows<Isa, MR>(k, ks, qt, ld, D, st, lanes);
    qk_tail<Isa, MR - 1>(mr, k, ks, qt, ld, D, st, lanes);
  }
}

// St (nk x lanes) = K_tile (nk x D) . Qt (D x lanes).
template <class Isa>
void qk_block(const float* k, int64_t k_stride, int64_t nk, const float* qt, int64_t ld,
              int64_t D, float* st, int64_t lanes) {
  constexpr int MR = Isa::kQkRows;
  int64_t j = 0;
  for (; j + MR <= nk; j += MR) qk_rows<Isa, MR>(k + j * k_stride, k_stride, qt, ld, D, st + j * ld, lanes);
  if (j < nk) qk_tail<Isa, MR - 1>(int(nk - j), k + j * k_stride, k_stride, qt, ld, D, st + j * ld, lanes);
}

// O[r0+r][c..c+NV*W) = alpha[r0+r] * O + sum_j P[j][r0+r] * V[j][c..].
template <class Isa, int MRQ, int NV>
inline void pv_tile(const float* pt, int64_t ld, int64_t nk, int64_t r0, const float* v,
                    int64_t v_stride, float* o, int64_t o_ld, int64_t c, const float* alpha) {
  using V = typename Isa::V;
  V acc[MRQ][NV];
  for (int r = 0; r < MRQ; ++r) {
    const V a = Isa::set1(alpha[r0 + r]);
    for (int x = 0; x < NV; ++x) acc[r][x] = Isa::mul(a, Isa::load(o + (r0 + r) * o_ld + c + x * Isa::W));
  }
  for (int64_t j = 0; j < nk; ++j) {
    V p[MRQ];
    for (int r = 0; r < MRQ; ++r) p[r] = Isa::set1(pt[j * ld + r0 + r]);
    const float* vr = v + j * v_stride + c;
    for (int x = 0; x < NV; ++x) {
      const V vv = Isa::load(vr + x * Isa::W);
      for (int r = 0; r < MRQ; ++r) acc[r][x] = Isa::fma(p[r], vv, acc[r][x]);
    }
  }
  for (int r = 0; r < MRQ; ++r)
    for (int x = 0; x < NV; ++x) Isa::store(o + (r0 + r) * o_ld + c + x * Isa::W, acc[r][x]);
}

template <class Isa, int MRQ, int NV>
inline void pv_cols(int nv, const float* pt, int64_t ld, int64_t nk, int64_t r0, const float* v,
                    int64_t vs, float* o, int64_t o_ld, int64_t c, const float* alpha) {
  if constexpr (NV > 0) {
    if (nv == NV) return pv_tile<Isa, MRQ, NV>(pt, ld, nk, r0, v, vs, o, o_ld, c, alpha);
    pv_cols<Isa, MRQ, NV - 1>(nv, pt, ld, nk, r0, v, vs, o, o_ld, c, alpha);
  }
}

template <class Isa, int MRQ>
inline void pv_rows(int mrq, int nv, const float* pt, int64_t ld, int64_t nk, int64_t r0,
                    const float* v, int64_t vs, float* o, int64_t o_ld, int64_t c, const float* alpha) {
  if constexpr (MRQ > 0) {
    if (mrq == MRQ) return pv_cols<Isa, MRQ, Isa::kPvVecs>(nv, pt, ld, nk, r0, v, vs, o, o_ld, c, alpha);
    pv_rows<Isa, MRQ - 1>(mrq, nv, pt, ld, nk, r0, v, vs, o, o_ld, c, alpha);
  }
}

// O (rows x dvp) = alpha * O + P^T (rows x nk) . V (nk x dvp).
template <class Isa>
void pv_block(const float* pt, int64_t ld, int64_t nk, int64_t rows, const float* v,
              int64_t v_stride, float* o, int64_t dvp, const float* alpha) {
  constexpr int MRQ = Isa::kPvRows, NVM = Isa::kPvVecs, W = Isa::W;
  const int64_t nvec = dvp / W;
  for (int64_t cv = 0; cv < nvec; cv += NVM) {
    const int nv = int(std::min<int64_t>(NVM, nvec - cv));
    for (int64_t r0 = 0; r0 < rows; r0 += MRQ) {
      const int mrq = int(std::min<int64_t>(MRQ, rows - r0));
      pv_rows<Isa, MRQ>(mrq, nv, pt, ld, nk, r0, v, v_stride, o, dvp, cv * W, alpha);
    }
  }
}

// ---------------------------------------------------------------------------
// The kernel.

struct Shape {
  int64_t B, H, Hkv, N, S, D, Dv, G;
  int64_t rows;          // N * G packed rows per (b, kv head)
  int64_t row_blocks;    // tasks per (b, kv head)
  int64_t lanes_max;     // kBlockRows
  int64_t dvp;           // Dv rounded up to the SIMD width
  bool k_direct, v_direct;  // K / V tiles read in place (fp32, suitable width)
  bool has_mods;            // softcap, ALiBi, bias or boolean mask present
  float q_scale;            // folded into Qt
  float cap_log2;           // softcap * log2(e), when softcap > 0
  uint32_t drop_threshold;
  float drop_scale;
};

struct Ctx {
  const AttentionParams* p;
  Shape s;
  std::atomic<bool> failed{false};
};

// Where a band of rows [i_lo, i_hi] may see keys: [lo, hi).
inline void band_range(const AttentionParams& p, int64_t i_lo, int64_t i_hi, int64_t S, int64_t* lo,
                       int64_t* hi) {
  *lo = p.window_left < 0 ? 0 : std::max<int64_t>(0, i_lo + p.diag_offset - p.window_left);
  *hi = p.window_right < 0 ? S : std::min<int64_t>(S, i_hi + p.diag_offset + p.window_right + 1);
}

inline bool tile_fully_visible(const AttentionParams& p, int64_t i_lo, int64_t i_hi, int64_t k0,
                               int64_t k1) {
  return (p.window_left < 0 || k0 >= i_hi + p.diag_offset - p.window_left) &&
         (p.window_right < 0 || k1 - 1 <= i_lo + p.diag_offset + p.window_right);
}

struct RowInfo {
  int64_t i[kBlockRows];
  int64_t h[kBlockRows];
  float alibi_log2[kBlockRows];  // slope * log2(e), 0 without ALiBi
};

// Applies softcap, ALiBi, bias, boolean mask and the band to a score tile held
// transposed (St[j][r]), turning raw dots into log2-domain logits.
template <bool kFull>
void transform_tile(const AttentionParams& p, const Shape& s, const RowInfo& ri, int64_t b,
                    int64_t k0, int64_t nk, int64_t lanes, float* st, int64_t ld) {
  const bool cap = p.softcap > 0.0f;
  const bool alibi = p.alibi_slopes.present();
  const bool bias = p.bias.present();
  const bool bmask = p.bool_mask.present();
  for (int64_t j = 0; j < nk; ++j) {
    const int64_t kj = k0 + j;
    float* row = st + j * ld;
    for (int64_t r = 0; r < lanes; ++r) {
      const int64_t i = ri.i[r];
      float x = row[r];
      if (cap) x = s.cap_log2 * std::tanh(x);
      if (alibi) x -= ri.alibi_log2[r] * float(std::llabs(i + p.diag_offset - kj));
      if (bias) {
        const TensorRef& t = p.bias;
        x += kLog2e * static_cast<const float*>(t.data)[b * t.stride[0] + ri.h[r] * t.stride[1] +
                                                        i * t.stride[2] + kj * t.stride[3]];
      }
      if (bmask) {
        const TensorRef& t = p.bool_mask;
        if (!static_cast<const uint8_t*>(t.data)[b * t.stride[0] + ri.h[r] * t.stride[1] +
                                                 i * t.stride[2] + kj * t.stride[3]])
          x = kNegInf;
      }
      if (!kFull) {
        const int64_t a = i + p.diag_offset;
        if ((p.window_left >= 0 && kj < a - p.window_left) || (p.window_right >= 0 && kj > a + p.window_right))
          x = kNegInf;
      }
      row[r] = x;
    }
  }
}

template <class Isa>
void run_task(Ctx& ctx, int64_t task, int thread) {
  using V = typename Isa::V;
  constexpr int W = Isa::W;
  const AttentionParams& p = *ctx.p;
  const Shape& s = ctx.s;

  // Causal rows get heavier with the row block: hand out the heavy ones first.
  const int64_t rb_rev = task % s.row_blocks;
  const int64_t rb = p.window_right >= 0 ? s.row_blocks - 1 - rb_rev : rb_rev;
  const int64_t bh = task / s.row_blocks;
  const int64_t b = bh / s.Hkv, hk = bh % s.Hkv;
  const int64_t r_begin = rb * kBlockRows;
  const int64_t nrows = std::min(kBlockRows, s.rows - r_begin);
  const int64_t lanes = round_up(nrows, W);
  const int64_t ld = s.lanes_max;

  // Scratch layout (floats): Qt [D][ld] | St [Bk][ld] | O [ld][dvp] | m, l, alpha [ld] | Kt, Vt.
  const int64_t n_qt = s.D * ld, n_st = kBlockKeys * ld, n_o = ld * s.dvp;
  const int64_t n_kb = s.k_direct ? 0 : kBlockKeys * s.D;
  const int64_t n_vb = s.v_direct ? 0 : kBlockKeys * s.dvp;
  float* scratch = thread_scratch(thread, size_t(n_qt + n_st + n_o + 3 * ld + n_kb + n_vb + 64));
  if (!scratch) {
    ctx.failed = true;
    return;
  }
  float* qt = scratch;
  float* st = qt + n_qt;
  float* ob = st + n_st;
  float* m = ob + n_o;
  float* l = m + ld;
  float* alpha = l + ld;
  float* kb = alpha + ld;
  float* vb = kb + n_kb;

  // Row metadata; padding lanes repeat the last real row so masks stay sane.
  RowInfo ri;
  for (int64_t r = 0; r < lanes; ++r) {
    const int64_t pr = r_begin + std::min(r, nrows - 1);
    ri.i[r] = pr / s.G;
    ri.h[r] = hk * s.G + pr % s.G;
    ri.alibi_log2[r] = 0.0f;
    if (p.alibi_slopes.present()) {
      const TensorRef& t = p.alibi_slopes;
      ri.alibi_log2[r] = kLog2e * static_cast<const float*>(t.data)[b * t.stride[0] + ri.h[r] * t.stride[1]];
    }
  }
  const int64_t i_lo = ri.i[0], i_hi = ri.i[nrows - 1];

  // Qt[d][r] = q[b, h_r, i_r, d] * q_scale; zero in padding lanes.
  for (int64_t r = 0; r < ld; ++r) {
    if (r < nrows) {
      const char* qrow = elem_ptr(p.q, b, ri.h[r], ri.i[r]);
      for (int64_t d = 0; d < s.D; ++d) qt[d * ld + r] = load_elem(qrow, p.q.dtype, d) * s.q_scale;
    } else {
      for (int64_t d = 0; d < s.D; ++d) qt[d * ld + r] = 0.0f;
    }
  }
  for (int64_t r = 0; r < ld; ++r) {
    m[r] = kNegInf;
    l[r] = 0.0f;
  }
  std::fill(ob, ob + n_o, 0.0f);

  int64_t lo, hi;
  band_range(p, i_lo, i_hi, s.S, &lo, &hi);
  const char* kbase = elem_ptr(p.k, b, hk, 0);
  const char* vbase = elem_ptr(p.v, b, hk, 0);
  const int64_t ks = p.k.stride[2], vs = p.v.stride[2];

  auto load_k_tile = [&](int64_t k0, int64_t nk, int64_t* stride) -> const float* {
    if (s.k_direct) {
      *stride = ks;
      return reinterpret_cast<const float*>(kbase) + k0 * ks;
    }
    const uint16_t* src = reinterpret_cast<const uint16_t*>(kbase);
    for (int64_t j = 0; j < nk; ++j) {
      if (p.k.dtype == DType::bf16) Isa::load_bf16_row(src + (k0 + j) * ks, kb + j * s.D, s.D);
      else Isa::load_f16_row(src + (k0 + j) * ks, kb + j * s.D, s.D);
    }
    *stride = s.D;
    return kb;
  };
  auto load_v_tile = [&](int64_t k0, int64_t nk, int64_t* stride) -> const float* {
    if (s.v_direct) {
      *stride = vs;
      return reinterpret_cast<const float*>(vbase) + k0 * vs;
    }
    for (int64_t j = 0; j < nk; ++j) {
      float* dst = vb + j * s.dvp;
      const char* src = vbase + (k0 + j) * vs * dtype_size(p.v.dtype);
      if (p.v.dtype == DType::bf16) Isa::load_bf16_row(reinterpret_cast<const uint16_t*>(src), dst, s.Dv);
      else if (p.v.dtype == DType::f16) Isa::load_f16_row(reinterpret_cast<const uint16_t*>(src), dst, s.Dv);
      else std::copy(reinterpret_cast<const float*>(src), reinterpret_cast<const float*>(src) + s.Dv, dst);
      std::fill(dst + s.Dv, dst + s.dvp, 0.0f);
    }
    *stride = s.dvp;
    return vb;
  };
  // Scores of one tile in log2 units, masked and modified.
  auto scores = [&](int64_t k0, int64_t nk) {
    int64_t kstr;
    const float* kt = load_k_tile(k0, nk, &kstr);
    qk_block<Isa>(kt, kstr, nk, qt, ld, s.D, st, lanes);
    const bool full = tile_fully_visible(p, i_lo, i_hi, k0, k0 + nk);
    if (!full) transform_tile<false>(p, s, ri, b, k0, nk, lanes, st, ld);
    else if (s.has_mods) transform_tile<true>(p, s, ri, b, k0, nk, lanes, st, ld);
  };

  for (int64_t k0 = lo; k0 < hi; k0 += kBlockKeys) {
    const int64_t nk = std::min(kBlockKeys, hi - k0);
    scores(k0, nk);
    // Online softmax along lanes: new max, rescale factor, probabilities, row sums.
    for (int64_t c = 0; c < lanes; c += W) {
      V mx = Isa::load(m + c);
      for (int64_t j = 0; j < nk; ++j) mx = Isa::max(mx, Isa::load(st + j * ld + c));
      alignas(64) float mxs[W], mus[W];
      Isa::store(mxs, mx);
      for (int x = 0; x < W; ++x) mus[x] = mxs[x] == kNegInf ? 0.0f : mxs[x];  // all-masked rows stay NaN-free
      const V mu = Isa::load(mus);
      Isa::store(alpha + c, Isa::exp2(Isa::sub(Isa::load(m + c), mu)));
      V sum = Isa::zero();
      for (int64_t j = 0; j < nk; ++j) {
        const V e = Isa::exp2(Isa::sub(Isa::load(st + j * ld + c), mu));
        Isa::store(st + j * ld + c, e);
        sum = Isa::add(sum, e);
      }
      Isa::store(l + c, Isa::fma(Isa::load(l + c), Isa::load(alpha + c), sum));
      Isa::store(m + c, mx);
    }
    if (p.dropout_p > 0.0f) {
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t r = 0; r < nrows; ++r) {
          const uint64_t idx = detail::dropout_index(b, ri.h[r], ri.i[r], k0 + j, s.H, s.N, s.S);
          float& x = st[j * ld + r];
          x = detail::dropout_keep(idx, p.dropout_seed, p.dropout_offset, s.drop_threshold) ? x * s.drop_scale : 0.0f;
        }
    }
    int64_t vstr;
    const float* vt = load_v_tile(k0, nk, &vstr);
    pv_block<Isa>(st, ld, nk, nrows, vt, vstr, ob, s.dvp, alpha);
  }

  // Epilogue: normalise, write O and LSE (natural log).
  for (int64_t r = 0; r < nrows; ++r) {
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    char* orow = const_cast<char*>(elem_ptr(p.out, b, ri.h[r], ri.i[r]));
    for (int64_t d = 0; d < s.Dv; ++d) store_elem(orow, p.out.dtype, d, ob[r * s.dvp + d] * inv);
    if (p.lse.present()) {
      float* lse = static_cast<float*>(p.lse.data);
      lse[b * p.lse.stride[0] + ri.h[r] * p.lse.stride[1] + ri.i[r] * p.lse.stride[2]] =
          l[r] > 0.0f ? (m[r] + std::log2(l[r])) * kLn2 : kNegInf;
    }
  }

  // Optional probabilities: recompute each tile's scores against the final max and sum.
  if (p.attn_weights.present()) {
    const TensorRef& t = p.attn_weights;
    float* w = static_cast<float*>(t.data);
    auto wrow = [&](int64_t r) { return w + b * t.stride[0] + ri.h[r] * t.stride[1] + ri.i[r] * t.stride[2]; };
    for (int64_t r = 0; r < nrows; ++r) {
      float* row = wrow(r);
      for (int64_t j = 0; j < lo; ++j) row[j * t.stride[3]] = 0.0f;
      for (int64_t j = hi; j < s.S; ++j) row[j * t.stride[3]] = 0.0f;
    }
    for (int64_t k0 = lo; k0 < hi; k0 += kBlockKeys) {
      const int64_t nk = std::min(kBlockKeys, hi - k0);
      scores(k0, nk);
      for (int64_t r = 0; r < nrows; ++r) {
        float* row = wrow(r);
        const float mu = m[r] == kNegInf ? 0.0f : m[r];
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        for (int64_t j = 0; j < nk; ++j) row[(k0 + j) * t.stride[3]] = std::exp2(st[j * ld + r] - mu) * inv;
      }
    }
  }
}

template <class Isa>
void task_entry(void* ctx, int64_t task, int thread) {
  run_task<Isa>(*static_cast<Ctx*>(ctx), task, thread);
}

template <class Isa>
Status flash_forward_impl(const AttentionParams& p) {
  Shape s{};
  s.B = p.B; s.H = p.H; s.Hkv = p.Hkv; s.N = p.N; s.S = p.S; s.D = p.D; s.Dv = p.Dv;
  s.G = p.H / p.Hkv;
  s.rows = s.N * s.G;
  s.row_blocks = (s.rows + kBlockRows - 1) / kBlockRows;
  s.lanes_max = kBlockRows;
  s.dvp = round_up(s.Dv, Isa::W);
  s.k_direct = p.k.dtype == DType::f32;
  s.v_direct = p.v.dtype == DType::f32 && s.Dv % Isa::W == 0;
  s.has_mods = p.softcap > 0.0f || p.alibi_slopes.present() || p.bias.present() || p.bool_mask.present();
  s.q_scale = p.softcap > 0.0f ? p.scale / p.softcap : p.scale * kLog2e;
  s.cap_log2 = p.softcap * kLog2e;
  s.drop_threshold = detail::dropout_threshold24(p.dropout_p);
  s.drop_scale = p.dropout_p < 1.0f ? 1.0f / (1.0f - p.dropout_p) : 0.0f;

  Ctx ctx;
  ctx.p = &p;
  ctx.s = s;
  const int64_t tasks = s.B * s.Hkv * s.row_blocks;
  const int threads = p.num_threads > 0 ? p.num_threads : default_threads();
  parallel_for(tasks, threads, &task_entry<Isa>, &ctx);
  if (ctx.failed) return Status::Error("cpu forward: could not allocate per-thread scratch");
  return Status::Ok();
}

}  // namespace
}  // namespace steelattn::cpu
