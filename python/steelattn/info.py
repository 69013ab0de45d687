"""What this build and this machine can run: get_device_info, get_supported_configs,
is_available. Paths and feature flags come from the kernel selector itself (probes of
representative calls that are selected, never run), so the report cannot disagree with
dispatch; tests/python/test_info.py runs every feature and checks the path it took."""
from __future__ import annotations

import os
import platform

import torch

from ._tensor import fake


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


def _autograd_node() -> str:
    """"c++" when eager calls and their autograd node run in steelattn._torch_native,
    else "python: <why>" (_ext with the Python autograd.Function; _native.py)."""
    try:
        from . import _native
    except ImportError as e:
        return f"python: {e}"
    return "c++" if _native.native is not None else f"python: {_native.why_not}"


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
        "autograd_node": _autograd_node(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["cuda"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                        "memory_gb": round(p.total_memory / 2**30, 1), "count": torch.cuda.device_count()}
    return info


def _probe(device, dtype=torch.bfloat16, D=128, Dv=None, H=8, Hkv=8, N=256, S=256, wl=-1, wr=-1,
           softcap=0.0, alibi=False, bias=False, bool_mask=False, dropout=0.0, weights=False, nonc=False,
           block=False):
    """(forward path, backward path) a call of this shape would take on `device`; nothing
    is allocated or run. The backward path is the one a call needing gradients gets."""
    from . import _kernel

    Dv = D if Dv is None else Dv
    B = 2
    side = torch.float64 if dtype == torch.float64 else torch.float32
    # [B, N, H, D] storage viewed as [B, H, N, D] when nonc
    q = fake((B, H, N, D), dtype, device, strides=(N * H * D, D, H * D, 1) if nonc else None)
    k = fake((B, Hkv, S, D), dtype, device)
    v = fake((B, Hkv, S, Dv), dtype, device)
    out = fake((B, H, N, Dv), dtype, device)
    mods = (fake((B, H, N, S), side, device) if bias else None,
            fake((B, H, N, S), torch.bool, device) if bool_mask else None,
            fake((B, H), side, device) if alibi else None)
    w = fake((B, H, N, S), side, device) if weights else None
    sc = _kernel.scalars(0.1, softcap, S - N, wl, wr, dropout, 0, 0, False)
    blocks = (fake((B, H, (N + 63) // 64, (S + 63) // 64), torch.bool, device), 64, 64) if block else (None, 0, 0)
    path, _, bpath, _ = _ext().forward(q, k, v, out, fake((B, H, N), side, device), w, *mods, sc, 1, 0,
                                       _kernel.SELECT, block_mask=blocks[0], block_q=blocks[1], block_k=blocks[2])
    return path, bpath


def _features(device):
    """Feature -> whether a steelattn kernel serves it on `device` (None: nothing runs,
    every feature False; the keys stay the same)."""
    ok = lambda **kw: device is not None and _probe(device, **kw)[0] != "none"  # noqa: E731
    return {
        "float32": ok(dtype=torch.float32),
        "float16": ok(dtype=torch.float16),
        "bfloat16": ok(dtype=torch.bfloat16),
        "float64": ok(dtype=torch.float64),
        "causal": ok(wr=0),
        "sliding_window": ok(wl=128, wr=0),
        "gqa": ok(H=8, Hkv=2),
        "softcap": ok(softcap=30.0),
        "alibi": ok(alibi=True),
        "attn_bias": ok(bias=True),
        "bool_mask": ok(bool_mask=True),
        "dropout": ok(dropout=0.1),
        "return_lse": ok(),  # every probe passes lse
        "return_attn_weights": ok(weights=True),
        "dv_ne_d": ok(D=128, Dv=64),
        "n_ne_s": ok(N=100, S=300),
        "non_contiguous": ok(nonc=True),
        "head_dim_1_to_512": all(ok(D=d, dtype=torch.float32) for d in (1, 7, 80, 512)),
        "backward": device is not None and _probe(device)[1] != "none",
        "varlen": device is not None and _probe_varlen(device) != "none",
        # Dropout keyed in the packed grid (flash_attention_varlen's docstring).
        "varlen_dropout": device is not None and _probe_varlen(device, dropout=0.1) != "none",
        # Compositions over the dense kernels (views, a rescale by lse, a rotation before the call).
        "packed_inputs": ok(nonc=True),
        "sinks": ok(),
        "rope": ok(),
        "block_sparse": ok(block=True),
        "kv_cache": device is not None and _probe_kvcache(device) != "none",
        # RoPE and the in-place append as one kernel before attention (steelattn.h kv_append).
        "fused_rope_append": device is not None and (device == "cpu" or _ext().cuda_compiled()),
        # Serving compositions (serving.py) over the dense and KV-cache kernels.
        "shared_prefix": ok() and _probe_kvcache(device) != "none",
        "splitfuse": ok() and _probe_kvcache(device) != "none",
        "speculative_verify": ok(),  # the seed's helper over the dense kernels
    }


def _probe_kvcache(device):
    """The forward path of a call with per-entry key lengths (flash_attention_kvcache) on `device`."""
    from . import _kernel

    B, H, N, S, D = 2, 4, 1, 64, 64
    q = fake((B, H, N, D), torch.bfloat16, device)
    k = fake((B, H, S, D), torch.bfloat16, device)
    lens = torch.tensor([10, S], dtype=torch.int32, device=device)  # read by the CPU validation
    sc = _kernel.scalars(0.1, 0.0, 0, -1, 0, 0.0, 0, 0, False)
    path, _, _, _ = _ext().forward(q, k, k, fake((B, H, N, D), torch.bfloat16, device), None, None, None, None, None,
                                   sc, 1, 0, _kernel.SELECT, seqlens_k=lens)
    return path


def _probe_varlen(device, dropout=0.0):
    """The forward path of a two-sequence bf16 varlen call (flash_attention_varlen) on `device`
    ("none" where the core refuses it as not implemented)."""
    from . import _kernel

    H, D, total = 4, 64, 96
    q = fake((1, H, total, D), torch.bfloat16, device)
    out = fake((1, H, total, D), torch.bfloat16, device)
    cu = torch.tensor([0, 40, total], dtype=torch.int32, device=device)  # read by the CPU validation
    sc = _kernel.scalars(0.1, 0.0, 0, -1, 0, dropout, 0, 0, False)
    try:
        path, _, _, _ = _ext().forward(q, q, q, out, fake((1, H, total), torch.float32, device), None, None, None,
                                       None, sc, 1, 0, _kernel.SELECT, cu_seqlens_q=cu, cu_seqlens_k=cu)
    except NotImplementedError:
        return "none"
    return path


def get_supported_configs(device: str | None = None) -> dict:
    """Per device: whether it runs here, the forward and backward kernel paths each common
    configuration takes (`paths`, `backward_paths`), and a `features` dict of booleans for what really runs on steelattn kernels (calls
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
    probes = {
        f"{dt}_d{d}{'_causal' if c else ''}": _probe(device, dtype=getattr(torch, dt), D=d, wr=0 if c else -1)
        for dt in ("bfloat16", "float16", "float32") for d in (64, 128, 256) for c in (False, True)
    }
    # Decode: one query token per head, GQA 4:1, against 4k keys.
    probes.update({f"{dt}_d{d}_decode": _probe(device, dtype=getattr(torch, dt), D=d, H=32, Hkv=8, N=1, S=4096,
                                               wr=0)
                   for dt in ("bfloat16", "float16", "float32") for d in (64, 128, 256)})
    return {"available": True, "dtypes": ["float32", "float16", "bfloat16"], "head_dims": [1, 512],
            "paths": {name: fwd for name, (fwd, _) in probes.items()},
            "backward_paths": {name: bwd for name, (_, bwd) in probes.items()}, "features": _features(device)}
