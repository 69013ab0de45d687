"""What a call carries beyond the dense [B, H, N, D] one (kept apart from _kernel.py so
that the API modules import without the compiled extension)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Extra(NamedTuple):
    """A varlen call's cu_seqlens (q/k/v/out then packed [1, H, total, D] views), a
    block mask with its block sizes, or a KV cache's used lengths per batch entry
    (seqlens_k, int32 [B]), read through a block table (k/v then page pools viewed
    [num_pages, Hkv, page_size, D]) or a cache slot per entry (kv_batch_idx), with the
    decode kernel's key splits (num_splits); passed to the extension after the dense
    arguments."""
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    block_mask: Optional[torch.Tensor] = None
    block_q: int = 0
    block_k: int = 0
    seqlens_k: Optional[torch.Tensor] = None
    block_table: Optional[torch.Tensor] = None
    kv_batch_idx: Optional[torch.Tensor] = None
    num_splits: int = 0  # KV-cache decode: the CUDA kernel's key splits (0: its choice)
