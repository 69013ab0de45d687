// A block mask as the Hopper forward and backward kernels read it (FwdParams::bm,
// BwdParams::bm; filled by host_tma.h's block_mask_view).
#pragma once

#include <cstdint>

namespace steelattn::sm90 {

// bool [B, H, NQ, NK] (strides in elements, 0 where broadcast), or mask = null for dense
// calls. The launchers admit only block sizes that are whole kernel tiles, so a tile lies in
// one mask block: query tile m in mask row m / q_tiles, key tile n in column n / k_tiles.
struct BlockMaskView {
  const uint8_t* mask;
  int64_t sb, sh, sq, sk;
  int q_tiles, k_tiles;
};

}  // namespace steelattn::sm90
