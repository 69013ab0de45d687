"""torch.library custom ops: the forward and backward kernels as native PyTorch ops.

`steelattn::attention_fwd` returns (out, lse); its autograd formula calls
`steelattn::attention_bwd`. Both have fake (meta) implementations, so
torch.compile(fullgraph=True) traces through them without graph breaks, and both
allocate with torch on the caller's stream, so CUDA graphs can capture them.

Dropout's (seed, offset) travel as a 2-element int64 CPU tensor rather than two
ints: a new seed each step then does not make torch.compile recompile.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _ext
from ._tensor import describe


def _poison():
    from . import api

    return api._debug_poison_outputs


def _alloc(shape, dtype, device):
    if _poison():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _stream(q: Tensor) -> int:
    return torch.cuda.current_stream(q.device).cuda_stream if q.is_cuda else 0


def _rng(rng: Optional[Tensor]):
    if rng is None:
        return 0, 0
    seed, offset = rng.tolist()
    return int(seed), int(offset)


def _scalars(scale, softcap, diag_offset, window_left, window_right, dropout_p, rng, q):
    seed, offset = _rng(rng)
    return dict(scale=float(scale), softcap=float(softcap), diag_offset=int(diag_offset),
                window_left=int(window_left), window_right=int(window_right), dropout_p=float(dropout_p), seed=seed,
                offset=offset, num_threads=torch.get_num_threads(), stream=_stream(q))


@torch.library.custom_op("steelattn::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, alibi_slopes: Optional[Tensor], bias: Optional[Tensor],
                  bool_mask: Optional[Tensor], scale: float, softcap: float, diag_offset: int, window_left: int,
                  window_right: int, dropout_p: float, rng: Optional[Tensor],
                  deterministic: bool = False) -> Tuple[Tensor, Tensor]:
    """(out, lse). `deterministic` only matters to the backward (bit-identical gradients)."""
    B, H, N, _ = q.shape
    S, Dv = k.size(2), v.size(3)
    out = _alloc((B, H, N, Dv), q.dtype, q.device)
    lse = _alloc((B, H, N), lse_dtype(q), q.device)
    if out.numel() == 0:
        return out, lse
    if S == 0:  # nothing to attend to: zeros and lse = -inf, without a kernel launch
        return out.zero_(), lse.fill_(float("-inf"))
    _ext.forward(describe(q), describe(k), describe(v), describe(out), describe(lse), None, describe(bias),
                 describe(bool_mask), describe(alibi_slopes),
                 **_scalars(scale, softcap, diag_offset, window_left, window_right, dropout_p, rng, q), dry_run=False)
    return out, lse


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, alibi_slopes, bias, bool_mask, scale, softcap, diag_offset, window_left,
                        window_right, dropout_p, rng, deterministic=False):
    B, H, N, _ = q.shape
    return q.new_empty(B, H, N, v.size(3)), q.new_empty(B, H, N, dtype=lse_dtype(q))


@torch.library.custom_op("steelattn::attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  alibi_slopes: Optional[Tensor], bias: Optional[Tensor], bool_mask: Optional[Tensor], scale: float,
                  softcap: float, diag_offset: int, window_left: int, window_right: int, dropout_p: float,
                  rng: Optional[Tensor], want_dbias: bool,
                  deterministic: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dbias); dbias is [B, H, N, S] when want_dbias, else empty."""
    B, H, N, _ = q.shape
    S = k.size(2)
    if dout.size(-1) > 1 and dout.stride(-1) != 1:
        dout = dout.contiguous()  # e.g. the expanded ones of out.sum().backward()
    # Gradients take their inputs' layouts (empty_like), as the fake implementation says.
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    if _poison():
        for t in (dq, dk, dv):
            t.fill_(float("nan"))
    dbias = (torch.zeros((B, H, N, S), dtype=lse.dtype, device=q.device) if want_dbias
             else q.new_empty((0,), dtype=lse.dtype))
    if q.numel() == 0 or S == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dbias
    tensors = [describe(t) for t in (dout, q, k, v, out, lse, dq, dk, dv)]
    tensors += [describe(dbias) if want_dbias else None, describe(dlse)]
    mods = [describe(t) for t in (bias, bool_mask, alibi_slopes)]
    kw = _scalars(scale, softcap, diag_offset, window_left, window_right, dropout_p, rng, q)
    kw["deterministic"] = bool(deterministic)
    # Some kernels (the Hopper one) need scratch: ask the selector how much, allocate it with torch.
    _, _, nbytes = _ext.backward(*tensors, None, *mods, **kw, dry_run=True)
    workspace = torch.empty(nbytes, dtype=torch.uint8, device=q.device) if nbytes else None
    _ext.backward(*tensors, describe(workspace), *mods, **kw, dry_run=False)
    return dq, dk, dv, dbias


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
