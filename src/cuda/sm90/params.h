// Kernel parameters (one POD passed by value, tensor maps as __grid_constant__)
// and the per-head-dim tile configuration of the sm90 forward kernel.
#pragma once

#include <cuda.h>  // CUtensorMap
#include <cstdint>

#include "cuda/sm90/block_mask.h"

namespace steelattn::sm90 {

// Everything the device code reads. The host (launch.cu) derives every count
// once, so the kernel only branches on per-tile facts.
struct FwdParams {
  // Rank-4 TMA maps over (d, seq, head, batch), 128B swizzle, box inner 64 elems.
  // GQA-packed launches (pack_rows > 0) map q with rank 5 instead, over
  // (d, seq, head-in-group, kv head, batch), box (64, pack_rows, group, 1, 1).
  CUtensorMap tma_q;  // q   [B, H,   N, D], box (64, kBlockM, 1, 1)
  CUtensorMap tma_k;  // k   [B, Hkv, S, D], box (64, kBlockN, 1, 1)
  CUtensorMap tma_v;  // v   [B, Hkv, S, D], box (64, kBlockN, 1, 1)

  // O and LSE are written with plain stores (epilogue.h), or O through the tile's Q buffer
  // and TMA stores when o_tma (tma_o and o_tma, at the end of the struct; mainloop.h).
  void* out;
  int64_t o_stride_b, o_stride_h, o_stride_n;  // elements
  float* lse;                                  // [B, H, N] fp32 or null
  int64_t lse_stride_b, lse_stride_h, lse_stride_n;
  const float* alibi;  // [B, H] fp32 slopes or null
  int64_t alibi_stride_b, alibi_stride_h;

  int B, H, N, S;
  int group;    // H / Hkv: query heads per KV head
  int d_store;  // columns of O written: the real head dim, < D when it runs zero-padded on a wider kernel

  float scale;         // s = scale * q.k
  float softcap;       // > 0 only in the Softcap instantiation
  float softcap_inv;   // scale / softcap (the argument factor of tanh)
  float log2_factor;   // converts the softmax operand x to log2 units (see score_mod.h)

  // Band mask, clamped to +/-kUnbounded so int32 arithmetic never overflows.
  int diag_offset, window_left, window_right;

  int num_m_blocks;  // ceil(N / kBlockM)
  int num_tiles;     // B * H * num_m_blocks
  int heavy_first;   // causal-like: schedule the longest query tiles first
  int group_heads;   // heavy_first: (b, h) pairs per L2 group (scheduler.h)
  int sched_slot;    // this launch's tile-counter slot (scheduler.h)

  // Tiles are (b, tile_head, m_block): tile_head is the query head (H of them),
  // or with GQA packing the KV head (H / group of them), whose `group` query
  // heads share the tile's 128 rows: smem row r is head group*kv_head + r / pack_rows,
  // query m_block * pack_rows + r % pack_rows (pack_rows = kBlockM / group, 2^pack_shift).
  int tile_heads;
  int pack_rows, pack_shift;  // 0 when not packed

  // Block-sparse calls (never packed; block_mask.h): a block is visited or skipped whole.
  BlockMaskView bm;

  // Varlen calls (B = 1, q [1, H, total_q, D], k/v [1, Hkv, total_k, D]; never packed or
  // sparse): sequence i holds packed rows [cu_q[i], cu_q[i+1]) and keys [cu_k[i], cu_k[i+1]).
  // The tiles are virtual query blocks (varlen.h), num_m_blocks = total_q / kBlockM + num_seqs
  // per head, so the grid is known without reading the lengths.
  const int32_t* cu_q;
  const int32_t* cu_k;
  int num_seqs;

  // Last, so the fields above keep the constant-bank offsets they had before it: placed
  // before `out`, ptxas serialised the wgmmas of the D64 band kernels (C7511, register
  // pressure; D64 causal forward 22% slower on the H200); scripts/check-ptxas.py reports C7511.
  bool o_tma;
  CUtensorMap tma_o;  // out [B, H, N, D], box (64, 64, 1, 1): one consumer warpgroup's rows
};

constexpr int kUnbounded = 1 << 30;
constexpr int kSchedSlots = 1024;  // tile-counter slots, used round-robin by launches (scheduler.h)  // a window side of -1, as int32; N, S < 2^30 is enforced

// Threads: one producer warpgroup (only one thread issues TMA; setmaxnreg
// gives its registers to the consumers) and two consumer warpgroups of 64
// query rows each (wgmma's M is 64 per warpgroup).
constexpr int kConsumerWarpgroups = 2;
constexpr int kThreads = 128 * (1 + kConsumerWarpgroups);
constexpr int kBlockM = 64 * kConsumerWarpgroups;  // 128 query rows per CTA tile
constexpr int kProducerRegs = 24;                  // 24*128 + 240*256 = 64,512 <= 65,536
constexpr int kConsumerRegs = 240;
// Named barriers 1 and 2: the pingpong turn of consumer warpgroup 0 and 1
// (0 is __syncthreads).
constexpr int kPingpongBarrierBase = 1;
constexpr int kOStoreBarrierBase = 3;  // + consumer warpgroup: its O rows are staged in smem

// Per head dim: kBlockN (keys per tile) and pipeline depth, chosen so that
//   registers/thread: S (kBlockN/2) + P (kBlockN/4) + O (D/2) + ~40 <= 240
//   smem: Q (128*D*2) + stages*(K+V)(2*kBlockN*D*2) <= 227 KB
template <int D>
struct TileConfig;

// Q buffers (kQStages): with 2, the producer loads the next tile's Q while
// the consumers still work on the current one (v7, NOTES-sm90.md). D128 uses
// 2 (measured +0-4%); D64 keeps 1 (2 measured 2-5% slower in every D64 cell,
// long tiles included, so not the Q load itself: the consumer loop's code
// changed); D192/D256 have no room for a second Q tile.
// STEELATTN_SM90_Q_STAGES=1|2 sets it for D64 and D128 (A/B test builds only).
#ifdef STEELATTN_SM90_Q_STAGES
constexpr int kQStagesD64 = STEELATTN_SM90_Q_STAGES;
constexpr int kQStagesD128 = STEELATTN_SM90_Q_STAGES;
#else
constexpr int kQStagesD64 = 1;
constexpr int kQStagesD128 = 2;
#endif
static_assert(kQStagesD64 >= 1 && kQStagesD64 <= 2 && kQStagesD128 >= 1 && kQStagesD128 <= 2,
              "STEELATTN_SM90_Q_STAGES is 1 or 2");

// kPingpong: the two consumer warpgroups take turns issuing their GEMMs, so
// one's softmax runs under the other's GEMMs (FA3 does this for D <= 128; at
// D = 256 the GEMMs dominate and the turn-taking only adds waits).
template <>
struct TileConfig<64> {
  static constexpr int kBlockN = 128;  // S 64 + P 32 + O 32 regs
  static constexpr int kStages = 3;    // 16 KB Q (x kQStages) + 3 * 32 KB = 112 KB
  static constexpr int kQStages = kQStagesD64;
  static constexpr bool kPingpong = true;
};
template <>
struct TileConfig<128> {
  static constexpr int kBlockN = 128;  // S 64 + P 32 + O 64 regs
  static constexpr int kStages = 2;    // 2 * 32 KB Q + 2 * 64 KB = 192 KB
  static constexpr int kQStages = kQStagesD128;
  static constexpr bool kPingpong = true;
};
template <>
struct TileConfig<192> {
  static constexpr int kBlockN = 112;  // S 56 + P 28 + O 96 regs; FA3's 128 x 112 for dv = 192
  static constexpr int kStages = 2;    // 48 KB Q + 2 * 84 KB = 216 KB
  static constexpr int kQStages = 1;
  static constexpr bool kPingpong = false;
};
template <>
struct TileConfig<256> {
  static constexpr int kBlockN = 80;  // S 40 + P 20 + O 128 regs (PV is m64n256k16); FA3's 128 x 80
  static constexpr int kStages = 2;   // 64 KB Q + 2 * 80 KB = 224 KB
  static constexpr int kQStages = 1;
  static constexpr bool kPingpong = false;
};

// Shared memory of one CTA. Every tile is 1024-byte aligned so the 128B
// swizzle pattern written by TMA matches the one wgmma decodes (base offset 0).
// A tile of R rows x D columns is stored as D/64 column blocks, each R rows of
// 128 bytes (one TMA box), so column block c starts at c * R * 128 bytes.
template <int D, class Elem>
struct SharedStorage {
  static constexpr int kBlockN = TileConfig<D>::kBlockN;
  static constexpr int kStages = TileConfig<D>::kStages;
  static constexpr int kQStages = TileConfig<D>::kQStages;
  alignas(1024) Elem q[kQStages][kBlockM * D];  // [q stages][kBlockM, D]
  alignas(1024) Elem k[kStages][kBlockN * D];   // [stages][kBlockN, D]
  alignas(1024) Elem v[kStages][kBlockN * D];   // [stages][kBlockN, D]
  uint64_t q_full[kQStages], q_empty[kQStages];
  int tile[kQStages];  // the tile in each Q buffer, -1 = no more work; published by q_full
  int tile_lo[kQStages], tile_hi[kQStages];  // its key blocks [lo, hi) (empty: lo >= hi); published by q_full
  int kv_block[kStages];  // the key block in each K stage; published by k_full
  int seq[kQStages][6];   // varlen: the tile's SeqTile (varlen.h); published by q_full
  uint64_t k_full[kStages], k_empty[kStages];
  uint64_t v_full[kStages], v_empty[kStages];
  // O staged for its TMA stores when the Q buffer cannot hold it (one Q stage: the next
  // tile's Q goes there) and there is room: D64 (112 KB of 227 used). Last, so the members
  // above keep their offsets; one element elsewhere.
  static constexpr bool kOBuf = D == 64 && kQStages == 1;
  alignas(kOBuf ? 1024 : 16) Elem o[kOBuf ? kBlockM * D : 1];
};
// Whether the forward kernel for head dim D stages O in smem for its TMA stores (dense,
// unpacked tiles; mainloop.h): through the tile's Q buffer with two Q stages, through an O
// buffer of its own where there is one, except in the band kernels there (D64: with the
// staging compiled in, ptxas serialised their wgmmas, C7511). The launcher asks too, so
// it encodes O's tensor map only for kernels that use it.
template <int D>
constexpr bool stages_o(bool band) {
  return TileConfig<D>::kQStages == 2 || (SharedStorage<D, uint16_t>::kOBuf && !band);
}

static_assert(sizeof(SharedStorage<64, uint16_t>) + 1024 <= 227 * 1024 &&
                  sizeof(SharedStorage<128, uint16_t>) + 1024 <= 227 * 1024 &&
                  sizeof(SharedStorage<192, uint16_t>) + 1024 <= 227 * 1024 &&
                  sizeof(SharedStorage<256, uint16_t>) + 1024 <= 227 * 1024,
              "shared memory per CTA is 227 KB");

}  // namespace steelattn::sm90
