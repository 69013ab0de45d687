// Mask policy: for a query tile, which key blocks are visited at all, which of
// them need the element test, and the element test itself.
//
// Key j is visible to query i iff j < S and (Band only)
//   i + diag_offset - window_left <= j <= i + diag_offset + window_right.
// Blocks wholly outside the band are never loaded; only blocks that straddle
// the band edges or the end of the keys (S % kBlockN) run the element test.
#pragma once

#include "cuda/sm90/params.h"

namespace steelattn::sm90 {

// Pack: GQA-packed tiles (params.h) span pack_rows = BlockM / group queries,
// not BlockM; rows below are query indices either way.
template <bool Band, int BlockM, int BlockN, bool Pack = false>
struct MaskPolicy {
  int N, S, off, wl, wr;
  int pack_rows;  // read only when Pack

  __device__ MaskPolicy(const FwdParams& p)
      : N(p.N), S(p.S), off(p.diag_offset), wl(p.window_left), wr(p.window_right), pack_rows(p.pack_rows) {}

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
    const int n_blocks = (S + BlockN - 1) / BlockN;
    if constexpr (!Band) {
      lo = 0;
      hi = n_blocks;
    } else {
      const int row_first = m_block * tile_rows();
      const int row_last = min(row_first + tile_rows(), N) - 1;
      const int key_first = max(row_first + off - wl, 0);          // wl clamped to 2^30
      const int key_last = min(row_last + off + wr, S - 1);        // wr clamped to 2^30
      if (key_last < key_first) {
        lo = hi = 0;
        return;
      }
      lo = key_first / BlockN;
      hi = key_last / BlockN + 1;
    }
  }

  // True when some (row, key) pair of this tile x block is invisible.
  __device__ bool needs_element_mask(int m_block, int n_block) const {
    const int key_first = n_block * BlockN;
    const int key_last = key_first + BlockN - 1;
    if (key_last >= S) return true;
    if constexpr (Band) {
      const int row_first = m_block * tile_rows();
      const int row_last = min(row_first + tile_rows(), N) - 1;
      if (key_last > row_first + off + wr) return true;   // right edge (causal diagonal)
      if (key_first < row_last + off - wl) return true;   // left edge (sliding window)
    }
    return false;
  }

  // Unpacked band tiles: true when no query of rows [row_first, row_first + 63]
  // (one consumer warpgroup's rows) sees any key of the upper half of block
  // n_block (the causal diagonal block for the tile's first 64 rows).
  __device__ bool upper_half_invisible(int row_first, int n_block) const {
    if constexpr (!Band || Pack) {
      return false;
    } else {
      return row_first + 63 + off + wr < n_block * BlockN + BlockN / 2;  // wr <= 2^30, rows < 2^28
    }
  }

  // Keys [lo, hi] visible to query row `row` (lo > hi when none): the element test
  // as two compares per score against per-row bounds (score_mod.h). No overflow:
  // rows, S and |off| < 2^28, wl/wr <= 2^30.
  __device__ __forceinline__ void row_bounds(int row, int& lo, int& hi) const {
    hi = S - 1;
    lo = 0;
    if constexpr (Band) {
      hi = min(hi, row + off + wr);
      lo = max(lo, row + off - wl);
    }
  }

  // Element test for query row `row`, key column `col` (both absolute).
  __device__ __forceinline__ bool visible(int row, int col) const {
    bool ok = col < S;
    if constexpr (Band) {
      const int d = col - row - off;  // signed distance from the aligned diagonal
      ok = ok && d <= wr && d >= -wl;
    }
    return ok;
  }
};

}  // namespace steelattn::sm90
