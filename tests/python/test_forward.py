"""flash_attention forward against the float64 reference: dtypes, odd shapes, every
feature and their combinations. Runs on CPU in CI and on CUDA on the GPU machine."""
import math

import pytest
import torch
from conftest import assert_close, assert_lse_close, randn

import steelattn
from steelattn.reference import attention_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_qkv(B, H, Hkv, N, S, D, Dv, dtype, device, g, layout="bhnd"):
    if layout == "bnhd":  # [B, N, H, D] storage viewed as [B, H, N, D], as after a projection
        q = randn(B, N, H, D, dtype=dtype, device=device, generator=g).transpose(1, 2)
        k = randn(B, S, Hkv, D, dtype=dtype, device=device, generator=g).transpose(1, 2)
        v = randn(B, S, Hkv, Dv, dtype=dtype, device=device, generator=g).transpose(1, 2)
    else:
        q = randn(B, H, N, D, dtype=dtype, device=device, generator=g)
        k = randn(B, Hkv, S, D, dtype=dtype, device=device, generator=g)
        v = randn(B, Hkv, S, Dv, dtype=dtype, device=device, generator=g)
    return q, k, v


def check(q, k, v, *, causal=False, window=None, softcap=0.0, alibi=None, bias=None, scale=None,
          return_lse=True):
    N, S = q.size(2), k.size(2)
    out, lse = steelattn.flash_attention(q, k, v, scale=scale, causal=causal, window_size=window, softcap=softcap,
                                         alibi_slopes=alibi, attn_bias=bias, return_lse=True, backend="steel")
    wl, wr = window if window is not None else (-1, -1)
    if causal:
        wr = 0
    bool_mask = bias if bias is not None and bias.dtype == torch.bool else None
    fbias = bias if bias is not None and bias.dtype != torch.bool else None
    ref, ref_lse, _ = attention_reference(q.cpu(), k.cpu(), v.cpu(), scale=scale, softcap=softcap,
                                          alibi_slopes=None if alibi is None else alibi.cpu(),
                                          bias=None if fbias is None else fbias.cpu(),
                                          bool_mask=None if bool_mask is None else bool_mask.cpu(),
                                          diag_offset=S - N, window_left=wl, window_right=wr)
    assert out.shape == ref.shape and out.dtype == q.dtype and out.device == q.device
    assert_close(out, ref, q.dtype)
    assert_lse_close(lse, ref_lse, q.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,S", [(1, 1), (1, 17), (7, 7), (17, 1000), (1000, 17), (130, 130), (257, 4097)])
@pytest.mark.parametrize("causal", [False, True])
def test_shapes(device, dtype, N, S, causal, rng):
    q, k, v = make_qkv(1, 2, 2, N, S, 64, 64, dtype, device, rng)
    check(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [1, 7, 32, 64, 80, 96, 128, 160, 192, 256, 512])
def test_head_dims(device, dtype, D, rng):
    q, k, v = make_qkv(2, 2, 1, 33, 45, D, D, dtype, device, rng)
    check(q, k, v, causal=D % 2 == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D,Dv", [(64, 32), (128, 64), (80, 160), (13, 5), (256, 512)])
def test_dv_ne_d(device, dtype, D, Dv, rng):
    q, k, v = make_qkv(1, 4, 2, 65, 70, D, Dv, dtype, device, rng)
    check(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("N", [1, 19, 200])
def test_gqa(device, dtype, G, N, rng):
    q, k, v = make_qkv(2, 2 * G, 2, N, 150, 64, 64, dtype, device, rng)
    check(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [(0, 0), (16, 0), (100, 5), (-1, 3), (7, -1), (300, 300)])
@pytest.mark.parametrize("N,S", [(200, 200), (50, 300), (300, 50)])
def test_window(device, dtype, window, N, S, rng):
    q, k, v = make_qkv(1, 2, 1, N, S, 64, 64, dtype, device, rng)
    check(q, k, v, window=window)


@pytest.mark.parametrize("dtype", DTYPES)
def test_window_with_causal(device, dtype, rng):
    q, k, v = make_qkv(1, 2, 2, 300, 300, 64, 64, dtype, device, rng)
    check(q, k, v, causal=True, window=(64, 10))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cap", [1.0, 30.0])
def test_softcap(device, dtype, cap, rng):
    q, k, v = make_qkv(1, 4, 2, 100, 120, 64, 64, dtype, device, rng)
    check(q, k, v, softcap=cap, scale=0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_batch", [False, True])
def test_alibi(device, dtype, per_batch, rng):
    B, H = 2, 4
    q, k, v = make_qkv(B, H, 2, 90, 130, 64, 64, dtype, device, rng)
    slopes = steelattn.alibi_slopes(H)
    if per_batch:
        slopes = torch.stack([slopes, slopes * 0.5])
    check(q, k, v, causal=True, alibi=slopes.to(device))


def test_flash_attention_alibi_entry(device, rng):
    q, k, v = make_qkv(1, 8, 8, 40, 40, 32, 32, torch.float32, device, rng)
    slopes = steelattn.alibi_slopes(8).to(device)
    a = steelattn.flash_attention_alibi(q, k, v, slopes, causal=True)
    b = steelattn.flash_attention(q, k, v, causal=True, alibi_slopes=slopes)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias_shape", ["full", "N_S", "1_H_1_S", "B_1_N_1"])
def test_float_bias(device, dtype, bias_shape, rng):
    B, H, N, S = 2, 4, 37, 53
    q, k, v = make_qkv(B, H, 2, N, S, 64, 64, dtype, device, rng)
    shape = {"full": (B, H, N, S), "N_S": (N, S), "1_H_1_S": (1, H, 1, S), "B_1_N_1": (B, 1, N, 1)}[bias_shape]
    bias = randn(*shape, dtype=torch.float32, device=device, generator=rng).to(dtype)
    check(q, k, v, bias=bias)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bool_bias_with_fully_masked_rows(device, dtype, rng):
    B, H, N, S = 1, 2, 30, 40
    q, k, v = make_qkv(B, H, 1, N, S, 64, 64, dtype, device, rng)
    mask = torch.rand(B, 1, N, S, generator=rng) > 0.3
    mask[:, :, 5] = False  # a row with no visible key: zeros, lse = -inf
    check(q, k, v, bias=mask.to(device))
    out = steelattn.flash_attention(q, k, v, attn_bias=mask.to(device))
    assert (out[:, :, 5] == 0).all()


def test_fully_masked_rows_by_window(device, rng):
    # N > S with causal bottom-right: the first N - S queries see no key.
    q, k, v = make_qkv(1, 2, 2, 20, 8, 32, 32, torch.float32, device, rng)
    out, lse = steelattn.flash_attention(q, k, v, causal=True, return_lse=True)
    assert (out[:, :, :12] == 0).all() and torch.isneginf(lse[:, :, :12]).all()
    assert torch.isfinite(lse[:, :, 12:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous(device, dtype, rng):
    q, k, v = make_qkv(2, 8, 2, 77, 91, 64, 48, dtype, device, rng, layout="bnhd")
    assert not q.is_contiguous()
    check(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_combination_everything(device, dtype, rng):
    """causal + window + GQA + softcap + ALiBi + bias + Dv != D + N != S + strides."""
    B, H, Hkv, N, S = 2, 8, 2, 150, 230
    q, k, v = make_qkv(B, H, Hkv, N, S, 96, 40, dtype, device, rng, layout="bnhd")
    bias = randn(1, H, N, S, dtype=torch.float32, device=device, generator=rng)
    slopes = steelattn.alibi_slopes(H).to(device)
    check(q, k, v, causal=True, window=(100, -1), softcap=20.0, alibi=slopes, bias=bias, scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_return_attn_weights(device, dtype, rng):
    B, H, N, S = 1, 4, 33, 47
    q, k, v = make_qkv(B, H, 2, N, S, 64, 64, dtype, device, rng)
    out, lse, w = steelattn.flash_attention(q, k, v, causal=True, window_size=(20, -1), return_lse=True,
                                            return_attn_weights=True)
    ref, _, probs = attention_reference(q.cpu(), k.cpu(), v.cpu(), diag_offset=S - N, window_left=20,
                                        window_right=0)
    assert w.shape == (B, H, N, S) and w.dtype == dtype
    assert_close(w.float(), probs, dtype, what="attn_weights")
    assert_close(out, ref, dtype)


def test_large_sequence(device, rng):
    """A long causal case crossing many tiles, against the float64 reference."""
    q, k, v = make_qkv(1, 2, 1, 1000, 4097, 128, 128, torch.bfloat16, device, rng)
    check(q, k, v, causal=True)


def test_scale_default_and_explicit(device, rng):
    q, k, v = make_qkv(1, 2, 2, 20, 20, 64, 64, torch.float32, device, rng)
    a = steelattn.flash_attention(q, k, v)
    b = steelattn.flash_attention(q, k, v, scale=1 / math.sqrt(64))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    check(q, k, v, scale=2.0)


def test_empty_inputs(device):
    q = torch.randn(0, 2, 5, 16, device=device)
    k = torch.randn(0, 2, 5, 16, device=device)
    assert steelattn.flash_attention(q, k, k).shape == (0, 2, 5, 16)
    q = torch.randn(1, 2, 5, 16, device=device)
    k = torch.randn(1, 2, 0, 16, device=device)
    out, lse = steelattn.flash_attention(q, k, k, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_fp16_outputs_in_the_subnormal_range(device):
    """fp16 outputs whose values are fp16 subnormals (|x| < 6.1e-5) round like the reference
    (the CPU float -> fp16 conversion once flushed them or turned some into large numbers)."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 33, 64, generator=g).to(torch.float16).to(device) for _ in range(2))
    v = (torch.randn(1, 2, 33, 64, generator=g) * 2e-6).to(torch.float16).to(device)
    out = steelattn.flash_attention(q, k, v)
    ref = attention_reference(q.double(), k.double(), v.double())[0].to(torch.float16)
    # within one fp16 unit in the last place of the subnormal range (2^-24)
    assert (out.cpu().float() - ref.cpu().float()).abs().max().item() <= 2.0 ** -24 * 2
