"""Attention against a KV cache: dense caches and paged pools, in-place appends, rotary
embeddings, per-entry lengths (flash_attention_kvcache, flash_attention_paged), and the
merge of two partial results by their LSE (merge_attention_states).

Positions. Batch entry b holds cache_seqlens[b] tokens before the call; k_new/v_new (Nnew
tokens) are written at positions cache_seqlens[b] .. cache_seqlens[b] + Nnew - 1 (after
RoPE), and the queries then attend to the first L_b = cache_seqlens[b] + Nnew keys, with
causal aligned bottom-right (query i sees keys j <= i + L_b - Nq). RoPE rotates k_new at
its positions and q at cache_seqlens[b] + i when causal (the queries are the newest
tokens), at cache_seqlens[b] otherwise; only the first rotary_dim features turn.

Where it runs. The lengths reach the kernels as a device tensor (AttentionParams::
seqlens_k): the CPU kernels split the batch into one problem per entry; on CUDA the
split-KV decode kernel (src/cuda/decode) serves them, reading paged pools through the
block table and cache slots through cache_batch_idx in place, at any page size. The
CPU kernels and the torch path (CUDA calls with gradients, fp32) read a dense gather.
Before attention, the rotation and the append are one kernel (steelattn.h kv_append, CPU
and CUDA) unless gradients flow through q / k_new / v_new (then torch ops, differentiable).
"""
from __future__ import annotations

import math
import os

import torch

from . import _validate
from ._extra import Extra
from .api import _CUDA_KERNELS, _kernel, _run, check_sinks, with_sinks
from .reference import attention_reference

_FN = "flash_attention_kvcache"

# The fused kv_append step on (default) or the torch ops instead (STEELATTN_KV_APPEND=0 at
# import, or set by bench --op decode around its torch-ops cells): read once, not per call.
fused_append = os.environ.get("STEELATTN_KV_APPEND") != "0"


# --------------------------------------------------------------------------- rotary

def apply_rotary(x, cos, sin, positions, interleaved=True, rotary_dim=None):
    """x [B, H, N, D] rotated at positions [B, N] (int64) by tables cos/sin [P, rotary_dim / 2]:
    pairs (2i, 2i+1) when `interleaved` (GPT-J, the FlashAttention default), halves
    (i, i + rotary_dim / 2) otherwise (GPT-NeoX, Hugging Face Llama); features past
    rotary_dim are unchanged. Computed in fp32 (fp64 for fp64 x), returned in x's dtype."""
    rd = rotary_dim if rotary_dim is not None else 2 * cos.size(-1)
    ct = torch.promote_types(x.dtype, torch.float32)
    c = cos[positions].to(ct).unsqueeze(1)  # [B, 1, N, rd/2]
    s = sin[positions].to(ct).unsqueeze(1)
    xr = x[..., :rd].to(ct)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
        rot = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rot.to(x.dtype), x[..., rd:]), dim=-1)


# --------------------------------------------------------------------------- merge

def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """Attention over the union of two disjoint key sets from the results over each:
    out [..., N, D] with lse [..., N] (natural log, fp32). Returns (out, lse); a row empty
    in both (lse = -inf twice) gives zeros and -inf."""
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"merge_attention_states: {name} must be a torch.Tensor")
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape or lse_a.shape != out_a.shape[:-1]:
        raise ValueError(f"merge_attention_states: out_a/out_b must share a shape [..., N, D] and lse_a/lse_b be "
                         f"[..., N]; got {tuple(out_a.shape)}, {tuple(lse_a.shape)}, {tuple(out_b.shape)}, "
                         f"{tuple(lse_b.shape)}")
    m = torch.maximum(lse_a, lse_b)
    m0 = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    wa, wb = torch.exp(lse_a - m0), torch.exp(lse_b - m0)
    tot = wa + wb
    lse = torch.where(tot > 0, m0 + torch.log(tot), torch.full_like(m, -math.inf))
    inv = torch.where(tot > 0, 1.0 / tot, torch.zeros_like(tot))
    out = (out_a.float() * (wa * inv).unsqueeze(-1) + out_b.float() * (wb * inv).unsqueeze(-1)).to(out_a.dtype)
    return out, lse


# --------------------------------------------------------------------------- kv cache

def _lengths(value, B, device, what):
    """(int32 [B] tensor on device, list of ints when known on the host or None)."""
    if isinstance(value, int):
        host = [value] * B
    elif isinstance(value, (list, tuple)):
        host = [int(x) for x in value]
        if len(host) != B:
            raise ValueError(f"{_FN}: {what} has {len(host)} entries, the batch has {B}")
    elif isinstance(value, torch.Tensor):
        if value.dtype != torch.int32 or value.shape != (B,):
            raise ValueError(f"{_FN}: {what} must be int32 [B]={[B]}, got {value.dtype} {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{_FN}: {what} is on {value.device} but q is on {device}")
        return value, (value.tolist() if value.device.type == "cpu" else None)
    else:
        raise TypeError(f"{_FN}: {what} must be an int, a list or an int32 tensor, got {type(value).__name__}")
    if any(x < 0 for x in host):
        raise ValueError(f"{_FN}: {what} must be >= 0, got {host}")
    return torch.tensor(host, dtype=torch.int32, device=device), host


def flash_attention_kvcache(q, k_cache, v_cache, *, k_new=None, v_new=None, cache_seqlens=None, cache_batch_idx=None,
                            block_table=None, seq_lens=None, rotary_cos=None, rotary_sin=None,
                            rotary_interleaved=True, rotary_dim=None, scale=None, causal=True, window_size=None,
                            softcap=0.0, alibi_slopes=None, return_lse=False, num_splits=0, sinks=None):
    """Attention of new queries against a KV cache, appending k_new/v_new first (module
    docstring for positions and where it runs).

    q [B, H, Nq, D]. Dense caches: k_cache [Bc, Hkv, Smax, D], v_cache [Bc, Hkv, Smax, Dv]
    (any strides, so [B, Smax, Hkv, D] storage viewed as [B, Hkv, Smax, D] works), Bc = B,
    or any Bc with cache_batch_idx (int32 [B]: the cache slot of each batch entry). Paged
    pools: k_cache [num_pages, page_size, Hkv, D] with block_table (int32 [B, max_pages],
    -1 = unused). cache_seqlens (or seq_lens, the same) is the number of tokens already
    in each entry's cache: an int, a list or an int32 [B] tensor (None: the caches are
    full, nothing is appended). k_new/v_new [B, Hkv, Nnew, D] are written in place.
    rotary_cos/sin [max_position, rotary_dim / 2] turn q and k_new (rotary_interleaved:
    GPT-J pairs, else NeoX halves). num_splits > 0 sets the CUDA decode kernel's key
    splits per (entry, KV head), at most 128 (0: chosen from batch x heads x capacity so
    one wave fills the GPU); results do not depend on it beyond the fp32 rounding of the
    merge. The CPU kernels split by threads and ignore it. `sinks` (float [H]): a per-head
    logit in every row's denominator, as in flash_attention. Returns out [B, H, Nq, Dv]
    (and lse [B, H, Nq]).
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"{_FN}: q must be a [B, H, Nq, D] tensor")
    B, H, Nq, D = q.shape
    paged = block_table is not None
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{_FN}: {name} must be a 4-d tensor")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{_FN}: {name} must have q's dtype and device ({q.dtype}, {q.device}), "
                             f"got {t.dtype}, {t.device}")
    if paged:
        if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2 \
                or block_table.size(0) != B:
            raise ValueError(f"{_FN}: block_table must be int32 [B, max_pages] with B={B}")
        if block_table.device != q.device:
            raise ValueError(f"{_FN}: block_table is on {block_table.device} but q is on {q.device}")
        num_pages, page_size, Hkv, Dk = k_cache.shape
        if v_cache.shape[:3] != (num_pages, page_size, Hkv):
            raise ValueError(f"{_FN}: v_cache {tuple(v_cache.shape)} must match k_cache's pages, page size and heads "
                             f"{(num_pages, page_size, Hkv)}")
        capacity = block_table.size(1) * page_size
        if cache_batch_idx is not None:
            raise ValueError(f"{_FN}: cache_batch_idx is for dense caches (a paged batch maps through block_table)")
        if block_table.device.type == "cpu":
            bad = (block_table >= num_pages) | (block_table < -1)
            if bool(bad.any()):
                raise ValueError(f"{_FN}: block_table holds page indices outside [-1, {num_pages})")
    else:
        Bc, Hkv, capacity, Dk = k_cache.shape
        if v_cache.shape[:3] != (Bc, Hkv, capacity):
            raise ValueError(f"{_FN}: v_cache {tuple(v_cache.shape)} must match k_cache's [Bc, Hkv, Smax]")
        if cache_batch_idx is None and Bc != B:
            raise ValueError(f"{_FN}: k_cache has {Bc} entries, q {B} (pass cache_batch_idx to map them)")
    Dv = v_cache.size(-1)
    if Dk != D:
        raise ValueError(f"{_FN}: k_cache's head dim {Dk} differs from q's {D}")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"{_FN}: the cache's {Hkv} heads must divide q's {H}")
    slot = None
    if cache_batch_idx is not None:
        if not isinstance(cache_batch_idx, torch.Tensor) or cache_batch_idx.dtype != torch.int32 or \
                cache_batch_idx.shape != (B,) or cache_batch_idx.device != q.device:
            raise ValueError(f"{_FN}: cache_batch_idx must be int32 [B]={[B]} on q's device")
        if cache_batch_idx.device.type == "cpu" and bool(((cache_batch_idx < 0) | (cache_batch_idx >= Bc)).any()):
            raise ValueError(f"{_FN}: cache_batch_idx holds slots outside [0, {Bc})")
        slot = cache_batch_idx.long()
    if cache_seqlens is not None and seq_lens is not None:
        raise ValueError(f"{_FN}: give cache_seqlens or seq_lens (the same thing), not both")
    lens_arg = cache_seqlens if cache_seqlens is not None else seq_lens
    Nnew = 0
    if (k_new is None) != (v_new is None):
        raise ValueError(f"{_FN}: k_new and v_new go together")
    if k_new is not None:
        if lens_arg is None:
            raise ValueError(f"{_FN}: appending k_new/v_new needs cache_seqlens (where to write)")
        if k_new.dim() != 4 or k_new.shape[:2] != (B, Hkv) or k_new.size(3) != D or v_new.shape != (
                B, Hkv, k_new.size(2), Dv):
            raise ValueError(f"{_FN}: k_new/v_new must be [B, Hkv, Nnew, D] / [.., Dv] = "
                             f"{[B, Hkv, 'Nnew', D]} / {[B, Hkv, 'Nnew', Dv]}, got {tuple(k_new.shape)}, "
                             f"{tuple(v_new.shape)}")
        if k_new.dtype != q.dtype or v_new.dtype != q.dtype or k_new.device != q.device:
            raise ValueError(f"{_FN}: k_new/v_new must have q's dtype and device")
        Nnew = k_new.size(2)
    if lens_arg is None:
        lens, host = torch.full((B,), capacity, dtype=torch.int32, device=q.device), [capacity] * B
    else:
        lens, host = _lengths(lens_arg, B, q.device, "cache_seqlens" if cache_seqlens is not None else "seq_lens")
    if host is not None and any(n + Nnew > capacity for n in host):
        raise ValueError(f"{_FN}: cache_seqlens + Nnew exceeds the cache's capacity {capacity} "
                         f"(lengths {host}, Nnew {Nnew})")
    rotary = rotary_cos is not None or rotary_sin is not None
    if rotary:
        if rotary_cos is None or rotary_sin is None or rotary_cos.shape != rotary_sin.shape or rotary_cos.dim() != 2:
            raise ValueError(f"{_FN}: rotary_cos and rotary_sin must both be [max_position, rotary_dim / 2]")
        rd = rotary_dim if rotary_dim is not None else 2 * rotary_cos.size(1)
        if rd % 2 or rd > D or rd > 2 * rotary_cos.size(1) or rd < 2:
            raise ValueError(f"{_FN}: rotary_dim must be even, <= D={D} and <= 2 * the tables' width, got {rd}")
        if host is not None and max(host) + max(Nnew, Nq) > rotary_cos.size(0):
            raise ValueError(f"{_FN}: the rotary tables cover {rotary_cos.size(0)} positions, the call needs "
                             f"{max(host) + max(Nnew, Nq)}")
    if not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"{_FN}: num_splits must be an int >= 0, got {num_splits!r}")
    scale, softcap, wl, wr = _validate.score_args(_FN, D, scale, softcap, window_size, causal)
    alibi = _validate.check_alibi(_FN, alibi_slopes, q, B, H) if alibi_slopes is not None else None
    if sinks is not None:
        check_sinks(_FN, sinks, q, H)

    # Everything checked: rotate, append in place, attend.
    prepared = bool(rotary or Nnew) and _fused_append_ok(q, k_new, v_new, rotary_cos if rotary else None)
    if prepared:
        # One kernel (steelattn.h kv_append): k_new / v_new into the cache at lens, k_new
        # and q turned on the way; lengths stay on the device.
        kn = k_new if Nnew else q.new_empty(B, k_cache.size(2) if paged else k_cache.size(1), 0, D)
        vn = v_new if Nnew else q.new_empty(B, kn.size(1), 0, v_cache.size(-1))
        q_rot = torch.empty(q.shape, dtype=q.dtype, device=q.device) if rotary else None
        kc, vc = (k_cache.permute(0, 2, 1, 3), v_cache.permute(0, 2, 1, 3)) if paged else (k_cache, v_cache)
        _kernel.kv_append(kn, vn, kc, vc, lens, block_table if paged else None, cache_batch_idx,
                          q if rotary else None, q_rot, rotary_cos if rotary else None,
                          rotary_sin if rotary else None, rd if rotary else 0, bool(rotary_interleaved), bool(causal))
        if rotary:
            q = q_rot
    base = lens.long() if (rotary or Nnew) and not prepared else None  # the torch-op append's positions
    if rotary and not prepared:
        qpos = base[:, None] + (torch.arange(Nq, device=q.device)[None] if causal else 0)
        q = apply_rotary(q, rotary_cos, rotary_sin, qpos.expand(B, Nq), rotary_interleaved, rd)
    if Nnew and not prepared:
        pos = base[:, None] + torch.arange(Nnew, device=q.device)[None]  # [B, Nnew]
        kn = apply_rotary(k_new, rotary_cos, rotary_sin, pos, rotary_interleaved, rd) if rotary else k_new
        with torch.no_grad():
            if paged:
                page = block_table.long().gather(1, pos // page_size)
                k_cache[page, pos % page_size] = kn.permute(0, 2, 1, 3).to(k_cache.dtype)
                v_cache[page, pos % page_size] = v_new.permute(0, 2, 1, 3).to(v_cache.dtype)
            else:
                rows = (slot if slot is not None else torch.arange(B, device=q.device))[:, None].expand(B, Nnew)
                k_cache[rows, :, pos] = kn.permute(0, 2, 1, 3).to(k_cache.dtype)
                v_cache[rows, :, pos] = v_new.permute(0, 2, 1, 3).to(v_cache.dtype)
    used = (lens + Nnew) if Nnew else lens
    if paged:
        dense_kv = lambda: (paged_view(k_cache, block_table), paged_view(v_cache, block_table))  # noqa: E731
    elif slot is not None:
        dense_kv = lambda: (k_cache.index_select(0, slot), v_cache.index_select(0, slot))  # noqa: E731
    else:
        dense_kv = lambda: (k_cache, v_cache)  # noqa: E731
    direct = None  # the CUDA decode kernel reads pages and cache slots in place
    if q.is_cuda and paged:
        direct = (k_cache.permute(0, 2, 1, 3), v_cache.permute(0, 2, 1, 3), dict(block_table=block_table))
    elif q.is_cuda and slot is not None:
        direct = (k_cache, v_cache, dict(kv_batch_idx=cache_batch_idx))
    out, lse = _attend(q, dense_kv, direct, used, scale, softcap, alibi, wl, wr, return_lse or sinks is not None,
                       num_splits)
    if sinks is not None:
        out, lse, _ = with_sinks(out, lse, None, sinks.view(1, H, 1))
    return (out, lse) if return_lse else out


def _fused_append_ok(q, k_new, v_new, cos):
    """Whether the kv_append kernel serves this step: the extension is built, no gradients
    flow through q / k_new / v_new (the kernel writes without a graph), not traced by
    torch.compile (an opaque call), and the rotary tables are float32 or q's dtype."""
    if _kernel is None or torch.compiler.is_compiling() or (q.is_cuda and not _CUDA_KERNELS):
        return False
    if not fused_append:
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k_new, v_new)):
        return False
    if any(t is not None and t.stride(-1) != 1 and t.size(-1) > 1 for t in (q, k_new, v_new, cos)):
        return False  # the kernel reads rows with unit stride (the caches: checked by the core)
    return cos is None or cos.dtype in (torch.float32, q.dtype)


def paged_view(pages, block_table):
    """[B, Hkv, max_pages * page_size, D] from a pool [num_pages, page_size, Hkv, D] and a
    block table (a gather: a copy; unused entries (-1) read page 0, which no length
    reaches)."""
    B, P = block_table.shape
    g = pages[block_table.clamp(min=0).long()]  # [B, P, page, Hkv, D]
    return g.reshape(B, P * pages.size(1), pages.size(2), pages.size(3)).permute(0, 2, 1, 3)


def flash_attention_paged(q, k_pages, v_pages, block_table, seq_lens, *, scale=None, causal=True, window_size=None,
                          softcap=0.0, alibi_slopes=None, return_lse=False):
    """Attention of q [B, H, N, D] against paged K/V pools ([num_pages, page_size, Hkv, D])
    through block_table (int32 [B, max_pages]) and seq_lens (tokens per entry, keys
    included up to it), differentiable in q and in the pages. Causal is bottom-right."""
    return flash_attention_kvcache(q, k_pages, v_pages, block_table=block_table, seq_lens=seq_lens, scale=scale,
                                   causal=causal, window_size=window_size, softcap=softcap,
                                   alibi_slopes=alibi_slopes, return_lse=return_lse)


def _attend(q, dense_kv, direct, used, scale, softcap, alibi, wl, wr, return_lse, num_splits=0):
    """q [B, H, N, D] against the cache, entry b using its first used[b] keys. dense_kv()
    gives k/v as [B, Hkv, Smax, D] (a gather for pages and cache slots); direct is
    (k, v, Extra fields) for a kernel that reads pages or slots in place, or None.
    num_splits: the CUDA decode kernel's key splits (0: its choice)."""
    def fallback(rng):  # torch, one entry at a time (reads the lengths: a host sync on CUDA)
        k, v = dense_kv()
        outs, lses = [], []
        for b, n in enumerate(used.tolist()):
            o, l, _ = attention_reference(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], scale=scale,
                                          softcap=softcap, alibi_slopes=None if alibi is None else alibi[b:b + 1],
                                          diag_offset=n - q.size(2), window_left=wl, window_right=wr,
                                          compute_dtype=_validate.side_dtype(q))
            outs.append(o.to(q.dtype))
            lses.append(l)
        return torch.cat(outs), torch.cat(lses), None

    k, v, fields = direct if direct is not None else (*dense_kv(), {})
    out, lse, _ = _run(_FN, q, k, v, scale=scale, softcap=softcap, alibi=alibi, bias=None, bool_mask=None,
                       diag_offset=0, wl=wl, wr=wr, dropout_p=0.0, generator=None, return_lse=return_lse,
                       return_weights=False, backend="auto", torch_fallback=fallback, deterministic=False,
                       extra=Extra(seqlens_k=used.to(torch.int32), num_splits=num_splits, **fields))
    return out, lse
