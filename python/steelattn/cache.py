"""KV-cache containers over flash_attention_kvcache: PagedKVCache (a page pool shared by
sequences that come and go) and InferenceContext (one preallocated dense cache for a
batch decoded in lockstep). Pools and caches are torch tensors written in place; the
page bookkeeping (free list, pages per sequence, lengths) is host-side Python, and the
block table and lengths reach the kernels as int32 device tensors.
"""
from __future__ import annotations

import math

import torch

from .kvcache import flash_attention_kvcache


class PagedKVCache:
    """A pool of `num_pages` pages of `page_size` tokens, k_pages / v_pages
    [num_pages, page_size, Hkv, D] (Dv for v), handed to sequences as they grow.

    >>> cache = PagedKVCache(num_pages=64, page_size=16, Hkv=2, D=64, dtype=torch.float32, device="cpu")
    >>> s = cache.add_sequence()
    >>> q = torch.randn(1, 4, 3, 64); k = torch.randn(1, 2, 3, 64); v = torch.randn(1, 2, 3, 64)
    >>> cache.attend(q, [s], k_new=k, v_new=v).shape     # prefill 3 tokens, attend causally
    torch.Size([1, 4, 3, 64])
    >>> cache.seq_len(s)
    3
    """

    def __init__(self, num_pages, page_size, Hkv, D, dtype, device, Dv=None):
        for name, x in (("num_pages", num_pages), ("page_size", page_size), ("Hkv", Hkv), ("D", D)):
            if not isinstance(x, int) or x < 1:
                raise ValueError(f"PagedKVCache: {name} must be a positive int, got {x!r}")
        self.page_size, self.device = page_size, torch.device(device)
        self.k_pages = torch.zeros(num_pages, page_size, Hkv, D, dtype=dtype, device=device)
        self.v_pages = torch.zeros(num_pages, page_size, Hkv, Dv or D, dtype=dtype, device=device)
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low pages first
        self._pages = {}  # sequence id -> [page ids]
        self._len = {}    # sequence id -> tokens stored
        self._next_id = 0

    @property
    def free_pages(self):
        return len(self._free)

    def add_sequence(self):
        """A new empty sequence; returns its id."""
        sid = self._next_id
        self._next_id += 1
        self._pages[sid], self._len[sid] = [], 0
        return sid

    def free(self, seq_id):
        """Returns the sequence's pages to the pool."""
        self._check(seq_id)
        self._free.extend(reversed(self._pages.pop(seq_id)))
        del self._len[seq_id]

    def seq_len(self, seq_id):
        self._check(seq_id)
        return self._len[seq_id]

    def block_table(self, seq_ids):
        """int32 [len(seq_ids), max pages] on the pool's device, -1 past each sequence's pages."""
        width = max([len(self._pages[s]) for s in seq_ids] + [1])
        rows = [self._pages[s] + [-1] * (width - len(self._pages[s])) for s in seq_ids]
        return torch.tensor(rows, dtype=torch.int32, device=self.device)

    def seq_lens(self, seq_ids):
        return torch.tensor([self._len[s] for s in seq_ids], dtype=torch.int32, device=self.device)

    def reserve(self, seq_ids, n_new):
        """Gives each sequence pages for n_new more tokens; raises before taking any page
        when the pool is short."""
        for s in seq_ids:
            self._check(s)
        need = [max(0, math.ceil((self._len[s] + n_new) / self.page_size) - len(self._pages[s])) for s in seq_ids]
        if sum(need) > len(self._free):
            raise RuntimeError(f"PagedKVCache: {sum(need)} pages needed, {len(self._free)} free (num_pages)")
        for s, n in zip(seq_ids, need):
            self._pages[s] += [self._free.pop() for _ in range(n)]

    def attend(self, q, seq_ids, k_new=None, v_new=None, **kwargs):
        """q [B, H, Nq, D] for the sequences `seq_ids` (B of them, distinct): appends k_new /
        v_new ([B, Hkv, Nnew, D]) to each, then attends (flash_attention_kvcache keywords:
        causal, window_size, softcap, rotary tables, return_lse, ...)."""
        seq_ids = list(seq_ids)
        if len(set(seq_ids)) != len(seq_ids) or q.size(0) != len(seq_ids):
            raise ValueError("PagedKVCache.attend: seq_ids must be distinct, one per batch entry of q")
        n_new = 0 if k_new is None else k_new.size(2)
        self.reserve(seq_ids, n_new)
        lens = self.seq_lens(seq_ids)
        out = flash_attention_kvcache(q, self.k_pages, self.v_pages, k_new=k_new, v_new=v_new, cache_seqlens=lens,
                                      block_table=self.block_table(seq_ids), **kwargs)
        for s in seq_ids:
            self._len[s] += n_new
        return out

    def _check(self, seq_id):
        if seq_id not in self._pages:
            raise KeyError(f"PagedKVCache: unknown sequence id {seq_id!r}")


class InferenceContext:
    """A dense cache k_cache / v_cache [B, Hkv, max_seq_len, D] for a batch that decodes in
    lockstep: prefill() writes the prompt's keys and attends causally, step() appends the
    new tokens and attends, reset() empties it (no concatenation per step). As a context
    manager it resets on exit.

    >>> ctx = InferenceContext(B=1, Hkv=2, D=64, max_seq_len=128, dtype=torch.float32, device="cpu")
    >>> out = ctx.prefill(torch.randn(1, 4, 10, 64), torch.randn(1, 2, 10, 64), torch.randn(1, 2, 10, 64))
    >>> out = ctx.step(torch.randn(1, 4, 1, 64), torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64))
    >>> ctx.seqlen
    11
    """

    def __init__(self, B, Hkv, D, max_seq_len, dtype, device, Dv=None):
        for name, x in (("B", B), ("Hkv", Hkv), ("D", D), ("max_seq_len", max_seq_len)):
            if not isinstance(x, int) or x < 1:
                raise ValueError(f"InferenceContext: {name} must be a positive int, got {x!r}")
        self.k_cache = torch.zeros(B, Hkv, max_seq_len, D, dtype=dtype, device=device)
        self.v_cache = torch.zeros(B, Hkv, max_seq_len, Dv or D, dtype=dtype, device=device)
        self.seqlen = 0

    def prefill(self, q, k, v, **kwargs):
        """Resets, writes k/v [B, Hkv, N, D] at positions 0..N-1 and attends causally."""
        self.reset()
        return self.step(q, k, v, **kwargs)

    def step(self, q, k_new, v_new, **kwargs):
        """Appends k_new/v_new at the current length and attends (flash_attention_kvcache keywords)."""
        out = flash_attention_kvcache(q, self.k_cache, self.v_cache, k_new=k_new, v_new=v_new,
                                      cache_seqlens=self.seqlen, **kwargs)
        self.seqlen += k_new.size(2)
        return out

    def reset(self):
        self.seqlen = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.reset()
        return False
