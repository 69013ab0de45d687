// sm90 backward for wide head dims (KD, KDv) in {(192, 192), (256, 256),
// (192, 128)}: one CTA per (key block of 64, kv head, batch). The dK and dV of
// 128 keys would not fit in registers at these widths, so a CTA owns 64 keys and
// its two consumer warpgroups split the head dim (BwdWideTile in bwd_params.h).
// Per query block (64 queries of one query head; every head of the GQA group in
// turn, so dK / dV sum over the group in registers), consumer warpgroup w:
//   S^T_w  = K Q_w^T     [64 keys, 32 queries]  (SS, m64n32, K-dim KD)
//   dP^T_w = V dO_w^T    [64 keys, 32 queries]  (SS, m64n32, K-dim KDv)
//   P^T_w  = exp2(S^T * c - lse2), dS^T_w = P^T (dP^T - dsum) [* (1 - t^2)]
//   both -> smem ([keys][queries] tiles, 128B swizzle, double buffered); barrier
//   dQ_w   = dS K[:, half w]        (SS, dS from the dS^T tile: MN-major A)
//   dV_w  += P^T dO[:, half w]      (SS)
//   dK_w  += dS^T Q[:, half w]      (SS)
//   dQ_w  -> red.global.add.v4.f32 into the fp32 workspace (no smem left to stage it)
// Only (KD, KDv, dtype) are template arguments: band, softcap, ALiBi, masking and
// determinism are runtime flags, hoisted out of the element loops where they matter.
// The element work is 16 scores per thread per step against ~2.6 MFLOP of GEMMs,
// so this keeps the build to 6 kernels at no measurable cost.
// Included only by the instantiation files bwd_wide_inst_*.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "cuda/sm90/band.h"
#include "cuda/sm90/bwd_common.h"
#include "cuda/sm90/bwd_params.h"
#include "cuda/sm90/common.h"  // sm_90a guard, ElemTag, PipeState
#include "cuda/sm90/smem_attr.h"
#include "cuda/sm90/ptx.h"
#include "cuda/sm90/wgmma_ops.h"

namespace steelattn::sm90 {

template <int KD, int KDv, class Elem>
struct BwdWideMainloop {
  using Tag = typename ElemTag<Elem>::type;
  using Tile = BwdWideTile<KD, KDv>;
  using Smem = BwdWideSmem<KD, KDv, Elem>;
  static constexpr int BM = Tile::BM, BN = Tile::BN, CB = Tile::CB, SW = Tile::SW;
  static constexpr int NK = Tile::NK, NV = Tile::NV;
  static constexpr int kQH = BM / kBwdConsumerWGs;  // queries of this warpgroup's S^T / dP^T
  static constexpr int kNS = kQH / 2;               // their fp32 per thread (m64 x n32)
  static constexpr int kNP = kQH / 4;               // packed
  static constexpr int kConsumerWarps = 4 * kBwdConsumerWGs;
  static constexpr uint32_t kKVBytes = BN * (KD + KDv) * 2;
  static constexpr uint32_t kStepBytes = BM * (KD + KDv) * 2 + 2u * BM * 4;
  static_assert(kQH == 32, "S^T per warpgroup is m64n32");

  // Unbounded window sides are clamped to 2^30 by the host, so the band rule
  // also serves calls without a band (it then only tests keys < S).
  __device__ static Band<true> band(const BwdParams& p) {
    return {p.N, p.S, p.diag_offset, p.window_left, p.window_right};
  }

  // Query blocks [lo, hi) that see any key of key block n.
  __device__ static void m_range(const BwdParams& p, int n_block, int& lo, int& hi) {
    band(p).query_blocks(n_block * BN, min(n_block * BN + BN, p.S) - 1, BM, lo, hi);
  }

  // Deterministic: descending, so every key block of a head reaches a query block
  // at the same step and the ordered dQ add waits only for the block before.
  __device__ static int m_of_step(const BwdParams& p, int i, int lo, int hi) {
    return p.deterministic ? hi - 1 - i : lo + i;
  }

  // This key block's rank among the key blocks that see query block m.
  __device__ static int rank_in(const BwdParams& p, int n_block, int m) {
    int lo, hi;
    band(p).key_blocks(m * BM, min(m * BM + BM, p.N) - 1, BN, lo, hi);
    return n_block - lo;
  }

  // Index of query block m's first dQ workspace half (and counter).
  __device__ static int64_t dq_block(const BwdParams& p, int b, int h, int m) {
    return ((static_cast<int64_t>(b) * p.H + h) * (p.n_pad / BM) + m) * 2;
  }

  // dK (times scale) and dV of the CTA's 64 keys through shared memory, as the narrow
  // kernel does (bwd_kernel.h, store_dkv_bulk): both warpgroups write their column halves
  // into padded row-major staging areas over the mainloop's smem (row stride 2 * cols + 16
  // bytes: conflict-free), then one thread per row bulk-copies it to global memory.
  static constexpr int kStageRowK = KD * 2 + 16, kStageRowV = KDv * 2 + 16;
  static_assert(BN * (kStageRowK + kStageRowV) <= offsetof(Smem, lse2), "dK/dV staging must not reach lse2");

  __device__ static void store_dkv_bulk(const BwdParams& p, Smem& sm, int w, int n_block, int b, int hkv, int key0,
                                        int qlane, const float (&dk)[NK / 2], const float (&dv)[NV / 2]) {
    const int tid = threadIdx.x % 128;
    // Both warpgroups' last GEMMs have read K, V, Q, dO, P^T and dS^T (the staging overwrites them).
    named_barrier_sync(kBwdEpilogueBarrier, 128 * kBwdConsumerWGs);
    const uint32_t stage_k = smem_u32(&sm), stage_v = stage_k + BN * kStageRowK;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const uint32_t row = static_cast<uint32_t>(key0 + 8 * r - n_block * BN);
#pragma unroll
      for (int jb = 0; jb < NK / 8; ++jb)
        st_shared_u32(stage_k + row * kStageRowK + (w * NK + 8 * jb + qlane) * 2,
                      pack2<Elem>(dk[4 * jb + 2 * r] * p.scale, dk[4 * jb + 2 * r + 1] * p.scale));
#pragma unroll
      for (int jb = 0; jb < NV / 8; ++jb)
        st_shared_u32(stage_v + row * kStageRowV + (w * NV + 8 * jb + qlane) * 2,
                      pack2<Elem>(dv[4 * jb + 2 * r], dv[4 * jb + 2 * r + 1]));
    }
    fence_proxy_async();
    named_barrier_sync(kBwdEpilogueBarrier, 128 * kBwdConsumerWGs);  // every row has both halves
    const int key = n_block * BN + tid;
    if (tid < BN && key < p.S) {  // warpgroup 0 copies the dK rows, warpgroup 1 the dV rows
      if (w == 0)
        bulk_store_1d(static_cast<Elem*>(p.dk) + b * p.dk_sb + hkv * p.dk_sh + key * p.dk_sn,
                      stage_k + tid * kStageRowK, p.d_store_k * 2);
      else
        bulk_store_1d(static_cast<Elem*>(p.dv) + b * p.dv_sb + hkv * p.dv_sh + key * p.dv_sn,
                      stage_v + tid * kStageRowV, p.d_store_v * 2);
      tma_store_commit();
      tma_store_wait_read();  // smem must outlive the copy's read
    }
  }

  __device__ static void init_barriers(Smem& sm) {
    mbar_init(&sm.kv_full, 1);
#pragma unroll
    for (int i = 0; i < kBwdStages; ++i) {
      mbar_init(&sm.full[i], 1);
      mbar_init(&sm.empty[i], kConsumerWarps);
    }
    fence_barrier_init();
  }

  // ---------------------------------------------------------------- producer
  __device__ static void produce(const BwdParams& p, Smem& sm, int n_block, int b, int hkv) {
    int m_lo, m_hi;
    m_range(p, n_block, m_lo, m_hi);
    const int nm = m_hi - m_lo;
    const int iters = p.group * nm;
    if (iters <= 0) return;
    prefetch_tensor_map(&p.tma_q);
    prefetch_tensor_map(&p.tma_do);
    prefetch_tensor_map(&p.tma_k);
    prefetch_tensor_map(&p.tma_v);
    mbar_arrive_expect_tx(&sm.kv_full, kKVBytes);
#pragma unroll
    for (int c = 0; c < KD / CB; ++c)
      tma_load_4d(sm.k + c * BN * CB, &p.tma_k, &sm.kv_full, c * CB, n_block * BN, hkv, b);
#pragma unroll
    for (int c = 0; c < KDv / CB; ++c)
      tma_load_4d(sm.v + c * BN * CB, &p.tma_v, &sm.kv_full, c * CB, n_block * BN, hkv, b);
    PipeState<kBwdStages> st;
    for (int it = 0; it < iters; ++it) {
      const int h = hkv * p.group + it / nm;
      const int m = m_of_step(p, it % nm, m_lo, m_hi);
      mbar_wait(&sm.empty[st.index], st.phase ^ 1);
      uint64_t* bar = &sm.full[st.index];
      mbar_arrive_expect_tx(bar, kStepBytes);
#pragma unroll
      for (int c = 0; c < KD / CB; ++c)
        tma_load_4d(sm.q[st.index] + c * BM * CB, &p.tma_q, bar, c * CB, m * BM, h, b);
#pragma unroll
      for (int c = 0; c < KDv / CB; ++c)
        tma_load_4d(sm.dout[st.index] + c * BM * CB, &p.tma_do, bar, c * CB, m * BM, h, b);
      const int64_t row = (static_cast<int64_t>(b) * p.H + h) * p.n_pad + static_cast<int64_t>(m) * BM;
      bulk_load_1d(sm.lse2[st.index], p.lse2 + row, BM * 4, bar);
      bulk_load_1d(sm.dsum[st.index], p.dsum + row, BM * 4, bar);
      st.advance();
    }
  }

  // ---------------------------------------------------------------- GEMMs
  // acc[64 keys, 32 queries] = X[64 keys, KX] Y[32 queries, KX]^T, both K-major in
  // column blocks of CB (X: BN rows per block; Y: BM rows per block, y_addr at this
  // warpgroup's first query row). A k16 step is 32 B inside a swizzled row.
  template <int KX>
  __device__ static void gemm_scores(float (&acc)[kNS], uint32_t x_addr, uint32_t y_addr) {
    const uint64_t xd = make_smem_desc<SW>(x_addr, 16, 8 * SW);
    const uint64_t yd = make_smem_desc<SW>(y_addr, 16, 8 * SW);
    constexpr int kSteps = CB / 16;  // k16 steps per column block
#pragma unroll
    for (int kk = 0; kk < KX / 16; ++kk) {
      const uint32_t xoff = (kk / kSteps) * BN * SW + (kk % kSteps) * 32;
      const uint32_t yoff = (kk / kSteps) * BM * SW + (kk % kSteps) * 32;
      Wgmma<kQH, Tag>::ss(acc, xd + (xoff >> 4), yd + (yoff >> 4), kk > 0);
    }
  }

  // acc[64 keys, NC] += A[64 keys, 64 queries] Y[64 queries, NC]: A the P^T or dS^T
  // tile (K-major, 128B swizzle), Y the dO or Q tile from this warpgroup's first
  // column block (MN-major: LBO steps column blocks, a k16 step is 16 rows).
  template <int NC>
  __device__ static void gemm_keys(float (&acc)[NC / 2], uint32_t a_addr, uint32_t y_addr) {
    const uint64_t ad = make_smem_desc<128>(a_addr, 16, 1024);
    const uint64_t yd = make_smem_desc<SW>(y_addr, BM * SW, 8 * SW);
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk)
      Wgmma<NC, Tag>::template ss<0, 1>(acc, ad + ((kk * 32) >> 4), yd + ((kk * 16 * SW) >> 4), 1);
  }

  // dq[64 queries, NK] = dS[64 queries, 64 keys] K[64 keys, NK]: dS read from the dS^T
  // tile (MN-major A), K from this warpgroup's first column block (MN-major B).
  __device__ static void gemm_dq(float (&dq)[NK / 2], uint32_t ds_addr, uint32_t k_addr) {
    const uint64_t ad = make_smem_desc<128>(ds_addr, BN * 128, 1024);
    const uint64_t bd = make_smem_desc<SW>(k_addr, BN * SW, 8 * SW);
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
      Wgmma<NK, Tag>::template ss<1, 1>(dq, ad + ((kk * 2048) >> 4), bd + ((kk * 16 * SW) >> 4), kk > 0);
  }

  // dQ half -> workspace block `blk` (accumulator order, bwd_params.h). Deterministic:
  // after the key blocks before this one (the block's counter equals `rank`), then
  // the counter is bumped once every add of the warpgroup is performed.
  __device__ static void add_dq(const BwdParams& p, const float (&dq)[NK / 2], int64_t blk, int rank, int tid,
                                int w) {
    float* dst = p.dq_acc + blk * (BM * NK) + 4 * tid;
    if (p.deterministic) {
      if (tid == 0)
        while (ld_acquire_gpu(p.dq_sem + blk) != rank) {
        }
      named_barrier_sync(kBwdDqBarrier + w, 128);
    }
#pragma unroll
    for (int jb = 0; jb < NK / 8; ++jb)
      red_add_v4(dst + jb * 512, make_float4(dq[4 * jb], dq[4 * jb + 1], dq[4 * jb + 2], dq[4 * jb + 3]));
    if (p.deterministic) {
      __threadfence();
      named_barrier_sync(kBwdDqBarrier + w, 128);
      if (tid == 0) red_release_gpu_add(p.dq_sem + blk, 1);
    }
  }

  // ---------------------------------------------------------------- consumer
  __device__ static void consume(const BwdParams& p, Smem& sm, int w, int n_block, int b, int hkv) {
    const int tid = threadIdx.x % 128;
    const int warp = tid / 32, lane = tid % 32;
    int m_lo, m_hi;
    m_range(p, n_block, m_lo, m_hi);
    const int nm = m_hi - m_lo;
    const int iters = p.group * nm;
    const int key0 = n_block * BN + 16 * warp + lane / 4;  // key of this thread's fragment row 0 (row 1: +8)
    const int qlane = 2 * (lane % 4);

    float dk[NK / 2], dv[NV / 2];
#pragma unroll
    for (int i = 0; i < NK / 2; ++i) dk[i] = 0.f;
#pragma unroll
    for (int i = 0; i < NV / 2; ++i) dv[i] = 0.f;

    if (iters > 0) {
      mbar_wait(&sm.kv_full, 0);
      const Band<true> bd = band(p);
      const uint32_t k_addr = smem_u32(sm.k), v_addr = smem_u32(sm.v);
      const uint32_t dq_b_addr = k_addr + (w * NK / CB) * BN * SW;  // K's columns of this warpgroup's dQ half
      constexpr float kLog2e = 1.4426950408889634f;
      const bool alibi = p.alibi != nullptr;
      PipeState<kBwdStages> st;
      for (int it = 0; it < iters; ++it) {
        const int h = hkv * p.group + it / nm;
        const int m = m_of_step(p, it % nm, m_lo, m_hi);
        const float slope = alibi ? p.alibi[b * p.alibi_sb + h * p.alibi_sh] : 0.f;
        const bool masked =
            bd.partial(m * BM, min(m * BM + BM, p.N) - 1, n_block * BN, n_block * BN + BN - 1);
        const int q0 = m * BM + w * kQH + qlane;  // query of this thread's column 0
        const uint32_t q_addr = smem_u32(sm.q[st.index]);
        const uint32_t do_addr = smem_u32(sm.dout[st.index]);
        const float* lse_s = sm.lse2[st.index] + w * kQH;
        const float* dsum_s = sm.dsum[st.index] + w * kQH;

        mbar_wait(&sm.full[st.index], st.phase);
        float s[kNS], dp[kNS];
        wgmma_fence();
        gemm_scores<KD>(s, k_addr, q_addr + w * kQH * SW);
        wgmma_commit();
        gemm_scores<KDv>(dp, v_addr, do_addr + w * kQH * SW);
        wgmma_commit();
        wgmma_wait<1>();
        fence_regs(s);

        // Masked steps: the queries each of this thread's two keys sees, relative to
        // q0, so the element test is two compares against compile-time offsets.
        int q_lo[2] = {0, 0}, q_hi[2] = {-1, -1};
        if (masked) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int key = key0 + 8 * r;
            if (key >= p.S) continue;  // no query sees it: empty range
            bd.query_range_from(key, q0, q_lo[r], q_hi[r]);
          }
        }
        // P^T. Element e: key key0 + 8*((e>>1)&1), query q0 + 8*(e>>2) + (e&1).
        // Softcap: s keeps t = tanh(.) for dS's (1 - t^2).
        float pr[kNS];
        auto probs = [&](auto kSoftcap, auto kAlibi, auto kMasked) {
#pragma unroll
          for (int jb = 0; jb < kNS / 4; ++jb) {
            const float2 l2 = ld_shared_f2(lse_s + 8 * jb + qlane);
#pragma unroll
            for (int e = 4 * jb; e < 4 * jb + 4; ++e) {
              const float lse2 = (e & 1) ? l2.y : l2.x;
              float y;
              if constexpr (decltype(kSoftcap)::value) {
                s[e] = tanh_approx(s[e] * p.cap_arg);
                y = p.softcap * s[e];
              } else {
                y = s[e] * p.scale;
              }
              if constexpr (decltype(kAlibi)::value) {
                const int key = key0 + 8 * ((e >> 1) & 1);
                const int qry = q0 + 8 * (e >> 2) + (e & 1);
                y = fmaf(-slope, fabsf(static_cast<float>(qry + p.diag_offset - key)), y);
              }
              if constexpr (decltype(kSoftcap)::value || decltype(kAlibi)::value)
                pr[e] = ex2_approx(fmaf(y, kLog2e, -lse2));
              else
                pr[e] = ex2_approx(fmaf(s[e], p.scale_log2, -lse2));
              if constexpr (decltype(kMasked)::value) {
                const int r = (e >> 1) & 1, c = 8 * (e >> 2) + (e & 1);
                if (c < q_lo[r] || c > q_hi[r]) pr[e] = 0.f;
              }
            }
          }
        };
        if (p.softcap_on)
          with_flags(alibi, masked, [&](auto a, auto mk) { probs(std::true_type{}, a, mk); });
        else
          with_flags(alibi, masked, [&](auto a, auto mk) { probs(std::false_type{}, a, mk); });

        wgmma_wait<0>();
        fence_regs(dp);
        uint32_t pf[kNP], dsf[kNP];
        auto grads = [&](auto kSoftcap) {
#pragma unroll
          for (int jb = 0; jb < kNS / 4; ++jb) {
            const float2 dd = ld_shared_f2(dsum_s + 8 * jb + qlane);
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              float ds[2];
#pragma unroll
              for (int c = 0; c < 2; ++c) {
                const int e = 4 * jb + 2 * r + c;
                ds[c] = pr[e] * (dp[e] - (c ? dd.y : dd.x));
                if constexpr (decltype(kSoftcap)::value) ds[c] *= fmaf(-s[e], s[e], 1.f);
              }
              pf[2 * jb + r] = pack2<Elem>(pr[4 * jb + 2 * r], pr[4 * jb + 2 * r + 1]);
              dsf[2 * jb + r] = pack2<Elem>(ds[0], ds[1]);
            }
          }
        };
        if (p.softcap_on)
          grads(std::true_type{});
        else
          grads(std::false_type{});

        // This warpgroup's 32 query columns of P^T and dS^T [keys][queries] into
        // buffer it&1: rows 16*warp + lane/4 (+8), 2 queries per 32-bit store,
        // 128B swizzle (16 B chunk ^= row % 8): 8 rows x 4 lanes hit 32 banks.
        {
          const uint32_t pt_tile = smem_u32(sm.pt[it & 1]);
          const uint32_t ds_tile = smem_u32(sm.dst[it & 1]);
#pragma unroll
          for (int jb = 0; jb < kNS / 4; ++jb) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const int row = 16 * warp + lane / 4 + 8 * r;
              const int off = row * 128 + (((w * (kQH / 8) + jb) ^ (row % 8)) << 4) + 4 * (lane % 4);
              st_shared_u32(pt_tile + off, pf[2 * jb + r]);
              st_shared_u32(ds_tile + off, dsf[2 * jb + r]);
            }
          }
        }
        fence_proxy_async();
        // Both halves written. A warpgroup reaching step i's barrier has finished step
        // i-2's GEMMs (wait<0> below), the last readers of this buffer.
        named_barrier_sync(kBwdDsBarrier, 128 * kBwdConsumerWGs);

        // dQ first, in its own commit group, so its adds run while dV and dK do.
        float dq[NK / 2];
        wgmma_fence();
        gemm_dq(dq, smem_u32(sm.dst[it & 1]), dq_b_addr);
        wgmma_commit();
        gemm_keys<NV>(dv, smem_u32(sm.pt[it & 1]), do_addr + (w * NV / CB) * BM * SW);
        wgmma_commit();
        gemm_keys<NK>(dk, smem_u32(sm.dst[it & 1]), q_addr + (w * NK / CB) * BM * SW);
        wgmma_commit();
        wgmma_wait<2>();
        fence_regs(dq);
        add_dq(p, dq, dq_block(p, b, h, m) + w, p.deterministic ? rank_in(p, n_block, m) : 0, tid, w);
        wgmma_wait<0>();  // dV, dK: this stage's Q and dO are free
        fence_regs(dv);
        fence_regs(dk);
        warp_release(&sm.empty[st.index]);
        st.advance();
      }
    }

    // dK (times scale) and dV: this warpgroup's half of the columns of all 64 keys.
    if (p.dkv_bulk) {
      store_dkv_bulk(p, sm, w, n_block, b, hkv, key0, qlane, dk, dv);
      return;
    }
    store_key_rows<NK>(static_cast<Elem*>(p.dk) + b * p.dk_sb + hkv * p.dk_sh, p.dk_sn, key0, p.S, w * NK, qlane,
                       p.d_store_k, dk, p.scale);
    store_key_rows<NV>(static_cast<Elem*>(p.dv) + b * p.dv_sb + hkv * p.dv_sh, p.dv_sn, key0, p.S, w * NV, qlane,
                       p.d_store_v, dv, 1.f);
  }
};

template <int KD, int KDv, class Elem>
__global__ void __launch_bounds__(kBwdThreads, 1) bwd_wide_kernel(const __grid_constant__ BwdParams p) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // other archs of a multi-arch build: never selected (cuda_sm90_backward_supports)
#elif defined(__CUDA_ARCH__)
  using ML = BwdWideMainloop<KD, KDv, Elem>;
  extern __shared__ uint8_t smem_raw[];
  auto& sm = *reinterpret_cast<typename ML::Smem*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) &
                                                    ~static_cast<uintptr_t>(1023));
  if (threadIdx.x == 0) ML::init_barriers(sm);
  __syncthreads();
  int n_block, hkv, b;
  bwd_tile(p, n_block, hkv, b);
  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {
    setmaxnreg_dec<kBwdProducerRegs>();
    if (threadIdx.x == 0) ML::produce(p, sm, n_block, b, hkv);
  } else {
    setmaxnreg_inc<kBwdConsumerRegs>();
    ML::consume(p, sm, warpgroup - 1, n_block, b, hkv);
  }
#endif
}

template <int KD, int KDv, class Elem>
cudaError_t launch_bwd_wide(const BwdParams& p, dim3 grid, cudaStream_t stream) {
  constexpr auto kernel = bwd_wide_kernel<KD, KDv, Elem>;
  constexpr int smem = static_cast<int>(sizeof(BwdWideSmem<KD, KDv, Elem>)) + 1024;
  cudaError_t err = raise_smem_limit<kernel>(smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, kBwdThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace steelattn::sm90
