"""The main job: attention on the best available device, checked against the float64
reference and against the kernel path each check names (a call that ran elsewhere,
e.g. on torch or on the generic CUDA kernel where the Hopper one was expected, fails),
then its speed against torch (a quick benchmark matrix).

    python -m steelattn [--device cpu|cuda] [--no-bench]
"""
from __future__ import annotations

import argparse
import sys

import torch

import steelattn
from steelattn import bench
from steelattn.reference import attention_reference, relative_error

_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.2e-2}

# (name, B, H, Hkv, N, S, D, Dv, dtype, kwargs, cuda kernel, grad). The CUDA kernel a check
# must run on: "sm90" the Hopper kernels (bf16/fp16, head dims multiples of 8 in 64..256,
# no bias/mask/dropout) on an sm_90 GPU, cuda_generic on other GPUs; "generic" the generic
# kernel; "decode" the split-KV decode kernel (at most 16 query rows per KV head; 64 at
# small batch x KV heads), forward only. On the CPU every call runs on the CPU kernel of the machine's ISA.
_CHECKS = [
    ("full fp32", 2, 4, 4, 257, 257, 64, 64, torch.float32, {}, "generic", False),
    ("causal bf16 N!=S", 1, 8, 8, 300, 1000, 128, 128, torch.bfloat16, {"causal": True}, "sm90", False),
    ("GQA 4:1 causal fp16", 2, 8, 2, 130, 130, 128, 128, torch.float16, {"causal": True}, "sm90", False),
    ("window + softcap bf16", 1, 4, 2, 500, 500, 64, 64, torch.bfloat16, {"window_size": (128, 0), "softcap": 30.0},
     "sm90", False),
    ("ALiBi fp32 D=80", 1, 4, 4, 100, 120, 80, 80, torch.float32, {"alibi_slopes": "alibi", "causal": True},
     "generic", False),
    ("Dv != D, D=256 bf16", 1, 2, 1, 64, 200, 256, 128, torch.bfloat16, {}, "sm90", False),
    ("fwd+bwd GQA causal bf16", 1, 8, 2, 200, 200, 128, 128, torch.bfloat16, {"causal": True}, "sm90", True),
    ("decode GQA 4:1 bf16 S=20k", 2, 32, 8, 1, 20000, 128, 128, torch.bfloat16, {"causal": True}, "decode", False),
]


def expected_path(device, kernel):
    """The kernel path a check must run on; independent of the selector's answer."""
    if device == "cpu":
        return "cpu_" + steelattn.get_device_info()["cpu"]["isa"]
    if kernel == "decode":
        return "cuda_decode"
    return "cuda_sm90" if kernel == "sm90" and torch.cuda.get_device_capability() == (9, 0) else "cuda_generic"


def run_checks(device, log=print):
    ok = True
    g = torch.Generator().manual_seed(0)
    for name, B, H, Hkv, N, S, D, Dv, dtype, kw, kernel, grad in _CHECKS:
        q = torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype)
        k = torch.randn(B, Hkv, S, D, generator=g).to(device=device, dtype=dtype)
        v = torch.randn(B, Hkv, S, Dv, generator=g).to(device=device, dtype=dtype)
        dout = torch.randn(B, H, N, Dv, generator=g).to(device=device, dtype=dtype)
        kw = dict(kw)
        if kw.get("alibi_slopes") == "alibi":
            kw["alibi_slopes"] = steelattn.alibi_slopes(H).to(device)
        inputs = [t.requires_grad_(grad) for t in (q, k, v)]
        steelattn.reset_dispatch_stats()
        out = steelattn.flash_attention(*inputs, **kw)
        grads = torch.autograd.grad(out, inputs, dout) if grad else ()
        stats = steelattn.get_dispatch_stats()
        wl, wr = kw.get("window_size") or (-1, -1)
        if kw.get("causal"):
            wr = 0
        ref_in = [t.detach().cpu().double().requires_grad_(grad) for t in (q, k, v)]
        ref, _, _ = attention_reference(*ref_in, softcap=kw.get("softcap", 0.0),
                                        alibi_slopes=kw["alibi_slopes"].cpu() if "alibi_slopes" in kw else None,
                                        diag_offset=S - N, window_left=wl, window_right=wr)
        errs = [relative_error(out.detach().cpu(), ref.detach())]
        if grad:
            ref_grads = torch.autograd.grad(ref, ref_in, dout.cpu().double())
            errs += [relative_error(a.cpu(), b) for a, b in zip(grads, ref_grads)]
        err = max(errs)
        want = expected_path(device, kernel)
        ran = {"forward": stats["forward"]}
        if grad:
            ran["backward"] = stats["backward"]
        path_ok = all(r == {want: 1} for r in ran.values())
        good = bool(torch.isfinite(out).all()) and err < _TOL[dtype] and path_ok
        ok &= good
        ran_s = ", ".join(f"{stage} {'/'.join(r) or 'none'}" for stage, r in ran.items())
        log(f"  {'PASS' if good else 'FAIL'}  {name:26s} rel.err {err:.2e} (bound {_TOL[dtype]:.0e}); "
            f"expected {want}, ran {ran_s}" + ("" if path_ok else f"  <- wrong path; demotions {stats['demotions']}"))
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m steelattn", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-bench", action="store_true", help="only the correctness checks")
    args = ap.parse_args(argv)
    print(f"steelattn {steelattn.__version__} on {args.device}: {bench.device_name(args.device)}; torch {torch.__version__}")
    print("Correctness against the float64 reference:")
    ok = run_checks(args.device)
    if not args.no_bench:
        print("Speed against torch (quick matrix):")
        result = bench.run(args.device, quick=True)
        print(bench.to_markdown(result))
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
