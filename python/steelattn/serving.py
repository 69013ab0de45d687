"""Serving compositions over the kernels: a prompt prefix shared by many requests
(make_shared_prefix_cache, flash_attention_shared_prefix), prefill and decode tokens in
one call (flash_attention_splitfuse), and the seed's draft-verification helper
(flash_attention_speculative_verify).

Shared prefix (cascade attention). B requests that start with the same P-token prefix
keep its K/V once, [1, Hkv, P, D], and their own suffixes in a KV cache. Each request's
queries attend to prefix + suffix as one softmax, computed as two attentions merged by
their LSE (merge_attention_states): the prefix part runs all B requests' queries as the
rows of one batch entry, so the prefix K/V is read once per call, not once per request;
the suffix part is flash_attention_kvcache (decode kernel on CUDA). The prefix precedes
every suffix token, so it is fully visible to every query (causal applies inside the
suffix, bottom-right at each request's length).
"""
from __future__ import annotations

import torch

from .api import flash_attention
from .kvcache import flash_attention_kvcache, merge_attention_states

_SP = "flash_attention_shared_prefix"


def make_shared_prefix_cache(prefix_q, prefix_k, prefix_v, *, scale=None, causal=True):
    """The prefix's own attention, computed once, and its K/V to share across requests.

    prefix_q [1, H, P, D], prefix_k [1, Hkv, P, D], prefix_v [1, Hkv, P, Dv]. Returns
    (prefix_out [1, H, P, Dv], k_prefix, v_prefix): k_prefix / v_prefix are the given
    tensors themselves (no copy), for flash_attention_shared_prefix."""
    out = flash_attention(prefix_q, prefix_k, prefix_v, scale=scale, causal=causal)
    return out, prefix_k, prefix_v


def flash_attention_shared_prefix(q, k_prefix, v_prefix, k_cache, v_cache, *, cache_seqlens=None,
                                  block_table=None, scale=None, causal=True, softcap=0.0, return_lse=False):
    """Attention of q [B, H, N, D] over a shared prefix k_prefix / v_prefix [1, Hkv, P, D]
    followed by each request's own suffix cache (dense [B, Hkv, Smax, D] or paged pools
    with block_table, cache_seqlens tokens each, as in flash_attention_kvcache). Returns
    out [B, H, N, Dv] (and lse [B, H, N]), equal to attending to the concatenation.
    Sliding windows are not taken (their cut into the prefix differs per request)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"{_SP}: q must be a [B, H, N, D] tensor")
    for name, t in (("k_prefix", k_prefix), ("v_prefix", v_prefix)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.size(0) != 1:
            raise ValueError(f"{_SP}: {name} must be [1, Hkv, P, D] (one prefix shared by the batch)")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{_SP}: {name} must have q's dtype and device")
    B, H, N, D = q.shape
    Hkv = k_prefix.size(1)
    if k_prefix.shape[1:] != (Hkv, v_prefix.size(2), D) or v_prefix.shape[1:3] != (Hkv, k_prefix.size(2)):
        raise ValueError(f"{_SP}: k_prefix {tuple(k_prefix.shape)} / v_prefix {tuple(v_prefix.shape)} must be "
                         f"[1, Hkv, P, D={D}] / [1, Hkv, P, Dv]")
    # Prefix: the batch's queries as rows of one entry ([1, H, B * N, D]), no mask.
    rows = q.transpose(0, 1).reshape(1, H, B * N, D)
    out_p, lse_p = flash_attention(rows, k_prefix, v_prefix, scale=scale, softcap=softcap, return_lse=True)
    out_p = out_p.reshape(H, B, N, -1).transpose(0, 1)
    lse_p = lse_p.reshape(H, B, N).transpose(0, 1)
    out_s, lse_s = flash_attention_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens, block_table=block_table,
                                           scale=scale, causal=causal, softcap=softcap, return_lse=True)
    if out_s.shape != out_p.shape:
        raise ValueError(f"{_SP}: the suffix cache's value dim {out_s.size(-1)} differs from the prefix's "
                         f"{out_p.size(-1)}")
    out, lse = merge_attention_states(out_p, lse_p, out_s, lse_s)
    return (out, lse) if return_lse else out


def flash_attention_splitfuse(q_prefill, k_prefill, v_prefill, q_decode, k_cache_decode, v_cache_decode, *,
                              scale=None, causal=True, cache_seqlens=None, block_table=None, softcap=0.0,
                              window_size=None):
    """Prefill tokens and decode tokens of one scheduler step in one call: the prefill
    chunk attends to its own keys (flash_attention, causal bottom-right), the decode
    queries to their caches (flash_attention_kvcache with cache_seqlens / block_table),
    each on the kernel made for it. Returns (out_prefill, out_decode)."""
    out_prefill = flash_attention(q_prefill, k_prefill, v_prefill, scale=scale, causal=causal, softcap=softcap,
                                  window_size=window_size)
    out_decode = flash_attention_kvcache(q_decode, k_cache_decode, v_cache_decode, cache_seqlens=cache_seqlens,
                                         block_table=block_table, scale=scale, causal=causal, softcap=softcap,
                                         window_size=window_size)
    return out_prefill, out_decode


_SV = "flash_attention_speculative_verify"


def flash_attention_speculative_verify(q_target, k_cache, v_cache, draft_ids, *, scale=None, causal=True,
                                       temperature=1.0, cache_seqlens=None, block_table=None):
    """The seed's verification helper, with its semantics: the draft positions' queries
    q_target [B, H, N_draft, D] attend to the cache (causal bottom-right: the drafts are the
    cache's last N_draft tokens; with cache_seqlens / block_table, to each entry's used keys
    through flash_attention_kvcache), and

        target_logprobs[b, i] = log_softmax(out[b, :, i, :].mean(heads) / temperature)[draft_ids[b, i]]

    over the value dim. This is the seed's *proxy*, not the model's probability of the
    draft token: an attention call has no LM head, so real acceptance needs the logits of
    the model (project the layer's output through the rest of the model). draft_ids:
    integer [B, N_draft] in [0, Dv) (checked: one host read on CUDA; the seed clamps them).
    Returns (out [B, H, N_draft, Dv], lse [B, H, N_draft], target_logprobs float32
    [B, N_draft])."""
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"{_SV}: temperature must be a positive number, got {temperature!r}")
    if not isinstance(draft_ids, torch.Tensor) or draft_ids.dtype.is_floating_point or draft_ids.dtype == torch.bool:
        raise TypeError(f"{_SV}: draft_ids must be an integer tensor [B, N_draft]")
    if q_target.dim() != 4 or draft_ids.shape != (q_target.size(0), q_target.size(2)):
        raise ValueError(f"{_SV}: draft_ids must be [B, N_draft] = {tuple(q_target.shape[0:3:2])}, got "
                         f"{tuple(draft_ids.shape)}")
    if cache_seqlens is None and block_table is None:
        out, lse = flash_attention(q_target, k_cache, v_cache, scale=scale, causal=causal, return_lse=True)
    else:
        out, lse = flash_attention_kvcache(q_target, k_cache, v_cache, cache_seqlens=cache_seqlens,
                                           block_table=block_table, scale=scale, causal=causal, return_lse=True)
    Dv = out.size(-1)
    if draft_ids.numel() and not bool(((draft_ids >= 0) & (draft_ids < Dv)).all()):
        raise ValueError(f"{_SV}: draft_ids must lie in [0, {Dv}) (the value dim the proxy indexes)")
    logits = out.float().mean(dim=1) / temperature  # [B, N_draft, Dv]
    logprobs = torch.log_softmax(logits, dim=-1)
    target = logprobs.gather(-1, draft_ids.to(device=out.device, dtype=torch.int64).unsqueeze(-1)).squeeze(-1)
    return out, lse, target
