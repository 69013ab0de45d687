"""Dispatch bookkeeping: which path ran each forward and each backward, and every demotion.

The decisions are made in C++ (steelattn::choose_forward_path / choose_backward_path);
the extension returns the path it ran and, when a faster kernel refused the call, that
kernel's reason. This module only counts what it is told.
"""
from __future__ import annotations

import threading
from collections import Counter

_lock = threading.Lock()
_forward: Counter = Counter()
_backward: Counter = Counter()
_demotions: Counter = Counter()
_backward_sources = []  # callables returning ({path: n}, {demotion: n}) counted elsewhere, then reset


def add_backward_source(take) -> None:
    """Backwards counted outside Python (the C++ autograd node, _autograd.py), merged on read."""
    _backward_sources.append(take)


def _drain() -> None:  # under _lock
    for take in _backward_sources:
        paths, demotions = take()
        _backward.update(paths)
        _demotions.update({"backward " + d: n for d, n in demotions.items()})


def record_forward(path: str, demoted: str = "") -> None:
    with _lock:
        _forward[path] += 1
        if demoted:
            _demotions["forward " + demoted] += 1


def record_backward(path: str, demoted: str = "") -> None:
    with _lock:
        _backward[path] += 1
        if demoted:
            _demotions["backward " + demoted] += 1


def record_torch(reason: str | None, grad: bool) -> None:
    """A call served by torch: its forward, and its backward when it needs gradients.
    `reason` is None when the caller asked for torch (backend='torch'): not a demotion."""
    with _lock:
        _forward["torch"] += 1
        if grad:
            _backward["torch"] += 1
        if reason:
            _demotions["steelattn -> torch: " + reason] += 1


def record_note(what: str) -> None:
    """A call that a steelattn kernel serves in another form than asked (e.g. block-sparse
    as dense calls with a token mask): listed with the demotions; the calls it makes are
    counted where they run."""
    with _lock:
        _demotions[what] += 1


def get_dispatch_stats() -> dict:
    """Counts since the last reset:

    {"forward": {path: calls}, "backward": {path: calls},
     "demotions": {"forward cuda_sm90 -> cuda_generic: <why>": n,
                   "backward cuda_sm90 -> cuda_generic: <why>": n,
                   "steelattn -> torch: <why>": n}}

    Paths are cpu_avx512, cpu_avx2, cpu_scalar, cuda_sm90, cuda_generic, cuda_decode and torch.
    A steelattn backward is counted when it runs; a call that goes to torch counts a
    torch forward, and a torch backward when it needs gradients."""
    with _lock:
        _drain()
        return {"forward": dict(_forward), "backward": dict(_backward), "demotions": dict(_demotions)}


def reset_dispatch_stats() -> None:
    with _lock:
        _drain()
        _forward.clear()
        _backward.clear()
        _demotions.clear()
