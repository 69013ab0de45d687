"""CUDA kernel times of a callable, per call, from torch.profiler (the measurement scripts'
shared helper: bwd-cells.py, bwd-tile-cost.py, train-step-split.py, decode-split.py)."""
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile


def kernel_times(fn, reps=5, warmup=3, width=70):
    """{kernel name (first `width` characters): us per call of fn}, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out[e.name[:width]] += e.device_time / reps
    return dict(out)
