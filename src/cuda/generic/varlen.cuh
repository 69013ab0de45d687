// Varlen calls on the generic kernels (steelattn.h, AttentionParams::cu_seqlens_q).
// The grid covers an upper bound of the packed tiles, ceil(total / 64) + num_seqs, known
// on the host without reading the lengths (so a call can be captured in a CUDA graph and
// replayed with new lengths of the same totals). Each CTA walks cu_seqlens on the device
// to find its (sequence, tile) and narrows its copy of the parameters to that sequence:
// views at the sequence's offsets, its lengths, its bottom-right diagonal, its ALiBi
// row. CTAs past the last tile exit.
#pragma once

#include <cstdint>

#include "backward_params.h"
#include "kernel_params.h"

namespace steelattn::cuda_generic {

// `tile` in: the CTA's index among all sequences' tiles of `block` rows of cu; out: its
// index inside sequence `seq`. False when the index is past the last sequence's tiles.
__device__ inline bool find_sequence(const int32_t* cu, int num_seqs, int block, int& tile, int& seq) {
  int t = tile;
  for (int s = 0; s < num_seqs; ++s) {
    const int tiles = (cu[s + 1] - cu[s] + block - 1) / block;
    if (t < tiles) {
      tile = t;
      seq = s;
      return true;
    }
    t -= tiles;
  }
  return false;
}

template <typename T>
__device__ inline void narrow_to_sequence(KernelParams& p, int s) {
  const int64_t q0 = p.cu_q[s], k0 = p.cu_k[s];
  const int n = p.cu_q[s + 1] - p.cu_q[s], sk = p.cu_k[s + 1] - p.cu_k[s];
  p.q = static_cast<const T*>(p.q) + q0 * p.q_stride[2];
  p.k = static_cast<const T*>(p.k) + k0 * p.k_stride[2];
  p.v = static_cast<const T*>(p.v) + k0 * p.v_stride[2];
  p.out = static_cast<T*>(p.out) + q0 * p.out_stride[2];
  if (p.lse) p.lse += q0 * p.lse_stride[2];
  if (p.alibi) p.alibi += s * p.alibi_stride[0];
  p.dropout_i0 += q0;  // draws stay keyed in the packed grid (dropout_N, _S: the totals)
  p.dropout_j0 += k0;
  p.diag_offset += sk - n;
  p.N = n;
  p.S = sk;
}

// Forward and backward kernel B: tiles over queries. Kernel A: over keys (by_keys).
template <typename T>
__device__ inline bool enter_sequence(KernelParams& p, int block, bool by_keys, int& tile) {
  int s = 0;
  if (!find_sequence(by_keys ? p.cu_k : p.cu_q, p.num_seqs, block, tile, s)) return false;
  narrow_to_sequence<T>(p, s);
  return true;
}

template <typename T>
__device__ inline bool enter_sequence(BwdParams& bp, int block, bool by_keys, int& tile) {
  KernelParams& p = bp.f;
  int s = 0;
  if (!find_sequence(by_keys ? p.cu_k : p.cu_q, p.num_seqs, block, tile, s)) return false;
  const int64_t q0 = p.cu_q[s], k0 = p.cu_k[s];
  bp.dout = static_cast<const T*>(bp.dout) + q0 * bp.dout_stride[2];
  bp.dq = static_cast<T*>(bp.dq) + q0 * bp.dq_stride[2];
  bp.dk = static_cast<T*>(bp.dk) + k0 * bp.dk_stride[2];
  bp.dv = static_cast<T*>(bp.dv) + k0 * bp.dv_stride[2];
  if (bp.dlse) bp.dlse += q0 * bp.dlse_stride[2];
  narrow_to_sequence<T>(p, s);
  return true;
}

}  // namespace steelattn::cuda_generic
