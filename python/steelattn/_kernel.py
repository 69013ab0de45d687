"""The one place that calls the extension's kernels: allocation with torch, the call's
scalars, one forward call and one backward call, and their dispatch counts.

api.py (eager calls), _autograd.py (their gradients), ops.py (the registered ops that
torch.compile traces) and info.py (selection probes) all come through here.
"""
from __future__ import annotations

import functools

import torch

from . import _dispatch, _ext, _native
from ._extra import Extra
from ._tensor import DTYPE_CODES
from ._validate import side_dtype

_ext.register_dtypes(tuple(DTYPE_CODES))

# Forward modes (src/python/ext.cpp): run; run for training (the backward must have a
# kernel too, or nothing runs); select only.
RUN, TRAIN, SELECT = 0, 1, 2

# Tests set this to fill outputs with NaN before the kernel runs, so an element the
# kernel forgot to write cannot pass for a correct one.
debug_poison = False

_DENSE = Extra()

_NAN = float("nan")
_NEG_INF = float("-inf")


def scalars(scale, softcap, diag_offset, window_left, window_right, dropout_p, seed, offset, deterministic):
    """The call's scalars in the order the extension reads them; the backward reuses the tuple."""
    return (float(scale), float(softcap), int(diag_offset), int(window_left), int(window_right), float(dropout_p),
            int(seed), int(offset), bool(deterministic))


def alloc(like, shape, dtype):
    """An uninitialised tensor on `like`'s device (NaN-filled under debug_poison)."""
    if debug_poison:
        return like.new_full(shape, _NAN, dtype=dtype)
    return like.new_empty(shape, dtype=dtype)


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what inductor's generated code calls


def _stream(q) -> int:
    if not q.is_cuda:
        return 0
    if _raw_stream is not None:
        return _raw_stream(q.get_device())
    return torch.cuda.current_stream(q.device).cuda_stream


@functools.lru_cache(maxsize=None)
def _workspace_allocator(device):
    return functools.partial(torch.empty, dtype=torch.uint8, device=device)


def forward(q, k, v, out, lse, weights, bias, bool_mask, alibi, sc, mode, extra=None):
    """(path, note, backward_path, backward_note); raises NotImplementedError, writing
    nothing, when no kernel serves the call (mode TRAIN: or its gradients)."""
    return _ext.forward(q, k, v, out, lse, weights, bias, bool_mask, alibi, sc, torch.get_num_threads(), _stream(q),
                        mode, _workspace_allocator(q.device), *(extra or _DENSE))


def token_major_out(q, cu_seqlens_q):
    """Whether a varlen call's out is allocated token-major (q a token-major packed view)."""
    return cu_seqlens_q is not None and q.size(0) == 1 and q.size(1) > 1 and q.stride(1) < q.stride(2)


def run_forward(q, k, v, alibi, bias, bool_mask, sc, mode, want_lse=True, want_weights=False, extra=None):
    """Allocates and fills (out, lse, weights) (lse/weights None unless wanted); counts the path.
    Varlen: out is allocated token-major ([total, H, Dv], viewed as [1, H, total, Dv]) when q
    is a token-major view, so that the caller's layout comes back contiguous."""
    if _native.native is not None and not want_weights and mode == RUN:  # the same, allocated in C++
        out, lse, path, note = _native.native.forward(q, k, v, alibi, bias, bool_mask, sc, extra, want_lse,
                                                      debug_poison)
        _dispatch.record_forward(path, note)
        return out, lse, None
    B, H, N, _ = q.shape
    S, Dv = k.shape[2], v.shape[3]
    if token_major_out(q, extra.cu_seqlens_q if extra is not None else None):
        out = alloc(q, (N, H, Dv), q.dtype).permute(1, 0, 2).unsqueeze(0)
    else:
        out = alloc(q, (B, H, N, Dv), q.dtype)
    lse = alloc(q, (B, H, N), side_dtype(q)) if want_lse else None
    weights = alloc(q, (B, H, N, S), side_dtype(q)) if want_weights else None
    if S and out.numel():
        path, note, bpath, bnote = forward(q, k, v, out, lse, weights, bias, bool_mask, alibi, sc, mode, extra)
    else:  # nothing to compute: the core validates and selects, the result is known
        path, note, bpath, bnote = forward(q, k, v, out, lse, weights, bias, bool_mask, alibi, sc, SELECT, extra)
        if path == "none" or (mode == TRAIN and bpath == "none"):
            raise NotImplementedError(note if path == "none" else bnote)
        out.zero_()
        if lse is not None:
            lse.fill_(_NEG_INF)
        if weights is not None:
            weights.zero_()
    _dispatch.record_forward(path, note)
    return out, lse, weights


def run_backward(dout, dlse, q, k, v, out, lse, alibi, bias, bool_mask, sc, want_dbias, extra=None):
    """(dq, dk, dv, dbias) in one extension call (dbias None unless wanted); counts the path.
    Gradients take their inputs' layouts (empty_like), as the registered op's fake says."""
    if dout.size(-1) > 1 and dout.stride(-1) != 1:  # e.g. the expanded ones of out.sum().backward();
        dout = dout.clone(memory_format=torch.contiguous_format)  # clone: an empty tensor "is contiguous" as is
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if debug_poison:
        for t in (dq, dk, dv):
            t.fill_(_NAN)
    if extra is not None and extra.seqlens_k is not None:  # keys past a cache's length get no gradient
        dk.zero_(), dv.zero_()
    B, H, N, _ = q.shape
    S = k.shape[2]
    dbias = torch.zeros((B, H, N, S), dtype=lse.dtype, device=q.device) if want_dbias else None
    path, demoted = _ext.backward(dout, dlse, q, k, v, out, lse, dq, dk, dv, dbias, bias, bool_mask, alibi, sc,
                                  torch.get_num_threads(), _stream(q), _workspace_allocator(q.device),
                                  *(extra or _DENSE))
    if not (q.numel() and S):  # no kernel ran: the gradients of an empty problem are zeros
        dq.zero_(), dk.zero_(), dv.zero_()
    _dispatch.record_backward(path, demoted)
    return dq, dk, dv, dbias


def kv_append(k_new, v_new, k_cache, v_cache, lens, block_table, kv_batch_idx, q, q_out, cos, sin, rotary_dim,
              interleaved, q_causal):
    """steelattn.h kv_append: k_new / v_new into the caches at lens (int32 [B]), k_new and q
    (into q_out) turned by the rotary tables; validated first, nothing written on error."""
    if _native.native is not None:  # the same call, tensors read in C++
        _native.native.kv_append(k_new, v_new, k_cache, v_cache, lens, block_table, kv_batch_idx, q, q_out, cos, sin,
                                 rotary_dim, interleaved, q_causal)
        return
    _ext.kv_append(k_new, v_new, k_cache, v_cache, lens, block_table, kv_batch_idx, q, q_out, cos, sin, rotary_dim,
                   interleaved, q_causal, torch.get_num_threads(), _stream(k_new))


def dropout_keep_mask(B, H, N, S, p, seed, offset, frame=None):
    """frame: (i0, j0, N_total, S_total), rows and columns of a larger grid (a varlen sequence)."""
    out = torch.empty(B, H, N, S, dtype=torch.uint8)
    if out.numel():
        _ext.dropout_keep_mask(out.data_ptr(), B, H, N, S, float(p), seed, offset, *(frame or (0, 0, -1, -1)))
    return out.bool()
