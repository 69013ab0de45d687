"""Where the host time of one tiny attention call goes (issue 8's host bar).

Times, in µs per call on the bench's host shape (B1 H8 N128 D64 causal): the raw
extension calls with preallocated outputs, each layer above them, torch SDPA (cuDNN) as
the anchor, and an autograd.Function that launches nothing (the autograd engine's own
floor); then a torch.profiler table of the runtime calls in one training step.
Usage (GPU machine): python3 scripts/host-profile.py > $OUT/host-profile.txt
"""
import gc
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import steelattn
from steelattn import _autograd, _ext, _kernel, _native

print("autograd node:", steelattn.get_device_info()["autograd_node"])

dev = "cuda" if torch.cuda.is_available() else "cpu"
dt = torch.bfloat16 if dev == "cuda" else torch.float32
B, H, N, D = 1, 8, 128, 64
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)


def us(fn, n=3000, reps=5):
    for _ in range(100):
        fn()
    sync()
    best = []
    for _ in range(reps):
        gc.collect()
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        best.append((time.perf_counter() - t0) / n * 1e6)
    return sorted(best)[len(best) // 2]


g = torch.Generator(device=dev).manual_seed(0)
q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dt, generator=g) for _ in range(3))
dout = torch.randn(B, H, N, D, device=dev, dtype=dt, generator=g)
qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
scale = D ** -0.5
sc = _kernel.scalars(scale, 0.0, 0, -1, 0, 0.0, 0, 0, False)
out = torch.empty_like(q)
lse = torch.empty(B, H, N, device=dev, dtype=torch.float32)
_kernel.forward(q, k, v, out, lse, None, None, None, None, sc, _kernel.RUN)
dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
ws = _kernel._workspace_allocator(q.device)
stream = _kernel._stream(q)
nt = torch.get_num_threads()


class Nothing(torch.autograd.Function):
    """The autograd engine's floor: same inputs/outputs as ours, no kernel."""

    @staticmethod
    def forward(ctx, q, k, v):
        o = torch.empty_like(q)
        l = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
        ctx.save_for_backward(q, k, v, o, l)
        return o, l

    @staticmethod
    def backward(ctx, do, dl):
        q, k, v, o, l = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def step(fwd):
    def f():
        for t in (qg, kg, vg):
            t.grad = None
        fwd().backward(dout)
    return f


ours = lambda: steelattn.flash_attention(qg, kg, vg, causal=True)
ours_ng = lambda: steelattn.flash_attention(q, k, v, causal=True)
cudnn = lambda: F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
cudnn_ng = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
ctx = sdpa_kernel(SDPBackend.CUDNN_ATTENTION if dev == "cuda" else SDPBackend.MATH)

rows = [
    ("torch.empty_like(q)", lambda: torch.empty_like(q)),
    ("q.add_(0) (one launch)", lambda: q.add_(0)),
    ("ext.forward raw, preallocated", lambda: _ext.forward(q, k, v, out, lse, None, None, None, None, sc, nt, stream, 0)),
    ("ext.forward raw TRAIN mode", lambda: _ext.forward(q, k, v, out, lse, None, None, None, None, sc, nt, stream, 1)),
    ("_kernel.run_forward RUN", lambda: _kernel.run_forward(q, k, v, None, None, None, sc, _kernel.RUN, False)),
    ("_native.forward (C++ alloc, no grad)", lambda: _native.native.forward(q, k, v, None, None, None, sc, None,
                                                                            False, False)),
    ("flash_attention no grad", ours_ng),
    ("_autograd.apply (grad, node in C++)", lambda: _autograd.apply(qg, kg, vg, None, None, None, sc, None)),
    ("_autograd.python_apply (grad, Python)", lambda: _autograd.python_apply(qg, kg, vg, None, None, None, sc, None)),
    ("flash_attention with grad", ours),
    ("ext.backward raw, preallocated", lambda: _ext.backward(dout, None, q, k, v, out, lse, dq, dk, dv, None, None, None,
                                                             None, sc, nt, stream, ws)),
    ("_kernel.run_backward", lambda: _kernel.run_backward(dout, None, q, k, v, out, lse, None, None, None, sc, False)),
    ("Nothing fwd+bwd (engine floor)", step(lambda: Nothing.apply(qg, kg, vg)[0])),
    ("flash_attention fwd+bwd", step(ours)),
    ("fwd+bwd, Python autograd.Function", step(lambda: _autograd.python_apply(qg, kg, vg, None, None, None, sc,
                                                                              None)[0])),
    ("fwd+bwd, C++ autograd node", step(lambda: _autograd.apply(qg, kg, vg, None, None, None, sc, None)[0])),
]
with ctx:
    rows += [("cudnn no grad", cudnn_ng), ("cudnn with grad", cudnn), ("cudnn fwd+bwd", step(cudnn))]
for name, fn in rows:
    try:
        print(f"{name:40s} {us(fn, n=1000 if 'bwd' in name else 3000):8.1f} us", flush=True)
    except Exception as e:
        print(f"{name:40s} failed: {type(e).__name__}: {e}", flush=True)

if "--no-profile" not in sys.argv:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    import contextlib
    cudnn_ctx = lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION if dev == "cuda" else SDPBackend.MATH)
    for name, fn, c in (("steelattn fwd+bwd", step(ours), contextlib.nullcontext), ("cudnn fwd+bwd", step(cudnn),
                                                                                     cudnn_ctx)):
        with c():
            for _ in range(50):
                fn()
            sync()
            with profile(activities=acts) as prof:
                for _ in range(100):
                    fn()
                sync()
        print(f"\n=== {name}: 100 steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
