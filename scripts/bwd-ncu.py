"""One training step of steelattn and one of cuDNN (B16 H16 N1k D128 bf16, full) for Nsight
Compute to read the backward main kernels' counters (issue 8: why ours trails cuDNN's at D128).
Usage (GPU machine):
  ncu --clock-control none -k regex:'bwd_kernel|bprop' -c 2 --section SpeedOfLight \
      --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
      --section LaunchStats --section Occupancy python3 scripts/bwd-ncu.py > $OUT/bwd-ncu.txt"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import steelattn

B, H, N, D = 16, 16, 1024, 128
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
           for _ in range(3))
dout = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
steelattn.flash_attention(q, k, v).backward(dout)
with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
    F.scaled_dot_product_attention(q, k, v).backward(dout)
torch.cuda.synchronize()
