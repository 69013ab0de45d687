"""The user API: flash_attention, flash_attention_alibi, scaled_dot_product_attention.

Layout is [B, H, N, D] for queries, [B, Hkv, S, D] for keys and [B, Hkv, S, Dv] for
values. Outputs are allocated here with torch (caching allocator, streams and
autograd bookkeeping stay torch's); the C++ core only fills them.
"""
from __future__ import annotations

import math

import torch

from . import _dispatch, _validate
from ._tensor import describe, fake
from .reference import attention_reference

try:  # registers the torch.library ops; needs the compiled extension
    from . import ops
except ImportError:  # pragma: no cover - broken install: everything goes to torch, counted
    ops = None
# A module constant, so torch.compile reads it without tracing into the extension.
_CUDA_KERNELS = bool(ops is not None and ops._ext.cuda_compiled())

_BACKENDS = ("auto", "steel", "torch")

# Tests set this to fill outputs with NaN before the kernel runs, so an element the
# kernel forgot to write cannot pass for a correct one.
_debug_poison_outputs = False


def _dropout_seed(generator, device):
    """Seed and offset for the kernels' Philox stream, drawn from torch's RNG so that
    torch.manual_seed / a generator makes dropout reproducible."""
    draws = torch.randint(0, 2**62, (2,), generator=generator, dtype=torch.int64)
    return int(draws[0]), int(draws[1])


def dropout_keep_mask(B, H, N, S, p, seed, offset):
    """The bool [B, H, N, S] keep-mask the kernels apply for (p, seed, offset)."""
    out = torch.empty(B, H, N, S, dtype=torch.uint8)
    if out.numel():
        ops._ext.dropout_keep_mask(out.data_ptr(), B, H, N, S, float(p), seed, offset)
    return out.bool()


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _select(q, k, v, out_shape, lse, weights, bias, bool_mask, alibi, args, backward, deterministic=False):
    """Asks the C++ selector which kernel would serve this call (nothing is run):
    returns (path, why_not). With backward=True, the kernel for the gradients too."""
    B, H, N, Dv = out_shape
    like = lambda shape, dtype: fake(shape, dtype, q.device.type, q.device.index or 0)  # noqa: E731
    out_d = like((B, H, N, Dv), q.dtype)
    lse_d = like((B, H, N), ops.lse_dtype(q))
    weights_d = like((B, H, N, k.size(2)), ops.lse_dtype(q)) if weights else None
    path, why = ops._ext.forward(describe(q), describe(k), describe(v), out_d, lse_d if lse else None, weights_d,
                                 describe(bias), describe(bool_mask), describe(alibi), **args, dry_run=True)
    if path != "none" and backward:
        grad_of = lambda t: like(tuple(t.shape), t.dtype)  # noqa: E731
        path, why, _ = ops._ext.backward(out_d, describe(q), describe(k), describe(v), out_d, lse_d, grad_of(q),
                                         grad_of(k), grad_of(v), None, None, None, describe(bias), describe(bool_mask),
                                         describe(alibi), **args, deterministic=deterministic, dry_run=True)
    return path, why


def _run(fn, q, k, v, *, scale, softcap, alibi, bias, bool_mask, diag_offset, wl, wr,
         dropout_p, generator, return_lse, return_weights, backend, torch_fallback, deterministic=False):
    """Shared body of every entry point: pick the path, run, count.

    Returns (out, lse, weights) with lse/weights None unless requested. Calls that
    need gradients go through the custom op (autograd registered); under
    torch.compile the op is called directly (no selection, no counting)."""
    if backend not in _BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {_BACKENDS}, got {backend!r}")
    B, H, N, _ = q.shape
    S, Dv = k.size(2), v.size(3)
    grad = _needs_grad(q, k, v, bias, alibi)

    reason = None
    if backend == "torch":
        reason = "backend='torch' requested"
    elif ops is None:  # pragma: no cover - broken install
        reason = "extension not built"
    elif return_weights and grad:
        reason = "return_attn_weights with gradients (the weights are a forward-only output)"
    elif torch.compiler.is_compiling():
        if q.is_cuda and not _CUDA_KERNELS:  # trace the differentiable torch path instead
            return torch_fallback()
        return _call_op(q, k, v, alibi, bias, bool_mask, scale, softcap, diag_offset, wl, wr, dropout_p,
                        generator, deterministic) + (None,)
    if reason is not None:
        if backend == "steel":
            raise NotImplementedError(f"{fn}: backend='steel' cannot serve this call: {reason}")
        _dispatch.record("torch", reason)
        return torch_fallback()

    args = dict(scale=float(scale), softcap=float(softcap), diag_offset=int(diag_offset), window_left=int(wl),
                window_right=int(wr), dropout_p=float(dropout_p), seed=0, offset=0,
                num_threads=torch.get_num_threads(), stream=0)
    if not grad and not return_weights:
        # Inference fast path: straight into the extension, which selects the kernel
        # and reports "no kernel" as NotImplementedError before touching any output.
        try:
            out, lse, path = _forward_direct(q, k, v, alibi, bias, bool_mask, args, dropout_p, generator)
        except NotImplementedError as e:
            if backend == "steel":
                raise NotImplementedError(f"{fn}: backend='steel' cannot serve this call: {e}") from None
            _dispatch.record("torch", str(e))
            return torch_fallback()
        _dispatch.record(path)
        return out, lse if return_lse else None, None

    path, why = _select(q, k, v, (B, H, N, Dv), return_lse, return_weights, bias, bool_mask, alibi, args, grad,
                        deterministic)
    if path == "none":
        if backend == "steel":
            raise NotImplementedError(f"{fn}: backend='steel' cannot serve this call: {why}")
        _dispatch.record("torch", why)
        return torch_fallback()
    _dispatch.record(path)
    if not return_weights:
        out, lse = _call_op(q, k, v, alibi, bias, bool_mask, scale, softcap, diag_offset, wl, wr, dropout_p,
                            generator, deterministic)
        return out, lse if return_lse else None, None

    # Attention weights: a forward-only call straight into the extension.
    seed, offset = _dropout_seed(generator, q.device) if dropout_p > 0 else (0, 0)
    out = ops._alloc((B, H, N, Dv), q.dtype, q.device)
    lse = ops._alloc((B, H, N), ops.lse_dtype(q), q.device)
    weights = ops._alloc((B, H, N, S), ops.lse_dtype(q), q.device)
    if out.numel() and S == 0:
        out.zero_(), lse.fill_(float("-inf")), weights.zero_()
    elif out.numel():
        args.update(seed=seed, offset=offset, stream=ops._stream(q))
        ops._ext.forward(*[describe(t) for t in (q, k, v, out, lse, weights, bias, bool_mask, alibi)], **args,
                         dry_run=False)
    return out, lse if return_lse else None, weights


def _forward_direct(q, k, v, alibi, bias, bool_mask, args, dropout_p, generator):
    """Runs the forward kernel without the custom-op layer (no autograd needed):
    returns (out, lse, path)."""
    B, H, N, _ = q.shape
    S, Dv = k.size(2), v.size(3)
    out = ops._alloc((B, H, N, Dv), q.dtype, q.device)
    lse = ops._alloc((B, H, N), ops.lse_dtype(q), q.device)
    if dropout_p > 0:
        args["seed"], args["offset"] = _dropout_seed(generator, q.device)
    if q.is_cuda:
        args["stream"] = torch.cuda.current_stream(q.device).cuda_stream
    d = describe
    if out.numel() == 0 or S == 0:  # nothing to compute: let the core validate and select only
        path, why = ops._ext.forward(d(q), d(k), d(v), d(out), d(lse), None, d(bias), d(bool_mask), d(alibi), **args,
                                     dry_run=True)
        if path == "none":
            raise NotImplementedError(why)
        if out.numel():
            out.zero_(), lse.fill_(float("-inf"))
        return out, lse, path
    path, _ = ops._ext.forward(d(q), d(k), d(v), d(out), d(lse), None, d(bias), d(bool_mask), d(alibi), **args,
                               dry_run=False)
    return out, lse, path


def _call_op(q, k, v, alibi, bias, bool_mask, scale, softcap, diag_offset, wl, wr, dropout_p, generator,
             deterministic=False):
    rng = None
    if dropout_p > 0:
        rng = torch.tensor(_dropout_seed(generator, q.device), dtype=torch.int64)
    return ops.attention_fwd(q, k, v, alibi, bias, bool_mask, float(scale), float(softcap), int(diag_offset),
                             int(wl), int(wr), float(dropout_p), rng, bool(deterministic))


def _pack(out, lse, weights, return_lse, return_weights):
    res = (out,)
    if return_lse:
        res += (lse,)
    if return_weights:
        res += (weights,)
    return res[0] if len(res) == 1 else res


def _reference_fallback(q, k, v, *, scale, softcap, alibi, bias, bool_mask, diag_offset, wl, wr,
                        dropout_p, generator):
    """backend='torch' for flash_attention: the definition evaluated with torch ops in
    float32 (float64 for float64 inputs; differentiable; materialises [B, H, N, S])."""
    B, H, N, _ = q.shape
    S = k.size(2)
    keep = None
    if dropout_p > 0:
        seed, offset = _dropout_seed(generator, q.device)
        keep = dropout_keep_mask(B, H, N, S, dropout_p, seed, offset).to(q.device)
    out, lse, probs = attention_reference(
        q, k, v, scale=scale, softcap=softcap, alibi_slopes=alibi, bias=bias, bool_mask=bool_mask,
        diag_offset=diag_offset, window_left=wl, window_right=wr, dropout_keep=keep, dropout_p=dropout_p,
        compute_dtype=_validate.side_dtype(q))
    return out.to(q.dtype), lse, probs


def flash_attention(q, k, v, scale=None, causal=False, softcap=0.0, dropout_p=0.0, window_size=None,
                    alibi_slopes=None, attn_bias=None, return_lse=False, return_attn_weights=False,
                    backend="auto", *, generator=None, deterministic=None):
    """Exact attention softmax(scale * q k^T + modifiers) v.

    q [B, H, N, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv], H % Hkv == 0 (GQA/MQA without
    expanding K/V). `causal=True` aligns the diagonal bottom-right (query i sees keys
    j <= i + S - N). `window_size=(left, right)`, -1 = unbounded: query i sees
    i + S - N - left <= j <= i + S - N + right. Score order: scale, softcap
    (cap * tanh(s / cap)), ALiBi (-slope * |i + S - N - j|), attn_bias (float, added;
    bool, True = attend), then the masks. Softmax in fp32.

    `deterministic=True` (default: torch.are_deterministic_algorithms_enabled()) makes the
    gradients bit-identical run to run (on CUDA it selects the deterministic kernel).

    Returns out [B, H, N, Dv]; with return_lse also lse [B, H, N] (fp32, natural log);
    with return_attn_weights also the softmax probabilities [B, H, N, S] (before
    dropout, in q's dtype). A row with no visible key gives zeros and lse = -inf.
    """
    fn = "flash_attention"
    _validate.check_qkv(fn, ("q", "k", "v"), q, k, v)
    _validate.check_scale(fn, scale)
    _validate.check_dropout(fn, dropout_p)
    softcap = _validate.check_softcap(fn, softcap)
    wl, wr = _validate.check_window(fn, window_size)
    if causal:
        wr = 0
    B, H, N, D = q.shape
    S = k.size(2)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
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
    common = dict(scale=scale, softcap=softcap, alibi=alibi, bias=bias, bool_mask=bool_mask,
                  diag_offset=S - N, wl=wl, wr=wr, dropout_p=float(dropout_p), generator=generator)

    def fallback():
        return _reference_fallback(q, k, v, **common)

    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    out, lse, weights = _run(fn, q, k, v, **common, return_lse=return_lse, return_weights=return_attn_weights,
                             backend=backend, torch_fallback=fallback, deterministic=bool(deterministic))
    if weights is not None:
        weights = weights.to(q.dtype)
    return _pack(out, lse, weights, return_lse, return_attn_weights)


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
    _validate.check_qkv(fn, ("query", "key", "value"), q, k, v)
    if q.size(1) != k.size(1) and not enable_gqa:
        raise ValueError(f"{fn}: query has {q.size(1)} heads and key {k.size(1)}; pass enable_gqa=True for GQA")
    _validate.check_scale(fn, scale)
    _validate.check_dropout(fn, dropout_p)
    B, H, N, D = q.shape
    S = k.size(2)
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

    def fallback():
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
