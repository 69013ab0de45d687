"""The user API: flash_attention, flash_attention_alibi, scaled_dot_product_attention.

Layout is [B, H, N, D] for queries, [B, Hkv, S, D] for keys and [B, Hkv, S, Dv] for
values. Outputs are allocated with torch (caching allocator, streams and autograd
bookkeeping stay torch's); the C++ core only fills them. Three ways in, one extension
call each (_kernel.py): inference calls go straight to it, calls that need gradients
through the eager autograd.Function (_autograd.py), calls under torch.compile through
the registered custom ops (ops.py).
"""
from __future__ import annotations

import math

import torch

from . import _dispatch, _validate
from ._extra import Extra

try:  # the compiled extension (and, with it, the registered torch.library ops)
    from . import _autograd, _kernel, _native, ops
except ImportError:  # pragma: no cover - broken install: everything goes to torch, counted
    _autograd = _kernel = _native = ops = None
_NATIVE = _native.native if _native is not None else None  # steelattn._torch_native, or None
from ._tensor import DEVICE_CODES, DTYPE_CODES, fake
from .reference import attention_reference

# A module constant, so torch.compile reads it without tracing into the extension.
_CUDA_KERNELS = bool(_kernel is not None and _kernel._ext.cuda_compiled())

_BACKENDS = ("auto", "steel", "torch")
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
_QKV = ("q", "k", "v")


def _dropout_seed(generator):
    """Seed and offset for the kernels' Philox stream, drawn from torch's RNG so that
    torch.manual_seed / a generator makes dropout reproducible."""
    draws = torch.randint(0, 2**62, (2,), generator=generator, dtype=torch.int64).tolist()
    return draws[0], draws[1]


def dropout_keep_mask(B, H, N, S, p, seed, offset, frame=None):
    """The bool [B, H, N, S] keep-mask the kernels apply for (p, seed, offset). frame =
    (i0, j0, N_total, S_total): rows i0.. and columns j0.. of a [B, H, N_total, S_total]
    grid instead, e.g. one sequence's piece of a varlen call's packed grid."""
    return _kernel.dropout_keep_mask(B, H, N, S, p, seed, offset, frame)


def _run(fn, q, k, v, *, scale, softcap, alibi, bias, bool_mask, diag_offset, wl, wr,
         dropout_p, generator, return_lse, return_weights, backend, torch_fallback, deterministic=False, extra=None):
    """Shared body of every entry point: one extension call, or torch, counted.

    Returns (out, lse, weights) with lse/weights None unless requested. `torch_fallback`
    takes the dropout (seed, offset) already drawn, or None. `extra`: an _extra.Extra
    (varlen.py, sparse.py)."""
    if backend not in _BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {_BACKENDS}, got {backend!r}")
    if torch.compiler.is_compiling():
        return _run_op(fn, q, k, v, scale, softcap, alibi, bias, bool_mask, diag_offset, wl, wr, dropout_p,
                       generator, return_lse, return_weights, backend, torch_fallback, deterministic, extra)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or (
        bias is not None and bias.requires_grad) or (alibi is not None and alibi.requires_grad))
    if backend == "torch":
        _dispatch.record_torch(None, grad)
        return torch_fallback(None)
    reason = None
    if _kernel is None:  # pragma: no cover - broken install
        reason = "extension not built"
    elif return_weights and grad:
        reason = "return_attn_weights with gradients (the weights are a forward-only output)"
    elif _transforms_active():
        reason = "torch.func transforms (the kernels read plain tensors)"
    if reason is not None:
        if backend == "steel":
            raise NotImplementedError(f"{fn}: backend='steel' cannot serve this call: {reason}")
        _dispatch.record_torch(reason, grad)
        return torch_fallback(None)

    rng = _dropout_seed(generator) if dropout_p > 0 else (0, 0)
    sc = (scale, softcap, diag_offset, wl, wr, dropout_p, rng[0], rng[1], deterministic)  # _kernel.scalars order
    try:
        if grad:
            out, lse = _autograd.apply(q, k, v, alibi, bias, bool_mask, sc, extra)
            weights = None
        else:  # inference: straight to the kernel, lse only when asked for
            out, lse, weights = _kernel.run_forward(q, k, v, alibi, bias, bool_mask, sc, _kernel.RUN,
                                                    return_lse, return_weights, extra=extra)
    except NotImplementedError as e:  # no kernel serves the call; nothing was written
        if backend == "steel":
            raise NotImplementedError(f"{fn}: backend='steel' cannot serve this call: {e}") from None
        _dispatch.record_torch(str(e), grad)
        return torch_fallback(rng if dropout_p > 0 else None)
    return out, lse if return_lse else None, weights


def _run_op(fn, q, k, v, scale, softcap, alibi, bias, bool_mask, diag_offset, wl, wr, dropout_p, generator,
            return_lse, return_weights, backend, torch_fallback, deterministic, extra=None):
    """Under torch.compile: the registered op (counted by its implementation when the
    compiled graph runs), or the differentiable torch path where no kernel can serve
    (decided here, before tracing: the CUDA cases no kernel takes, as dispatch.cpp says)."""
    extra = extra or Extra()
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias, alibi))
    reason = ("extension not built" if _kernel is None else
              "return_attn_weights is not traced as an op" if return_weights else
              "this build has no CUDA kernels" if q.is_cuda and not _CUDA_KERNELS else
              _block_mask_refusal(q, k, v, alibi, extra, scale, softcap, diag_offset, wl, wr, dropout_p,
                                  deterministic, grad)
              if q.is_cuda and extra.block_mask is not None else
              _cuda_kvcache_refusal(q, v, grad) if q.is_cuda and extra.seqlens_k is not None else
              "varlen on CUDA runs on the tensor-core kernels only" if (
                  q.is_cuda and extra.cu_seqlens_q is not None and (q.dtype == torch.float32 or max(
                      q.size(3), v.size(3)) > 256)) else None)
    if backend == "torch" or reason:
        if backend == "steel":
            raise NotImplementedError(f"{fn}: backend='steel' cannot serve this call: {reason}")
        return torch_fallback(None)
    # The seed pair stays a tensor: no graph break, and a new seed does not recompile.
    rng = torch.randint(0, 2**62, (2,), generator=generator, dtype=torch.int64) if dropout_p > 0 else None
    out, lse = ops.attention_fwd(q, k, v, alibi, bias, bool_mask, float(scale), float(softcap), int(diag_offset),
                                 int(wl), int(wr), float(dropout_p), rng, bool(deterministic), *extra)
    return out, lse if return_lse else None, None


def _fast(q, k, v, scale, diag_offset, wr, return_lse, deterministic):
    """The common eager call (scale and causal only, backend "auto") straight to the C++
    layer, where the core validates it: ~5 us of host time less than the full path. None
    when the call is not served there as given (bad arguments, no kernel, torch.func
    transforms): the full path then raises the argument's error or falls back, as it would
    have. Tracing never comes here (the registered op must be traced)."""
    if torch.compiler.is_compiling() or _transforms_active():
        return None
    try:
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[-1])
        elif type(scale) is not float or not math.isfinite(scale):  # noqa: E721 - ints etc. take the full path
            return None
        if diag_offset is None:
            diag_offset = k.shape[-2] - q.shape[-2]
        if deterministic is None:
            deterministic = torch.are_deterministic_algorithms_enabled()
        sc = (scale, 0.0, diag_offset, -1, wr, 0.0, 0, 0, bool(deterministic))  # _kernel.scalars order
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _autograd.apply(q, k, v, None, None, None, sc, None)
        out, lse, _ = _kernel.run_forward(q, k, v, None, None, None, sc, _kernel.RUN, return_lse)
        return out, lse
    except Exception:  # noqa: BLE001 - the full path redoes the call and raises what it should
        return None


def _describe(t):
    """t as a selection probe's tensor description (_tensor.fake), from the metadata that the
    FakeTensors torch.compile traces have: shape, strides, dtype, device. The pointer is an
    aligned dummy (a storage offset cannot be read while tracing): a compiled block-sparse
    call on a view whose data is not 16-byte aligned raises NotImplementedError naming the
    tensor when the graph runs (eager calls fall back to dense calls with a token mask)."""
    return (64, DTYPE_CODES[t.dtype], DEVICE_CODES[t.device.type], t.device.index or 0,
            tuple(int(n) for n in t.shape), tuple(int(n) for n in t.stride()))


@torch.compiler.assume_constant_result
def _select(q, k, v, out, lse, alibi, sc, extra):
    """(forward path, its note, backward path, its note) the core would choose for a call of
    these tensor descriptions; nothing runs. Under torch.compile it is evaluated once while
    tracing, and the graph keeps its result as a constant."""
    return tuple(_kernel._ext.forward(q, k, v, out, lse, None, None, None, alibi, sc, 1, 0, _kernel.SELECT, None,
                                      *extra))


def _block_mask_refusal(q, k, v, alibi, extra, scale, softcap, diag_offset, wl, wr, dropout_p, deterministic, grad):
    """Why no kernel takes a block-sparse call (None when one does, and one computes its
    gradients when it needs them; on CUDA that is the Hopper kernels), decided before tracing
    by the core's own selection on the call's shapes, strides and dtypes."""
    B, H, N, _ = q.shape
    dev, index = q.device.type, q.device.index or 0
    sc = _kernel.scalars(scale, softcap, diag_offset, wl, wr, dropout_p, 0, 0, deterministic)
    out = fake((B, H, N, v.size(3)), q.dtype, dev, index)
    lse = fake((B, H, N), _validate.side_dtype(q), dev, index)
    ext = tuple(extra._replace(block_mask=_describe(extra.block_mask)))  # plain constants for _select
    path, note, bpath, bnote = _select(_describe(q), _describe(k), _describe(v), out, lse,
                                       None if alibi is None else _describe(alibi), sc, ext)
    if path == "none":
        return note or "no kernel takes this block mask"
    if grad and bpath == "none":
        return bnote or "no backward kernel takes this block mask"
    return None


def _cuda_kvcache_refusal(q, v, grad):
    """Why no CUDA kernel takes a call with KV-cache lengths (None when the decode kernel
    does: fp16/bf16, head dims multiples of 8 up to 256, forward only), decided before
    tracing as src/cuda/decode/decode_api.cu decides it."""
    if grad:
        return "gradients through KV-cache lengths are not on the CUDA kernels yet"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return "KV-cache lengths on CUDA run on the fp16/bf16 decode kernel only"
    if any(d % 8 or d > 256 for d in (q.size(3), v.size(3))):
        return "the decode kernel takes head dims that are multiples of 8 up to 256"
    return None


def _pack(out, lse, weights, return_lse, return_weights):
    res = (out,)
    if return_lse:
        res += (lse,)
    if return_weights:
        res += (weights,)
    return res[0] if len(res) == 1 else res


def _reference_fallback(q, k, v, rng, *, scale, softcap, alibi, bias, bool_mask, diag_offset, wl, wr,
                        dropout_p, generator):
    """backend='torch' for flash_attention: the definition evaluated with torch ops in
    float32 (float64 for float64 inputs; differentiable; materialises [B, H, N, S]).
    Dropout uses the kernels' mask, from `rng` when the call already drew it."""
    B, H, N, _ = q.shape
    S = k.size(2)
    keep = None
    if dropout_p > 0:
        seed, offset = rng or _dropout_seed(generator)
        keep = dropout_keep_mask(B, H, N, S, dropout_p, seed, offset).to(q.device)
    out, lse, probs = attention_reference(
        q, k, v, scale=scale, softcap=softcap, alibi_slopes=alibi, bias=bias, bool_mask=bool_mask,
        diag_offset=diag_offset, window_left=wl, window_right=wr, dropout_keep=keep, dropout_p=dropout_p,
        compute_dtype=_validate.side_dtype(q))
    return out.to(q.dtype), lse, probs


def flash_attention(q, k, v, scale=None, causal=False, softcap=0.0, dropout_p=0.0, window_size=None,
                    alibi_slopes=None, attn_bias=None, return_lse=False, return_attn_weights=False,
                    backend="auto", *, generator=None, deterministic=None, sinks=None):
    """Exact attention softmax(scale * q k^T + modifiers) v.

    q [B, H, N, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv], H % Hkv == 0 (GQA/MQA without
    expanding K/V). `causal=True` aligns the diagonal bottom-right (query i sees keys
    j <= i + S - N). `window_size=(left, right)`, -1 = unbounded: query i sees
    i + S - N - left <= j <= i + S - N + right. Score order: scale, softcap
    (cap * tanh(s / cap)), ALiBi (-slope * |i + S - N - j|), attn_bias (float, added;
    bool, True = attend), then the masks. Softmax in fp32.

    `deterministic=True` (default: torch.are_deterministic_algorithms_enabled()) makes the
    gradients bit-identical run to run (on CUDA it selects the deterministic kernel).

    `sinks` (float [H], learnable): one logit per query head that joins every row's
    softmax denominator and carries no value (gpt-oss); lse includes it. Differentiable,
    sinks included.

    Returns out [B, H, N, Dv]; with return_lse also lse [B, H, N] (fp32, natural log);
    with return_attn_weights also the softmax probabilities [B, H, N, S] (before
    dropout, in q's dtype). A row with no visible key gives zeros and lse = -inf.
    """
    if (_NATIVE is not None and backend == "auto" and not softcap and not dropout_p and window_size is None
            and alibi_slopes is None and attn_bias is None and not return_attn_weights and sinks is None):
        r = _fast(q, k, v, scale, None, 0 if causal else -1, return_lse, deterministic)
        if r is not None:
            return r if return_lse else r[0]
    fn = "flash_attention"
    B, H, N, D, S = _validate.check_qkv(fn, _QKV, q, k, v)
    scale, softcap, wl, wr = _validate.score_args(fn, D, scale, softcap, window_size, causal, dropout_p)
    alibi = _validate.check_alibi(fn, alibi_slopes, q, B, H) if alibi_slopes is not None else None
    bias = bool_mask = None
    if attn_bias is not None:
        _validate.broadcast_mask(fn, "attn_bias", attn_bias, q, B, H, N, S)
        if attn_bias.dtype == torch.bool:
            bool_mask = attn_bias.expand(B, H, N, S)
        elif attn_bias.is_floating_point():
            bias = attn_bias.to(_validate.side_dtype(q)).expand(B, H, N, S)
        else:
            raise TypeError(f"{fn}: attn_bias must be a float or bool tensor, got {attn_bias.dtype}")
    dropout_p = float(dropout_p)

    def fallback(rng):
        return _reference_fallback(q, k, v, rng, scale=scale, softcap=softcap, alibi=alibi, bias=bias,
                                   bool_mask=bool_mask, diag_offset=S - N, wl=wl, wr=wr, dropout_p=dropout_p,
                                   generator=generator)

    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if sinks is not None:
        check_sinks(fn, sinks, q, H)
    out, lse, weights = _run(fn, q, k, v, scale=scale, softcap=softcap, alibi=alibi, bias=bias, bool_mask=bool_mask,
                             diag_offset=S - N, wl=wl, wr=wr, dropout_p=dropout_p, generator=generator,
                             return_lse=return_lse or sinks is not None, return_weights=return_attn_weights,
                             backend=backend, torch_fallback=fallback, deterministic=bool(deterministic))
    if sinks is not None:
        out, lse, weights = with_sinks(out, lse, weights, sinks.view(1, H, 1))
    if weights is not None:
        weights = weights.to(q.dtype)
    return _pack(out, lse, weights, return_lse, return_attn_weights)


def check_sinks(fn, sinks, q, H):
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point() or tuple(sinks.shape) != (H,):
        raise ValueError(f"{fn}: sinks must be a float tensor [H]={[H]}, got "
                         f"{tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__}")
    if sinks.device != q.device:
        raise ValueError(f"{fn}: sinks is on {sinks.device} but q is on {q.device}")


def with_sinks(out, lse, weights, sinks):
    """Adds a sink logit to every row's denominator: the row's mass shrinks by
    l / (l + e^sink) = exp(lse - logaddexp(lse, sink)) and lse becomes logaddexp(lse, sink).
    `sinks` broadcasts against lse; out is [..lse's dims.., Dv]. Torch ops, so the gradient
    of the sinks (and through lse into q and k) comes from autograd."""
    lse_t = torch.logaddexp(lse, sinks.to(lse.dtype))
    keep = torch.exp(lse - lse_t)  # 0 for a row with no visible key
    out = (out.to(keep.dtype) * keep.unsqueeze(-1)).to(out.dtype)
    if weights is not None:
        weights = weights * keep.unsqueeze(-1)
    return out, lse_t, weights


def flash_attention_alibi(q, k, v, slopes, scale=None, causal=False, **kwargs):
    """flash_attention with ALiBi: scores get -slopes[h] * |i + S - N - j| (slopes [H] or [B, H])."""
    return flash_attention(q, k, v, scale=scale, causal=causal, alibi_slopes=slopes, **kwargs)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The standard ALiBi slopes (Press et al.) for `num_heads` heads, fp32 [H]."""
    def pow2_slopes(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        s = pow2_slopes(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        s = pow2_slopes(closest) + pow2_slopes(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(s, dtype=torch.float32)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False, *, backend="auto", generator=None):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention.

    Same arguments and results as torch's, including top-left causal alignment when
    N != S, boolean (True = attend) and float attn_mask, and enable_gqa. Inputs are
    [..., H, N, D]; leading dims are treated as batch. One difference: a row whose
    mask hides every key gives zeros here, not NaN.
    """
    if (_NATIVE is not None and backend == "auto" and attn_mask is None and not dropout_p and generator is None
            and type(query) is torch.Tensor and type(key) is torch.Tensor and query.dim() == key.dim() == 4
            and (enable_gqa or query.shape[1] == key.shape[1])):
        # torch's causal is top-left aligned: diagonal offset 0
        r = _fast(query, key, value, scale, 0, 0 if is_causal else -1, False, None)
        if r is not None:
            return r[0]
    fn = "scaled_dot_product_attention"
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 3:
            raise ValueError(f"{fn}: {name} must have at least 3 dims [..., H, N, D], got shape {tuple(t.shape)}")
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(f"{fn}: query, key and value must have the same number of dims, got "
                         f"{query.dim()}, {key.dim()}, {value.dim()}")
    if is_causal and attn_mask is not None:
        raise ValueError(f"{fn}: attn_mask must be None when is_causal=True")
    lead = tuple(query.shape[:-3])

    def as4(t):
        if t.dim() == 4:
            return t
        return t.reshape((-1,) + tuple(t.shape[-3:])) if t.dim() > 4 else t.unsqueeze(0)

    q, k, v = as4(query), as4(key), as4(value)
    B, H, N, D, S = _validate.check_qkv(fn, ("query", "key", "value"), q, k, v)
    if H != k.size(1) and not enable_gqa:
        raise ValueError(f"{fn}: query has {H} heads and key {k.size(1)}; pass enable_gqa=True for GQA")
    _validate.check_scale(fn, scale)
    _validate.check_dropout(fn, dropout_p)
    bias = bool_mask = None
    if attn_mask is not None:
        m = attn_mask
        if isinstance(m, torch.Tensor) and m.dim() > 4:
            m = m.expand(lead + (H, N, S)).reshape(B, H, N, S)
        full = _validate.broadcast_mask(fn, "attn_mask", m, q, B, H, N, S)
        if m.dtype == torch.bool:
            bool_mask = full
        elif m.is_floating_point():
            bias = m.to(_validate.side_dtype(q)).expand(B, H, N, S)
        else:
            raise TypeError(f"{fn}: attn_mask must be bool or float, got {m.dtype}")
    scale_v = 1.0 / math.sqrt(D) if scale is None else float(scale)

    def fallback(rng):
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa)
        return out, None, None

    out, _, _ = _run(fn, q, k, v, scale=scale_v, softcap=0.0, alibi=None, bias=bias, bool_mask=bool_mask,
                     diag_offset=0, wl=-1, wr=0 if is_causal else -1, dropout_p=float(dropout_p),
                     generator=generator, return_lse=False, return_weights=False, backend=backend,
                     torch_fallback=fallback, deterministic=torch.are_deterministic_algorithms_enabled())
    if out.dim() == 4 and query.dim() != 4:
        out = out.reshape(lead + tuple(out.shape[1:]))
    return out
