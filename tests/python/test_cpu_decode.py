"""CPU decode with the keys split across threads (src/cpu/split_keys.cpp): a call with
fewer tasks than threads (one query token, few KV heads) runs its keys in chunks merged
by LSE. Against the float64 reference with every modifier that chunking must keep right
(causal and windows shift with the chunk, ALiBi distances, softcap, rows that see no key),
dense and with per-entry cache lengths."""
import pytest
import torch
from conftest import TOL, assert_close, assert_lse_close, randn

import steelattn
from steelattn.reference import attention_reference


@pytest.fixture
def many_threads():
    """16 threads: B * Hkv tasks below half of them make the kernels split the keys."""
    before = torch.get_num_threads()
    torch.set_num_threads(16)
    yield
    torch.set_num_threads(before)


MODS = {"none": {}, "causal": dict(causal=True), "window": dict(window_size=(700, 0)),
        "window_right": dict(window_size=(300, 200)), "softcap_alibi": dict(causal=True, softcap=15.0, alibi=True)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("mod", list(MODS))
def test_split_decode_matches_reference(many_threads, rng, dtype, N, mod):
    B, H, Hkv, S, D = 1, 4, 2, 5003, 72
    q = randn(B, H, N, D, dtype=dtype, device="cpu", generator=rng)
    k = randn(B, Hkv, S, D, dtype=dtype, device="cpu", generator=rng)
    v = randn(B, Hkv, S, D + 8, dtype=dtype, device="cpu", generator=rng)
    kw = dict(MODS[mod])
    slopes = None
    if kw.pop("alibi", False):
        slopes = torch.rand(H, dtype=torch.float64 if dtype == torch.float64 else torch.float32) * 0.01
        kw["alibi_slopes"] = slopes
    out, lse = steelattn.flash_attention(q, k, v, return_lse=True, **kw)
    wl, wr = kw.get("window_size", (-1, 0 if kw.get("causal") else -1))
    ref, ref_lse, _ = attention_reference(q, k, v, diag_offset=S - N, window_left=wl, window_right=wr,
                                          softcap=kw.get("softcap", 0.0), alibi_slopes=slopes)
    assert_close(out, ref, dtype, tol=TOL[dtype] if dtype != torch.float64 else 1e-10)
    if dtype != torch.float64:
        assert_lse_close(lse, ref_lse, dtype)
    else:
        assert torch.allclose(lse, ref_lse, rtol=1e-10, atol=1e-10)


def test_split_decode_rows_that_see_no_key(many_threads, rng):
    """A band that hides the first rows entirely: zeros and LSE = -inf survive the merge."""
    q = randn(1, 2, 4, 32, dtype=torch.float32, device="cpu", generator=rng)
    k = randn(1, 1, 3000, 32, dtype=torch.float32, device="cpu", generator=rng)
    v = randn(1, 1, 3000, 32, dtype=torch.float32, device="cpu", generator=rng)
    out, lse = steelattn.flash_attention(q, k, v, window_size=(0, 0), return_lse=True)
    ref, ref_lse, _ = attention_reference(q, k, v, diag_offset=2996, window_left=0, window_right=0)
    assert_close(out, ref, torch.float32)
    assert_lse_close(lse, ref_lse, torch.float32)


def test_split_kvcache_entries(many_threads, rng):
    """Per-entry lengths (one problem per entry), an empty entry among them."""
    B, H, Hkv, Smax, D = 3, 4, 1, 4000, 64
    q = randn(B, H, 1, D, dtype=torch.bfloat16, device="cpu", generator=rng)
    k = randn(B, Hkv, Smax, D, dtype=torch.bfloat16, device="cpu", generator=rng)
    v = randn(B, Hkv, Smax, D, dtype=torch.bfloat16, device="cpu", generator=rng)
    lens = [3999, 0, 1500]
    out, lse = steelattn.flash_attention_kvcache(q, k, v, cache_seqlens=lens, return_lse=True)
    for b, n in enumerate(lens):
        ref, ref_lse, _ = attention_reference(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], diag_offset=n - 1,
                                              window_right=0)
        if n == 0:
            assert torch.equal(out[b].float(), torch.zeros_like(out[b].float())) and torch.isneginf(lse[b]).all()
        else:
            assert_close(out[b:b + 1], ref, torch.bfloat16)
            assert_lse_close(lse[b:b + 1], ref_lse, torch.bfloat16)


ROWWISE = [  # (H, Hkv, N, D, Dv): packed rows per KV head = H / Hkv * N, at most 4
    (6, 6, 1, 64, 64), (4, 2, 1, 40, 24), (4, 1, 1, 7, 9), (2, 2, 2, 80, 80), (8, 2, 1, 128, 64),
]
ROW_MODS = {"none": {}, "causal window": dict(causal=True, window_size=(300, 0)),
            "softcap alibi": dict(softcap=12.0, alibi=True), "bool mask": dict(mask=True), "bias": dict(bias=True),
            "dropout": dict(dropout_p=0.3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mod", list(ROW_MODS))
@pytest.mark.parametrize("H,Hkv,N,D,Dv", ROWWISE)
def test_decode_rows_as_dot_products(rng, dtype, mod, H, Hkv, N, D, Dv):
    """Decode-shaped tasks (1-4 packed rows: a quarter of the lanes or fewer) score each key
    as a dot product along D and update each output row along Dv (flash_fwd_impl.h); against
    the float64 reference with every modifier, head dims that are not multiples of the
    vector width, LSE and the attention weights. The CI machines run it at their widest ISA;
    STEELATTN_CPU_ISA=avx2 makes 1-2 rows take the path there too."""
    B, S = 2, 700
    q = randn(B, H, N, D, dtype=dtype, device="cpu", generator=rng)
    k = randn(B, Hkv, S, D, dtype=dtype, device="cpu", generator=rng)
    v = randn(B, Hkv, S, Dv, dtype=dtype, device="cpu", generator=rng)
    kw = dict(ROW_MODS[mod])
    ref_kw = dict(diag_offset=S - N, window_left=-1, window_right=-1)
    if kw.get("causal"):
        ref_kw.update(window_left=kw["window_size"][0], window_right=0)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = ref_kw["alibi_slopes"] = torch.rand(H) * 0.05
    if "softcap" in kw:
        ref_kw["softcap"] = kw["softcap"]
    if kw.pop("mask", False):
        m = torch.rand(B, H, N, S, generator=rng) > 0.4
        kw["attn_bias"] = ref_kw["bool_mask"] = m
    if kw.pop("bias", False):
        bias = torch.randn(B, 1, N, S, generator=rng)
        kw["attn_bias"], ref_kw["bias"] = bias, bias.expand(B, H, N, S)
    p = kw.get("dropout_p", 0.0)
    if p:
        gen = torch.Generator().manual_seed(11)
        kw["generator"] = gen
        seed, offset = torch.randint(0, 2**62, (2,), generator=torch.Generator().manual_seed(11),
                                     dtype=torch.int64).tolist()
        ref_kw.update(dropout_p=p, dropout_keep=steelattn.api.dropout_keep_mask(B, H, N, S, p, seed, offset))
    out, lse, w = steelattn.flash_attention(q, k, v, return_lse=True, return_attn_weights=not p, **kw) if not p \
        else (*steelattn.flash_attention(q, k, v, return_lse=True, **kw), None)
    ref, ref_lse, ref_w = attention_reference(q, k, v, **ref_kw)
    assert_close(out, ref, dtype)
    assert_lse_close(lse, ref_lse, dtype)
    if w is not None:
        assert_close(w.double(), ref_w, dtype)
    assert "torch" not in steelattn.get_dispatch_stats()["forward"]
