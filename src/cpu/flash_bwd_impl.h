// CPU flash-attention backward: recomputes P from the saved LSE, blocked and
// threaded, with tiles outside the band mask skipped.
//
// One task = (batch, kv head). Packed row blocks run in the outer loop (rows
// pack the G query heads of the kv head, as in the forward, so dK/dV sum over
// the group for free; each block's Q, dO, LSE and D = rowsum(dO * O) are packed
// once), the key tiles they can see in the inner loop. Per (row block, key
// tile), with rows on the SIMD lanes:
//   St  = K . Qt                 -> P^T = exp2(St - lse2)        (scores)
//   dPt = V . dOt                                                 (dP^T)
//   dV += Pd^T . dO              (Pd = P with the dropout mask applied)
//   dSt = P^T * (dPd^T - Drow)   (Drow = rowsum(dO * O) - dlse; * (1 - tanh^2) under softcap)
//   dK += dSt . Q
//   dQt += K^T . dSt             (dQ of the row block, written after its key loop)
// and dQ, dK are scaled by `scale` when written. dK/dV accumulate for all keys
// of the task in scratch, so no atomics are needed.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "cpu/flash_fwd_impl.h"

namespace steelattn::cpu {
namespace {

constexpr int64_t kBwdKeys = 64;  // keys per tile: the four score-sized tiles stay in L1/L2

struct BwdCtx {
  const AttentionParams* p;
  int64_t G, rows;
  bool k_direct, v_direct;
  // bf16 inputs (Isa::kBf16Dot, even D and Dv): S = K.Q^T and dP = V.dO^T in bf16 pairs (exact
  // products), and dV = P^T.dO, dK = dS^T.Q, dQ = dS.K with P and dS rounded to bf16, as GPU
  // kernels do (fp32 sums throughout).
  bool bf16_dot;
  double q_scale, cap_log2, drop_scale;
  uint32_t drop_threshold;
  std::atomic<bool> failed{false};
};

// Row-major pack: dst[r][d] = x[b, h_r, i_r, d], rows padded with zeros to `ld` lanes,
// columns padded with zeros to `width_p` (16-bit rows converted with the ISA's loads).
template <class Isa, class T = typename Isa::T>
void pack_rows(const TensorRef& t, int64_t b, const RowInfo& ri, int64_t nrows, int64_t lanes, int64_t width,
               int64_t width_p, T* dst) {
  for (int64_t r = 0; r < lanes; ++r) {
    T* out = dst + r * width_p;
    if (r < nrows) {
      const char* row = elem_ptr(t, b, ri.h[r], ri.i[r]);
      if (t.dtype == DType::bf16) Isa::load_bf16_row(reinterpret_cast<const uint16_t*>(row), out, width);
      else if (t.dtype == DType::f16) Isa::load_f16_row(reinterpret_cast<const uint16_t*>(row), out, width);
      else for (int64_t d = 0; d < width; ++d) out[d] = load_elem<T>(row, t.dtype, d);
      std::fill(out + width, out + width_p, T(0));
    } else {
      std::fill(out, out + width_p, T(0));
    }
  }
}

// Packs the rows of t that RowInfo names in pairs of rows (pair_rows_bf16): dst[((r / 2) *
// width_p + e) * 2 + r % 2] = t[b, h_r, i_r, e] (raw bf16 bits) for r < round_up(nrows, 2),
// zero past nrows and past width (a B operand of gemm_bf16 whose pairs run along the rows).
template <class Isa>
void pack_bf16_row_pairs(const TensorRef& t, int64_t b, const RowInfo& ri, int64_t nrows, int64_t width,
                         int64_t width_p, uint16_t* dst) {
  auto row = [&](int64_t r) { return reinterpret_cast<const uint16_t*>(elem_ptr(t, b, ri.h[r], ri.i[r])); };
  for (int64_t r = 0; r < nrows; r += 2)
    pair_rows_bf16<Isa>(row(r), r + 1 < nrows ? row(r + 1) : nullptr, width, width_p, dst + (r / 2) * width_p * 2);
}

template <class Isa>
void bwd_task(BwdCtx& ctx, int64_t task, int thread) {
  using T = typename Isa::T;
  using V = typename Isa::V;
  constexpr int W = Isa::W;
  constexpr int64_t ld = kBlockRows, bk = kBwdKeys;
  const AttentionParams& p = *ctx.p;
  const int64_t b = task / p.Hkv, hk = task % p.Hkv;
  const int64_t D = p.D, Dv = p.Dv, Dp = round_up(D, W), Dvp = round_up(Dv, W), G = ctx.G;
  const int64_t Sp = round_up(p.S, bk);
  const bool cap = p.softcap > 0.0;
  const bool dropout = p.dropout_p > 0.0f;
  const bool mods = cap || p.alibi_slopes.present() || p.bias.present() || p.bool_mask.present();

  // Scratch: dK [Sp][Dp] | dV [Sp][Dvp] | dQt [D][ld] | Qt [D][ld] | Qp [ld][Dp] | dOt [Dv][ld] |
  //          dOp [ld][Dvp] | lse2, Drow [ld] | St, dPt, Pd, dcap [bk][ld] | K, V tiles | Op [ld][Dvp] |
  //          bf16 pair path: P^T, dS^T rounded [bk][ld] | Q, dO, K in row pairs [ld/2][Dp], [ld/2][Dvp],
  //          [bk/2][Dp] (x 2).
  const int64_t n_dk = Sp * Dp, n_dv = Sp * Dvp, n_qt = D * ld, n_qp = ld * Dp, n_dot = Dv * ld, n_dop = ld * Dvp;
  const int64_t n_tile = bk * ld;
  const int64_t n_kb = ctx.k_direct ? 0 : bk * D, n_vb = ctx.v_direct ? 0 : bk * Dv;
  const int64_t n_b16 = ctx.bf16_dot ? (n_tile + n_qp + n_dop + bk * Dp + 1) / 2 : 0;  // floats (two bf16 each)
  T* dk_acc = scratch_of<T>(thread, n_dk + n_dv + 2 * n_qt + n_qp + n_dot + 2 * n_dop + 2 * ld + 4 * n_tile + n_kb +
                                        n_vb + n_b16);
  if (!dk_acc) {
    ctx.failed = true;
    return;
  }
  T* dv_acc = dk_acc + n_dk;
  T* dqt = dv_acc + n_dv;
  T* qt = dqt + n_qt;
  T* qp = qt + n_qt;
  T* dot = qp + n_qp;
  T* dop = dot + n_dot;
  T* lse2 = dop + n_dop;
  T* drow = lse2 + ld;
  T* st = drow + ld;
  T* dpt = st + n_tile;
  T* pd = dropout ? dpt + n_tile : st;
  T* dcap = dpt + 2 * n_tile;
  T* kb = dpt + 3 * n_tile;
  T* vb = kb + n_kb;
  T* op = vb + n_vb;
  uint16_t* p16 = reinterpret_cast<uint16_t*>(op + n_dop);  // P^T, then dS^T, rounded to bf16
  uint16_t* q_pairs = p16 + n_tile;
  uint16_t* do_pairs = q_pairs + n_qp;
  uint16_t* k_pairs = do_pairs + n_dop;
  std::fill(dk_acc, dk_acc + n_dk + n_dv, T(0));

  const char* kbase = elem_ptr(p.k, b, hk, 0);
  const char* vbase = elem_ptr(p.v, b, hk, 0);
  const T scale = T(p.scale);
  RowInfo ri;

  for (int64_t r_begin = 0; r_begin < ctx.rows; r_begin += ld) {
    const int64_t nrows = std::min(ld, ctx.rows - r_begin);
    const int64_t lanes = round_up(nrows, W);
    fill_rows(p, b, hk, G, r_begin, nrows, lanes, &ri);
    const int64_t i_lo = ri.i[0], i_hi = ri.i[nrows - 1];
    int64_t lo, hi;
    band_range(p, i_lo, i_hi, p.S, &lo, &hi);
    // Rows of this block that see no key keep dQ = 0.
    // With bf16 pair dot products, Q and dO stay exact bf16, packed in pairs in Qt's / dOt's space.
    if (ctx.bf16_dot) pack_bf16_pairs(p.q, b, ri, nrows, ld, D, reinterpret_cast<uint16_t*>(qt));
    else pack_transposed(p.q, b, ri, nrows, ld, D, T(ctx.q_scale), qt);
    if (!ctx.bf16_dot) pack_rows<Isa>(p.q, b, ri, nrows, lanes, D, Dp, qp);  // dK's B operand (fp32 products)
    if (ctx.bf16_dot) pack_bf16_pairs(p.dout, b, ri, nrows, ld, Dv, reinterpret_cast<uint16_t*>(dot));
    else pack_transposed(p.dout, b, ri, nrows, ld, Dv, T(1), dot);
    pack_rows<Isa>(p.dout, b, ri, nrows, lanes, Dv, Dvp, dop);
    pack_rows<Isa>(p.out, b, ri, nrows, lanes, Dv, Dvp, op);
    if constexpr (Isa::kBf16Dot) {
      if (ctx.bf16_dot) {  // dV = P^T dO and dK = dS^T Q as bf16 pair products along the rows
        pack_bf16_row_pairs<Isa>(p.q, b, ri, nrows, D, Dp, q_pairs);
        pack_bf16_row_pairs<Isa>(p.dout, b, ri, nrows, Dv, Dvp, do_pairs);
      }
    }
    for (int64_t r = 0; r < lanes; ++r) {
      const T l = r < nrows ? load_elem<T>(p.lse.data, p.lse.dtype, offset4(p.lse, b, ri.h[r], ri.i[r])) : T(0);
      // A row that saw no key (lse = -inf) has P = 0 everywhere: +inf makes exp2 give 0.
      lse2[r] = l == neg_inf<T>() ? -neg_inf<T>() : l * T(kLog2e);
      T acc = 0;
      if (r < nrows) {
        // rowsum(dO * O) as dP's fp32 product sums: one Isa multiply-add per e, in order. A
        // row whose only visible key gives O = V then gets dP - D = 0 exactly, so dS = 0 as in
        // exact arithmetic, not a rounding residue (vector partial sums, or unfused adds, left
        // one: the fuzz's one-key fp32 cases caught it in dK).
        const T* dor = dop + r * Dvp;
        const T* orw = op + r * Dvp;
        for (int64_t e = 0; e < Dv; ++e) acc = Isa::fma1(dor[e], orw[e], acc);
        // dL/ds += dlse * P folds into the same term: dS = P * (dP - (D - dlse)).
        if (p.dlse.present()) acc -= load_elem<T>(p.dlse.data, p.dlse.dtype, offset4(p.dlse, b, ri.h[r], ri.i[r]));
      }
      drow[r] = acc;
    }
    std::fill(dqt, dqt + n_qt, T(0));

    for (int64_t k0 = lo; k0 < hi; k0 += bk) {
      const int64_t nk = std::min(bk, hi - k0);
      const BlockActivity act = block_tile_activity(p, b, ri, nrows, k0, k0 + nk);
      if (act == BlockActivity::none) continue;  // P = 0 on the whole tile
      const bool block_test = act == BlockActivity::mixed;
      int64_t ks = 0, vs = 0;
      // K feeds S and dQ; the bf16 pair path reads it in place.
      const T* kt = ctx.bf16_dot ? nullptr : compute_tile<Isa>(p.k, kbase, k0, nk, D, ctx.k_direct, kb, &ks);
      // V only feeds dP; the bf16 pair path reads it in place.
      const T* vt = ctx.bf16_dot ? nullptr : compute_tile<Isa>(p.v, vbase, k0, nk, Dv, ctx.v_direct, vb, &vs);

      // P^T from the recomputed scores.
      if constexpr (Isa::kBf16Dot) {
        if (ctx.bf16_dot) {
          const int64_t kr = p.k.stride[2];
          gemm_bf16<Isa>(nk, lanes, D, reinterpret_cast<const uint16_t*>(kbase) + k0 * kr, kr,
                         reinterpret_cast<const uint16_t*>(qt), ld, st, ld);
          const V qs = Isa::set1(T(ctx.q_scale));
          for (int64_t j = 0; j < nk; ++j)
            for (int64_t c = 0; c < lanes; c += W) Isa::store(st + j * ld + c, Isa::mul(qs, Isa::load(st + j * ld + c)));
        }
      }
      if (!ctx.bf16_dot) gemm<Isa, false>(nk, lanes, D, kt, ks, 1, qt, ld, st, ld);
      const bool full = tile_fully_visible(p, i_lo, i_hi, k0, k0 + nk);
      if (!full)
        transform_tile<false>(p, T(ctx.cap_log2), ri, b, k0, nk, lanes, st, ld, cap ? dcap : nullptr, block_test);
      else if (mods || block_test)
        transform_tile<true>(p, T(ctx.cap_log2), ri, b, k0, nk, lanes, st, ld, cap ? dcap : nullptr, block_test);
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t c = 0; c < lanes; c += W)
          Isa::store(st + j * ld + c, Isa::exp2(Isa::sub(Isa::load(st + j * ld + c), Isa::load(lse2 + c))));

      // dP^T = V . dO^T, then the dropout mask on both P (for dV) and dP.
      if constexpr (Isa::kBf16Dot) {
        if (ctx.bf16_dot) {
          const int64_t vr = p.v.stride[2];
          gemm_bf16<Isa>(nk, lanes, Dv, reinterpret_cast<const uint16_t*>(vbase) + k0 * vr, vr,
                         reinterpret_cast<const uint16_t*>(dot), ld, dpt, ld);
        }
      }
      if (!ctx.bf16_dot) gemm<Isa, false>(nk, lanes, Dv, vt, vs, 1, dot, ld, dpt, ld);
      if (dropout) {
        for (int64_t j = 0; j < nk; ++j)
          for (int64_t r = 0; r < lanes; ++r) {
            const bool keep =
                r < nrows && detail::dropout_keep(detail::dropout_index_in_frame(p, b, ri.h[r], ri.i[r], k0 + j),
                                                  p.dropout_seed, p.dropout_offset, ctx.drop_threshold);
            const T z = keep ? T(ctx.drop_scale) : T(0);
            pd[j * ld + r] = st[j * ld + r] * z;
            dpt[j * ld + r] *= z;
          }
      }
      const int64_t rows2 = (nrows + 1) / 2 * 2;  // the bf16 products' reduction length (a zero row pads it)
      if constexpr (Isa::kBf16Dot) {
        if (ctx.bf16_dot) {
          round_rows_bf16<Isa>(pd, nk, nrows, ld, p16);
          gemm_bf16<Isa, true>(nk, Dvp, rows2, p16, ld, do_pairs, Dvp, dv_acc + k0 * Dvp, Dvp);
        }
      }
      if (!ctx.bf16_dot) gemm<Isa, true>(nk, Dvp, nrows, pd, ld, 1, dop, Dvp, dv_acc + k0 * Dvp, Dvp);

      // dS^T = P^T * (dP^T - Drow), the gradient w.r.t. the final score.
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t c = 0; c < lanes; c += W) {
          const V ds = Isa::mul(Isa::load(st + j * ld + c), Isa::sub(Isa::load(dpt + j * ld + c), Isa::load(drow + c)));
          Isa::store(dpt + j * ld + c, ds);
        }
      if (p.dbias.present()) {
        const TensorRef& t = p.dbias;
        for (int64_t j = 0; j < nk; ++j)
          for (int64_t r = 0; r < nrows; ++r)
            store_elem(t.data, t.dtype, offset4(t, b, ri.h[r], ri.i[r], k0 + j), dpt[j * ld + r]);
      }
      if (cap)  // through cap * tanh(t): the remaining factor of d(score)/d(q.k) besides `scale`
        for (int64_t j = 0; j < nk; ++j)
          for (int64_t c = 0; c < lanes; c += W)
            Isa::store(dpt + j * ld + c, Isa::mul(Isa::load(dpt + j * ld + c), Isa::load(dcap + j * ld + c)));

      if constexpr (Isa::kBf16Dot) {
        if (ctx.bf16_dot) {
          round_rows_bf16<Isa>(dpt, nk, nrows, ld, p16);
          gemm_bf16<Isa, true>(nk, Dp, rows2, p16, ld, q_pairs, Dp, dk_acc + k0 * Dp, Dp);
        }
      }
      if (!ctx.bf16_dot) gemm<Isa, true>(nk, Dp, nrows, dpt, ld, 1, qp, Dp, dk_acc + k0 * Dp, Dp);
      if constexpr (Isa::kBf16Dot) {
        if (ctx.bf16_dot) {  // dQ^T += K^T . dS^T, pairs along the keys
          const int64_t nk2 = (nk + 1) / 2 * 2;
          round_row_pairs_bf16<Isa>(dpt, nk, ld, lanes, p16);
          row_pairs_bf16<Isa>(reinterpret_cast<const uint16_t*>(kbase) + k0 * p.k.stride[2], p.k.stride[2], nk, D, Dp,
                              k_pairs);
          gemm_bf16<Isa, true>(D, lanes, nk2, k_pairs, 2, p16, ld, dqt, ld, 2 * Dp);
        }
      }
      if (!ctx.bf16_dot) gemm<Isa, true>(D, lanes, nk, kt, 1, ks, dpt, ld, dqt, ld);
    }

    // dQ of this row block is complete.
    for (int64_t r = 0; r < nrows; ++r) {
      char* dqrow = const_cast<char*>(elem_ptr(p.dq, b, ri.h[r], ri.i[r]));
      for (int64_t d = 0; d < D; ++d) store_elem(dqrow, p.dq.dtype, d, dqt[d * ld + r] * scale);
    }
  }

  // dK, dV summed over every row of the group (keys no row sees stay 0).
  for (int64_t j = 0; j < p.S; ++j) {
    char* dkrow = const_cast<char*>(elem_ptr(p.dk, b, hk, j));
    char* dvrow = const_cast<char*>(elem_ptr(p.dv, b, hk, j));
    for (int64_t d = 0; d < D; ++d) store_elem(dkrow, p.dk.dtype, d, dk_acc[j * Dp + d] * scale);
    for (int64_t e = 0; e < Dv; ++e) store_elem(dvrow, p.dv.dtype, e, dv_acc[j * Dvp + e]);
  }
}

template <class Isa>
Status flash_backward_impl(const AttentionParams* problems, int64_t count) {
  if (count == 0) return Status::Ok();
  constexpr DType kCompute = sizeof(typename Isa::T) == 8 ? DType::f64 : DType::f32;
  TaskPool<BwdCtx> pool;
  for (int64_t i = 0; i < count; ++i) {
    const AttentionParams& p = problems[i];
    auto ctx = std::make_unique<BwdCtx>();
    ctx->p = &p;
    ctx->G = p.H / p.Hkv;
    ctx->rows = p.N * ctx->G;
    ctx->k_direct = p.k.dtype == kCompute;
    ctx->v_direct = p.v.dtype == kCompute;
    ctx->bf16_dot = Isa::kBf16Dot && p.q.dtype == DType::bf16 && p.D % 2 == 0 && p.Dv % 2 == 0;
    ctx->q_scale = p.softcap > 0.0 ? p.scale / p.softcap : p.scale * kLog2e;
    ctx->cap_log2 = p.softcap * kLog2e;
    ctx->drop_threshold = detail::dropout_threshold24(p.dropout_p);
    ctx->drop_scale = p.dropout_p < 1.0f ? 1.0 / (1.0 - double(p.dropout_p)) : 0.0;
    pool.add(std::move(ctx), p.B * p.Hkv);  // every task writes its dK/dV (zeros for keys no query sees) and dQ
  }
  if (!pool.template run<&bwd_task<Isa>>(pool_threads(problems[0])))
    return Status::Error("cpu backward: could not allocate per-thread scratch");
  return Status::Ok();
}

}  // namespace
}  // namespace steelattn::cpu
