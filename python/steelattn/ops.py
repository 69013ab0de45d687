"""torch.library custom ops: the forward and backward kernels as native PyTorch ops, for
torch.compile.

`steelattn::attention_fwd` returns (out, lse); its registered autograd calls
`steelattn::attention_bwd`. Both have fake (meta) implementations, so
torch.compile(fullgraph=True) traces through them without graph breaks, and both
allocate with torch on the caller's stream, so CUDA graphs can capture them. Eager calls
skip this layer (_autograd.py); both end in the same extension calls (_kernel.py).

Dropout's (seed, offset) travel as a 2-element int64 CPU tensor rather than two
ints: a new seed each step then does not make torch.compile recompile. Varlen calls add
cu_seqlens_q/k (q, k, v then packed [1, H, total, D] views), block-sparse calls a block
mask with its block sizes, KV-cache calls the used lengths seqlens_k with a block table or
cache slots (_extra.Extra):
trailing optional arguments of both ops.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _kernel
from ._extra import Extra
from ._validate import side_dtype


def _scalars(scale, softcap, diag_offset, window_left, window_right, dropout_p, rng, deterministic):
    seed, offset = rng.tolist() if rng is not None else (0, 0)
    return _kernel.scalars(scale, softcap, diag_offset, window_left, window_right, dropout_p, seed, offset,
                           deterministic)


@torch.library.custom_op("steelattn::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, alibi_slopes: Optional[Tensor], bias: Optional[Tensor],
                  bool_mask: Optional[Tensor], scale: float, softcap: float, diag_offset: int, window_left: int,
                  window_right: int, dropout_p: float, rng: Optional[Tensor],
                  deterministic: bool = False, cu_seqlens_q: Optional[Tensor] = None,
                  cu_seqlens_k: Optional[Tensor] = None, block_mask: Optional[Tensor] = None, block_q: int = 0,
                  block_k: int = 0, seqlens_k: Optional[Tensor] = None, block_table: Optional[Tensor] = None,
                  kv_batch_idx: Optional[Tensor] = None, num_splits: int = 0) -> Tuple[Tensor, Tensor]:
    """(out, lse). `deterministic` only matters to the backward (bit-identical gradients)."""
    sc = _scalars(scale, softcap, diag_offset, window_left, window_right, dropout_p, rng, deterministic)
    extra = Extra(cu_seqlens_q, cu_seqlens_k, block_mask, block_q, block_k, seqlens_k, block_table, kv_batch_idx,
                  num_splits)
    out, lse, _ = _kernel.run_forward(q, k, v, alibi_slopes, bias, bool_mask, sc, _kernel.RUN, extra=extra)
    return out, lse


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, alibi_slopes, bias, bool_mask, scale, softcap, diag_offset, window_left,
                        window_right, dropout_p, rng, deterministic=False, cu_seqlens_q=None, cu_seqlens_k=None,
                        block_mask=None, block_q=0, block_k=0, seqlens_k=None, block_table=None, kv_batch_idx=None,
                        num_splits=0):
    B, H, N, _ = q.shape
    if _kernel.token_major_out(q, cu_seqlens_q):  # as run_forward allocates it
        out = q.new_empty(N, H, v.size(3)).permute(1, 0, 2).unsqueeze(0)
    else:
        out = q.new_empty(B, H, N, v.size(3))
    return out, q.new_empty(B, H, N, dtype=side_dtype(q))


@torch.library.custom_op("steelattn::attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  alibi_slopes: Optional[Tensor], bias: Optional[Tensor], bool_mask: Optional[Tensor], scale: float,
                  softcap: float, diag_offset: int, window_left: int, window_right: int, dropout_p: float,
                  rng: Optional[Tensor], want_dbias: bool,
                  deterministic: bool = False, cu_seqlens_q: Optional[Tensor] = None,
                  cu_seqlens_k: Optional[Tensor] = None, block_mask: Optional[Tensor] = None, block_q: int = 0,
                  block_k: int = 0, seqlens_k: Optional[Tensor] = None, block_table: Optional[Tensor] = None,
                  kv_batch_idx: Optional[Tensor] = None, num_splits: int = 0) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dbias); dbias is [B, H, N, S] when want_dbias, else empty."""
    sc = _scalars(scale, softcap, diag_offset, window_left, window_right, dropout_p, rng, deterministic)
    extra = Extra(cu_seqlens_q, cu_seqlens_k, block_mask, block_q, block_k, seqlens_k, block_table, kv_batch_idx,
                  num_splits)
    dq, dk, dv, dbias = _kernel.run_backward(dout, dlse, q, k, v, out, lse, alibi_slopes, bias, bool_mask, sc,
                                             want_dbias, extra)
    return dq, dk, dv, dbias if want_dbias else q.new_empty((0,), dtype=lse.dtype)


@attention_bwd.register_fake
def _attention_bwd_fake(dout, dlse, q, k, v, out, lse, alibi_slopes, bias, bool_mask, scale, softcap, diag_offset,
                        window_left, window_right, dropout_p, rng, want_dbias, deterministic=False,
                        cu_seqlens_q=None, cu_seqlens_k=None, block_mask=None, block_q=0, block_k=0,
                        seqlens_k=None, block_table=None, kv_batch_idx=None, num_splits=0):
    B, H, N, _ = q.shape
    dbias = q.new_empty((B, H, N, k.size(2)) if want_dbias else (0,), dtype=lse.dtype)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


_SCALAR_ARGS = ("scale", "softcap", "diag_offset", "window_left", "window_right", "dropout_p")


def _setup_context(ctx, inputs, output):
    (q, k, v, alibi_slopes, bias, bool_mask, *scalars, rng, deterministic, cu_q, cu_k, block_mask, block_q,
     block_k, seqlens_k, block_table, kv_batch_idx, num_splits) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, bias, bool_mask, rng, cu_q, cu_k, block_mask, seqlens_k,
                          block_table, kv_batch_idx)
    ctx.scalars = dict(zip(_SCALAR_ARGS, scalars))
    ctx.deterministic = deterministic
    ctx.blocks = (block_q, block_k)
    ctx.num_splits = num_splits


def _backward(ctx, dout, dlse):
    (q, k, v, out, lse, alibi_slopes, bias, bool_mask, rng, cu_q, cu_k, block_mask, seqlens_k, block_table,
     kv_batch_idx) = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    want_dbias = bool(ctx.needs_input_grad[4])
    dq, dk, dv, dbias = attention_bwd(dout, dlse, q, k, v, out, lse, alibi_slopes, bias, bool_mask,
                                      **ctx.scalars, rng=rng, want_dbias=want_dbias,
                                      deterministic=ctx.deterministic, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                      block_mask=block_mask, block_q=ctx.blocks[0], block_k=ctx.blocks[1],
                                      seqlens_k=seqlens_k, block_table=block_table, kv_batch_idx=kv_batch_idx,
                                      num_splits=ctx.num_splits)
    return (dq, dk, dv, None, dbias if want_dbias else None) + (None,) * 18


attention_fwd.register_autograd(_backward, setup_context=_setup_context)

