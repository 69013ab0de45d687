"""Argument checks for the public API. Errors name the argument and what was expected,
and are raised before anything is allocated or written."""
from __future__ import annotations

import math

import torch

ATTENTION_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_HEAD_DIM = 512


def side_dtype(q):
    """dtype of lse, bias, slopes and weights: float32, or float64 for float64 inputs."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def check_qkv(fn: str, names, q, k, v):
    """Returns (B, H, N, D, S) of a valid call; otherwise raises, naming the argument."""
    # Fast path: one read of each attribute, the per-argument messages only on failure.
    T = torch.Tensor
    if isinstance(q, T) and isinstance(k, T) and isinstance(v, T):
        qs, ks, vs = q.shape, k.shape, v.shape
        if len(qs) == len(ks) == len(vs) == 4:
            B, H, N, D = qs
            Hkv, S, Dv = ks[1], ks[2], vs[3]
            dt = q.dtype
            if (dt in ATTENTION_DTYPES and k.dtype is dt and v.dtype is dt and ks[0] == B and vs[0] == B
                    and ks[3] == D and vs[1] == Hkv and vs[2] == S and Hkv and H % Hkv == 0
                    and 1 <= D <= MAX_HEAD_DIM and 1 <= Dv <= MAX_HEAD_DIM
                    and (D == 1 or q.stride()[3] == 1) and (D == 1 or k.stride()[3] == 1)
                    and (Dv == 1 or v.stride()[3] == 1) and q.device == k.device == v.device):
                return B, H, N, D, S
    _check_qkv_slow(fn, names, q, k, v)
    raise AssertionError(f"{fn}: check_qkv fast and slow paths disagree")  # pragma: no cover


def _check_qkv_slow(fn, names, q, k, v):
    qn, kn, vn = names
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must have 4 dims [B, H, N, D], got shape {tuple(t.shape)}")
        if t.dtype not in ATTENTION_DTYPES:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype}; expected float32, float16, bfloat16 or float64")
        if t.size(-1) > 1 and t.stride(-1) != 1:
            raise ValueError(f"{fn}: {name} must be contiguous in its last dim (stride 1), got stride {t.stride(-1)}")
    for name, t in ((kn, k), (vn, v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype} but {qn} has {q.dtype}; they must match")
        if t.device != q.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but {qn} is on {q.device}; they must match")
    B, H, N, D = q.shape
    if k.size(0) != B or v.size(0) != B:
        raise ValueError(f"{fn}: batch sizes differ: {qn} {B}, {kn} {k.size(0)}, {vn} {v.size(0)}")
    Hkv, S = k.size(1), k.size(2)
    if k.size(3) != D:
        raise ValueError(f"{fn}: {kn} head dim {k.size(3)} differs from {qn} head dim {D}")
    if v.size(1) != Hkv or v.size(2) != S:
        raise ValueError(f"{fn}: {vn} shape {tuple(v.shape)} must be [B, Hkv, S, Dv] with {kn}'s Hkv={Hkv} and S={S}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"{fn}: {qn} heads ({H}) must be a multiple of {kn} heads ({Hkv}) (GQA/MQA)")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{fn}: head dim {D} of {qn} out of range [1, {MAX_HEAD_DIM}]")
    if not 1 <= v.size(3) <= MAX_HEAD_DIM:
        raise ValueError(f"{fn}: head dim {v.size(3)} of {vn} out of range [1, {MAX_HEAD_DIM}]")


def check_scale(fn, scale):
    if scale is not None:
        s = float(scale)
        if s != s or s in (float("inf"), float("-inf")):
            raise ValueError(f"{fn}: scale must be finite, got {scale}")


def check_dropout(fn, p):
    if not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{fn}: dropout_p must be a float in [0, 1), got {p!r}")


def check_window(fn, window_size):
    if window_size is None:
        return -1, -1
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"{fn}: window_size must be a (left, right) pair, got {window_size!r}")
    left, right = window_size
    for name, x in (("left", left), ("right", right)):
        if not isinstance(x, int) or isinstance(x, bool) or x < -1:
            raise ValueError(f"{fn}: window_size {name} must be an int >= -1 (-1 = unbounded), got {x!r}")
    return int(left), int(right)


def check_softcap(fn, softcap):
    c = float(softcap)
    if not (c >= 0.0) or c == float("inf"):
        raise ValueError(f"{fn}: softcap must be a finite float >= 0, got {softcap!r}")
    return c


def broadcast_mask(fn, name, m, q, B, H, N, S):
    """Expands a bias/mask to [B, H, N, S] without copying (zero strides)."""
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(m).__name__}")
    if m.device != q.device:
        raise ValueError(f"{fn}: {name} is on {m.device} but the query is on {q.device}")
    if m.dim() > 4:
        raise ValueError(f"{fn}: {name} has {m.dim()} dims; it must be broadcastable to [B, H, N, S] = {[B, H, N, S]}")
    try:
        return m.expand(B, H, N, S)
    except RuntimeError:
        raise ValueError(f"{fn}: {name} of shape {tuple(m.shape)} is not broadcastable to [B, H, N, S] = {[B, H, N, S]}") from None


def check_alibi(fn, slopes, q, B, H):
    if not isinstance(slopes, torch.Tensor):
        raise TypeError(f"{fn}: alibi_slopes must be a torch.Tensor, got {type(slopes).__name__}")
    if slopes.device != q.device:
        raise ValueError(f"{fn}: alibi_slopes is on {slopes.device} but q is on {q.device}")
    if not slopes.is_floating_point():
        raise TypeError(f"{fn}: alibi_slopes must be a float tensor, got {slopes.dtype}")
    side = side_dtype(q)
    if tuple(slopes.shape) == (H,):
        return slopes.to(side).unsqueeze(0).expand(B, H)
    if tuple(slopes.shape) == (B, H):
        return slopes.to(side)
    raise ValueError(f"{fn}: alibi_slopes must have shape [H]={[H]} or [B, H]={[B, H]}, got {tuple(slopes.shape)}")


def score_args(fn, D, scale, softcap, window_size, causal, dropout_p=0.0):
    """The checks every entry point makes on its score arguments; returns
    (scale, softcap, window_left, window_right) with the default scale 1/sqrt(D) and
    causal as window_right = 0."""
    check_scale(fn, scale)
    check_dropout(fn, dropout_p)
    softcap = check_softcap(fn, softcap)
    wl, wr = check_window(fn, window_size)
    if causal:
        wr = 0
    return (1.0 / math.sqrt(D) if scale is None else float(scale)), softcap, wl, wr
