"""PagedKVCache and InferenceContext: sequences that grow, share a pool, free pages and
come back; a lockstep decode; each checked against attention over the plain
concatenated history (float64)."""
import doctest

import pytest
import torch
from conftest import assert_close, randn

import steelattn
import steelattn.cache
from steelattn.reference import attention_reference


def attend_ref(q, ks, vs):
    S, N = ks.size(2), q.size(2)
    return attention_reference(q.double(), ks.double(), vs.double(), diag_offset=S - N, window_right=0)[0]


def test_paged_cache_grows_frees_and_reuses(device, rng):
    H, Hkv, D = 4, 2, 32
    cache = steelattn.PagedKVCache(num_pages=12, page_size=5, Hkv=Hkv, D=D, dtype=torch.float32, device=device)
    a, b = cache.add_sequence(), cache.add_sequence()
    hist = {a: ([], []), b: ([], [])}
    for n_new in (7, 1, 1, 4):  # prefill then decode, crossing page boundaries
        q = randn(2, H, n_new, D, dtype=torch.float32, device=device, generator=rng)
        k = randn(2, Hkv, n_new, D, dtype=torch.float32, device=device, generator=rng)
        v = randn(2, Hkv, n_new, D, dtype=torch.float32, device=device, generator=rng)
        out = cache.attend(q, [a, b], k_new=k, v_new=v)
        for i, s in enumerate((a, b)):
            hist[s][0].append(k[i:i + 1])
            hist[s][1].append(v[i:i + 1])
            ref = attend_ref(q[i:i + 1], torch.cat(hist[s][0], 2), torch.cat(hist[s][1], 2))
            assert_close(out[i:i + 1], ref, torch.float32)
    assert cache.seq_len(a) == 13 and cache.free_pages == 12 - 2 * 3
    cache.free(a)
    assert cache.free_pages == 9
    c = cache.add_sequence()  # reuses a's pages
    q = randn(1, H, 3, D, dtype=torch.float32, device=device, generator=rng)
    k = randn(1, Hkv, 3, D, dtype=torch.float32, device=device, generator=rng)
    v = randn(1, Hkv, 3, D, dtype=torch.float32, device=device, generator=rng)
    assert_close(cache.attend(q, [c], k_new=k, v_new=v), attend_ref(q, k, v), torch.float32)
    with pytest.raises(RuntimeError, match="pages needed"):
        cache.attend(q[:, :, :1].expand(1, H, 1, D).contiguous(), [c], k_new=torch.zeros(1, Hkv, 60, D, device=device),
                     v_new=torch.zeros(1, Hkv, 60, D, device=device))
    assert cache.seq_len(c) == 3 and cache.free_pages == 8
    with pytest.raises(KeyError):
        cache.free(a)


def test_inference_context_lockstep(device, rng):
    B, H, Hkv, D = 2, 4, 1, 32
    q, k, v = (randn(B, h, 9, D, dtype=torch.float32, device=device, generator=rng) for h in (H, Hkv, Hkv))
    with steelattn.InferenceContext(B, Hkv, D, max_seq_len=32, dtype=torch.float32, device=device) as ctx:
        out = ctx.prefill(q, k, v)
        assert_close(out, attend_ref(q, k, v), torch.float32)
        ks, vs = [k], [v]
        for _ in range(3):
            qn, kn, vn = (randn(B, h, 1, D, dtype=torch.float32, device=device, generator=rng) for h in (H, Hkv, Hkv))
            ks.append(kn), vs.append(vn)
            assert_close(ctx.step(qn, kn, vn), attend_ref(qn, torch.cat(ks, 2), torch.cat(vs, 2)), torch.float32)
        assert ctx.seqlen == 12
    assert ctx.seqlen == 0


def test_docstring_examples():
    assert doctest.testmod(steelattn.cache, extraglobs={"torch": torch}).failed == 0
