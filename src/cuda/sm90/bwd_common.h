// Device pieces both sm90 backward kernels use (bwd_kernel.h: D <= 128, keys
// split across warpgroups; bwd_wide_kernel.h: D > 128, head dim split across
// warpgroups): flag dispatch, 16-bit unpacking, warp release of an mbarrier
// stage, and the store of a dK / dV accumulator fragment.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/sm90/bwd_params.h"
#include "cuda/sm90/epilogue.h"  // pack2
#include "cuda/sm90/ptx.h"

namespace steelattn::sm90 {

// Calls f(alibi, masked) with both flags as compile-time constants, so the element
// loops carry no per-element branches for them.
template <class F>
__device__ __forceinline__ void with_flags(bool alibi, bool masked, F&& f) {
  using T = std::true_type;
  using N = std::false_type;
  if (alibi) {
    if (masked) f(T{}, T{}); else f(T{}, N{});
  } else {
    if (masked) f(N{}, T{}); else f(N{}, N{});
  }
}

// The two 16-bit values pack2<Elem>(lo, hi) made, back in fp32 (exact).
template <class Elem>
__device__ __forceinline__ float2 unpack2(uint32_t v);
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t v) {
  return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
}
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t v) {
  __half2 h;
  memcpy(&h, &v, 4);
  return __half22float2(h);
}

// One warp's arrival on an empty barrier, after the whole warp is done with the stage.
__device__ __forceinline__ void warp_release(uint64_t* bar) {
  __syncwarp();
  if (threadIdx.x % 32 == 0) mbar_arrive(bar);
}

// The compiler must not move reads/writes of a fragment across a wgmma fence/wait.
template <class Array>
__device__ __forceinline__ void fence_regs(Array& a) {
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(a) / sizeof(a[0])); ++i) reg_fence(a[i]);
}

// Stores scale * acc, an m64 x NCols accumulator fragment whose rows are keys
// (key0, key0 + 8 for this thread) and whose columns start at col0, into
// row-major [key][col] memory; keys >= S and columns >= d_store (a zero-padded
// head dim) are not written. Fragment element acc[4*jb + 2*r + c] is key
// key0 + 8r, column col0 + 8jb + col_lane + c.
template <int NCols, class Elem>
__device__ __forceinline__ void store_key_rows(Elem* base, int64_t row_stride, int key0, int S, int col0,
                                               int col_lane, int d_store, const float (&acc)[NCols / 2], float scale) {
  const int limit = d_store - col0 - col_lane;  // this thread's columns 8*jb < limit exist
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key0 + 8 * r;
    if (key >= S) continue;
    Elem* dst = base + static_cast<int64_t>(key) * row_stride + col0 + col_lane;
#pragma unroll
    for (int jb = 0; jb < NCols / 8; ++jb)
      if (8 * jb < limit)  // false only past a zero-padded head dim
        *reinterpret_cast<uint32_t*>(dst + 8 * jb) = pack2<Elem>(acc[4 * jb + 2 * r] * scale,
                                                                 acc[4 * jb + 2 * r + 1] * scale);
  }
}

// The CTA's (key block, KV head, batch). Heads go in groups of p.bh_group; inside a
// group the key blocks go in order, each for all the group's heads, so a causal key
// block 0 (the one with the most query blocks) starts before any key block 1 of the
// group: the grid ends on short CTAs (longest first) while a group's Q/dO stays in L2
// across its key blocks. bh_group = 1 is plain key-block-fastest order. A head's key
// blocks still start in increasing order, which the deterministic dQ chain relies on.
__device__ __forceinline__ void bwd_tile(const BwdParams& p, int& n_block, int& hkv, int& b) {
  const int lin = static_cast<int>(blockIdx.x);
  const int per_group = p.bh_group * p.n_blocks;
  const int g = lin / per_group, r = lin - g * per_group;
  const int gsize = min(p.bh_group, p.Hkv * p.B - g * p.bh_group);
  n_block = r / gsize;
  const int bh = g * p.bh_group + (r - n_block * gsize);
  b = bh / p.Hkv;
  hkv = bh - b * p.Hkv;
}

}  // namespace steelattn::sm90
