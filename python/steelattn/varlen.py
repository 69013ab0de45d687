"""Variable-length batches: flash_attention_varlen over packed token-major tensors.

q [total_q, H, D], k [total_k, Hkv, D], v [total_k, Hkv, Dv] (the layout packed training
and serving use), or the seed's [1, H, total, D]; sequence b owns rows
cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:cu_seqlens_k[b+1] of k/v.
The packed tensors reach the kernels as [1, H, total, D] views (no copy) with the
cu_seqlens arrays, and the core runs every sequence in one call (steelattn.h,
AttentionParams::cu_seqlens_q). CPU: the CPU kernels, all sequences in one task pool.
CUDA: the generic tensor-core kernels (fp16/bf16, head dims <= 256), one launch over an
upper bound of the tiles with the lengths read on the device (no host sync; CUDA graphs
replay with new lengths); the Hopper kernels do not take varlen yet (counted as a
demotion), and fp32 varlen on CUDA takes the torch path (counted).
"""
from __future__ import annotations

import torch

from . import _validate
from ._extra import Extra
from .api import _dropout_seed, _run, check_sinks, dropout_keep_mask, with_sinks
from .reference import attention_reference

_FN = "flash_attention_varlen"


def _as_packed(name, t, heads_name):
    """[1, H, total, D] view of a token-major [total, H, D] or seed-layout [1, H, total, D] tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{_FN}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 3:
        return t.permute(1, 0, 2).unsqueeze(0), True
    if t.dim() == 4 and t.size(0) == 1:
        return t, False
    raise ValueError(f"{_FN}: {name} must be [total, {heads_name}, D] (token-major) or [1, {heads_name}, total, D], "
                     f"got shape {tuple(t.shape)}")


def _check_cu(name, cu, device, total):
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{_FN}: {name} must be an int32 torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{_FN}: {name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{_FN}: {name} must be 1-d [num_seqs + 1], got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{_FN}: {name} must be on q's device ({device}), got {cu.device}")
    # Host-readable: checked here (device tensors would need a sync; under torch.compile the
    # values are data the graph does not see, and the core checks them when it runs).
    if cu.device.type == "cpu" and not torch.compiler.is_compiling():
        if cu.numel() <= 256:  # as a list: ~2 us, where the tensor ops below cost ~14 us a call
            c = cu.tolist()
            first, last, ordered = c[0], c[-1], all(a <= b for a, b in zip(c, c[1:]))
        else:
            first, last, ordered = int(cu[0]), int(cu[-1]), not bool((cu[1:] < cu[:-1]).any())
        if first != 0:
            raise ValueError(f"{_FN}: {name} must start at 0, got {first}")
        if not ordered:
            raise ValueError(f"{_FN}: {name} must be non-decreasing")
        if last != total:
            raise ValueError(f"{_FN}: {name}[-1] must equal the number of packed tokens ({total}), got {last}")


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *,
                           scale=None, causal=False, window_size=None, softcap=0.0, alibi_slopes=None,
                           dropout_p=0.0, return_lse=False, deterministic=None, backend="auto", sinks=None,
                           generator=None):
    """Attention over a batch of sequences of different lengths, packed without padding.

    q [total_q, H, D], k [total_k, Hkv, D], v [total_k, Hkv, Dv] (or [1, H, total, D]
    each); cu_seqlens_q / cu_seqlens_k int32 [num_seqs + 1] on q's device, the running
    totals of the sequences' lengths (starting at 0). Sequence b's queries attend only to
    its own keys, with every position relative to the sequence: `causal` aligns the
    diagonal bottom-right (query i of a sequence of N_b queries and S_b keys sees keys
    j <= i + S_b - N_b), `window_size=(left, right)` is taken around that diagonal, and
    ALiBi distances are within the sequence (`alibi_slopes` [H] or [num_seqs, H]).
    Sequences of length 0 are allowed; a query with no visible key gives zeros and
    lse = -inf. `max_seqlen_q` / `max_seqlen_k` are accepted for FlashAttention
    compatibility and never change results. `sinks` (float [H]): a per-head logit in every
    row's denominator, as in flash_attention. Differentiable in q, k, v (and sinks).
    `dropout_p` drops probabilities as flash_attention does (seeded from torch's RNG or
    `generator`); the draws are keyed in the packed [1, H, total_q, total_k] grid, so
    sequence b's keep-mask is dropout_keep_mask(1, H, total_q, total_k, ...)[..., q0:q1,
    k0:k1] with (q0, q1) and (k0, k1) its rows of the packed tensors.

    Returns out in q's layout ([total_q, H, Dv] or [1, H, total_q, Dv]); with return_lse
    also lse [H, total_q] (fp32, natural log).

    >>> q = torch.randn(7, 4, 64); k = torch.randn(9, 2, 64); v = torch.randn(9, 2, 64)
    >>> cu_q = torch.tensor([0, 3, 7], dtype=torch.int32); cu_k = torch.tensor([0, 5, 9], dtype=torch.int32)
    >>> flash_attention_varlen(q, k, v, cu_q, cu_k, causal=True).shape
    torch.Size([7, 4, 64])
    """
    q4, token_major = _as_packed("q", q, "H")
    k4, _ = _as_packed("k", k, "Hkv")
    v4, _ = _as_packed("v", v, "Hkv")
    _, H, total_q, D, total_k = _validate.check_qkv(_FN, ("q", "k", "v"), q4, k4, v4)
    _check_cu("cu_seqlens_q", cu_seqlens_q, q.device, total_q)
    _check_cu("cu_seqlens_k", cu_seqlens_k, q.device, total_k)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{_FN}: cu_seqlens_q and cu_seqlens_k must have the same length, got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    num_seqs = cu_seqlens_q.numel() - 1
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if m is not None and (not isinstance(m, int) or m < 0):
            raise ValueError(f"{_FN}: {name} must be a non-negative int or None, got {m!r}")
    scale, softcap, wl, wr = _validate.score_args(_FN, D, scale, softcap, window_size, causal, dropout_p)
    alibi = _validate.check_alibi(_FN, alibi_slopes, q4, num_seqs, H) if alibi_slopes is not None else None
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    cu = (cu_seqlens_q, cu_seqlens_k)
    extra = Extra(cu_seqlens_q, cu_seqlens_k)

    def fallback(rng):  # torch, one sequence at a time (reads the lengths: a host sync on CUDA)
        if dropout_p > 0 and rng is None:
            rng = _dropout_seed(generator)
        return _varlen_reference(q4, k4, v4, cu, scale=scale, softcap=softcap, alibi=alibi, wl=wl, wr=wr,
                                 token_major=token_major, dropout_p=dropout_p, rng=rng)

    if sinks is not None:
        check_sinks(_FN, sinks, q4, H)
    out, lse, _ = _run_varlen(q4, k4, v4, extra, scale, softcap, alibi, wl, wr, return_lse or sinks is not None,
                              backend, fallback, bool(deterministic), dropout_p, generator)
    if sinks is not None:  # lse [1, H, total], out [1, H, total, Dv] (a token-major view when q was)
        out, lse, _ = with_sinks(out, lse, None, sinks.view(1, H, 1))
    if out.dim() == 4 and token_major:
        # [total_q, H, Dv]: contiguous when the kernel allocated it token-major. squeeze, not
        # [0]: the gradient of a select is a zero-filled copy of the whole tensor (0.13 ms of
        # the H200 varlen bench's 1.02 ms step); squeeze's is a view.
        out = out.squeeze(0).permute(1, 0, 2)
    if return_lse:
        return out, lse.squeeze(0) if lse.dim() == 3 else lse
    return out


def _run_varlen(q4, k4, v4, extra, scale, softcap, alibi, wl, wr, return_lse, backend, fallback, deterministic,
                dropout_p=0.0, generator=None):
    return _run(_FN, q4, k4, v4, scale=scale, softcap=softcap, alibi=alibi, bias=None, bool_mask=None, diag_offset=0,
                wl=wl, wr=wr, dropout_p=dropout_p, generator=generator, return_lse=return_lse, return_weights=False,
                backend=backend, torch_fallback=fallback, deterministic=deterministic, extra=extra)


def _varlen_reference(q4, k4, v4, cu, *, scale, softcap, alibi, wl, wr, token_major, compute_dtype=None,
                      dropout_p=0.0, rng=None):
    """The varlen definition with torch ops, one sequence at a time (differentiable); with
    dropout, each sequence's piece of the packed grid's keep-mask for rng = (seed, offset).
    Returns (out [1, H, total_q, Dv], lse [1, H, total_q], None)."""
    cq, ck = (c.tolist() for c in cu)
    dt = compute_dtype or _validate.side_dtype(q4)
    H, total_q, total_k = q4.size(1), q4.size(2), k4.size(2)
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qs, ks = q4[:, :, cq[b]:cq[b + 1]], k4[:, :, ck[b]:ck[b + 1]]
        vs = v4[:, :, ck[b]:ck[b + 1]]
        n, s = qs.size(2), ks.size(2)
        keep = None
        if dropout_p > 0:
            keep = dropout_keep_mask(1, H, n, s, dropout_p, rng[0], rng[1],
                                     frame=(cq[b], ck[b], total_q, total_k)).to(q4.device)
        o, lse, _ = attention_reference(qs, ks, vs, scale=scale, softcap=softcap,
                                        alibi_slopes=None if alibi is None else alibi[b:b + 1],
                                        diag_offset=s - n, window_left=wl, window_right=wr, compute_dtype=dt,
                                        dropout_keep=keep, dropout_p=dropout_p)
        outs.append(o.to(q4.dtype))
        lses.append(lse)
    if not outs:
        return q4.new_zeros(1, q4.size(1), 0, v4.size(3)), q4.new_zeros(1, q4.size(1), 0, dtype=dt), None
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2), None
