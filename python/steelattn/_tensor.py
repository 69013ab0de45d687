"""The codes the C++ core uses for dtypes and devices, and descriptions of tensors that
do not exist.

The extension reads torch tensors itself (src/python/ext.cpp); it also accepts a
(ptr, dtype, device, index, shape, strides) tuple, which get_supported_configs() uses
to ask which kernel a call *would* take without allocating anything.
"""
from __future__ import annotations

import torch

# Codes of steelattn::DType (include/steelattn/steelattn.h), in code order.
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


def fake(shape, dtype=torch.bfloat16, device="cuda", index=0, strides=None):
    """A contiguous (or `strides`) description with a dummy, 16-byte aligned pointer."""
    if strides is None:
        acc, rev = 1, []
        for s in reversed(shape):
            rev.append(acc)
            acc *= s
        strides = tuple(reversed(rev))
    return (64, DTYPE_CODES[dtype], DEVICE_CODES[device], index, tuple(shape), tuple(strides))
