"""Block-sparse attention: flash_attention with a boolean block mask.

Query block qb = i // block_size[0] sees key block kb = j // block_size[1] only where
block_mask[..., qb, kb] is True; causal, windows and the other modifiers still apply token
by token inside active blocks. The kernels skip key tiles whose blocks are all inactive
(never loaded, forward and backward). CPU: the CPU kernels. CUDA: the Hopper kernels, at
any block size (head dims 64 to 128 forward and backward, 192 and 256 forward only; not
deterministic in the backward): a tile that mixes active and inactive blocks tests the mask
per 16 x 16 cell. Other CUDA calls run as dense steelattn calls with the block mask as a
token mask, in query chunks (dense_chunks: every tile computed, noted in the dispatch stats
with the kernels' reason), or on the torch path with dropout or with ALiBi off the Hopper
kernels.
A FlexAttention BlockMask is accepted too (steelattn.masks builds plain ones).
"""
from __future__ import annotations

import math
import weakref

import torch

from . import _dispatch, _validate
from ._extra import Extra
from .api import _reference_fallback, _run, flash_attention

_FN = "flash_attention_sparse"


def _block_size(block_size):
    bs = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if len(bs) != 2 or not all(isinstance(x, int) and x > 0 and x % 16 == 0 for x in bs):
        raise ValueError(f"{_FN}: block_size must be a positive multiple of 16 or a pair of them, got {block_size!r}")
    return bs


def _band_cells(token, N, S):
    """(cells, (wl, wr)) when a token mask [b, h, N, S] is exactly a mask of 16 x 16 cells
    intersected with a band at the bottom-right diagonal (none, causal, or a causal window),
    which the kernels take as a block mask and a band, with no token mask; else None."""
    b, h = token.shape[:2]
    nq, nk = -(-N // 16), -(-S // 16)
    padded = token.new_zeros(b, h, nq * 16, nk * 16)
    padded[..., :N, :S] = token
    cells = padded.view(b, h, nq, 16, nk, 16).any(5).any(3)
    blocks = cells.repeat_interleave(16, 2).repeat_interleave(16, 3)[..., :N, :S]
    i = torch.arange(N, device=token.device).view(-1, 1) + (S - N)  # each query's diagonal key
    j = torch.arange(S, device=token.device).view(1, -1)
    candidates = [(-1, -1), (-1, 0)]
    seen = token.any(-1)
    if bool(seen.any()):  # a causal window: the widest reach to the left of any row
        first = token.to(torch.uint8).argmax(-1)  # each row's first visible key
        candidates.append((int((i.view(-1) - first)[seen].max()), 0))
    for wl, wr in candidates:
        keep = blocks
        if wr >= 0:
            keep = keep & (j <= i + wr)
        if wl >= 0:
            keep = keep & (j >= i - wl)
        if torch.equal(keep, token):
            return cells, (wl, wr)
    return None


def _intersect(wl, wr, band):
    """The window (wl, wr) narrowed to `band` (-1: unbounded on that side)."""
    pick = lambda a, b: b if a < 0 else a if b < 0 else min(a, b)  # noqa: E731
    return pick(wl, band[0]), pick(wr, band[1])


# BlockMask -> {(N, S, device): _from_flex's result}: a model's layers share one BlockMask per
# step, and evaluating its mask_mod into a token mask costs more than the attention (3.7 ms
# at N 8k against ~0.5 for the kernel, H200). Weak keys: an entry lives as long as its mask.
_FLEX_CACHE = weakref.WeakKeyDictionary()


def _from_flex_cached(bm, B, H, N, S, device):
    """_from_flex, once per BlockMask object and call shape (BlockMasks are not changed in
    place; a mask_mod whose captured tensors change between calls needs a new BlockMask)."""
    key = (N, S, str(device))
    try:
        per_mask = _FLEX_CACHE.setdefault(bm, {})
    except TypeError:  # not weak-referenceable
        return _from_flex(bm, B, H, N, S, device)
    if key not in per_mask:
        per_mask[key] = _from_flex(bm, B, H, N, S, device)
    return per_mask[key]


def _from_flex(bm, B, H, N, S, device):
    """(block mask [B', H', NQ, NK] bool, (bq, bk), token mask or None, band or None) of a
    FlexAttention BlockMask. Partial blocks are where its mask_mod decides token by token:
    the mask_mod is evaluated into a token mask for them (full blocks need none). When that
    token mask is 16 x 16 cells cut by a band (causal, a causal window: the common mask_mods),
    it becomes a block mask of 16 x 16 blocks and the band (_band_cells), which the Hopper
    kernels take; other token masks stay token masks."""
    bq, bk = (bm.BLOCK_SIZE, bm.BLOCK_SIZE) if isinstance(bm.BLOCK_SIZE, int) else tuple(bm.BLOCK_SIZE)
    _block_size((bq, bk))
    nq, nk = math.ceil(N / bq), math.ceil(S / bk)
    dense = bm.to_dense().to(device=device, dtype=torch.bool)[:, :, :nq, :nk]
    if dense.shape[-2:] != (nq, nk):
        raise ValueError(f"{_FN}: block_mask (a BlockMask) covers {tuple(dense.shape[-2:])} blocks, the call needs "
                         f"({nq}, {nk}) at block size ({bq}, {bk})")
    partial = bm.full_kv_num_blocks is None or bool(bm.kv_num_blocks.sum() > 0)
    token = None
    if partial:
        from torch.nn.attention.flex_attention import create_mask
        token = create_mask(bm.mask_mod, dense.size(0), dense.size(1), N, S, device=device).to(torch.bool)
        fit = _band_cells(token, N, S)
        if fit is not None:
            return fit[0], (16, 16), None, fit[1]
    return dense, (bq, bk), token, None


def flash_attention_sparse(q, k, v, block_mask, *, block_size=(128, 128), scale=None, causal=False,
                           window_size=None, softcap=0.0, alibi_slopes=None, dropout_p=0.0, return_lse=False,
                           deterministic=None, backend="auto", generator=None):
    """flash_attention restricted to the active blocks of `block_mask`.

    q [B, H, N, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] as in flash_attention (causal is
    bottom-right). block_mask: bool [NQ, NK], [H, NQ, NK] or [B, H, NQ, NK] with
    NQ = ceil(N / block_size[0]), NK = ceil(S / block_size[1]), on q's device; block sizes
    are multiples of 16 and need not match the kernels' tiles. A torch FlexAttention
    BlockMask works too (its BLOCK_SIZE is used and its mask_mod decides inside partial
    blocks). A query whose visible keys are all in inactive blocks gives zeros and
    lse = -inf. Differentiable in q, k, v.

    >>> q = k = v = torch.randn(1, 2, 300, 64)
    >>> mask = steelattn.make_sliding_window_mask(300, window_size=64, block_size=64)
    >>> flash_attention_sparse(q, k, v, mask, block_size=64).shape
    torch.Size([1, 2, 300, 64])
    """
    B, H, N, D, S = _validate.check_qkv(_FN, ("q", "k", "v"), q, k, v)
    token = band = None
    if type(block_mask).__name__ == "BlockMask" and hasattr(block_mask, "to_dense"):
        block_mask, (bq, bk), token, band = _from_flex_cached(block_mask, B, H, N, S, q.device)
    else:
        bq, bk = _block_size(block_size)
        if not isinstance(block_mask, torch.Tensor):
            raise TypeError(f"{_FN}: block_mask must be a bool tensor or a FlexAttention BlockMask, "
                            f"got {type(block_mask).__name__}")
        if block_mask.dtype != torch.bool:
            raise TypeError(f"{_FN}: block_mask must be bool, got {block_mask.dtype}")
    nq, nk = math.ceil(N / bq), math.ceil(S / bk)
    if block_mask.dim() not in (2, 3, 4) or tuple(block_mask.shape[-2:]) != (nq, nk):
        raise ValueError(f"{_FN}: block_mask must be [NQ, NK], [H, NQ, NK] or [B, H, NQ, NK] with (NQ, NK) = "
                         f"({nq}, {nk}) for N={N}, S={S}, block_size=({bq}, {bk}); got {tuple(block_mask.shape)}")
    lead = tuple(block_mask.shape[:-2])
    if lead not in ((), (H,), (1,), (B, H), (1, H), (B, 1), (1, 1)):
        raise ValueError(f"{_FN}: block_mask's leading dims {lead} must be (), (H,) or (B, H) with B={B}, H={H}")
    if block_mask.device != q.device:
        raise ValueError(f"{_FN}: block_mask is on {block_mask.device} but q is on {q.device}")
    mask4 = block_mask.reshape((1,) * (4 - block_mask.dim()) + tuple(block_mask.shape))  # broadcast dims kept
    bm = mask4.expand(B, H, nq, nk)
    if token is not None:
        token = token.expand(B, H, N, S)

    scale, softcap, wl, wr = _validate.score_args(_FN, D, scale, softcap, window_size, causal, dropout_p)
    if band is not None:  # a BlockMask's mask_mod read as a band (_from_flex)
        wl, wr = _intersect(wl, wr, band)
    alibi = _validate.check_alibi(_FN, alibi_slopes, q, B, H) if alibi_slopes is not None else None
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    extra = Extra(block_mask=bm, block_q=bq, block_k=bk)
    why = "a FlexAttention BlockMask with partial blocks (token rule)" if token is not None else None
    if q.is_cuda and backend != "torch" and not dropout_p and token is None:
        # The Hopper kernels take block masks (training calls need the Hopper backward too).
        # The core refuses, writing nothing, when it cannot serve the call; under
        # torch.compile the same selection decides while tracing (api._block_mask_refusal).
        try:
            out, lse, _ = _run_sparse(q, k, v, extra, None, scale, softcap, alibi, S - N, wl, wr, 0.0, generator,
                                      return_lse, "steel", None, bool(deterministic))
            return (out, lse) if return_lse else out
        except NotImplementedError as e:
            why = str(e).split("cannot serve this call: ", 1)[-1]
    if q.is_cuda and backend != "torch" and not dropout_p and alibi is None:
        # The dense kernel with the block mask (and the band) as a token mask, in query
        # chunks that bound the mask's memory. Every tile is computed (no skipping), but
        # it runs on a steelattn kernel, forward and backward, instead of torch's
        # materialised scores.
        _dispatch.record_note(f"block-sparse on CUDA -> dense kernel with a token mask: {why}")
        out, lse = dense_chunks(q, k, v, mask4, bq, bk, token, scale, softcap, wl, wr, bool(deterministic))
        return (out, lse) if return_lse else out

    def fallback(rng):  # torch: the block mask (and a BlockMask's token rule) as a token mask
        keep = token_mask(bm, bq, bk, N, S)
        if token is not None:
            keep = keep & token
        return _reference_fallback(q, k, v, rng, scale=scale, softcap=softcap, alibi=alibi, bias=None, bool_mask=keep,
                                   diag_offset=S - N, wl=wl, wr=wr, dropout_p=float(dropout_p), generator=generator)

    out, lse, _ = _run_sparse(q, k, v, extra, token, scale, softcap, alibi, S - N, wl, wr, float(dropout_p),
                              generator, return_lse, backend, fallback, bool(deterministic))
    return (out, lse) if return_lse else out


def _run_sparse(q, k, v, extra, token, scale, softcap, alibi, diag, wl, wr, dropout_p, generator, return_lse,
                backend, fallback, deterministic):
    return _run(_FN, q, k, v, scale=scale, softcap=softcap, alibi=alibi, bias=None, bool_mask=token,
                diag_offset=diag, wl=wl, wr=wr, dropout_p=dropout_p, generator=generator, return_lse=return_lse,
                return_weights=False, backend=backend, torch_fallback=fallback, deterministic=deterministic,
                extra=extra)


def dense_chunks(q, k, v, mask4, bq, bk, token, scale, softcap, wl, wr, deterministic, max_mask_bytes=1 << 28):
    """Block-sparse attention as dense flash_attention calls over query chunks, each with
    its token mask: the chunk's rows of the block mask [b, h, NQ, NK] (b, h broadcast
    dims kept at 1), a BlockMask's token rule, and the band at absolute positions (the
    chunk calls take no causal / window of their own, since their diagonal would be the
    chunk's). Returns (out, lse); differentiable through the dense calls."""
    B, H, N, _ = q.shape
    S = k.size(2)
    diag = S - N
    per_row = mask4.size(0) * mask4.size(1) * S
    rows = max(1, min(N, max_mask_bytes // max(per_row, 1)))
    j = torch.arange(S, device=q.device)
    outs, lses = [], []
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        i = torch.arange(r0, r1, device=q.device)
        keep = mask4[:, :, i // bq][..., j // bk]  # [b, h, rows, S]
        if token is not None:
            keep = keep & token[:, :, r0:r1]
        d = (i + diag)[:, None]
        if wl >= 0:
            keep = keep & (j[None] >= d - wl)
        if wr >= 0:
            keep = keep & (j[None] <= d + wr)
        o, lse = flash_attention(q[:, :, r0:r1], k, v, scale=scale, softcap=softcap, attn_bias=keep, return_lse=True,
                                 deterministic=deterministic)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def token_mask(block_mask, bq, bk, N, S):
    """The token-level bool mask [..., N, S] of a block mask [..., NQ, NK]."""
    return block_mask.repeat_interleave(bq, dim=-2)[..., :N, :].repeat_interleave(bk, dim=-1)[..., :S]
