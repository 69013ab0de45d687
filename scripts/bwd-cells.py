"""The backward kernels alone (pre, main, post, torch.profiler sums, us per training step)
on a few cells, for A/B runs of two builds (PYTHONPATH picks the build) or launch orders
(STEELATTN_BWD_GROUP). Usage (GPU machine): python3 scripts/bwd-cells.py
BWD_CELLS="D:N:causal,..." (e.g. "128:4096:0,128:16384:0") picks the cells."""
import os
from collections import defaultdict

import torch
from kernel_times import kernel_times

import steelattn

CELLS = [(128, 16384, True), (128, 16384, False), (64, 16384, True), (128, 4096, True), (256, 16384, True),
         (128, 1024, False), (128, 1024, True), (64, 1024, False), (256, 1024, False), (192, 4096, True)]
if os.environ.get("BWD_CELLS"):
    CELLS = [(int(d), int(n), c == "1") for d, n, c in (x.split(":") for x in os.environ["BWD_CELLS"].split(","))]
REPS = 5
print(steelattn.__file__)
for D, N, causal in CELLS:
    H = 2048 // D
    B = 16384 // N
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
    step = lambda: torch.autograd.grad(steelattn.flash_attention(q, k, v, causal=causal), (q, k, v), dout)
    t = defaultdict(float)
    for name, us in kernel_times(step, REPS).items():
        if "steelattn" in name and "fwd_kernel" not in name:
            t["main" if "bwd_kernel" in name or "bwd_wide" in name else "pre" if "pre_kernel" in name else "post"] += us
    print(f"D{D} N{N} {'causal' if causal else 'full'}: " + ", ".join(f"{n} {x:.1f}" for n, x in sorted(t.items())))
