// Host-side helpers shared by the generic forward and backward entry points
// (generic_api.cu, backward_api.cu): broadcast strides, the forward's kernel
// parameters from a validated AttentionParams, a device guard, CUDA errors.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda/device.h"
#include "kernel_params.h"
#include "steelattn/detail/philox.h"
#include "steelattn/steelattn.h"

namespace steelattn::cuda_generic {

// Strides of `t` as `n` logical dims, size-1 dims broadcast (stride 0). A
// tensor with at least n dims maps its leading n dims (lse given as
// [B,H,N,1] works); one with fewer is right-aligned like numpy broadcasting
// (an ALiBi [H] tensor becomes [B,H] with b-stride 0, a bias [N,S] becomes
// [B,H,N,S] with zero b and h strides).
inline void broadcast_strides(const TensorRef& t, int n, int64_t* out) {
  for (int d = 0; d < n; ++d) out[d] = 0;
  const int shift = t.ndim >= n ? 0 : n - t.ndim;
  for (int d = shift; d < n; ++d) {
    const int src = d - shift;
    out[d] = t.shape[src] == 1 ? 0 : t.stride[src];
  }
}

// The three leading strides of a 4-d tensor (size-1 dims broadcast).
inline void strides3(const TensorRef& t, int64_t (&out)[3]) {
  int64_t tmp[4];
  broadcast_strides(t, 4, tmp);
  for (int d = 0; d < 3; ++d) out[d] = tmp[d];
}

// cp.async moves 16 bytes: the base and every row start must be 16-byte aligned.
inline bool rows_16b_aligned(const TensorRef& t, const int64_t (&stride)[3]) {
  const int64_t elems = t.dtype == DType::f32 ? 4 : 8;
  if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d)
    if (stride[d] % elems != 0) return false;
  return true;
}

// Tiles of `block` rows over `len` rows: for a varlen call a bound over all sequences
// (each adds at most one partial tile), so the grid needs no lengths from the device.
inline int64_t tile_count(const AttentionParams& p, int64_t len, int64_t block) {
  return (len + block - 1) / block + (p.varlen() ? p.num_seqs : 0);
}

// Tile counts (num_q_tiles, num_dv_chunks) are the launcher's to set.
inline KernelParams make_kernel_params(const AttentionParams& p) {
  KernelParams k{};
  int64_t tmp[4];
  k.q = p.q.data;
  k.k = p.k.data;
  k.v = p.v.data;
  broadcast_strides(p.q, 4, tmp);
  for (int d = 0; d < 3; ++d) k.q_stride[d] = tmp[d];
  broadcast_strides(p.k, 4, tmp);
  for (int d = 0; d < 3; ++d) k.k_stride[d] = tmp[d];
  broadcast_strides(p.v, 4, tmp);
  for (int d = 0; d < 3; ++d) k.v_stride[d] = tmp[d];
  k.out = p.out.data;
  broadcast_strides(p.out, 4, tmp);
  for (int d = 0; d < 3; ++d) k.out_stride[d] = tmp[d];
  k.lse = static_cast<float*>(p.lse.data);
  if (p.lse.present()) broadcast_strides(p.lse, 3, k.lse_stride);
  k.attn = static_cast<float*>(p.attn_weights.data);
  if (p.attn_weights.present()) broadcast_strides(p.attn_weights, 4, k.attn_stride);

  k.B = int32_t(p.B);
  k.H = int32_t(p.H);
  k.Hkv = int32_t(p.Hkv);
  k.group = int32_t(p.H / p.Hkv);
  k.N = int32_t(p.N);
  k.S = int32_t(p.S);
  k.D = int32_t(p.D);
  k.Dv = int32_t(p.Dv);

  k.scale = p.scale;
  k.softcap = p.softcap;
  k.alibi = static_cast<const float*>(p.alibi_slopes.data);
  if (k.alibi) broadcast_strides(p.alibi_slopes, 2, k.alibi_stride);
  k.bias = static_cast<const float*>(p.bias.data);
  if (k.bias) broadcast_strides(p.bias, 4, k.bias_stride);
  k.mask = static_cast<const uint8_t*>(p.bool_mask.data);
  if (k.mask) broadcast_strides(p.bool_mask, 4, k.mask_stride);
  k.diag_offset = p.diag_offset;
  k.window_left = p.window_left;
  k.window_right = p.window_right;

  k.dropout = p.dropout_p > 0.0f;
  k.dropout_threshold24 = detail::dropout_threshold24(p.dropout_p);
  k.dropout_scale = p.dropout_p < 1.0f ? 1.0f / (1.0f - p.dropout_p) : 0.0f;
  k.dropout_seed = p.dropout_seed;
  k.dropout_offset = p.dropout_offset;
  k.dropout_b0 = p.dropout_b0;
  k.dropout_i0 = p.dropout_i0;
  k.dropout_j0 = p.dropout_j0;
  k.dropout_N = p.dropout_N < 0 ? p.N : p.dropout_N;
  k.dropout_S = p.dropout_S < 0 ? p.S : p.dropout_S;

  k.cu_q = static_cast<const int32_t*>(p.cu_seqlens_q.data);
  k.cu_k = static_cast<const int32_t*>(p.cu_seqlens_k.data);
  k.num_seqs = int32_t(p.num_seqs);

  k.q_vec = rows_16b_aligned(p.q, k.q_stride);
  k.k_vec = rows_16b_aligned(p.k, k.k_stride);
  k.v_vec = rows_16b_aligned(p.v, k.v_stride);
  return k;
}

using cuda_device::DeviceGuard;  // (cuda/device.h)

inline Status cuda_status(const char* what, cudaError_t err) {
  return Status::Error(std::string("steelattn cuda_generic: ") + what + ": " +
                       cudaGetErrorString(err));
}

}  // namespace steelattn::cuda_generic
