"""Benchmark CLI: steelattn against its peers, timed in the same process.

    python -m steelattn.bench [--device cpu|cuda] [--op fwd|bwd|host|decode|varlen|sparse|all ...] [--quick]
                              [--budget SECONDS] [--json PATH] [--md PATH]

Peers. CPU: torch's CPU SDPA ("torch-cpu"). CUDA: torch SDPA with the cuDNN ("cudnn") and
FlashAttention-2 ("fa2") backends, FlexAttention compiled ("flex", forward only), and
FlashAttention-4 ("fa4") whenever `from flash_attn.cute.interface import flash_attn_func`
works (it takes [B, N, H, D]: its inputs are transposed copies made once, outside the
timed region). A peer that fails on a cell is logged and the cell goes on without it.

Ops (--op takes one or more; default fwd, plus decode on CUDA):
  fwd     forward, inputs that do not require grad.
  bwd     the training step as users run it: inputs that require grad, a fresh forward
          every iteration, then torch.autograd.grad(out, inputs, dout) with a preallocated
          dout. Rows "fwd_bwd" (the whole step; FLOPs 3.5x the forward's) and "bwd"
          (fwd_bwd minus the forward with grad-requiring inputs, timed alone; 2.5x).
  host    host time per call in us on a tiny shape (B1 H8 N128 D64 causal, device work
          negligible): many calls with no synchronisation inside, wall clock around the
          loop, a synchronize at its end, warm-up first; the median of interleaved rounds.
          Cases "fwd" (no grad), "fwd_grad" (inputs require grad), "fwd_bwd"
          (out.backward(dout) with a preallocated dout, grads reset to None each step as
          zero_grad(set_to_none=True) does), "decode_step" (one new token appended to a
          [1, 2, 4096, 64] cache at length 1000 and one query of 8 heads attending to it:
          flash_attention_kvcache with the length on the device; SDPA peers write the
          token with an indexed copy and attend to the first 1001 keys).
          Rows {"op": "host", "case", "impl", "us"}.
  decode  (CUDA) 1 and 16 queries against a GQA 32/8 KV cache at issue 10's (B, S) cells,
          GB/s of K and V read; paged pools (rows with "page_size"); a fused serving step;
          a 32-layer decode step captured in a CUDA graph against SDPA's (bench_cuda_decode).
          CPU: one query against GQA 32/8 caches, bf16 and fp32, against torch's CPU SDPA
          (bench_cpu_decode).
  varlen  64 random-length sequences (bench_features.py), forward and training step,
          against torch's varlen_attn and FA4's varlen when they import.
  sparse  the video locality block mask (video3d, also at 64-blocks) and the causal
          sliding-window-512 mask at N 4k/8k/16k (bench_features.py), against FlexAttention
          and our own dense call. Varlen and sparse rows carry issue 9's fields: op, case,
          pass (fwd | fwd_bwd), N, ms, tflops, active.
  e2e     transformers models end to end (bench_e2e.py): training steps, prefill, decode
          tokens/s with a static cache under CUDA graphs, against sdpa / eager / FA2-4.
  all     host, fwd, bwd, decode, varlen, sparse, e2e, in that order.

CUDA matrix (bf16, 16k tokens per batch, hidden 2048: B = 16384 // N, H = 2048 // D): D 64/128/256
x N 1k/4k/16k x causal/full, plus D 96 and 192 at N 4k (the cells issue 8's bar is judged on),
and causal sliding window 512 at D128 (FlexAttention and FA4 are its peers). --quick keeps
those cells (one window cell, Flex only on it); the full run adds windows at N 4k/8k,
D 80/160 at N 4k and FlexAttention on every D 64/128/256 cell (each Flex cell is a compile).
Timing: triton's do_bench (L2 flushed between calls, median). --budget stops starting new
cells after that many seconds; --json/--md are rewritten after every cell, so a run cut
short keeps what it measured.

One FLOP formula for every row: 4 * B * H * N * S * D (Dv = D), halved for causal;
windowed rows count the visible (query, key) pairs exactly. Rows follow the format in
DESIGN.md; steelattn rows carry "path", the dispatch counts recorded while they ran.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import itertools
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import steelattn

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTNAME = {v: k for k, v in _DTYPES.items()}
_CUDA = "cuda"  # the device the CUDA benchmarks allocate on (a test may point it at the CPU)

TOKENS, HIDDEN = 16384, 2048  # the dense matrix: B = TOKENS // N, H = HIDDEN // D
BAR_D, BAR_N = (64, 128, 256), (1024, 4096, 16384)
BAR_EXTRA_D, BAR_EXTRA_N = (96, 192), 4096
WINDOW, WINDOW_D = 512, 128  # causal sliding window cells
WINDOW_N, WINDOW_N_QUICK = (4096, 8192, 16384), (16384,)
MORE_D = (80, 160)  # full run only, at N 4k: head dims models also use
HOST_SHAPE = dict(B=1, H=8, N=128, D=64)
HOST_CASES = ("fwd", "fwd_grad", "fwd_bwd", "decode_step")
HOST_DECODE = dict(Hkv=2, S=4096, L=1000)  # decode_step: the cache (H from HOST_SHAPE) and its used length
OPS = ("host", "fwd", "bwd", "decode", "varlen", "sparse", "e2e")


def visible_pairs(N, S, causal, window):
    """Number of (query, key) pairs attended, bottom-right aligned like flash_attention."""
    if not causal and window is None:
        return N * S
    off = S - N
    total = 0
    for i in range(N):
        hi = min(S - 1, i + off) if causal else S - 1
        lo = max(0, i + off - window) if window is not None else 0
        total += max(0, hi - lo + 1)
    return total


def flops(B, H, N, S, D, causal, window=None):
    if window is None and causal and N == S:
        return 4 * B * H * N * S * D / 2  # the conventional figure anchors are quoted in
    return 4 * B * H * visible_pairs(N, S, causal, window) * D


def time_cpu(fn, min_runs=3, min_seconds=1.0):
    fn()  # warm-up (thread pool start, page faults)
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) >= 50:
            break
    return statistics.median(times) * 1e3


def time_cuda(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _git_commit():
    import os

    if os.environ.get("STEELATTN_COMMIT"):  # set by whoever copies the tree to a machine without .git
        return os.environ["STEELATTN_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def _row(op, dtype, B, H, Hkv, N, S, D, causal, window, impl, ms, fl):
    return {"op": op, "dtype": dtype, "B": B, "H": H, "Hkv": Hkv, "N": N, "S": S, "D": D, "causal": causal,
            "window": window, "impl": impl, "ms": round(ms, 4), "tflops": round(fl / ms / 1e9, 4) if fl else None,
            "gbps": None}


def _mask_name(causal, window):
    return ("causal" if causal else "full") + (f" win {window}" if window is not None else "")


# --------------------------------------------------------------------------- run state

class _Run:
    """The rows so far, the time budget, and the files rewritten after every cell."""

    def __init__(self, device, json_path=None, md_path=None, budget=None, log=print):
        self.meta = {"device": device_name(device), "torch": torch.__version__, "commit": _git_commit(),
                     "date": datetime.date.today().isoformat()}
        self.rows = []
        self.sections = {}
        self.json_path, self.md_path, self.log = json_path, md_path, log
        self.deadline = time.monotonic() + budget if budget else None
        self.skipped = 0

    def out_of_time(self):
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.skipped += 1
            return True
        return False

    def add(self, row):
        self.rows.append(row)

    def result(self):
        res = dict(self.meta, rows=self.rows)
        if self.sections:
            res["sections_s"] = dict(self.sections)
        if self.skipped:
            res["skipped_cells"] = self.skipped
        return res

    def flush(self):
        res = self.result()
        try:
            if self.json_path:
                with open(self.json_path, "w") as f:
                    json.dump(res, f, indent=1)
            if self.md_path:
                with open(self.md_path, "w") as f:
                    f.write(to_markdown(res))
        except Exception as e:  # a write error must not lose the run
            self.log(f"  could not write results: {type(e).__name__}: {e}")


def _stats_reset():
    try:
        steelattn.reset_dispatch_stats()
    except Exception:
        pass


def _stats_read():
    """Dispatch counts recorded since the last reset (JSON-clean), or None."""
    try:
        st = steelattn.get_dispatch_stats()
        st = {k: v for k, v in st.items() if v}
        return json.loads(json.dumps(st, default=str))
    except Exception:
        return None


def _path_names(p, prefix=""):
    out = []
    for k, v in (p or {}).items():
        if k == "demotions":
            continue
        if isinstance(v, dict):
            out += _path_names(v, f"{prefix}{k}.")
        elif v:
            out.append(f"{prefix}{k}")
    return out


def _fmt_path(p):
    if not p:
        return "-"
    s = " ".join(_path_names(p))
    if p.get("demotions"):
        s += " (demoted: " + "; ".join(p["demotions"]) + ")"
    return s


# --------------------------------------------------------------------------- peers

_fa4_state = {}


def fa4_func(log=None):
    """FA4's flash_attn_func, or None when it does not import (the reason logged once)."""
    if "fn" not in _fa4_state:
        try:
            from flash_attn.cute.interface import flash_attn_func

            _fa4_state["fn"] = flash_attn_func
            try:
                from importlib.metadata import version

                _fa4_state["version"] = version("flash-attn-4")
            except Exception:
                _fa4_state["version"] = "unknown"
            if log:
                log(f"  fa4: flash-attn-4 {_fa4_state['version']} imported")
        except Exception as e:
            _fa4_state["fn"] = None
            if log:
                log(f"  fa4 unavailable: {type(e).__name__}: {str(e)[:200]}")
    return _fa4_state["fn"]


_flex_compiled = None


def _flex_fns(N, causal, window):
    """FlexAttention, compiled (its eager path is a slow reference), with a block mask
    for causal / sliding-window cells."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _flex_compiled is None:
        # Every cell is a new shape or mask: allow the recompiles instead of silently
        # falling back to the eager flex path after dynamo's default 8.
        torch._dynamo.config.cache_size_limit = 1024
        torch._dynamo.config.accumulated_cache_size_limit = 1024
        _flex_compiled = torch.compile(flex_attention, dynamic=False)

    def mask_mod(b, h, q_idx, kv_idx):
        keep = q_idx >= kv_idx
        if window is not None:
            keep = keep & (q_idx - kv_idx <= window)
        return keep

    block_mask = create_block_mask(mask_mod, None, None, N, N, device=_CUDA) if (causal or window) else None
    return lambda q, k, v: _flex_compiled(q, k, v, block_mask=block_mask)


def _sdpa_ctx(name):
    """A fresh context selecting torch SDPA's backend for `name` ("cudnn", "fa2")."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "fa2": SDPBackend.FLASH_ATTENTION}[name]
    return sdpa_kernel(be)


class _Impl:
    """One peer on one cell: fwd() runs its forward on its own copies of the inputs and
    returns the output tensor; inputs/dout are in its layout; ctx() is entered around timing."""

    def __init__(self, fwd, inputs, dout=None, ctx=contextlib.nullcontext):
        self.fwd, self.inputs, self.dout, self.ctx = fwd, inputs, dout, ctx


def _make_impl(name, q, k, v, causal, window=None, dout=None, backend="steel"):
    """q, k, v: [B, H, N, D] leaves (requiring grad or not). None when `name` does not do
    this cell (SDPA has no window); raises when the peer is unavailable or refuses it."""
    gqa = q.shape[1] != k.shape[1]
    kw = {} if backend is None else {"backend": backend}
    if name == "steelattn":
        ws = (window, 0) if window is not None else None
        return _Impl(lambda: steelattn.flash_attention(q, k, v, causal=causal, window_size=ws, **kw), (q, k, v), dout)
    if name == "steelattn-sdpa":
        if window is not None:
            return None
        return _Impl(lambda: steelattn.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa, **kw),
                     (q, k, v), dout)
    if name in ("cudnn", "fa2", "torch-cpu"):
        if window is not None:
            return None
        ctx = (lambda: _sdpa_ctx(name)) if name != "torch-cpu" else contextlib.nullcontext
        return _Impl(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa),
                     (q, k, v), dout, ctx)
    if name == "fa4":
        fa4 = fa4_func()
        if fa4 is None:
            raise RuntimeError("FA4 does not import")
        q4, k4, v4 = (t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad) for t in (q, k, v))
        d4 = dout.transpose(1, 2).contiguous() if dout is not None else None
        fkw = {"causal": causal}
        if window is not None:
            fkw["window_size"] = (window, 0)

        def fwd():
            out = fa4(q4, k4, v4, **fkw)
            return out[0] if isinstance(out, (tuple, list)) else out
        return _Impl(fwd, (q4, k4, v4), d4)
    if name == "flex":
        flex = _flex_fns(q.shape[2], causal, window)
        return _Impl(lambda: flex(q, k, v), (q, k, v), dout)
    raise ValueError(f"unknown impl {name}")


def _host_decode_impl(name, dev, dtype, g):
    """The host bench's decode_step for `name` (None: that peer has no such call)."""
    B, H, D = HOST_SHAPE["B"], HOST_SHAPE["H"], HOST_SHAPE["D"]
    Hkv, S, L = HOST_DECODE["Hkv"], HOST_DECODE["S"], HOST_DECODE["L"]
    q = _randn((B, H, 1, D), dev, dtype, g)
    kc, vc = (_randn((B, Hkv, S, D), dev, dtype, g) for _ in range(2))
    kn, vn = (_randn((B, Hkv, 1, D), dev, dtype, g) for _ in range(2))
    if name == "steelattn":
        lens = torch.full((B,), L, dtype=torch.int32, device=dev)
        return _Impl(lambda: steelattn.flash_attention_kvcache(q, kc, vc, k_new=kn, v_new=vn, cache_seqlens=lens),
                     ())
    if name in ("cudnn", "fa2", "torch-cpu"):
        def step():
            kc[:, :, L:L + 1] = kn
            vc[:, :, L:L + 1] = vn
            return F.scaled_dot_product_attention(q, kc[:, :, :L + 1], vc[:, :, :L + 1], enable_gqa=True)
        return _Impl(step, (), None, (lambda: _sdpa_ctx(name)) if name != "torch-cpu" else contextlib.nullcontext)
    return None


def _time_fwd(impl, timer):
    with impl.ctx():
        return timer(impl.fwd)


def _time_train_step(impl, timer):
    ins, dout, fwd = impl.inputs, impl.dout, impl.fwd

    def step():
        torch.autograd.grad(fwd(), ins, dout)
    with impl.ctx():
        return timer(step)


def _randn(shape, device, dtype, g, requires_grad=False):
    t = torch.randn(*shape, device=device, dtype=torch.float32 if device == "cpu" else dtype, generator=g)
    return t.to(dtype).requires_grad_(requires_grad)


def _fmt_cell(res, fl, label="TFLOP/s"):
    parts = "  ".join((f"{n} {fl / t / 1e9:6.1f}" if fl / t / 1e9 >= 10 else f"{n} {fl / t / 1e9:6.3f}")
                      if t > 0 else f"{n} -" for n, t in res.items())
    ours = res.get("steelattn")
    ratio = "  ".join(f"vs {n} {res[n] / ours:4.2f}x" for n in res if n != "steelattn" and ours and ours > 0)
    return f"{label}: {parts}  {ratio}"


# --------------------------------------------------------------------------- host

def bench_host(device="cpu", quick=False, log=print, run=None):
    """Host time per call on a tiny shape; see the module docstring."""
    run = run or _Run(device, log=log)
    cuda = device == "cuda"
    dev = _CUDA if cuda else "cpu"
    B, H, N, D = (HOST_SHAPE[x] for x in "BHND")
    dtype = torch.bfloat16 if cuda else torch.float32
    names = ["steelattn", "steelattn-sdpa"]
    names += (["cudnn", "fa2"] + (["fa4"] if fa4_func(log) else [])) if cuda else ["torch-cpu"]
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    target, rounds = (0.05, 5) if quick else (0.1, 7)
    g = torch.Generator(device=dev).manual_seed(0)
    base = [_randn((B, H, N, D), dev, dtype, g) for _ in range(3)]
    dout = _randn((B, H, N, D), dev, dtype, g)

    jobs = []
    for name in names:
        for case in HOST_CASES:
            q, k, v = (t.detach().clone().requires_grad_(case not in ("fwd", "decode_step")) for t in base)
            try:
                impl = _host_decode_impl(name, dev, dtype, g) if case == "decode_step" else \
                    _make_impl(name, q, k, v, causal=True, dout=dout, backend=None)  # the default path users get
            except Exception as e:
                log(f"  host {name} unavailable: {type(e).__name__}: {str(e)[:200]}")
                break
            if impl is None:
                continue
            if case == "fwd_bwd":
                def step(impl=impl):
                    for t in impl.inputs:
                        t.grad = None
                    impl.fwd().backward(impl.dout)
            else:
                step = impl.fwd
            # warm-up (FA4 compiles here), then calibrate the calls per round
            try:
                with impl.ctx():
                    _stats_reset()
                    for _ in range(20):
                        step()
                    sync()
                    path = _stats_read() if name.startswith("steelattn") else None
                    t0 = time.perf_counter()
                    for _ in range(20):
                        step()
                    sync()
                    est = (time.perf_counter() - t0) / 20
            except Exception as e:
                log(f"  host {name} {case} failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            n = max(20, min(500, int(target / max(est, 1e-7))))
            jobs.append({"name": name, "case": case, "step": step, "ctx": impl.ctx, "n": n, "times": [],
                         "path": path})

    # Rounds interleaved over the jobs, so drift (clocks, a neighbour on the CPU) hits every impl alike.
    order = [j for _ in range(rounds) for j in jobs]
    for j in order:
        step, n = j["step"], j["n"]
        try:
            with j["ctx"]():
                gc.collect()
                sync()
                t0 = time.perf_counter()
                for _ in range(n):
                    step()
                sync()
                j["times"].append((time.perf_counter() - t0) / n * 1e6)
        except Exception as e:
            log(f"  host {j['name']} {j['case']} failed: {type(e).__name__}: {str(e)[:200]}")
    rows = []
    by = {}
    for j in jobs:
        if not j["times"]:
            continue
        us = statistics.median(j["times"])
        if j["case"] == "decode_step":  # one query against the cache's used keys
            row = _row("host", _DTNAME[dtype], B, H, HOST_DECODE["Hkv"], 1, HOST_DECODE["L"] + 1, D, False, None,
                       j["name"], us / 1e3, None)
        else:
            row = _row("host", _DTNAME[dtype], B, H, H, N, N, D, True, None, j["name"], us / 1e3, None)
        row.update(case=j["case"], us=round(us, 2), calls=j["n"], rounds=len(j["times"]))
        if j["path"] is not None:
            row["path"] = j["path"]
        rows.append(row)
        run.add(row)
        by.setdefault(j["name"], {})[j["case"]] = us
    anchor = "cudnn" if cuda else "torch-cpu"
    for name, cases in by.items():
        rel = ""
        if name.startswith("steelattn") and anchor in by:
            rel = "  / " + anchor + ": " + "  ".join(
                f"{c} {cases[c] / by[anchor][c]:.2f}x" for c in HOST_CASES if c in cases and c in by[anchor])
        log(f"  host {name:15s} " + "  ".join(f"{c} {cases[c]:7.1f} us" for c in HOST_CASES if c in cases) + rel)
    run.flush()
    return rows


# --------------------------------------------------------------------------- CPU

def cpu_cases(quick=False):
    Ns = (512, 2048) if quick else (512, 2048, 8192)
    heads = ((8, 8),) if quick else ((8, 8), (32, 8))
    for dt in ("fp32", "bf16"):
        for H, Hkv in heads:
            for N in Ns:
                for D in (64, 128):
                    for causal in (False, True):
                        yield dt, 1, H, Hkv, N, N, D, causal


def cpu_bwd_cases(quick=False):
    for dt in ("fp32", "bf16"):
        for N in ((512, 2048) if not quick else (1024,)):
            for D in (64, 128):
                for causal in (False, True):
                    yield dt, 1, 8, 8, N, N, D, causal


def _bwd_cell(dev, dt, B, H, Hkv, N, S, D, causal, window, names, timer, log, run):
    """fwd_bwd and bwd rows for one cell: each peer's training step (fresh forward, then
    autograd with a preallocated dout) and its forward with grad-requiring inputs."""
    dtype = _DTYPES[dt]
    g = torch.Generator(device=dev).manual_seed(0)
    q = _randn((B, H, N, D), dev, dtype, g, True)
    k, v = (_randn((B, Hkv, S, D), dev, dtype, g, True) for _ in range(2))
    dout = _randn((B, H, N, D), dev, dtype, g)
    fl = flops(B, H, N, S, D, causal, window)
    res = {}
    for name in names:
        try:
            impl = _make_impl(name, q, k, v, causal, window, dout)
            if impl is None:
                continue
            _stats_reset()
            step = _time_train_step(impl, timer)
            fwd = _time_fwd(impl, timer)
            path = _stats_read() if name == "steelattn" else None
        except Exception as e:
            log(f"  bwd {name} failed at {dt} D={D} N={N} {_mask_name(causal, window)}: "
                f"{type(e).__name__}: {str(e)[:200]}")
            continue
        finally:
            impl = None
        res[name] = step - fwd
        for op, ms, mult in (("fwd_bwd", step, 3.5), ("bwd", step - fwd, 2.5)):
            row = _row(op, dt, B, H, Hkv, N, S, D, causal, window, name, ms, mult * fl if ms > 0 else None)
            if path is not None:
                row["path"] = path
            run.add(row)
    log(f"  bwd {dt} H={H}/{Hkv} D={D:3d} N={N:5d} {_mask_name(causal, window):14s} {_fmt_cell(res, 2.5 * fl, 'bwd TFLOP/s')}")
    run.flush()


def bench_cpu_bwd(quick=False, log=print, run=None):
    run = run or _Run("cpu", log=log)
    n0 = len(run.rows)
    timer = (lambda fn: time_cpu(fn, min_seconds=0.5)) if quick else time_cpu
    for dt, B, H, Hkv, N, S, D, causal in cpu_bwd_cases(quick):
        if run.out_of_time():
            continue
        _bwd_cell("cpu", dt, B, H, Hkv, N, S, D, causal, None, ("steelattn", "torch-cpu"), timer, log, run)
    return run.rows[n0:]


CPU_DECODE_CELLS = ((1, 32768), (8, 4096), (4, 8192))


def bench_cpu_decode(quick=False, log=print, run=None):
    """Decode on the CPU: one new query per sequence against a GQA KV cache (H=32, Hkv=8,
    D=128) through flash_attention_kvcache with the lengths given, bf16 and fp32, against
    torch's CPU SDPA (enable_gqa); GB/s of K and V read."""
    run = run or _Run("cpu", log=log)
    n0 = len(run.rows)
    H, Hkv, D = 32, 8, 128
    for dt in ("bf16", "fp32"):
        for B, S in CPU_DECODE_CELLS[:1] if quick else CPU_DECODE_CELLS:
            if run.out_of_time():
                continue
            dtype = _DTYPES[dt]
            g = torch.Generator().manual_seed(0)
            q = torch.randn(B, H, 1, D, generator=g).to(dtype)
            k, v = (torch.randn(B, Hkv, S, D, generator=g).to(dtype) for _ in range(2))
            lens = torch.full((B,), S, dtype=torch.int32)
            kv_bytes = 2 * B * Hkv * S * D * q.element_size()
            with torch.no_grad():
                _stats_reset()
                ours = time_cpu(lambda: steelattn.flash_attention_kvcache(q, k, v, cache_seqlens=lens))
                path = _stats_read()
                ref = time_cpu(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            for name, ms in (("steelattn", ours), ("torch-cpu", ref)):
                row = _row("decode", dt, B, H, Hkv, 1, S, D, False, None, name, ms, None)
                row["gbps"] = round(kv_bytes / ms / 1e6, 2)
                if name == "steelattn" and path is not None:
                    row["path"] = path
                run.add(row)
            log(f"  decode {dt:5s} B={B} S={S:5d}  GB/s: steelattn {kv_bytes / ours / 1e6:6.2f}  "
                f"torch-cpu {kv_bytes / ref / 1e6:6.2f}  ratio {ref / ours:5.2f}x")
            run.flush()
    return run.rows[n0:]


def bench_cpu(quick=False, log=print, run=None):
    run = run or _Run("cpu", log=log)
    rows = []
    for dt, B, H, Hkv, N, S, D, causal in cpu_cases(quick):
        if run.out_of_time():
            continue
        dtype = _DTYPES[dt]
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, H, N, D, generator=g).to(dtype)
        k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
        v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
        fl = flops(B, H, N, S, D, causal)
        with torch.no_grad():
            _stats_reset()
            ours = time_cpu(lambda: steelattn.flash_attention(q, k, v, causal=causal, backend="steel"))
            path = _stats_read()
            ref = time_cpu(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=H != Hkv))
        new = [_row("fwd", dt, B, H, Hkv, N, S, D, causal, None, "steelattn", ours, fl),
               _row("fwd", dt, B, H, Hkv, N, S, D, causal, None, "torch-cpu", ref, fl)]
        if path is not None:
            new[0]["path"] = path
        for r in new:
            run.add(r)
        rows += new
        log(f"  {dt:5s} H={H:2d}/{Hkv:<2d} N={N:5d} D={D:3d} {'causal' if causal else 'full  '}  "
            f"steelattn {ours:9.2f} ms  torch {ref:9.2f} ms  ratio {ref / ours:5.2f}x")
        run.flush()
    return rows


# --------------------------------------------------------------------------- CUDA

def bar_cells():
    """The dense cells issue 8's bar is judged on, forward and backward."""
    for D in BAR_D:
        for N in BAR_N:
            for causal in (False, True):
                yield D, N, causal, None
    for D in BAR_EXTRA_D:
        for causal in (False, True):
            yield D, BAR_EXTRA_N, causal, None


def is_bar_cell(r):
    if r.get("window") is not None or r["N"] != r["S"] or r["H"] != r["Hkv"]:
        return False
    return (r["D"] in BAR_D and r["N"] in BAR_N) or (r["D"] in BAR_EXTRA_D and r["N"] == BAR_EXTRA_N)


def cuda_cases(quick=False):
    """Forward cells: the bar cells, then causal window 512 at D128, then (full run) the
    head dims 80 and 160 that models also use."""
    yield from bar_cells()
    for N in (WINDOW_N_QUICK if quick else WINDOW_N):
        yield WINDOW_D, N, True, WINDOW
    if not quick:
        for D in MORE_D:
            for causal in (False, True):
                yield D, BAR_EXTRA_N, causal, None


def cuda_bwd_cases(quick=False):
    yield from bar_cells()
    yield WINDOW_D, WINDOW_N[-1], True, WINDOW


def _cuda_shape(D, N):
    return max(1, TOKENS // N), HIDDEN // D


def _peers(with_fa4=True):
    return ["steelattn", "cudnn", "fa2"] + (["fa4"] if with_fa4 and fa4_func() else [])


def bench_cuda(quick=False, log=print, run=None):
    run = run or _Run("cuda", log=log)
    n0 = len(run.rows)
    dt = "bf16"
    for D, N, causal, window in cuda_cases(quick):
        if run.out_of_time():
            continue
        B, H = _cuda_shape(D, N)
        g = torch.Generator(device=_CUDA).manual_seed(0)
        q, k, v = (_randn((B, H, N, D), _CUDA, torch.bfloat16, g) for _ in range(3))
        fl = flops(B, H, N, N, D, causal, window)
        names = _peers()
        # FlexAttention: the anchor of the window cells; in the full run also of the D 64/128/256 cells
        if window is not None or (not quick and D in BAR_D):
            names.append("flex")
        res = {}
        for name in names:
            try:
                impl = _make_impl(name, q, k, v, causal, window)
                if impl is None:
                    continue
                _stats_reset()
                res[name] = _time_fwd(impl, time_cuda)
                path = _stats_read() if name == "steelattn" else None
            except Exception as e:
                log(f"  {name} failed at D={D} N={N} {_mask_name(causal, window)}: {type(e).__name__}: {str(e)[:200]}")
                continue
            finally:
                impl = None
            row = _row("fwd", dt, B, H, H, N, N, D, causal, window, name, res[name], fl)
            if path is not None:
                row["path"] = path
            run.add(row)
        log(f"  D={D:3d} N={N:5d} {_mask_name(causal, window):14s} {_fmt_cell(res, fl)}")
        run.flush()
        del q, k, v
    return run.rows[n0:]


def bench_cuda_bwd(quick=False, log=print, run=None):
    """The training step through autograd (see the module docstring), against the same
    peers as the forward (FlexAttention excepted)."""
    run = run or _Run("cuda", log=log)
    n0 = len(run.rows)
    for D, N, causal, window in cuda_bwd_cases(quick):
        if run.out_of_time():
            continue
        B, H = _cuda_shape(D, N)
        _bwd_cell(_CUDA, "bf16", B, H, H, N, N, D, causal, window, _peers(), time_cuda, log, run)
    return run.rows[n0:]


def _paged_pool(k, v, page):
    """The cache k, v [B, Hkv, S, D] as shuffled pages of a pool [num_pages, page, Hkv, D]:
    (k_pool, v_pool, block_table int32 [B, S / page], lengths int32 [B])."""
    B, Hkv, S, D = k.shape
    P = S // page
    pool_k, pool_v = (t.view(B, Hkv, P, page, t.size(3)).permute(0, 2, 3, 1, 4).reshape(B * P, page, Hkv, t.size(3))
                      .contiguous() for t in (k, v))
    g = torch.Generator().manual_seed(page)
    table = torch.randperm(B * P, generator=g).view(B, P).to(device=k.device, dtype=torch.int32)
    perm_k, perm_v = torch.empty_like(pool_k), torch.empty_like(pool_v)  # page table[b, p] holds page b * P + p
    perm_k[table.view(-1).long()], perm_v[table.view(-1).long()] = pool_k, pool_v
    return perm_k, perm_v, table, torch.full((B,), S, dtype=torch.int32, device=k.device)


def _paged_impl(q, k, v, page):
    """The same cache read through a block table (flash_attention_kvcache), for the
    paged-vs-dense comparison."""
    pk, pv, table, lens = _paged_pool(k, v, page)
    return _Impl(lambda: steelattn.flash_attention_kvcache(q, pk, pv, block_table=table, cache_seqlens=lens,
                                                           causal=False), (q, k, v))


def _fa4_paged_impl(q, k, v, page):
    """FA4's varlen call over the same pages (page_table, seqused_k), one query per
    sequence; raises when FA4 does not import or refuses the call."""
    from flash_attn.cute.interface import flash_attn_varlen_func

    B, H, N, D = q.shape
    pk, pv, table, lens = _paged_pool(k, v, page)
    qt = q.transpose(1, 2).reshape(B * N, H, D).contiguous()
    cu_q = torch.arange(0, (B + 1) * N, N, dtype=torch.int32, device=q.device)

    def fwd():
        out = flash_attn_varlen_func(qt, pk, pv, cu_seqlens_q=cu_q, max_seqlen_q=N, seqused_k=lens, page_table=table,
                                     causal=False)
        return out[0] if isinstance(out, (tuple, list)) else out
    return _Impl(fwd, (qt, pk, pv))


def _step_impl(q, k, v, torch_ops):
    """A whole decode step as a serving loop runs it: RoPE on q and on one new token, the
    token appended in place at the device lengths, attention over the S - 1 + 1 keys
    (flash_attention_kvcache). torch_ops: the rotation and append as torch ops
    (kvcache.fused_append off around the timing) instead of the fused kv_append kernel."""
    from . import kvcache

    B, Hkv, S, D = k.shape
    g = torch.Generator(device=q.device).manual_seed(1)
    k_new, v_new = (_randn((B, Hkv, 1, D), q.device, q.dtype, g) for _ in range(2))
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=q.device, dtype=torch.float32) / D))
    ang = torch.arange(S, device=q.device, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = ang.cos(), ang.sin()
    lens = torch.full((B,), S - 1, dtype=torch.int32, device=q.device)
    kc, vc = k.clone(), v.clone()

    def step():
        return steelattn.flash_attention_kvcache(q, kc, vc, k_new=k_new, v_new=v_new, cache_seqlens=lens,
                                                 rotary_cos=cos, rotary_sin=sin, rotary_interleaved=False)

    @contextlib.contextmanager
    def mode():
        prev, kvcache.fused_append = kvcache.fused_append, not torch_ops
        try:
            yield
        finally:
            kvcache.fused_append = prev
    return _Impl(step, (q, k, v), ctx=mode)


# Issue 10's decode cells: (B, S) with one query token, and with 16; --quick keeps the first
# of each. Paged pools at these page sizes. The 32-layer step: B, S and layers.
DECODE_CELLS = ((1, 32768), (8, 16384), (8, 32768), (64, 4096), (128, 2048))
DECODE_CELLS_16 = ((8, 32768),)
DECODE_PAGES = (16, 64)
DECODE_LAYERS = dict(B=8, S=4096, layers=32)


def _layers_step_impl(q, caches, k_new, v_new, lens, torch_ops):
    """One decode step of a `len(caches)`-layer model's attention, as a serving loop under
    CUDA graphs runs it: per layer, the new token appended into the layer's static cache
    at the device lengths and one query attending to it. steelattn: flash_attention_kvcache
    (fused append, lengths on the device). torch_ops: an indexed copy at the lengths and
    SDPA over the static cache with a boolean mask of the used keys (what transformers'
    static cache does), torch choosing the SDPA backend."""
    B = q.size(0)
    if not torch_ops:
        def step():
            for kc, vc in caches:
                out = steelattn.flash_attention_kvcache(q, kc, vc, k_new=k_new, v_new=v_new, cache_seqlens=lens)
            return out
        return step
    S = caches[0][0].size(2)
    rows, pos = torch.arange(B, device=q.device), lens.long()
    mask = (torch.arange(S, device=q.device)[None] <= pos[:, None])[:, None, None, :]  # [B, 1, 1, S]

    def step():
        for kc, vc in caches:
            kc[rows, :, pos] = k_new[:, :, 0]
            vc[rows, :, pos] = v_new[:, :, 0]
            out = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True)
        return out
    return step


def _graphed(fn):
    """fn captured in a CUDA graph (warmed up on a side stream first); returns the replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def bench_cuda_decode(quick=False, log=print, run=None, device=None, timer=None, cells=None, cells16=None,
                      layers=None):
    """Decode: one (or 16) new queries against a long GQA KV cache (H=32, Hkv=8, D=128,
    bf16); memory bound, so reported as GB/s of K and V read, at issue 10's (B, S) cells.
    With one query also the same cache as shuffled pages (impl "steelattn-paged", rows with
    "page_size"; "fa4-paged" when FA4 imports), and a whole serving step with RoPE and the
    append of one token, fused (steelattn-step) and with the rotation and append as torch
    ops (steelattn-step-torch-ops).
    Last, a 32-layer decode step captured in a CUDA graph (B8 S4k), steelattn against torch's
    SDPA with an indexed append and a mask ("steelattn-32layer-graph", "sdpa-32layer-graph";
    GB/s over all layers' K and V). device / timer / cells / layers: for a CPU smoke test."""
    dev, timer = device or _CUDA, timer or time_cuda
    cuda = torch.device(dev).type == "cuda"
    run = run or _Run("cuda" if cuda else "cpu", log=log)
    n0 = len(run.rows)
    H, Hkv, D = 32, 8, 128
    cells = cells or (DECODE_CELLS[:1] if quick else DECODE_CELLS)
    cells16 = cells16 if cells16 is not None else DECODE_CELLS_16
    dtype = torch.bfloat16
    for (B, S), N in [(c, 1) for c in cells] + [(c, 16) for c in cells16]:
        if run.out_of_time():
            continue
        g = torch.Generator(device=dev).manual_seed(0)
        q = _randn((B, H, N, D), dev, dtype, g)
        k, v = (_randn((B, Hkv, S, D), dev, dtype, g) for _ in range(2))
        kv_bytes = 2 * B * Hkv * S * D * 2
        res = {}
        names = [(n, None) for n in (_peers() if cuda else ["steelattn"])]
        if N == 1:
            names += [("steelattn-paged", p) for p in DECODE_PAGES] + [("steelattn-step", None),
                                                                       ("steelattn-step-torch-ops", None)]
            if cuda and fa4_func():
                names += [("fa4-paged", p) for p in DECODE_PAGES]
        for name, page in names:
            label = name + (str(page) if page else "")
            try:
                if page:
                    impl = (_fa4_paged_impl if name == "fa4-paged" else _paged_impl)(q, k, v, page)
                elif "step" in name:
                    impl = _step_impl(q, k, v, torch_ops=name.endswith("torch-ops"))
                else:
                    impl = _make_impl(name, q, k, v, causal=False)
                _stats_reset()
                res[label] = _time_fwd(impl, timer)
                path = _stats_read() if name == "steelattn" else None
            except Exception as e:
                log(f"  decode {label} failed at B={B} N={N} S={S}: {type(e).__name__}: {str(e)[:160]}")
                continue
            finally:
                impl = None
            row = _row("decode", "bf16", B, H, Hkv, N, S, D, False, None, name, res[label], None)
            row["gbps"] = round(kv_bytes / res[label] / 1e6, 1)
            row["page_size"] = page
            if path is not None:
                row["path"] = path
            run.add(row)
        parts = "  ".join(f"{n} {kv_bytes / t / 1e6:7.1f}" for n, t in res.items())
        log(f"  decode B={B} N={N:2d} S={S:5d}  GB/s: {parts}")
        run.flush()
        del q, k, v
        gc.collect()
    lay = layers or DECODE_LAYERS
    if cuda and not run.out_of_time():
        B, S, L = lay["B"], lay["S"], lay["layers"]
        g = torch.Generator(device=dev).manual_seed(2)
        q = _randn((B, H, 1, D), dev, dtype, g)
        k_new, v_new = (_randn((B, Hkv, 1, D), dev, dtype, g) for _ in range(2))
        caches = [tuple(_randn((B, Hkv, S, D), dev, dtype, g) for _ in range(2)) for _ in range(L)]
        lens = torch.full((B,), S - 1, dtype=torch.int32, device=dev)  # tokens already in each cache
        kv_bytes = L * 2 * B * Hkv * S * D * 2
        for name, torch_ops in (("steelattn-32layer-graph", False), ("sdpa-32layer-graph", True)):
            try:
                ms = timer(_graphed(_layers_step_impl(q, caches, k_new, v_new, lens, torch_ops)))
            except Exception as e:
                log(f"  decode {name} failed: {type(e).__name__}: {str(e)[:160]}")
                continue
            row = _row("decode", "bf16", B, H, Hkv, 1, S, D, False, None, name, ms, None)
            row.update(gbps=round(kv_bytes / ms / 1e6, 1), page_size=None, layers=L)
            run.add(row)
            log(f"  decode {name} B={B} S={S} x{L} layers: {ms:.3f} ms ({kv_bytes / ms / 1e6:.0f} GB/s)")
        run.flush()
        del caches
        gc.collect()
    return run.rows[n0:]


# --------------------------------------------------------------------------- output

def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    info = steelattn.get_device_info()["cpu"]
    return f"x86-64 CPU ({info['cores']} cores, {info['isa']})"


def _ordered(seq):
    out = []
    for x in seq:
        if x not in out:
            out.append(x)
    return out


def _host_markdown(rows):
    by = {}
    for r in rows:
        by.setdefault(r["impl"], {})[r["case"]] = r
    r0 = rows[0]
    lines = [f"## Host time per call (us), {r0['dtype']} B{r0['B']} H{r0['H']} N{r0['N']} D{r0['D']} "
             f"{_mask_name(r0['causal'], r0['window'])}", "",
             "| impl | " + " | ".join(HOST_CASES) + " | steelattn path |", "|---|" + "---|" * (len(HOST_CASES) + 1)]
    for impl, cases in by.items():
        cells = [f"{cases[c]['us']:.1f}" if c in cases else "-" for c in HOST_CASES]
        path = _fmt_path(next((cases[c].get("path") for c in ("fwd_bwd", "fwd_grad", "fwd")  # both passes
                               if c in cases and cases[c].get("path")), None)) if impl.startswith("steelattn") else ""
        lines.append(f"| {impl} | " + " | ".join(cells) + f" | {path} |")
    anchor = "cudnn" if "cudnn" in by else ("torch-cpu" if "torch-cpu" in by else None)
    if anchor:
        for ours in [i for i in by if i.startswith("steelattn")]:
            cells = [f"{by[ours][c]['us'] / by[anchor][c]['us']:.2f}x" if c in by[ours] and c in by[anchor] else "-"
                     for c in HOST_CASES]
            lines.append(f"| {ours} / {anchor} | " + " | ".join(cells) + " | |")
        lines += ["", f"Last rows: steelattn's host time over {anchor}'s (< 1 means lighter; issue 8's bar: "
                      "fwd <= 0.8x, fwd_grad <= 1.0x, fwd_bwd <= 0.8x cuDNN's)."]
    return lines + [""]


def _summary_markdown(rows, cuda):
    """Min and median of anchor time / steelattn time per op over the dense cells
    (on CUDA, the bar cells)."""
    lines = []
    for op in ("fwd", "bwd", "fwd_bwd"):
        cells = {}
        for r in rows:
            if r["op"] != op or r.get("window") is not None or (cuda and not is_bar_cell(r)):
                continue
            cells.setdefault((r["dtype"], r["H"], r["Hkv"], r["N"], r["D"], r["causal"]), {})[r["impl"]] = r["ms"]
        anchors = _ordered(i for c in cells.values() for i in c if i != "steelattn")
        for a in anchors:
            rat = [(c[a] / c["steelattn"], key) for key, c in cells.items()
                   if a in c and "steelattn" in c and c["steelattn"] > 0 and c[a] > 0]
            if not rat:
                continue
            lo, key = min(rat)
            med = statistics.median(x for x, _ in rat)
            lines.append(f"| {op} | {a} | {len(rat)} | {lo:.2f}x (D{key[4]} N{key[3]} "
                         f"{'causal' if key[5] else 'full'}{'' if len(set(k[0] for _, k in rat)) == 1 else ' ' + key[0]}) "
                         f"| {med:.2f}x |")
    if not lines:
        return []
    what = "the bar cells (D 64/128/256 x N 1k/4k/16k x causal/full, D 96/192 at N 4k)" if cuda else "the dense cells"
    return (["## Summary", "", f"Anchor time / steelattn time over {what}; > 1 means steelattn is faster.", "",
             "| op | against | cells | min | median |", "|---|---|---|---|---|"] + lines + [""])


def to_markdown(result):
    lines = [f"# steelattn benchmark: {result['device']}", "",
             f"torch {result['torch']}, commit {result['commit']}, {result['date']}."]
    if result.get("peers"):
        lines[-1] += " Peers: " + ", ".join(f"{k} {v}" for k, v in result["peers"].items()) + "."
    if result.get("sections_s"):
        lines[-1] += " Seconds per section: " + ", ".join(f"{k} {v}" for k, v in result["sections_s"].items()) + "."
    if result.get("skipped_cells"):
        lines[-1] += f" {result['skipped_cells']} cells skipped (time budget spent)."
    lines.append("")
    rows = result["rows"]
    host = [r for r in rows if r["op"] == "host"]
    if host:
        lines += _host_markdown(host)
    dense = [r for r in rows if r["op"] not in ("host", "e2e")]
    lines += _summary_markdown(dense, cuda="CPU" not in result["device"])
    # A section per op, and per pass where rows have one (varlen, sparse: "sparse_fwd", ...).
    section = lambda r: r["op"] + (f"_{r['pass']}" if r.get("pass") else "")  # noqa: E731
    present = _ordered(section(r) for r in dense)
    for op in [o for o in ("fwd", "bwd", "fwd_bwd", "decode") if o in present] + \
            [o for o in present if o not in ("fwd", "bwd", "fwd_bwd", "decode")]:
        oprows = [r for r in dense if section(r) == op]
        # Rows with a "case" (varlen, sparse: masks of one shape) are keyed and labelled by it.
        rkey = lambda r: (r["dtype"], r["B"], r["H"], r["Hkv"], r["N"], r["S"], r["D"], r["causal"],  # noqa: E731
                          r["window"], r.get("case"))
        keys = _ordered(rkey(r) for r in oprows)
        col = lambda r: r["impl"] + (str(r["page_size"]) if r.get("page_size") else "")  # noqa: E731
        impls = _ordered(col(r) for r in oprows)
        if "steelattn" in impls:
            impls = ["steelattn"] + [i for i in impls if i != "steelattn"]
        anchors = [i for i in impls if i != "steelattn"]
        has_path = any(r.get("path") for r in oprows)
        unit = "GB/s" if op == "decode" else "TFLOP/s"
        hdr = "| dtype | B | H/Hkv | N | S | D | mask | " + " | ".join(f"{i} ms ({unit})" for i in impls)
        hdr += "".join(f" | vs {a}" for a in anchors) + (" | steelattn path" if has_path else "") + " |"
        lines += [f"## {op}", "", hdr, "|" + "---|" * (7 + len(impls) + len(anchors) + has_path)]
        for key in keys:
            dt, B, H, Hkv, N, S, D, causal, window, case = key
            by = {col(r): r for r in oprows if rkey(r) == key}

            def cell(r):
                if r["tflops"] is not None:
                    rate = f"{r['tflops']:.1f}" if r["tflops"] >= 10 else f"{r['tflops']:.3f}"
                elif r["gbps"] is not None:
                    rate = f"{r['gbps']:.0f}" if r["gbps"] >= 10 else f"{r['gbps']:.2f}"
                else:
                    rate = "-"
                return f"{r['ms']:.3f} ({rate})"

            cells = [cell(by[i]) if i in by else "-" for i in impls]
            ours = by.get("steelattn")
            ratios = [f"{by[a]['ms'] / ours['ms']:.2f}x" if a in by and ours and ours["ms"] > 0 else "-" for a in anchors]
            active = next((r["active"] for r in by.values() if r.get("active") is not None), None)
            label = _mask_name(causal, window) + (f": {case}" if case else "") + (
                f", {active:.1%} active" if active is not None else "")
            line = f"| {dt} | {B} | {H}/{Hkv} | {N} | {S} | {D} | {label} | " + " | ".join(cells)
            line += "".join(f" | {x}" for x in ratios)
            if has_path:
                line += f" | {_fmt_path(ours.get('path')) if ours else '-'}"
            lines.append(line + " |")
        lines.append("")
    e2e = [r for r in rows if r["op"] == "e2e"]
    if e2e:
        lines += ["## e2e (transformers)", "", "| case | impl | ms | tok/s |", "|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['impl']} | {r.get('ms', '-') if 'ms' not in r else round(r['ms'], 3)} | "
                  f"{round(r['tok_s'], 1) if 'tok_s' in r else '-'} |" for r in e2e] + [""]
    lines += ["Ratios are anchor time / steelattn time (> 1 means steelattn is faster). "
              "TFLOP/s: 4·B·H·N·S·D (halved for causal, exact pair count for windows); bwd 2.5x that, "
              "fwd_bwd 3.5x. bwd = fwd_bwd (training step through autograd) minus the forward with "
              "grad-requiring inputs."]
    return "\n".join(lines) + "\n"


def run(device="cpu", quick=False, ops=None, log=print, json_path=None, md_path=None, budget=None):
    """Runs the benchmarks named in `ops` (default: fwd, plus decode on CUDA) and returns
    {"device", "torch", "commit", "date", "rows", ...}; the files, when given, are
    rewritten after every cell."""
    if ops is None:
        ops = ("fwd", "decode") if device == "cuda" else ("fwd",)
    if "all" in ops:
        ops = OPS
    log(f"steelattn benchmark on {device_name(device)}, torch {torch.__version__}")
    state = _Run(device, json_path, md_path, budget, log)
    if device == "cuda":
        peers = {"cudnn": torch.backends.cudnn.version()}
        if any(op in ops for op in ("fwd", "bwd", "host")) and fa4_func(log):
            peers["fa4"] = _fa4_state.get("version")
        state.meta["peers"] = peers
    benches = {
        "host": lambda: bench_host(device, quick, log, state),
        "fwd": lambda: (bench_cuda if device == "cuda" else bench_cpu)(quick, log, state),
        "bwd": lambda: (bench_cuda_bwd if device == "cuda" else bench_cpu_bwd)(quick, log, state),
        "decode": lambda: (bench_cuda_decode if device == "cuda" else bench_cpu_decode)(quick, log, state),
        "varlen": lambda: _features().bench_varlen(device, quick, log, state),
        "sparse": lambda: _features().bench_sparse(device, quick, log, state),
        "e2e": lambda: _e2e().bench_e2e(device, quick, log, state),
    }
    for op in OPS:
        if op not in ops:
            continue
        t0 = time.monotonic()
        log(f"== {op}")
        benches[op]()
        state.sections[op] = round(time.monotonic() - t0, 1)
        log(f"== {op} done in {state.sections[op]} s")
        state.flush()
    if state.skipped:
        log(f"  {state.skipped} cells skipped: the --budget of {budget} s was spent")
    return state.result()


def _e2e():
    from . import bench_e2e  # imports this module: loaded on first use
    return bench_e2e


def _features():
    from . import bench_features  # imports this module: loaded on first use
    return bench_features


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m steelattn.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="the bar cells only (CPU: a smaller matrix)")
    ap.add_argument("--op", nargs="+", choices=OPS + ("all",), default=None,
                    help="what to time (default: fwd, plus decode on CUDA)")
    ap.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                    help="start no new cell after this many seconds (the files keep what was measured)")
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    ap.add_argument("--md", metavar="PATH", help="write a markdown table")
    args = ap.parse_args(argv)
    result = run(args.device, args.quick, ops=args.op, json_path=args.json, md_path=args.md, budget=args.budget)
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
