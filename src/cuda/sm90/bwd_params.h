// Parameters, tile configurations and shared-memory layouts of the sm90 backward
// kernels (FA3's design, HOPPER_ATTENTION.md section 4): bwd_kernel.h for head
// dims <= 128 (keys split across the consumer warpgroups), bwd_wide_kernel.h for
// 192 and 256 (head dim split across them). See docs/benchmarks/NOTES-sm90-bwd.md.
#pragma once

#include <cuda.h>  // CUtensorMap
#include <cstdint>

#include "cuda/sm90/block_mask.h"

namespace steelattn::sm90 {

// Varlen: what a CTA of the backward needs to know of its virtual key block (bwd_kernel.h,
// resolve_key_block): its sequence, the block's index inside it (-1: a hole), the
// sequence's first packed key row and keys, first packed query row and queries.
struct alignas(16) BwdKeyBlock {
  int seq, block, k0, s;
  int q0, n, pad0, pad1;
};

struct BwdParams {
  // Rank-4 TMA maps over (d, seq, head, batch), box (column block, rows): 64
  // elements with 128B swizzle, or 32 with 64B (the wide kernel's BwdWideTile).
  CUtensorMap tma_q;   // q    [B, H,   N, D], box (64, BM)
  CUtensorMap tma_do;  // dout [B, H,   N, D], box (64, BM)
  CUtensorMap tma_k;   // k    [B, Hkv, S, D], box (64, BN)
  CUtensorMap tma_v;   // v    [B, Hkv, S, D], box (64, BN)

  // Workspace (bwd_launch.cu): [B*H, n_pad] fp32 rows, padded rows hold lse2 = +inf, dsum = 0.
  const float* lse2;  // lse * log2(e); +inf where lse = -inf (P = 0)
  const float* dsum;  // rowsum(dO * O) - dlse
  float* dq_acc;      // [B*H, n_pad, KD] fp32 in blocks (below), zeroed by the preprocess, reduce-added
  int* dq_sem;        // deterministic kernels: one counter per dQ block (its index in dq_acc), zeroed by the preprocess

  void* dk;
  int64_t dk_sb, dk_sh, dk_sn;
  void* dv;
  int64_t dv_sb, dv_sh, dv_sn;
  const float* alibi;  // [B, H] slopes or null
  int64_t alibi_sb, alibi_sh;

  int B, H, Hkv, N, S, group, n_pad;
  int n_blocks;  // key blocks per head (the grid is n_blocks * Hkv * B CTAs, see bwd_tile)
  int bh_group;  // (batch, KV head) pairs per launch-order group (bwd_tile)
  int d_store_k, d_store_v;  // real head dims of q/k and v (< the kernel's when zero-padded)
  bool deterministic;        // wide kernel only (the narrow one takes it as a template argument)
  bool dkv_bulk;             // dK / dV stored by bulk copies of staged rows (store_dkv_bulk), else from registers
  bool softcap_on;           // wide kernel only
  float scale;        // s = scale * q.k
  float scale_log2;   // scale * log2(e)
  float softcap;      // > 0 only in the Softcap instantiation
  float cap_arg;      // scale / softcap
  int diag_offset, window_left, window_right;  // clamped to +/-2^30 (params.h kUnbounded)

  // Block-sparse calls (the narrow kernel's Sparse instantiations; block_mask.h).
  BlockMaskView bm;

  // Varlen calls (the narrow kernel's Varlen instantiations; B = 1, packed [1, H, total, D]
  // views): CTAs are virtual key blocks of 128 (varlen.h), n_blocks = total_k / 128 +
  // num_seqs; the workspace rows of a head are virtual query rows, sequence i's from
  // (cu_q[i] / 128 + i) * 128, n_pad = (total_q / 128 + num_seqs) * 128.
  const int32_t* cu_q;
  const int32_t* cu_k;
  int num_seqs;

  // Dense D128 calls with no band, softcap or determinism: 80-row steps (kBwdRows80M).
  bool rows80;
  // Varlen: per virtual key block, written by the preprocess (bwd_launch.cu), or null.
  const BwdKeyBlock* key_table;
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
constexpr int kBwdEpilogueBarrier = 2 + kBwdConsumerWGs;  // both warpgroups done with the mainloop's smem

// dQ accumulation: each consumer warpgroup owns one half of a query block's dQ,
// [64 rows x KD cols] (narrow D64, BM 128: rows wg*64..) or [BM rows x KD/2 cols]
// (narrow D128 and the wide kernel, BM 64: columns wg*KD/2..), and adds it into a
// tile-major workspace: block ((bh * n_pad/BM + m_block) * 2 + wg) of BM*KD/2
// floats. The narrow kernel stages the half in smem and one thread bulk-reduce-adds
// it (cp.reduce.async.bulk .add.f32); the wide kernel has no smem left for that and
// adds from registers (red.global.add.v4.f32). Inside a block the floats keep the
// wgmma accumulator order, float4 (jb, t) = (jb * 128 + t) holding thread t's
// dq[4jb .. 4jb+3], so each warp writes 512 contiguous bytes (no bank conflicts);
// bwd_dq_block_offset() maps (row, col) back.

// Offset of (row, col) of a 64-row dQ half inside its workspace block (any number of
// columns). Thread t of the warpgroup holds rows 16*(t/32) + (t%32)/4 (+8) and
// columns 8*jb + 2*(t%4) (+1).
__host__ __device__ constexpr int bwd_dq_block_offset(int row, int col) {
  return ((col / 8) * 128 + (row / 16) * 32 + (row % 8) * 4 + (col % 8) / 2) * 4 + ((row / 8) % 2) * 2 + col % 2;
}

// The other way, per float4: group u of a half holds (row, col), (row, col + 1),
// (row + 8, col) and (row + 8, col + 1).
__host__ __device__ __forceinline__ void bwd_dq_group_coords(int u, int& row, int& col) {
  const int t = u & 127;  // the staging thread
  row = (t >> 5) * 16 + ((t & 31) >> 2);
  col = (u >> 7) * 8 + (t & 3) * 2;
}

// BM (query rows per step). Registers per consumer thread: S^T + dP^T (BM/2 each)
// + dK + dV (D/2 each): D64/BM128: 64+64+32+32; D96/BM64: 32+32+48+48;
// D128/BM64: 32+32+64+64.
template <int D>
struct BwdTile {
  static constexpr int kBlockM = D == 64 ? 128 : 64;
};

// The 80-row step (FlashAttention-3's tile for non-causal D128): 25% more queries per step
// spread the per-step costs (the producer's loads and barriers, the dS and dQ stagings) over
// 25% more MMA work. dQ is computed transposed, dQ^T = K^T dS^T (the wgmma M is 64 only), so
// each warpgroup holds 64 of D x 80 queries; dS is stored untransposed [queries][keys] as its
// K-major B operand. Registers: S^T + dP^T 40 + 40, dK + dV 64 + 64. Only where no step is
// masked inside the band (not causal, no window, no softcap) and dQ is not ordered (Det).
// STEELATTN_SM90_BWD_ROWS80=0 runs those calls on 64-row steps (bwd_launch.cu, use_rows80).
constexpr int kBwdRows80M = 80;

template <int D, class Elem, int BM_ = BwdTile<D>::kBlockM>
struct BwdSmem {
  static constexpr int BM = BM_;
  static constexpr int BN = kBwdBlockN;
  // Q/K/V/dO: D/CB column blocks of (rows x 2*CB bytes), swizzled (CB: bwd_kernel.h);
  // dS^T: BM/64 column blocks of (rows x 128 B).
  alignas(1024) Elem k[BN * D];
  alignas(1024) Elem v[BN * D];
  alignas(1024) Elem q[kBwdStages][BM * D];
  alignas(1024) Elem dout[kBwdStages][BM * D];
  alignas(1024) Elem ds[2][BN * BM];  // dS^T [keys][queries] (80 rows: dS [queries][keys]), double-buffered
  // dQ quarters on their way to the bulk reduce (80 rows: dQ^T, 64 of D x 80 queries)
  alignas(1024) float dq[kBwdConsumerWGs][64 * (BM == kBwdRows80M ? kBwdRows80M : 64)];
  alignas(16) float lse2[kBwdStages][BM];
  alignas(16) float dsum[kBwdStages][BM];
  uint64_t kv_full;
  uint64_t full[kBwdStages], empty[kBwdStages];
  uint64_t dq_full[kBwdConsumerWGs], dq_empty[kBwdConsumerWGs];  // deterministic: consumers <-> dQ writer
  // Block-sparse: the step in each stage, (head in the group, query block; -1 = no more
  // steps), published by full[stage] (the producer alone walks the mask).
  int step_g[kBwdStages], step_m[kBwdStages];
};

// The wide kernel (bwd_wide_kernel.h), head dims KD (q, k) and KDv (v) > 128:
// dK / dV of 128 keys would not fit in registers, so a CTA owns BN = 64 keys and
// the two consumer warpgroups split the head dim instead (FA3's 64 x 80 at hd256).
// Per step of BM = 64 queries each warpgroup computes S^T and dP^T for 32 of the
// queries (m64n32), writes its half of P^T and dS^T to smem, and after a barrier
// runs dV, dK, dQ on its half of the columns with both operands from smem.
// Registers per consumer thread: S^T + dP^T 16 + 16, dK KD/4, dV KDv/4, dQ KD/4.
template <int KD, int KDv>
struct BwdWideTile {
  static constexpr int BM = 64, BN = 64;
  static constexpr int NK = KD / 2, NV = KDv / 2;  // dK / dQ and dV columns per warpgroup
  // Column block of the Q/K/V/dO tiles: a warpgroup's columns must start on one, so
  // 64 elements (128B swizzle) when the halves are multiples of 64, else 32 (64B).
  static constexpr int CB = (NK % 64 == 0 && NV % 64 == 0) ? 64 : 32;
  static constexpr int SW = CB * 2;  // bytes per swizzled row of a column block
  static_assert(NK % CB == 0 && NV % CB == 0, "warpgroup halves start on a column block");
};

template <int KD, int KDv, class Elem>
struct BwdWideSmem {
  using T = BwdWideTile<KD, KDv>;
  // Q/K/V/dO: KD/CB (or KDv/CB) column blocks of (rows x SW bytes), swizzled.
  alignas(1024) Elem k[T::BN * KD];
  alignas(1024) Elem v[T::BN * KDv];
  alignas(1024) Elem q[kBwdStages][T::BM * KD];
  alignas(1024) Elem dout[kBwdStages][T::BM * KDv];
  // P^T and dS^T [keys][queries], 128B swizzled (64 queries = 128 B), double buffered.
  alignas(1024) Elem pt[2][T::BN * T::BM];
  alignas(1024) Elem dst[2][T::BN * T::BM];
  alignas(16) float lse2[kBwdStages][T::BM];
  alignas(16) float dsum[kBwdStages][T::BM];
  uint64_t kv_full;
  uint64_t full[kBwdStages], empty[kBwdStages];
};
static_assert(sizeof(BwdWideSmem<256, 256, uint16_t>) + 1024 <= 227 * 1024, "shared memory per CTA is 227 KB");
static_assert(sizeof(BwdSmem<128, uint16_t, kBwdRows80M>) + 1024 <= 227 * 1024, "shared memory per CTA is 227 KB");

}  // namespace steelattn::sm90
