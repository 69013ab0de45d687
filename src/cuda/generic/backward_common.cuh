// Pieces shared by the generic backward kernels (tensor-core and SIMT):
// the score recomputation with its softcap derivative, the band range seen
// from a key tile, and D_i = rowsum(dO_i * O_i) - dlse_i with its stash.
#pragma once

#include <cmath>
#include <cstdint>

#include "steelattn/detail/philox.h"
#include "backward_params.h"
#include "kernel_params.h"
#include "mask_policy.cuh"
#include "mma_sm80.cuh"
#include "score_mod.cuh"

namespace steelattn::cuda_generic {

constexpr float kBwdLog2e = 1.4426950408889634f;

// Per-(b, h) constants of the score modifiers.
struct HeadCtx {
  int64_t b, h;
  float alibi_slope;     // 0 when ALiBi is off
  const float* bias;     // bias[b, h, :, :] or null
  const uint8_t* mask;   // mask[b, h, :, :] or null
};

__device__ __forceinline__ HeadCtx make_head_ctx(const KernelParams& p, int64_t b, int64_t h) {
  HeadCtx c;
  c.b = b;
  c.h = h;
  c.alibi_slope = p.alibi ? p.alibi[b * p.alibi_stride[0] + h * p.alibi_stride[1]] : 0.0f;
  c.bias = p.bias ? p.bias + b * p.bias_stride[0] + h * p.bias_stride[1] : nullptr;
  c.mask = p.mask ? p.mask + b * p.mask_stride[0] + h * p.mask_stride[1] : nullptr;
  return c;
}

// final_score (score_mod.cuh) step for step, so P = exp(score - lse) is the
// forward's P bit for bit; also returns dcap = d(cap*tanh(t))/d(cap*t) =
// 1 - tanh^2(t) (left untouched without softcap). `check` = false skips the
// bounds and band tests for tiles known to lie inside both.
__device__ __forceinline__ float bwd_score(const KernelParams& p, const HeadCtx& c, int64_t i,
                                           int64_t j, float dot, bool check, float* dcap) {
  if (check && (i >= p.N || j >= p.S || !band_visible(p, i, j))) return -INFINITY;
  if (c.mask && c.mask[i * p.mask_stride[2] + j * p.mask_stride[3]] == 0) return -INFINITY;
  float s = dot * p.scale;
  if (p.softcap > 0.0f) {
    const float th = tanhf(s / p.softcap);
    s = p.softcap * th;
    *dcap = 1.0f - th * th;
  }
  if (p.alibi) {
    const int64_t d = i + p.diag_offset - j;
    s -= c.alibi_slope * float(d < 0 ? -d : d);
  }
  if (c.bias) s += c.bias[i * p.bias_stride[2] + j * p.bias_stride[3]];
  return s;
}

// Element-wise modes of a score tile, CTA-uniform: kFast = in bounds, inside the
// band, no modifier, no dropout (the common case, a few instructions per
// element); kBand = the same with the bounds and band test; kGeneral = anything.
enum BwdElemMode : int { kFast = 0, kBand = 1, kGeneral = 2 };

// band_visible and the bounds test as two int64 compares per element.
struct BandTest {
  int64_t lo_rel, hi_rel;  // j - i must lie in [lo_rel, hi_rel]
  int64_t N, S;
  __device__ __forceinline__ bool operator()(int64_t i, int64_t j) const {
    return i < N && j < S && j - i >= lo_rel && j - i <= hi_rel;
  }
};
__device__ __forceinline__ BandTest make_band_test(const KernelParams& p) {
  constexpr int64_t kFar = int64_t(1) << 62;
  return {p.window_left < 0 ? -kFar : p.diag_offset - p.window_left,
          p.window_right < 0 ? kFar : p.diag_offset + p.window_right, p.N, p.S};
}
__device__ __forceinline__ bool bwd_plain(const KernelParams& p) {
  return !p.dropout && !(p.softcap > 0.0f) && !p.alibi && !p.bias && !p.mask;
}

// True when every (i, j) of the tile is in bounds and inside the band.
__device__ __forceinline__ bool tile_inside(const KernelParams& p, int64_t m0, int64_t m_last,
                                            int64_t n0, int64_t n_last, int bm, int bn) {
  if (m0 + bm > p.N || n0 + bn > p.S) return false;
  return (p.window_left < 0 || n0 >= m_last + p.diag_offset - p.window_left) &&
         (p.window_right < 0 || n_last <= m0 + p.diag_offset + p.window_right);
}

// Queries that see at least one key of [n0, n_last]: the band read from the key side,
// j - off - right <= i <= j - off + left. Empty when hi < lo.
__device__ __forceinline__ KeyRange band_query_range(const KernelParams& p, int64_t n0,
                                                     int64_t n_last) {
  int64_t lo = 0, hi = int64_t(p.N) - 1;
  if (p.window_right >= 0) {
    const int64_t l = n0 - p.diag_offset - p.window_right;
    lo = l > lo ? l : lo;
  }
  if (p.window_left >= 0) {
    const int64_t h = n_last - p.diag_offset + p.window_left;
    hi = h < hi ? h : hi;
  }
  return {lo, hi};
}

// D_i = sum_e dO[i,e] * O[i,e] - dlse[i], by one whole warp (lanes stride Dv).
template <typename T>
__device__ __forceinline__ float warp_row_delta(const BwdParams& bp, int64_t b, int64_t h,
                                                int64_t i, int lane) {
  const KernelParams& p = bp.f;
  const T* o = static_cast<const T*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] +
               i * p.out_stride[2];
  const T* g = static_cast<const T*>(bp.dout) + b * bp.dout_stride[0] + h * bp.dout_stride[1] +
               i * bp.dout_stride[2];
  float acc = 0.0f;
  for (int e = lane; e < p.Dv; e += 32) acc = fmaf(Elem<T>::to_float(g[e]), Elem<T>::to_float(o[e]), acc);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (bp.dlse) acc -= bp.dlse[b * bp.dlse_stride[0] + h * bp.dlse_stride[1] + i * bp.dlse_stride[2]];
  return acc;
}

// D_i of rows [m0, m0 + rows) of head h into sDelta[0, rows) (0 past N); all
// threads of the block take part. The caller synchronises before reading.
template <typename T, int kThreads>
__device__ __forceinline__ void block_rows_delta(const BwdParams& bp, int64_t b, int64_t h,
                                                 int64_t m0, int rows, float* sDelta) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int r = warp; r < rows; r += kThreads / 32) {
    const int64_t i = m0 + r;
    const float d = i < bp.f.N ? warp_row_delta<T>(bp, b, h, i, lane) : 0.0f;
    if (lane == 0) sDelta[r] = d;
  }
}

// The stash: D_i lives in dq[b, h, i, 0..] (as raw fp32 bits: one float, or the two
// 16-bit halves of a 16-bit row) from the prep kernel until kernel B overwrites it.
template <typename T>
__device__ __forceinline__ void stash_delta(const BwdParams& bp, int64_t b, int64_t h, int64_t i,
                                            float d) {
  T* row = static_cast<T*>(bp.dq) + b * bp.dq_stride[0] + h * bp.dq_stride[1] + i * bp.dq_stride[2];
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float*>(row) = d;
  } else {
    const uint32_t u = __float_as_uint(d);
    uint16_t* r16 = reinterpret_cast<uint16_t*>(row);
    r16[0] = uint16_t(u & 0xffffu);
    r16[1] = uint16_t(u >> 16);
  }
}
template <typename T>
__device__ __forceinline__ float load_stashed_delta(const BwdParams& bp, int64_t b, int64_t h,
                                                    int64_t i) {
  const T* row = static_cast<const T*>(bp.dq) + b * bp.dq_stride[0] + h * bp.dq_stride[1] +
                 i * bp.dq_stride[2];
  if constexpr (sizeof(T) == 4) {
    return *reinterpret_cast<const volatile float*>(row);
  } else {
    const volatile uint16_t* r16 = reinterpret_cast<const volatile uint16_t*>(row);
    return __uint_as_float(uint32_t(r16[0]) | (uint32_t(r16[1]) << 16));
  }
}

// lse in log2 units for P = exp2(score * log2e - lse2); a row that saw no key
// (lse = -inf) gets +inf so that P = 0 everywhere, never NaN.
__device__ __forceinline__ float lse_log2(const KernelParams& p, int64_t b, int64_t h, int64_t i) {
  if (i >= p.N) return INFINITY;
  const float l = p.lse[b * p.lse_stride[0] + h * p.lse_stride[1] + i * p.lse_stride[2]];
  return l == -INFINITY ? INFINITY : l * kBwdLog2e;
}

// Per-row stage data of kernel A (lse2 and D_i of 64 query rows) into shared memory.
template <typename T, int kThreads>
__device__ __forceinline__ void load_row_stats(const BwdParams& bp, int64_t b, int64_t h,
                                               int64_t m0, int rows, float* sLse2, float* sDelta) {
  for (int r = threadIdx.x; r < rows; r += kThreads) sLse2[r] = lse_log2(bp.f, b, h, m0 + r);
  if (bp.delta_inline) {
    block_rows_delta<T, kThreads>(bp, b, h, m0, rows, sDelta);
  } else {
    for (int r = threadIdx.x; r < rows; r += kThreads)
      sDelta[r] = m0 + r < bp.f.N ? load_stashed_delta<T>(bp, b, h, m0 + r) : 0.0f;
  }
}

// Prep kernel: one warp per row computes D_i and stashes it in dq.
template <typename T>
__global__ void __launch_bounds__(256) bwd_delta_stash_kernel(const BwdParams bp) {
  const int lane = threadIdx.x & 31;
  const int64_t rows = int64_t(bp.f.B) * bp.f.H * bp.f.N;
  const int64_t row = int64_t(blockIdx.x) * 8 + (threadIdx.x >> 5);
  if (row >= rows) return;  // warp-uniform
  const int64_t i = row % bp.f.N, bh = row / bp.f.N;
  const int64_t h = bh % bp.f.H, b = bh / bp.f.H;
  const float d = warp_row_delta<T>(bp, b, h, i, lane);
  if (lane == 0) stash_delta<T>(bp, b, h, i, d);
}

// Dropout multiplier Z of element (b, h, i, j): 1/(1-p) when kept, 0 when dropped.
__device__ __forceinline__ float dropout_z(const KernelParams& p, int64_t b, int64_t h, int64_t i,
                                           int64_t j) {
  const uint64_t idx = detail::dropout_index_in_frame(p, b, h, i, j);
  return detail::dropout_keep(idx, p.dropout_seed, p.dropout_offset, p.dropout_threshold24)
             ? p.dropout_scale
             : 0.0f;
}

}  // namespace steelattn::cuda_generic
