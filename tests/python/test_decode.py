"""The split-KV decode kernel (cuda_decode) against the float64 reference: few query rows
per KV head against long caches, with and without key splits, every score modifier it
takes, rows that see no key, KV-cache lengths read on the device (including zero and
a CUDA graph replayed with new lengths), and which calls reach it (dispatch stats)."""
import pytest
import torch
from conftest import TOL, assert_close, assert_lse_close

import steelattn
from steelattn.reference import attention_reference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def _inputs(B, H, Hkv, N, S, D, Dv, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, S, Dv, device="cuda", dtype=dtype, generator=g)
    return q, k, v


def _ran():
    return {k: v for k, v in steelattn.get_dispatch_stats().items() if v}


# (H, Hkv, N): query rows per KV head G * N from 1 to 16, and 48 (four row groups, taken
# while batch x KV heads <= SMs / 8: 8 here; dense calls with more rows go to the prefill
# kernels; calls with cache lengths take any number, tested below)
SHAPES = [(32, 8, 1), (8, 8, 1), (6, 1, 2), (16, 4, 4), (4, 2, 5), (16, 4, 12)]
HEAD_DIMS = [(64, 64), (128, 128), (256, 256), (80, 80), (192, 128)]
MODS = {"none": {}, "causal": {"causal": True}, "window": {"window_size": (33, 0)},
        "softcap_alibi": {"softcap": 20.0, "alibi": True}}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,Hkv,N", SHAPES)
@pytest.mark.parametrize("S", [1, 77, 3000, 20000])
@pytest.mark.parametrize("D,Dv", HEAD_DIMS)
@pytest.mark.parametrize("mod", list(MODS))
def test_dense_decode_matches_reference(dtype, H, Hkv, N, S, D, Dv, mod):
    if S == 20000 and (D, Dv) not in ((128, 128), (256, 256)):
        pytest.skip("long caches at two head dims keep the suite short")
    B = 2
    if H // Hkv * N > 16 and B * Hkv * 8 > torch.cuda.get_device_properties(0).multi_processor_count:
        pytest.skip("more than 16 rows per KV head go to the prefill kernels on a GPU with this few SMs")
    q, k, v = _inputs(B, H, Hkv, N, S, D, Dv, dtype, seed=S * 7 + D + N)
    kw = dict(MODS[mod])
    alibi = None
    if kw.pop("alibi", False):
        alibi = torch.rand(H, device="cuda") * 0.1
        kw["alibi_slopes"] = alibi
    steelattn.reset_dispatch_stats()
    out, lse = steelattn.flash_attention(q, k, v, return_lse=True, **kw)
    assert _ran() == {"forward": {"cuda_decode": 1}}, _ran()
    wl, wr = kw.get("window_size", (-1, 0 if kw.get("causal") else -1))
    ref, ref_lse, _ = attention_reference(q.cpu(), k.cpu(), v.cpu(), diag_offset=S - N, window_left=wl,
                                          window_right=wr, softcap=kw.get("softcap", 0.0),
                                          alibi_slopes=None if alibi is None else alibi.cpu())
    assert_close(out, ref, dtype)
    assert_lse_close(lse, ref_lse, dtype)


def test_rows_that_see_no_key_give_zeros_and_minus_inf():
    """N > S under a bottom-right causal band: the first N - S query rows see nothing."""
    q, k, v = _inputs(2, 8, 4, 6, 2, 128, 128, torch.bfloat16, seed=1)  # 12 rows per KV head
    out, lse = steelattn.flash_attention(q, k, v, causal=True, return_lse=True)
    assert _ran()["forward"] == {"cuda_decode": 1}
    assert torch.equal(out[:, :, :4].float(), torch.zeros_like(out[:, :, :4].float()))
    assert torch.isneginf(lse[:, :, :4]).all()
    ref, ref_lse, _ = attention_reference(q.cpu(), k.cpu(), v.cpu(), diag_offset=-4, window_right=0)
    assert_close(out, ref, torch.bfloat16)
    assert_lse_close(lse, ref_lse, torch.bfloat16)


def _kvcache_reference(q, k, v, lens, **kw):
    outs, lses = [], []
    for b, n in enumerate(lens):
        o, l, _ = attention_reference(q[b:b + 1].cpu(), k[b:b + 1, :, :n].cpu(), v[b:b + 1, :, :n].cpu(),
                                      diag_offset=n - q.size(2), window_right=0, **kw)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


def _check_read_in_place(q, k_cache, v_cache, hist_k, hist_v, lens, **kw):
    """flash_attention_kvcache over caches holding hist_k / hist_v ([B, Hkv, S, D]) however
    they are laid out (kw: block_table, cache_batch_idx): one decode-kernel call, no gather,
    equal to the reference over each entry's first lens[b] keys."""
    steelattn.reset_dispatch_stats()
    out = steelattn.flash_attention_kvcache(q, k_cache, v_cache,
                                            cache_seqlens=torch.tensor(lens, dtype=torch.int32, device="cuda"), **kw)
    assert _ran() == {"forward": {"cuda_decode": 1}}, _ran()
    ref, _ = _kvcache_reference(q, hist_k, hist_v, lens)
    assert_close(out, ref, torch.bfloat16)


@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("window", [None, (100, 0)])
def test_kvcache_lengths_on_device_with_splits(D, window):
    """Ragged lengths (0, 1, long, short) in a large cache: many splits, most of them empty
    for the short entries; an empty cache gives zeros and LSE = -inf."""
    B, H, Hkv, N, Smax = 4, 8, 2, 1, 40000
    q, k, v = _inputs(B, H, Hkv, N, Smax, D, D, torch.bfloat16, seed=D)
    lens = [0, 1, 39999, 17]
    steelattn.reset_dispatch_stats()
    out, lse = steelattn.flash_attention_kvcache(q, k, v, cache_seqlens=torch.tensor(lens, dtype=torch.int32,
                                                                                     device="cuda"),
                                                 window_size=window, return_lse=True)
    assert _ran() == {"forward": {"cuda_decode": 1}}, _ran()
    ref, ref_lse = _kvcache_reference(q, k, v, lens, window_left=-1 if window is None else window[0])
    assert torch.equal(out[0].float(), torch.zeros_like(out[0].float())) and torch.isneginf(lse[0]).all()
    assert_close(out, ref, torch.bfloat16)
    assert_lse_close(lse, ref_lse, torch.bfloat16)


@pytest.mark.parametrize("H,Hkv,N", [(4, 2, 200), (32, 8, 16), (8, 1, 7)])
def test_kvcache_many_rows_run_on_the_decode_kernel(H, Hkv, N):
    """Row groups (speculative tokens, a prefill chunk) against a cache: the only CUDA kernel
    that takes cache lengths serves them in several row groups."""
    B, Smax, D = 2, 1000, 128
    q, k, v = _inputs(B, H, Hkv, N, Smax, D, D, torch.float16, seed=5 + N)
    lens = [700, 1000]
    out = steelattn.flash_attention_kvcache(q, k, v, cache_seqlens=torch.tensor(lens, dtype=torch.int32,
                                                                               device="cuda"))
    assert _ran() == {"forward": {"cuda_decode": 1}}, _ran()
    ref, _ = _kvcache_reference(q, k, v, lens)
    assert_close(out, ref, torch.float16)


def test_cuda_graph_replays_with_new_lengths():
    """Lengths live on the device: one captured decode step replays correctly as they change."""
    B, H, Hkv, Smax, D = 3, 16, 4, 9000, 128
    q, k, v = _inputs(B, H, Hkv, 1, Smax, D, D, torch.bfloat16, seed=11)
    lens = torch.tensor([5, 4000, 8999], dtype=torch.int32, device="cuda")
    static_q = q.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the graph
        steelattn.flash_attention_kvcache(static_q, k, v, cache_seqlens=lens)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = steelattn.flash_attention_kvcache(static_q, k, v, cache_seqlens=lens)
    for new in ([1, 2, 3], [8999, 0, 4500], [7000, 7001, 7002]):
        lens.copy_(torch.tensor(new, dtype=torch.int32))
        static_q.copy_(torch.randn_like(static_q))
        graph.replay()
        torch.cuda.synchronize()
        ref, _ = _kvcache_reference(static_q, k, v, new)
        assert_close(static_out, ref, torch.bfloat16)


def test_calls_outside_the_decode_kernel_say_why():
    """fp32, unaligned head dims and wide row groups go elsewhere; the reason names the kernel."""
    q, k, v = _inputs(1, 8, 8, 1, 500, 64, 64, torch.float32, seed=2)
    steelattn.flash_attention(q, k, v)
    assert "cuda_decode" not in _ran()["forward"]
    steelattn.reset_dispatch_stats()
    q, k, v = _inputs(1, 32, 8, 32, 500, 64, 64, torch.bfloat16, seed=3)  # 128 rows per KV head: prefill-shaped
    steelattn.flash_attention(q, k, v)
    assert "cuda_decode" not in _ran()["forward"]
    q, k, v = _inputs(1, 4, 4, 1, 300, 36, 36, torch.bfloat16, seed=4)  # D % 8 != 0
    steelattn.reset_dispatch_stats()
    out = steelattn.flash_attention(q, k, v)
    assert "cuda_decode" not in _ran()["forward"]
    ref, _, _ = attention_reference(q.cpu(), k.cpu(), v.cpu(), diag_offset=299)
    assert_close(out, ref, torch.bfloat16, tol=TOL[torch.bfloat16])
    # With cache lengths no other CUDA kernel serves it: the torch path, and the reason is kept.
    steelattn.reset_dispatch_stats()
    out = steelattn.flash_attention_kvcache(q, k, v, cache_seqlens=torch.tensor([200], dtype=torch.int32,
                                                                              device="cuda"))
    stats = _ran()
    assert stats["forward"] == {"torch": 1}, stats
    assert any("cuda_decode: head dims must be multiples of 8" in why for why in stats["demotions"]), stats
    ref, _ = _kvcache_reference(q, k, v, [200])
    assert_close(out, ref, torch.bfloat16)


@pytest.mark.parametrize("page_size", [1, 16, 37, 256])
def test_paged_and_slot_mapped_caches_are_read_in_place(page_size):
    """Pages through a shuffled block table (unused entries -1) and cache slots through
    cache_batch_idx: the decode kernel reads them where they lie, no gather (dispatch stats)."""
    B, H, Hkv, D, Smax = 3, 16, 4, 128, 3000
    g = torch.Generator(device="cuda").manual_seed(page_size)
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    hist_k = torch.randn(B, Hkv, Smax, D, device="cuda", dtype=torch.bfloat16, generator=g)
    hist_v = torch.randn(B, Hkv, Smax, D, device="cuda", dtype=torch.bfloat16, generator=g)
    lens = [2999, 0, 1234]
    P = -(-Smax // page_size)
    perm = torch.randperm(B * P + 5, device="cuda")[:B * P].view(B, P).to(torch.int32)
    pool_k = torch.randn(B * P + 5, page_size, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    pool_v = torch.randn_like(pool_k)
    padded = torch.zeros(B, Hkv, P * page_size, D, device="cuda", dtype=torch.bfloat16)
    for src, pool in ((hist_k, pool_k), (hist_v, pool_v)):
        padded.zero_()
        padded[:, :, :Smax] = src
        pool[perm.long()] = padded.view(B, Hkv, P, page_size, D).permute(0, 2, 3, 1, 4)
    table = perm.clone()
    for b, n in enumerate(lens):  # pages past the length are unused: -1, never read
        table[b, -(-n // page_size):] = -1
    _check_read_in_place(q, pool_k, pool_v, hist_k, hist_v, lens, block_table=table)

    slots = torch.tensor([2, 0, 1], dtype=torch.int32, device="cuda")  # entry b reads cache slots[b]
    caches_k, caches_v = hist_k[[1, 2, 0]].contiguous(), hist_v[[1, 2, 0]].contiguous()
    _check_read_in_place(q, caches_k, caches_v, hist_k, hist_v, lens, cache_batch_idx=slots)


@pytest.mark.parametrize("page_size", [16, 64, 48])
@pytest.mark.parametrize("D,keys", [(128, 32), (128, 16), (64, 32)])
def test_paged_pools_with_their_own_strides(page_size, D, keys):
    """K's pool slot-major ([num_pages, page, Hkv, D] as stored), V's head-major (stored
    [num_pages, Hkv, page, D], passed as the same shape transposed), so the copy finds a
    row's K and V at different offsets; pages of 16 and 48 split the kernel's key tiles,
    pages of 64 hold whole tiles (the copy's one-page case), 48 is not a power of two.
    keys: the kernel's key tile, which the batch picks (16-key tiles at D128 once batch x KV
    heads passes 4 x SMs, decode_api.cu)."""
    H, Hkv, Smax = 8, 2, 1500
    B = 2 if keys == 32 else 300  # B x Hkv > 4 x SMs picks 16-key tiles at D128 (decode_api.cu)
    g = torch.Generator(device="cuda").manual_seed(page_size + D + keys)
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    hist_k = torch.randn(B, Hkv, Smax, D, device="cuda", dtype=torch.bfloat16, generator=g)
    hist_v = torch.randn(B, Hkv, Smax, D, device="cuda", dtype=torch.bfloat16, generator=g)
    lens = [(1499 - 7 * b) % Smax for b in range(B)]
    lens[0] = 1499
    P = -(-Smax // page_size)
    perm = torch.randperm(B * P, device="cuda").view(B, P).to(torch.int32)
    padded = torch.zeros(B, Hkv, P * page_size, D, device="cuda", dtype=torch.bfloat16)
    padded[:, :, :Smax] = hist_k
    pool_k = torch.empty(B * P, page_size, Hkv, D, device="cuda", dtype=torch.bfloat16)
    pool_k[perm.view(-1).long()] = padded.view(B, Hkv, P, page_size, D).permute(0, 2, 3, 1, 4).reshape(
        B * P, page_size, Hkv, D)
    padded[:, :, :Smax] = hist_v
    store_v = torch.empty(B * P, Hkv, page_size, D, device="cuda", dtype=torch.bfloat16)
    store_v[perm.view(-1).long()] = padded.view(B, Hkv, P, page_size, D).permute(0, 2, 1, 3, 4).reshape(
        B * P, Hkv, page_size, D)
    _check_read_in_place(q, pool_k, store_v.transpose(1, 2), hist_k, hist_v, lens, block_table=perm)


@pytest.mark.parametrize("shape", ["padding [B,1,1,S]", "per head [B,H,N,S]"])
@pytest.mark.parametrize("S", [300, 9000])
def test_bool_mask_on_the_decode_kernel(shape, S):
    """Boolean keep-masks (transformers' static-cache decode passes one) on the decode kernel;
    rows whose keys are all hidden give zeros and LSE = -inf."""
    B, H, Hkv, N, D = 3, 8, 2, 2, 128
    q, k, v = _inputs(B, H, Hkv, N, S, D, D, torch.bfloat16, seed=S + len(shape))
    g = torch.Generator(device="cuda").manual_seed(7)
    if shape.startswith("padding"):
        mask = torch.ones(B, 1, 1, S, dtype=torch.bool, device="cuda")
        mask[0, ..., :S // 3] = False  # left padding
        mask[1, ..., S // 2:] = False  # empty static-cache slots
        mask[2] = False                # nothing visible
    else:
        mask = torch.rand(B, H, N, S, generator=g, device="cuda") > 0.7
    steelattn.reset_dispatch_stats()
    out, lse = steelattn.flash_attention(q, k, v, attn_bias=mask, causal=True, return_lse=True)
    assert _ran() == {"forward": {"cuda_decode": 1}}, _ran()
    ref, ref_lse, _ = attention_reference(q.cpu(), k.cpu(), v.cpu(), bool_mask=mask.cpu(), diag_offset=S - N,
                                          window_right=0)
    assert_close(out, ref, torch.bfloat16)
    assert_lse_close(lse, ref_lse, torch.bfloat16)


def test_strided_views_of_q_and_the_cache():
    """q as [B, N, H, D] storage and caches as [B, Smax, Hkv, D] storage (the layouts models
    and serving engines keep), viewed as [B, H, N, D] / [B, Hkv, Smax, D]: read in place."""
    B, H, Hkv, N, Smax, D = 2, 16, 4, 1, 7000, 128
    g = torch.Generator(device="cuda").manual_seed(9)
    q = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    k = torch.randn(B, Smax, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    v = torch.randn(B, Smax, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    lens = [6999, 1234]
    steelattn.reset_dispatch_stats()
    out = steelattn.flash_attention_kvcache(q, k, v, cache_seqlens=torch.tensor(lens, dtype=torch.int32,
                                                                               device="cuda"))
    assert _ran() == {"forward": {"cuda_decode": 1}}, _ran()
    ref, _ = _kvcache_reference(q, k, v, lens)
    assert_close(out, ref, torch.bfloat16)
