// Kernel-side parameters of the generic CUDA forward kernels.
//
// One POD struct, built once on the host from a validated AttentionParams and
// passed by value to every kernel. Strides are in elements; broadcast
// dimensions of the optional tensors carry stride 0, so the kernels never
// branch on shapes, only on "is this pointer null".
#pragma once

#include <cstdint>

namespace steelattn::cuda_generic {

struct KernelParams {
  // Inputs: q [B,H,N,D], k [B,Hkv,S,D], v [B,Hkv,S,Dv]; last dim contiguous.
  const void* q;
  const void* k;
  const void* v;
  int64_t q_stride[3];  // b, h, n
  int64_t k_stride[3];  // b, hkv, s
  int64_t v_stride[3];  // b, hkv, s

  // Outputs: out [B,H,N,Dv] (dtype of q); lse [B,H,N] fp32 (may be null);
  // attn [B,H,N,S] fp32 pre-dropout probabilities (may be null).
  void* out;
  float* lse;
  float* attn;
  int64_t out_stride[3];   // b, h, n
  int64_t lse_stride[3];   // b, h, n
  int64_t attn_stride[4];  // b, h, n, s

  int32_t B, H, Hkv, group;  // group = H / Hkv: query heads per kv head
  int32_t N, S, D, Dv;

  // Score modifiers, in this order: scale, softcap, ALiBi, bias, bool mask, band.
  float scale;
  float softcap;       // <= 0: off
  const float* alibi;  // [B,H] slopes, null: off
  int64_t alibi_stride[2];
  const float* bias;  // [B,H,N,S], null: off
  int64_t bias_stride[4];
  const uint8_t* mask;  // [B,H,N,S] keep-mask bytes, null: off
  int64_t mask_stride[4];
  int64_t diag_offset;
  int64_t window_left;   // < 0: unbounded
  int64_t window_right;  // < 0: unbounded

  // Dropout: keep when philox draw >= threshold24; kept values scaled by
  // dropout_scale (1/(1-p), or 0 when p >= 1 so nothing becomes inf*0).
  bool dropout;
  uint32_t dropout_threshold24;
  float dropout_scale;
  uint64_t dropout_seed;
  uint64_t dropout_offset;
  // The grid draws are keyed in (AttentionParams::dropout_b0 ...); varlen.cuh moves
  // dropout_i0 / dropout_j0 to the CTA's sequence.
  int64_t dropout_b0, dropout_i0, dropout_j0, dropout_N, dropout_S;

  // Work decomposition: blockIdx.x -> (q tile, Dv chunk, h, b).
  int32_t num_q_tiles;
  int32_t num_dv_chunks;

  // Varlen (varlen.cuh): int32 [num_seqs + 1] running lengths on the device, or null.
  // The tile counts above are then bounds over all sequences and B = 1.
  const int32_t* cu_q;
  const int32_t* cu_k;
  int32_t num_seqs;

  // True when q/k/v rows start 16-byte aligned, so tiles may load with cp.async.
  bool q_vec, k_vec, v_vec;
};

}  // namespace steelattn::cuda_generic
