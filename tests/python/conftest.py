"""Shared fixtures: the device parameter (CUDA cases skip cleanly without a GPU),
per-dtype tolerances, and output poisoning."""
import os

import pytest
import torch

import steelattn
import steelattn._kernel

# Norm-relative error bounds ||out - ref|| / ||ref|| against the float64 reference.
# fp32 accumulates in fp32 (errors ~1e-7 measured); fp16/bf16 are bounded by the
# rounding of inputs, P and the output (bf16 has 8 mantissa bits: ~2e-3 measured).
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.2e-2}
LSE_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True, scope="session")
def deterministic_run():
    """STEELATTN_TEST_DETERMINISTIC=1 runs the suite under torch.use_deterministic_algorithms,
    so every gradient case takes the deterministic kernels (scripts/gpu-check dettest)."""
    if os.environ.get("STEELATTN_TEST_DETERMINISTIC") == "1":
        torch.use_deterministic_algorithms(True, warn_only=True)
    yield


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(steelattn._kernel, "debug_poison", True)
    steelattn.reset_dispatch_stats()
    yield


@pytest.fixture
def rng():
    """A fresh generator per test: new random inputs every run, reproducible on failure (g.initial_seed())."""
    seed = torch.randint(0, 2**31 - 1, ()).item()
    g = torch.Generator().manual_seed(seed)
    return g


def randn(*shape, dtype, device, generator):
    return torch.randn(*shape, generator=generator, dtype=torch.float32).to(dtype=dtype, device=device)


def assert_close(out, ref, dtype, what="out", tol=None):
    from steelattn.reference import relative_error

    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten or NaN)"
    err = relative_error(out.cpu(), ref.cpu())
    bound = tol if tol is not None else TOL[dtype]
    assert err < bound, f"{what}: relative error {err:.3g} >= {bound:.3g}"


def assert_lse_close(lse, ref, dtype):
    from steelattn.reference import relative_error

    lse, ref = lse.cpu(), ref.cpu()
    assert not torch.isnan(lse).any(), "lse: NaN"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref)), "lse: -inf rows differ from the reference"
    fin = torch.isfinite(ref)
    if fin.any():
        err = relative_error(lse[fin], ref[fin])
        assert err < LSE_TOL[dtype], f"lse: relative error {err:.3g}"
