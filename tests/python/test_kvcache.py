"""flash_attention_kvcache / flash_attention_paged / merge_attention_states against a
plain reference: rotate (RoPE) then append then attend, each batch entry on its own,
in float64. Dense and paged caches (page sizes 1, 16, 64, 256 and 37, random block
tables, appends across page boundaries), ragged lengths, cache_batch_idx, 1-16 query
tokens, GQA 1/4/8, window and softcap, interleaved / NeoX / partial RoPE; bad input
leaves the cache untouched."""
import math

import pytest
import torch
from conftest import TOL, assert_close, randn

import steelattn
from steelattn.kvcache import apply_rotary
from steelattn.reference import attention_reference


def rope_tables(P, rd, device):
    inv = 1.0 / (10000 ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd))
    ang = torch.arange(P, dtype=torch.float64)[:, None] * inv[None]
    return ang.cos().float().to(device), ang.sin().float().to(device)


def rotate_ref(x, cos, sin, pos, interleaved, rd):
    """Plain float64 rotation of x [H, N, D] at positions pos [N]."""
    x = x.double().clone()
    c, s = cos.double()[pos], sin.double()[pos]  # [N, rd/2]
    for i in range(rd // 2):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + rd // 2)
        xa, xb = x[..., a].clone(), x[..., b].clone()
        x[..., a] = xa * c[:, i] - xb * s[:, i]
        x[..., b] = xa * s[:, i] + xb * c[:, i]
    return x


def reference(q, k_hist, v_hist, k_new, v_new, lens, causal, rope=None, wl=-1, softcap=0.0):
    """float64 out [B, H, Nq, Dv]: per entry, the rotated new keys appended to its history."""
    outs = []
    for b, n in enumerate(lens):
        qb, kn, vn = q[b], k_new[b] if k_new is not None else None, v_new[b] if v_new is not None else None
        Nq = qb.size(1)
        if rope is not None:
            cos, sin, inter, rd = rope
            qpos = torch.arange(n, n + Nq) if causal else torch.full((Nq,), n)
            qb = rotate_ref(qb, cos, sin, qpos, inter, rd)
            if kn is not None:
                kn = rotate_ref(kn, cos, sin, torch.arange(n, n + kn.size(1)), inter, rd)
        ks = k_hist[b][:, :n].double()
        vs = v_hist[b][:, :n].double()
        if kn is not None:
            ks, vs = torch.cat([ks, kn.double()], 1), torch.cat([vs, vn.double()], 1)
        S = ks.size(1)
        o, _, _ = attention_reference(qb.double()[None], ks[None], vs[None], diag_offset=S - Nq, window_left=wl,
                                      window_right=0 if causal else -1, softcap=softcap)
        outs.append(o[0])
    return torch.stack(outs)


CASES = [  # (name, H, Hkv, D, Nq, Nnew, rope: None | (interleaved, rotary_dim), kwargs)
    ("decode mha", 4, 4, 64, 1, 1, None, {}),
    ("decode gqa4 rope", 8, 2, 64, 1, 1, (True, 64), {}),
    ("spec 8 gqa8 neox partial", 8, 1, 64, 8, 8, (False, 32), {}),
    ("chunk 16 window softcap", 4, 1, 32, 16, 16, (True, 32), {"window_size": (20, 0), "softcap": 10.0}),
    ("query-only 5", 4, 2, 32, 5, 0, None, {}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("paged", [None, 1, 16, 37, 64, 256])
@pytest.mark.parametrize("name,H,Hkv,D,Nq,Nnew,rope,kw", CASES, ids=[c[0] for c in CASES])
def test_kvcache_matches_reference(device, rng, dtype, paged, name, H, Hkv, D, Nq, Nnew, rope, kw):
    B, Smax = 3, 300
    lens = [0 if Nnew else 5, 123, 250 - Nnew]  # an empty history (or a short one), ragged
    q = randn(B, H, Nq, D, dtype=dtype, device=device, generator=rng)
    hist_k = randn(B, Hkv, Smax, D, dtype=dtype, device=device, generator=rng)
    hist_v = randn(B, Hkv, Smax, D, dtype=dtype, device=device, generator=rng)
    k_new = randn(B, Hkv, Nnew, D, dtype=dtype, device=device, generator=rng) if Nnew else None
    v_new = randn(B, Hkv, Nnew, D, dtype=dtype, device=device, generator=rng) if Nnew else None
    extra = {}
    if rope is not None:
        cos, sin = rope_tables(512, rope[1], device)
        extra = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=rope[0], rotary_dim=rope[1])
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    if paged is None:
        k_cache, v_cache = hist_k.clone(), hist_v.clone()
        out = steelattn.flash_attention_kvcache(q, k_cache, v_cache, k_new=k_new, v_new=v_new, cache_seqlens=lens_t,
                                                causal=True, **kw, **extra)
    else:
        P = math.ceil(Smax / paged)
        num_pages = B * P + 3
        perm = torch.randperm(num_pages, generator=rng)[:B * P].view(B, P).to(torch.int32)
        k_cache = randn(num_pages, paged, Hkv, D, dtype=dtype, device=device, generator=rng)
        v_cache = randn(num_pages, paged, Hkv, D, dtype=dtype, device=device, generator=rng)
        for b in range(B):  # the history, page by page
            for p in range(P):
                n = min(paged, Smax - p * paged)
                k_cache[perm[b, p], :n] = hist_k[b, :, p * paged:p * paged + n].transpose(0, 1)
                v_cache[perm[b, p], :n] = hist_v[b, :, p * paged:p * paged + n].transpose(0, 1)
        table = perm.to(device)
        table[:, P - 1:] = torch.where(torch.tensor(lens, device=device)[:, None] + Nnew > (P - 1) * paged,
                                       table[:, P - 1:], torch.full_like(table[:, P - 1:], -1))  # unused: -1
        out = steelattn.flash_attention_kvcache(q, k_cache, v_cache, k_new=k_new, v_new=v_new, cache_seqlens=lens_t,
                                                block_table=table, causal=True, **kw, **extra)
    ref = reference(q.cpu(), hist_k.cpu(), hist_v.cpu(), None if k_new is None else k_new.cpu(),
                    None if v_new is None else v_new.cpu(), lens, True,
                    None if rope is None else (cos.cpu(), sin.cpu(), rope[0], rope[1]),
                    wl=kw.get("window_size", (-1, 0))[0], softcap=kw.get("softcap", 0.0))
    assert_close(out, ref, dtype, tol=2 * TOL[dtype])
    if Nnew and paged is None:  # the append landed in place, rotated
        for b, n in enumerate(lens):
            want = k_new[b].cpu()
            if rope is not None:
                want = rotate_ref(want, cos.cpu(), sin.cpu(), torch.arange(n, n + Nnew), rope[0], rope[1])
            assert_close(k_cache[b, :, n:n + Nnew], want.double(), dtype)
            assert torch.equal(v_cache[b, :, n:n + Nnew], v_new[b])


def test_cache_batch_idx_and_int_lengths(rng):
    B, H, D, Smax = 2, 4, 32, 64
    q = randn(B, H, 1, D, dtype=torch.float32, device="cpu", generator=rng)
    k_cache = randn(5, H, Smax, D, dtype=torch.float32, device="cpu", generator=rng)
    v_cache = randn(5, H, Smax, D, dtype=torch.float32, device="cpu", generator=rng)
    k_new = randn(B, H, 1, D, dtype=torch.float32, device="cpu", generator=rng)
    v_new = randn(B, H, 1, D, dtype=torch.float32, device="cpu", generator=rng)
    idx = torch.tensor([4, 1], dtype=torch.int32)
    before = k_cache.clone()
    out = steelattn.flash_attention_kvcache(q, k_cache, v_cache, k_new=k_new, v_new=v_new, cache_seqlens=10,
                                            cache_batch_idx=idx)
    ref = reference(q, before[[4, 1]], v_cache[[4, 1]], k_new, v_new, [10, 10], True)
    assert_close(out, ref, torch.float32)
    untouched = [0, 2, 3]
    assert torch.equal(k_cache[untouched], before[untouched])


def test_paged_gradients(rng):
    """flash_attention_paged is differentiable in q and in the pages."""
    H, D, page = 2, 16, 8
    q = randn(2, H, 3, D, dtype=torch.float64, device="cpu", generator=rng).requires_grad_()
    kp = randn(6, page, H, D, dtype=torch.float64, device="cpu", generator=rng).requires_grad_()
    vp = randn(6, page, H, D, dtype=torch.float64, device="cpu", generator=rng).requires_grad_()
    table = torch.tensor([[3, 0, -1], [5, 1, 2]], dtype=torch.int32)
    lens = torch.tensor([11, 20], dtype=torch.int32)
    torch.autograd.gradcheck(lambda q, k, v: steelattn.flash_attention_paged(q, k, v, table, lens), (q, kp, vp))


def test_merge_attention_states(rng):
    q = randn(1, 2, 5, 16, dtype=torch.float64, device="cpu", generator=rng)
    k = randn(1, 2, 30, 16, dtype=torch.float64, device="cpu", generator=rng)
    v = randn(1, 2, 30, 16, dtype=torch.float64, device="cpu", generator=rng)
    full, full_lse = steelattn.flash_attention(q, k, v, return_lse=True)
    a, la = steelattn.flash_attention(q, k[:, :, :12], v[:, :, :12], return_lse=True)
    b, lb = steelattn.flash_attention(q, k[:, :, 12:], v[:, :, 12:], return_lse=True)
    out, lse = steelattn.merge_attention_states(a, la, b, lb)
    torch.testing.assert_close(out, full)
    torch.testing.assert_close(lse, full_lse)
    empty = torch.full_like(la, -math.inf)
    out, lse = steelattn.merge_attention_states(torch.zeros_like(a), empty, torch.zeros_like(b), empty)
    assert torch.all(out == 0) and torch.all(lse == -math.inf)


@pytest.mark.parametrize("bad,match", [
    (dict(cache_seqlens=[60, 64]), "exceeds the cache's capacity"),
    (dict(cache_seqlens=torch.tensor([1, 2])), "int32"),
    (dict(cache_seqlens=[1, 2], seq_lens=[1, 2]), "not both"),
    (dict(cache_seqlens=[1, 2], cache_batch_idx=torch.tensor([0, 9], dtype=torch.int32)), "slots outside"),
    (dict(cache_seqlens=[1, 2], block_table=torch.tensor([[0], [7]], dtype=torch.int32)), "k_cache|page"),
])
def test_bad_input_leaves_cache_untouched(bad, match):
    q = torch.randn(2, 4, 1, 16)
    k_cache, v_cache = torch.randn(2, 4, 64, 16), torch.randn(2, 4, 64, 16)
    k0, v0 = k_cache.clone(), v_cache.clone()
    with pytest.raises((ValueError, TypeError), match=match):
        steelattn.flash_attention_kvcache(q, k_cache, v_cache, k_new=torch.randn(2, 4, 2, 16),
                                          v_new=torch.randn(2, 4, 2, 16), **bad)
    assert torch.equal(k_cache, k0) and torch.equal(v_cache, v0)


def test_bad_page_index_leaves_pool_untouched():
    q = torch.randn(2, 4, 1, 16)
    kp, vp = torch.randn(6, 8, 4, 16), torch.randn(6, 8, 4, 16)
    k0 = kp.clone()
    table = torch.tensor([[0, 1], [2, 9]], dtype=torch.int32)
    with pytest.raises(ValueError, match="page indices outside"):
        steelattn.flash_attention_kvcache(q, kp, vp, k_new=torch.randn(2, 4, 1, 16), v_new=torch.randn(2, 4, 1, 16),
                                          cache_seqlens=[3, 9], block_table=table)
    with pytest.raises(ValueError, match="page_size|pages, page size"):
        steelattn.flash_attention_kvcache(q, kp, torch.randn(6, 4, 4, 16), block_table=table, cache_seqlens=[3, 9])
    assert torch.equal(kp, k0)


@pytest.mark.parametrize("layout", ["dense", "slots", "paged 16"])
@pytest.mark.parametrize("dtype,table", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16),
                                         (torch.float64, torch.float32)])
def test_kv_append_kernel(device, rng, monkeypatch, layout, dtype, table):
    """The fused step (steelattn.h kv_append) runs instead of the torch ops whenever no
    gradient flows, and writes the caches and turns q as rotate-then-append does (NeoX,
    partial rotary_dim, appends across pages, cache slots, tables in float32 or q's dtype)."""
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 on CUDA: no attention kernel to compare with")
    import steelattn.kvcache as kvc
    calls = []

    def counted(*a, **k):
        calls.append(1)
        return apply_rotary(*a, **k)
    monkeypatch.setattr(kvc, "apply_rotary", counted)
    B, H, Hkv, D, Nq, Nnew, rd, page = 3, 8, 2, 64, 3, 5, 48, 16
    q = randn(B, H, Nq, D, dtype=dtype, device=device, generator=rng)
    k_new = randn(B, Hkv, Nnew, D, dtype=dtype, device=device, generator=rng)
    v_new = randn(B, Hkv, Nnew, D, dtype=dtype, device=device, generator=rng)
    cos, sin = (t.to(table) for t in rope_tables(128, rd, device))
    kw = dict(k_new=k_new, v_new=v_new, cache_seqlens=torch.tensor([0, 17, 40], dtype=torch.int32, device=device),
              rotary_cos=cos, rotary_sin=sin, rotary_interleaved=False, rotary_dim=rd, causal=True, return_lse=True)
    if layout == "paged 16":
        kw["block_table"] = torch.tensor([[5, 1, 7, -1], [0, 2, -1, -1], [3, 6, 4, 8]], dtype=torch.int32,
                                         device=device)
        kc = randn(9, page, Hkv, D, dtype=dtype, device=device, generator=rng)
        vc = randn(9, page, Hkv, D, dtype=dtype, device=device, generator=rng)
    else:
        kc = randn(4, Hkv, 64, D, dtype=dtype, device=device, generator=rng)
        vc = randn(4, Hkv, 64, D, dtype=dtype, device=device, generator=rng)
        if layout == "slots":
            kw["cache_batch_idx"] = torch.tensor([2, 0, 3], dtype=torch.int32, device=device)
        else:
            kc, vc = kc[:3].clone(), vc[:3].clone()
    kc_t, vc_t = kc.clone(), vc.clone()
    out, lse = steelattn.flash_attention_kvcache(q, kc, vc, **kw)
    assert not calls, "the torch rotation ran instead of the kernel"
    # The torch ops (a gradient through q keeps the fused step out), same starting caches.
    out_t, lse_t = steelattn.flash_attention_kvcache(q.clone().requires_grad_(), kc_t, vc_t, **kw)
    assert calls
    tol = 1e-10 if dtype == torch.float64 else None
    assert_close(kc, kc_t.double(), dtype, what="k_cache", tol=tol)
    assert torch.equal(vc, vc_t)
    assert_close(out, out_t.detach().double(), dtype, tol=tol)
    assert torch.allclose(lse, lse_t.detach(), atol=1e-3)


def test_kv_append_checks_name_the_argument():
    """The core op checks what the CUDA kernel trusts (lengths against the capacity, pages
    and slots in range, table coverage) on host values, naming the argument, before writing."""
    from steelattn import _kernel
    kn = torch.randn(2, 1, 3, 16)
    kc = torch.randn(2, 1, 8, 16)
    kc0 = kc.clone()
    lens = torch.tensor([0, 6], dtype=torch.int32)  # 6 + 3 > 8
    cos, sin = rope_tables(6, 16, "cpu")

    def call(**over):
        a = dict(k_new=kn, v_new=kn, k_cache=kc, v_cache=kc, lens=lens, block_table=None, kv_batch_idx=None, q=None,
                 q_out=None, cos=None, sin=None, rotary_dim=0, interleaved=True, q_causal=True)
        a.update(over)
        _kernel.kv_append(*a.values())
    with pytest.raises(ValueError, match="seqlens: entry 1"):
        call()
    with pytest.raises(ValueError, match="kv_batch_idx: entry 0 is 5"):
        call(lens=torch.tensor([0, 1], dtype=torch.int32), kv_batch_idx=torch.tensor([5, 0], dtype=torch.int32))
    pool = torch.randn(3, 1, 4, 16)  # pages viewed [num_pages, Hkv, page, D]
    with pytest.raises(ValueError, match=r"block_table: entry \(1, 0\) is 7"):
        call(k_cache=pool, v_cache=pool, lens=torch.tensor([0, 1], dtype=torch.int32),
             block_table=torch.tensor([[0, 1], [7, 2]], dtype=torch.int32))
    with pytest.raises(ValueError, match="rotary_cos: covers 6 positions"):
        call(lens=torch.tensor([0, 5], dtype=torch.int32), cos=cos, sin=sin)
    with pytest.raises(ValueError, match="q, q_out: give both"):
        call(lens=torch.tensor([0, 1], dtype=torch.int32), q=torch.randn(2, 2, 1, 16), cos=cos, sin=sin)
    assert torch.equal(kc, kc0)


def test_append_keeps_fp16_subnormals_exact(device):
    """Appended rows are copies: every fp16 subnormal (and its negative) lands bit for bit
    (the CPU float -> fp16 conversion once flushed or garbled subnormals)."""
    sub = torch.arange(1, 1024, dtype=torch.int16).view(torch.float16)  # 0x0001 .. 0x03ff
    vals = torch.cat([sub, -sub, torch.zeros(2, dtype=torch.float16)]).view(1, 1, 32, 64).to(device)
    kc = torch.zeros(1, 1, 40, 64, dtype=torch.float16, device=device)
    vc = kc.clone()
    q = torch.zeros(1, 1, 1, 64, dtype=torch.float16, device=device)
    steelattn.flash_attention_kvcache(q, kc, vc, k_new=vals, v_new=vals, cache_seqlens=[3])
    assert torch.equal(vc[:, :, 3:35].view(torch.int16), vals.view(torch.int16))
    assert torch.equal(kc[:, :, 3:35].view(torch.int16), vals.view(torch.int16))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])])
def test_num_splits(device, rng):
    """num_splits > 0 sets the CUDA decode kernel's key splits (its fp32 partials are the
    workspace: none for one split, splits x B x H x (Dv + 1) floats otherwise, seen in the
    allocator's peak); every value gives the reference's result; the CPU ignores it;
    negative values are refused naming the argument."""
    B, H, Hkv, S, D = 2, 16, 4, 5000, 128
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    q = randn(B, H, 1, D, dtype=dt, device=device, generator=rng)
    k = randn(B, Hkv, S, D, dtype=dt, device=device, generator=rng)
    v = randn(B, Hkv, S, D, dtype=dt, device=device, generator=rng)
    lens = torch.tensor([4999, 1234], dtype=torch.int32, device=device)
    ref = torch.cat([attention_reference(q[b:b + 1].double().cpu(), k[b:b + 1, :, :n].double().cpu(),
                                         v[b:b + 1, :, :n].double().cpu())[0] for b, n in enumerate(lens.tolist())])
    peaks = {}
    for splits in (0, 1, 3, 64, 500):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        steelattn.reset_dispatch_stats()
        out = steelattn.flash_attention_kvcache(q, k, v, cache_seqlens=lens, causal=False, num_splits=splits)
        if device == "cuda":
            peaks[splits] = torch.cuda.max_memory_allocated() - base
            assert steelattn.get_dispatch_stats()["forward"] == {"cuda_decode": 1}
        assert_close(out.cpu(), ref, dt)
    if device == "cuda":
        part = B * H * (D + 1) * 4  # one split's partial outputs and lse, bytes
        assert peaks[64] - peaks[1] >= 63 * part and peaks[500] - peaks[64] >= 63 * part  # 500 clamps to 128
        assert peaks[3] - peaks[1] < 3 * part + 4096
    with pytest.raises(ValueError, match="num_splits"):
        steelattn.flash_attention_kvcache(q, k, v, cache_seqlens=lens, num_splits=-1)
