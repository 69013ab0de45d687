"""torch.library custom ops: the forward and backward kernels as native PyTorch ops, for
torch.compile.

`steelattn::attention_fwd` returns (out, lse); its registered autograd calls
`steelattn::attention_bwd`. Both have fake (meta) implementations, so
torch.compile(fullgraph=True) traces through them without graph breaks, and both
allocate with torch on the caller's stream, so CUDA graphs can capture them. Eager calls
skip this layer (_autograd.py); both end in the same extension calls (_kernel.py).

Dropout's (seed, offset) travel as a 2-element int64 CPU tensor rather than two
ints: a new seed each step then does not make torch.compile recompile.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _kernel
from ._validate import side_dtype


def _scalars(scale, softcap, diag_offset, window_left, window_right, dropout_p, rng, deterministic):
    seed, offset = rng.tolist() if rng is not None else (0, 0)
    return _kernel.scalars(scale, softcap, diag_offset, window_left, window_right, dropout_p, seed, offset,
                           deterministic)


@torch.library.custom_op("steelattn::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, alibi_slopes: Optional[Tensor], bias: Optional[Tensor],
                  bool_mask: Optional[Tensor], scale: float, softcap: float, diag_offset: int, window_left: int,
                  window_right: int, dropout_p: float, rng: Optional[Tensor],
                  deterministic: bool = False) -> Tuple[Tensor, Tensor]:
    """(out, lse). `deterministic` only matters to the backward (bit-identical gradients)."""
    sc = _scalars(scale, softcap, diag_offset, window_left, window_right, dropout_p, rng, deterministic)
    out, lse, _ = _kernel.run_forward(q, k, v, alibi_slopes, bias, bool_mask, sc, _kernel.RUN)
    return out, lse


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, alibi_slopes, bias, bool_mask, scale, softcap, diag_offset, window_left,
                        window_right, dropout_p, rng, deterministic=False):
    B, H, N, _ = q.shape
    return q.new_empty(B, H, N, v.size(3)), q.new_empty(B, H, N, dtype=side_dtype(q))


@torch.library.custom_op("steelattn::attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  alibi_slopes: Optional[Tensor], bias: Optional[Tensor], bool_mask: Optional[Tensor], scale: float,
                  softcap: float, diag_offset: int, window_left: int, window_right: int, dropout_p: float,
                  rng: Optional[Tensor], want_dbias: bool,
                  deterministic: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dbias); dbias is [B, H, N, S] when want_dbias, else empty."""
    sc = _scalars(scale, softcap, diag_offset, window_left, window_right, dropout_p, rng, deterministic)
    dq, dk, dv, dbias = _kernel.run_backward(dout, dlse, q, k, v, out, lse, alibi_slopes, bias, bool_mask, sc,
                                             want_dbias)
    return dq, dk, dv, dbias if want_dbias else q.new_empty((0,), dtype=lse.dtype)


@attention_bwd.register_fake
def _attention_bwd_fake(dout, dlse, q, k, v, out, lse, alibi_slopes, bias, bool_mask, scale, softcap, diag_offset,
                        window_left, window_right, dropout_p, rng, want_dbias, deterministic=False):
    B, H, N, _ = q.shape
    dbias = q.new_empty((B, H, N, k.size(2)) if want_dbias else (0,), dtype=lse.dtype)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


_SCALAR_ARGS = ("scale", "softcap", "diag_offset", "window_left", "window_right", "dropout_p")


def _setup_context(ctx, inputs, output):
    q, k, v, alibi_slopes, bias, bool_mask, *scalars, rng, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, bias, bool_mask, rng)
    ctx.scalars = dict(zip(_SCALAR_ARGS, scalars))
    ctx.deterministic = deterministic


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, alibi_slopes, bias, bool_mask, rng = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    want_dbias = bool(ctx.needs_input_grad[4])
    dq, dk, dv, dbias = attention_bwd(dout, dlse, q, k, v, out, lse, alibi_slopes, bias, bool_mask,
                                      **ctx.scalars, rng=rng, want_dbias=want_dbias,
                                      deterministic=ctx.deterministic)
    return (dq, dk, dv, None, dbias if want_dbias else None, None, None, None, None, None, None, None, None,
            None)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)

