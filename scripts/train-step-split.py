"""One training step (forward through autograd, then torch.autograd.grad, as the bench runs
it) of steelattn and cuDNN on one cell: every CUDA kernel's time (torch.profiler) beside the
step's wall time on CUDA events, to tell kernel time from gaps. Default cell: D128 N16k
causal (B1 H16 bf16). Usage (GPU machine): python3 scripts/train-step-split.py [D N causal]"""
import sys

import torch
import torch.nn.functional as F
from kernel_times import kernel_times
from torch.nn.attention import SDPBackend, sdpa_kernel

import steelattn

D, N, causal = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "causal") if len(sys.argv) > 3 else (128, 16384, True)
H, B, REPS = 2048 // D, 16384 // N, 5
q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
dout = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
impls = {"steelattn": lambda: steelattn.flash_attention(q, k, v, causal=causal),
         "cudnn": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}
for name, fwd in impls.items():
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        step = lambda: torch.autograd.grad(fwd(), (q, k, v), dout)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(REPS):
            step()
        e1.record()
        torch.cuda.synchronize()
        wall = e0.elapsed_time(e1) * 1e3 / REPS
        t = kernel_times(step, REPS, warmup=0)
    print(f"{name} D{D} N{N} {'causal' if causal else 'full'}: step {wall:.1f} us on events, kernels {sum(t.values()):.1f}")
    for n, x in sorted(t.items(), key=lambda x: -x[1]):
        print(f"   {x:9.1f}  {n}")
