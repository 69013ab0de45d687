"""The block-sparse forward alone, ms per call, for the bench's masks (H16 D128 bf16; `bench
--op sparse` also times Flex, the dense kernel and the backward). A quick A/B of the sparse
forward kernel: a few seconds on the H200."""
import torch

import steelattn
from steelattn import bench as _b
from steelattn.bench_features import sparse_cases

H, D = 16, 128
g = torch.Generator(device="cuda").manual_seed(2)
for name, N, blocks, bs, causal in sparse_cases("cuda"):
    q, k, v = (torch.randn(1, H, N, D, device="cuda", generator=g).bfloat16() for _ in range(3))
    ms = _b.time_cuda(lambda: steelattn.flash_attention_sparse(q, k, v, blocks, block_size=bs, causal=causal))
    print(f"{name:12s} N {N:5d} {ms:.3f} ms ({float(blocks.float().mean()):.1%} of blocks active)")
