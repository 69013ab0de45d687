"""Kernel selection bookkeeping: which path served each call, and why a call fell back.

The decision itself is made in C++ (steelattn::select_forward_path); this module only
asks it, counts the answers, and keeps the reasons for anything routed to torch.
"""
from __future__ import annotations

import threading
from collections import Counter

_lock = threading.Lock()
_paths: Counter = Counter()
_fallback_reasons: Counter = Counter()


def record(path: str, reason: str | None = None) -> None:
    with _lock:
        _paths[path] += 1
        if reason:
            _fallback_reasons[reason] += 1


def get_dispatch_stats() -> dict:
    """Calls per kernel path since the last reset, e.g. {"cpu_avx512": 3, "torch": 1},
    plus "fallback_reasons": {reason: count} for calls that went to torch."""
    with _lock:
        stats = dict(_paths)
        stats["fallback_reasons"] = dict(_fallback_reasons)
        return stats


def reset_dispatch_stats() -> None:
    with _lock:
        _paths.clear()
        _fallback_reasons.clear()
