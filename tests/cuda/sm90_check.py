#!/usr/bin/env python3
"""Correctness check and benchmark of the sm90 (Hopper) forward kernel.

Loads the library built by tests/cuda/sm90_build.sh through ctypes, checks
odd shapes against a float64 reference (poisoned outputs, every element must
be written), then times the kernel against torch SDPA's cuDNN and FA2
("flash") backends in the same process.

  python3 tests/cuda/sm90_check.py --lib BUILD/libsteelattn_sm90_test.so [--check] [--bench] [--json PATH]
"""
import argparse
import ctypes
import datetime
import json
import math
import sys

import torch
import torch.nn.functional as F

DTYPE_CODE = {torch.float16: 1, torch.bfloat16: 2}
TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-2}  # norm-relative, per DESIGN.md


class Sm90:
    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        self.lib.sm90_last_error.restype = ctypes.c_char_p
        f = self.lib.sm90_forward
        P = ctypes.c_void_p
        A = ctypes.POINTER(ctypes.c_int64)
        f.argtypes = [ctypes.c_int, ctypes.c_int, P, A, A, P, A, A, P, A, A, P, A, A, P, A, A, P, A, A,
                      ctypes.c_float, ctypes.c_float, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                      ctypes.c_int, P]
        f.restype = ctypes.c_int

    @staticmethod
    def _arr(vals):
        return (ctypes.c_int64 * len(vals))(*vals)

    def _t(self, t):
        if t is None:
            return [None, None, None]
        return [ctypes.c_void_p(t.data_ptr()), self._arr(list(t.shape)), self._arr(list(t.stride()))]

    def forward(self, q, k, v, out, lse=None, alibi=None, scale=None, softcap=0.0, diag=0, wl=-1, wr=-1,
                check_only=False):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        args = [DTYPE_CODE[q.dtype], q.device.index or 0]
        for t in (q, k, v, out, lse, alibi):
            args += self._t(t)
        args += [scale, softcap, diag, wl, wr, int(check_only),
                 ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)]
        rc = self.lib.sm90_forward(*args)
        if rc != 0:
            raise RuntimeError(f"sm90_forward rc={rc}: {self.lib.sm90_last_error().decode()}")


def reference(q, k, v, scale, softcap, alibi, diag, wl, wr):
    """float64 attention straight from the definition. Returns out, lse."""
    B, H, N, D = q.shape
    S = k.shape[2]
    g = H // k.shape[1]
    qd = q.double()
    kd = k.double().repeat_interleave(g, dim=1)
    vd = v.double().repeat_interleave(g, dim=1)
    s = (qd @ kd.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(N, device=q.device).view(N, 1)
    j = torch.arange(S, device=q.device).view(1, S)
    if alibi is not None:
        s = s - alibi.double().reshape(alibi.shape[0], H, 1, 1) * (i + diag - j).abs().double()
    keep = torch.ones(N, S, dtype=torch.bool, device=q.device)
    if wl >= 0:
        keep &= j >= i + diag - wl
    if wr >= 0:
        keep &= j <= i + diag + wr
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ vd, lse


def make_qkv(B, H, Hkv, N, S, D, dtype, layout):
    dev = "cuda"
    if layout == "bhnd":
        q = torch.randn(B, H, N, D, device=dev, dtype=dtype)
        k = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype)
        v = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype)
    else:  # [B, N, H, D] storage viewed as [B, H, N, D] (what projections give)
        q = torch.randn(B, N, H, D, device=dev, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, S, Hkv, D, device=dev, dtype=dtype).transpose(1, 2)
        v = torch.randn(B, S, Hkv, D, device=dev, dtype=dtype).transpose(1, 2)
    return q, k, v


# (name, B, H, Hkv, N, S, D, dtype, diag, wl, wr, softcap, alibi, layout)
BF, FP = torch.bfloat16, torch.float16
CASES = [
    ("full d64", 2, 4, 4, 1000, 1000, 64, BF, 0, -1, -1, 0.0, None, "bhnd"),
    ("full d128", 2, 4, 4, 1000, 1000, 128, BF, 0, -1, -1, 0.0, None, "bhnd"),
    ("full d256", 2, 4, 4, 1000, 1000, 256, BF, 0, -1, -1, 0.0, None, "bhnd"),
    ("full d128 fp16 N17 S1000", 2, 3, 3, 17, 1000, 128, FP, 0, -1, -1, 0.0, None, "bhnd"),
    ("causal d64 gqa4 4097", 1, 8, 2, 4097, 4097, 64, BF, 0, -1, 0, 0.0, None, "bhnd"),
    ("causal d128 BR N1 S4097", 3, 4, 4, 1, 4097, 128, BF, 4096, -1, 0, 0.0, None, "bhnd"),
    ("causal d128 BR N1000 S17 (empty rows)", 2, 4, 2, 1000, 17, 128, FP, 17 - 1000, -1, 0, 0.0, None, "bhnd"),
    ("causal d256 TL N1000 S17", 1, 4, 4, 1000, 17, 256, BF, 0, -1, 0, 0.0, None, "bhnd"),
    ("causal d128 BR N17 S1000 fp16", 2, 4, 4, 17, 1000, 128, FP, 1000 - 17, -1, 0, 0.0, None, "bhnd"),
    ("window 100/0 d128", 1, 4, 4, 1000, 1000, 128, BF, 0, 100, 0, 0.0, None, "bhnd"),
    ("window 64/32 d64 N1000 S4097", 1, 4, 1, 1000, 4097, 64, BF, 4097 - 1000, 64, 32, 0.0, None, "bnhd"),
    ("window left-only 300 d128", 1, 2, 2, 1000, 1000, 128, FP, 0, 300, -1, 0.0, None, "bhnd"),
    ("softcap30 d128", 2, 4, 4, 1000, 1000, 128, BF, 0, -1, -1, 30.0, None, "bhnd"),
    ("softcap20 causal d256 fp16 gqa2", 1, 4, 2, 1000, 1000, 256, FP, 0, -1, 0, 20.0, None, "bhnd"),
    ("alibi per-head causal d64", 2, 4, 4, 1000, 1000, 64, BF, 0, -1, 0, 0.0, "head", "bhnd"),
    ("alibi [B,H] + softcap d128", 2, 4, 4, 1000, 1000, 128, BF, 0, -1, -1, 50.0, "bh", "bnhd"),
    ("strided bnhd d256 gqa4", 2, 8, 2, 1000, 1000, 256, BF, 0, -1, -1, 0.0, None, "bnhd"),
    ("N1 S1 d64", 2, 2, 2, 1, 1, 64, BF, 0, -1, -1, 0.0, None, "bhnd"),
    ("N17 S1 d128 causal TL", 2, 2, 2, 17, 1, 128, BF, 0, -1, 0, 0.0, None, "bhnd"),
    ("N4097 S17 d128 full", 1, 2, 2, 4097, 17, 128, BF, 0, -1, -1, 0.0, None, "bnhd"),
    # More tiles than SMs, so each persistent CTA runs several tiles back to back
    # (the Q double buffer, v7): causal tiles of 1..8
    # key blocks, full tiles, and empty tiles (rows with no key) between busy ones.
    ("multi-tile causal d64 B4 H16", 4, 16, 16, 1000, 1000, 64, BF, 0, -1, 0, 0.0, None, "bhnd"),
    ("multi-tile full d128 fp16 B4 H16", 4, 16, 16, 1000, 1000, 128, FP, 0, -1, -1, 0.0, None, "bhnd"),
    ("multi-tile empty tiles d64 BR N1000 S300", 4, 16, 16, 1000, 300, 64, BF, 300 - 1000, -1, 0, 0.0, None, "bhnd"),
    ("multi-tile causal d128 alibi gqa2 bnhd", 4, 16, 8, 1000, 1000, 128, BF, 0, -1, 0, 0.0, "head", "bnhd"),
    ("multi-tile packed gqa8 N16 S1000 causal d64 alibi", 40, 32, 4, 16, 1000, 64, BF, 1000 - 16, -1, 0, 0.0,
     "bh", "bhnd"),
]


def run_checks(lib, only=None):
    torch.manual_seed(0)
    fails = 0
    rows = []
    for case in CASES:
        name, B, H, Hkv, N, S, D, dt, diag, wl, wr, cap, alibi_kind, layout = case
        if only is not None and name not in only:
            continue
        q, k, v = make_qkv(B, H, Hkv, N, S, D, dt, layout)
        alibi = None
        if alibi_kind == "head":
            alibi = (torch.rand(H, device="cuda") * 0.1).view(1, H).expand(B, H)  # stride 0 over B
        elif alibi_kind == "bh":
            alibi = torch.rand(B, H, device="cuda") * 0.1
        # out in [B, N, H, D] storage for strided cases, lse as a strided slice.
        if layout == "bnhd":
            out = torch.empty(B, N, H, D, device="cuda", dtype=dt).transpose(1, 2)
            lse = torch.empty(B, H, N, 2, device="cuda")[..., 0]
        else:
            out = torch.empty(B, H, N, D, device="cuda", dtype=dt)
            lse = torch.empty(B, H, N, device="cuda")
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        scale = 1.0 / math.sqrt(D)
        try:
            lib.forward(q, k, v, out, lse, alibi, scale, cap, diag, wl, wr)
            torch.cuda.synchronize()
        except RuntimeError as e:
            fails += 1
            rows.append(f"FAIL {name}: {e}")
            continue
        ref, ref_lse = reference(q, k, v, scale, cap, alibi, diag, wl, wr)
        unwritten = int(torch.isnan(out).sum().item()) + int(torch.isnan(lse).sum().item())
        err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        if ref.norm().item() == 0:
            err = out.double().abs().max().item()
        fin = torch.isfinite(ref_lse)
        lse_inf_ok = bool(torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)))
        lse_err = (lse[fin].double() - ref_lse[fin]).abs().max().item() if fin.any() else 0.0
        ok = unwritten == 0 and err < TOL[dt] and lse_inf_ok and lse_err < 2e-2
        fails += 0 if ok else 1
        rows.append(f"{'ok  ' if ok else 'FAIL'} {name}: rel_err={err:.2e} lse_err={lse_err:.1e} "
                    f"unwritten={unwritten} lse_-inf_match={lse_inf_ok}")
        del q, k, v, out, lse, ref, ref_lse
    torch.cuda.empty_cache()
    return fails, rows


def rejects(lib):
    """Calls the kernel must decline (they go to another backend), and one it must take."""
    out = []
    bf = dict(device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, 2, 64, 64, **bf)
    d80 = torch.randn(1, 2, 64, 80, **bf)
    odd = torch.randn(1, 2, 64, 100, **bf)[..., 36:]  # 200-byte row stride, 72-byte offset
    wide = torch.randn(1, 2, 64, 80, **bf)[..., :64]  # 160-byte row stride: TMA can read it
    for what, (a, b, c) in [("D=80", (d80, d80, d80)), ("unaligned stride", (q, odd, q)),
                            ("160-byte stride", (q, wide, wide))]:
        try:
            lib.forward(a, b, c, torch.empty_like(a), check_only=True)
            out.append(f"accepted {what}")
        except RuntimeError as e:
            out.append(f"rejected {what}: {str(e).split(': ', 1)[-1]}")
    return out


def bench(lib, json_path=None, alts=(), reps=1):
    import triton.testing as tt
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for D in (64, 128, 256):
        for N in (1024, 4096, 16384):
            for causal in (False, True):
                B, H = 16384 // N, 2048 // D
                q = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
                k = torch.randn_like(q)
                v = torch.randn_like(q)
                out = torch.empty_like(q)
                flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
                res = {}

                def ours():
                    lib.forward(q, k, v, out, None, None, 1.0 / math.sqrt(D), 0.0, 0, -1, 0 if causal else -1)

                fns = {"steelattn": ours}
                for alt_name, alt_lib in alts:
                    fns[alt_name] = (lambda al=alt_lib: al.forward(q, k, v, out, None, None, 1.0 / math.sqrt(D), 0.0,
                                                                   0, -1, 0 if causal else -1))
                for nm, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2", SDPBackend.FLASH_ATTENTION)):
                    def f(be=be):
                        with sdpa_kernel(be):
                            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    fns[nm] = f
                # reps > 1: the functions are timed round-robin `reps` times, the order
                # rotated by one each time (a function timed right after another of
                # ours measured up to 5% slower at N=16k: clocks after sustained load),
                # and each keeps its best median.
                order = list(fns.items())
                for rep in range(reps):
                    rot = rep % len(order)  # (not `k`: the closures above read q, k, v)
                    for nm, fn in order[rot:] + order[:rot]:
                        if nm in res and res[nm] is None:
                            continue
                        try:
                            ms = tt.do_bench(fn, warmup=25, rep=150, return_mode="median")
                            res[nm] = min(ms, res.get(nm) or ms)
                        except Exception as e:  # an anchor may not support a shape
                            res[nm] = None
                            print(f"  {nm} D{D} N{N} c{causal}: {type(e).__name__}: {str(e)[:120]}")
                tf = {nm: (flops / (ms * 1e-3) / 1e12 if ms else None) for nm, ms in res.items()}
                rows.append(dict(D=D, N=N, causal=causal, B=B, H=H, ms=res, tflops=tf))
                del q, k, v, out
    torch.cuda.empty_cache()
    alt_names = [a for a, _ in alts]
    lines = ["| D | N | causal | steelattn | cuDNN | FA2 | /cuDNN | /FA2 | " + " | ".join(alt_names) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(alt_names)]
    for r in rows:
        t = r["tflops"]
        s, c, f2 = t.get("steelattn"), t.get("cudnn"), t.get("fa2")
        fmt = lambda x: f"{x:.0f}" if x else "-"
        rat = lambda a, b: f"{a / b:.2f}" if a and b else "-"
        lines.append(f"| {r['D']} | {r['N']} | {'y' if r['causal'] else 'n'} | {fmt(s)} | {fmt(c)} | {fmt(f2)} | "
                     f"{rat(s, c)} | {rat(s, f2)} | " + " | ".join(fmt(t.get(a)) for a in alt_names) + " |")
    if json_path:
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, reps=reps,
                    cudnn=torch.backends.cudnn.version(), date=datetime.date.today().isoformat(), rows=rows)
        with open(json_path, "w") as fh:
            json.dump(meta, fh, indent=1)
    return lines


def sanitize_case(lib):
    """Small shapes for compute-sanitizer: ragged tiles, GQA, window, softcap, alibi."""
    only = {"N17 S1 d128 causal TL", "window 64/32 d64 N1000 S4097", "softcap20 causal d256 fp16 gqa2",
            "causal d128 BR N1000 S17 (empty rows)", "multi-tile empty tiles d64 BR N1000 S300"}
    return run_checks(lib, only)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--sanitize", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--reps", type=int, default=1, help="bench: interleaved repeats, best median kept")
    ap.add_argument("--alt", action="append", default=[], help="NAME=LIB: another build timed beside")
    a = ap.parse_args()
    lib = Sm90(a.lib)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  cudnn {torch.backends.cudnn.version()}")
    fails = 0
    if a.sanitize:
        fails, rows = sanitize_case(lib)
        print("\n".join(rows))
    if a.check:
        for line in rejects(lib):
            print(line)
        fails, rows = run_checks(lib)
        print("\n".join(rows))
        print(f"checks: {len(rows) - fails}/{len(rows)} passed")
    if a.bench:
        alts = [(x.split("=", 1)[0], Sm90(x.split("=", 1)[1])) for x in a.alt]
        print("\n".join(bench(lib, a.json, alts, a.reps)))
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
