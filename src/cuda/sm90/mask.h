// Mask policy of the forward kernel: for a query tile, which key blocks are
// visited at all, which of them need the element test, and the element test
// itself. The arithmetic is the band's (band.h), shared with the backward;
// this adds the forward's tile geometry (GQA-packed tiles span fewer queries).
//
// Blocks wholly outside the band are never loaded; only blocks that straddle
// the band edges or the end of the keys (S % kBlockN) run the element test.
// Block-sparse calls (FwdParams::bm) also skip the key blocks whose mask
// block is inactive: trim() narrows a tile's range to its first and last active
// block and prev() steps from one active block to the next lower one. Only the
// producer walks the mask; it publishes the range and each block in shared memory
// (mainloop.h), so the consumers cannot take other steps.
#pragma once

#include "cuda/sm90/band.h"
#include "cuda/sm90/mask_walk.h"
#include "cuda/sm90/params.h"

namespace steelattn::sm90 {

// trim's walk up from lo, once per tile, 8 entries per load like prev's (H200: the sparse
// forward 3-5% faster than the byte walk, docs/benchmarks/NOTES.md session 9). Not inlined:
// inlined, ptxas serialised the D64 band + softcap sparse forward's wgmmas (C7511); as a
// call the kernels' registers and spills are those of the byte walk. Static: one copy per
// translation unit (the instantiation files would otherwise each define it).
static __device__ __noinline__ int first_active_entry_noinline(const uint8_t* line, int64_t stride, int c, int c_hi) {
  return first_active_entry(line, stride, c, c_hi);
}

// Pack: GQA-packed tiles (params.h) span pack_rows = BlockM / group queries,
// not BlockM; rows below are query indices either way.
template <bool BandOn, int BlockM, int BlockN, bool Pack = false>
struct MaskPolicy {
  Band<BandOn> band;
  int pack_rows;  // read only when Pack

  __device__ MaskPolicy(const FwdParams& p)
      : band{p.N, p.S, p.diag_offset, p.window_left, p.window_right}, pack_rows(p.pack_rows) {}

  // Block-sparse steps read the mask fields straight from the kernel parameters (constant
  // memory), so dense calls pay no registers for them.
  // The mask row of tile (b, h, m_block): its entry for key block n is row[(n / bm_k_tiles) * sk].
  __device__ static __forceinline__ const uint8_t* mask_row(const FwdParams& p, int b, int h, int m_block) {
    return p.bm.mask + b * p.bm.sb + h * p.bm.sh + (m_block / p.bm.q_tiles) * p.bm.sq;
  }

  // The highest active key block <= n (blocks below lo are not searched; returns < lo when
  // none). Dense calls: n itself.
  __device__ static __forceinline__ int prev(const FwdParams& p, int b, int h, int m_block, int n, int lo) {
    if (p.bm.mask == nullptr || n < lo) return n;
    const int kt = p.bm.k_tiles, c0 = n / kt;
    const int c = last_active_entry(mask_row(p, b, h, m_block), p.bm.sk, c0, lo / kt);
    if (c < lo / kt) return lo - 1;
    return c == c0 ? n : c * kt + kt - 1;  // the last tile of an earlier active mask block
  }

  // Narrows [lo, hi) to [lowest active block, highest active block + 1); lo >= hi when the
  // tile has no active block in range. Dense calls: unchanged.
  __device__ static __forceinline__ void trim(const FwdParams& p, int b, int h, int m_block, int& lo, int& hi) {
    if (p.bm.mask == nullptr || lo >= hi) return;
    hi = prev(p, b, h, m_block, hi - 1, lo) + 1;
    if (lo >= hi) {
      lo = hi;
      return;
    }
    const int kt = p.bm.k_tiles, c0 = lo / kt;
    const int c = first_active_entry_noinline(mask_row(p, b, h, m_block), p.bm.sk, c0, (hi - 1) / kt);
    lo = c == c0 ? lo : c * kt;
  }

  // Varlen (varlen.h): the call's policy narrowed to one sequence of n queries and s keys,
  // its diagonal bottom-right at its own lengths (diag_offset + s - n).
  __device__ __forceinline__ MaskPolicy for_sequence(const FwdParams& p, int n, int s) const {
    MaskPolicy m = *this;
    m.band.N = n;
    m.band.S = s;
    m.band.off = p.diag_offset + s - n;
    return m;
  }

  // Queries per tile.
  __device__ __forceinline__ int tile_rows() const {
    if constexpr (Pack)
      return pack_rows;
    else
      return BlockM;
  }

  // Key blocks [lo, hi) that query block m_block touches; lo >= hi when no
  // query of the tile sees any key.
  __device__ void block_range(int m_block, int& lo, int& hi) const {
    const int row_first = m_block * tile_rows();
    band.key_blocks(row_first, min(row_first + tile_rows(), band.N) - 1, BlockN, lo, hi);
  }

  // True when some (row, key) pair of this tile x block is invisible.
  __device__ bool needs_element_mask(int m_block, int n_block) const {
    const int row_first = m_block * tile_rows();
    return band.partial(row_first, min(row_first + tile_rows(), band.N) - 1, n_block * BlockN,
                        n_block * BlockN + BlockN - 1);
  }

  // Unpacked band tiles: true when no query of rows [row_first, row_first + 63]
  // (one consumer warpgroup's rows) sees any key of the upper half of block
  // n_block (the causal diagonal block for the tile's first 64 rows).
  __device__ bool upper_half_invisible(int row_first, int n_block) const {
    if constexpr (!BandOn || Pack) {
      return false;
    } else {
      return row_first + 63 + band.off + band.wr < n_block * BlockN + BlockN / 2;  // wr <= 2^30, rows < 2^28
    }
  }

  // Keys [lo, hi] visible to query row `row` (lo > hi when none): the element test
  // as two compares per score against per-row bounds (score_mod.h).
  __device__ __forceinline__ void row_bounds(int row, int& lo, int& hi) const { band.key_range(row, lo, hi); }

  // Element test for query row `row`, key column `col` (both absolute).
  __device__ __forceinline__ bool visible(int row, int col) const { return band.visible(row, col); }
};

}  // namespace steelattn::sm90
