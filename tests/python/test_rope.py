"""flash_attention_rope against rotate-then-attend in float64 (1D tables, interleaved and
NeoX, partial rotary_dim, offsets per entry), make_rope_3d_tables against its definition,
gradients, docstrings, bad input."""
import doctest

import pytest
import torch
from conftest import TOL, assert_close, randn
from test_kvcache import rope_tables, rotate_ref

import steelattn
import steelattn.rope
from steelattn.reference import attention_reference


@pytest.mark.parametrize("interleaved,rd", [(True, 64), (False, 64), (True, 32), (False, 16)])
def test_rope_matches_rotate_then_attend(device, rng, interleaved, rd):
    B, H, N, D = 2, 4, 37, 64
    q, k, v = (randn(B, H, N, D, dtype=torch.float32, device=device, generator=rng) for _ in range(3))
    cos, sin = rope_tables(128, rd, device)
    offs = [0, 9]
    out = steelattn.flash_attention_rope(q, k, v, cos, sin, causal=True, cache_seqlens=offs,
                                         interleaved=interleaved, rotary_dim=rd)
    ref = []
    for b, o in enumerate(offs):
        pos = torch.arange(o, o + N)
        qr, kr = (rotate_ref(t[b].cpu(), cos.cpu(), sin.cpu(), pos, interleaved, rd) for t in (q, k))
        ref.append(attention_reference(qr[None], kr[None], v[b:b + 1].cpu().double(), window_right=0)[0][0])
    assert_close(out, torch.stack(ref), torch.float32, tol=2 * TOL[torch.float32])


def test_rope_3d_tables_definition():
    cos, sin = steelattn.make_rope_3d_tables(3, 5, 2, head_dim=24, theta=100.0)
    assert cos.shape == (30, 12)
    # token (t=1, y=2, x=4) is row (1 * 3 + 2) * 5 + 4 = 29; bands t (8 features), h (8), w (8)
    ang = torch.cat([1 * 100.0 ** (-torch.arange(0, 8, 2) / 8), 2 * 100.0 ** (-torch.arange(0, 8, 2) / 8),
                     4 * 100.0 ** (-torch.arange(0, 8, 2) / 8)]).double()
    torch.testing.assert_close(cos[29].double(), ang.cos(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin[29].double(), ang.sin(), rtol=1e-6, atol=1e-6)
    c2, _ = steelattn.make_rope_3d_tables(3, 5, 2, d_t=4, d_h=10, d_w=10, head_dim=24)
    assert c2.shape == (30, 12)


def test_rope_gradients():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    cos, sin = rope_tables(16, 8, "cpu")
    torch.autograd.gradcheck(lambda q, k, v: steelattn.flash_attention_rope(q, k, v, cos.double(), sin.double(),
                                                                            causal=True), (q, k, v))


def test_docstring_examples():
    assert doctest.testmod(steelattn.rope, extraglobs={"torch": torch}).failed == 0


def test_rope_bad_input():
    q = torch.randn(1, 2, 8, 16)
    cos, sin = rope_tables(8, 16, "cpu")
    with pytest.raises(ValueError, match="cover 8 positions"):
        steelattn.flash_attention_rope(q, q, q, cos, sin, cache_seqlens=4)
    with pytest.raises(ValueError, match="rotary_dim"):
        steelattn.flash_attention_rope(q, q, q, cos, sin, rotary_dim=20)
    with pytest.raises(ValueError, match="sum to head_dim"):
        steelattn.make_rope_3d_tables(2, 2, 2, d_t=2, d_h=2, d_w=2, head_dim=16)
