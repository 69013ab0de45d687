// Mainloop of the sm90 forward kernel: the producer (TMA loads of Q and the
// K/V stage ring) and the consumer warpgroups (S = Q K^T, online softmax,
// O += P V on wgmma), overlapped inside each warpgroup as in FA3:
//
//   issue S_n = Q K_n^T          (async)
//   issue O  += P_{n+1} V_{n+1}  (async, P from the previous block)
//   wait S_n, release K_n; softmax(S_n) runs while the tensor cores do PV
//   wait PV,  release V_{n+1}; rescale O; P_n = bf16(S_n)
//
// Key blocks are visited from the last to the first, so the blocks that need
// the element mask (the causal diagonal, the ragged end of S) come first.
#pragma once

#include <type_traits>

#include "cuda/sm90/common.h"  // PipeState
#include "cuda/sm90/epilogue.h"
#include "cuda/sm90/mask.h"
#include "cuda/sm90/params.h"
#include "cuda/sm90/ptx.h"
#include "cuda/sm90/scheduler.h"
#include "cuda/sm90/score_mod.h"
#include "cuda/sm90/softmax.h"
#include "cuda/sm90/varlen.h"
#include "cuda/sm90/wgmma_ops.h"

namespace steelattn::sm90 {

// Pack: GQA packing (params.h): a tile's 128 rows are the `group` query heads
// of one KV head over kBlockM / group queries, so each K/V block is loaded once
// for the whole group. Pack = false is the plain per-query-head kernel.
// Sparse: block-sparse calls (FwdParams::bm, never packed). Dense instantiations
// compile exactly as without it: the producer's 24 registers have no room for the mask walk.
// Varlen: packed sequences (FwdParams::cu_q, varlen.h): the producer resolves each virtual
// query block to its sequence, skips holes, and publishes the SeqTile with the tile; rows,
// keys, the band and ALiBi are then the sequence's own, TMA coordinates and the epilogue
// are offset to its packed rows.
template <int D, class Elem, class Tag, bool Band, bool Softcap, bool Pack = false, bool Sparse = false,
          bool Varlen = false>
struct Mainloop {
  static_assert(!(Pack && Sparse), "block-sparse tiles are per query head, never GQA-packed");
  static_assert(!(Varlen && (Pack || Sparse)), "varlen tiles are never packed or block-sparse");
  static constexpr int kBlockN = TileConfig<D>::kBlockN;
  static constexpr int kStages = TileConfig<D>::kStages;
  static constexpr int kQStages = TileConfig<D>::kQStages;
#ifdef STEELATTN_SM90_FORCE_PINGPONG  // A/B test builds only (tests/cuda/sm90_build.sh)
  static constexpr bool kPingpong = STEELATTN_SM90_FORCE_PINGPONG != 0;
#else
  static constexpr bool kPingpong = TileConfig<D>::kPingpong;
#endif
  // Half diagonal block (v7): on a causal tile's first key block, a consumer
  // warpgroup whose 64 rows see none of the block's upper 64 keys (warpgroup 0
  // on the diagonal) computes S = Q K^T with N = 64 and runs the softmax on
  // those 32 scores per thread only; P's upper half is zero. The first block is
  // the one with nothing to overlap, so this shortens the exposed chain of
  // every causal tile. STEELATTN_SM90_HALF_DIAG=0|1 for A/B test builds.
  // D64 only: at D128 (O 64 registers) the second S shape made ptxas
  // serialise the wgmmas (C7511) and causal D128 lost 10-15%.
#ifdef STEELATTN_SM90_HALF_DIAG
  static constexpr bool kHalfDiag = STEELATTN_SM90_HALF_DIAG != 0 && Band && !Pack && kBlockN == 128 && D == 64;
#else
  static constexpr bool kHalfDiag = Band && !Pack && kBlockN == 128 && D == 64;
#endif
  static constexpr int kQBytes = kBlockM * D * 2;   // Q tile [kBlockM, D]
  static constexpr int kKVBytes = kBlockN * D * 2;  // one K or V stage [kBlockN, D]
  static constexpr int kNS = kBlockN / 2;  // fp32 scores per thread: m64 x kBlockN fragment
  static constexpr int kNP = kBlockN / 4;  // packed bf16x2 P registers per thread
  static constexpr int kNO = D / 2;        // fp32 O accumulators per thread: m64 x D fragment
  static constexpr int kConsumerWarps = 4 * kConsumerWarpgroups;  // arrivals per empty barrier
  static_assert(D % 64 == 0, "TMA boxes and the 128B swizzle cover 64 columns");
  static_assert(kBlockN % 16 == 0 && kBlockN <= 256, "kBlockN is wgmma N for QK^T and K for PV");

  using Storage = SharedStorage<D, Elem>;
  using Mask = MaskPolicy<Band, kBlockM, kBlockN, Pack>;
  using Mod = ScoreMod<Softcap, Band, kBlockM, kBlockN, Pack>;
  using Epi = std::conditional_t<Pack, EpiloguePacked<D, Elem>, Epilogue<D, Elem>>;
  // O staged in smem and stored by TMA (FwdParams::o_tma): unpacked, not varlen, where
  // params.h's stages_o says. With two Q stages through the tile's own Q buffer (holding
  // it until O is out never delays the next tile's Q: that is in the other buffer); with
  // one, through a buffer of its own (Storage::o).
  static constexpr bool kOInQ = kQStages == 2;
  static constexpr bool kOSmem = !Pack && !Varlen && stages_o<D>(Band);

  __device__ static void init_barriers(Storage& sm) {
#pragma unroll
    for (int i = 0; i < kQStages; ++i) {
      mbar_init(&sm.q_full[i], 1);
      mbar_init(&sm.q_empty[i], kConsumerWarps);
    }
#pragma unroll
    for (int i = 0; i < kStages; ++i) {
      mbar_init(&sm.k_full[i], 1);
      mbar_init(&sm.k_empty[i], kConsumerWarps);
      mbar_init(&sm.v_full[i], 1);
      mbar_init(&sm.v_empty[i], kConsumerWarps);
    }
    fence_barrier_init();
  }

  // ---------------------------------------------------------------- producer
  // Runs on one thread. Q: D/64 boxes of [kBlockM, 64]; K, V: D/64 boxes of
  // [kBlockN, 64]; out-of-range rows arrive as zeros and count toward tx bytes.
  __device__ static void produce(const FwdParams& p, Storage& sm) {
    prefetch_tensor_map(&p.tma_q);
    prefetch_tensor_map(&p.tma_k);
    prefetch_tensor_map(&p.tma_v);
    const DynamicPersistentScheduler sched(p);
    const Mask mask(p);
    PipeState<kStages> st;
    PipeState<kQStages> qst;
    int t = sched.first_tile();  // the grid never exceeds the tile count
    while (true) {
      // The Q buffer and its tile id slot are free once every consumer warp
      // has finished this buffer's previous tile (with two Q buffers: the tile
      // before the current one, so this wait is normally already satisfied and
      // the next Q loads while the consumers still run the current tile).
      const int qi = qst.index;
      uint64_t* const q_full = &sm.q_full[qi];
      Elem* const q_smem = sm.q[qi];
      mbar_wait(&sm.q_empty[qi], qst.phase ^ 1);
      qst.advance();
      SeqTile vt{};
      if constexpr (Varlen) {  // holes are claimed and dropped here; consumers never see them
        while (t < sched.num_tiles && !resolve_virtual_block(p, sched.coord(t).m_block, vt)) t = sched.next_tile();
      }
      const bool done = t >= sched.num_tiles;
      *reinterpret_cast<volatile int*>(&sm.tile[qi]) = done ? -1 : t;
      if (done) {
        mbar_arrive(q_full);  // publishes "no more work"
        break;
      }
      const TileCoord tc = sched.coord(t);
      int lo, hi;
      if constexpr (Varlen) {
        volatile int* pub = sm.seq[qi];
        pub[0] = vt.seq, pub[1] = vt.m, pub[2] = vt.q0, pub[3] = vt.n, pub[4] = vt.k0, pub[5] = vt.s;
        mask.for_sequence(p, vt.n, vt.s).block_range(vt.m, lo, hi);
      } else {
        mask.block_range(tc.m_block, lo, hi);
      }
      if constexpr (Sparse) {
        // Block-sparse: the producer alone walks the mask and publishes what it decided,
        // the tile's range with the tile and each block with its K stage.
        Mask::trim(p, tc.b, tc.h, tc.m_block, lo, hi);
        *reinterpret_cast<volatile int*>(&sm.tile_lo[qi]) = lo;
        *reinterpret_cast<volatile int*>(&sm.tile_hi[qi]) = hi;
      }
      if (lo >= hi) {
        mbar_arrive(q_full);  // consumers write zeros; nothing to load
      } else {
        mbar_arrive_expect_tx(q_full, kQBytes);
        if constexpr (Pack) {
          // One rank-5 box per column block: pack_rows queries x group heads,
          // landing g-major (row = g * pack_rows + query offset), still kBlockM rows.
#pragma unroll
          for (int c = 0; c < D / 64; ++c)
            tma_load_5d(q_smem + c * kBlockM * 64, &p.tma_q, q_full, c * 64, tc.m_block * p.pack_rows, 0, tc.h,
                        tc.b);
        } else {
          const int q_row = Varlen ? vt.q0 + vt.m * kBlockM : tc.m_block * kBlockM;
#pragma unroll
          for (int c = 0; c < D / 64; ++c)
            tma_load_4d(q_smem + c * kBlockM * 64, &p.tma_q, q_full, c * 64, q_row, tc.h, tc.b);
        }
      }
      // Claim the next tile now: the atomic's latency hides behind the K/V waits.
      const int t_next = sched.next_tile();
      const int kv_head = Pack ? tc.h : tc.h / p.group;
      const int k_row0 = Varlen ? vt.k0 : 0;  // rows past the sequence's keys are masked by its band
      int n_after = lo - 1;  // block-sparse: the active block after n (walked one ahead)
      for (int n = hi - 1; n >= lo; n = Sparse ? n_after : n - 1) {
        // Block-sparse: walk to the next active block before waiting for the stage, so
        // the walk's loads hide behind the wait.
        if constexpr (Sparse) n_after = Mask::prev(p, tc.b, tc.h, tc.m_block, n - 1, lo);
        mbar_wait(&sm.k_empty[st.index], st.phase ^ 1);
        if constexpr (Sparse) *reinterpret_cast<volatile int*>(&sm.kv_block[st.index]) = n;
        mbar_arrive_expect_tx(&sm.k_full[st.index], kKVBytes);
#pragma unroll
        for (int c = 0; c < D / 64; ++c)
          tma_load_4d(sm.k[st.index] + c * kBlockN * 64, &p.tma_k, &sm.k_full[st.index], c * 64,
                      k_row0 + n * kBlockN, kv_head, tc.b);
        mbar_wait(&sm.v_empty[st.index], st.phase ^ 1);
        mbar_arrive_expect_tx(&sm.v_full[st.index], kKVBytes);
#pragma unroll
        for (int c = 0; c < D / 64; ++c)
          tma_load_4d(sm.v[st.index] + c * kBlockN * 64, &p.tma_v, &sm.v_full[st.index], c * 64,
                      k_row0 + n * kBlockN, kv_head, tc.b);
        st.advance();
      }
      t = t_next;
    }
    sched.finish();
  }

  // ---------------------------------------------------------------- consumer
  // S[64, kBlockN] = Q[64, D] K[kBlockN, D]^T. Q and K are K-major, 128B
  // swizzled, stored as D/64 column blocks of (rows x 128 B); a k16 step moves
  // 32 B inside a row, every 4 steps jump to the next column block.
  // NN < kBlockN: S of the block's first NN keys only (the K tile's first NN rows).
  template <int NN = kBlockN>
  __device__ static void gemm_qk(float (&s)[NN / 2], uint32_t q_addr, uint32_t k_addr) {
    const uint64_t qd = make_smem_desc(q_addr, 16, 1024);  // SBO: 8 rows x 128 B
    const uint64_t kd = make_smem_desc(k_addr, 16, 1024);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t qoff = (kk / 4) * kBlockM * 128 + (kk % 4) * 32;
      const uint32_t koff = (kk / 4) * kBlockN * 128 + (kk % 4) * 32;
      Wgmma<NN, Tag>::ss(s, qd + (qoff >> 4), kd + (koff >> 4), kk > 0);
    }
    wgmma_commit();
  }

  // O[64, D] += P[64, kBlockN] V[kBlockN, D]. P comes from registers; V is
  // MN-major (D contiguous): a k16 step is 16 rows = 2 KB, LBO jumps between
  // 64-column blocks (kBlockN x 128 B apart), SBO between 8-row groups.
  __device__ static void gemm_pv(float (&o)[kNO], const uint32_t (&pf)[kNP], uint32_t v_addr) {
    const uint64_t vd = make_smem_desc(v_addr, kBlockN * 128, 1024);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk)
      Wgmma<D, Tag>::rs(o, pf[4 * kk], pf[4 * kk + 1], pf[4 * kk + 2], pf[4 * kk + 3], vd + ((kk * 2048) >> 4), 1);
    wgmma_commit();
  }

  // One warp's arrival on an empty barrier, after the whole warp passed the
  // wgmma wait (count = all consumer warps, so the barrier completes only when
  // every warp of both warpgroups is done with the buffer).
  __device__ static void warp_release(uint64_t* bar) {
    __syncwarp();
    if (threadIdx.x % 32 == 0) mbar_arrive(bar);
  }

  template <class Array>
  __device__ static void fence_regs(Array& a) {
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(a) / sizeof(a[0])); ++i) reg_fence(a[i]);
  }

  // Pingpong turn-taking around each GEMM issue: wait for this warpgroup's
  // turn (its barrier completes when the other warpgroup has arrived on it),
  // issue, then hand the turn over. Both warpgroups run the same tiles and
  // blocks, so the arrive/sync counts match (see consume()).
  __device__ static void turn_begin(int cwg) {
    if constexpr (kPingpong) named_barrier_sync(kPingpongBarrierBase + cwg, 256);
  }
  __device__ static void turn_end(int cwg) {
    if constexpr (kPingpong) named_barrier_arrive(kPingpongBarrierBase + (cwg ^ 1), 256);
  }

  __device__ static void pack_p(const float (&s)[kNS], uint32_t (&pf)[kNP]) {
    // The m64 accumulator fragment, packed pairwise, is the wgmma A fragment:
    // pf[4kk..4kk+3] = columns 16kk..16kk+15 of this thread's two rows.
#pragma unroll
    for (int i = 0; i < kNP; ++i) pf[i] = pack2<Elem>(s[2 * i], s[2 * i + 1]);
  }

  // Score modifier + mask on one block. Unpacked: rows row0, row0 + 8 of head
  // tc.h; packed: query qrow[r] of head qhead[r], slope slope_r[r].
  template <bool Masked, int M>
  __device__ static __forceinline__ void modify(const Mod& mod, float (&s)[M], int row0, const int (&qrow)[2],
                                                const float (&slope_r)[2], int col0, const Mask& mask) {
    if constexpr (Pack)
      mod.template apply_rows<Masked>(s, qrow, slope_r, col0, mask);
    else
      mod.template apply<Masked>(s, row0, col0, mask);
  }

  // Off-tile block masks (block_mask.h): on a tile the launcher marked partly active, the
  // scores of inactive mask blocks -> -inf. A thread's two rows lie in one 16-row group and
  // each pair of its 8-column chunks in one 16-column group, and block sizes are multiples
  // of 16, so it reads one mask byte per 16 columns. Rows past N read the last mask row.
  template <int M>
  __device__ static __forceinline__ void block_mask_elements(const FwdParams& p, float (&s)[M], int b, int h, int row0,
                                                             int col_first) {
    const BlockMaskView& bm = p.bm;
    const uint8_t* row = bm.elem + b * bm.esb + h * bm.esh + min(row0 / bm.bq, bm.nq - 1) * bm.esq;
#pragma unroll
    for (int g = 0; g < M / 8; ++g) {
      const int c = (col_first + 16 * g) / bm.bk;
      if (c >= bm.nk || !__ldg(row + c * bm.esk)) {
#pragma unroll
        for (int e = 8 * g; e < 8 * g + 8; ++e) s[e] = -INFINITY;
      }
    }
  }

  __device__ static __forceinline__ Epi make_epilogue(const FwdParams& p, const TileCoord& tc, int row0,
                                                      const int (&qrow)[2], const int (&qhead)[2], int lane) {
    if constexpr (Pack)
      return Epi(p, tc.b, qhead, qrow, lane);
    else
      return Epi(p, tc.b, tc.h, row0, lane);
  }

  // This warpgroup's 64 rows of O, normalised, written into its rows of the tile's Q
  // buffer (or of the O buffer) in the layout TMA loaded Q with (column blocks of 64, 128B
  // swizzle: the 8 rows x 4 lanes of a store hit 32 distinct banks), then stored by TMA
  // (rows past N and zero-padded columns are clipped by the map), and the Q buffer handed
  // back to the producer (q_empty) once the stores have read it. The O buffer is free for
  // the next tile then too: thread 0 waits for the read before it joins the warpgroup's
  // next wgmma, which every thread of the warpgroup must reach before the next epilogue.
  // From registers, O took 32 4-byte stores per thread whose address registers the next
  // tile's code then waited on (ncu, D128 N1k).
  __device__ static void store_o_smem(const FwdParams& p, const Elem* q_buf, int cwg, const TileCoord& tc,
                                      const float (&o)[kNO], const float (&inv)[2], uint64_t* q_empty) {
    const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32;
    const uint32_t base = smem_u32(q_buf) + cwg * 64 * 128;  // this warpgroup's rows, column block 0
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp * 16 + lane / 4 + 8 * r;  // within the warpgroup's 64
#pragma unroll
      for (int jb = 0; jb < D / 8; ++jb) {
        const uint32_t addr = base + (jb / 8) * kBlockM * 128 + row * 128 + (((jb % 8) ^ (row % 8)) << 4) +
                              (lane % 4) * 4;
        st_shared_u32(addr, pack2<Elem>(o[4 * jb + 2 * r] * inv[r], o[4 * jb + 2 * r + 1] * inv[r]));
      }
    }
    fence_proxy_async();
    named_barrier_sync(kOStoreBarrierBase + cwg, 128);
    if (tid == 0) {
      const uint8_t* box = reinterpret_cast<const uint8_t*>(q_buf) + cwg * 64 * 128;
#pragma unroll
      for (int c = 0; c < D / 64; ++c)
        tma_store_4d(&p.tma_o, box + c * kBlockM * 128, c * 64, tc.m_block * kBlockM + cwg * 64, tc.h, tc.b);
      tma_store_commit();
      tma_store_wait_read();
      if (q_empty != nullptr) mbar_arrive_cnt(q_empty, 4);  // for the warpgroup's four warps
    }
  }

  __device__ static void consume(const FwdParams& p, Storage& sm, int cwg) {
    const int tid = threadIdx.x % 128;
    const int warp = tid / 32, lane = tid % 32;
    const DynamicPersistentScheduler sched(p);
    const Mask call_mask(p);
    PipeState<kStages> st;
    PipeState<kQStages> qst;
    // Warpgroup 0 takes the first turn: warpgroup 1 hands it over up front,
    // and warpgroup 0 absorbs warpgroup 1's last hand-over before exiting.
    if (kPingpong && cwg == 1) turn_end(cwg);

    while (true) {
      const int qi = qst.index;
      mbar_wait(&sm.q_full[qi], qst.phase);
      qst.advance();
      const int t = *reinterpret_cast<volatile int*>(&sm.tile[qi]);
      if (t < 0) break;
      uint64_t* const q_empty = &sm.q_empty[qi];
      // This warpgroup's 64 rows of the Q tile: row offset cwg*64 in each column block.
      const uint32_t q_addr = smem_u32(sm.q[qi]) + cwg * 64 * 128;
      const TileCoord tc = sched.coord(t);
      // Varlen: the producer's SeqTile; rows, keys and the band are the sequence's own.
      SeqTile vt{};
      if constexpr (Varlen) {
        const volatile int* pub = sm.seq[qi];
        vt = SeqTile{pub[0], pub[1], pub[2], pub[3], pub[4], pub[5]};
      }
      const Mask mask = Varlen ? call_mask.for_sequence(p, vt.n, vt.s) : call_mask;
      const int mb = Varlen ? vt.m : tc.m_block;  // the tile's query block (in its sequence)
      const int row0 = mb * kBlockM + cwg * 64 + warp * 16 + lane / 4;  // this thread's first row
      // Packed: the query index and head of this thread's rows r = 0, 1 (tile rows lr, lr + 8).
      int qrow[2] = {0, 0}, qhead[2] = {0, 0};
      float slope_r[2] = {0.f, 0.f};
      if constexpr (Pack) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int lr = cwg * 64 + warp * 16 + lane / 4 + 8 * r;
          qrow[r] = tc.m_block * p.pack_rows + (lr & (p.pack_rows - 1));
          qhead[r] = tc.h * p.group + (lr >> p.pack_shift);
        }
      }
      int lo, hi;
      // Off-tile block masks: this tile row's state bytes (block_mask.h), null otherwise.
      const uint8_t* part_row = nullptr;
      if constexpr (Sparse) {
        lo = *reinterpret_cast<volatile int*>(&sm.tile_lo[qi]);
        hi = *reinterpret_cast<volatile int*>(&sm.tile_hi[qi]);
        if (p.bm.elem != nullptr) part_row = Mask::mask_row(p, tc.b, tc.h, tc.m_block);
      } else {
        mask.block_range(mb, lo, hi);
      }
      Epi epi = make_epilogue(p, tc, row0, qrow, qhead, lane);
      const bool o_smem = kOSmem && p.o_tma;
      const bool q_late = kOInQ && o_smem;  // q_empty is then released by store_o_smem
      if constexpr (Varlen) epi.to_sequence(vt.q0, vt.n);
      if (lo >= hi) {
        warp_release(q_empty);
        epi.store_empty();
        continue;
      }
      Mod mod(p, Varlen ? vt.seq : tc.b, Pack ? qhead[0] : tc.h);  // varlen: ALiBi row per sequence
      if constexpr (Varlen) mod.off = mask.band.off;
      if constexpr (Pack) {
        if (p.alibi != nullptr) {
#pragma unroll
          for (int r = 0; r < 2; ++r) slope_r[r] = p.alibi[tc.b * p.alibi_stride_b + qhead[r] * p.alibi_stride_h];
        }
      }
      OnlineSoftmax<kNS> softmax(p.log2_factor);
      const int col_lane = 2 * (lane % 4);
      auto partial = [&](int nb) {
        return Sparse && part_row != nullptr && __ldg(part_row + nb * p.bm.sk) == kTilePartial;
      };

      float o[kNO];
#pragma unroll
      for (int i = 0; i < kNO; ++i) o[i] = 0.f;
      float s[kNS];
      uint32_t pf[kNP];
      float corr[2];

      // First (highest) key block: nothing to overlap with yet.
      int n = hi - 1;
      mbar_wait(&sm.k_full[st.index], st.phase);
      bool half = false;  // (uniform over the warpgroup, as wgmma needs)
      if constexpr (kHalfDiag) half = mask.upper_half_invisible(mb * kBlockM + cwg * 64, n);
      if (half) {
        if constexpr (kHalfDiag) {
          float(&sh)[kNS / 2] = *reinterpret_cast<float(*)[kNS / 2]>(&s[0]);
          turn_begin(cwg);
          gemm_qk<kBlockN / 2>(sh, q_addr, smem_u32(sm.k[st.index]));
          turn_end(cwg);
          wgmma_wait<0>();
          fence_regs(sh);
          warp_release(&sm.k_empty[st.index]);
          if (n == lo && !q_late) warp_release(q_empty);
          modify<true>(mod, sh, row0, qrow, slope_r, n * kBlockN + col_lane, mask);
          if (partial(n)) block_mask_elements(p, sh, tc.b, tc.h, row0, n * kBlockN);
          softmax.step(sh, corr);
#pragma unroll
          for (int i = kNS / 2; i < kNS; ++i) s[i] = 0.f;
        }
      } else {
        turn_begin(cwg);
        gemm_qk(s, q_addr, smem_u32(sm.k[st.index]));
        turn_end(cwg);
        wgmma_wait<0>();
        fence_regs(s);
        warp_release(&sm.k_empty[st.index]);
        if (n == lo && !q_late) warp_release(q_empty);
        if (mask.needs_element_mask(mb, n))
          modify<true>(mod, s, row0, qrow, slope_r, n * kBlockN + col_lane, mask);
        else
          modify<false>(mod, s, row0, qrow, slope_r, n * kBlockN + col_lane, mask);
        if (partial(n)) block_mask_elements(p, s, tc.b, tc.h, row0, n * kBlockN);
        softmax.step(s, corr);
      }
      pack_p(s, pf);
      PipeState<kStages> vst = st;  // V of the block whose P is pending
      st.advance();

      // Dense: hi - 2 down to lo (the loop as it always was). Sparse: the block the producer
      // put in the next K stage, while the one just done was above lo.
      for (n = Sparse ? n : hi - 2; Sparse ? n > lo : n >= lo; n = Sparse ? n : n - 1) {
        mbar_wait(&sm.k_full[st.index], st.phase);
        if constexpr (Sparse) n = *reinterpret_cast<volatile int*>(&sm.kv_block[st.index]);
        mbar_wait(&sm.v_full[vst.index], vst.phase);
        turn_begin(cwg);
        gemm_qk(s, q_addr, smem_u32(sm.k[st.index]));
        gemm_pv(o, pf, smem_u32(sm.v[vst.index]));
        turn_end(cwg);
        wgmma_wait<1>();  // S done, PV may still run
        fence_regs(s);
        warp_release(&sm.k_empty[st.index]);
        if (n == lo && !q_late) warp_release(q_empty);
        if (mask.needs_element_mask(mb, n))
          modify<true>(mod, s, row0, qrow, slope_r, n * kBlockN + col_lane, mask);
        else
          modify<false>(mod, s, row0, qrow, slope_r, n * kBlockN + col_lane, mask);
        if (partial(n)) block_mask_elements(p, s, tc.b, tc.h, row0, n * kBlockN);
        softmax.step(s, corr);
        wgmma_wait<0>();
        fence_regs(o);
        warp_release(&sm.v_empty[vst.index]);
#pragma unroll
        for (int i = 0; i < kNO; ++i) o[i] *= corr[(i >> 1) & 1];
        pack_p(s, pf);
        vst = st;
        st.advance();
      }

      mbar_wait(&sm.v_full[vst.index], vst.phase);
      turn_begin(cwg);
      gemm_pv(o, pf, smem_u32(sm.v[vst.index]));
      turn_end(cwg);
      wgmma_wait<0>();
      fence_regs(o);
      warp_release(&sm.v_empty[vst.index]);

      float inv[2], lse[2];
      softmax.finalize(inv, lse);
      if constexpr (kOSmem) {
        if (o_smem) {
          store_o_smem(p, kOInQ ? sm.q[qi] : sm.o, cwg, tc, o, inv, kOInQ ? q_empty : nullptr);
          epi.store_lse(lse);
          continue;
        }
      }
      epi.store(o, inv, lse);
    }
    if (kPingpong && cwg == 0) turn_begin(cwg);
  }
};

}  // namespace steelattn::sm90
