"""Eager autograd: one extension call each way, with the autograd node in C++ when it can be.

`apply` uses the node of steelattn._torch_native (src/python/torch_native.cpp: a
torch::autograd::Function whose backward runs without Python) when that optional module
is loaded (_native.py); otherwise the Python Function below. Both make the same core calls.

Calls that need gradients outside torch.compile come here instead of going through the
registered custom op (ops.py): the custom-op layer (schema checks, dispatcher, Python
autograd wrapper) cost ~150 µs of host time per forward + backward, more than the
kernels of a small call. The forward's single call validates, selects the forward and
the backward kernel (refusing before writing anything when either is missing, so the
caller can still fall back to torch) and runs; the backward's single call selects,
sizes its workspace and runs. docs/DECISIONS.md has the numbers.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import _dispatch, _kernel, _native


class Attention(torch.autograd.Function):
    """(q, k, v, alibi, bias, bool_mask, scalars, extra) -> (out, lse); gradients for q, k, v
    and bias. `extra` is None or an _extra.Extra (varlen lengths, block mask)."""

    @staticmethod
    def forward(q, k, v, alibi, bias, bool_mask, sc, extra):
        out, lse, _ = _kernel.run_forward(q, k, v, alibi, bias, bool_mask, sc, _kernel.TRAIN, extra=extra)
        return out, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, alibi, bias, bool_mask, sc, extra = inputs
        ctx.save_for_backward(q, k, v, *output, alibi, bias, bool_mask)
        ctx.sc = sc
        ctx.extra = extra
        ctx.set_materialize_grads(False)  # an unused lse gets None, not a zero tensor

    @staticmethod
    @once_differentiable  # a double backward raises instead of silently giving wrong gradients
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, alibi, bias, bool_mask = ctx.saved_tensors
        if dout is None:  # only lse was used
            dout = torch.zeros_like(out)
        want_dbias = ctx.needs_input_grad[4]
        dq, dk, dv, dbias = _kernel.run_backward(dout, dlse, q, k, v, out, lse, alibi, bias, bool_mask, ctx.sc,
                                                 want_dbias, ctx.extra)
        return dq, dk, dv, None, dbias, None, None, None


# Function.apply's Python wrapper costs ~8 µs per call (default-argument binding through
# inspect.signature, a pytree pass that unwraps dead functorch wrappers); the C++ apply it
# ends in is called directly. torch.func transforms never get here (api.py sends them to torch).
python_apply = super(torch.autograd.Function, Attention).apply if hasattr(torch._C, "_FunctionBase") \
    else Attention.apply


def apply(q, k, v, alibi, bias, bool_mask, sc, extra):
    """(out, lse) of a call that needs gradients; the forward's path is counted here, the
    backward's where it runs."""
    if _native.native is None:
        return python_apply(q, k, v, alibi, bias, bool_mask, sc, extra)
    out, lse, path, note = _native.native.attention(q, k, v, alibi, bias, bool_mask, sc, extra, _kernel.debug_poison)
    _dispatch.record_forward(path, note)
    return out, lse
