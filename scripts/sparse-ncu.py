"""The block-sparse Hopper forward against the dense one, for Nsight Compute (issue 9).

The video mask (N 16k, H16, D128 bf16, 9.5% of 128 x 128 blocks active, 6-15 a query
block in 2-3 runs) runs at ~377 TFLOP/s on its active blocks where the dense forward does
~600, and the forward's fit (tiles x 11 ns + blocks x 14.6 ns across the SMs,
fwd-tile-cost.py) predicts ~0.39 ms against 0.56 measured. This runs one sparse and one
dense forward so ncu can say which: DRAM bytes and L2 hit rate (K/V reuse across the
tiles in flight), tensor-pipe use, and the warps' stall reasons (the producer walking
the mask, or the consumers waiting for loads).
Usage (GPU machine):
  ncu --clock-control none -k regex:fwd_kernel -c 3 --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
      python3 scripts/sparse-ncu.py > $OUT/sparse-ncu.txt
(the first launch is a warm-up of the sparse kernel; ncu profiles three launches)."""
import torch

import steelattn

H, D, frames, side = 16, 128, 16, 32
N = frames * side * side
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
blocks = steelattn.make_spatial_3d_mask(side, side, frames, spatial_radius=6, temporal_radius=1, block_size=128,
                                       device="cuda")
print(f"active blocks: {blocks.float().mean():.1%}; per query block {blocks.sum(-1).min()}-{blocks.sum(-1).max()}")
steelattn.flash_attention_sparse(q, k, v, blocks, block_size=128)  # warm-up (mask conversion cached)
steelattn.flash_attention_sparse(q, k, v, blocks, block_size=128)
steelattn.flash_attention(q, k, v)
torch.cuda.synchronize()
