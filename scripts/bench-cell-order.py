"""Does a bench cell's time depend on the cell before it? The backward bench at f20f2c9 read
D128 N16k causal at 0.86-0.90x cuDNN while the same step timed alone was 0.99x
(NOTES-sm90-bwd.md, session 11). This times that cell's training step the bench's way
(bench._time_train_step under bench.time_cuda: triton do_bench, a fresh forward and
autograd.grad per step) in one process: alone first, then after the D128 N16k full cell's
steps with the 80-row step on, then after them with it off (STEELATTN_SM90_BWD_ROWS80=0),
with cuDNN timed beside it each time (last: cuDNN first), and prints the caching allocator's counters
(cudaMalloc calls, retries, reserved bytes) around each.
Usage (GPU machine): python3 scripts/bench-cell-order.py"""
import os

import torch

from steelattn import bench as b

DEV, DT = "cuda", torch.bfloat16


def cell(N, causal, names=("steelattn", "cudnn")):
    g = torch.Generator(device=DEV).manual_seed(0)
    q = b._randn((1, 16, N, 128), DEV, DT, g, True)
    k, v = (b._randn((1, 16, N, 128), DEV, DT, g, True) for _ in range(2))
    dout = b._randn((1, 16, N, 128), DEV, DT, g)
    out = {}
    for name in names:
        impl = b._make_impl(name, q, k, v, causal, None, dout)
        out[name] = b._time_train_step(impl, b.time_cuda)
    return out


def counters():
    s = torch.cuda.memory_stats()
    return {k: s.get(k, 0) for k in ("num_device_alloc", "num_device_free", "num_alloc_retries")} | {
        "reserved_MB": s.get("reserved_bytes.all.current", 0) >> 20}


def show(label, res, before):
    after = counters()
    delta = {k: after[k] - before[k] for k in after}
    ratio = res["cudnn"] / res["steelattn"]
    print(f"{label:34s} causal N16k step: steelattn {res['steelattn']:.3f} ms, cudnn {res['cudnn']:.3f} ms "
          f"({ratio:.2f}x)  allocator {delta}")


# The last case times cuDNN first: if whichever runs first right after the full cell is the
# slow one, the GPU's state after that cell (clocks, power) is the cause, not our kernels.
for label, prior, order in (("alone", None, ("steelattn", "cudnn")), ("after full, 80-row", "1", ("steelattn", "cudnn")),
                            ("after full, 64-row", "0", ("steelattn", "cudnn")), ("alone again", None, ("steelattn", "cudnn")),
                            ("after full, 80-row, cudnn first", "1", ("cudnn", "steelattn"))):
    if prior is not None:
        os.environ["STEELATTN_SM90_BWD_ROWS80"] = prior
        cell(16384, False, ("steelattn", "cudnn", "fa2"))  # the bench's previous cell, its peers in order
        os.environ.pop("STEELATTN_SM90_BWD_ROWS80")
    c = counters()
    show(label, cell(16384, True, order), c)
