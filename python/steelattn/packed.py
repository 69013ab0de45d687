"""Packed Q/K/V inputs as views: the fused QKV (or KV) projection's output goes to the
kernels without a copy, as strided [B, H, N, D] views of the packed tensor.

Layouts (D the head dim, H query heads, Hkv key/value heads):
  [B, N, 3, H, D]       token-major, FlashAttention's qkvpacked layout ("bn3hd")
  [B, H, N, 3, D]       head-first ("bhn3d")
  [B, N, (H + 2*Hkv)*D] flat, the seed's layout: q heads, then k heads, then v heads;
                        needs num_heads (and num_kv_heads for GQA, default num_heads)
and for the varlen forms [total, 3, H, D] or flat [total, (H + 2*Hkv)*D]. KV-packed:
[B, S, 2, Hkv, D], [B, Hkv, S, 2, D], flat [B, S, 2*Hkv*D] (num_kv_heads); varlen
[total_k, 2, Hkv, D] or flat. The output takes the layout of the queries: [B, N, H, Dv]
for token-major, [B, H, N, Dv] for head-first, [B, N, H*Dv] for flat ([total, H, Dv] /
[total, H*Dv] for varlen). Every other keyword goes to flash_attention /
flash_attention_varlen unchanged.

The views are taken with unbind / split, not indexing: their gradients assemble the packed
gradient in one allocation (a stack or a cat), where an index's gradient zero-fills a
packed-size tensor per piece and then adds them up.
"""
from __future__ import annotations

import torch

from .api import flash_attention
from .varlen import flash_attention_varlen

_LAYOUTS = (None, "bn3hd", "bhn3d")


def _tensor(fn, name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")


def _split_flat(fn, name, x, parts, num_heads, num_kv_heads):
    """(q?, k, v) head views [..., heads, D] of a flat [..., (H + 2*Hkv)*D] (parts 3) or
    [..., 2*Hkv*D] (parts 2) tensor."""
    H = num_heads if parts == 3 else 0
    if parts == 3 and (not isinstance(num_heads, int) or num_heads < 1):
        raise ValueError(f"{fn}: a flat {name} needs num_heads (a positive int), got {num_heads!r}")
    Hkv = num_kv_heads if num_kv_heads is not None else num_heads
    if not isinstance(Hkv, int) or Hkv < 1:
        raise ValueError(f"{fn}: a flat {name} needs num_kv_heads (a positive int), got {Hkv!r}")
    width = x.size(-1)
    if width % (H + 2 * Hkv):
        raise ValueError(f"{fn}: {name}'s last dim {width} is not a multiple of H + 2*Hkv = {H + 2 * Hkv}")
    D = width // (H + 2 * Hkv)
    heads = ([H] if parts == 3 else []) + [Hkv, Hkv]
    return [p.unflatten(-1, (h, D)) for p, h in zip(x.split([h * D for h in heads], dim=-1), heads)]


def flash_attention_qkv_packed(qkv, *, num_heads=None, num_kv_heads=None, layout=None, **kwargs):
    """flash_attention on a packed QKV tensor without copying it (module docstring for
    the layouts). `layout` picks between the two 5-d layouts when both fit the shape
    (None: [B, N, 3, H, D] when dim 2 is 3, else [B, H, N, 3, D]).

    >>> qkv = torch.randn(2, 50, 3, 4, 64)
    >>> flash_attention_qkv_packed(qkv, causal=True).shape
    torch.Size([2, 50, 4, 64])
    """
    fn = "flash_attention_qkv_packed"
    _tensor(fn, "qkv", qkv)
    if layout not in _LAYOUTS:
        raise ValueError(f"{fn}: layout must be one of {_LAYOUTS}, got {layout!r}")
    if qkv.dim() == 3:
        q, k, v = _split_flat(fn, "qkv", qkv, 3, num_heads, num_kv_heads)  # [B, N, heads, D]
        res = flash_attention(*(t.transpose(1, 2) for t in (q, k, v)), **kwargs)
        return _map_out(res, lambda o: o.transpose(1, 2).flatten(2))
    if qkv.dim() != 5:
        raise ValueError(f"{fn}: qkv must be [B, N, 3, H, D], [B, H, N, 3, D] or [B, N, (H + 2*Hkv)*D], "
                         f"got shape {tuple(qkv.shape)}")
    if layout == "bn3hd" or (layout is None and qkv.size(2) == 3):
        if qkv.size(2) != 3:
            raise ValueError(f"{fn}: qkv in layout bn3hd must be [B, N, 3, H, D], got {tuple(qkv.shape)}")
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        return _map_out(flash_attention(q, k, v, **kwargs), lambda o: o.transpose(1, 2))
    if qkv.size(3) != 3:
        raise ValueError(f"{fn}: qkv must be [B, N, 3, H, D] or [B, H, N, 3, D], got {tuple(qkv.shape)}")
    return flash_attention(*qkv.unbind(3), **kwargs)


def flash_attention_kv_packed(q, kv, *, num_kv_heads=None, **kwargs):
    """flash_attention with K and V packed in one tensor: q [B, N, H, D] with kv
    [B, S, 2, Hkv, D]; q [B, H, N, D] with kv [B, Hkv, S, 2, D]; or q [B, N, H*D] with a
    flat kv [B, S, 2*Hkv*D] (num_kv_heads; q's head count follows from D).

    >>> q = torch.randn(2, 50, 8, 64); kv = torch.randn(2, 70, 2, 2, 64)
    >>> flash_attention_kv_packed(q, kv).shape
    torch.Size([2, 50, 8, 64])
    """
    fn = "flash_attention_kv_packed"
    _tensor(fn, "q", q)
    _tensor(fn, "kv", kv)
    if kv.dim() == 3:
        if q.dim() != 3:
            raise ValueError(f"{fn}: a flat kv goes with a flat q [B, N, H*D], got q {tuple(q.shape)}")
        k, v = _split_flat(fn, "kv", kv, 2, None, num_kv_heads)
        D = k.size(-1)
        if q.size(-1) % D:
            raise ValueError(f"{fn}: q's last dim {q.size(-1)} is not a multiple of the head dim {D}")
        q4 = q.unflatten(-1, (q.size(-1) // D, D))
        res = flash_attention(q4.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kwargs)
        return _map_out(res, lambda o: o.transpose(1, 2).flatten(2))
    if kv.dim() == 5 and kv.size(2) == 2 and q.dim() == 4:  # token-major
        k, v = (t.transpose(1, 2) for t in kv.unbind(2))
        return _map_out(flash_attention(q.transpose(1, 2), k, v, **kwargs), lambda o: o.transpose(1, 2))
    if kv.dim() == 5 and kv.size(3) == 2 and q.dim() == 4:  # head-first
        return flash_attention(q, *kv.unbind(3), **kwargs)
    raise ValueError(f"{fn}: kv must be [B, S, 2, Hkv, D], [B, Hkv, S, 2, D] or [B, S, 2*Hkv*D] (with a q of the "
                     f"matching layout), got q {tuple(q.shape)}, kv {tuple(kv.shape)}")


def flash_attention_varlen_qkv_packed(qkv, cu_seqlens, max_seqlen=None, *, num_heads=None, num_kv_heads=None,
                                      **kwargs):
    """flash_attention_varlen on packed [total, 3, H, D] or flat [total, (H + 2*Hkv)*D]
    (num_heads, num_kv_heads); queries and keys share cu_seqlens.

    >>> qkv = torch.randn(30, 3, 4, 64); cu = torch.tensor([0, 10, 30], dtype=torch.int32)
    >>> flash_attention_varlen_qkv_packed(qkv, cu, causal=True).shape
    torch.Size([30, 4, 64])
    """
    fn = "flash_attention_varlen_qkv_packed"
    _tensor(fn, "qkv", qkv)
    if qkv.dim() == 2:
        q, k, v = _split_flat(fn, "qkv", qkv, 3, num_heads, num_kv_heads)
        return _map_out(flash_attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs),
                        lambda o: o.flatten(1))
    if qkv.dim() != 4 or qkv.size(1) != 3:
        raise ValueError(f"{fn}: qkv must be [total, 3, H, D] or [total, (H + 2*Hkv)*D], got {tuple(qkv.shape)}")
    return flash_attention_varlen(*qkv.unbind(1), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def flash_attention_varlen_kv_packed(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *,
                                     num_kv_heads=None, **kwargs):
    """flash_attention_varlen with q [total_q, H, D] and kv [total_k, 2, Hkv, D], or flat
    q [total_q, H*D] and kv [total_k, 2*Hkv*D] (num_kv_heads)."""
    fn = "flash_attention_varlen_kv_packed"
    _tensor(fn, "q", q)
    _tensor(fn, "kv", kv)
    if kv.dim() == 2:
        if q.dim() != 2:
            raise ValueError(f"{fn}: a flat kv goes with a flat q [total_q, H*D], got q {tuple(q.shape)}")
        k, v = _split_flat(fn, "kv", kv, 2, None, num_kv_heads)
        D = k.size(-1)
        if q.size(-1) % D:
            raise ValueError(f"{fn}: q's last dim {q.size(-1)} is not a multiple of the head dim {D}")
        res = flash_attention_varlen(q.unflatten(-1, (q.size(-1) // D, D)), k, v, cu_seqlens_q, cu_seqlens_k,
                                     max_seqlen_q, max_seqlen_k, **kwargs)
        return _map_out(res, lambda o: o.flatten(1))
    if kv.dim() != 4 or kv.size(1) != 2:
        raise ValueError(f"{fn}: kv must be [total_k, 2, Hkv, D] or [total_k, 2*Hkv*D], got {tuple(kv.shape)}")
    return flash_attention_varlen(q, *kv.unbind(1), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs)


def _map_out(res, f):
    """Applies f to the output of a result that may carry (out, lse, ...)."""
    if isinstance(res, tuple):
        return (f(res[0]),) + res[1:]
    return f(res)
