// A block mask as the Hopper forward and backward kernels read it (FwdParams::bm,
// BwdParams::bm; filled by block_mask_tiles.cu's block_mask_view).
#pragma once

#include <cstdint>

namespace steelattn::sm90 {

// `mask`: the kernel walks it to decide which tiles run, nonzero = active; bool
// [B, H, rows, cols] (strides in elements, 0 where broadcast), or null for dense calls.
//  - Block sizes that are whole kernel tiles: `mask` is the caller's block mask and a tile
//    lies in one mask block: query tile m in mask row m / q_tiles, key tile n in column
//    n / k_tiles; `elem` is null.
//  - Other block sizes (multiples of 16): `mask` is the per-tile state the launcher derived
//    (q_tiles = k_tiles = 1): 0 no overlapping mask block is active (never loaded), 1 all
//    are, 2 some are: the kernel then tests the caller's mask, `elem` ([B, H, nq, nk] with
//    blocks of bq x bk tokens), per 16 x 16 cell of the tile.
struct BlockMaskView {
  const uint8_t* mask;
  int64_t sb, sh, sq, sk;
  int q_tiles, k_tiles;
  const uint8_t* elem;
  int64_t esb, esh, esq, esk;
  int bq, bk, nq, nk;
};

// The tile-state value of a tile some of whose (but not all) mask blocks are active.
constexpr uint8_t kTilePartial = 2;

}  // namespace steelattn::sm90
