"""steelattn: exact flash attention for NVIDIA Hopper GPUs and x86-64 CPUs.

A drop-in for torch.nn.functional.scaled_dot_product_attention plus the
flash_attention API (causal, sliding window, GQA, softcap, ALiBi, bias, dropout,
LSE, attention weights). See README.md.
"""
from ._dispatch import get_dispatch_stats, reset_dispatch_stats
from .api import (alibi_slopes, dropout_keep_mask, flash_attention, flash_attention_alibi,
                  scaled_dot_product_attention)
from .info import get_device_info, get_supported_configs, is_available
from .packed import (flash_attention_kv_packed, flash_attention_qkv_packed, flash_attention_varlen_kv_packed,
                     flash_attention_varlen_qkv_packed)
from .cache import InferenceContext, PagedKVCache
from .kvcache import flash_attention_kvcache, flash_attention_paged, merge_attention_states
from .rope import flash_attention_rope, make_rope_3d_tables
from .serving import (flash_attention_shared_prefix, flash_attention_speculative_verify, flash_attention_splitfuse,
                      make_shared_prefix_cache)
from .sparse import flash_attention_sparse
from .varlen import flash_attention_varlen
from .masks import (make_adaptive_window_mask, make_axial_spatial_mask, make_axial_temporal_mask,
                    make_causal_block_mask, make_causal_segment_mask, make_cross_stream_mask,
                    make_dilated_temporal_mask, make_lcsa_mask, make_reference_frame_mask, make_segment_mask,
                    make_sink_window_mask, make_sliding_window_mask, make_spatial_2d_mask, make_spatial_3d_mask,
                    make_topk_spatial_mask)

__version__ = "0.1.0"

__all__ = [
    "alibi_slopes", "dropout_keep_mask", "flash_attention", "flash_attention_alibi", "get_device_info",
    "get_dispatch_stats", "get_supported_configs", "is_available", "reset_dispatch_stats",
    "scaled_dot_product_attention", "flash_attention_varlen", "flash_attention_qkv_packed",
    "flash_attention_kv_packed", "flash_attention_varlen_qkv_packed", "flash_attention_varlen_kv_packed",
    "flash_attention_sparse", "flash_attention_kvcache", "flash_attention_paged", "merge_attention_states",
    "PagedKVCache", "InferenceContext", "flash_attention_rope", "make_rope_3d_tables", "make_shared_prefix_cache",
    "flash_attention_shared_prefix", "flash_attention_splitfuse", "flash_attention_speculative_verify",
]
__all__ += [  # mask builders (masks.py)
    "make_adaptive_window_mask", "make_axial_spatial_mask", "make_axial_temporal_mask", "make_causal_block_mask",
    "make_causal_segment_mask", "make_cross_stream_mask", "make_dilated_temporal_mask", "make_lcsa_mask",
    "make_reference_frame_mask", "make_segment_mask", "make_sink_window_mask", "make_sliding_window_mask",
    "make_spatial_2d_mask", "make_spatial_3d_mask", "make_topk_spatial_mask",
]
