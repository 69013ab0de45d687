// Kernel-side parameters of the generic CUDA backward kernels.
//
// The forward's KernelParams (q, k, v, out = O, lse, modifiers, band, dropout)
// plus the gradient tensors. Built once on the host (backward_api.cu) from a
// validated AttentionParams and passed by value to every backward kernel.
// Strides are in elements, last dims contiguous.
#pragma once

#include <cstdint>

#include "kernel_params.h"

namespace steelattn::cuda_generic {

struct BwdParams {
  KernelParams f;  // forward fields; f.out is O, f.lse the forward's (natural-log) LSE

  const void* dout;  // [B,H,N,Dv], dtype of q
  int64_t dout_stride[3];
  void* dq;  // [B,H,N,D]; also holds the stashed D_i between the prep kernel and kernel A
  int64_t dq_stride[3];
  void* dk;  // [B,Hkv,S,D]
  int64_t dk_stride[3];
  void* dv;  // [B,Hkv,S,Dv]
  int64_t dv_stride[3];
  float* dbias;  // [B,H,N,S] fp32, null: not wanted
  int64_t dbias_stride[4];
  const float* dlse;  // [B,H,N] fp32, null: absent
  int64_t dlse_stride[3];

  // Work decomposition.
  int32_t num_k_tiles;  // kernel A: key tiles per (b, kv head)
  int32_t num_q_tiles;  // kernel B: query tiles per (b, h)
  int32_t chunks_a;     // kernel A: dK/dV column chunks (recompute S, dP per chunk)
  int32_t chunks_b;     // kernel B: dQ column chunks

  // Kernel A computes D_i itself instead of reading the stash in dq (16-bit dq
  // rows with D == 1 are too narrow to hold an fp32 value).
  bool delta_inline;
  // Double-buffer the streamed tiles (false where shared memory is too small).
  bool two_stage;
  bool dout_vec;  // dout rows 16-byte aligned (cp.async)
};

}  // namespace steelattn::cuda_generic
