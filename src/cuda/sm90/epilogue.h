// Epilogue: normalise O by the row sum, write O [B, H, N, D] and LSE
// [B, H, N] with plain strided stores straight from the accumulator fragment.
//
// The other way, O staged in smem and stored by TMA, exists for dense unpacked tiles with
// two Q stages (mainloop.h, store_o_smem: the tile's own Q buffer holds O, released to the
// producer once the stores have read it), the default there; these stores stay the
// reference (STEELATTN_SM90_O_TMA=0). Why it pays: per-instruction stall samples at D128
// N1k put ~3% of the forward on the next tile's code waiting for the address registers
// these 32 stores per thread still hold (NOTES.md, session 5); measured, a query tile's
// fixed cost fell from 16.9 to 11.0 ns (session 6). Varlen tiles (rows past a sequence
// belong to the next one) and GQA-packed tiles (rows of several heads) keep these stores.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "cuda/sm90/params.h"

namespace steelattn::sm90 {

template <class Elem>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));  // lo lands in the low half
  return r;
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

template <int D, class Elem>
struct Epilogue {
  Elem* out_bh;   // out[b, h, 0, 0]
  float* lse_bh;  // lse[b, h, 0] or null
  int64_t o_stride_n, lse_stride_n;
  int N, d_store, row0, col_lane;

  __device__ Epilogue(const FwdParams& p, int b, int h, int row0_, int lane)
      : out_bh(static_cast<Elem*>(p.out) + b * p.o_stride_b + h * p.o_stride_h),
        lse_bh(p.lse ? p.lse + b * p.lse_stride_b + h * p.lse_stride_h : nullptr),
        o_stride_n(p.o_stride_n),
        lse_stride_n(p.lse_stride_n),
        N(p.N),
        d_store(p.d_store),
        row0(row0_),
        col_lane(2 * (lane % 4)) {}

  // Varlen: rows are a sequence's, starting at packed row q0, n of them.
  __device__ __forceinline__ void to_sequence(int q0, int n) {
    out_bh += static_cast<int64_t>(q0) * o_stride_n;
    if (lse_bh != nullptr) lse_bh += static_cast<int64_t>(q0) * lse_stride_n;
    N = n;
  }

  // o: this thread's m64 x D fragment, o[4*jb + e] at row row0 + 8*(e>>1),
  // column 8*jb + col_lane + (e&1).
  __device__ __forceinline__ void store(const float (&o)[D / 2], const float (&inv)[2], const float (&lse)[2]) const {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + 8 * r;
      if (row >= N) continue;
      Elem* dst = out_bh + row * o_stride_n + col_lane;
      if (d_store == D) {  // the common case: every column, fully unrolled, no per-column test
#pragma unroll
        for (int jb = 0; jb < D / 8; ++jb)
          *reinterpret_cast<uint32_t*>(dst + 8 * jb) =
              pack2<Elem>(o[4 * jb + 2 * r] * inv[r], o[4 * jb + 2 * r + 1] * inv[r]);
      } else {
#pragma unroll
        for (int jb = 0; jb < D / 8; ++jb) {
          if (8 * jb + col_lane >= d_store) break;  // zero-padded head-dim columns (d_store is a multiple of 8)
          *reinterpret_cast<uint32_t*>(dst + 8 * jb) =
              pack2<Elem>(o[4 * jb + 2 * r] * inv[r], o[4 * jb + 2 * r + 1] * inv[r]);
        }
      }
      if (lse_bh != nullptr && col_lane == 0) lse_bh[row * lse_stride_n] = lse[r];
    }
  }

  // LSE only (O went out through shared memory).
  __device__ __forceinline__ void store_lse(const float (&lse)[2]) const {
    if (lse_bh == nullptr || col_lane != 0) return;
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (row0 + 8 * r < N) lse_bh[(row0 + 8 * r) * lse_stride_n] = lse[r];
  }

  // A tile where no query sees any key: O = 0, LSE = -inf.
  __device__ void store_empty() const {
#pragma unroll 1
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + 8 * r;
      if (row >= N) continue;
      Elem* dst = out_bh + row * o_stride_n + col_lane;
      for (int jb = 0; jb < D / 8 && 8 * jb + col_lane < d_store; ++jb) *reinterpret_cast<uint32_t*>(dst + 8 * jb) = 0u;
      if (lse_bh != nullptr && col_lane == 0) lse_bh[row * lse_stride_n] = -INFINITY;
    }
  }
};

// The same for a GQA-packed tile, whose thread rows r = 0, 1 are query
// qrow[r] of head qhead[r] (params.h): one O / LSE address per row. Built
// before the mainloop like Epilogue, so it keeps only indices; the addresses
// are formed in store() (holding four pointers across the mainloop spilled at
// D >= 192 with band + softcap).
template <int D, class Elem>
struct EpiloguePacked {
  const FwdParams& p;
  int b, qhead[2], qrow[2], col_lane;

  __device__ EpiloguePacked(const FwdParams& p_, int b_, const int (&qhead_)[2], const int (&qrow_)[2], int lane)
      : p(p_), b(b_), qhead{qhead_[0], qhead_[1]}, qrow{qrow_[0], qrow_[1]}, col_lane(2 * (lane % 4)) {}

  __device__ __forceinline__ Elem* out_row(int r) const {
    return static_cast<Elem*>(p.out) + b * p.o_stride_b + qhead[r] * p.o_stride_h + qrow[r] * p.o_stride_n +
           col_lane;
  }
  __device__ __forceinline__ float* lse_row(int r) const {
    return p.lse + b * p.lse_stride_b + qhead[r] * p.lse_stride_h + qrow[r] * p.lse_stride_n;
  }

  __device__ __forceinline__ void store(const float (&o)[D / 2], const float (&inv)[2], const float (&lse)[2]) const {
    const int d_store = p.d_store;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (qrow[r] >= p.N) continue;
      Elem* dst = out_row(r);
      if (d_store == D) {
#pragma unroll
        for (int jb = 0; jb < D / 8; ++jb)
          *reinterpret_cast<uint32_t*>(dst + 8 * jb) =
              pack2<Elem>(o[4 * jb + 2 * r] * inv[r], o[4 * jb + 2 * r + 1] * inv[r]);
      } else {
#pragma unroll
        for (int jb = 0; jb < D / 8; ++jb) {
          if (8 * jb + col_lane >= d_store) break;
          *reinterpret_cast<uint32_t*>(dst + 8 * jb) =
              pack2<Elem>(o[4 * jb + 2 * r] * inv[r], o[4 * jb + 2 * r + 1] * inv[r]);
        }
      }
      if (p.lse != nullptr && col_lane == 0) *lse_row(r) = lse[r];
    }
  }

  __device__ void store_empty() const {
    const int d_store = p.d_store;
#pragma unroll  // (not 1: qrow[r] with a runtime r would go to local memory)
    for (int r = 0; r < 2; ++r) {
      if (qrow[r] >= p.N) continue;
      Elem* dst = out_row(r);
      for (int jb = 0; jb < D / 8 && 8 * jb + col_lane < d_store; ++jb) *reinterpret_cast<uint32_t*>(dst + 8 * jb) = 0u;
      if (p.lse != nullptr && col_lane == 0) *lse_row(r) = -INFINITY;
    }
  }
};

}  // namespace steelattn::sm90
