// Varlen on the sm90 forward: which sequence and query block a tile is.
//
// Tiles are virtual query blocks: sequence i owns the virtual blocks from
// vstart(i) = cu_q[i] / kBlockM + i, one per kBlockM queries. vstart grows by at least
// ceil(len_i / kBlockM) from one sequence to the next (floor(a + len) - floor(a) + 1 >=
// ceil(len), in blocks), so the blocks never overlap, and the last one ends before
// total_q / kBlockM + num_seqs: a bound the host knows without reading the lengths (a
// CUDA graph replays with new lengths of the same totals). A virtual block past its
// sequence's queries is a hole, which the producer skips without publishing it.
#pragma once

#include <cstdint>

#include "cuda/sm90/params.h"

namespace steelattn::sm90 {

struct SeqTile {
  int seq;             // the sequence (its ALiBi row)
  int m;               // query block inside the sequence
  int q0, n, k0, s;    // its first packed query row and length, first key row and length
};

// Virtual block v of a varlen call: false for a hole. A binary search over cu_q (the
// largest i with vstart(i) <= v), by the producer thread only.
__device__ __forceinline__ bool resolve_virtual_block(const FwdParams& p, int v, SeqTile& t) {
  int lo = 0, hi = p.num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (__ldg(p.cu_q + mid) / kBlockM + mid <= v)
      lo = mid;
    else
      hi = mid - 1;
  }
  const int q0 = __ldg(p.cu_q + lo);
  t.seq = lo;
  t.m = v - (q0 / kBlockM + lo);
  t.q0 = q0;
  t.n = __ldg(p.cu_q + lo + 1) - q0;
  if (t.m < 0 || t.m * kBlockM >= t.n) return false;
  t.k0 = __ldg(p.cu_k + lo);
  t.s = __ldg(p.cu_k + lo + 1) - t.k0;
  return true;
}

}  // namespace steelattn::sm90
