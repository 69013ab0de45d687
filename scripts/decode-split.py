"""Where the CUDA decode time goes (issue 10). The bench's decode cells (N=1, H32/8 D128
bf16, B 1|8, S 4k|32k) timed as CUDA graphs (triton's do_bench on graph replays, L2
flushed: no host time in the numbers) against cuDNN, split into kernels with
torch.profiler (kernels launched with programmatic dependent launch overlap there: the
combine kernel's time includes its wait for the split kernel), and a sweep of num_splits.
Run it once per setting of STEELATTN_DECODE_TILE / _PDL / _PREFETCH to compare them.
Usage (GPU machine): python3 scripts/decode-split.py [--quick] [--cells BxS,...] [--no-n16] > $OUT/decode-split.txt"""
import os
import sys

import torch
from kernel_times import kernel_times
from triton.testing import do_bench

import steelattn
from steelattn import bench

H, Hkv, D = 32, 8, 128
quick = "--quick" in sys.argv
cells = ((1, 4096), (1, 32768), (8, 4096), (8, 32768))
if "--cells" in sys.argv:
    cells = tuple(tuple(int(x) for x in c.split("x")) for c in sys.argv[sys.argv.index("--cells") + 1].split(","))
env = {k: v for k, v in os.environ.items() if k.startswith("STEELATTN_DECODE")}
print(f"settings: {env or 'defaults'}")
graphed = bench._graphed  # fn captured in a CUDA graph; returns the replay


def us(fn, rep=200):
    return do_bench(fn, rep=rep) * 1e3


def kernels(fn, reps=20):
    return [(x, name) for name, x in kernel_times(fn, reps).items() if x > 0]


for B, S in cells:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    gb = 2 * B * Hkv * S * D * 2 / 1e3  # bytes / 1e3: GB/s from us
    ours = lambda: steelattn.flash_attention(q, k, v)  # noqa: E731
    cache = lambda n=0: steelattn.flash_attention_kvcache(q, k, v, causal=False, num_splits=n)  # noqa: E731
    cudnn = bench._make_impl("cudnn", q, k, v, causal=False).fwd
    torch.testing.assert_close(ours(), cudnn(), atol=2e-2, rtol=2e-2)
    t = {"steelattn": us(graphed(ours)), "cudnn": us(graphed(cudnn)), "steelattn eager": us(ours),
         "cudnn eager": us(cudnn), "kvcache eager": us(cache)}
    print(f"\n=== B{B} S{S}: " + "  ".join(f"{n} {x:.1f} us ({gb / x:.0f} GB/s)" for n, x in t.items()) +
          f"  graphs: {t['cudnn'] / t['steelattn']:.2f}x cuDNN")
    for name, fn in (("steelattn", ours), ("cudnn", cudnn)):
        for x, key in kernels(fn):
            print(f"  {name:9s} {x:7.1f} us  {key}")
    if not quick:
        sweep = [f"{n}:{us(graphed(lambda: cache(n)), 100):.1f}" for n in (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
                 if n * 64 <= S]
        print("  num_splits -> us (graphs): " + " ".join(sweep))

# 16 queries per sequence (64 rows per KV head): the Hopper kernel (no key split) against
# the decode kernel (four row groups per split, K/V re-read through L2), forced by lengths.
for B, S in () if "--no-n16" in sys.argv else ((1, 4096), (1, 32768), (2, 32768), (4, 32768), (8, 32768)):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, 16, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    lens = torch.full((B,), S, dtype=torch.int32, device="cuda")
    gb = 2 * B * Hkv * S * D * 2 / 1e3
    impls = {"sm90": lambda: steelattn.flash_attention(q, k, v),
             "decode": lambda: steelattn.flash_attention_kvcache(q, k, v, cache_seqlens=lens, causal=False),
             "cudnn": bench._make_impl("cudnn", q, k, v, causal=False).fwd}
    torch.testing.assert_close(impls["decode"](), impls["cudnn"](), atol=2e-2, rtol=2e-2)
    print(f"\n=== N16 B{B} S{S} (graphs): " + "  ".join(
        f"{n} {(x := us(graphed(f), 100)):.1f} us ({gb / x:.0f} GB/s)" for n, f in impls.items()))
print(steelattn.get_dispatch_stats())
