// Split-KV decode kernel (fp16 / bf16, sm_80+) and the combine kernel that merges the
// splits by their LSE.
//
// One CTA = 4 warps = one row group (16 query rows sharing a KV head) x one key split of
// one batch entry. The four warps take the split's key tiles round-robin, each with its
// own cp.async pipeline (no CTA barrier in the main loop), and run Q.K^T and P.V on
// mma.sync m16n8k16 with the row group's Q fragments held in registers. At the end the
// warps merge their (max, sum, O) through shared memory.
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>

#include "cuda/generic/mma_sm80.cuh"
#include "decode_params.h"
#include "kv_swizzle.h"

namespace steelattn::cuda_decode {

using cuda_generic::cp_async_16;
using cuda_generic::cp_async_commit;
using cuda_generic::cp_async_wait;
using cuda_generic::acc_as_a_fragment;
using cuda_generic::Elem;
using cuda_generic::ldmatrix_x4;
using cuda_generic::ldmatrix_x4_trans;
using cuda_generic::mma_16816;
using cuda_generic::smem_addr;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16;  // query rows per CTA (one m16 tile)
constexpr int kPad = 8;    // Q row padding: ldmatrix rows land on distinct banks
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kSmemPerSm = 227 * 1024;
constexpr int kMaxSplits = 128;  // key splits per (b, hkv, row group): the combine kernel's weights

// Paged full tiles (load_full_kv_tile). A tile inside one page, or made of 16-row segments
// each inside one page (pages a multiple of 16 keys: the common sizes), copies like a dense
// tile, from a pointer stepped by rows per segment. Any other tile: each lane turns its own
// key's (page, slot) into byte offsets in the K and V pools once per tile and parks them in
// a per-warp row table in shared memory; the half-warp copying a row reads them back with
// one broadcast 16-byte load (per-row shuffles made ptxas wrap each in a divergence check).
// Power-of-two pages shift instead of dividing. History in NOTES.md, sessions 9-10: per-row
// shuffles and 64-bit multiply-adds ran 68.1M instructions at B8 S32k page 16 (dense 40.7M)
// and streamed at 77% of DRAM peak; the row table, 49.2M and 81%.
// Per warp, a paged tile's row table: (K, V) byte offsets of each of its (up to 32) keys.
constexpr int kRowTableBytes = kWarps * 32 * 16;

// Shared memory of a CTA (Q rows, then each warp's stages of K and V tiles), and how many
// CTAs fit on an SM beside the per-CTA reserve; the host picks splits from the same numbers.
constexpr size_t smem_bytes(int dpad, int keys, int stages) {
  return size_t(2) * (kRows * (dpad + kPad) + kWarps * stages * 2 * keys * dpad) + kRowTableBytes;
}

// K/V rows in shared memory: unpadded, XOR-swizzled (kv_swizzle.h); rows start 128-byte
// aligned (Cfg's asserts; the kernel traps on a misaligned dynamic shared memory base).
__device__ __forceinline__ void cp_async_16_to(uint32_t saddr, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(saddr), "l"(gmem));
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t saddr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(saddr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t saddr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(saddr));
}
constexpr int ctas_per_sm(size_t smem) {
  return int(kSmemPerSm / (smem + 1024)) < 1 ? 1 : int(kSmemPerSm / (smem + 1024)) > 4 ? 4
                                                                                        : int(kSmemPerSm / (smem + 1024));
}

// A warp tile is kKeys keys of K and of V; kStages tiles per warp are in flight or in use.
// Decode is bound by the K/V read, and a warp's work per tile is a serial chain (mma,
// shuffles, exp2), so what counts is warps per SM and bytes in flight (decode_api.cu picks).
template <int kDPad, int kKeys_, int kStages_>
struct Cfg {
  static constexpr int kKeys = kKeys_;
  static constexpr int kStages = kStages_;
  static constexpr int kD = kDPad;          // a K/V row in shared memory (kv_swizzle.h)
  static constexpr int kLdQ = kDPad + kPad;  // a Q row
  static constexpr int kStageElems = 2 * kKeys * kD;  // K then V
  static constexpr int kWarpElems = kStages * kStageElems;
  static constexpr size_t kSmemBytes = smem_bytes(kDPad, kKeys, kStages);
  static constexpr int kCtasPerSm = ctas_per_sm(kSmemBytes);
  static_assert(kKeys % 16 == 0, "a warp tile is a whole number of mma k-steps");
  static_assert(kSmemBytes == size_t(2) * (kRows * kLdQ + kWarps * kWarpElems) + kRowTableBytes,
                "the layout the kernel indexes");
  static_assert(kRows * kLdQ * 2 % 128 == 0 && kStageElems * 2 % 128 == 0, "K/V rows start 128-byte aligned");
  // The end-of-CTA merge reuses the K/V buffers: per warp 16 rows of O (fp32) + max + sum.
  static_assert(kRows * (kDPad + 2) * 4 <= kWarpElems * 2, "merge scratch fits a warp's buffers");
};

// 16-byte async copy; src_bytes = 0 writes zeros (rows past the end, columns past D).
__device__ __forceinline__ void cp_async_16_zfill(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes));
}

// Programmatic dependent launch (sm_90+; no-ops before): a kernel launched with the
// programmatic-serialization attribute starts while the previous kernel of the stream
// finishes and waits here, before its first read of that kernel's results, for it to
// complete and its writes to be visible. launch_dependents lets the next such kernel start.
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Key j's page-table column (paged caches).
__device__ __forceinline__ int page_index(const DecodeParams& p, int j) {
  return p.page_shift >= 0 ? j >> p.page_shift : j / p.page_size;
}

// Paged caches: the page of key row `lane` of a tile, looked up by lane `lane` (< kKeys) one
// tile ahead of its load so the block-table read's latency hides behind a tile of math; the
// loader shuffles it (and the row in the page) to the lanes that copy the row.
template <bool kPaged>
__device__ __forceinline__ int page_of(const DecodeParams& p, int b, int j, int n_end) {
  return kPaged && j < n_end ? __ldg(p.block_table + b * p.bt_stride + page_index(p, j)) : 0;
}

// A whole warp tile at D = Dv = kDPad: each lane copies one 16-byte chunk of every
// (32 / chunks per row)-th row, with no per-chunk index math or predicates (ncu at B8 S32k:
// ~700 instructions per tile per warp, the warps' own chains at 7 cycles per instruction
// taking the whole kernel time). Dense: from a pointer stepped by rows. Paged: through the
// page and in-page row that lane r (key n0 + r) holds, stepped per run of keys inside one
// page where it can, else through `row_table` (this warp's; see kRowTableBytes).
template <typename T, typename C, bool kPaged>
__device__ __forceinline__ void load_full_kv_tile(T* sK, T* sV, const DecodeParams& p, int entry, int hk, int n0,
                                                  int lane, int lane_page, int lane_row, longlong2* row_table) {
  using Swz = KvSwizzle<C::kD>;
  constexpr int kChunks = Swz::kChunks;
  constexpr int kRowsPerStep = Swz::kRowsPerStep;
  static_assert(32 % kChunks == 0 && C::kKeys % kRowsPerStep == 0 && C::kKeys <= 32, "whole rows per warp step");
  const int r0 = lane / kChunks, c = lane % kChunks;
  const T* gk = static_cast<const T*>(p.k) + hk * p.k_stride[1] + c * 8;
  const T* gv = static_cast<const T*>(p.v) + hk * p.v_stride[1] + c * 8;
  const uint32_t lane_slot = Swz::copy_lane(lane);
  const uint32_t k_base = smem_addr(sK), v_base = smem_addr(sV);
  auto smem_off = [&](int it) { return Swz::copy_step(lane_slot, it); };
  // Consecutive keys from the lane's first row, warp steps [it0, it0 + its) of the tile: a
  // dense cache, or a run of keys inside one page.
  auto stepped = [&](const T* gk_row, const T* gv_row, int it0, int its) {
    const int64_t k_step = kRowsPerStep * p.k_stride[2], v_step = kRowsPerStep * p.v_stride[2];
#pragma unroll
    for (int it = 0; it < its; ++it) {
      cp_async_16_to(k_base + smem_off(it0 + it), gk_row);
      cp_async_16_to(v_base + smem_off(it0 + it), gv_row);
      gk_row += k_step;
      gv_row += v_step;
    }
  };
  if constexpr (!kPaged) {
    stepped(gk + int64_t(entry) * p.k_stride[0] + int64_t(n0 + r0) * p.k_stride[2],
            gv + int64_t(entry) * p.v_stride[0] + int64_t(n0 + r0) * p.v_stride[2], 0, C::kKeys / kRowsPerStep);
  } else {
    const int slot0 = __shfl_sync(0xffffffffu, lane_row, 0);
    if (slot0 + C::kKeys <= p.page_size) {  // warp-uniform: the tile lies in one page
      const int64_t page = __shfl_sync(0xffffffffu, lane_page, 0);
      stepped(gk + page * p.k_stride[0] + int64_t(slot0 + r0) * p.k_stride[2],
              gv + page * p.v_stride[0] + int64_t(slot0 + r0) * p.v_stride[2], 0, C::kKeys / kRowsPerStep);
      return;
    }
    // Segments of kSeg keys, each inside one page (warp-uniform): stepped per segment.
    constexpr int kSeg = C::kKeys < 16 ? C::kKeys : 16;
    static_assert(kSeg % kRowsPerStep == 0 && C::kKeys % kSeg == 0, "whole warp steps per segment");
    if (p.page_size % kSeg == 0 && slot0 % kSeg == 0) {
#pragma unroll
      for (int sg = 0; sg < C::kKeys / kSeg; ++sg) {
        const int64_t page = __shfl_sync(0xffffffffu, lane_page, sg * kSeg);
        const int64_t slot = __shfl_sync(0xffffffffu, lane_row, sg * kSeg) + r0;
        stepped(gk + page * p.k_stride[0] + slot * p.k_stride[2], gv + page * p.v_stride[0] + slot * p.v_stride[2],
                sg * (kSeg / kRowsPerStep), kSeg / kRowsPerStep);
      }
      return;
    }
    // Lane r parks key n0 + r's byte offsets in the pools; the half-warp that copies row r
    // reads them back (one broadcast load per row).
    __syncwarp();  // every lane has read the previous tile's table
    if (lane < C::kKeys)
      row_table[lane] = make_longlong2(
          (int64_t(lane_page) * p.k_stride[0] + int64_t(lane_row) * p.k_stride[2]) * int64_t(sizeof(T)),
          (int64_t(lane_page) * p.v_stride[0] + int64_t(lane_row) * p.v_stride[2]) * int64_t(sizeof(T)));
    __syncwarp();
    const char* gkb = reinterpret_cast<const char*>(gk);
    const char* gvb = reinterpret_cast<const char*>(gv);
#pragma unroll
    for (int it = 0; it < C::kKeys / kRowsPerStep; ++it) {
      const longlong2 o = row_table[r0 + it * kRowsPerStep];
      cp_async_16_to(k_base + smem_off(it), gkb + o.x);
      cp_async_16_to(v_base + smem_off(it), gvb + o.y);
    }
  }
}

// One warp tile of K and V (kKeys keys from n0; keys >= n_end and columns >= D / Dv zero).
// `lane_page`: page_of key n0 + lane (paged caches only).
template <typename T, typename C, bool kPaged>
__device__ __forceinline__ void load_kv_tile(T* sK, T* sV, const DecodeParams& p, int b, int entry, int hk,
                                             int n0, int n_end, int lane, int lane_page, longlong2* row_table) {
  const int lane_row = kPaged ? n0 + lane - page_index(p, n0 + lane) * p.page_size : 0;  // the key's slot
  if (n0 + C::kKeys <= n_end && p.D == C::kD && p.Dv == C::kD)  // warp-uniform
    return load_full_kv_tile<T, C, kPaged>(sK, sV, p, entry, hk, n0, lane, lane_page, lane_row, row_table);
  constexpr int kChunks = C::kD / 8;  // 16-byte chunks per row
  static_assert(C::kKeys * kChunks % 32 == 0 && C::kKeys <= 32, "every lane runs every iteration (shuffles)");
  const T* gk = static_cast<const T*>(p.k);
  const T* gv = static_cast<const T*>(p.v);
#pragma unroll 4
  for (int idx = lane; idx < C::kKeys * kChunks; idx += 32) {
    const int r = idx / kChunks, c = idx % kChunks;
    const int j = n0 + r;
    const bool row_ok = j < n_end;
    int64_t k_off, v_off;  // the row's offset in the K and V pools or caches
    if constexpr (kPaged) {
      const int64_t page = __shfl_sync(0xffffffffu, lane_page, r), row = __shfl_sync(0xffffffffu, lane_row, r);
      k_off = page * p.k_stride[0] + hk * p.k_stride[1] + row * p.k_stride[2];
      v_off = page * p.v_stride[0] + hk * p.v_stride[1] + row * p.v_stride[2];
    } else {
      k_off = int64_t(entry) * p.k_stride[0] + hk * p.k_stride[1] + int64_t(j) * p.k_stride[2];
      v_off = int64_t(entry) * p.v_stride[0] + hk * p.v_stride[1] + int64_t(j) * p.v_stride[2];
    }
    const T* krow = row_ok ? gk + k_off : gk;
    const T* vrow = row_ok ? gv + v_off : gv;
    const bool k_ok = row_ok && c * 8 < p.D, v_ok = row_ok && c * 8 < p.Dv;
    const int off = KvSwizzle<C::kD>::offset(r, c);
    cp_async_16_zfill(sK + off, k_ok ? krow + c * 8 : gk, k_ok ? 16 : 0);
    cp_async_16_zfill(sV + off, v_ok ? vrow + c * 8 : gv, v_ok ? 16 : 0);
  }
}

// kPaged: K/V rows are found through p.block_table (a separate instantiation, so the dense
// kernel keeps its registers).
template <typename T, int kDPad, int kKeys, int kStages, bool kPaged>
__global__ void __launch_bounds__(kThreads, (Cfg<kDPad, kKeys, kStages>::kCtasPerSm))
    decode_split_kernel(const DecodeParams p) {
  using C = Cfg<kDPad, kKeys, kStages>;
  constexpr int kLdQ = C::kLdQ;
  constexpr int kNtS = kKeys / 8;   // S n-tiles per warp tile
  constexpr int kNtO = kDPad / 8;   // O n-tiles
  constexpr int kDSteps = kDPad / 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (smem_addr(smem_raw) & 127) __trap();  // the K/V swizzle needs 128-byte aligned rows (kv_swizzle.h)
  T* sW = sQ + kRows * kLdQ + warp * C::kWarpElems;  // this warp's stages
  // This warp's paged row table (load_full_kv_tile), after all warps' stages.
  longlong2* row_table = reinterpret_cast<longlong2*>(sQ + kRows * kLdQ + kWarps * C::kWarpElems) + warp * 32;

  // The combine kernel may start now (it waits for this grid's end); nothing is read before
  // the previous kernel of the stream (an append into the cache, say) has finished.
  allow_next_grid();
  wait_for_previous_grid();
  // blockIdx.x -> (row group, split, hk, b): the row groups of one key range run side by side
  // and share its K/V through L2.
  int bid = blockIdx.x;
  const int rg = bid % p.row_groups;
  bid /= p.row_groups;
  const int split = bid % p.num_splits;
  bid /= p.num_splits;
  const int hk = bid % p.Hkv;
  const int b = bid / p.Hkv;
  const int entry = p.kv_batch_idx ? p.kv_batch_idx[b] : b;
  // Lengths past the capacity (not checked on the device) are clamped: no read past the cache.
  const int L = p.seqlens_k ? max(0, min(p.seqlens_k[b], p.S)) : p.S;
  const int off = int((p.ragged ? L - p.N : 0) + p.diag_offset);  // query i sits at key i + off
  const int wl = p.window_left < 0 ? -1 : int(min(p.window_left, int64_t(INT32_MAX / 4)));
  const int wr = p.window_right < 0 ? -1 : int(min(p.window_right, int64_t(INT32_MAX / 4)));

  // Rows of this CTA and the query positions they span.
  const int r_begin = rg * kRows;
  const int r_count = min(kRows, p.rows - r_begin);
  int i_lo = 0, i_hi = p.N - 1;
  if (r_count < p.N) {
    const int a = r_begin % p.N, z = (r_begin + r_count - 1) % p.N;
    if (a <= z) i_lo = a, i_hi = z;
  }
  // Keys any of them may see, and this split's share (whole tiles).
  int k_lo = 0, k_hi = L;
  if (wl >= 0) k_lo = max(k_lo, i_lo + off - wl);
  if (wr >= 0) k_hi = min(k_hi, i_hi + off + wr + 1);
  int n_begin = k_lo, n_end = k_lo;
  if (k_hi > k_lo) {
    const int tiles = (k_hi - k_lo + kKeys - 1) / kKeys;
    const int per_split = (tiles + p.num_splits - 1) / p.num_splits;
    n_begin = min(k_hi, k_lo + split * per_split * kKeys);
    n_end = min(k_hi, n_begin + per_split * kKeys);
  }

  // Q rows -> shared (zero rows past r_count and columns past D), then A fragments.
  {
    constexpr int kChunks = kDPad / 8;
    const T* gq = static_cast<const T*>(p.q);
    for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
      const int r = idx / kChunks, c = idx % kChunks;
      const int row = r_begin + r;
      const bool ok = r < r_count && c * 8 < p.D;
      const T* src = gq;
      if (ok) {
        const int h = hk * p.group + row / p.N, i = row % p.N;
        src = gq + b * p.q_stride[0] + h * p.q_stride[1] + i * p.q_stride[2] + c * 8;
      }
      cp_async_16_zfill(sQ + r * kLdQ + c * 8, src, ok ? 16 : 0);
    }
    cp_async_commit();
  }
  // Per-thread rows r0 = lane / 4 and r1 = r0 + 8: their visible keys [lo, hi) and ALiBi.
  int vis_lo[2], vis_hi[2], diag[2];
  float slope[2];
  const uint8_t* mask_row[2];  // the row's keep-mask bytes (null: no mask, or a padding row)
#pragma unroll
  for (int t = 0; t < 2; ++t) {
    const int r = (lane >> 2) + 8 * t, row = r_begin + r;
    const int h = hk * p.group + (row < p.rows ? row / p.N : 0), i = row < p.rows ? row % p.N : 0;
    diag[t] = i + off;
    vis_lo[t] = wl >= 0 ? max(0, diag[t] - wl) : 0;
    vis_hi[t] = wr >= 0 ? min(L, diag[t] + wr + 1) : L;
    if (r >= r_count) vis_hi[t] = vis_lo[t];  // padding rows see nothing
    slope[t] = p.alibi ? p.alibi[b * p.alibi_stride[0] + h * p.alibi_stride[1]] * kLog2e : 0.0f;
    mask_row[t] = p.mask && r < r_count
                      ? p.mask + b * p.mask_stride[0] + h * p.mask_stride[1] + int64_t(i) * p.mask_stride[2]
                      : nullptr;
  }
  // Keys every row of the CTA sees: tiles inside need no per-element test.
  // (Padding rows do not count: their scores are never written.)
  int all_lo = INT_MIN, all_hi = INT_MAX;
#pragma unroll
  for (int t = 0; t < 2; ++t)
    if ((lane >> 2) + 8 * t < r_count) all_lo = max(all_lo, vis_lo[t]), all_hi = min(all_hi, vis_hi[t]);
#pragma unroll
  for (int o = 4; o < 32; o <<= 1) {
    all_lo = max(all_lo, __shfl_xor_sync(0xffffffffu, all_lo, o));
    all_hi = min(all_hi, __shfl_xor_sync(0xffffffffu, all_hi, o));
  }
  const bool plain = p.softcap <= 0.0f && p.alibi == nullptr && p.mask == nullptr;
  const float scale_log2 = p.scale * kLog2e;

  // This warp's tiles: n0 = n_begin + (warp + kWarps * t) * kKeys.
  const int n_tiles = (n_end - n_begin + kKeys - 1) / kKeys;
  const int my_tiles = n_tiles > warp ? (n_tiles - warp + kWarps - 1) / kWarps : 0;
  auto tile_n0 = [&](int t) { return n_begin + (warp + kWarps * t) * kKeys; };
  auto stage = [&](int t) { return sW + (t % kStages) * C::kStageElems; };
  // Paged: the page of the next tile to load, fetched a tile ahead (see page_of).
  auto page_ahead = [&](int t) { return page_of<kPaged>(p, b, t < my_tiles ? tile_n0(t) + lane : n_end, n_end); };
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < my_tiles)
      load_kv_tile<T, C, kPaged>(stage(t), stage(t) + kKeys * kDPad, p, b, entry, hk, tile_n0(t), n_end, lane,
                                  page_ahead(t), row_table);
    cp_async_commit();
  }
  int next_page = page_ahead(kStages - 1);

  cp_async_wait<kStages - 1>();  // Q has landed (the oldest group)
  __syncthreads();
  // Q's A fragments stay in registers up to D = 128; at 256 they would push O out of them,
  // so they are re-read from shared memory per k-step.
  constexpr bool kQInRegs = kDPad <= 128;
  constexpr int kQRegSteps = kQInRegs ? kDSteps : 1;
  uint32_t qa[kQRegSteps][4];
  const T* a_ptr = sQ + (lane & 15) * kLdQ + (lane >> 4) * 8;
  if constexpr (kQInRegs) {
#pragma unroll
    for (int kk = 0; kk < kDSteps; ++kk) ldmatrix_x4(qa[kk], a_ptr + kk * 16);
  }

  float o[kNtO][4];
#pragma unroll
  for (int nt = 0; nt < kNtO; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;
  // Softmax state in the log2 domain (scores pre-multiplied by log2(e)).
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};  // per-thread partial; quad-reduced at the end
  const float softcap = p.softcap;

  for (int t = 0; t < my_tiles; ++t) {
    {  // keep kStages - 1 tiles in flight
      const int tn = t + kStages - 1;
      if (tn < my_tiles)
        load_kv_tile<T, C, kPaged>(stage(tn), stage(tn) + kKeys * kDPad, p, b, entry, hk, tile_n0(tn), n_end, lane,
                                    next_page, row_table);
      cp_async_commit();
      next_page = page_ahead(tn + 1);
    }
    cp_async_wait<kStages - 1>();
    __syncwarp();
    const T* sK = stage(t);
    const T* sV = sK + kKeys * kDPad;
    const int n0 = tile_n0(t);

    float s[kNtS][4];
#pragma unroll
    for (int nt = 0; nt < kNtS; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
    using Swz = KvSwizzle<kDPad>;
    const uint32_t swz = Swz::xor_bits(lane);
    const uint32_t k_lane = smem_addr(sK) + Swz::k_lane(lane);
#pragma unroll
    for (int kk = 0; kk < kDSteps; ++kk) {
      if (kk * 16 >= p.D) break;  // warp-uniform: padding columns are zero
      uint32_t qs[4];
      if constexpr (kQInRegs) {
        qs[0] = qa[kk][0], qs[1] = qa[kk][1], qs[2] = qa[kk][2], qs[3] = qa[kk][3];
      } else {
        ldmatrix_x4(qs, a_ptr + kk * 16);
      }
#pragma unroll
      for (int np = 0; np < kNtS / 2; ++np) {
        uint32_t bk[4];
        ldsm_x4(bk, Swz::k_read(k_lane, swz, kk, np));
        mma_16816<T>(s[2 * np], qs, bk[0], bk[1]);
        mma_16816<T>(s[2 * np + 1], qs, bk[2], bk[3]);
      }
    }

    // Scores in the log2 domain: scale, softcap, ALiBi, then the row's visible keys. A tile
    // every row sees whole, without softcap or ALiBi, is one multiply per element.
    if (plain && n0 >= all_lo && n0 + kKeys <= all_hi) {
#pragma unroll
      for (int nt = 0; nt < kNtS; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] *= scale_log2;
    } else {
#pragma unroll
      for (int nt = 0; nt < kNtS; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int t2 = e >> 1;
          const int j = n0 + nt * 8 + 2 * (lane & 3) + (e & 1);
          float x = s[nt][e] * p.scale;
          if (softcap > 0.0f) x = softcap * tanhf(x / softcap);
          x *= kLog2e;
          if (p.alibi) x -= slope[t2] * float(abs(diag[t2] - j));
          const bool keep = j >= vis_lo[t2] && j < vis_hi[t2] &&
                            (mask_row[t2] == nullptr || mask_row[t2][int64_t(j) * p.mask_stride[3]] != 0);
          s[nt][e] = keep ? x : -INFINITY;
        }
      }
    }
    float tile_max[2] = {row_max[0], row_max[1]};
#pragma unroll
    for (int nt = 0; nt < kNtS; ++nt) {
      tile_max[0] = fmaxf(tile_max[0], fmaxf(s[nt][0], s[nt][1]));
      tile_max[1] = fmaxf(tile_max[1], fmaxf(s[nt][2], s[nt][3]));
    }
    float neg_max[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
    }
    // Rescale O and the sums only when some row's maximum moved (after the first few tiles
    // it rarely does): otherwise alpha is exactly 1 (or 0 times zeros for rows that have seen
    // nothing yet), and 2 x kNtO x 2 multiplies per tile are saved.
    if (__any_sync(0xffffffffu, tile_max[0] != row_max[0] || tile_max[1] != row_max[1])) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float m_use = tile_max[r] == -INFINITY ? 0.0f : tile_max[r];  // exp2(-inf - 0) = 0, not NaN
        const float alpha = exp2f(row_max[r] - m_use);
        row_max[r] = tile_max[r];
        row_sum[r] *= alpha;
#pragma unroll
        for (int nt = 0; nt < kNtO; ++nt) o[nt][2 * r] *= alpha, o[nt][2 * r + 1] *= alpha;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) neg_max[r] = row_max[r] == -INFINITY ? 0.0f : -row_max[r];
#pragma unroll
    for (int nt = 0; nt < kNtS; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] + neg_max[e >> 1]);
        row_sum[e >> 1] += s[nt][e];
      }
    }

    // O += P . V, P straight from the S accumulators (they are the A fragments).
    const uint32_t v_lane = smem_addr(sV) + Swz::v_lane(lane);
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      uint32_t a[4];
      acc_as_a_fragment<T>(a, s, kk);
#pragma unroll
      for (int np = 0; np < kNtO / 2; ++np) {
        if (np * 16 >= p.Dv) break;  // warp-uniform
        uint32_t bv[4];
        ldsm_x4_trans(bv, Swz::v_read(v_lane, swz, kk, np));
        mma_16816<T>(o[2 * np], a, bv[0], bv[1]);
        mma_16816<T>(o[2 * np + 1], a, bv[2], bv[3]);
      }
    }
    __syncwarp();  // the stage is free for the load issued next iteration
  }
  cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
  }

  // Merge the four warps: each parks (max, sum, O) in its own buffers, then every thread
  // combines some (row, column) cells.
  __syncthreads();
  float* mo = reinterpret_cast<float*>(sW);  // [16][kDPad] O, then [16] max, [16] sum
  float* mm = mo + kRows * kDPad;
  float* ms = mm + kRows;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = (lane >> 2) + 8 * r;
#pragma unroll
    for (int nt = 0; nt < kNtO; ++nt) {
      const int col = nt * 8 + 2 * (lane & 3);
      mo[row * kDPad + col] = o[nt][2 * r];
      mo[row * kDPad + col + 1] = o[nt][2 * r + 1];
    }
    if ((lane & 3) == 0) mm[row] = row_max[r], ms[row] = row_sum[r];
  }
  __syncthreads();
  auto warp_buf = [&](int w) {
    return reinterpret_cast<float*>(sQ + kRows * kLdQ + w * C::kWarpElems);
  };
  const bool direct = p.num_splits == 1;
  for (int idx = threadIdx.x; idx < kRows * p.Dv; idx += kThreads) {
    const int r = idx / p.Dv, col = idx % p.Dv;
    if (r >= r_count) break;  // rows are visited in order
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, warp_buf(w)[kRows * kDPad + r]);
    const float m_use = m == -INFINITY ? 0.0f : m;
    float sum = 0.0f, acc = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float* buf = warp_buf(w);
      const float wgt = exp2f(buf[kRows * kDPad + r] - m_use);
      sum += wgt * buf[kRows * kDPad + kRows + r];
      acc += wgt * buf[r * kDPad + col];
    }
    const float val = sum > 0.0f ? acc / sum : 0.0f;
    const float lse = sum > 0.0f ? (m_use + log2f(sum)) / kLog2e : -INFINITY;  // natural log
    const int row = r_begin + r;
    const int h = hk * p.group + row / p.N, i = row % p.N;
    if (direct) {
      T* out = static_cast<T*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + i * p.out_stride[2];
      out[col] = Elem<T>::from_float(val);
      if (col == 0 && p.lse) p.lse[b * p.lse_stride[0] + h * p.lse_stride[1] + i * p.lse_stride[2]] = lse;
    } else {
      const int64_t cell = ((int64_t(split) * p.B + b) * p.H + h) * p.N + i;
      p.part_out[cell * p.Dv + col] = val;
      if (col == 0) p.part_lse[cell] = lse;
    }
  }
}

// out[b, h, i] = sum over splits of exp(lse_s - lse) * out_s, lse = logsumexp(lse_s);
// one CTA per (b, h, i) row. Thread s reads split s's LSE and the weights go to shared
// memory; then warp w sums splits w, w + 4, ... with independent float4 loads (all of a
// warp's splits in flight at once: a chain of dependent loads per column made an earlier
// version as slow as the split kernel at batch 1), and the four warps' sums are added in
// shared memory. A row no split saw gives zeros and -inf.
constexpr int kCombineThreads = 128;
constexpr int kCombineWarps = kCombineThreads / 32;
template <typename T>
__global__ void __launch_bounds__(kCombineThreads) decode_combine_kernel(const DecodeParams p) {
  static_assert(kMaxSplits <= kCombineThreads, "one split's LSE per thread");
  static_assert(kCombineWarps == 4, "the cross-warp sums below name four warps");
  __shared__ float weights[kMaxSplits];
  __shared__ float red[kCombineWarps];
  __shared__ __align__(16) float partial[kCombineWarps][256];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t cell = blockIdx.x;
  const int64_t stride = int64_t(p.B) * p.H * p.N;  // between splits
  wait_for_previous_grid();

  const float lse_s = tid < p.num_splits ? p.part_lse[tid * stride + cell] : -INFINITY;
  float m = lse_s;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (lane == 0) red[warp] = m;
  __syncthreads();
  m = fmaxf(fmaxf(red[0], red[1]), fmaxf(red[2], red[3]));
  const float m_use = m == -INFINITY ? 0.0f : m;
  const float w = tid < p.num_splits ? exp2f((lse_s - m_use) * kLog2e) : 0.0f;
  if (tid < kMaxSplits) weights[tid] = w;
  float sum = w;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  __syncthreads();  // every warp has read red[] as maxima
  if (lane == 0) red[warp] = sum;
  __syncthreads();
  sum = red[0] + red[1] + red[2] + red[3];
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;

  // Lane columns lane * 4 and 128 + lane * 4 (Dv <= 256, Dv % 8 == 0: whole float4s).
  float4 acc[2] = {make_float4(0.0f, 0.0f, 0.0f, 0.0f), make_float4(0.0f, 0.0f, 0.0f, 0.0f)};
#pragma unroll 4
  for (int s = warp; s < p.num_splits; s += kCombineWarps) {
    const float ws = weights[s];
    const float* src = p.part_out + (s * stride + cell) * p.Dv;
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int col = c * 128 + lane * 4;
      if (col < p.Dv) {
        const float4 x = __ldg(reinterpret_cast<const float4*>(src + col));
        acc[c].x += ws * x.x, acc[c].y += ws * x.y, acc[c].z += ws * x.z, acc[c].w += ws * x.w;
      }
    }
  }
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const int col = c * 128 + lane * 4;
    if (col < p.Dv) *reinterpret_cast<float4*>(&partial[warp][col]) = acc[c];
  }
  __syncthreads();
  const int i = int(cell % p.N), h = int(cell / p.N % p.H), b = int(cell / p.N / p.H);
  T* out = static_cast<T*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + i * p.out_stride[2];
  for (int col = tid; col < p.Dv; col += kCombineThreads)
    out[col] = Elem<T>::from_float((partial[0][col] + partial[1][col] + partial[2][col] + partial[3][col]) * inv);
  if (tid == 0 && p.lse)
    p.lse[b * p.lse_stride[0] + h * p.lse_stride[1] + i * p.lse_stride[2]] = sum > 0.0f ? m_use + logf(sum) : -INFINITY;
}

}  // namespace steelattn::cuda_decode
