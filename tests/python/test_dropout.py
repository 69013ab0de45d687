"""Dropout: the kernel applies exactly the keep-mask dropout_keep_mask() reports,
reproducibly from torch's seed or a generator."""
import pytest
import torch
from conftest import assert_close, assert_lse_close, randn

import steelattn
from steelattn.reference import attention_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def seed_draw(generator):
    d = torch.randint(0, 2**62, (2,), generator=generator, dtype=torch.int64)
    return int(d[0]), int(d[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_matches_reference_with_same_mask(device, dtype, p, rng):
    B, H, Hkv, N, S = 2, 4, 2, 37, 150
    q = randn(B, H, N, 64, dtype=dtype, device=device, generator=rng)
    k = randn(B, Hkv, S, 64, dtype=dtype, device=device, generator=rng)
    v = randn(B, Hkv, S, 64, dtype=dtype, device=device, generator=rng)
    g = torch.Generator().manual_seed(1234)
    out, lse = steelattn.flash_attention(q, k, v, causal=True, dropout_p=p, return_lse=True, generator=g)
    seed, offset = seed_draw(torch.Generator().manual_seed(1234))
    keep = steelattn.dropout_keep_mask(B, H, N, S, p, seed, offset)
    ref, ref_lse, _ = attention_reference(q.cpu(), k.cpu(), v.cpu(), diag_offset=S - N, window_right=0,
                                          dropout_keep=keep, dropout_p=p)
    assert_close(out, ref, dtype)
    assert_lse_close(lse, ref_lse, dtype)  # lse is the pre-dropout normaliser


def test_reproducible_from_manual_seed(device, rng):
    q = randn(1, 2, 64, 32, dtype=torch.float32, device=device, generator=rng)
    torch.manual_seed(7)
    a = steelattn.flash_attention(q, q, q, dropout_p=0.3)
    torch.manual_seed(7)
    b = steelattn.flash_attention(q, q, q, dropout_p=0.3)
    c = steelattn.flash_attention(q, q, q, dropout_p=0.3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_keep_fraction():
    keep = steelattn.dropout_keep_mask(2, 4, 64, 256, 0.25, seed=99, offset=5)
    frac = keep.float().mean().item()
    assert abs(frac - 0.75) < 0.01
    # different offsets give different masks
    assert not torch.equal(keep, steelattn.dropout_keep_mask(2, 4, 64, 256, 0.25, seed=99, offset=6))


def test_sdpa_dropout_uses_same_mask(device, rng):
    q = randn(1, 2, 30, 32, dtype=torch.float32, device=device, generator=rng)
    g = torch.Generator().manual_seed(5)
    out = steelattn.scaled_dot_product_attention(q, q, q, dropout_p=0.2, generator=g)
    seed, offset = seed_draw(torch.Generator().manual_seed(5))
    keep = steelattn.dropout_keep_mask(1, 2, 30, 30, 0.2, seed, offset)
    ref, _, _ = attention_reference(q.cpu(), q.cpu(), q.cpu(), dropout_keep=keep, dropout_p=0.2)
    assert_close(out, ref, torch.float32)


def test_compiled_dropout_draws_a_new_seed_without_recompiling(rng):
    """Under torch.compile(fullgraph=True) the seed pair is a tensor drawn inside the graph:
    each call draws from torch's RNG like the eager call does (same results for the same
    seed, different for another) and a new seed does not compile a new graph."""
    q, k, v = (randn(1, 2, 40, 32, dtype=torch.float32, device="cpu", generator=rng) for _ in range(3))
    compiled_graphs = []

    def counting_backend(gm, example_inputs):
        compiled_graphs.append(gm)
        return gm.forward

    def f(q, k, v):
        return steelattn.flash_attention(q, k, v, causal=True, dropout_p=0.3)

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend=counting_backend)
    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        eager = f(q, k, v)
        torch.manual_seed(seed)
        outs.append(cf(q, k, v))
        torch.testing.assert_close(outs[-1], eager, rtol=0, atol=0)
    assert not torch.equal(outs[0], outs[1])
    assert len(compiled_graphs) == 1
