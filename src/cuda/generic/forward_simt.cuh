// SIMT forward kernel: fp32 FMA throughout (fp32 inputs must not go through
// tf32), also the fallback for 16-bit inputs whose tiles do not fit the tensor
// core kernel's shared memory on this device.
//
// CTA = 256 threads as a 16 x 16 grid over a 64-query x 64-key score tile;
// thread (ty, tx) owns rows ty + 16r and keys tx + 16c (r, c < 4), so a row's
// 16 owners are 16 consecutive lanes and row reductions are 4 shuffles. Q.K^T
// streams the head dim in 32-wide slices (shared memory does not grow with D);
// P goes through shared memory for P.V, where the thread owns rows ty + 16r
// and output columns tx + 16c of a kDvTile-wide chunk of Dv.
#pragma once

#include <cmath>
#include <cstdint>

#include "steelattn/detail/philox.h"
#include "kernel_params.h"
#include "mask_policy.cuh"
#include "mma_sm80.cuh"
#include "score_mod.cuh"

namespace steelattn::cuda_generic {

namespace simt_cfg {
constexpr int kBlockM = 64;
constexpr int kBlockN = 64;
constexpr int kSliceD = 32;    // head-dim slice per Q.K^T step
constexpr int kDvTile = 128;   // output columns per CTA (8 per thread)
constexpr int kThreads = 256;
constexpr int kRows = kBlockM / 16;  // rows per thread
constexpr int kKeys = kBlockN / 16;  // keys per thread
constexpr int kCols = kDvTile / 16;  // output columns per thread
}  // namespace simt_cfg

// +1 column on the Q/K slices and on P keeps strided column reads on distinct banks.
inline size_t simt_smem_bytes() {
  using namespace simt_cfg;
  return sizeof(float) * (size_t(kBlockM + kBlockN) * (kSliceD + 1) + size_t(kBlockN) * kDvTile +
                          size_t(kBlockM) * (kBlockN + 1));
}

// s[r][c] = raw q.k of rows ty + 16r, keys n0 + tx + 16c.
template <typename T>
__device__ __forceinline__ void simt_qk(float (&s)[simt_cfg::kRows][simt_cfg::kKeys],
                                        const KernelParams& p, const T* gq, const T* gk,
                                        int64_t m0, int64_t n0, float* sQ, float* sK) {
  using namespace simt_cfg;
  constexpr int kLd = kSliceD + 1;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int c = 0; c < kKeys; ++c) s[r][c] = 0.0f;
  for (int d0 = 0; d0 < p.D; d0 += kSliceD) {
    __syncthreads();  // previous readers of sQ/sK (and of sP/sV) are done
    for (int idx = threadIdx.x; idx < kBlockM * kSliceD; idx += kThreads) {
      const int r = idx / kSliceD, c = idx % kSliceD;
      const bool dv = d0 + c < p.D;
      sQ[r * kLd + c] = dv && m0 + r < p.N
                            ? Elem<T>::to_float(gq[(m0 + r) * p.q_stride[2] + d0 + c])
                            : 0.0f;
      sK[r * kLd + c] = dv && n0 + r < p.S
                            ? Elem<T>::to_float(gk[(n0 + r) * p.k_stride[2] + d0 + c])
                            : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int d = 0; d < kSliceD; ++d) {
      float a[kRows], k[kKeys];
#pragma unroll
      for (int r = 0; r < kRows; ++r) a[r] = sQ[(ty + 16 * r) * kLd + d];
#pragma unroll
      for (int c = 0; c < kKeys; ++c) k[c] = sK[(tx + 16 * c) * kLd + d];
#pragma unroll
      for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int c = 0; c < kKeys; ++c) s[r][c] = fmaf(a[r], k[c], s[r][c]);
    }
  }
}

// Max / sum over the 16 lanes that share a row (xor offsets < 16 stay inside
// each half-warp).
__device__ __forceinline__ float row_max16(float x) {
#pragma unroll
  for (int o = 1; o < 16; o <<= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float row_sum16(float x) {
#pragma unroll
  for (int o = 1; o < 16; o <<= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename T>
__global__ void __launch_bounds__(simt_cfg::kThreads) forward_simt_kernel(const KernelParams p) {
  using namespace simt_cfg;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sQ = reinterpret_cast<float*>(smem_raw);  // [kBlockM][kSliceD + 1]
  float* sK = sQ + kBlockM * (kSliceD + 1);        // [kBlockN][kSliceD + 1]
  float* sV = sK + kBlockN * (kSliceD + 1);        // [kBlockN][kDvTile]
  float* sP = sV + kBlockN * kDvTile;              // [kBlockM][kBlockN + 1]
  constexpr int kLdp = kBlockN + 1;

  int64_t bid = blockIdx.x;
  const int qt = p.num_q_tiles - 1 - int(bid % p.num_q_tiles);  // longest tiles first
  bid /= p.num_q_tiles;
  const int dv_chunk = int(bid % p.num_dv_chunks);
  bid /= p.num_dv_chunks;
  const int h = int(bid % p.H);
  const int b = int(bid / p.H);
  const int hk = h / p.group;
  const int64_t m0 = int64_t(qt) * kBlockM;
  const int64_t m_last = (m0 + kBlockM < p.N ? m0 + kBlockM : p.N) - 1;
  const int dv0 = dv_chunk * kDvTile;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;

  const T* gq = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* gk = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* gv = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];

  RowCtx rc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) rc[r] = make_row_ctx(p, b, h, m0 + ty + 16 * r);
  const TileRange tiles = key_tile_range(p, m0, m_last, kBlockN);

  float o[kRows][kCols] = {};
  float row_max[kRows], row_sum[kRows];  // row_sum: per-thread partial
#pragma unroll
  for (int r = 0; r < kRows; ++r) row_max[r] = -INFINITY, row_sum[r] = 0.0f;
  float s[kRows][kKeys];

  for (int kt = tiles.first; kt < tiles.end; ++kt) {
    const int64_t n0 = int64_t(kt) * kBlockN;
    simt_qk<T>(s, p, gq, gk, m0, n0, sQ, sK);

#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float tmax = row_max[r];
#pragma unroll
      for (int c = 0; c < kKeys; ++c) {
        s[r][c] = final_score(p, rc[r], n0 + tx + 16 * c, s[r][c]);
        tmax = fmaxf(tmax, s[r][c]);
      }
      tmax = row_max16(tmax);
      // Nothing visible yet: subtract 0 so exp(-inf) = 0 rather than NaN.
      const float m_use = tmax == -INFINITY ? 0.0f : tmax;
      const float alpha = expf(row_max[r] - m_use);  // exact expf: fp32 must hold 1e-5
      row_max[r] = tmax;
      row_sum[r] *= alpha;
#pragma unroll
      for (int c = 0; c < kCols; ++c) o[r][c] *= alpha;
#pragma unroll
      for (int c = 0; c < kKeys; ++c) {
        float pr = expf(s[r][c] - m_use);
        row_sum[r] += pr;
        if (p.dropout && pr != 0.0f) {
          const uint64_t idx =
              detail::dropout_index_in_frame(p, b, h, rc[r].i, n0 + tx + 16 * c);
          if (!detail::dropout_keep(idx, p.dropout_seed, p.dropout_offset,
                                    p.dropout_threshold24))
            pr = 0.0f;
        }
        sP[(ty + 16 * r) * kLdp + tx + 16 * c] = pr;  // safe: simt_qk synced past the last P.V
      }
    }
    for (int idx = threadIdx.x; idx < kBlockN * kDvTile; idx += kThreads) {
      const int r = idx / kDvTile, c = idx % kDvTile;
      sV[idx] = n0 + r < p.S && dv0 + c < p.Dv
                    ? Elem<T>::to_float(gv[(n0 + r) * p.v_stride[2] + dv0 + c])
                    : 0.0f;
    }
    __syncthreads();
    const int kmax = p.S - n0 < kBlockN ? int(p.S - n0) : kBlockN;
    for (int k = 0; k < kmax; ++k) {
      float pk[kRows], vk[kCols];
#pragma unroll
      for (int r = 0; r < kRows; ++r) pk[r] = sP[(ty + 16 * r) * kLdp + k];
#pragma unroll
      for (int c = 0; c < kCols; ++c) vk[c] = sV[k * kDvTile + tx + 16 * c];
#pragma unroll
      for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int c = 0; c < kCols; ++c) o[r][c] = fmaf(pk[r], vk[c], o[r][c]);
    }
  }

  T* gout = static_cast<T*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1];
  const float keep_scale = p.dropout ? p.dropout_scale : 1.0f;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    row_sum[r] = row_sum16(row_sum[r]);
    const int64_t row = rc[r].i;
    if (row >= p.N) continue;
    const float inv = row_sum[r] > 0.0f ? keep_scale / row_sum[r] : 0.0f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int col = dv0 + tx + 16 * c;
      if (col < p.Dv) gout[row * p.out_stride[2] + col] = Elem<T>::from_float(o[r][c] * inv);
    }
    if (p.lse && dv_chunk == 0 && tx == 0)
      p.lse[b * p.lse_stride[0] + h * p.lse_stride[1] + row * p.lse_stride[2]] =
          row_sum[r] > 0.0f ? row_max[r] + logf(row_sum[r]) : -INFINITY;
  }

  // Optional probabilities: second sweep with the final max and sum; tiles
  // outside the band are written as zeros without being computed.
  if (p.attn == nullptr || dv_chunk != 0) return;
  const int num_kt = (p.S + kBlockN - 1) / kBlockN;
  for (int kt = 0; kt < num_kt; ++kt) {
    const int64_t n0 = int64_t(kt) * kBlockN;
    const bool visit = kt >= tiles.first && kt < tiles.end;  // CTA-uniform
    if (visit) simt_qk<T>(s, p, gq, gk, m0, n0, sQ, sK);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t row = rc[r].i;
      if (row >= p.N) continue;
      const float m_use = row_max[r] == -INFINITY ? 0.0f : row_max[r];
      const float inv = row_sum[r] > 0.0f ? 1.0f / row_sum[r] : 0.0f;
      float* arow = p.attn + b * p.attn_stride[0] + h * p.attn_stride[1] + row * p.attn_stride[2];
#pragma unroll
      for (int c = 0; c < kKeys; ++c) {
        const int64_t j = n0 + tx + 16 * c;
        if (j >= p.S) continue;
        arow[j * p.attn_stride[3]] =
            visit ? expf(final_score(p, rc[r], j, s[r][c]) - m_use) * inv : 0.0f;
      }
    }
  }
}

}  // namespace steelattn::cuda_generic
