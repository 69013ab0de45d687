"""steelattn._torch_native (src/python/torch_native.cpp), when it can be used: the eager
calls' torch-facing layer in C++ (allocation, the core call, the training call's autograd
node). Optional and tied to the torch it was built against: loaded only when
torch.__version__ is the one it records; STEELATTN_NATIVE=0 at import switches it off.
Without it, _kernel.py and _autograd.py make the same core calls through _ext."""
from __future__ import annotations

import os

import torch

from . import _dispatch, _ext


def _load():
    """(module bound to this process's core, "") or (None, why not)."""
    if os.environ.get("STEELATTN_NATIVE", "1") == "0":
        return None, "switched off (STEELATTN_NATIVE=0)"
    try:
        from . import _torch_native as mod
    except ImportError as e:
        return None, f"not importable ({e})"
    if mod.torch_version != torch.__version__:
        return None, f"built against torch {mod.torch_version}, running {torch.__version__}"
    mod.bind_core(_ext.core_api)
    _dispatch.add_backward_source(mod.take_backward_counts)
    return mod, ""


native, why_not = _load()
