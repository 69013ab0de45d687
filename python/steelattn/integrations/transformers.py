"""steelattn inside Hugging Face transformers (4.5x and 5.x).

    import steelattn.integrations.transformers as st
    st.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="steelattn")

register() adds "steelattn" to transformers' AttentionInterface (the attention function
below) and AttentionMaskInterface (mask_function: transformers' own SDPA mask builder, so
causal masks, sliding windows and padding are built exactly as for "sdpa", never
dropped). Where that builder can skip the mask (no padding, a causal or windowed pattern
the kernel knows), the call runs mask-free on the fastest kernel with causal / window
from the layer (a sliding window never forces a mask); where it returns a mask (padding,
a static cache's empty slots), the mask goes to the kernel as a boolean attn_bias, except
for a padded batch's prefill or training step (queries = keys): when the mask is exactly
causal (and the layer's window) over each row's contiguous block of real tokens, the batch
runs as one varlen call with two sequences per row, its padding and its tokens (padded_varlen).
Packed sequences (transformers' `cu_seq_lens_q/k` kwargs, as DataCollatorWithFlattening
gives them) run as one varlen call, without a mask. Softcap (Gemma-2), sinks (`s_aux`,
gpt-oss), GQA and dropout are passed through. HF's sliding_window=W is a window of W - 1
keys to the left.
"""
from __future__ import annotations

import collections
import logging
import weakref

import torch

import steelattn

NAME = "steelattn"
_log = logging.getLogger("steelattn.transformers")
_calls = collections.Counter()
_state = {"verbose": False, "seen": set()}
_CHECK_ELEMS = 1 << 24  # mask elements padded_varlen compares at a time
_padded = collections.OrderedDict()  # id(mask) -> (weakref, window, cu or None, version): padded_varlen's findings


def padded_varlen(mask, B, N, window):
    """cu_seqlens (int32 [2B + 2], on the mask's device) that turn a padded batch into one
    varlen call, or None. Row b's real tokens must be one block [p_b, e_b) (left or right
    padding) and the mask, on every real query row, exactly causal (and the window: keys
    within window - 1 to the left, HF's sliding_window) over that block; the padding
    around it becomes its own sequences (their outputs are ignored downstream, as the masked
    rows' are under sdpa). One host sync per mask: transformers passes the same mask object
    to every layer of a forward, so the finding is kept for it (the last 8 masks)."""
    key = id(mask)
    hit = _padded.get(key)
    if hit is not None and hit[0]() is mask and hit[1] == window and hit[3] == mask._version:
        return hit[2]
    m = mask[:, 0, :, :N]
    dev = mask.device
    real = torch.diagonal(m, dim1=1, dim2=2)  # [B, N]: a real token's query sees its own key
    count = real.sum(dim=1)
    start = torch.where(count > 0, real.int().argmax(dim=1), torch.zeros_like(count)).view(B, 1, 1)
    end = start + count.view(B, 1, 1)
    j = torch.arange(N, device=dev).view(1, 1, N)
    in_block = (j >= start) & (j < end)  # [B, 1, N]
    ok = torch.all(real == in_block[:, 0, :]) & torch.all(count > 0)
    # the rows in chunks, so the temporaries stay small beside the mask (the check runs on
    # the device; one read at the end)
    rows_per = max(1, _CHECK_ELEMS // max(1, B * N))
    for r0 in range(0, N, rows_per):
        i = torch.arange(r0, min(N, r0 + rows_per), device=dev).view(1, -1, 1)
        want = in_block & (j <= i)
        if window is not None:
            want &= i - j <= window - 1
        real_rows = (i >= start) & (i < end)  # padding rows are not checked
        ok &= torch.all((m[:, r0:r0 + rows_per] == want) | ~real_rows)
    ok = bool(ok)
    cu = None
    if ok and mask.size(1) == 1:
        s, e = start.view(B), end.view(B)
        base = torch.arange(B, device=mask.device) * N
        # per row: [bN, bN + s) padding before, [bN + s, bN + e) tokens, [bN + e, (b+1)N) padding after
        cuts = torch.stack([base + s, base + e], dim=1).view(-1)
        cu = torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), B * N)]).to(torch.int32)
    _padded[key] = (weakref.ref(mask), window, cu, mask._version)  # weak: the masks are freed as usual
    while len(_padded) > 8:
        _padded.popitem(last=False)
    return cu


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      sliding_window=None, softcap=None, s_aux=None, **kwargs):
    """transformers attention function: query [B, H, N, D], key/value [B, Hkv, S, D]
    (not repeated); returns ([B, N, H, Dv], None)."""
    if kwargs.get("output_attentions"):
        raise NotImplementedError("steelattn does not return attention weights; use attn_implementation='eager'")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    kw = dict(scale=scaling, softcap=float(softcap or 0.0), dropout_p=dropout if module.training else 0.0)
    if s_aux is not None:
        kw["sinks"] = s_aux
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    win = sliding_window if is_causal else None  # HF's window: sliding_window - 1 keys to the left
    window = (int(win) - 1, 0) if win is not None else None
    packed = cu_q is not None and cu_k is not None and query.size(0) == 1 and not kw["dropout_p"]
    if packed:  # sequences packed into one row (DataCollatorWithFlattening): varlen, no mask
        how = "packed (varlen)"
        kw.update(causal=bool(is_causal), window_size=window)
    elif (attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.dim() == 4
          and query.size(2) == key.size(2) and attention_mask.size(-2) == query.size(2) and attention_mask.size(-1) >= key.size(2)
          and not kw["dropout_p"] and not torch.compiler.is_compiling()
          and not (query.is_cuda and torch.cuda.is_current_stream_capturing())  # padded_varlen reads the mask
          and (cu := padded_varlen(attention_mask, query.size(0), query.size(2), win)) is not None):
        how = "padded (varlen)"
    elif attention_mask is None:
        how = "mask-free"
        kw.update(causal=bool(is_causal), window_size=window)
    else:
        how = "mask tensor"
        mask = attention_mask
        if mask.dtype != torch.bool:  # an additive float mask (other mask builders): 0 keeps, -inf hides
            mask = mask > torch.finfo(mask.dtype).min / 2
        kw["attn_bias"] = mask[..., : key.shape[2]]
    _calls[how] += 1
    if _state["verbose"]:
        sig = (how, tuple(query.shape[1:2]) + tuple(key.shape[1:2]), query.dtype, str(query.device), "sinks" in kw,
               kw["softcap"] > 0, kw.get("window_size") is not None)
        if sig not in _state["seen"]:
            _state["seen"].add(sig)
            _log.warning("steelattn attention: %s, H %d / Hkv %d, %s on %s, sinks %s, softcap %s, window %s", how,
                         query.shape[1], key.shape[1], query.dtype, query.device, *sig[4:])
    if packed:
        out = steelattn.flash_attention_varlen(query, key, value, cu_q.to(torch.int32), cu_k.to(torch.int32),
                                               kwargs.get("max_length_q"), kwargs.get("max_length_k"), **kw)
    elif how == "padded (varlen)":
        B, H, N, _ = query.shape
        kw.update(causal=True, window_size=window)
        tok = [t.transpose(1, 2).reshape(B * N, t.size(1), t.size(3)) for t in (query, key, value)]
        out = steelattn.flash_attention_varlen(*tok, cu, cu, **kw)
        return out.view(B, N, H, out.size(-1)), None
    else:
        out = steelattn.flash_attention(query, key, value, **kw)
    return out.transpose(1, 2).contiguous(), None


def register(verbose=False):
    """Makes attn_implementation="steelattn" available (idempotent)."""
    from transformers import AttentionInterface
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # transformers < 4.53: the attention function alone (masks built as for sdpa)
        AttentionMaskInterface = sdpa_mask = None
    AttentionInterface.register(NAME, attention_forward)
    if AttentionMaskInterface is not None:
        _state["sdpa_mask"] = sdpa_mask
        AttentionMaskInterface.register(NAME, mask_function)
    _state["verbose"] = bool(verbose)


def mask_function(*args, **kwargs):
    """transformers' SDPA mask builder with two changes for our kernels.

    - A sliding window needs no mask: the layer passes `sliding_window` to
      attention_forward and the kernel applies it, so the builder is not told about it when
      the mask can be skipped (Gemma-2 / gpt-oss sliding layers then run mask-free on the
      Hopper kernels instead of with a dense boolean mask on the generic one).
    - The mask is skipped only when top-left and bottom-right alignment agree (one query,
      or as many queries as keys). SDPA also skips it for a prefill into a static cache
      (more key slots than queries, the future ones empty), relying on torch's top-left
      causal alignment; our causal is bottom-right, so that case gets its mask.

    transformers passes the arguments by name (4.5x gives cache_position, 5.x q_length);
    plain dict work, no inspect, so torch.compile traces it inside a compiled forward.
    """
    sdpa_mask = _state["sdpa_mask"]
    if args or "kv_length" not in kwargs:  # not a call shape we know: the builder unchanged
        return sdpa_mask(*args, **kwargs)
    q_length = kwargs["q_length"] if "q_length" in kwargs else kwargs["cache_position"].shape[0]
    skip = bool(kwargs.get("allow_is_causal_skip", True)) and (q_length == 1 or q_length == kwargs["kv_length"])
    kwargs["allow_is_causal_skip"] = skip
    if skip:
        kwargs["local_size"] = None
    return sdpa_mask(**kwargs)


def unregister():
    """Removes "steelattn" from transformers' interfaces."""
    from transformers import AttentionInterface
    for iface in (AttentionInterface, _mask_interface()):
        if iface is not None:
            for mapping in (getattr(iface, "_global_mapping", {}),):
                mapping.pop(NAME, None)


def _mask_interface():
    try:
        from transformers.masking_utils import AttentionMaskInterface
        return AttentionMaskInterface
    except ImportError:
        return None


def get_stats():
    """{"calls": {"mask-free": n, "mask tensor": n, "packed (varlen)": n, "padded (varlen)": n}, "dispatch":
    steelattn.get_dispatch_stats()}: how the layers called in, and which kernels ran (with
    every demotion and its reason)."""
    return {"calls": dict(_calls), "dispatch": steelattn.get_dispatch_stats()}


def reset_stats():
    _calls.clear()
    steelattn.reset_dispatch_stats()


def check_model_compatibility(config):
    """Per layer: its attention type, and the path a call without padding takes, from the
    config alone (head dim, GQA, softcap, sinks, sliding window)."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    softcap = getattr(config, "attn_logit_softcapping", None)
    window = getattr(config, "sliding_window", None)
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None) or ["full_attention"] * n
    sinks = getattr(config, "model_type", "") == "gpt_oss"
    cuda = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
    layers = []
    for i, t in enumerate(types):
        notes = []
        if softcap:
            notes.append(f"softcap {softcap}")
        if t == "sliding_attention" and window:
            notes.append(f"window ({window - 1}, 0)")
        if sinks:
            notes.append("sinks (rescale by lse)")
        if cuda:
            kernel = ("cuda_sm90" if 64 <= head_dim <= 256 and head_dim % 8 == 0 else "cuda_generic")
            # the split-KV kernel takes up to 16 query rows per KV head (64 at small batch x KV heads)
            max_tokens = 16 // (heads // kv)
            if head_dim <= 256 and head_dim % 8 == 0 and max_tokens >= 1:
                kernel += f" (prefill, training); cuda_decode for steps of up to {max_tokens} tokens"
            path = f"{kernel}; mask-free without padding, one varlen call for a padded prefill or training " \
                   "step, a boolean attn_bias (generic kernel) for padded decode steps or a static cache"
        else:
            path = "cpu; mask-free without padding, one varlen call for a padded prefill or training step, a " \
                   "boolean attn_bias for padded decode steps or a static cache"
        layers.append({"layer": i, "type": t, "heads": heads, "kv_heads": kv, "head_dim": head_dim,
                       "path": path, "notes": notes})
    return layers
