// Parameters, tile configuration and shared-memory layout of the sm90 backward
// kernel (FA3's design, HOPPER_ATTENTION.md section 4). See
// docs/benchmarks/NOTES-sm90-bwd.md.
#pragma once

#include <cuda.h>  // CUtensorMap
#include <cstdint>

namespace steelattn::sm90 {

struct BwdParams {
  // Rank-4 TMA maps over (d, seq, head, batch), 128B swizzle, box inner 64 elems.
  CUtensorMap tma_q;   // q    [B, H,   N, D], box (64, BM)
  CUtensorMap tma_do;  // dout [B, H,   N, D], box (64, BM)
  CUtensorMap tma_k;   // k    [B, Hkv, S, D], box (64, BN)
  CUtensorMap tma_v;   // v    [B, Hkv, S, D], box (64, BN)

  // Workspace (bwd_launch.cu): [B*H, n_pad] fp32 rows, padded rows hold lse2 = +inf, dsum = 0.
  const float* lse2;  // lse * log2(e); +inf where lse = -inf (P = 0)
  const float* dsum;  // rowsum(dO * O) - dlse
  float* dq_acc;      // [B*H, n_pad, D] fp32 in 64x64 blocks (below), zeroed by the preprocess, bulk reduce-added
  int* dq_sem;        // deterministic kernels: one counter per dQ block (its index in dq_acc), zeroed by the host

  void* dk;
  int64_t dk_sb, dk_sh, dk_sn;
  void* dv;
  int64_t dv_sb, dv_sh, dv_sn;
  const float* alibi;  // [B, H] slopes or null
  int64_t alibi_sb, alibi_sh;

  int B, H, Hkv, N, S, group, n_pad;
  float scale;        // s = scale * q.k
  float scale_log2;   // scale * log2(e)
  float softcap;      // > 0 only in the Softcap instantiation
  float cap_arg;      // scale / softcap
  int diag_offset, window_left, window_right;  // clamped to +/-2^30 (params.h kUnbounded)
};

// Two consumer warpgroups split the key tile (64 keys each, the wgmma M of the
// swapped S^T = K Q^T); one producer warpgroup (one TMA thread).
constexpr int kBwdConsumerWGs = 2;
constexpr int kBwdThreads = 128 * (1 + kBwdConsumerWGs);
constexpr int kBwdBlockN = 64 * kBwdConsumerWGs;  // 128 keys per CTA
constexpr int kBwdStages = 2;                     // Q/dO/lse/dsum ring
constexpr int kBwdProducerRegs = 24;
constexpr int kBwdConsumerRegs = 240;
constexpr int kBwdDsBarrier = 1;  // named barrier: both WGs' dS tile written
constexpr int kBwdDqBarrier = 2;  // + warpgroup: its dQ quarter staged in smem

// dQ accumulation: each warpgroup stages its 64x64 fp32 dQ quarter in smem and one
// thread bulk-reduce-adds it (cp.reduce.async.bulk .add.f32) into a tile-major
// workspace: block ((bh * n_pad/BM + m_block) * 2 + wg) of 64x64 floats, quarter
// wg = rows wg*64.. (BM 128) or columns wg*64.. (BM 64). Inside a block the floats
// keep the wgmma accumulator order, float4 (jb, t) = (jb * 128 + t) holding thread
// t's dq[4jb .. 4jb+3], so each warp stores 512 contiguous bytes (no bank
// conflicts); bwd_dq_block_offset() maps (row, col) back.

// Offset of (row, col) of a 64x64 dQ quarter inside its workspace block. Thread t of
// the warpgroup holds rows 16*(t/32) + (t%32)/4 (+8) and columns 8*jb + 2*(t%4) (+1).
__host__ __device__ constexpr int bwd_dq_block_offset(int row, int col) {
  return ((col / 8) * 128 + (row / 16) * 32 + (row % 8) * 4 + (col % 8) / 2) * 4 + ((row / 8) % 2) * 2 + col % 2;
}

// BM (query rows per step). Registers per consumer thread: S^T + dP^T (BM/2 each)
// + dK + dV (D/2 each): D64/BM128: 64+64+32+32; D128/BM64: 32+32+64+64.
template <int D>
struct BwdTile {
  static constexpr int kBlockM = D == 64 ? 128 : 64;
};

template <int D, class Elem>
struct BwdSmem {
  static constexpr int BM = BwdTile<D>::kBlockM;
  static constexpr int BN = kBwdBlockN;
  // Every tile: D/64 (or BM/64) column blocks of (rows x 128 B), 128B swizzled.
  alignas(1024) Elem k[BN * D];
  alignas(1024) Elem v[BN * D];
  alignas(1024) Elem q[kBwdStages][BM * D];
  alignas(1024) Elem dout[kBwdStages][BM * D];
  alignas(1024) Elem ds[2][BN * BM];  // dS^T [keys][queries], double-buffered
  alignas(1024) float dq[kBwdConsumerWGs][64 * 64];  // dQ quarters on their way to the bulk reduce
  alignas(16) float lse2[kBwdStages][BM];
  alignas(16) float dsum[kBwdStages][BM];
  uint64_t kv_full;
  uint64_t full[kBwdStages], empty[kBwdStages];
  uint64_t dq_full[kBwdConsumerWGs], dq_empty[kBwdConsumerWGs];  // deterministic: consumers <-> dQ writer
};

}  // namespace steelattn::sm90
