"""Describe torch tensors to the C++ core as (ptr, dtype, device, index, shape, strides).

The extension takes plain tuples instead of DLPack capsules (see src/python/ext.cpp):
torch refuses to export tensors that require grad, and the caller keeps every tensor
alive for the duration of the call anyway.
"""
from __future__ import annotations

import torch

# Codes of steelattn::DType (include/steelattn/steelattn.h).
DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
    torch.bool: 4,
    torch.int32: 5,
    torch.int64: 6,
    torch.uint8: 7,  # workspaces
}
# Codes of steelattn::Device.
DEVICE_CODES = {"cpu": 1, "cuda": 2}


def describe(t: torch.Tensor | None):
    if t is None:
        return None
    if t.dtype not in DTYPE_CODES:
        raise TypeError(f"unsupported dtype {t.dtype}")
    dev = t.device
    if dev.type not in DEVICE_CODES:
        raise ValueError(f"unsupported device {dev}")
    return (
        t.data_ptr(),
        DTYPE_CODES[t.dtype],
        DEVICE_CODES[dev.type],
        dev.index or 0,
        tuple(t.shape),
        tuple(t.stride()),
    )


def fake(shape, dtype=torch.bfloat16, device="cuda", index=0):
    """A description with a dummy pointer, for asking the core which kernel *would* run."""
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return (64, DTYPE_CODES[dtype], DEVICE_CODES[device], index, tuple(shape), tuple(reversed(strides)))
