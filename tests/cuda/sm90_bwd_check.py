#!/usr/bin/env python3
"""Correctness check and benchmark of the sm90 (Hopper) backward kernel.

Loads the library built by tests/cuda/sm90_bwd_build.sh through ctypes, checks
dq/dk/dv on odd shapes against float64 torch autograd (outputs and workspace
poisoned with NaN first: every element must be written), then times the whole
backward (memset + preprocess + main + postprocess) against the backward of
torch SDPA's cuDNN and FA2 ("flash") backends in the same process.

  python3 tests/cuda/sm90_bwd_check.py --lib BUILD/libsteelattn_sm90_bwd_test.so [--check] [--bench] [--json P]
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
TOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2}  # norm-relative per gradient
NAMES = ["q", "k", "v", "out", "dout", "dq", "dk", "dv", "lse", "dlse", "alibi"]


class Sm90Bwd:
    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        self.lib.sm90_bwd_last_error.restype = ctypes.c_char_p
        f = self.lib.sm90_bwd
        P = ctypes.c_void_p
        f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(P), ctypes.POINTER(ctypes.c_int),
                      ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64), ctypes.c_double,
                      ctypes.c_double, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, P, ctypes.c_int,
                      ctypes.POINTER(ctypes.c_uint64), P, ctypes.c_int]
        f.restype = ctypes.c_int
        self.ws = None
        self.det = 0  # 1: deterministic dQ reduce

    def _call(self, t, scale, softcap, diag, wl, wr, mode):
        ptrs = (ctypes.c_void_p * 11)()
        nd = (ctypes.c_int * 11)()
        sh = (ctypes.c_int64 * 44)()
        st = (ctypes.c_int64 * 44)()
        for i, n in enumerate(NAMES):
            x = t.get(n)
            if x is None:
                continue
            ptrs[i] = x.data_ptr()
            nd[i] = x.dim()
            for j in range(x.dim()):
                sh[4 * i + j] = x.shape[j]
                st[4 * i + j] = x.stride(j)
        wsb = ctypes.c_uint64(0)
        ws = ctypes.c_void_p(self.ws.data_ptr()) if (mode == 0 and self.ws is not None) else None
        rc = self.lib.sm90_bwd(DTYPE_CODE[t["q"].dtype], t["q"].device.index or 0, ptrs, nd, sh, st, scale, softcap,
                               diag, wl, wr, ws, mode, ctypes.byref(wsb),
                               ctypes.c_void_p(torch.cuda.current_stream().cuda_stream), self.det)
        if rc != 0:
            raise RuntimeError(f"sm90_bwd rc={rc}: {self.lib.sm90_bwd_last_error().decode()}")
        return wsb.value

    def prepare(self, t, scale, softcap=0.0, diag=0, wl=-1, wr=-1, poison=False):
        need = self._call(t, scale, softcap, diag, wl, wr, 2)
        if self.ws is None or self.ws.numel() < need // 4 + 1:
            self.ws = torch.empty(need // 4 + 64, device="cuda", dtype=torch.float32)
        if poison:
            self.ws.fill_(float("nan"))

    def backward(self, t, scale, softcap=0.0, diag=0, wl=-1, wr=-1):
        self._call(t, scale, softcap, diag, wl, wr, 0)


def reference(q, k, v, dout, dlse, scale, softcap, alibi, diag, wl, wr):
    """float64 autograd. Returns out, lse (forward) and dq, dk, dv."""
    B, H, N, D = q.shape
    S = k.shape[2]
    g = H // k.shape[1]
    qd, kd, vd = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    kr = kd.repeat_interleave(g, dim=1)
    vr = vd.repeat_interleave(g, dim=1)
    s = (qd @ kr.transpose(-1, -2)) * scale
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
    empty = ~keep.any(dim=-1)  # [N]: rows that see no key
    s = s.masked_fill(~keep, float("-inf"))
    s = torch.where(empty.view(N, 1), torch.zeros_like(s), s)
    lse_safe = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse_safe.unsqueeze(-1))
    p = torch.where(empty.view(N, 1), torch.zeros_like(p), p)
    out = p @ vr
    loss = (out * dout.double()).sum()
    if dlse is not None:
        loss = loss + (torch.where(empty.view(N), torch.zeros_like(lse_safe), lse_safe) * dlse.double()).sum()
    loss.backward()
    lse = torch.where(empty.view(N), torch.full_like(lse_safe, float("-inf")), lse_safe)
    return out.detach(), lse.detach(), qd.grad, kd.grad, vd.grad


def make(B, H, N, D, dtype, layout):
    if layout == "bhnd":
        return torch.randn(B, H, N, D, device="cuda", dtype=dtype)
    return torch.randn(B, N, H, D, device="cuda", dtype=dtype).transpose(1, 2)


def empty_like_layout(x, layout):
    B, H, N, D = x.shape
    if layout == "bhnd":
        return torch.empty(B, H, N, D, device="cuda", dtype=x.dtype)
    return torch.empty(B, N, H, D, device="cuda", dtype=x.dtype).transpose(1, 2)


BF, FP = torch.bfloat16, torch.float16
# (name, B, H, Hkv, N, S, D, dtype, diag, wl, wr, softcap, alibi, dlse, layout)
CASES = [
    ("full d64", 2, 4, 4, 1000, 1000, 64, BF, 0, -1, -1, 0.0, None, False, "bhnd"),
    ("full d128", 2, 4, 4, 1000, 1000, 128, BF, 0, -1, -1, 0.0, None, False, "bhnd"),
    ("full d128 fp16 N17 S1000", 2, 3, 3, 17, 1000, 128, FP, 0, -1, -1, 0.0, None, False, "bhnd"),
    ("full d64 fp16 N1000 S17", 2, 3, 3, 1000, 17, 64, FP, 0, -1, -1, 0.0, None, False, "bhnd"),
    ("causal d64 gqa4 4097", 1, 8, 2, 4097, 4097, 64, BF, 0, -1, 0, 0.0, None, False, "bhnd"),
    ("causal d128 gqa4 4097 fp16", 1, 4, 1, 4097, 4097, 128, FP, 0, -1, 0, 0.0, None, False, "bhnd"),
    ("causal d128 BR N1 S4097", 3, 4, 4, 1, 4097, 128, BF, 4096, -1, 0, 0.0, None, False, "bhnd"),
    ("causal d128 BR N1000 S17 (empty rows) gqa2", 2, 4, 2, 1000, 17, 128, FP, 17 - 1000, -1, 0, 0.0, None, False,
     "bhnd"),
    ("causal d64 BR N1000 S17 (empty rows) dlse", 2, 4, 4, 1000, 17, 64, BF, 17 - 1000, -1, 0, 0.0, None, True,
     "bhnd"),
    ("causal d128 BR N17 S1000 fp16", 2, 4, 4, 17, 1000, 128, FP, 1000 - 17, -1, 0, 0.0, None, False, "bhnd"),
    ("window 100/0 d128", 1, 4, 4, 1000, 1000, 128, BF, 0, 100, 0, 0.0, None, False, "bhnd"),
    ("window 64/32 d64 N1000 S4097 gqa4", 1, 4, 1, 1000, 4097, 64, BF, 4097 - 1000, 64, 32, 0.0, None, False, "bnhd"),
    ("window left-only 300 d128 fp16", 1, 2, 2, 1000, 1000, 128, FP, 0, 300, -1, 0.0, None, False, "bhnd"),
    ("softcap30 d128", 2, 4, 4, 1000, 1000, 128, BF, 0, -1, -1, 30.0, None, False, "bhnd"),
    ("softcap20 causal d64 fp16 gqa2", 1, 4, 2, 1000, 1000, 64, FP, 0, -1, 0, 20.0, None, False, "bhnd"),
    ("alibi per-head causal d64", 2, 4, 4, 1000, 1000, 64, BF, 0, -1, 0, 0.0, "head", False, "bhnd"),
    ("alibi [B,H] + softcap d128 bnhd", 2, 4, 4, 1000, 1000, 128, BF, 0, -1, -1, 50.0, "bh", False, "bnhd"),
    ("full d128 dlse bnhd", 2, 4, 4, 1000, 1000, 128, BF, 0, -1, -1, 0.0, None, True, "bnhd"),
    ("N1 S1 d64", 2, 2, 2, 1, 1, 64, BF, 0, -1, -1, 0.0, None, False, "bhnd"),
    ("N17 S1 d128 causal TL", 2, 2, 2, 17, 1, 128, BF, 0, -1, 0, 0.0, None, False, "bhnd"),
    ("N4097 S17 d128 full bnhd", 1, 2, 2, 4097, 17, 128, BF, 0, -1, -1, 0.0, None, False, "bnhd"),
]


def rel(a, ref):
    n = ref.norm().item()
    if n == 0:
        return a.double().abs().max().item()
    return ((a.double() - ref).norm() / n).item()


def run_checks(lib, only=None):
    torch.manual_seed(0)
    fails = 0
    rows = []
    for case in CASES:
        name, B, H, Hkv, N, S, D, dt, diag, wl, wr, cap, alibi_kind, use_dlse, layout = case
        if only is not None and name not in only:
            continue
        q = make(B, H, N, D, dt, layout)
        k = make(B, Hkv, S, D, dt, layout)
        v = make(B, Hkv, S, D, dt, layout)
        dout = make(B, H, N, D, dt, layout)
        dlse = torch.randn(B, H, N, device="cuda") if use_dlse else None
        alibi = None
        if alibi_kind == "head":
            alibi = (torch.rand(H, device="cuda") * 0.1).view(1, H).expand(B, H)
        elif alibi_kind == "bh":
            alibi = torch.rand(B, H, device="cuda") * 0.1
        scale = 1.0 / math.sqrt(D)
        out_ref, lse_ref, dq_ref, dk_ref, dv_ref = reference(q, k, v, dout, dlse, scale, cap, alibi, diag, wl, wr)
        out = empty_like_layout(q, layout)
        out.copy_(out_ref)
        lse = torch.empty(B, H, N, 2, device="cuda")[..., 0] if layout == "bnhd" else torch.empty(B, H, N,
                                                                                                   device="cuda")
        lse.copy_(lse_ref)
        dq = empty_like_layout(q, layout).fill_(float("nan"))
        dk = empty_like_layout(k, layout).fill_(float("nan"))
        dv = empty_like_layout(v, layout).fill_(float("nan"))
        t = dict(q=q, k=k, v=v, out=out, dout=dout, dq=dq, dk=dk, dv=dv, lse=lse, dlse=dlse, alibi=alibi)
        try:
            lib.prepare(t, scale, cap, diag, wl, wr, poison=True)
            lib.backward(t, scale, cap, diag, wl, wr)
            torch.cuda.synchronize()
        except RuntimeError as e:
            fails += 1
            rows.append(f"FAIL {name}: {e}")
            continue
        unwritten = sum(int(torch.isnan(x).sum().item()) for x in (dq, dk, dv))
        e_q, e_k, e_v = rel(dq, dq_ref), rel(dk, dk_ref), rel(dv, dv_ref)
        ok = unwritten == 0 and max(e_q, e_k, e_v) < TOL[dt]
        same = ""
        if lib.det:  # deterministic: three more runs must give the same bits
            first = [x.clone() for x in (dq, dk, dv)]
            for _ in range(3):
                lib.prepare(t, scale, cap, diag, wl, wr, poison=True)
                lib.backward(t, scale, cap, diag, wl, wr)
            torch.cuda.synchronize()
            ident = all(torch.equal(a, b) for a, b in zip(first, (dq, dk, dv)))
            ok = ok and ident
            same = " bit-identical x4" if ident else " NOT BIT-IDENTICAL"
        fails += 0 if ok else 1
        rows.append(f"{'ok  ' if ok else 'FAIL'} {name}: dq={e_q:.2e} dk={e_k:.2e} dv={e_v:.2e} "
                    f"unwritten={unwritten}{same}")
        print(rows[-1], flush=True)
        del q, k, v, dout, out, lse, dq, dk, dv, t, dq_ref, dk_ref, dv_ref, out_ref
        torch.cuda.empty_cache()
    return fails, rows


def rejects(lib):
    out = []
    bf = dict(device="cuda", dtype=torch.bfloat16)
    for what, D in [("D=96", 96), ("D=256", 256)]:
        q = torch.randn(1, 2, 64, D, **bf)
        t = dict(q=q, k=q, v=q, out=q, dout=q, dq=torch.empty_like(q), dk=torch.empty_like(q),
                 dv=torch.empty_like(q), lse=torch.zeros(1, 2, 64, device="cuda"))
        try:
            lib._call(t, 0.1, 0.0, 0, -1, -1, 1)
            out.append(f"accepted {what}")
        except RuntimeError as e:
            out.append(f"rejected {what}: {str(e).split(': ', 1)[-1]}")
    return out


def bench(lib, json_path=None):
    import triton.testing as tt
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for D in (64, 128):
        for N in (1024, 4096, 16384):
            for causal in (False, True):
                B, H = 16384 // N, 2048 // D
                q = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                k = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                v = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                dout = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
                scale = 1.0 / math.sqrt(D)
                flops = 2.5 * 4 * B * H * N * N * D * (0.5 if causal else 1.0)
                with torch.no_grad():
                    r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
                out, lse = r[0], r[1].float().contiguous()
                dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
                t = dict(q=q.detach(), k=k.detach(), v=v.detach(), out=out, dout=dout, dq=dq, dk=dk, dv=dv, lse=lse)
                res = {}
                fns = {}
                lib.prepare(t, scale)

                def ours():
                    lib.backward(t, scale, 0.0, 0, -1, 0 if causal else -1)

                fns["steelattn"] = ours
                for nm, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2", SDPBackend.FLASH_ATTENTION)):
                    try:
                        with sdpa_kernel(be):
                            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)

                        def f(o=o):
                            return torch.autograd.grad(o, (q, k, v), dout, retain_graph=True)
                        fns[nm] = f
                    except Exception as e:
                        print(f"  {nm} D{D} N{N} c{causal}: {type(e).__name__}: {str(e)[:120]}")
                # Agreement with FA2's gradients (sanity at benchmark shapes).
                agree = None
                if "fa2" in fns:
                    ours()
                    g = fns["fa2"]()
                    agree = max(rel(a, b.double()) for a, b in zip((dq, dk, dv), g))
                for nm, fn in fns.items():
                    try:
                        res[nm] = tt.do_bench(fn, warmup=10, rep=60, return_mode="median")
                    except Exception as e:
                        res[nm] = None
                        print(f"  {nm} D{D} N{N} c{causal}: {type(e).__name__}: {str(e)[:120]}")
                tf = {nm: (flops / (ms * 1e-3) / 1e12 if ms else None) for nm, ms in res.items()}
                rows.append(dict(D=D, N=N, causal=causal, B=B, H=H, ms=res, tflops=tf, rel_vs_fa2=agree))
                print(f"D{D} N{N} causal={causal}: " + " ".join(
                    f"{nm}={v:.0f}" for nm, v in tf.items() if v) + f" rel_vs_fa2={agree}", flush=True)
                del q, k, v, dout, out, lse, dq, dk, dv, t, fns
                torch.cuda.empty_cache()
    lines = ["| D | N | causal | steelattn | cuDNN | FA2 | /cuDNN | /FA2 | ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["tflops"]
        s, c, f2 = t.get("steelattn"), t.get("cudnn"), t.get("fa2")
        fmt = lambda x: f"{x:.0f}" if x else "-"
        rat = lambda a, b: f"{a / b:.2f}" if a and b else "-"
        lines.append(f"| {r['D']} | {r['N']} | {'y' if r['causal'] else 'n'} | {fmt(s)} | {fmt(c)} | {fmt(f2)} | "
                     f"{rat(s, c)} | {rat(s, f2)} | {r['ms'].get('steelattn', 0) or 0:.3f} |")
    if json_path:
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                    cudnn=torch.backends.cudnn.version(), date=datetime.date.today().isoformat(), rows=rows)
        with open(json_path, "w") as fh:
            json.dump(meta, fh, indent=1)
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--sanitize", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--deterministic", action="store_true", help="dQ reduced in key-block order")
    a = ap.parse_args()
    lib = Sm90Bwd(a.lib)
    lib.det = int(a.deterministic)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  cudnn {torch.backends.cudnn.version()}")
    fails = 0
    if a.sanitize:
        fails, rows = run_checks(lib, {"N17 S1 d128 causal TL", "full d64 fp16 N1000 S17",
                                       "causal d128 BR N17 S1000 fp16"})
    if a.check:
        for line in rejects(lib):
            print(line)
        fails, rows = run_checks(lib)
        print(f"checks: {len(rows) - fails}/{len(rows)} passed")
    if a.bench:
        print("\n".join(bench(lib, a.json)))
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
