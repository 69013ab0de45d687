"""Benchmark CLI: steelattn against the anchors, timed in the same process.

    python -m steelattn.bench [--device cpu|cuda] [--quick] [--json PATH] [--md PATH]

CPU: our kernel against torch's CPU SDPA. CUDA: against torch SDPA with the cuDNN and
FlashAttention-2 backends and FlexAttention. One FLOP formula for every row:
4 * B * H * N * S * D (Dv = D), halved for causal; windowed rows count the visible
(query, key) pairs exactly. Rows follow the format in DESIGN.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import steelattn

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
        for N in ((512, 2048) if not quick else (2048,)):
            for D in (64, 128):
                for causal in (False, True):
                    yield dt, 1, 8, 8, N, N, D, causal


def _time_backward(fwd, inputs, dout, timer):
    """Times the backward pass alone: one forward keeps its graph, grads are taken repeatedly."""
    out = fwd()
    return timer(lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True))


def bench_cpu_bwd(quick=False, log=print):
    rows = []
    for dt, B, H, Hkv, N, S, D, causal in cpu_bwd_cases(quick):
        dtype = _DTYPES[dt]
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, h, n, D, generator=g).to(dtype).requires_grad_()
                   for h, n in ((H, N), (Hkv, S), (Hkv, S)))
        dout = torch.randn(B, H, N, D, generator=g).to(dtype)
        fl = 2.5 * flops(B, H, N, S, D, causal)
        ours = _time_backward(lambda: steelattn.flash_attention(q, k, v, causal=causal, backend="steel"),
                              (q, k, v), dout, time_cpu)
        ref = _time_backward(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                             (q, k, v), dout, time_cpu)
        rows.append(_row("bwd", dt, B, H, Hkv, N, S, D, causal, None, "steelattn", ours, fl))
        rows.append(_row("bwd", dt, B, H, Hkv, N, S, D, causal, None, "torch-cpu", ref, fl))
        log(f"  bwd {dt:5s} H={H:2d}/{Hkv:<2d} N={N:5d} D={D:3d} {'causal' if causal else 'full  '}  "
            f"steelattn {ours:9.2f} ms  torch {ref:9.2f} ms  ratio {ref / ours:5.2f}x")
    return rows


def bench_cpu(quick=False, log=print):
    rows = []
    for dt, B, H, Hkv, N, S, D, causal in cpu_cases(quick):
        dtype = _DTYPES[dt]
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, H, N, D, generator=g).to(dtype)
        k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
        v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
        fl = flops(B, H, N, S, D, causal)
        with torch.no_grad():
            ours = time_cpu(lambda: steelattn.flash_attention(q, k, v, causal=causal, backend="steel"))
            ref = time_cpu(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=H != Hkv))
        rows.append(_row("fwd", dt, B, H, Hkv, N, S, D, causal, None, "steelattn", ours, fl))
        rows.append(_row("fwd", dt, B, H, Hkv, N, S, D, causal, None, "torch-cpu", ref, fl))
        log(f"  {dt:5s} H={H:2d}/{Hkv:<2d} N={N:5d} D={D:3d} {'causal' if causal else 'full  '}  "
            f"steelattn {ours:9.2f} ms  torch {ref:9.2f} ms  ratio {ref / ours:5.2f}x")
    return rows


# --------------------------------------------------------------------------- CUDA

def cuda_cases(quick=False):
    Ns = (1024, 4096) if quick else (1024, 4096, 16384)
    Ds = (64, 128) if quick else (64, 128, 256)
    for D in Ds:
        for N in Ns:
            for causal in (False, True):
                yield D, N, causal, None
    for N in ((4096,) if quick else (4096, 8192, 16384)):
        yield 128, N, True, 512
    if not quick:  # other head dims models use (80, 96: zero-padded on the D128 tiles; 160, 192)
        for D in (80, 96, 160, 192):
            for causal in (False, True):
                yield D, 4096, causal, None


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

    block_mask = create_block_mask(mask_mod, None, None, N, N, device="cuda") if (causal or window) else None
    return lambda q, k, v: _flex_compiled(q, k, v, block_mask=block_mask)


def bench_cuda(quick=False, log=print):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    dt = "bf16"
    for D, N, causal, window in cuda_cases(quick):
        B, H = max(1, 16384 // N), 2048 // D
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        fl = flops(B, H, N, N, D, causal, window)
        ws = (window, 0) if window is not None else None
        impls = {"steelattn": lambda: steelattn.flash_attention(q, k, v, causal=causal, window_size=ws,
                                                                backend="steel")}
        if window is None:
            def sdpa(backend):
                def run():
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                return run
            impls["cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION)
            impls["fa2"] = sdpa(SDPBackend.FLASH_ATTENTION)
        try:
            if D in (64, 128, 256) or window is not None:  # the anchor matrix of DESIGN.md
                flex = _flex_fns(N, causal, window)
                impls["flex"] = lambda: flex(q, k, v)
        except Exception as e:  # pragma: no cover - depends on the torch build
            log(f"  flex unavailable: {e}")
        res = {}
        for name, fn in impls.items():
            try:
                res[name] = time_cuda(fn)
            except Exception as e:
                log(f"  {name} failed at D={D} N={N}: {type(e).__name__}: {str(e)[:200]}")
                continue
            rows.append(_row("fwd", dt, B, H, H, N, N, D, causal, window, name, res[name], fl))
        ours = res.get("steelattn")
        parts = [f"{n} {fl / t / 1e9:6.1f}" for n, t in res.items()]
        ratio = "  ".join(f"vs {n} {res[n] / ours:4.2f}x" for n in res if n != "steelattn" and ours)
        log(f"  D={D:3d} N={N:5d} {'causal' if causal else 'full  '} win={window}  TFLOP/s: {'  '.join(parts)}  {ratio}")
    return rows


def bench_cuda_decode(quick=False, log=print):
    """Decode: one (or a few) new queries against a long GQA KV cache; memory bound, so
    reported as GB/s of K and V read (B=8, H=32, Hkv=8, D=128, bf16)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    B, H, Hkv, D = 8, 32, 8, 128
    for S in ((4096,) if quick else (4096, 32768)):
        for N in (1, 16):
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
            k, v = (torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
            kv_bytes = 2 * B * Hkv * S * D * 2
            # No mask: with N << S the causal band hides at most N-1 keys, and torch's SDPA
            # would align it top-left, a different function.
            impls = {"steelattn": lambda: steelattn.flash_attention(q, k, v, backend="steel")}
            for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2", SDPBackend.FLASH_ATTENTION)):
                def run(be=be):
                    with sdpa_kernel(be):
                        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                impls[name] = run
            res = {}
            for name, fn in impls.items():
                try:
                    res[name] = time_cuda(fn)
                except Exception as e:
                    log(f"  decode {name} failed at N={N} S={S}: {type(e).__name__}: {str(e)[:160]}")
                    continue
                row = _row("decode", "bf16", B, H, Hkv, N, S, D, False, None, name, res[name], None)
                row["gbps"] = round(kv_bytes / res[name] / 1e6, 1)
                rows.append(row)
            parts = "  ".join(f"{n} {kv_bytes / t / 1e6:7.1f}" for n, t in res.items())
            log(f"  decode N={N:2d} S={S:5d}  GB/s: {parts}")
    return rows


def bench_cuda_bwd(quick=False, log=print):
    """Backward alone (the forward's graph is kept), against SDPA's cuDNN and FA2 backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for D in (64, 128):
        for N in ((1024, 4096) if quick else (1024, 4096, 16384)):
            for causal in (False, True):
                B, H = max(1, 16384 // N), 2048 // D
                g = torch.Generator(device="cuda").manual_seed(0)
                q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                           for _ in range(3))
                dout = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
                fl = 2.5 * flops(B, H, N, N, D, causal)
                impls = {"steelattn": lambda: steelattn.flash_attention(q, k, v, causal=causal, backend="steel")}
                for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2", SDPBackend.FLASH_ATTENTION)):
                    def fwd(be=be):
                        with sdpa_kernel(be):
                            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    impls[name] = fwd
                res = {}
                for name, fwd in impls.items():
                    try:
                        res[name] = _time_backward(fwd, (q, k, v), dout, time_cuda)
                    except Exception as e:
                        log(f"  bwd {name} failed at D={D} N={N}: {type(e).__name__}: {str(e)[:200]}")
                        continue
                    rows.append(_row("bwd", "bf16", B, H, H, N, N, D, causal, None, name, res[name], fl))
                ours = res.get("steelattn")
                parts = "  ".join(f"{n} {fl / t / 1e9:6.1f}" for n, t in res.items())
                ratio = "  ".join(f"vs {n} {res[n] / ours:4.2f}x" for n in res if n != "steelattn" and ours)
                log(f"  bwd D={D:3d} N={N:5d} {'causal' if causal else 'full  '}  TFLOP/s: {parts}  {ratio}")
                del q, k, v, dout
    return rows


# --------------------------------------------------------------------------- output

def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    info = steelattn.get_device_info()["cpu"]
    return f"x86-64 CPU ({info['cores']} cores, {info['isa']})"


def to_markdown(result):
    lines = [f"# steelattn benchmark: {result['device']}", "",
             f"torch {result['torch']}, commit {result['commit']}, {result['date']}.", ""]
    rows = result["rows"]
    keys = []
    for r in rows:
        key = (r["op"], r["dtype"], r["H"], r["Hkv"], r["N"], r["S"], r["D"], r["causal"], r["window"])
        if key not in keys:
            keys.append(key)
    impls = []
    for r in rows:
        if r["impl"] not in impls:
            impls.append(r["impl"])
    anchors = [i for i in impls if i != "steelattn"]
    hdr = "| op | dtype | H/Hkv | N | S | D | mask | " + " | ".join(f"{i} ms (TFLOP/s)" for i in impls)
    hdr += " | " + " | ".join(f"vs {a}" for a in anchors) + " |"
    lines += [hdr, "|" + "---|" * (7 + len(impls) + len(anchors))]
    for key in keys:
        op, dt, H, Hkv, N, S, D, causal, window = key
        by = {r["impl"]: r for r in rows if (r["op"], r["dtype"], r["H"], r["Hkv"], r["N"], r["S"], r["D"],
                                              r["causal"], r["window"]) == key}
        mask = "causal" if causal else "full"
        if window:
            mask += f" win {window}"
        def cell(r):
            rate = f"{r['tflops']:.3f}" if r["tflops"] is not None else f"{r['gbps']:.0f} GB/s"
            return f"{r['ms']:.3f} ({rate})"

        cells = [cell(by[i]) if i in by else "-" for i in impls]
        ours = by.get("steelattn")
        ratios = [f"{by[a]['ms'] / ours['ms']:.2f}x" if a in by and ours else "-" for a in anchors]
        lines.append(f"| {op} | {dt} | {H}/{Hkv} | {N} | {S} | {D} | {mask} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    lines += ["", "Ratios are anchor time / steelattn time (> 1 means steelattn is faster). "
              "TFLOP/s: 4·B·H·N·S·D (halved for causal, exact pair count for windows); backward 2.5x that."]
    return "\n".join(lines) + "\n"


def run(device="cpu", quick=False, ops=("fwd",), log=print):
    log(f"steelattn benchmark on {device_name(device)}, torch {torch.__version__}")
    rows = []
    if "fwd" in ops:
        rows += bench_cuda(quick, log) if device == "cuda" else bench_cpu(quick, log)
        if device == "cuda":
            rows += bench_cuda_decode(quick, log)
    if "bwd" in ops:
        rows += bench_cuda_bwd(quick, log) if device == "cuda" else bench_cpu_bwd(quick, log)
    return {"device": device_name(device), "torch": torch.__version__, "commit": _git_commit(),
            "date": datetime.date.today().isoformat(), "rows": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m steelattn.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="a smaller matrix (the main job uses it)")
    ap.add_argument("--op", choices=("fwd", "bwd", "all"), default="fwd", help="forward, backward, or both")
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    ap.add_argument("--md", metavar="PATH", help="write a markdown table")
    args = ap.parse_args(argv)
    result = run(args.device, args.quick, ops=("fwd", "bwd") if args.op == "all" else (args.op,))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
