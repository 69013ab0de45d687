// Tensor-core forward kernel (fp16 / bf16, sm_80+): mma.sync m16n8k16, fp32
// accumulation, online softmax.
//
// CTA = 4 warps = 64 query rows (16 per warp) of one (b, h) and one chunk of
// kDvTile output columns. Shared memory holds the whole Q tile [64 x Dpad],
// one K tile [64 x Dpad] and one V tile [64 x kDvTile]; O lives in registers.
// K of the next key tile is fetched with cp.async while softmax and P.V of the
// current one run. Outputs wider than kDvTile are split over CTAs (blockIdx
// carries the chunk), which recomputes Q.K^T per chunk but keeps O in
// registers without a workspace.
#pragma once

#include <cmath>
#include <cstdint>

#include "steelattn/detail/philox.h"
#include "kernel_params.h"
#include "mask_policy.cuh"
#include "mma_sm80.cuh"
#include "score_mod.cuh"
#include "tile_io.cuh"
#include "varlen.cuh"

namespace steelattn::cuda_generic {

namespace mma_cfg {
constexpr int kBlockM = 64;  // query rows per CTA
constexpr int kBlockN = 64;  // keys per tile
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kPad = 8;  // row padding (elements): 16 B, keeps ldmatrix rows on distinct banks
}  // namespace mma_cfg

// Shared memory bytes for a call: Q and K tiles over the padded head dim, one V tile.
inline size_t mma_smem_bytes(int D, int dv_tile) {
  using namespace mma_cfg;
  const int ldq = ((D + 15) / 16) * 16 + kPad;
  return size_t(2) * ((kBlockM + kBlockN) * ldq + kBlockN * (dv_tile + kPad));
}

constexpr float kLog2e = 1.4426950408889634f;

// S[16 x 64] of this warp = Q[warp rows] . K_tile^T, over the padded head dim.
// s[nt][*] is the m16n8 accumulator of keys nt*8 .. nt*8+7.
template <typename T>
__device__ __forceinline__ void warp_qk(float (&s)[mma_cfg::kBlockN / 8][4], const T* sQ,
                                        const T* sK, int ldq, int d_steps, int keys_valid,
                                        int warp, int lane) {
  constexpr int kNt = mma_cfg::kBlockN / 8;
#pragma unroll
  for (int nt = 0; nt < kNt; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
  // ldmatrix lane -> row addresses: A rows 0..15 x col halves; B keys x d halves.
  const T* a_ptr = sQ + (warp * 16 + (lane & 15)) * ldq + (lane >> 4) * 8;
  const T* b_ptr = sK + ((lane & 7) + (lane >> 4) * 8) * ldq + ((lane >> 3) & 1) * 8;
  for (int kk = 0; kk < d_steps; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a, a_ptr + kk * 16);
#pragma unroll
    for (int np = 0; np < kNt / 2; ++np) {
      if (np * 16 < keys_valid) {  // warp-uniform: skip key pairs past S
        uint32_t b[4];
        ldmatrix_x4(b, b_ptr + np * 16 * ldq + kk * 16);
        mma_16816<T>(s[2 * np], a, b[0], b[1]);
        mma_16816<T>(s[2 * np + 1], a, b[2], b[3]);
      }
    }
  }
}

// Raw dot products -> final scores (-inf where hidden). Element e of n-tile nt is
// row (e < 2 ? r0 : r1), key n0 + nt*8 + 2*(lane%4) + (e&1).
__device__ __forceinline__ void apply_scores(float (&s)[mma_cfg::kBlockN / 8][4],
                                             const KernelParams& p, const RowCtx& r0,
                                             const RowCtx& r1, int64_t n0, int lane) {
#pragma unroll
  for (int nt = 0; nt < mma_cfg::kBlockN / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t j = n0 + nt * 8 + 2 * (lane & 3) + (e & 1);
      s[nt][e] = final_score(p, e < 2 ? r0 : r1, j, s[nt][e]);
    }
  }
}

// Zeroes dropped probabilities in place (the 1/(1-p) scale is applied in the
// epilogue). Draws are keyed by the [B,H,N,S] index, not by the tiling.
__device__ __forceinline__ void apply_dropout(float (&s)[mma_cfg::kBlockN / 8][4],
                                              const KernelParams& p, const RowCtx& r0,
                                              const RowCtx& r1, int64_t n0, int lane) {
#pragma unroll
  for (int nt = 0; nt < mma_cfg::kBlockN / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (s[nt][e] == 0.0f) continue;  // masked or underflowed: nothing to draw
      const RowCtx& r = e < 2 ? r0 : r1;
      const int64_t j = n0 + nt * 8 + 2 * (lane & 3) + (e & 1);
      const uint64_t idx = detail::dropout_index_in_frame(p, r.b, r.h, r.i, j);
      if (!detail::dropout_keep(idx, p.dropout_seed, p.dropout_offset, p.dropout_threshold24))
        s[nt][e] = 0.0f;
    }
  }
}

template <typename T, int kDvTile, bool kVarlen>
__global__ void __launch_bounds__(mma_cfg::kThreads, 1)
    forward_mma_kernel(const KernelParams p_arg) {
  using namespace mma_cfg;
  constexpr int kNtS = kBlockN / 8;   // S accumulator n-tiles per warp
  constexpr int kNtO = kDvTile / 8;   // O accumulator n-tiles per warp
  constexpr int kLdv = kDvTile + kPad;
  extern __shared__ __align__(16) unsigned char smem_raw[];

  // blockIdx.x -> (q tile, Dv chunk, h, b); the last q tiles (longest under a
  // causal band) are issued first so they do not trail at the end of the grid.
  // kVarlen: a copy narrowed to the CTA's sequence (varlen.cuh); a separate instantiation
  // keeps the dense kernel reading its parameters in place.
  KernelParams seq;
  const KernelParams& p = kVarlen ? seq : p_arg;
  int64_t bid = blockIdx.x;
  int qt = p_arg.num_q_tiles - 1 - int(bid % p_arg.num_q_tiles);
  bid /= p_arg.num_q_tiles;
  const int dv_chunk = int(bid % p_arg.num_dv_chunks);
  bid /= p_arg.num_dv_chunks;
  const int h = int(bid % p_arg.H);
  const int b = int(bid / p_arg.H);
  if constexpr (kVarlen) {
    seq = p_arg;
    if (!enter_sequence<T>(seq, kBlockM, /*by_keys=*/false, qt)) return;
  }
  const int hk = h / p.group;
  const int64_t m0 = int64_t(qt) * kBlockM;
  const int64_t m_last = (m0 + kBlockM < p.N ? m0 + kBlockM : p.N) - 1;
  const int dv0 = dv_chunk * kDvTile;

  const int d_pad = ((p.D + 15) / 16) * 16;
  const int ldq = d_pad + kPad;
  T* sQ = reinterpret_cast<T*>(smem_raw);   // [kBlockM][ldq]
  T* sK = sQ + kBlockM * ldq;               // [kBlockN][ldq]
  T* sV = sK + kBlockN * ldq;               // [kBlockN][kLdv]

  const T* gq = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] +
                m0 * p.q_stride[2];
  const T* gk = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* gv = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1] + dv0;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row0 = m0 + warp * 16 + (lane >> 2), row1 = row0 + 8;
  const RowCtx rc0 = make_row_ctx(p, b, h, row0), rc1 = make_row_ctx(p, b, h, row1);
  const TileRange tiles = key_tile_range(p, m0, m_last, kBlockN);

  load_tile<T, kThreads>(sQ, ldq, kBlockM, d_pad, gq, p.q_stride[2], int(m_last - m0 + 1), p.D,
                         p.q_vec);
  cp_async_commit();
  auto load_k = [&](int kt) {
    const int64_t n0 = int64_t(kt) * kBlockN;
    load_tile<T, kThreads>(sK, ldq, kBlockN, d_pad, gk + n0 * p.k_stride[2], p.k_stride[2],
                           int(p.S - n0), p.D, p.k_vec);
  };
  if (tiles.first < tiles.end) load_k(tiles.first);
  cp_async_commit();

  float o[kNtO][4];
#pragma unroll
  for (int nt = 0; nt < kNtO; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};  // per-thread partial; quad-reduced in the epilogue
  float s[kNtS][4];

  for (int kt = tiles.first; kt < tiles.end; ++kt) {
    const int64_t n0 = int64_t(kt) * kBlockN;
    const int keys_valid = int(p.S - n0);
    load_tile<T, kThreads>(sV, kLdv, kBlockN, kDvTile, gv + n0 * p.v_stride[2], p.v_stride[2],
                           keys_valid, p.Dv - dv0, p.v_vec);
    cp_async_commit();
    cp_async_wait<1>();  // Q and K_kt have landed; V_kt may still be in flight
    __syncthreads();

    warp_qk<T>(s, sQ, sK, ldq, d_pad / 16, keys_valid, warp, lane);
    __syncthreads();  // every warp is done with sK: prefetch the next K tile
    if (kt + 1 < tiles.end) load_k(kt + 1);
    cp_async_commit();

    apply_scores(s, p, rc0, rc1, n0, lane);

    // Online softmax; rows r0 (e = 0, 1) and r1 (e = 2, 3) are shared by a quad.
    float tile_max[2] = {row_max[0], row_max[1]};
#pragma unroll
    for (int nt = 0; nt < kNtS; ++nt) {
      tile_max[0] = fmaxf(tile_max[0], fmaxf(s[nt][0], s[nt][1]));
      tile_max[1] = fmaxf(tile_max[1], fmaxf(s[nt][2], s[nt][3]));
    }
    float neg_max_log2[2], alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      // A row with nothing visible yet keeps max -inf; use 0 so exp(-inf - 0) = 0, not NaN.
      const float m_use = tile_max[r] == -INFINITY ? 0.0f : tile_max[r];
      alpha[r] = exp2f((row_max[r] - m_use) * kLog2e);
      row_max[r] = tile_max[r];
      row_sum[r] *= alpha[r];
      neg_max_log2[r] = -m_use * kLog2e;
    }
#pragma unroll
    for (int nt = 0; nt < kNtS; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(fmaf(s[nt][e], kLog2e, neg_max_log2[e >> 1]));
        row_sum[e >> 1] += s[nt][e];
      }
    }
#pragma unroll
    for (int nt = 0; nt < kNtO; ++nt) {
      o[nt][0] *= alpha[0];
      o[nt][1] *= alpha[0];
      o[nt][2] *= alpha[1];
      o[nt][3] *= alpha[1];
    }
    if (p.dropout) apply_dropout(s, p, rc0, rc1, n0, lane);

    cp_async_wait<1>();  // V_kt has landed (K_{kt+1} may still be in flight)
    __syncthreads();
    // O += P . V: the S accumulators of key n-tiles 2kk, 2kk+1 are exactly the
    // A fragment of k-step kk, so P never leaves registers.
    const T* v_ptr = sV + ((lane & 7) + ((lane >> 3) & 1) * 8) * kLdv + (lane >> 4) * 8;
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      if (kk * 16 >= keys_valid) break;  // warp-uniform
      uint32_t a[4];
      acc_as_a_fragment<T>(a, s, kk);
#pragma unroll
      for (int np = 0; np < kNtO / 2; ++np) {
        if (dv0 + np * 16 < p.Dv) {  // warp-uniform: skip padding columns past Dv
          uint32_t bv[4];
          ldmatrix_x4_trans(bv, v_ptr + kk * 16 * kLdv + np * 16);
          mma_16816<T>(o[2 * np], a, bv[0], bv[1]);
          mma_16816<T>(o[2 * np + 1], a, bv[2], bv[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with sV before the next V load
  }
  cp_async_wait<0>();

  // Epilogue: normalise, write O (and LSE from the first Dv chunk).
  float inv_sum[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
    const float keep_scale = p.dropout ? p.dropout_scale : 1.0f;
    inv_sum[r] = row_sum[r] > 0.0f ? keep_scale / row_sum[r] : 0.0f;
  }
  T* gout = static_cast<T*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = r == 0 ? row0 : row1;
    if (row >= p.N) continue;
    T* orow = gout + row * p.out_stride[2];
#pragma unroll
    for (int nt = 0; nt < kNtO; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = dv0 + nt * 8 + 2 * (lane & 3) + e;
        if (col < p.Dv) orow[col] = Elem<T>::from_float(o[nt][2 * r + e] * inv_sum[r]);
      }
    }
    if (p.lse && dv_chunk == 0 && (lane & 3) == 0) {
      p.lse[b * p.lse_stride[0] + h * p.lse_stride[1] + row * p.lse_stride[2]] =
          row_sum[r] > 0.0f ? row_max[r] + logf(row_sum[r]) : -INFINITY;
    }
  }

  // Optional probabilities [B,H,N,S]: a second sweep over the key tiles with the
  // final max and sum; tiles outside the band are written as zeros unvisited.
  if (p.attn == nullptr || dv_chunk != 0) return;
  __syncthreads();
  float* garow[2];
  float neg_max_log2[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = r == 0 ? row0 : row1;
    garow[r] = row < p.N ? p.attn + b * p.attn_stride[0] + h * p.attn_stride[1] +
                               row * p.attn_stride[2]
                         : nullptr;
    neg_max_log2[r] = row_max[r] == -INFINITY ? 0.0f : -row_max[r] * kLog2e;
    inv_sum[r] = row_sum[r] > 0.0f ? 1.0f / row_sum[r] : 0.0f;
  }
  const int num_kt = (p.S + kBlockN - 1) / kBlockN;
  for (int kt = 0; kt < num_kt; ++kt) {
    const int64_t n0 = int64_t(kt) * kBlockN;
    const bool visit = kt >= tiles.first && kt < tiles.end;  // CTA-uniform
    if (visit) {
      load_k(kt);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      warp_qk<T>(s, sQ, sK, ldq, d_pad / 16, int(p.S - n0), warp, lane);
      __syncthreads();
      apply_scores(s, p, rc0, rc1, n0, lane);
    }
#pragma unroll
    for (int nt = 0; nt < kNtS; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const int64_t j = n0 + nt * 8 + 2 * (lane & 3) + (e & 1);
        if (garow[r] == nullptr || j >= p.S) continue;
        const float prob =
            visit ? exp2f(fmaf(s[nt][e], kLog2e, neg_max_log2[r])) * inv_sum[r] : 0.0f;
        garow[r][j * p.attn_stride[3]] = prob;
      }
    }
  }
}

}  // namespace steelattn::cuda_generic
