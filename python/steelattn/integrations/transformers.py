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
a static cache's empty slots), the mask goes to the kernel as a boolean attn_bias.
Packed sequences (transformers' `cu_seq_lens_q/k` kwargs, as DataCollatorWithFlattening
gives them) run as one varlen call, without a mask. Softcap (Gemma-2), sinks (`s_aux`,
gpt-oss), GQA and dropout are passed through. HF's sliding_window=W is a window of W - 1
keys to the left.
"""
from __future__ import annotations

import collections
import logging

import torch

import steelattn

NAME = "steelattn"
_log = logging.getLogger("steelattn.transformers")
_calls = collections.Counter()
_state = {"verbose": False, "seen": set()}


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
    packed = cu_q is not None and cu_k is not None and query.size(0) == 1 and not kw["dropout_p"]
    if packed:  # sequences packed into one row (DataCollatorWithFlattening): varlen, no mask
        how = "packed (varlen)"
        kw["causal"] = bool(is_causal)
        if sliding_window is not None and is_causal:
            kw["window_size"] = (int(sliding_window) - 1, 0)
    elif attention_mask is None:
        how = "mask-free"
        kw["causal"] = bool(is_causal)
        if sliding_window is not None and is_causal:
            kw["window_size"] = (int(sliding_window) - 1, 0)
    else:
        how = "mask tensor"
        mask = attention_mask
        if mask.dtype != torch.bool:  # an additive float mask (other mask builders): 0 keeps, -inf hides
            mask = mask > torch.finfo(mask.dtype).min / 2
        kw["attn_bias"] = mask[..., : key.shape[2]]
    _calls[how] += 1
    if _state["verbose"]:
        sig = (how, tuple(query.shape[1:2]) + tuple(key.shape[1:2]), query.dtype, str(query.device), "sinks" in kw,
               kw["softcap"] > 0, "window_size" in kw)
        if sig not in _state["seen"]:
            _state["seen"].add(sig)
            _log.warning("steelattn attention: %s, H %d / Hkv %d, %s on %s, sinks %s, softcap %s, window %s", how,
                         query.shape[1], key.shape[1], query.dtype, query.device, *sig[4:])
    if packed:
        out = steelattn.flash_attention_varlen(query, key, value, cu_q.to(torch.int32), cu_k.to(torch.int32),
                                               kwargs.get("max_length_q"), kwargs.get("max_length_k"), **kw)
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
    """{"calls": {"mask-free": n, "mask tensor": n, "packed (varlen)": n}, "dispatch":
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
            max_tokens = 16 // (heads // kv)  # the split-KV kernel takes up to 16 query rows per KV head
            if head_dim <= 256 and head_dim % 8 == 0 and max_tokens >= 1:
                kernel += f" (prefill, training); cuda_decode for steps of up to {max_tokens} tokens"
            path = f"{kernel}; mask-free without padding, a boolean attn_bias (generic kernel) with padding " \
                   "or a static cache"
        else:
            path = "cpu; mask-free without padding, a boolean attn_bias with padding or a static cache"
        layers.append({"layer": i, "type": t, "heads": heads, "kv_heads": kv, "head_dim": head_dim,
                       "path": path, "notes": notes})
    return layers
