"""Rotary position embeddings around attention: flash_attention_rope (1D tables, or the
3D tables of make_rope_3d_tables for video) rotates q and k, then attends. The rotation is
torch ops before the kernel today (differentiable, any device); fusing it into the
kernels is issue 10's GPU work.
"""
from __future__ import annotations

import torch

from .api import flash_attention
from .kvcache import apply_rotary


def make_rope_3d_tables(grid_h, grid_w, num_frames, d_h=None, d_w=None, d_t=None, head_dim=128, theta=10000.0,
                        device=None):
    """(cos, sin) [num_frames * grid_h * grid_w, head_dim / 2] for video tokens in (t, y, x)
    raster order (the masks' order). The rotary pairs are split into three bands, time
    first, then height, then width; band a with d_a features (even; default: height and
    width head_dim/6 rounded down to pairs, time the rest) turns pair i by
    pos_a * theta^(-2i / d_a), pos_a the token's frame, row or column.

    >>> cos, sin = make_rope_3d_tables(4, 4, 2, head_dim=64)
    >>> cos.shape
    torch.Size([32, 32])
    """
    for name, x in (("grid_h", grid_h), ("grid_w", grid_w), ("num_frames", num_frames), ("head_dim", head_dim)):
        if not isinstance(x, int) or x < 1:
            raise ValueError(f"make_rope_3d_tables: {name} must be a positive int, got {x!r}")
    if head_dim % 2:
        raise ValueError(f"make_rope_3d_tables: head_dim must be even, got {head_dim}")
    pairs = head_dim // 2
    if d_h is None and d_w is None and d_t is None:
        d_h = d_w = 2 * (pairs // 3)
        d_t = head_dim - d_h - d_w
    if None in (d_h, d_w, d_t) or any(d % 2 or d < 0 for d in (d_h, d_w, d_t)) or d_h + d_w + d_t != head_dim:
        raise ValueError(f"make_rope_3d_tables: d_t, d_h, d_w must be even and sum to head_dim={head_dim}, got "
                         f"{d_t}, {d_h}, {d_w}")
    t = torch.arange(num_frames, dtype=torch.float64).repeat_interleave(grid_h * grid_w)
    y = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w).repeat(num_frames)
    x = torch.arange(grid_w, dtype=torch.float64).repeat(num_frames * grid_h)
    bands = []
    for pos, d in ((t, d_t), (y, d_h), (x, d_w)):
        if d:
            inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
            bands.append(pos[:, None] * inv[None])
    ang = torch.cat(bands, dim=1)
    return ang.cos().float().to(device), ang.sin().float().to(device)


def flash_attention_rope(q, k, v, rotary_cos=None, rotary_sin=None, scale=None, causal=False, cache_seqlens=0,
                         rope_3d=None, interleaved=True, rotary_dim=None, **kwargs):
    """flash_attention after rotating q and k: q [B, H, N, D] at positions
    cache_seqlens + i and k [B, Hkv, S, D] at cache_seqlens + j (the tokens start at that
    offset; an int or a list per batch entry). Tables [max_position, rotary_dim / 2]:
    rotary_cos/rotary_sin, or rope_3d={"cos", "sin", "grid_shape": (T, H, W)} from
    make_rope_3d_tables. interleaved: GPT-J pairs; False: NeoX halves. Other keywords go
    to flash_attention (causal is bottom-right).

    >>> q = k = v = torch.randn(1, 2, 32, 64)
    >>> cos, sin = make_rope_3d_tables(4, 4, 2, head_dim=64)
    >>> flash_attention_rope(q, k, v, rope_3d={"cos": cos, "sin": sin, "grid_shape": (2, 4, 4)}).shape
    torch.Size([1, 2, 32, 64])
    """
    fn = "flash_attention_rope"
    if rope_3d is not None:
        if rotary_cos is not None or rotary_sin is not None:
            raise ValueError(f"{fn}: give rotary_cos/rotary_sin or rope_3d, not both")
        if not isinstance(rope_3d, dict) or not {"cos", "sin"} <= set(rope_3d):
            raise ValueError(f"{fn}: rope_3d must be a dict with 'cos' and 'sin' (and 'grid_shape')")
        rotary_cos, rotary_sin = rope_3d["cos"], rope_3d["sin"]
        if "grid_shape" in rope_3d:
            T, Hg, Wg = rope_3d["grid_shape"]
            if T * Hg * Wg != rotary_cos.size(0):
                raise ValueError(f"{fn}: rope_3d grid_shape {rope_3d['grid_shape']} does not match the tables' "
                                 f"{rotary_cos.size(0)} positions")
    if rotary_cos is None or rotary_sin is None:
        raise ValueError(f"{fn}: needs rotary_cos and rotary_sin (or rope_3d)")
    if rotary_cos.shape != rotary_sin.shape or rotary_cos.dim() != 2:
        raise ValueError(f"{fn}: rotary_cos and rotary_sin must both be [max_position, rotary_dim / 2]")
    B, _, N, D = q.shape
    S = k.size(2)
    rd = rotary_dim if rotary_dim is not None else 2 * rotary_cos.size(1)
    if rd % 2 or rd > D or rd > 2 * rotary_cos.size(1):
        raise ValueError(f"{fn}: rotary_dim must be even, <= D={D} and <= 2 * the tables' width, got {rd}")
    offs = [cache_seqlens] * B if isinstance(cache_seqlens, int) else [int(x) for x in cache_seqlens]
    if len(offs) != B or min(offs) < 0:
        raise ValueError(f"{fn}: cache_seqlens must be an int >= 0 or one per batch entry, got {cache_seqlens!r}")
    if max(offs) + max(N, S) > rotary_cos.size(0):
        raise ValueError(f"{fn}: the tables cover {rotary_cos.size(0)} positions, the call needs "
                         f"{max(offs) + max(N, S)}")
    base = torch.tensor(offs, device=q.device)[:, None]
    cos, sin = rotary_cos.to(q.device), rotary_sin.to(q.device)
    qr = apply_rotary(q, cos, sin, base + torch.arange(N, device=q.device)[None], interleaved, rd)
    kr = apply_rotary(k, cos, sin, base + torch.arange(S, device=q.device)[None], interleaved, rd)
    return flash_attention(qr, kr, v, scale=scale, causal=causal, **kwargs)
