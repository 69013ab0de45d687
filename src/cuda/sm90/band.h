// The band: which (query, key) pairs are visible, answered for single elements,
// for rows and columns, and for blocks of either. The forward's mask policy
// (mask.h) and both backward kernels (bwd_kernel.h, bwd_wide_kernel.h) ask
// here, so the three cannot drift apart; varlen and block masks will extend it.
//
// Key j is visible to query i iff 0 <= j < S and (On only)
//   i + off - wl <= j <= i + off + wr,
// off = diag_offset (S - N for bottom-right causal), wl / wr the window sides,
// clamped by the host to kUnbounded = 2^30 for "unbounded"; queries, keys and
// |off| are < 2^28, so no expression below overflows int32.
#pragma once

namespace steelattn::sm90 {

template <bool On>
struct Band {
  int N, S, off, wl, wr;

  // Keys [lo, hi] visible to query `row` (lo > hi when none).
  __device__ __forceinline__ void key_range(int row, int& lo, int& hi) const {
    lo = 0;
    hi = S - 1;
    if constexpr (On) {
      lo = max(lo, row + off - wl);
      hi = min(hi, row + off + wr);
    }
  }

  // Queries [lo, hi] of the band that see key `key` (not clipped to [0, N) and
  // not checked against S: the caller knows its keys are < S).
  __device__ __forceinline__ void query_range(int key, int& lo, int& hi) const {
    lo = -(1 << 30);
    hi = 1 << 30;
    if constexpr (On) {
      lo = key - off - wr;
      hi = key - off + wl;
    }
  }

  // The same range relative to query q0 (the element loops test column offsets
  // against it); without the band a constant, so it costs no register.
  __device__ __forceinline__ void query_range_from(int key, int q0, int& lo, int& hi) const {
    if constexpr (On) {
      lo = key - off - wr - q0;
      hi = key - off + wl - q0;
    } else {
      lo = -(1 << 30);
      hi = 1 << 30;
    }
  }

  __device__ __forceinline__ bool visible(int row, int key) const {
    bool ok = key < S;
    if constexpr (On) {
      const int d = key - row - off;  // signed distance from the aligned diagonal
      ok = ok && d <= wr && d >= -wl;
    }
    return ok;
  }

  // Blocks of `bn` keys that queries [r0, r1] visit: [lo, hi), empty when no
  // query of the range sees any key. The union of the rows' key ranges is one
  // interval, so the blocks are contiguous.
  __device__ __forceinline__ void key_blocks(int r0, int r1, int bn, int& lo, int& hi) const {
    if constexpr (!On) {
      lo = 0;
      hi = (S + bn - 1) / bn;
    } else {
      const int k0 = max(r0 + off - wl, 0);
      const int k1 = min(r1 + off + wr, S - 1);
      if (k1 < k0) {
        lo = hi = 0;
        return;
      }
      lo = k0 / bn;
      hi = k1 / bn + 1;
    }
  }

  // Blocks of `bm` queries whose rows see any of keys [k0, k1] (k1 < S): [lo, hi).
  __device__ __forceinline__ void query_blocks(int k0, int k1, int bm, int& lo, int& hi) const {
    if constexpr (!On) {
      lo = 0;
      hi = (N + bm - 1) / bm;
    } else {
      const int i0 = max(k0 - off - wr, 0);
      const int i1 = min(k1 - off + wl, N - 1);
      if (i1 < i0) {
        lo = hi = 0;
        return;
      }
      lo = i0 / bm;
      hi = i1 / bm + 1;
    }
  }

  // True when some pair of queries [r0, r1] x keys [k0, k1] is invisible, i.e.
  // the block needs the element test (keys past S count as invisible).
  __device__ __forceinline__ bool partial(int r0, int r1, int k0, int k1) const {
    if (k1 >= S) return true;
    if constexpr (On) {
      if (k1 > r0 + off + wr) return true;  // right edge (the causal diagonal)
      if (k0 < r1 + off - wl) return true;  // left edge (sliding window)
    }
    return false;
  }
};

}  // namespace steelattn::sm90
