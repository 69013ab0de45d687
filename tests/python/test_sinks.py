"""Learnable attention sinks (gpt-oss): one logit per query head in every row's softmax
denominator, carrying no value. Checked against an explicit float64 softmax over the
scores plus a sink column, forward, lse and gradients (the sinks' included), through
flash_attention, flash_attention_varlen and flash_attention_kvcache."""
import itertools

import pytest
import torch
from conftest import TOL, assert_close, assert_lse_close, randn

import steelattn


def reference(q, k, v, sinks, causal, scale=None):
    """out, lse with an explicit sink column; q [B, H, N, D], k/v [B, Hkv, S, D]."""
    B, H, N, D = q.shape
    S, G = k.size(2), H // k.size(1)
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else D ** -0.5)
    if causal:
        i = torch.arange(N)[:, None] + S - N
        s = s.masked_fill(torch.arange(S)[None] > i, float("-inf"))
    col = sinks.view(1, H, 1, 1).expand(B, H, N, 1)
    full = torch.cat([s, col], -1)
    lse = torch.logsumexp(full, -1)
    p = torch.exp(full - lse[..., None])[..., :S]
    return p @ v, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_sinks_dense(device, rng, dtype, causal):
    B, H, Hkv, N, S, D = 2, 4, 2, 33, 47, 64
    q = randn(B, H, N, D, dtype=dtype, device=device, generator=rng).requires_grad_()
    k = randn(B, Hkv, S, D, dtype=dtype, device=device, generator=rng).requires_grad_()
    v = randn(B, Hkv, S, D, dtype=dtype, device=device, generator=rng).requires_grad_()
    sinks = (torch.randn(H, generator=rng) * 2).to(device).requires_grad_()
    out, lse = steelattn.flash_attention(q, k, v, causal=causal, sinks=sinks, return_lse=True)
    r = [t.detach().cpu().double().requires_grad_() for t in (q, k, v, sinks)]
    ref, ref_lse = reference(*r, causal)
    assert_close(out, ref.detach(), dtype)
    assert_lse_close(lse, ref_lse.detach(), dtype)
    dout = randn(*out.shape, dtype=dtype, device=device, generator=rng)
    grads = torch.autograd.grad(out, (q, k, v, sinks), dout)
    ref_grads = torch.autograd.grad(ref, r, dout.cpu().double())
    for what, a, b in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads):
        assert_close(a, b, dtype, what=what, tol=3 * TOL[dtype])


def test_sinks_gradcheck():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    sinks = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda q, k, v, s: steelattn.flash_attention(q, k, v, causal=True, sinks=s,
                                                                          return_lse=True), (q, k, v, sinks))


def test_sinks_varlen_and_kvcache(device, rng):
    H, D = 4, 32
    lens = [5, 0, 21]
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=device)
    q, k, v = (randn(sum(lens), H, D, dtype=torch.float32, device=device, generator=rng) for _ in range(3))
    sinks = torch.randn(H, generator=rng).to(device)
    out, lse = steelattn.flash_attention_varlen(q, k, v, cu, cu, causal=True, sinks=sinks, return_lse=True)
    start = 0
    for n in lens:
        if n:
            seg = lambda t: t[start:start + n].permute(1, 0, 2)[None].cpu().double()  # noqa: E731
            ref, ref_lse = reference(seg(q), seg(k), seg(v), sinks.cpu().double(), True)
            assert_close(out[start:start + n].permute(1, 0, 2)[None], ref, torch.float32)
            assert_lse_close(lse[:, start:start + n][None], ref_lse, torch.float32)
        start += n
    qd = randn(2, H, 1, D, dtype=torch.float32, device=device, generator=rng)
    kc, vc = (randn(2, H, 40, D, dtype=torch.float32, device=device, generator=rng) for _ in range(2))
    out = steelattn.flash_attention_kvcache(qd, kc, vc, cache_seqlens=[17, 40], sinks=sinks)
    for b, n in enumerate((17, 40)):
        ref, _ = reference(qd[b:b + 1].cpu().double(), kc[b:b + 1, :, :n].cpu().double(),
                           vc[b:b + 1, :, :n].cpu().double(), sinks.cpu().double(), True)
        assert_close(out[b:b + 1], ref, torch.float32)


def test_sinks_bad_input():
    q = torch.randn(1, 4, 8, 16)
    with pytest.raises(ValueError, match="sinks must be a float tensor"):
        steelattn.flash_attention(q, q, q, sinks=torch.zeros(3))
    with pytest.raises(ValueError, match="sinks must be a float tensor"):
        steelattn.flash_attention(q, q, q, sinks=torch.zeros(4, dtype=torch.int64))
