// Tensor-core backward kernels (fp16 / bf16, sm_80+): mma.sync m16n8k16 with
// fp32 accumulation, P recomputed from the forward's LSE.
//
// Design: two kernels, no workspace and no atomics (the core allocates nothing).
//  * Kernel A (bwd_dkdv_mma_kernel): one CTA per (b, kv head, 64-key tile,
//    column chunk). K and V of the tile stay in shared memory; the CTA walks
//    every (query head of the GQA group, 64-row query tile) that can see the
//    tile (band range read from the key side), double-buffering Q, dO and the
//    rows' lse / D_i, and accumulates dK and dV in registers:
//        S^T = K Q^T, dP^T = V dO^T           (warp w owns keys 16w..16w+15)
//        P^T = exp(S^T - lse), Z = dropout keep / (1-p)
//        dV += (P Z)^T dO,  dS^T = P^T (dP^T Z - D) (1 - tanh^2 under softcap)
//        dK += dS^T Q  (times scale on the way out)
//    Since one CTA owns a key tile across all G heads' rows, dK/dV of the GQA
//    group are summed without atomics.
//  * Kernel B (bwd_dq_mma_kernel): one CTA per (b, h, 64-row query tile,
//    column chunk), Q and dO resident, K/V tiles of the band streamed
//    (double-buffered); recomputes S and dP, writes dbias = dS (before the
//    softcap factor) and accumulates dQ = scale * dS K in registers.
// Every output element is written by exactly one thread after a fixed-order
// loop, so results are bit-identical from run to run (deterministic).
// D_i = rowsum(dO * O) - dlse: kernel A reads it from a stash in dq written by a
// small prep kernel (dq is overwritten by kernel B, which runs after A and
// computes its own D_i from O and dO: with several dQ chunks, a stash read in
// B would race with another chunk's writes).
// Column chunks (kC = 64 or 128 accumulator columns per CTA) bound the
// registers: D or Dv above kC is split over CTAs that recompute S and dP.
// Element-wise work has a CTA-uniform fast path (no modifier, no dropout, no
// dbias: a few instructions per element) and a band-tested variant; the general
// path (softcap, ALiBi, bias, bool mask, dropout, dbias) is the slow one.
// Measured (H100, bf16, B=1 H=16 N=4096 D=128): 78 TFLOP/s full, 64 causal
// (FA2 286 / 216). Next steps: 8 warps / 128-key tiles in kernel A, fewer
// registers (kernel A, kC = 128 spills ~80 B), the sm90 wgmma kernel.
#pragma once

#include <cmath>
#include <cstdint>

#include "backward_common.cuh"
#include "forward_mma.cuh"  // warp_qk: S = A . B^T of one warp over 64 B rows
#include "tile_io.cuh"
#include "varlen.cuh"

namespace steelattn::cuda_generic {

namespace bwd_mma_cfg {
constexpr int kBlockM = 64;  // query rows per tile
constexpr int kBlockN = 64;  // keys per tile
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kPad = 8;
static_assert(kBlockM == mma_cfg::kBlockN && kBlockN == mma_cfg::kBlockM,
              "warp_qk computes 16 x 64 per warp");
}  // namespace bwd_mma_cfg

// Shared memory: two resident tiles (K,V or Q,dO) + `stages` streamed pairs + row stats.
inline size_t bwd_mma_smem_bytes(int D, int Dv, int stages) {
  using namespace bwd_mma_cfg;
  const size_t ldq = size_t((D + 15) / 16) * 16 + kPad, ldv = size_t((Dv + 15) / 16) * 16 + kPad;
  const size_t pair = size_t(64) * (ldq + ldv) * 2;
  return (1 + stages) * pair + size_t(stages) * 2 * 64 * sizeof(float);
}

// acc[nt] (m16 x n8 tiles over `ncols` columns) += A . B where A is the 16 x 64
// fragment held in registers as m16n8 accumulators a_acc[8][4] (k = 64 rows of
// sB) and B = sB[k][col0 + n] read with ldmatrix.trans. Columns >= col_end and
// k-steps >= k_valid are skipped (warp-uniform).
template <typename T, int kNtC>
__device__ __forceinline__ void warp_acc_AtB(float (&acc)[kNtC][4], const float (&a_acc)[8][4],
                                             const T* sB, int ldb, int col0, int col_end,
                                             int k_valid, int lane) {
  const T* b_ptr = sB + ((lane & 7) + ((lane >> 3) & 1) * 8) * ldb + (lane >> 4) * 8 + col0;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    if (kk * 16 >= k_valid) break;
    uint32_t a[4];
    acc_as_a_fragment<T>(a, a_acc, kk);
#pragma unroll
    for (int np = 0; np < kNtC / 2; ++np) {
      if (col0 + np * 16 < col_end) {
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, b_ptr + kk * 16 * ldb + np * 16);
        mma_16816<T>(acc[2 * np], a, bv[0], bv[1]);
        mma_16816<T>(acc[2 * np + 1], a, bv[2], bv[3]);
      }
    }
  }
}

// Writes rows r0 = row_base + lane/4 and r0 + 8 of an m16 accumulator strip,
// columns col0 + nt*8 + 2*(lane%4) + e, times `mul`, into a row-strided tensor.
template <typename T, int kNtC>
__device__ __forceinline__ void store_acc(const float (&acc)[kNtC][4], T* g, int64_t row_stride,
                                          int64_t row_base, int64_t rows, int col0, int cols,
                                          float mul, int lane) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = row_base + (lane >> 2) + 8 * r;
    if (row >= rows) continue;
    T* grow = g + row * row_stride;
#pragma unroll
    for (int nt = 0; nt < kNtC; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = col0 + nt * 8 + 2 * (lane & 3) + e;
        if (col < cols) grow[col] = Elem<T>::from_float(acc[nt][2 * r + e] * mul);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Kernel A: dK, dV.
template <typename T, int kC, bool kVarlen>
__global__ void __launch_bounds__(bwd_mma_cfg::kThreads, 1)
    bwd_dkdv_mma_kernel(const BwdParams bp_arg) {
  using namespace bwd_mma_cfg;
  constexpr int kNtC = kC / 8;
  // kVarlen: a copy narrowed to the CTA's sequence (varlen.cuh). A separate instantiation,
  // because the copy costs the dense kernel registers and spills.
  BwdParams seq;
  const BwdParams& bp = kVarlen ? seq : bp_arg;
  const KernelParams& p = bp.f;
  extern __shared__ __align__(16) unsigned char smem_raw[];

  // blockIdx.x -> (key tile, chunk, kv head, b); low key tiles first (the
  // heaviest under a causal band).
  int64_t bid = blockIdx.x;
  int kt = int(bid % bp_arg.num_k_tiles);
  bid /= bp_arg.num_k_tiles;
  const int chunk = int(bid % bp_arg.chunks_a);
  bid /= bp_arg.chunks_a;
  const int hk = int(bid % bp_arg.f.Hkv);
  const int b = int(bid / bp_arg.f.Hkv);
  if constexpr (kVarlen) {
    seq = bp_arg;
    if (!enter_sequence<T>(seq, kBlockN, /*by_keys=*/true, kt)) return;
  }
  const int64_t n0 = int64_t(kt) * kBlockN;
  const int64_t n_last = (n0 + kBlockN < p.S ? n0 + kBlockN : p.S) - 1;
  const int c0 = chunk * kC;

  const int d_pad = ((p.D + 15) / 16) * 16, dv_pad = ((p.Dv + 15) / 16) * 16;
  const int ldq = d_pad + kPad, ldv = dv_pad + kPad;
  T* sK = reinterpret_cast<T*>(smem_raw);  // [64][ldq]
  T* sV = sK + kBlockN * ldq;              // [64][ldv]
  T* sStage = sV + kBlockN * ldv;          // per stage: Q [64][ldq], dO [64][ldv]
  const int stages = bp.two_stage ? 2 : 1;
  float* sLse2 = reinterpret_cast<float*>(sStage + stages * kBlockM * (ldq + ldv));  // [stages][64]
  float* sDelta = sLse2 + stages * kBlockM;                                        // [stages][64]

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* gk = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1] + n0 * p.k_stride[2];
  const T* gv = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1] + n0 * p.v_stride[2];

  const KeyRange qr = band_query_range(p, n0, n_last);
  const int qt_first = qr.hi < qr.lo ? 0 : int(qr.lo / kBlockM);
  const int nq = qr.hi < qr.lo ? 0 : int(qr.hi / kBlockM) + 1 - qt_first;
  const int total = p.group * nq;

  load_tile<T, kThreads>(sK, ldq, kBlockN, d_pad, gk, p.k_stride[2], int(p.S - n0), p.D, p.k_vec);
  load_tile<T, kThreads>(sV, ldv, kBlockN, dv_pad, gv, p.v_stride[2], int(p.S - n0), p.Dv, p.v_vec);

  auto issue = [&](int it, int st) {
    const int64_t h = int64_t(hk) * p.group + it / nq;
    const int64_t m0 = int64_t(qt_first + it % nq) * kBlockM;
    T* sQ = sStage + st * kBlockM * (ldq + ldv);
    T* sdO = sQ + kBlockM * ldq;
    const T* gq = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + m0 * p.q_stride[2];
    const T* gdo = static_cast<const T*>(bp.dout) + b * bp.dout_stride[0] + h * bp.dout_stride[1] +
                   m0 * bp.dout_stride[2];
    load_tile<T, kThreads>(sQ, ldq, kBlockM, d_pad, gq, p.q_stride[2], int(p.N - m0), p.D, p.q_vec);
    load_tile<T, kThreads>(sdO, ldv, kBlockM, dv_pad, gdo, bp.dout_stride[2], int(p.N - m0), p.Dv,
                           bp.dout_vec);
    load_row_stats<T, kThreads>(bp, b, h, m0, kBlockM, sLse2 + st * kBlockM, sDelta + st * kBlockM);
  };
  if (total > 0) issue(0, 0);
  cp_async_commit();

  float dk[kNtC][4], dv[kNtC][4];
#pragma unroll
  for (int nt = 0; nt < kNtC; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[nt][e] = dv[nt][e] = 0.0f;
  float sT[8][4], dpT[8][4];

  const int64_t j_base = n0 + warp * 16 + (lane >> 2);  // key of e < 2; +8 for e >= 2
  const bool plain = bwd_plain(p);
  const BandTest band = make_band_test(p);
  for (int it = 0; it < total; ++it) {
    const int st = bp.two_stage ? (it & 1) : 0;
    if (bp.two_stage && it + 1 < total) issue(it + 1, st ^ 1);
    cp_async_commit();
    if (bp.two_stage) cp_async_wait<1>();
    else cp_async_wait<0>();
    __syncthreads();

    const int64_t h = int64_t(hk) * p.group + it / nq;
    const int64_t m0 = int64_t(qt_first + it % nq) * kBlockM;
    const int64_t m_last = (m0 + kBlockM < p.N ? m0 + kBlockM : p.N) - 1;
    const int q_valid = int(p.N - m0);
    const T* sQ = sStage + st * kBlockM * (ldq + ldv);
    const T* sdO = sQ + kBlockM * ldq;
    const float* lse2 = sLse2 + st * kBlockM;
    const float* delta = sDelta + st * kBlockM;

    warp_qk<T>(dpT, sV, sdO, ldv, dv_pad / 16, q_valid, warp, lane);  // dP^T = V dO^T
    warp_qk<T>(sT, sK, sQ, ldq, d_pad / 16, q_valid, warp, lane);     // S^T = K Q^T

    const bool check = !tile_inside(p, m0, m_last, n0, n_last, kBlockM, kBlockN);
    const int mode = !plain ? kGeneral : check ? kBand : kFast;
    if (mode != kGeneral) {
      // P = exp2(scale * dot * log2e - lse2), dS = P (dP - D); hidden elements P = 0.
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = nt * 8 + 2 * (lane & 3) + (e & 1);
          float pr = exp2f(fmaf(sT[nt][e] * p.scale, kBwdLog2e, -lse2[qi]));
          if (mode == kBand && !band(m0 + qi, j_base + 8 * (e >> 1))) pr = 0.0f;
          sT[nt][e] = pr;
          dpT[nt][e] = pr * (dpT[nt][e] - delta[qi]);
        }
      }
    } else {
      const HeadCtx hc = make_head_ctx(p, b, h);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = nt * 8 + 2 * (lane & 3) + (e & 1);
          const int64_t i = m0 + qi, j = j_base + 8 * (e >> 1);
          float dcap = 1.0f;
          const float s = bwd_score(p, hc, i, j, sT[nt][e], check, &dcap);
          const float pr = exp2f(fmaf(s, kBwdLog2e, -lse2[qi]));
          float dp = dpT[nt][e], pd = pr;
          if (p.dropout && pr != 0.0f) {
            const float z = dropout_z(p, b, h, i, j);
            pd = pr * z;
            dp *= z;
          }
          sT[nt][e] = pd;
          dpT[nt][e] = pr * (dp - delta[qi]) * dcap;
        }
      }
    }
    warp_acc_AtB<T, kNtC>(dv, sT, sdO, ldv, c0, p.Dv, q_valid, lane);   // dV += (PZ)^T dO
    warp_acc_AtB<T, kNtC>(dk, dpT, sQ, ldq, c0, p.D, q_valid, lane);    // dK += dS^T Q
    __syncthreads();  // everyone is done with this stage
    if (!bp.two_stage && it + 1 < total) issue(it + 1, 0);
  }
  cp_async_wait<0>();

  T* gdk = static_cast<T*>(bp.dk) + b * bp.dk_stride[0] + hk * bp.dk_stride[1];
  T* gdv = static_cast<T*>(bp.dv) + b * bp.dv_stride[0] + hk * bp.dv_stride[1];
  const int64_t row_base = n0 + warp * 16;
  if (c0 < p.D) store_acc<T, kNtC>(dk, gdk, bp.dk_stride[2], row_base, p.S, c0, p.D, p.scale, lane);
  if (c0 < p.Dv) store_acc<T, kNtC>(dv, gdv, bp.dv_stride[2], row_base, p.S, c0, p.Dv, 1.0f, lane);
}

// ---------------------------------------------------------------------------
// Kernel B: dQ (and dbias).
template <typename T, int kC, bool kVarlen>
__global__ void __launch_bounds__(bwd_mma_cfg::kThreads, 1)
    bwd_dq_mma_kernel(const BwdParams bp_arg) {
  using namespace bwd_mma_cfg;
  constexpr int kNtC = kC / 8;
  BwdParams seq;  // kVarlen: narrowed to the CTA's sequence (as in kernel A)
  const BwdParams& bp = kVarlen ? seq : bp_arg;
  const KernelParams& p = bp.f;
  extern __shared__ __align__(16) unsigned char smem_raw[];

  int64_t bid = blockIdx.x;
  int qt = bp_arg.num_q_tiles - 1 - int(bid % bp_arg.num_q_tiles);  // longest (causal) first
  bid /= bp_arg.num_q_tiles;
  const int chunk = int(bid % bp_arg.chunks_b);
  bid /= bp_arg.chunks_b;
  const int h = int(bid % bp_arg.f.H);
  const int b = int(bid / bp_arg.f.H);
  if constexpr (kVarlen) {
    seq = bp_arg;
    if (!enter_sequence<T>(seq, kBlockM, /*by_keys=*/false, qt)) return;
  }
  const int hk = h / p.group;
  const int64_t m0 = int64_t(qt) * kBlockM;
  const int64_t m_last = (m0 + kBlockM < p.N ? m0 + kBlockM : p.N) - 1;
  const int c0 = chunk * kC;

  const int d_pad = ((p.D + 15) / 16) * 16, dv_pad = ((p.Dv + 15) / 16) * 16;
  const int ldq = d_pad + kPad, ldv = dv_pad + kPad;
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [64][ldq]
  T* sdO = sQ + kBlockM * ldq;             // [64][ldv]
  T* sStage = sdO + kBlockM * ldv;         // per stage: K [64][ldq], V [64][ldv]
  const int stages = bp.two_stage ? 2 : 1;
  float* sDelta = reinterpret_cast<float*>(sStage + stages * kBlockN * (ldq + ldv));  // [64]

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* gq = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + m0 * p.q_stride[2];
  const T* gdo = static_cast<const T*>(bp.dout) + b * bp.dout_stride[0] + h * bp.dout_stride[1] +
                 m0 * bp.dout_stride[2];
  const T* gk = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* gv = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  const TileRange tiles = key_tile_range(p, m0, m_last, kBlockN);

  load_tile<T, kThreads>(sQ, ldq, kBlockM, d_pad, gq, p.q_stride[2], int(p.N - m0), p.D, p.q_vec);
  load_tile<T, kThreads>(sdO, ldv, kBlockM, dv_pad, gdo, bp.dout_stride[2], int(p.N - m0), p.Dv,
                         bp.dout_vec);
  auto issue = [&](int kt, int st) {
    const int64_t n0 = int64_t(kt) * kBlockN;
    T* sK = sStage + st * kBlockN * (ldq + ldv);
    T* sV = sK + kBlockN * ldq;
    load_tile<T, kThreads>(sK, ldq, kBlockN, d_pad, gk + n0 * p.k_stride[2], p.k_stride[2],
                           int(p.S - n0), p.D, p.k_vec);
    load_tile<T, kThreads>(sV, ldv, kBlockN, dv_pad, gv + n0 * p.v_stride[2], p.v_stride[2],
                           int(p.S - n0), p.Dv, p.v_vec);
  };
  if (tiles.first < tiles.end) issue(tiles.first, 0);
  cp_async_commit();
  block_rows_delta<T, kThreads>(bp, b, h, m0, kBlockM, sDelta);

  const int64_t row0 = m0 + warp * 16 + (lane >> 2), row1 = row0 + 8;
  const float lse2[2] = {lse_log2(p, b, h, row0), lse_log2(p, b, h, row1)};
  const HeadCtx hc = make_head_ctx(p, b, h);
  float* dbias_rows[2] = {nullptr, nullptr};
  if (bp.dbias && chunk == 0) {
    if (row0 < p.N)
      dbias_rows[0] = bp.dbias + b * bp.dbias_stride[0] + h * bp.dbias_stride[1] + row0 * bp.dbias_stride[2];
    if (row1 < p.N)
      dbias_rows[1] = bp.dbias + b * bp.dbias_stride[0] + h * bp.dbias_stride[1] + row1 * bp.dbias_stride[2];
  }

  float dq[kNtC][4];
#pragma unroll
  for (int nt = 0; nt < kNtC; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[nt][e] = 0.0f;
  float s[8][4], dp[8][4];
  float delta[2] = {0.0f, 0.0f};
  // dbias needs the general path (it is written there).
  const bool plain = bwd_plain(p) && bp.dbias == nullptr;
  const BandTest band = make_band_test(p);

  for (int kt = tiles.first; kt < tiles.end; ++kt) {
    const int st = bp.two_stage ? ((kt - tiles.first) & 1) : 0;
    if (bp.two_stage && kt + 1 < tiles.end) issue(kt + 1, st ^ 1);
    cp_async_commit();
    if (bp.two_stage) cp_async_wait<1>();
    else cp_async_wait<0>();
    __syncthreads();
    if (kt == tiles.first) {
      delta[0] = sDelta[warp * 16 + (lane >> 2)];
      delta[1] = sDelta[warp * 16 + (lane >> 2) + 8];
    }

    const int64_t n0 = int64_t(kt) * kBlockN;
    const int64_t n_last = (n0 + kBlockN < p.S ? n0 + kBlockN : p.S) - 1;
    const int keys_valid = int(p.S - n0);
    const T* sK = sStage + st * kBlockN * (ldq + ldv);
    const T* sV = sK + kBlockN * ldq;

    warp_qk<T>(s, sQ, sK, ldq, d_pad / 16, keys_valid, warp, lane);     // S = Q K^T
    warp_qk<T>(dp, sdO, sV, ldv, dv_pad / 16, keys_valid, warp, lane);  // dP = dO V^T

    const bool check = !tile_inside(p, m0, m_last, n0, n_last, kBlockM, kBlockN);
    const int mode = !plain ? kGeneral : check ? kBand : kFast;
    if (mode != kGeneral) {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          float pr = exp2f(fmaf(s[nt][e] * p.scale, kBwdLog2e, -lse2[r]));
          if (mode == kBand && !band(r == 0 ? row0 : row1, n0 + nt * 8 + 2 * (lane & 3) + (e & 1))) pr = 0.0f;
          s[nt][e] = pr * (dp[nt][e] - delta[r]);
        }
      }
    } else {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          const int64_t i = r == 0 ? row0 : row1;
          const int64_t j = n0 + nt * 8 + 2 * (lane & 3) + (e & 1);
          float dcap = 1.0f;
          const float sc = bwd_score(p, hc, i, j, s[nt][e], check, &dcap);
          const float pr = exp2f(fmaf(sc, kBwdLog2e, -lse2[r]));
          float d = dp[nt][e];
          if (p.dropout && pr != 0.0f) d *= dropout_z(p, b, h, i, j);
          float ds = pr * (d - delta[r]);
          if (dbias_rows[r] != nullptr && j < p.S) dbias_rows[r][j * bp.dbias_stride[3]] = ds;
          s[nt][e] = ds * dcap;
        }
      }
    }
    warp_acc_AtB<T, kNtC>(dq, s, sK, ldq, c0, p.D, keys_valid, lane);  // dQ += dS K
    __syncthreads();
    if (!bp.two_stage && kt + 1 < tiles.end) issue(kt + 1, 0);
  }
  cp_async_wait<0>();

  T* gdq = static_cast<T*>(bp.dq) + b * bp.dq_stride[0] + h * bp.dq_stride[1];
  store_acc<T, kNtC>(dq, gdq, bp.dq_stride[2], m0 + warp * 16, p.N, c0, p.D, p.scale, lane);
}

}  // namespace steelattn::cuda_generic
