"""PackGQA on the sm90 forward kernel: correctness against a float64 reference and
packed-vs-unpacked timings in one process (GPU machine only).

    python3 tests/cuda/sm90_packgqa_bench.py

STEELATTN_SM90_PACK_GQA (read by launch.cu on every call): 0 = never pack,
1 = pack whenever eligible (G >= 2, G divides 128), unset = the rule in launch.cu.
"""
import math
import os
import sys

import torch
from triton.testing import do_bench

import steelattn

MODES = {"off": "0", "on": "1", "auto": None}


def set_mode(mode):
    v = MODES[mode]
    if v is None:
        os.environ.pop("STEELATTN_SM90_PACK_GQA", None)
    else:
        os.environ["STEELATTN_SM90_PACK_GQA"] = v


def reference(q, k, v, causal):
    """float64 attention with GQA by repeat; returns (out, lse)."""
    B, H, N, D = q.shape
    S, G = k.shape[2], H // k.shape[1]
    kk = k.double().repeat_interleave(G, 1)
    vv = v.double().repeat_interleave(G, 1)
    s = (q.double() @ kk.transpose(-1, -2)) / math.sqrt(D)
    if causal:
        i = torch.arange(N, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        s = s.masked_fill(j > i + (S - N), float("-inf"))
    lse = torch.logsumexp(s, -1)
    o = torch.exp(s - lse[..., None]) @ vv
    return o, lse


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def make(B, H, Hkv, N, S, D, layout="bhnd", seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if layout == "bnhd":
        q = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
        k = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
        v = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    else:
        q = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, v


def run(q, k, v, causal, **kw):
    return steelattn.flash_attention(q, k, v, causal=causal, return_lse=True, backend="steel", **kw)


def main():
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    bad = 0
    # ---- decode-shaped correctness: packed and unpacked against float64
    print("== decode correctness (B=8, H=32, Hkv=8, D=128, bf16)")
    for N, S, causal, layout in [(1, 4096, False, "bhnd"), (16, 4096, True, "bhnd"), (1, 32768, False, "bhnd"),
                                 (16, 32768, True, "bhnd"), (16, 4096, True, "bnhd"), (5, 300, True, "bnhd")]:
        q, k, v = make(8, 32, 8, N, S, 128, layout)
        ro, rl = reference(q, k, v, causal)
        for mode in ("off", "on"):
            set_mode(mode)
            o, lse = run(q, k, v, causal)
            torch.cuda.synchronize()
            eo, el = rel(o, ro), (lse.double() - rl).abs().max().item()
            ok = eo < 1.2e-2 and el < 1e-2 and torch.isfinite(o).all().item()
            bad += not ok
            print(f"  N={N:3d} S={S:6d} causal={causal!s:5} {layout} {mode:3}: rel err {eo:.2e}  lse max abs {el:.2e}"
                  f"  {'ok' if ok else 'FAIL'}")
    # packed vs unpacked must agree closely (same math, other tile order)
    # ---- extra packed-only features: ALiBi per head, window, softcap, G = 16 and 32
    print("== packed feature checks (against float64 via the library's reference)")
    from steelattn.reference import attention_reference
    for (B, H, Hkv, N, S, D, kw) in [(2, 16, 1, 3, 257, 64, dict(causal=True)),
                                     (2, 64, 2, 2, 190, 128, dict(causal=True)),
                                     (3, 8, 2, 40, 333, 256, dict(window_size=(50, 0))),
                                     (2, 8, 2, 7, 100, 192, dict(softcap=20.0, causal=True))]:
        q, k, v = make(B, H, Hkv, N, S, D, "bnhd")
        slopes = steelattn.alibi_slopes(H).cuda()
        set_mode("on")
        o, lse = steelattn.flash_attention(q, k, v, alibi_slopes=slopes, return_lse=True, backend="steel", **kw)
        wl, wr = kw.get("window_size", (-1, -1))
        if kw.get("causal"):
            wr = 0
        ro, rl, _ = attention_reference(q.cpu(), k.cpu(), v.cpu(), softcap=kw.get("softcap", 0.0),
                                        alibi_slopes=slopes.cpu(), diag_offset=S - N, window_left=wl,
                                        window_right=wr)
        eo = rel(o.cpu(), ro.double())
        el = (lse.cpu().double() - rl.double()).abs().max().item()
        ok = eo < 1.2e-2 and el < 1e-2
        bad += not ok
        print(f"  B{B} H{H} Hkv{Hkv} N{N} S{S} D{D} {kw} alibi: rel err {eo:.2e} lse {el:.2e} {'ok' if ok else 'FAIL'}")

    # ---- decode timing: GB/s of K + V read
    print("== decode timing (B=8, H=32, Hkv=8, D=128, bf16): us and GB/s of K+V")
    for N, S in [(1, 4096), (16, 4096), (1, 32768), (16, 32768)]:
        q, k, v = make(8, 32, 8, N, S, 128)
        kv_bytes = 2 * k.numel() * 2
        line = f"  N={N:3d} S={S:6d}:"
        for mode in ("off", "on", "auto"):
            set_mode(mode)
            ms = do_bench(lambda: run(q, k, v, N > 1), warmup=25, rep=100, return_mode="median")
            line += f"  {mode} {ms * 1e3:8.1f} us {kv_bytes / ms / 1e6:7.0f} GB/s"
        print(line)

    # ---- where the rule switches: small N, G = 4 and 8, S = 4096
    print("== small-N sweep (B=8, Hkv=8, S=4096, D=128, causal): us off / on / auto")
    for G in (4, 8):
        for N in (1, 8, 32, 64, 100, 128, 200, 256, 512):
            q, k, v = make(8, 8 * G, 8, N, 4096, 128)
            res = []
            for mode in ("off", "on", "auto"):
                set_mode(mode)
                res.append(do_bench(lambda: run(q, k, v, True), warmup=10, rep=50, return_mode="median") * 1e3)
            print(f"  G={G} N={N:4d}: off {res[0]:8.1f}  on {res[1]:8.1f}  auto {res[2]:8.1f}  on/off {res[1] / res[0]:.3f}")

    # ---- prefill GQA: B=1, H=32, Hkv=8, D=128
    print("== prefill (B=1, H=32, Hkv=8, D=128, bf16): TFLOP/s off / on")
    for N in (4096, 16384):
        for causal in (False, True):
            q, k, v = make(1, 32, 8, N, N, 128)
            fl = 4 * 32 * N * N * 128 / (2 if causal else 1)
            res = []
            for mode in ("off", "on", "off", "on"):
                set_mode(mode)
                res.append(do_bench(lambda: run(q, k, v, causal), warmup=10, rep=60, return_mode="median"))
            off, on = min(res[0], res[2]), min(res[1], res[3])
            print(f"  N={N:5d} causal={causal!s:5}: off {fl / off / 1e9:6.1f}  on {fl / on / 1e9:6.1f}  on/off time {on / off:.3f}")
    set_mode("auto")
    print("FAILURES:", bad)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
