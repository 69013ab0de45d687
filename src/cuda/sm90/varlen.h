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

#include "cuda/sm90/bwd_params.h"  // BwdKeyBlock, kBwdBlockN
#include "cuda/sm90/params.h"

namespace steelattn::sm90 {

struct SeqTile {
  int seq;             // the sequence (its ALiBi row)
  int m;               // query block inside the sequence
  int q0, n, k0, s;    // its first packed query row and length, first key row and length
};

// The sequence that owns virtual block v of `block` rows over offsets cu (num_seqs + 1
// entries): the largest i with cu[i] / block + i <= v, by binary search. The backward uses
// it for its key blocks and its workspace rows (blocks of 128, as the forward's queries).
__device__ __forceinline__ int virtual_block_seq(const int32_t* cu, int num_seqs, int v, int block) {
  int lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (__ldg(cu + mid) / block + mid <= v)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// Virtual key block v (of 128 keys) of the varlen backward: its sequence, the block's index
// inside it (-1 past the sequence's keys: a hole), and the sequence's rows (BwdKeyBlock).
__device__ __forceinline__ BwdKeyBlock find_key_block(const int32_t* cu_q, const int32_t* cu_k, int num_seqs, int v) {
  BwdKeyBlock e;
  e.seq = virtual_block_seq(cu_k, num_seqs, v, kBwdBlockN);
  e.k0 = __ldg(cu_k + e.seq);
  e.s = __ldg(cu_k + e.seq + 1) - e.k0;
  e.block = v - (e.k0 / kBwdBlockN + e.seq);
  if (e.block < 0 || e.block * kBwdBlockN >= e.s) e.block = -1;
  e.q0 = __ldg(cu_q + e.seq);
  e.n = __ldg(cu_q + e.seq + 1) - e.q0;
  e.pad0 = e.pad1 = 0;
  return e;
}

// Virtual block v of a varlen call: false for a hole (the producer thread only).
__device__ __forceinline__ bool resolve_virtual_block(const FwdParams& p, int v, SeqTile& t) {
  const int lo = virtual_block_seq(p.cu_q, p.num_seqs, v, kBlockM);
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
