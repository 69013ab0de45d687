"""What a query tile costs the Hopper forward beyond its key blocks (issues 8 and 9).

Short rows are where the forward trails cuDNN (D128 N1k full 0.83-0.89x, N16k 0.95-0.97x)
and where block-sparse and varlen calls lose their rate (a tile of the video mask visits
~13 key blocks): each tile pays its Q load, a first block with nothing to overlap, the
last P.V, the normalisation and the O stores. This fits, for steelattn and cuDNN alike,

    time = tiles x per_tile + tiles x blocks_per_tile x per_block

over full (non-causal) calls of the same total work (B x N x S constant: B x N / 128 tiles
of S / 128 blocks each) as S goes from 256 to 16k, timed with CUDA graphs (triton's
do_bench on replays, L2 flushed, no host time). per_tile / per_block says how many
blocks' worth of time a tile's fixed cost is; the difference to cuDNN's is what an
overlapped epilogue and a cross-tile pipeline can win.
Usage (GPU machine): python3 scripts/fwd-tile-cost.py [D] > $OUT/fwd-tile-cost.txt"""
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import steelattn
from steelattn import bench

D = int(sys.argv[1]) if len(sys.argv) > 1 else 128
H, N = 16, 1024
KEYS = 16384  # B x S, constant across the rows
dt = torch.bfloat16


def us(fn):
    return do_bench(bench._graphed(fn), rep=200) * 1e3


impls = {
    "steelattn": lambda q, k, v: steelattn.flash_attention(q, k, v),
    "cudnn": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
}
rows = {name: [] for name in impls}
print(f"D{D} H{H} N{N}, B x S = {KEYS}, bf16, full; us per call (graphs)")
print(f"{'S':>6} {'B':>4} {'tiles':>6} {'blocks/tile':>11} " + " ".join(f"{n:>10}" for n in impls))
for S in (256, 512, 1024, 2048, 4096, 8192, 16384):
    B = KEYS // S
    q = torch.randn(B, H, N, D, device="cuda", dtype=dt)
    k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dt) for _ in range(2))
    tiles, blocks = B * H * N // 128, S // 128
    times = {}
    for name, fn in impls.items():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):  # (steelattn ignores it)
            times[name] = us(lambda fn=fn: fn(q, k, v))
        rows[name].append((tiles, tiles * blocks, times[name]))
    print(f"{S:>6} {B:>4} {tiles:>6} {blocks:>11} " + " ".join(f"{times[n]:>10.1f}" for n in impls))

for name, pts in rows.items():  # least squares: time = a * tiles + b * tile_blocks
    A = torch.tensor([[t, tb] for t, tb, _ in pts], dtype=torch.float64)
    y = torch.tensor([ms for _, _, ms in pts], dtype=torch.float64)
    a, b = torch.linalg.lstsq(A, y.unsqueeze(1)).solution.squeeze(1).tolist()
    print(f"{name}: per tile {a * 1e3:.1f} ns, per block {b * 1e3:.1f} ns "
          f"(a tile's fixed cost = {a / b:.1f} blocks; across {torch.cuda.get_device_properties(0).multi_processor_count}"
          f" SMs)")
