"""Serving compositions (serving.py) against the float64 reference on the concatenated
keys: a prefix shared by a batch of requests with their own suffix caches (dense and
paged, ragged lengths, an empty suffix), and prefill + decode in one call."""
import pytest
import torch
from conftest import TOL, assert_close, assert_lse_close, randn

import steelattn
from steelattn.reference import attention_reference


def _prefix_reference(q, kp, vp, ks, vs, lens, causal=True, softcap=0.0):
    outs, lses = [], []
    for b, n in enumerate(lens):
        k = torch.cat([kp[0], ks[b, :, :n]], 1)[None]
        v = torch.cat([vp[0], vs[b, :, :n]], 1)[None]
        o, l, _ = attention_reference(q[b:b + 1].cpu(), k.cpu(), v.cpu(), diag_offset=k.size(2) - q.size(2),
                                      window_right=0 if causal else -1, softcap=softcap)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("paged", [None, 16])
@pytest.mark.parametrize("N,causal", [(1, True), (4, True), (3, False)])
def test_shared_prefix_matches_concatenation(device, rng, dtype, paged, N, causal):
    B, H, Hkv, P, Smax, D = 3, 8, 2, 70, 64, 64
    pq = randn(1, H, P, D, dtype=dtype, device=device, generator=rng)
    pk = randn(1, Hkv, P, D, dtype=dtype, device=device, generator=rng)
    pv = randn(1, Hkv, P, D, dtype=dtype, device=device, generator=rng)
    prefix_out, kp, vp = steelattn.make_shared_prefix_cache(pq, pk, pv)
    assert kp is pk and vp is pv  # shared, not copied
    ref_prefix, _, _ = attention_reference(pq.cpu(), pk.cpu(), pv.cpu(), diag_offset=0, window_right=0)
    assert_close(prefix_out, ref_prefix, dtype)

    q = randn(B, H, N, D, dtype=dtype, device=device, generator=rng)
    ks = randn(B, Hkv, Smax, D, dtype=dtype, device=device, generator=rng)
    vs = randn(B, Hkv, Smax, D, dtype=dtype, device=device, generator=rng)
    lens = [N, 0 if not causal else N + 7, Smax]  # a request with no suffix yet when not causal
    kw = dict(cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=device), causal=causal, return_lse=True)
    if paged is None:
        out, lse = steelattn.flash_attention_shared_prefix(q, kp, vp, ks, vs, **kw)
    else:
        pages = Smax // paged  # whole pages
        table = torch.arange(B * pages, dtype=torch.int32, device=device).view(B, pages)
        pool_k = ks.view(B, Hkv, pages, paged, D).permute(0, 2, 3, 1, 4).reshape(B * pages, paged, Hkv, D)
        pool_v = vs.view(B, Hkv, pages, paged, D).permute(0, 2, 3, 1, 4).reshape(B * pages, paged, Hkv, D)
        out, lse = steelattn.flash_attention_shared_prefix(q, kp, vp, pool_k.contiguous(), pool_v.contiguous(),
                                                          block_table=table, **kw)
    ref, ref_lse = _prefix_reference(q, kp, vp, ks, vs, lens, causal)
    assert_close(out, ref, dtype, tol=2 * TOL[dtype])
    assert_lse_close(lse, ref_lse, dtype)


def test_shared_prefix_rejects_a_batched_prefix():
    q = torch.randn(2, 4, 1, 32)
    with pytest.raises(ValueError, match="k_prefix"):
        steelattn.flash_attention_shared_prefix(q, torch.randn(2, 2, 5, 32), torch.randn(2, 2, 5, 32),
                                                torch.randn(2, 2, 8, 32), torch.randn(2, 2, 8, 32), cache_seqlens=3)


def test_splitfuse_is_prefill_plus_decode(device, rng):
    dt = torch.bfloat16
    qp = randn(1, 8, 33, 64, dtype=dt, device=device, generator=rng)
    kp = randn(1, 2, 33, 64, dtype=dt, device=device, generator=rng)
    vp = randn(1, 2, 33, 64, dtype=dt, device=device, generator=rng)
    qd = randn(4, 8, 1, 64, dtype=dt, device=device, generator=rng)
    kc = randn(4, 2, 100, 64, dtype=dt, device=device, generator=rng)
    vc = randn(4, 2, 100, 64, dtype=dt, device=device, generator=rng)
    lens = [1, 50, 99, 100]
    out_p, out_d = steelattn.flash_attention_splitfuse(qp, kp, vp, qd, kc, vc, cache_seqlens=lens)
    ref_p, _, _ = attention_reference(qp.cpu(), kp.cpu(), vp.cpu(), diag_offset=0, window_right=0)
    assert_close(out_p, ref_p, dt)
    for b, n in enumerate(lens):
        ref_d, _, _ = attention_reference(qd[b:b + 1].cpu(), kc[b:b + 1, :, :n].cpu(), vc[b:b + 1, :, :n].cpu(),
                                          diag_offset=n - 1, window_right=0)
        assert_close(out_d[b:b + 1], ref_d, dt)


def test_splitfuse_bad_input_names_the_argument():
    qp, kp = torch.randn(1, 4, 5, 32), torch.randn(1, 2, 5, 32)
    qd, kc = torch.randn(2, 4, 1, 32), torch.randn(2, 2, 10, 32)
    with pytest.raises(ValueError, match="k_cache"):  # the decode part's cache has another head dim
        steelattn.flash_attention_splitfuse(qp, kp, kp, qd, torch.randn(2, 2, 10, 16), kc, cache_seqlens=3)
    with pytest.raises(ValueError, match="cache_seqlens"):  # longer than the cache
        steelattn.flash_attention_splitfuse(qp, kp, kp, qd, kc, kc, cache_seqlens=[3, 11])
    with pytest.raises(ValueError, match="head"):  # the prefill part's heads do not divide
        steelattn.flash_attention_splitfuse(qp, torch.randn(1, 3, 5, 32), torch.randn(1, 3, 5, 32), qd, kc, kc,
                                            cache_seqlens=3)


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "lengths"])
def test_speculative_verify_is_the_seeds_proxy(device, rng, paged):
    """out / lse are the drafts' causal attention over the cache; target_logprobs is the
    seed's proxy, log_softmax over the value dim of the head-mean output at draft_ids,
    checked against the float64 reference."""
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    B, H, Hkv, Nd, S, D, T = 2, 8, 2, 4, 90, 64, 0.7
    q = randn(B, H, Nd, D, dtype=dt, device=device, generator=rng)
    k = randn(B, Hkv, S, D, dtype=dt, device=device, generator=rng)
    v = randn(B, Hkv, S, D, dtype=dt, device=device, generator=rng)
    ids = torch.randint(0, D, (B, Nd), generator=rng).to(device)
    kw = dict(cache_seqlens=S) if paged else {}
    out, lse, logp = steelattn.flash_attention_speculative_verify(q, k, v, ids, temperature=T, **kw)
    ref, ref_lse, _ = attention_reference(q.cpu().double(), k.cpu().double(), v.cpu().double(), diag_offset=S - Nd,
                                          window_right=0)
    assert_close(out, ref, dt)
    assert_lse_close(lse, ref_lse, dt)
    ref_logp = torch.log_softmax(ref.mean(dim=1) / T, dim=-1).gather(-1, ids.cpu().long().unsqueeze(-1)).squeeze(-1)
    assert logp.dtype == torch.float32 and logp.shape == (B, Nd)
    assert_close(logp, ref_logp, dt, what="target_logprobs")


def test_speculative_verify_bad_input_names_the_argument():
    q, k = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 20, 16)
    with pytest.raises(ValueError, match="draft_ids"):  # out of the value dim
        steelattn.flash_attention_speculative_verify(q, k, k, torch.tensor([[0, 16, 1]]))
    with pytest.raises(ValueError, match="draft_ids"):  # wrong shape
        steelattn.flash_attention_speculative_verify(q, k, k, torch.tensor([[0, 1]]))
    with pytest.raises(TypeError, match="draft_ids"):
        steelattn.flash_attention_speculative_verify(q, k, k, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="temperature"):
        steelattn.flash_attention_speculative_verify(q, k, k, torch.zeros(1, 3, dtype=torch.int64), temperature=0)
