"""scaled_dot_product_attention drop-in: the same function as torch's own."""
import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, assert_close, randn

import steelattn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def torch_sdpa(q, k, v, **kw):
    """torch's SDPA evaluated in float64 on CPU (its math path), as the yardstick."""
    kw = {k2: (v2.cpu() if isinstance(v2, torch.Tensor) else v2) for k2, v2 in kw.items()}
    if isinstance(kw.get("attn_mask"), torch.Tensor) and kw["attn_mask"].is_floating_point():
        kw["attn_mask"] = kw["attn_mask"].double()
    return F.scaled_dot_product_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,S", [(1, 1), (7, 7), (17, 40), (40, 17), (130, 129)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_torch(device, dtype, N, S, is_causal, rng):
    if is_causal and N > S:
        pytest.skip("top-left causal with N > S leaves rows fully masked; torch gives NaN there, we give 0")
    q = randn(2, 3, N, 64, dtype=dtype, device=device, generator=rng)
    k = randn(2, 3, S, 64, dtype=dtype, device=device, generator=rng)
    v = randn(2, 3, S, 48, dtype=dtype, device=device, generator=rng)
    out = steelattn.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    assert out.dtype == dtype and out.shape == (2, 3, N, 48)
    assert_close(out, torch_sdpa(q, k, v, is_causal=is_causal), dtype)
    # and against torch's own kernel in the input dtype, on CPU
    if device == "cpu":
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        assert_close(out, ref.double(), dtype, tol=2 * TOL[dtype])


def test_top_left_causal_alignment(device, rng):
    """torch aligns the causal diagonal top-left: query i sees keys j <= i even when N != S."""
    q = randn(1, 2, 5, 32, dtype=torch.float32, device=device, generator=rng)
    k = randn(1, 2, 9, 32, dtype=torch.float32, device=device, generator=rng)
    out = steelattn.scaled_dot_product_attention(q, k, k, is_causal=True)
    assert_close(out, torch_sdpa(q, k, k, is_causal=True), torch.float32)
    # flash_attention's causal is bottom-right instead: a different function here
    fa = steelattn.flash_attention(q, k, k, causal=True)
    assert not torch.allclose(out, fa)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_shape", [(1, 1, 33, 47), (33, 47), (2, 1, 1, 47), (2, 4, 33, 47)])
def test_bool_mask(device, dtype, mask_shape, rng):
    q = randn(2, 4, 33, 64, dtype=dtype, device=device, generator=rng)
    k = randn(2, 4, 47, 64, dtype=dtype, device=device, generator=rng)
    v = randn(2, 4, 47, 64, dtype=dtype, device=device, generator=rng)
    mask = torch.rand(*mask_shape, generator=rng) > 0.4
    mask[..., 0] = True  # torch gives NaN for rows that see nothing; keep every row alive
    mask = mask.to(device)
    out = steelattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert_close(out, torch_sdpa(q, k, v, attn_mask=mask), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_float_mask(device, dtype, rng):
    q = randn(1, 4, 33, 64, dtype=dtype, device=device, generator=rng)
    k = randn(1, 4, 47, 64, dtype=dtype, device=device, generator=rng)
    v = randn(1, 4, 47, 64, dtype=dtype, device=device, generator=rng)
    mask = randn(1, 4, 33, 47, dtype=dtype, device=device, generator=rng)
    out = steelattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert_close(out, torch_sdpa(q, k, v, attn_mask=mask.float()), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G", [2, 4, 8])
def test_enable_gqa(device, dtype, G, rng):
    q = randn(2, 2 * G, 50, 64, dtype=dtype, device=device, generator=rng)
    k = randn(2, 2, 60, 64, dtype=dtype, device=device, generator=rng)
    v = randn(2, 2, 60, 64, dtype=dtype, device=device, generator=rng)
    out = steelattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert_close(out, torch_sdpa(q, k, v, is_causal=True, enable_gqa=True), dtype)
    with pytest.raises(ValueError, match="enable_gqa"):
        steelattn.scaled_dot_product_attention(q, k, v)


def test_scale_and_3d_and_5d(device, rng):
    q = randn(3, 20, 32, dtype=torch.float32, device=device, generator=rng)
    k = randn(3, 25, 32, dtype=torch.float32, device=device, generator=rng)
    out = steelattn.scaled_dot_product_attention(q, k, k, scale=0.3)
    assert out.shape == (3, 20, 32)
    assert_close(out, torch_sdpa(q, k, k, scale=0.3), torch.float32)
    q5 = randn(2, 3, 4, 20, 32, dtype=torch.float32, device=device, generator=rng)
    k5 = randn(2, 3, 4, 25, 32, dtype=torch.float32, device=device, generator=rng)
    out5 = steelattn.scaled_dot_product_attention(q5, k5, k5, is_causal=True)
    assert out5.shape == (2, 3, 4, 20, 32)
    assert_close(out5, torch_sdpa(q5, k5, k5, is_causal=True), torch.float32)


def test_non_contiguous_views(device, rng):
    x = randn(2, 40, 6, 64, dtype=torch.bfloat16, device=device, generator=rng)  # [B, N, H, D]
    q = k = v = x.transpose(1, 2)
    out = steelattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close(out, torch_sdpa(q, k, v, is_causal=True), torch.bfloat16)
    assert "torch" not in steelattn.get_dispatch_stats()["forward"]


def test_backend_torch_is_torch(device, rng):
    q = randn(1, 2, 10, 16, dtype=torch.float32, device=device, generator=rng)
    out = steelattn.scaled_dot_product_attention(q, q, q, backend="torch")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q), rtol=0, atol=0)
    assert steelattn.get_dispatch_stats() == {"forward": {"torch": 1}, "backward": {}, "demotions": {}}
