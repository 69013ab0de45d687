"""One decode call of steelattn and one of cuDNN (B8 H32/8 S32k D128 bf16, N=1) for Nsight
Compute to read the hardware counters of (issue 10: why the split kernel streams K/V slower
than cuDNN's kernel). Usage (GPU machine):
  ncu --clock-control none -k regex:'decode_split|fprop' -c 2 --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
      --section WarpStateStats python3 scripts/decode-ncu.py > $OUT/decode-ncu.txt"""
import torch

import steelattn
from steelattn import bench

B, H, Hkv, S, D = 8, 32, 8, 32768, 128
g = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
k, v = (torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
steelattn.flash_attention(q, k, v)
bench._make_impl("cudnn", q, k, v, causal=False).fwd()
torch.cuda.synchronize()
