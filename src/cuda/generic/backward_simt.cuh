// SIMT backward kernels: fp32 FMA throughout (fp32 inputs must not go through
// tf32: fp32 gradients are held to 1e-5 relative), also the route of 16-bit
// inputs whose tiles do not fit the tensor-core kernels (D or Dv > 256, or
// small shared memory). Same decomposition as backward_mma.cuh (kernel A: dK/dV
// per key tile over the GQA group's query tiles; kernel B: dQ and dbias per
// query tile), same determinism (no atomics, fixed loop order).
//
// CTA = 256 threads as a 16 x 16 grid over a 64 x 64 score tile; thread
// (ty, tx) owns tile rows ty + 16r and columns tx + 16c (r, c < 4). Dot products
// stream the head dim in 32-wide slices through shared memory, so shared memory
// does not grow with D; P and dS go through shared memory for the products
// that contract over the other tile dimension. Accumulators cover 64-column
// chunks of dK/dV/dQ (wider heads are split over CTAs that recompute S, dP).
#pragma once

#include <cmath>
#include <cstdint>

#include "backward_common.cuh"

namespace steelattn::cuda_generic {

namespace bwd_simt_cfg {
constexpr int kTile = 64;     // rows and columns of the score tile
constexpr int kSlice = 32;    // head-dim slice per dot-product step
constexpr int kChunk = 64;    // accumulator columns per CTA
constexpr int kThreads = 256;
constexpr int kLdS = kSlice + 1;
constexpr int kLdP = kTile + 1;
}  // namespace bwd_simt_cfg

inline size_t bwd_simt_smem_bytes() {
  using namespace bwd_simt_cfg;
  return sizeof(float) * (size_t(2) * kTile * kLdS + size_t(2) * kTile * kLdP +
                          size_t(2) * kTile * kChunk + 2 * kTile);
}

// s[r][c] = sum_d A[ty + 16r][d] * B[tx + 16c][d], d < width; rows past
// a_valid / b_valid read as zero. Starts with a barrier (previous readers of sA/sB).
template <typename T>
__device__ __forceinline__ void simt_dot(float (&s)[4][4], const T* gA, int64_t sa, int a_valid,
                                         const T* gB, int64_t sb, int b_valid, int width, float* sA,
                                         float* sB) {
  using namespace bwd_simt_cfg;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) s[r][c] = 0.0f;
  for (int d0 = 0; d0 < width; d0 += kSlice) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kTile * kSlice; idx += kThreads) {
      const int r = idx / kSlice, c = idx % kSlice;
      const bool dv = d0 + c < width;
      sA[r * kLdS + c] = dv && r < a_valid ? Elem<T>::to_float(gA[r * sa + d0 + c]) : 0.0f;
      sB[r * kLdS + c] = dv && r < b_valid ? Elem<T>::to_float(gB[r * sb + d0 + c]) : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int d = 0; d < kSlice; ++d) {
      float a[4], bb[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) a[r] = sA[(ty + 16 * r) * kLdS + d];
#pragma unroll
      for (int c = 0; c < 4; ++c) bb[c] = sB[(tx + 16 * c) * kLdS + d];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) s[r][c] = fmaf(a[r], bb[c], s[r][c]);
    }
  }
}

// dst[r][c] = g[r][c0 + c] as fp32 (zero outside rows_valid x cols), 64 x 64.
template <typename T>
__device__ __forceinline__ void simt_load_chunk(float* dst, const T* g, int64_t stride, int rows_valid,
                                                int c0, int cols) {
  using namespace bwd_simt_cfg;
  for (int idx = threadIdx.x; idx < kTile * kChunk; idx += kThreads) {
    const int r = idx / kChunk, c = idx % kChunk;
    dst[idx] = r < rows_valid && c0 + c < cols ? Elem<T>::to_float(g[r * stride + c0 + c]) : 0.0f;
  }
}

// acc[r][c] += sum_k sX[ty + 16r][k] * sY[k][tx + 16c], k < kmax.
__device__ __forceinline__ void simt_acc(float (&acc)[4][4], const float* sX, const float* sY, int kmax) {
  using namespace bwd_simt_cfg;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  for (int k = 0; k < kmax; ++k) {
    float x[4], y[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) x[r] = sX[(ty + 16 * r) * kLdP + k];
#pragma unroll
    for (int c = 0; c < 4; ++c) y[c] = sY[k * kChunk + tx + 16 * c];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(x[r], y[c], acc[r][c]);
  }
}

template <typename T>
__device__ __forceinline__ void simt_store(const float (&acc)[4][4], T* g, int64_t stride, int64_t row0,
                                           int64_t rows, int c0, int cols, float mul) {
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t row = row0 + ty + 16 * r;
    if (row >= rows) continue;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int col = c0 + tx + 16 * c;
      if (col < cols) g[row * stride + col] = Elem<T>::from_float(acc[r][c] * mul);
    }
  }
}

// Kernel A: dK, dV of one (b, kv head, 64-key tile, 64-column chunk).
template <typename T>
__global__ void __launch_bounds__(bwd_simt_cfg::kThreads) bwd_dkdv_simt_kernel(const BwdParams bp) {
  using namespace bwd_simt_cfg;
  const KernelParams& p = bp.f;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sA = reinterpret_cast<float*>(smem_raw);
  float* sB = sA + kTile * kLdS;
  float* sP = sB + kTile * kLdS;    // [key][query]: P Z
  float* sdS = sP + kTile * kLdP;   // [key][query]: dS (with the softcap factor)
  float* sC1 = sdS + kTile * kLdP;  // [query][64]: dO chunk
  float* sC2 = sC1 + kTile * kChunk;  // [query][64]: Q chunk
  float* sLse2 = sC2 + kTile * kChunk;
  float* sDelta = sLse2 + kTile;

  int64_t bid = blockIdx.x;
  const int kt = int(bid % bp.num_k_tiles);
  bid /= bp.num_k_tiles;
  const int chunk = int(bid % bp.chunks_a);
  bid /= bp.chunks_a;
  const int hk = int(bid % p.Hkv);
  const int b = int(bid / p.Hkv);
  const int64_t n0 = int64_t(kt) * kTile;
  const int64_t n_last = (n0 + kTile < p.S ? n0 + kTile : p.S) - 1;
  const int c0 = chunk * kChunk;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;

  const T* gk = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1] + n0 * p.k_stride[2];
  const T* gv = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1] + n0 * p.v_stride[2];
  const KeyRange qr = band_query_range(p, n0, n_last);
  const int qt_first = qr.hi < qr.lo ? 0 : int(qr.lo / kTile);
  const int nq = qr.hi < qr.lo ? 0 : int(qr.hi / kTile) + 1 - qt_first;
  const int total = p.group * nq;
  const int k_valid = int(p.S - n0);

  float dk[4][4] = {}, dv[4][4] = {};
  float sT[4][4], dpT[4][4];
  for (int it = 0; it < total; ++it) {
    const int64_t h = int64_t(hk) * p.group + it / nq;
    const int64_t m0 = int64_t(qt_first + it % nq) * kTile;
    const int64_t m_last = (m0 + kTile < p.N ? m0 + kTile : p.N) - 1;
    const int q_valid = int(p.N - m0);
    const T* gq = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + m0 * p.q_stride[2];
    const T* gdo = static_cast<const T*>(bp.dout) + b * bp.dout_stride[0] + h * bp.dout_stride[1] +
                   m0 * bp.dout_stride[2];
    // Safe: the last readers of the stats passed the barrier before the accumulation.
    load_row_stats<T, kThreads>(bp, b, h, m0, kTile, sLse2, sDelta);
    simt_dot<T>(sT, gk, p.k_stride[2], k_valid, gq, p.q_stride[2], q_valid, p.D, sA, sB);
    simt_dot<T>(dpT, gv, p.v_stride[2], k_valid, gdo, bp.dout_stride[2], q_valid, p.Dv, sA, sB);

    const HeadCtx hc = make_head_ctx(p, b, h);
    const bool check = !tile_inside(p, m0, m_last, n0, n_last, kTile, kTile);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int kl = ty + 16 * r, ql = tx + 16 * c;
        const int64_t i = m0 + ql, j = n0 + kl;
        float dcap = 1.0f;
        const float s = bwd_score(p, hc, i, j, sT[r][c], check, &dcap);
        const float pr = exp2f(fmaf(s, kBwdLog2e, -sLse2[ql]));
        float dp = dpT[r][c], pd = pr;
        if (p.dropout && pr != 0.0f) {
          const float z = dropout_z(p, b, h, i, j);
          pd = pr * z;
          dp *= z;
        }
        sP[kl * kLdP + ql] = pd;
        sdS[kl * kLdP + ql] = pr * (dp - sDelta[ql]) * dcap;
      }
    }
    simt_load_chunk<T>(sC1, gdo, bp.dout_stride[2], q_valid, c0, p.Dv);
    simt_load_chunk<T>(sC2, gq, p.q_stride[2], q_valid, c0, p.D);
    __syncthreads();
    const int kmax = q_valid < kTile ? q_valid : kTile;
    simt_acc(dv, sP, sC1, kmax);
    simt_acc(dk, sdS, sC2, kmax);
    __syncthreads();
  }

  T* gdk = static_cast<T*>(bp.dk) + b * bp.dk_stride[0] + hk * bp.dk_stride[1];
  T* gdv = static_cast<T*>(bp.dv) + b * bp.dv_stride[0] + hk * bp.dv_stride[1];
  simt_store<T>(dk, gdk, bp.dk_stride[2], n0, p.S, c0, p.D, p.scale);
  simt_store<T>(dv, gdv, bp.dv_stride[2], n0, p.S, c0, p.Dv, 1.0f);
}

// Kernel B: dQ (and dbias) of one (b, h, 64-row query tile, 64-column chunk).
template <typename T>
__global__ void __launch_bounds__(bwd_simt_cfg::kThreads) bwd_dq_simt_kernel(const BwdParams bp) {
  using namespace bwd_simt_cfg;
  const KernelParams& p = bp.f;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sA = reinterpret_cast<float*>(smem_raw);
  float* sB = sA + kTile * kLdS;
  float* sdS = sB + kTile * kLdS + kTile * kLdP;  // [query][key]
  float* sC1 = sdS + kTile * kLdP;                // [key][64]: K chunk
  float* sLse2 = sC1 + 2 * kTile * kChunk;
  float* sDelta = sLse2 + kTile;

  int64_t bid = blockIdx.x;
  const int qt = bp.num_q_tiles - 1 - int(bid % bp.num_q_tiles);
  bid /= bp.num_q_tiles;
  const int chunk = int(bid % bp.chunks_b);
  bid /= bp.chunks_b;
  const int h = int(bid % p.H);
  const int b = int(bid / p.H);
  const int hk = h / p.group;
  const int64_t m0 = int64_t(qt) * kTile;
  const int64_t m_last = (m0 + kTile < p.N ? m0 + kTile : p.N) - 1;
  const int c0 = chunk * kChunk;
  const int q_valid = int(p.N - m0);
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;

  const T* gq = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + m0 * p.q_stride[2];
  const T* gdo = static_cast<const T*>(bp.dout) + b * bp.dout_stride[0] + h * bp.dout_stride[1] +
                 m0 * bp.dout_stride[2];
  const T* gk = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* gv = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  const TileRange tiles = key_tile_range(p, m0, m_last, kTile);

  for (int r = threadIdx.x; r < kTile; r += kThreads) sLse2[r] = lse_log2(p, b, h, m0 + r);
  block_rows_delta<T, kThreads>(bp, b, h, m0, kTile, sDelta);  // visible after simt_dot's barrier
  const HeadCtx hc = make_head_ctx(p, b, h);

  float dq[4][4] = {};
  float s[4][4], dp[4][4];
  for (int kt = tiles.first; kt < tiles.end; ++kt) {
    const int64_t n0 = int64_t(kt) * kTile;
    const int64_t n_last = (n0 + kTile < p.S ? n0 + kTile : p.S) - 1;
    const int k_valid = int(p.S - n0);
    simt_dot<T>(s, gq, p.q_stride[2], q_valid, gk + n0 * p.k_stride[2], p.k_stride[2], k_valid, p.D, sA, sB);
    simt_dot<T>(dp, gdo, bp.dout_stride[2], q_valid, gv + n0 * p.v_stride[2], p.v_stride[2], k_valid, p.Dv,
                sA, sB);
    const bool check = !tile_inside(p, m0, m_last, n0, n_last, kTile, kTile);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int ql = ty + 16 * r;
      const int64_t i = m0 + ql;
      float* drow = bp.dbias && chunk == 0 && i < p.N
                        ? bp.dbias + b * bp.dbias_stride[0] + h * bp.dbias_stride[1] + i * bp.dbias_stride[2]
                        : nullptr;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int kl = tx + 16 * c;
        const int64_t j = n0 + kl;
        float dcap = 1.0f;
        const float sc = bwd_score(p, hc, i, j, s[r][c], check, &dcap);
        const float pr = exp2f(fmaf(sc, kBwdLog2e, -sLse2[ql]));
        float d = dp[r][c];
        if (p.dropout && pr != 0.0f) d *= dropout_z(p, b, h, i, j);
        const float ds = pr * (d - sDelta[ql]);
        if (drow != nullptr && j < p.S) drow[j * bp.dbias_stride[3]] = ds;
        sdS[ql * kLdP + kl] = ds * dcap;
      }
    }
    simt_load_chunk<T>(sC1, gk + n0 * p.k_stride[2], p.k_stride[2], k_valid, c0, p.D);
    __syncthreads();
    simt_acc(dq, sdS, sC1, k_valid < kTile ? k_valid : kTile);
    __syncthreads();
  }

  T* gdq = static_cast<T*>(bp.dq) + b * bp.dq_stride[0] + h * bp.dq_stride[1];
  simt_store<T>(dq, gdq, bp.dq_stride[2], m0, p.N, c0, p.D, p.scale);
}

}  // namespace steelattn::cuda_generic
