// CPU flash-attention forward, written once over a SIMD struct (simd.h) and
// instantiated per instruction set in flash_<isa>.cpp.
//
// Work split: one task = (batch, kv head, block of kBlockRows packed rows).
// Rows pack the G = H / Hkv query heads that share a KV head (row r is query
// r / G of head hkv*G + r % G), so each K/V tile is read once for the whole
// group, and decode (N = 1) still fills the SIMD lanes.
//
// Per task, with rows on the SIMD lanes throughout:
//   Qt[d][r]  = q * scale * log2(e)             (packed once)
//   St[j][r]  = K_tile . Qt                     (gemm, A = K rows)
//   St        = modifiers + mask                (only tiles that need it)
//   m, l, alpha per row                         (vectorised along lanes)
//   Ot[e][r]  = alpha[r] * Ot + V_tile^T . P^T  (gemm, A = V read transposed)
// No horizontal reductions, and only Q is ever repacked. Tiles entirely outside
// the band mask are never visited; element masking runs only on edge tiles.
// Decode-shaped tasks (a quarter of the lanes or fewer: 1-4 packed rows on AVX-512, 1-2
// on AVX2, e.g. MHA decode) would waste most of each FMA that way; they compute each
// score as a dot product along D and each output row as vectors along Dv (row_scores,
// row_pv), with St, the masks and the softmax unchanged.
//
// Everything here has internal linkage (anonymous namespace): each ISA
// translation unit is compiled with its own -m flags, and shared inline
// functions compiled for AVX-512 must never be linked into the AVX2 path.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/score_tile.h"
#include "cpu/thread_pool.h"
#include "cpu/tiles.h"
#include "steelattn/detail/philox.h"

namespace steelattn::cpu {
namespace {

struct FwdShape {
  int64_t B, H, Hkv, N, S, D, Dv, G;
  int64_t rows;        // N * G packed rows per (b, kv head)
  int64_t row_blocks;  // tasks per (b, kv head)
  bool k_direct;       // K tiles read in place (fp32)
  bool v_direct;       // V tiles read in place (fp32)
  bool has_mods;       // softcap, ALiBi, bias or boolean mask present
  bool bf16_dot;       // Q.K^T of bf16 q/k in bf16 pairs (Isa::kBf16Dot, even D)
  bool bf16_pv;        // and P.V with P rounded to bf16 (bf16 v, even Dv), as GPU kernels do
  double q_scale;      // folded into Qt
  double cap_log2;     // softcap * log2(e), when softcap > 0
  uint32_t drop_threshold;
  double drop_scale;
};

// Per-thread scratch of n elements of T (thread_pool.h hands out floats).
template <class T>
T* scratch_of(int thread, int64_t n) {
  return reinterpret_cast<T*>(thread_scratch(thread, size_t(n) * sizeof(T) / sizeof(float)));
}

struct FwdCtx {
  const AttentionParams* p;
  FwdShape s;
  std::atomic<bool> failed{false};
};

// A K or V tile as rows of the compute type: in place when the dtype matches, else converted into `buf`.
template <class Isa>
const typename Isa::T* compute_tile(const TensorRef& t, const char* base, int64_t k0, int64_t nk, int64_t width,
                                    bool direct, typename Isa::T* buf, int64_t* stride) {
  using T = typename Isa::T;
  const int64_t ts = t.stride[2];
  if (direct) {
    *stride = ts;
    return reinterpret_cast<const T*>(base) + k0 * ts;
  }
  const uint16_t* src = reinterpret_cast<const uint16_t*>(base);
  for (int64_t j = 0; j < nk; ++j) {
    if (t.dtype == DType::bf16) Isa::load_bf16_row(src + (k0 + j) * ts, buf + j * width, width);
    else Isa::load_f16_row(src + (k0 + j) * ts, buf + j * width, width);
  }
  *stride = width;
  return buf;
}

// Packs rows of a [B, H, N, D]-like tensor transposed: dst[d][r] = x[b, h_r, i_r, d] * mul,
// zero in padding lanes.
template <class T>
void pack_transposed(const TensorRef& t, int64_t b, const RowInfo& ri, int64_t nrows, int64_t ld, int64_t width,
                     T mul, T* dst) {
  for (int64_t r = 0; r < ld; ++r) {
    if (r < nrows) {
      const char* row = elem_ptr(t, b, ri.h[r], ri.i[r]);
      for (int64_t d = 0; d < width; ++d) dst[d * ld + r] = load_elem<T>(row, t.dtype, d) * mul;
    } else {
      for (int64_t d = 0; d < width; ++d) dst[d * ld + r] = T(0);
    }
  }
}

// Packs rows of a [B, H, N, D]-like tensor row-major: dst[r][d] = x[b, h_r, i_r, d] * mul.
template <class T>
void pack_rows(const TensorRef& t, int64_t b, const RowInfo& ri, int64_t nrows, int64_t width, T mul, T* dst) {
  for (int64_t r = 0; r < nrows; ++r) {
    const char* row = elem_ptr(t, b, ri.h[r], ri.i[r]);
    for (int64_t d = 0; d < width; ++d) dst[r * width + d] = load_elem<T>(row, t.dtype, d) * mul;
  }
}

// Decode-shaped tasks (at most a quarter of the lanes in rows) read each K / V row once, in
// place: in the compute type (Kind 0), or bf16 (1) / fp16 (2) converted per vector. Converting
// a whole tile into a buffer first (compute_tile) left the loads alone in that loop, waiting
// on memory with no arithmetic beside them: bf16 decode ran at half of fp32's bytes per second.
template <class Isa, int Kind>
typename Isa::V load_kv(const char* row, int64_t d) {
  using T = typename Isa::T;
  if constexpr (Kind == 0) return Isa::load(reinterpret_cast<const T*>(row) + d);
  else if constexpr (Kind == 1) return Isa::load_bf16(reinterpret_cast<const uint16_t*>(row) + d);
  else return Isa::load_f16(reinterpret_cast<const uint16_t*>(row) + d);
}
template <class Isa, int Kind>
typename Isa::T load_kv1(const char* row, int64_t d) {
  using T = typename Isa::T;
  if constexpr (Kind == 0) return reinterpret_cast<const T*>(row)[d];
  else if constexpr (Kind == 1) return T(bf16_to_float(reinterpret_cast<const uint16_t*>(row)[d]));
  else return T(f16_to_float(reinterpret_cast<const uint16_t*>(row)[d]));
}
// Rows of a decode-shaped task: nrows * 4 <= W (fwd_task), so at most W / 4.
template <class Isa>
constexpr int kMaxRowwise = Isa::W / 4 > 0 ? Isa::W / 4 : 1;

// Decode-shaped scores: St[j][r] = q_r . k_j (q rows row-major [nrows][D], k rows `kr` bytes
// apart), one dot product along D each, each K vector loaded once for all rows; the lanes
// past nrows get 0 as the GEMM's zero Q gives.
template <class Isa, int Kind, class T = typename Isa::T>
void row_scores(int64_t nk, int64_t nrows, int64_t lanes, int64_t D, const char* kt, int64_t kr, const T* q, T* st,
                int64_t ld) {
  using V = typename Isa::V;
  constexpr int W = Isa::W, R = kMaxRowwise<Isa>;
  const int64_t dv = D / W * W;
  for (int64_t j = 0; j < nk; ++j) {
    const char* k = kt + j * kr;
    V acc[R];
    for (int r = 0; r < R; ++r) acc[r] = Isa::zero();
    for (int64_t d = 0; d < dv; d += W) {
      const V kv = load_kv<Isa, Kind>(k, d);
      for (int r = 0; r < R; ++r)
        if (r < nrows) acc[r] = Isa::fma(Isa::load(q + r * D + d), kv, acc[r]);
    }
    for (int64_t r = 0; r < nrows; ++r) {
      T x = Isa::hsum(acc[r]);
      for (int64_t d = dv; d < D; ++d) x += q[r * D + d] * load_kv1<Isa, Kind>(k, d);
      st[j * ld + r] = x;
    }
    for (int64_t r = nrows; r < lanes; ++r) st[j * ld + r] = T(0);
  }
}

// Decode-shaped output update: O[r] = alpha[r] * O[r] + sum_j P[j][r] * V[j] (O rows
// row-major [nrows][Dv], vectors along Dv, each V vector loaded once for all rows; v rows
// `vr` bytes apart).
template <class Isa, int Kind, class T = typename Isa::T>
void row_pv(int64_t nk, int64_t nrows, int64_t Dv, const char* vt, int64_t vr, const T* st, int64_t ld,
            const T* alpha, T* o) {
  using V = typename Isa::V;
  constexpr int W = Isa::W, R = kMaxRowwise<Isa>;
  const int64_t ev = Dv / W * W;
  for (int64_t r = 0; r < nrows; ++r) {
    T* orow = o + r * Dv;
    const V a = Isa::set1(alpha[r]);
    for (int64_t e = 0; e < ev; e += W) Isa::store(orow + e, Isa::mul(a, Isa::load(orow + e)));
    for (int64_t e = ev; e < Dv; ++e) orow[e] *= alpha[r];
  }
  for (int64_t j = 0; j < nk; ++j) {
    const char* v = vt + j * vr;
    V pv[R];
    for (int r = 0; r < R; ++r) pv[r] = Isa::set1(r < nrows ? st[j * ld + r] : T(0));
    for (int64_t e = 0; e < ev; e += W) {
      const V vv = load_kv<Isa, Kind>(v, e);
      for (int r = 0; r < R; ++r)
        if (r < nrows) Isa::store(o + r * Dv + e, Isa::fma(pv[r], vv, Isa::load(o + r * Dv + e)));
    }
    for (int64_t e = ev; e < Dv; ++e) {
      const T x = load_kv1<Isa, Kind>(v, e);
      for (int64_t r = 0; r < nrows; ++r) o[r * Dv + e] += st[j * ld + r] * x;
    }
  }
}

// Keys from k0 of a K or V tensor for row_scores / row_pv, and their kind: in place when
// the dtype is the compute type, else bf16 or fp16 (the other dtypes compute_tile takes).
template <class Fn>
void with_row_kind(const TensorRef& t, const char* base, int64_t k0, bool direct, Fn&& fn) {
  const int64_t rb = t.stride[2] * dtype_size(t.dtype);  // bytes between rows
  const char* rows = base + k0 * rb;
  if (direct) fn(std::integral_constant<int, 0>{}, rows, rb);
  else if (t.dtype == DType::bf16) fn(std::integral_constant<int, 1>{}, rows, rb);
  else fn(std::integral_constant<int, 2>{}, rows, rb);
}

// Packs bf16 q rows in pairs along d: dst[((d / 2) * ld + r) * 2 + d % 2] = q[b, h_r, i_r, d]
// (raw bf16 bits), zero in padding lanes; D is even.
inline void pack_bf16_pairs(const TensorRef& t, int64_t b, const RowInfo& ri, int64_t nrows, int64_t ld,
                            int64_t width, uint16_t* dst) {
  for (int64_t r = 0; r < ld; ++r) {
    const uint16_t* row = r < nrows ? reinterpret_cast<const uint16_t*>(elem_ptr(t, b, ri.h[r], ri.i[r])) : nullptr;
    for (int64_t d = 0; d < width; ++d) dst[((d / 2) * ld + r) * 2 + (d & 1)] = row ? row[d] : uint16_t(0);
  }
}

// One online-softmax step over a tile of nk keys (St in log2 units, rows on lanes):
// updates m, l, writes alpha (the rescale of the running output) and P into St.
template <class Isa, class T = typename Isa::T>
void online_softmax(T* st, int64_t ld, int64_t nk, int64_t lanes, T* m, T* l, T* alpha) {
  using V = typename Isa::V;
  constexpr int W = Isa::W;
  for (int64_t c = 0; c < lanes; c += W) {
    V mx = Isa::load(m + c);
    for (int64_t j = 0; j < nk; ++j) mx = Isa::max(mx, Isa::load(st + j * ld + c));
    alignas(64) T mxs[W], mus[W];
    Isa::store(mxs, mx);
    for (int x = 0; x < W; ++x) mus[x] = mxs[x] == neg_inf<T>() ? T(0) : mxs[x];  // all-masked rows stay NaN-free
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
}

// P <- P * keep / (1 - p) with the Philox keep-mask of (b, h_r, i_r, k0 + j).
template <class T>
void apply_dropout(const AttentionParams& p, const RowInfo& ri, int64_t b, int64_t k0, int64_t nk, int64_t nrows,
                   T* st, int64_t ld, uint32_t threshold, T scale) {
  for (int64_t j = 0; j < nk; ++j)
    for (int64_t r = 0; r < nrows; ++r) {
      const uint64_t idx = detail::dropout_index_in_frame(p, b, ri.h[r], ri.i[r], k0 + j);
      T& x = st[j * ld + r];
      x = detail::dropout_keep(idx, p.dropout_seed, p.dropout_offset, threshold) ? x * scale : T(0);
    }
}

template <class Isa>
void fwd_task(FwdCtx& ctx, int64_t task, int thread) {
  using T = typename Isa::T;
  constexpr int W = Isa::W;
  const AttentionParams& p = *ctx.p;
  const FwdShape& s = ctx.s;

  // Causal rows get heavier with the row block: hand out the heavy ones first.
  const int64_t rb_rev = task % s.row_blocks;
  const int64_t rb = p.window_right >= 0 ? s.row_blocks - 1 - rb_rev : rb_rev;
  const int64_t bh = task / s.row_blocks;
  const int64_t b = bh / s.Hkv, hk = bh % s.Hkv;
  const int64_t r_begin = rb * kBlockRows;
  const int64_t nrows = std::min(kBlockRows, s.rows - r_begin);
  const int64_t lanes = round_up(nrows, W);
  constexpr int64_t ld = kBlockRows;
  // Decode-shaped (see the top): rows as dot products and output rows, not on the lanes.
  // Q and O are then row-major in Qt's and Ot's space; bf16 pair products are not used.
  const bool rowwise = nrows * 4 <= W;
  const bool bf16_dot = s.bf16_dot && !rowwise;
  const bool bf16_pv = s.bf16_pv && !rowwise;
  const int64_t Dvp = round_up(s.Dv, int64_t(16));

  // Scratch (floats): Qt [D][ld] | St [Bk][ld] | Ot [Dv][ld] | m, l, alpha [ld] | K tile | V tile |
  //                  bf16 P.V: P and the V tile in key pairs, [Bk/2][ld][2], [Bk/2][Dvp][2] bf16.
  const int64_t n_qt = s.D * ld, n_st = kBlockKeys * ld, n_o = s.Dv * ld;
  const int64_t n_kb = s.k_direct ? 0 : kBlockKeys * s.D;
  const int64_t n_vb = s.v_direct || bf16_pv ? 0 : kBlockKeys * s.Dv;
  const int64_t n_pv = bf16_pv ? (kBlockKeys * ld + kBlockKeys * Dvp) / 2 : 0;
  T* qt = scratch_of<T>(thread, n_qt + n_st + n_o + 3 * ld + n_kb + n_vb + n_pv);
  if (!qt) {
    ctx.failed = true;
    return;
  }
  T* st = qt + n_qt;
  T* ot = st + n_st;
  T* m = ot + n_o;
  T* l = m + ld;
  T* alpha = l + ld;
  T* kb = alpha + ld;
  T* vb = kb + n_kb;
  uint16_t* p_pairs = reinterpret_cast<uint16_t*>(vb + n_vb);
  uint16_t* v_pairs = p_pairs + kBlockKeys * ld;

  RowInfo ri;
  fill_rows(p, b, hk, s.G, r_begin, nrows, lanes, &ri);
  const int64_t i_lo = ri.i[0], i_hi = ri.i[nrows - 1];
  // With bf16 pair dot products Q stays unscaled bf16, packed in pairs (in Qt's space).
  uint16_t* qpairs = reinterpret_cast<uint16_t*>(qt);
  if (rowwise) pack_rows(p.q, b, ri, nrows, s.D, T(s.q_scale), qt);
  else if (bf16_dot) pack_bf16_pairs(p.q, b, ri, nrows, ld, s.D, qpairs);
  else pack_transposed(p.q, b, ri, nrows, ld, s.D, T(s.q_scale), qt);
  std::fill(m, m + ld, neg_inf<T>());
  std::fill(l, l + ld, T(0));
  std::fill(ot, ot + n_o, T(0));

  int64_t lo, hi;
  band_range(p, i_lo, i_hi, s.S, &lo, &hi);
  const char* kbase = elem_ptr(p.k, b, hk, 0);
  const char* vbase = elem_ptr(p.v, b, hk, 0);

  // Scores of one tile in log2 units, masked and modified.
  auto scores = [&](int64_t k0, int64_t nk, bool block_test = false) {
    if constexpr (Isa::kBf16Dot) {
      if (bf16_dot) {
        const int64_t ks = p.k.stride[2];
        gemm_bf16<Isa>(nk, lanes, s.D, reinterpret_cast<const uint16_t*>(kbase) + k0 * ks, ks, qpairs, ld, st, ld);
        const typename Isa::V qs = Isa::set1(T(s.q_scale));
        for (int64_t j = 0; j < nk; ++j)
          for (int64_t c = 0; c < lanes; c += W) Isa::store(st + j * ld + c, Isa::mul(qs, Isa::load(st + j * ld + c)));
      }
    }
    if (rowwise) {
      with_row_kind(p.k, kbase, k0, s.k_direct, [&](auto kind, const char* rows, int64_t rb) {
        row_scores<Isa, decltype(kind)::value>(nk, nrows, lanes, s.D, rows, rb, qt, st, ld);
      });
    } else if (!bf16_dot) {
      int64_t ks;
      const T* kt = compute_tile<Isa>(p.k, kbase, k0, nk, s.D, s.k_direct, kb, &ks);
      gemm<Isa, false>(nk, lanes, s.D, kt, ks, 1, qt, ld, st, ld);
    }
    const bool full = tile_fully_visible(p, i_lo, i_hi, k0, k0 + nk);
    if (!full) transform_tile<false>(p, T(s.cap_log2), ri, b, k0, nk, lanes, st, ld, static_cast<T*>(nullptr), block_test);
    else if (s.has_mods || block_test)
      transform_tile<true>(p, T(s.cap_log2), ri, b, k0, nk, lanes, st, ld, static_cast<T*>(nullptr), block_test);
  };

  for (int64_t k0 = lo; k0 < hi; k0 += kBlockKeys) {
    const int64_t nk = std::min(kBlockKeys, hi - k0);
    const BlockActivity act = block_tile_activity(p, b, ri, nrows, k0, k0 + nk);
    if (act == BlockActivity::none) continue;
    scores(k0, nk, act == BlockActivity::mixed);
    online_softmax<Isa>(st, ld, nk, lanes, m, l, alpha);
    if (p.dropout_p > 0.0f) apply_dropout(p, ri, b, k0, nk, nrows, st, ld, s.drop_threshold, T(s.drop_scale));
    if constexpr (Isa::kBf16Dot) {
      if (bf16_pv) {  // O^T = O^T * alpha + V^T . P, pairs along the keys
        const int64_t vr = p.v.stride[2];
        round_row_pairs_bf16<Isa>(st, nk, ld, lanes, p_pairs);
        row_pairs_bf16<Isa>(reinterpret_cast<const uint16_t*>(vbase) + k0 * vr, vr, nk, s.Dv, Dvp, v_pairs);
        gemm_bf16<Isa, true>(s.Dv, lanes, (nk + 1) / 2 * 2, v_pairs, 2, p_pairs, ld, ot, ld, 2 * Dvp, alpha);
      }
    }
    if (rowwise) {
      with_row_kind(p.v, vbase, k0, s.v_direct, [&](auto kind, const char* rows, int64_t rb) {
        row_pv<Isa, decltype(kind)::value>(nk, nrows, s.Dv, rows, rb, st, ld, alpha, ot);
      });
    } else if (!bf16_pv) {
      int64_t vs;
      const T* vt = compute_tile<Isa>(p.v, vbase, k0, nk, s.Dv, s.v_direct, vb, &vs);
      gemm<Isa, true>(s.Dv, lanes, nk, vt, 1, vs, st, ld, ot, ld, alpha);
    }
  }

  // Epilogue: normalise, write O and LSE (natural log).
  for (int64_t r = 0; r < nrows; ++r) {
    const T inv = l[r] > T(0) ? T(1) / l[r] : T(0);
    char* orow = const_cast<char*>(elem_ptr(p.out, b, ri.h[r], ri.i[r]));
    for (int64_t e = 0; e < s.Dv; ++e)
      store_elem(orow, p.out.dtype, e, (rowwise ? ot[r * s.Dv + e] : ot[e * ld + r]) * inv);
    if (p.lse.present())
      store_elem(p.lse.data, p.lse.dtype, offset4(p.lse, b, ri.h[r], ri.i[r]),
                 l[r] > T(0) ? (m[r] + std::log2(l[r])) * T(kLn2) : neg_inf<T>());
  }

  // Optional probabilities: recompute each tile's scores against the final max and sum.
  if (p.attn_weights.present()) {
    const TensorRef& t = p.attn_weights;
    for (int64_t r = 0; r < nrows; ++r) {
      for (int64_t j = 0; j < lo; ++j) store_elem(t.data, t.dtype, offset4(t, b, ri.h[r], ri.i[r], j), T(0));
      for (int64_t j = hi; j < s.S; ++j) store_elem(t.data, t.dtype, offset4(t, b, ri.h[r], ri.i[r], j), T(0));
    }
    for (int64_t k0 = lo; k0 < hi; k0 += kBlockKeys) {
      const int64_t nk = std::min(kBlockKeys, hi - k0);
      scores(k0, nk);
      for (int64_t r = 0; r < nrows; ++r) {
        const T mu = m[r] == neg_inf<T>() ? T(0) : m[r];
        const T inv = l[r] > T(0) ? T(1) / l[r] : T(0);
        for (int64_t j = 0; j < nk; ++j)
          store_elem(t.data, t.dtype, offset4(t, b, ri.h[r], ri.i[r], k0 + j), std::exp2(st[j * ld + r] - mu) * inv);
      }
    }
  }
}

FwdShape fwd_shape_of(const AttentionParams& p, bool bf16_capable) {
  FwdShape s;
  s.B = p.B; s.H = p.H; s.Hkv = p.Hkv; s.N = p.N; s.S = p.S; s.D = p.D; s.Dv = p.Dv;
  s.G = p.H / p.Hkv;
  s.rows = s.N * s.G;
  s.row_blocks = (s.rows + kBlockRows - 1) / kBlockRows;
  s.has_mods = p.softcap > 0.0f || p.alibi_slopes.present() || p.bias.present() || p.bool_mask.present();
  s.bf16_dot = bf16_capable && p.q.dtype == DType::bf16 && p.k.dtype == DType::bf16 && p.D % 2 == 0;
  s.bf16_pv = s.bf16_dot && p.v.dtype == DType::bf16 && p.Dv % 2 == 0;
  s.q_scale = p.softcap > 0.0f ? p.scale / p.softcap : p.scale * kLog2e;
  s.cap_log2 = p.softcap * kLog2e;
  s.drop_threshold = detail::dropout_threshold24(p.dropout_p);
  s.drop_scale = p.dropout_p < 1.0f ? 1.0 / (1.0 - double(p.dropout_p)) : 0.0;
  return s;
}

// A list of problems (one per varlen sequence or cache entry, or the one dense call) as
// one pool of tasks: task t belongs to the problem whose first task is the last one <= t.
template <class Ctx>
class TaskPool {
 public:
  void add(std::unique_ptr<Ctx> c, int64_t tasks) {
    first_.push_back(total_);
    total_ += tasks;
    ctx_.push_back(std::move(c));
  }

  // Runs every task on `threads` threads; false when a task could not get its scratch.
  template <void (*Task)(Ctx&, int64_t, int)>
  bool run(int threads) {
    if (total_ > 0) parallel_for(total_, threads, &entry<Task>, this);
    for (const auto& c : ctx_)
      if (c->failed) return false;
    return true;
  }

 private:
  template <void (*Task)(Ctx&, int64_t, int)>
  static void entry(void* self, int64_t task, int thread) {
    const auto& pool = *static_cast<TaskPool*>(self);
    const auto& f = pool.first_;
    const size_t i = size_t(std::upper_bound(f.begin(), f.end(), task) - f.begin()) - 1;
    Task(*pool.ctx_[i], task - f[i], thread);
  }

  std::vector<std::unique_ptr<Ctx>> ctx_;
  std::vector<int64_t> first_;  // first task of each problem
  int64_t total_ = 0;
};

inline int pool_threads(const AttentionParams& p) { return p.num_threads > 0 ? p.num_threads : default_threads(); }

template <class Isa>
Status flash_forward_impl(const AttentionParams* problems, int64_t count) {
  if (count == 0) return Status::Ok();
  constexpr DType kCompute = sizeof(typename Isa::T) == 8 ? DType::f64 : DType::f32;
  TaskPool<FwdCtx> pool;
  for (int64_t i = 0; i < count; ++i) {
    const AttentionParams& p = problems[i];
    auto ctx = std::make_unique<FwdCtx>();
    ctx->p = &p;
    ctx->s = fwd_shape_of(p, Isa::kBf16Dot);
    ctx->s.k_direct = p.k.dtype == kCompute;
    ctx->s.v_direct = p.v.dtype == kCompute;
    const int64_t tasks = p.N == 0 ? 0 : ctx->s.B * ctx->s.Hkv * ctx->s.row_blocks;
    pool.add(std::move(ctx), tasks);
  }
  if (!pool.template run<&fwd_task<Isa>>(pool_threads(problems[0])))
    return Status::Error("cpu forward: could not allocate per-thread scratch");
  return Status::Ok();
}

}  // namespace
}  // namespace steelattn::cpu
