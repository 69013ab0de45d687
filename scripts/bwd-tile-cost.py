"""What a key block costs the Hopper backward beyond its query steps (issue 8).

The D128 backward trails cuDNN most at N 1k (0.84x full) and least at N 16k (0.93x): a CTA
(one key block of 128) pays its K/V load, a pipeline fill, the dK/dV stores and its launch
around N/64 steps, and at N 1k it has only 16 steps. This fits, for steelattn and cuDNN,

    main kernel time = CTAs x per_cta + CTAs x steps x per_step

over full calls of the same total work (S = 1024 fixed, B x N constant, N from 256 to 16k:
B x H x 8 CTAs of N / 64 steps), each kernel timed by torch.profiler over a few training
steps (forward through autograd, then backward), so per_cta / per_step says how many steps'
worth of time a CTA's fixed cost is, and the pre/post kernels are reported apart.
Usage (GPU machine): python3 scripts/bwd-tile-cost.py [D] > $OUT/bwd-tile-cost.txt"""
import sys

import torch
import torch.nn.functional as F
from kernel_times import kernel_times
from torch.nn.attention import SDPBackend, sdpa_kernel

import steelattn

D = int(sys.argv[1]) if len(sys.argv) > 1 else 128
H, S = 16, 1024
ROWS = 16384  # B x N, constant across the rows
dt = torch.bfloat16
REPS = 5


def kernel_us(fn, q, k, v, dout):
    """Per-kernel CUDA time (us per training step), keyed by a short kernel name."""
    return kernel_times(lambda: fn(q, k, v).backward(dout), REPS, width=60)


impls = {
    "steelattn": lambda q, k, v: steelattn.flash_attention(q, k, v),
    "cudnn": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
}
main_key = {"steelattn": "bwd_kernel", "cudnn": "bprop"}
pts = {n: [] for n in impls}
print(f"D{D} H{H} S{S}, B x N = {ROWS}, bf16, full; us per training step")
for N in (256, 512, 1024, 2048, 4096, 8192, 16384):
    B = ROWS // N
    q = torch.randn(B, H, N, D, device="cuda", dtype=dt, requires_grad=True)
    k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dt, requires_grad=True) for _ in range(2))
    dout = torch.randn(B, H, N, D, device="cuda", dtype=dt)
    ctas, steps = B * H * S // 128, N // 64
    for name, fn in impls.items():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ks = kernel_us(fn, q, k, v, dout)
        main = sum(t for n, t in ks.items() if main_key[name] in n)
        pts[name].append((ctas, ctas * steps, main))
        rest = ", ".join(f"{n}: {t:.1f}" for n, t in sorted(ks.items(), key=lambda x: -x[1]))
        print(f"N {N:>5} B {B:>3} CTAs {ctas:>5} steps {steps:>4} {name:>9}: main {main:8.1f} | {rest}")

for name, p in pts.items():  # least squares: time = a * ctas + b * cta_steps
    A = torch.tensor([[c, cs] for c, cs, _ in p], dtype=torch.float64)
    y = torch.tensor([t for _, _, t in p], dtype=torch.float64)
    a, b = torch.linalg.lstsq(A, y.unsqueeze(1)).solution.squeeze(1).tolist()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{name}: per CTA {a * 1e3:.1f} ns, per step {b * 1e3:.2f} ns (x {sms} SMs: a CTA's fixed cost = "
          f"{a * sms:.2f} us = {a / b:.1f} steps)")
