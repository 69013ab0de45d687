"""Where the varlen backward's time goes (issue 9): the bench's varlen cell (64 random
lengths, H16 D128 causal, bf16) against the dense backward at the same token count in equal
sequences (B64 x N304), and the peers (torch's varlen_attn; FA4 when it imports), each
split into its kernels with torch.profiler.
Usage (GPU machine): python3 scripts/varlen-bwd-split.py > $OUT/varlen-bwd-split.txt"""
import itertools

import torch
from torch.profiler import ProfilerActivity, profile

import steelattn
from steelattn import bench_features

lens, H, D, dt = bench_features._varlen_cell("cuda", False)
T = sum(lens)
cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device="cuda")
g = torch.Generator(device="cuda").manual_seed(1)
tok = [torch.randn(T, H, D, device="cuda", dtype=dt, generator=g).requires_grad_() for _ in range(3)]
dout_t = torch.randn(T, H, D, device="cuda", dtype=dt, generator=g)
Nd = (T + 63) // 64
dense = [torch.randn(64, H, Nd, D, device="cuda", dtype=dt, generator=g).requires_grad_() for _ in range(3)]
dout_d = torch.randn(64, H, Nd, D, device="cuda", dtype=dt, generator=g)
print(f"varlen: {len(lens)} sequences, {T} tokens, lengths {min(lens)}..{max(lens)}; dense: B64 N{Nd}")

cases = {
    "varlen fwd+bwd": lambda: torch.autograd.grad(
        steelattn.flash_attention_varlen(*tok, cu, cu, causal=True), tok, dout_t),
    "dense B64 fwd+bwd": lambda: torch.autograd.grad(steelattn.flash_attention(*dense, causal=True), dense, dout_d),
}
for peer, f in bench_features._varlen_peers("cuda", cu, max(lens), print).items():
    cases[f"{peer} fwd+bwd"] = lambda f=f: torch.autograd.grad(f(*tok), tok, dout_t)
for name, fn in cases.items():
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        fn()
    end.record()
    torch.cuda.synchronize()
    print(f"\n=== {name}: {start.elapsed_time(end) / 50:.3f} ms per step (events)")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
        if e.device_time_total > 0:
            print(f"  {e.device_time_total / 20 / 1e3:8.3f} ms  x{e.count // 20:<3d} {e.key[:110]}")
print(steelattn.get_dispatch_stats())
