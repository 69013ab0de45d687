"""The block-sparse forward alone, ms per call, for the bench's three masks (N 16k H16 D128
bf16; `bench --op sparse` also times Flex, the dense kernel and the backward). A quick A/B
of the sparse forward kernel: a few seconds on the H200."""
import torch

import steelattn
from steelattn import bench as _b
from steelattn.bench_features import sparse_cases

H, D, frames, side = 16, 128, 16, 32
N = frames * side * side
g = torch.Generator(device="cuda").manual_seed(2)
q, k, v = (torch.randn(1, H, N, D, device="cuda", generator=g).bfloat16() for _ in range(3))
for name, (blocks, bs, causal) in sparse_cases("cuda", frames, side).items():
    ms = _b.time_cuda(lambda: steelattn.flash_attention_sparse(q, k, v, blocks, block_size=bs, causal=causal))
    print(f"{name:12s} {ms:.3f} ms ({float(blocks.float().mean()):.1%} of blocks active)")
