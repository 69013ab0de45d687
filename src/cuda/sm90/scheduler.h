// Persistent tile scheduler: which (batch, head, query block) a CTA works on,
// and in what order. One CTA per SM; each takes tile blockIdx.x first, then
// claims the next unclaimed tile from a global counter when it starts loading
// a tile (dynamic, so uneven causal tiles balance themselves; a static snake
// order measured 30% slower at N = 16k causal once heads were grouped for L2). Only the
// producer thread talks to the counter; it hands each tile id to the
// consumers through shared memory, published by the Q barrier (mainloop.h).
#pragma once

#include "cuda/sm90/params.h"

namespace steelattn::sm90 {

// Tile counters, one pair (next tile, CTAs done) per slot. The host gives each
// launch the next slot round-robin (FwdParams::sched_slot); the last CTA of a
// launch to finish resets its pair to zero, so a slot is clean again long
// before it comes round (kSchedSlots launches later; at most 128 kernels run
// at once on a Hopper GPU). Zero-initialised at module load; one array per
// translation unit, i.e. per instantiation file.
static __device__ int g_sched_counters[kSchedSlots][2];

struct TileCoord {
  int m_block, b, h;  // h: the query head, or the KV head of a GQA-packed tile
};

struct DynamicPersistentScheduler {
  int num_tiles, num_m, heads, BH, group_heads;
  bool heavy_first;
  int* counter;  // [0]: tiles claimed beyond the first wave, [1]: CTAs done

  __device__ explicit DynamicPersistentScheduler(const FwdParams& p)
      : num_tiles(p.num_tiles),
        num_m(p.num_m_blocks),
        heads(p.tile_heads),
        BH(p.B * p.tile_heads),
        group_heads(p.group_heads),
        heavy_first(p.heavy_first != 0),
        counter(g_sched_counters[p.sched_slot]) {}

  __device__ int first_tile() const { return static_cast<int>(blockIdx.x); }
  // Returns >= num_tiles when the work is gone. (A static grid stride for
  // full attention measured no faster, so every mask uses the counter.)
  __device__ int next_tile() const { return static_cast<int>(gridDim.x) + atomicAdd(counter, 1); }
  // Called once per CTA after its last next_tile(); the last one resets the slot.
  __device__ void finish() const {
    __threadfence();
    if (atomicAdd(counter + 1, 1) == static_cast<int>(gridDim.x) - 1) {
      atomicExch(counter, 0);
      atomicExch(counter + 1, 0);
    }
  }

  __device__ TileCoord coord(int t) const {
    int m, bh;
    if (heavy_first) {
      // Causal: the last query blocks see the most keys, so they go first and
      // the short tiles fill the end of the schedule. Heads are taken in
      // groups whose K/V fit in L2 (group_heads, set by the host): the CTAs
      // running at once then share K/V blocks through L2 instead of each
      // streaming a different head from HBM (measured on H100 at N = 1k,
      // D = 128 causal: 267 -> 377 TFLOP/s; NOTES-sm90.md).
      const int tiles_per_group = group_heads * num_m;
      const int g = t / tiles_per_group;
      const int r = t - g * tiles_per_group;
      const int in_group = min(group_heads, BH - g * group_heads);
      m = num_m - 1 - r / in_group;
      bh = g * group_heads + r % in_group;
    } else {
      // Full attention: consecutive tiles share (b, h), so CTAs running at
      // once read the same K/V from L2; heads of one GQA group are adjacent.
      bh = t / num_m;
      m = t % num_m;
    }
    return {m, bh / heads, bh % heads};
  }
};

}  // namespace steelattn::sm90
