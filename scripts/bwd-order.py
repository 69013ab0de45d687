"""Backward kernel time by launch-order group (STEELATTN_BWD_GROUP, sm90::bwd_tile) and the
per-kernel split of one training step (ours: pre / main / post; cuDNN's kernels), on the
bench's bar cells. GPU machine: python3 scripts/bwd-order.py > $OUT/bwd-order.txt"""
import os
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import steelattn
from steelattn import _kernel

CELLS = [  # (B, H, N, D, causal), 16k tokens per batch as in the bench
    (16, 16, 1024, 128, True), (16, 16, 1024, 128, False), (4, 16, 4096, 128, True), (4, 16, 4096, 128, False),
    (1, 16, 16384, 128, True), (16, 32, 1024, 64, True), (4, 32, 4096, 64, True), (1, 32, 16384, 64, False),
    (16, 8, 1024, 256, True), (4, 8, 4096, 256, True), (4, 21, 4096, 96, True), (4, 10, 4096, 192, True)]
GROUPS = [0, 1, 4, 8, 16, 32]  # 0: the launcher's default


def time_ms(fn, reps=20):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


print("backward kernels only (pre + main + post), ms by STEELATTN_BWD_GROUP; cuDNN fwd+bwd - fwd for scale")
print("cell | " + " | ".join(f"g={g or 'default'}" for g in GROUPS) + " | cudnn bwd")
for B, H, N, D, causal in CELLS:
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    sc = _kernel.scalars(D ** -0.5, 0.0, 0, -1, 0 if causal else -1, 0.0, 0, 0, False)
    out, lse, _ = _kernel.run_forward(q, k, v, None, None, None, sc, _kernel.TRAIN)
    row = []
    for grp in GROUPS:
        os.environ["STEELATTN_BWD_GROUP"] = str(grp)  # 0 is ignored: the default
        row.append(time_ms(lambda: _kernel.run_backward(do, None, q, k, v, out, lse, None, None, None, sc, False)))
    os.environ.pop("STEELATTN_BWD_GROUP")
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        def step():
            o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
            o.backward(do)
        fb = time_ms(step)
        fw = time_ms(lambda: F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal))
    print(f"B{B} H{H} N{N} D{D} {'causal' if causal else 'full'} | " + " | ".join(f"{t:.3f}" for t in row)
          + f" | {fb - fw:.3f}", flush=True)

from torch.profiler import ProfilerActivity, profile
for B, H, N, D, causal in [(16, 16, 1024, 128, False), (4, 16, 4096, 128, True), (16, 8, 1024, 256, True)]:
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(4))
    for name, ctx in (("steelattn", None), ("cudnn", sdpa_kernel(SDPBackend.CUDNN_ATTENTION))):
        def step():
            o = (steelattn.flash_attention(q, k, v, causal=causal) if ctx is None
                 else F.scaled_dot_product_attention(q, k, v, is_causal=causal))
            o.backward(do)
        if ctx:
            ctx.__enter__()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        if ctx:
            ctx.__exit__(None, None, None)
        print(f"\n== {name} B{B} H{H} N{N} D{D} {'causal' if causal else 'full'}: CUDA kernels, 10 steps")
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:8]:
            if e.self_device_time_total > 0:
                print(f"  {e.self_device_time_total / 10 / 1000:8.3f} ms/step  x{e.count // 10}  {e.key[:110]}")
