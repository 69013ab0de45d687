"""Attention computed straight from its definition, in float64 by default.

This is the yardstick every kernel is checked against (tests, the main job), and in
float32 it is also the `backend="torch"` path of `flash_attention`. It materialises
the full [B, H, N, S] score matrix: use it for checking, not for speed.
"""
from __future__ import annotations

import math

import torch


def band_mask(N: int, S: int, diag_offset: int, window_left: int, window_right: int, device=None):
    """[N, S] bool: True where key j is inside query i's window (see DESIGN.md)."""
    i = torch.arange(N, device=device).unsqueeze(1) + diag_offset
    j = torch.arange(S, device=device).unsqueeze(0)
    keep = torch.ones(N, S, dtype=torch.bool, device=device)
    if window_left >= 0:
        keep &= j >= i - window_left
    if window_right >= 0:
        keep &= j <= i + window_right
    return keep


def attention_reference(
    q, k, v, *, scale=None, softcap=0.0, alibi_slopes=None, bias=None, bool_mask=None,
    diag_offset=0, window_left=-1, window_right=-1, dropout_keep=None, dropout_p=0.0,
    compute_dtype=torch.float64,
):
    """Returns (out, lse, probs) in `compute_dtype`.

    q [B, H, N, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv]; bias/bool_mask broadcast to
    [B, H, N, S]; alibi_slopes [H] or [B, H]; dropout_keep a bool [B, H, N, S] mask.
    Rows with no visible key give zeros and lse = -inf.
    """
    B, H, N, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    qc, kc, vc = (x.to(compute_dtype) for x in (q, k, v))
    kc = kc.repeat_interleave(G, dim=1)
    vc = vc.repeat_interleave(G, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    if softcap and softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(compute_dtype)
        slopes = slopes.view(1, H, 1, 1) if slopes.dim() == 1 else slopes.view(B, H, 1, 1)
        i = torch.arange(N, device=q.device).unsqueeze(1) + diag_offset
        j = torch.arange(S, device=q.device).unsqueeze(0)
        s = s - slopes * (i - j).abs().to(compute_dtype)
    if bias is not None:
        s = s + bias.to(compute_dtype)
    keep = band_mask(N, S, diag_offset, window_left, window_right, device=q.device).expand(B, H, N, S)
    if bool_mask is not None:
        keep = keep & bool_mask.to(torch.bool)
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    finite = torch.isfinite(lse)
    probs = torch.where(finite.unsqueeze(-1), torch.exp(s - lse.unsqueeze(-1).masked_fill(~finite.unsqueeze(-1), 0)),
                        torch.zeros((), dtype=compute_dtype, device=q.device))
    p = probs
    if dropout_keep is not None and dropout_p > 0:
        p = probs * dropout_keep.to(compute_dtype) / (1.0 - dropout_p)
    out = torch.matmul(p, vc)
    return out, lse, probs


def relative_error(x, ref):
    """||x - ref|| / ||ref||, computed in float64; 0 when both are 0."""
    x64, r64 = x.to(torch.float64), ref.to(torch.float64)
    den = torch.linalg.vector_norm(r64)
    num = torch.linalg.vector_norm(x64 - r64)
    if den == 0:
        return float(num)
    return float(num / den)
