"""What this build and this machine can run: get_device_info, get_supported_configs,
is_available. Feature flags are read from the kernel selector itself (a dry run of
representative calls), so the report cannot disagree with what dispatch does."""
from __future__ import annotations

import os
import platform

import torch

from ._tensor import fake

# Features no backend has so far: reported False everywhere
# (their entry points do not exist or raise NotImplementedError).
_NOT_YET = ("varlen", "block_sparse", "paged_kv", "split_kv_decode", "rope", "int8")


def _ext():
    from . import _ext as ext

    return ext


def is_available() -> bool:
    """True when the compiled extension loads (the CPU kernel then always works)."""
    try:
        _ext()
        return True
    except ImportError:
        return False


def get_device_info() -> dict:
    info = {
        "cpu": {
            "name": platform.processor() or platform.machine(),
            "isa": _ext().cpu_isa() if is_available() else None,
            "threads": torch.get_num_threads(),
            "cores": os.cpu_count(),
        },
        "cuda": None,
        "extension": is_available(),
        "cuda_kernels_compiled": bool(is_available() and _ext().cuda_compiled()),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["cuda"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                        "memory_gb": round(p.total_memory / 2**30, 1), "count": torch.cuda.device_count()}
    return info


def _probe(device, dtype=torch.bfloat16, D=128, Dv=None, H=8, Hkv=8, N=256, S=256, wl=-1, wr=-1,
           softcap=0.0, alibi=False, bias=False, bool_mask=False, dropout=0.0, lse=False, weights=False,
           nonc=False, backward=False):
    """The path a call of this shape would take on `device` (no memory touched);
    with backward=True, the path of its gradients."""
    Dv = D if Dv is None else Dv
    B = 2
    q = fake((B, H, N, D), dtype, device)
    if nonc:  # [B, N, H, D] storage viewed as [B, H, N, D]
        q = q[:5] + ((N * H * D, D, H * D, 1),)
    k = fake((B, Hkv, S, D), dtype, device)
    v = fake((B, Hkv, S, Dv), dtype, device)
    out = fake((B, H, N, Dv), dtype, device)
    lse_d = fake((B, H, N), torch.float32, device) if lse or backward else None
    mods = (fake((B, H, N, S), torch.float32, device) if bias else None,
            fake((B, H, N, S), torch.bool, device) if bool_mask else None,
            fake((B, H), torch.float32, device) if alibi else None)
    kw = dict(scale=0.1, softcap=softcap, diag_offset=S - N, window_left=wl, window_right=wr, dropout_p=dropout,
              seed=0, offset=0, num_threads=1, stream=0, dry_run=True)
    if backward:  # gradients shaped like their inputs; dout like out
        path, _, _ = _ext().backward(out, q, k, v, out, lse_d, q, k, v, None, None, None, *mods, **kw,
                                     deterministic=False)
    else:
        w = fake((B, H, N, S), torch.float32, device) if weights else None
        path, _ = _ext().forward(q, k, v, out, lse_d, w, *mods, **kw)
    return path


def _features(device):
    """Feature -> whether a steelattn kernel serves it on `device` (None: nothing runs,
    every feature False; the keys stay the same)."""
    ok = lambda **kw: device is not None and _probe(device, **kw) != "none"  # noqa: E731
    f = {
        "float32": ok(dtype=torch.float32),
        "float16": ok(dtype=torch.float16),
        "bfloat16": ok(dtype=torch.bfloat16),
        "causal": ok(wr=0),
        "sliding_window": ok(wl=128, wr=0),
        "gqa": ok(H=8, Hkv=2),
        "softcap": ok(softcap=30.0),
        "alibi": ok(alibi=True),
        "attn_bias": ok(bias=True),
        "bool_mask": ok(bool_mask=True),
        "dropout": ok(dropout=0.1),
        "return_lse": ok(lse=True),
        "return_attn_weights": ok(weights=True),
        "dv_ne_d": ok(D=128, Dv=64),
        "n_ne_s": ok(N=100, S=300),
        "non_contiguous": ok(nonc=True),
        "head_dim_1_to_512": all(ok(D=d, dtype=torch.float32) for d in (1, 7, 80, 512)),
        "float64": ok(dtype=torch.float64),
        "backward": ok(backward=True),
        # custom ops with fake implementations and registered autograd (python/steelattn/ops.py)
        "torch_compile": ok(),
    }
    f.update({k: False for k in _NOT_YET})
    return f


def get_supported_configs(device: str | None = None) -> dict:
    """Per device: whether it runs here, the kernel path each common configuration takes,
    and a `features` dict of booleans for what really runs on steelattn kernels (calls
    outside it still work through the counted torch fallback). Without `device`, the
    report of every device plus top-level `features` of the best available device."""
    if device is None:
        cfg = {d: get_supported_configs(d) for d in ("cpu", "cuda")}
        best = "cuda" if cfg["cuda"]["available"] else "cpu"
        cfg["best_device"] = best
        cfg["features"] = cfg[best]["features"]
        return cfg
    if device not in ("cpu", "cuda"):
        raise ValueError(f"get_supported_configs: device must be 'cpu' or 'cuda', got {device!r}")
    if not is_available():
        return {"available": False, "reason": "extension not built", "features": {}}
    if device == "cuda":
        if not _ext().cuda_compiled():
            return {"available": False, "reason": "built without CUDA kernels", "features": _features(None)}
        if not torch.cuda.is_available():
            return {"available": False, "reason": "no CUDA device", "features": _features(None)}
    paths = {
        f"{dt}_d{d}{'_causal' if c else ''}": _probe(device, dtype=getattr(torch, dt), D=d, wr=0 if c else -1)
        for dt in ("bfloat16", "float16", "float32") for d in (64, 128, 256) for c in (False, True)
    }
    return {"available": True, "dtypes": ["float32", "float16", "bfloat16"], "head_dims": [1, 512],
            "paths": paths, "features": _features(device)}
