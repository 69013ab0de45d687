"""flash_attention_varlen against the float64 reference, computed sequence by sequence
from the dense definition (each sequence its own bottom-right causal diagonal, window
and ALiBi distances): random lengths including 0 and 1, N_b != S_b, GQA, both layouts,
forward, lse and gradients; bad input; a CUDA graph replayed with new lengths. CUDA: the
Hopper forward runs varlen at head dims 64..256 (fp16/bf16), the generic kernels the rest
and every backward (one launch, lengths read on the device); the dispatch stats say which."""
import itertools

import pytest
import torch
from conftest import TOL, assert_close, assert_lse_close, randn

import steelattn
from steelattn.reference import attention_reference


def cu_of(lengths, device):
    return torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=device)


def reference(q, k, v, lq, lk, **kw):
    """float64 out [total_q, H, Dv] and lse [H, total_q], one dense call per sequence."""
    outs, lses = [], []
    q0 = k0 = 0
    for i, (n, s) in enumerate(zip(lq, lk)):
        qs = q[q0:q0 + n].permute(1, 0, 2).unsqueeze(0).double()
        ks = k[k0:k0 + s].permute(1, 0, 2).unsqueeze(0).double()
        vs = v[k0:k0 + s].permute(1, 0, 2).unsqueeze(0).double()
        alibi = kw.get("alibi")  # [H], or [num_seqs, H]: one row per sequence
        if alibi is not None and alibi.dim() == 2:
            alibi = alibi[i:i + 1]
        keep = kw.get("keep")  # dropout: the packed grid's keep-mask [1, H, total_q, total_k]
        o, lse, _ = attention_reference(qs, ks, vs, scale=kw.get("scale"), softcap=kw.get("softcap", 0.0),
                                        alibi_slopes=None if alibi is None else alibi.double(),
                                        diag_offset=s - n, window_left=kw.get("wl", -1),
                                        window_right=kw.get("wr", -1),
                                        dropout_keep=None if keep is None else keep[:, :, q0:q0 + n, k0:k0 + s],
                                        dropout_p=kw.get("dropout_p", 0.0))
        outs.append(o[0].permute(1, 0, 2))
        lses.append(lse[0])
        q0, k0 = q0 + n, k0 + s
    return torch.cat(outs, 0), torch.cat(lses, 1)


def reference_and_grads(q, k, v, lq, lk, dout, kw, alibi=None):
    """The float64 reference's output and its (dq, dk, dv) for dout, for a varlen call with
    keyword arguments kw (causal, window_size, softcap)."""
    wl, wr = kw.get("window_size", (-1, -1))
    if kw.get("causal"):
        wr = 0
    rq, rk, rv = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference(rq, rk, rv, lq, lk, softcap=kw.get("softcap", 0.0), wl=wl, wr=wr,
                       alibi=None if alibi is None else alibi.cpu())
    return ref.detach(), torch.autograd.grad(ref, (rq, rk, rv), dout.cpu().double())


def random_lengths(g, num, lo=0, hi=70):
    return torch.randint(lo, hi, (num,), generator=g).tolist()


CASES = [  # (name, H, Hkv, D, Dv, kwargs for flash_attention_varlen)
    ("full", 4, 4, 64, 64, {}),
    ("causal gqa", 8, 2, 64, 48, {"causal": True}),
    ("window", 4, 1, 32, 32, {"window_size": (9, 3)}),
    ("causal window softcap", 6, 3, 40, 40, {"causal": True, "window_size": (17, 0), "softcap": 20.0}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,H,Hkv,D,Dv,kw", CASES, ids=[c[0] for c in CASES])
def test_varlen_matches_per_sequence_reference(device, rng, dtype, name, H, Hkv, D, Dv, kw):
    lq = random_lengths(rng, 6) + [0, 1, 1]  # empty and one-token sequences
    lk = random_lengths(rng, 6) + [3, 0, 1]  # a query with no key: zeros, lse = -inf
    q = randn(sum(lq), H, D, dtype=dtype, device=device, generator=rng).requires_grad_()
    k = randn(sum(lk), Hkv, D, dtype=dtype, device=device, generator=rng).requires_grad_()
    v = randn(sum(lk), Hkv, Dv, dtype=dtype, device=device, generator=rng).requires_grad_()
    cq, ck = cu_of(lq, device), cu_of(lk, device)
    out, lse = steelattn.flash_attention_varlen(q, k, v, cq, ck, max_seqlen_q=max(lq), return_lse=True, **kw)
    assert out.shape == (sum(lq), H, Dv) and lse.shape == (H, sum(lq))
    wl, wr = kw.get("window_size", (-1, -1))
    if kw.get("causal"):
        wr = 0
    rq, rk, rv = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference(rq, rk, rv, lq, lk, softcap=kw.get("softcap", 0.0), wl=wl, wr=wr)
    assert_close(out.detach(), ref.detach(), dtype)
    assert_lse_close(lse.detach(), ref_lse.detach(), dtype)
    dout = randn(*out.shape, dtype=dtype, device=device, generator=rng)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (rq, rk, rv), dout.cpu().double())
    for what, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(a, b, dtype, what=what, tol=3 * TOL[dtype])
    stats = steelattn.get_dispatch_stats()
    if device == "cpu":
        assert "torch" not in stats["forward"] and not stats["demotions"], stats
    elif dtype == torch.float32:  # the SIMT kernels take no varlen: the torch path, counted
        assert stats["forward"] == {"torch": 1}, stats
        assert any("varlen runs on the tensor-core kernels only" in r for r in stats["demotions"]), stats
    else:
        fwd = "cuda_sm90" if _hopper_varlen(dtype, D, Dv) else "cuda_generic"
        bwd = "cuda_sm90" if _hopper_varlen(dtype, D, Dv) and max(D, Dv) <= 128 else "cuda_generic"
        assert stats["forward"] == {fwd: 1} and stats["backward"] == {bwd: 1}, stats


def _hopper_varlen(dtype, D, Dv):
    """Whether a CUDA varlen forward runs on the Hopper kernel (src/cuda/sm90/launch.cu)."""
    return (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and
            dtype in (torch.float16, torch.bfloat16) and all(64 <= d <= 256 and d % 8 == 0 for d in (D, Dv)))


HOPPER_CASES = [  # (name, H, Hkv, D, Dv, number of sequences, max length, kwargs)
    ("full d64 many", 4, 4, 64, 64, 40, 300, {}),
    ("causal gqa d128", 8, 2, 128, 128, 9, 700, {"causal": True}),
    ("window softcap d128", 4, 1, 128, 128, 7, 600, {"window_size": (200, 30), "softcap": 25.0}),
    ("causal alibi d256 dv128", 4, 2, 256, 128, 6, 500, {"causal": True, "alibi": True}),
    ("causal d192", 2, 2, 192, 192, 5, 400, {"causal": True}),
]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("layout", ["token-major", "seed [1, H, total, D]"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,H,Hkv,D,Dv,num,hi,kw", HOPPER_CASES, ids=[c[0] for c in HOPPER_CASES])
def test_hopper_varlen_forward(rng, layout, dtype, name, H, Hkv, D, Dv, num, hi, kw):
    """The Hopper forward over packed sequences: lengths that cross its 128-query and key
    tiles, empty sequences, one-token sequences, a query with no key (zeros, lse = -inf),
    N_b != S_b; enough sequences that virtual blocks include holes."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper forward needs compute capability 9.0")
    kw = dict(kw)
    lq = random_lengths(rng, num, 1, hi) + [0, 1, 130]
    lk = random_lengths(rng, num, 1, hi) + [5, 0, 129]
    q = randn(sum(lq), H, D, dtype=dtype, device="cuda", generator=rng)
    k = randn(sum(lk), Hkv, D, dtype=dtype, device="cuda", generator=rng)
    v = randn(sum(lk), Hkv, Dv, dtype=dtype, device="cuda", generator=rng)
    alibi = torch.rand(len(lq), H, generator=rng).cuda() if kw.pop("alibi", False) else None
    cq, ck = cu_of(lq, "cuda"), cu_of(lk, "cuda")
    args = (q, k, v) if layout == "token-major" else tuple(t.permute(1, 0, 2).unsqueeze(0) for t in (q, k, v))
    steelattn.reset_dispatch_stats()
    out, lse = steelattn.flash_attention_varlen(*args, cq, ck, return_lse=True, alibi_slopes=alibi, **kw)
    stats = steelattn.get_dispatch_stats()
    assert stats["forward"] == {"cuda_sm90": 1} and not stats["demotions"], stats
    if layout != "token-major":
        out = out[0].permute(1, 0, 2)
    wl, wr = kw.get("window_size", (-1, -1))
    if kw.get("causal"):
        wr = 0
    ref, ref_lse = reference(q.cpu(), k.cpu(), v.cpu(), lq, lk, softcap=kw.get("softcap", 0.0), wl=wl, wr=wr,
                             alibi=None if alibi is None else alibi.cpu())
    assert_close(out.cpu(), ref, dtype)
    assert_lse_close(lse.cpu(), ref_lse, dtype)


BWD_CASES = [  # (name, H, Hkv, D, Dv, number of sequences, max length, kwargs)
    ("full d64 many", 4, 4, 64, 64, 30, 300, {}),
    ("causal gqa d128", 8, 2, 128, 128, 7, 600, {"causal": True}),
    ("window softcap alibi d96", 4, 1, 96, 96, 6, 500, {"window_size": (150, 20), "softcap": 25.0, "alibi": True}),
]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,H,Hkv,D,Dv,num,hi,kw", BWD_CASES, ids=[c[0] for c in BWD_CASES])
@pytest.mark.parametrize("row_table,key_table", [("0", "0"), ("1", "0"), ("1", "1")],
                         ids=["rows searched", "row table", "row and key-block tables"])
def test_hopper_varlen_backward(rng, dtype, name, H, Hkv, D, Dv, num, hi, kw, row_table, key_table, monkeypatch):
    """The Hopper backward over packed sequences: virtual key blocks with holes, empty and one-token
    sequences, a query with no key, keys past a sequence that belong to the next one. The dQ
    post kernel finds a row's sequence in the preprocess's per-block table (the default), or by
    binary search (STEELATTN_SM90_VARLEN_ROW_TABLE=0); the main kernel's CTAs find their
    sequence by binary search, or in the preprocess's key-block table
    (STEELATTN_SM90_VARLEN_KEY_TABLE=1, prepared)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper backward needs compute capability 9.0")
    monkeypatch.setenv("STEELATTN_SM90_VARLEN_ROW_TABLE", row_table)
    monkeypatch.setenv("STEELATTN_SM90_VARLEN_KEY_TABLE", key_table)
    kw = dict(kw)
    lq = random_lengths(rng, num, 1, hi) + [0, 1, 130]
    lk = random_lengths(rng, num, 1, hi) + [5, 0, 129]
    q = randn(sum(lq), H, D, dtype=dtype, device="cuda", generator=rng).requires_grad_()
    k = randn(sum(lk), Hkv, D, dtype=dtype, device="cuda", generator=rng).requires_grad_()
    v = randn(sum(lk), Hkv, Dv, dtype=dtype, device="cuda", generator=rng).requires_grad_()
    alibi = torch.rand(len(lq), H, generator=rng).cuda() if kw.pop("alibi", False) else None
    steelattn.reset_dispatch_stats()
    out = steelattn.flash_attention_varlen(q, k, v, cu_of(lq, "cuda"), cu_of(lk, "cuda"), alibi_slopes=alibi,
                                           deterministic=False, **kw)
    dout = randn(*out.shape, dtype=dtype, device="cuda", generator=rng)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    stats = steelattn.get_dispatch_stats()
    assert stats["forward"] == {"cuda_sm90": 1} and stats["backward"] == {"cuda_sm90": 1}, stats
    ref, ref_grads = reference_and_grads(q, k, v, lq, lk, dout, kw, alibi)
    assert_close(out.detach().cpu(), ref, dtype)
    for what, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(a.cpu(), b, dtype, what=what, tol=3 * TOL[dtype])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"window_size": (90, 0)}], ids=["full", "causal", "window"])
def test_hopper_varlen_backward_one_cu_tensor(rng, D, kw):
    """Packed training batches pass one cu_seqlens tensor for queries and keys; with empty,
    one-token and 129-token sequences among them, on the Hopper backward, against the
    reference."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper backward needs compute capability 9.0")
    lens = random_lengths(rng, 9, 1, 400) + [0, 1, 129]
    cu = cu_of(lens, "cuda")
    q = randn(sum(lens), 8, D, dtype=torch.bfloat16, device="cuda", generator=rng).requires_grad_()
    k = randn(sum(lens), 2, D, dtype=torch.bfloat16, device="cuda", generator=rng).requires_grad_()
    v = randn(sum(lens), 2, D, dtype=torch.bfloat16, device="cuda", generator=rng).requires_grad_()
    steelattn.reset_dispatch_stats()
    out = steelattn.flash_attention_varlen(q, k, v, cu, cu, deterministic=False, **kw)
    dout = randn(*out.shape, dtype=torch.bfloat16, device="cuda", generator=rng)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert steelattn.get_dispatch_stats()["backward"] == {"cuda_sm90": 1}
    _, ref_grads = reference_and_grads(q, k, v, lens, lens, dout, kw)
    for what, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(a.cpu(), b, torch.bfloat16, what=what, tol=3 * TOL[torch.bfloat16])


def test_varlen_alibi_and_seed_layout(device, rng):
    H, Hkv, D = 4, 2, 32
    lq, lk = [5, 33, 0, 12], [5, 20, 7, 40]
    q = randn(1, H, sum(lq), D, dtype=torch.float32, device=device, generator=rng)
    k = randn(1, Hkv, sum(lk), D, dtype=torch.float32, device=device, generator=rng)
    v = randn(1, Hkv, sum(lk), D, dtype=torch.float32, device=device, generator=rng)
    slopes = torch.rand(len(lq), H, generator=rng).to(device)
    out = steelattn.flash_attention_varlen(q, k, v, cu_of(lq, device), cu_of(lk, device), causal=True,
                                           alibi_slopes=slopes)
    assert out.shape == (1, H, sum(lq), D)
    tok = [t[0].permute(1, 0, 2).cpu() for t in (q, k, v)]
    # Per-sequence slopes: the reference takes them one sequence at a time.
    outs, q0, k0 = [], 0, 0
    for b, (n, s) in enumerate(zip(lq, lk)):
        o, _ = reference(tok[0][q0:q0 + n], tok[1][k0:k0 + s], tok[2][k0:k0 + s], [n], [s],
                         alibi=slopes[b:b + 1].cpu(), wr=0)
        outs.append(o)
        q0, k0 = q0 + n, k0 + s
    assert_close(out[0].permute(1, 0, 2), torch.cat(outs), torch.float32)


def test_varlen_equals_dense_for_equal_lengths(rng):
    """Equal lengths: varlen is the dense call on [B, H, N, D] (same kernels, same numbers)."""
    B, H, N, D = 3, 4, 37, 64
    q, k, v = (randn(B, H, N, D, dtype=torch.float32, device="cpu", generator=rng) for _ in range(3))
    dense = steelattn.flash_attention(q, k, v, causal=True)
    pack = lambda t: t.permute(0, 2, 1, 3).reshape(B * N, H, D)
    cu = cu_of([N] * B, "cpu")
    out = steelattn.flash_attention_varlen(pack(q), pack(k), pack(v), cu, cu, causal=True)
    torch.testing.assert_close(out, pack(dense), rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_varlen_cuda_graph_replays_with_new_lengths():
    """cu_seqlens are read on the device: a captured call replays correctly after the
    lengths change in place (same totals), with no host synchronisation inside."""
    g = torch.Generator().manual_seed(3)
    H, D, dtype = 4, 64, torch.bfloat16
    lq, lk = [30, 70, 28], [50, 50, 40]
    q = randn(sum(lq), H, D, dtype=dtype, device="cuda", generator=g)
    k = randn(sum(lk), H, D, dtype=dtype, device="cuda", generator=g)
    v = randn(sum(lk), H, D, dtype=dtype, device="cuda", generator=g)
    cq, ck = cu_of(lq, "cuda"), cu_of(lk, "cuda")
    steelattn.flash_attention_varlen(q, k, v, cq, ck, causal=True)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = steelattn.flash_attention_varlen(q, k, v, cq, ck, causal=True)
    for new_q, new_k in (([1, 120, 7], [100, 0, 40]), ([64, 64, 0], [20, 60, 60])):
        cq.copy_(cu_of(new_q, "cuda"))
        ck.copy_(cu_of(new_k, "cuda"))
        graph.replay()
        torch.cuda.synchronize()
        ref, _ = reference(q.cpu(), k.cpu(), v.cpu(), new_q, new_k, wr=0)
        assert_close(out, ref, dtype)
    steelattn.reset_dispatch_stats()
    steelattn.flash_attention_varlen(q, k, v, cq, ck, causal=True)
    if torch.cuda.get_device_capability() == (9, 0):  # the graph above ran the Hopper forward
        assert steelattn.get_dispatch_stats()["forward"] == {"cuda_sm90": 1}


@pytest.mark.parametrize("bad,match", [
    (lambda cq, ck: (cq.long(), ck), "cu_seqlens_q must be int32"),
    (lambda cq, ck: (cq, ck[:-1]), "cu_seqlens_k"),
    (lambda cq, ck: (torch.tensor([0, 5, 3, 9], dtype=torch.int32), ck), "cu_seqlens_q must be non-decreasing"),
    (lambda cq, ck: (torch.tensor([1, 3, 5, 9], dtype=torch.int32), ck), "cu_seqlens_q must start at 0"),
    (lambda cq, ck: (cq, torch.tensor([0, 2, 4, 7], dtype=torch.int32)), r"cu_seqlens_k\[-1\] must equal"),
    (lambda cq, ck: (cq.reshape(2, 2), ck), "cu_seqlens_q must be 1-d"),
    # more than 256 entries: checked with tensor ops instead of a list
    (lambda cq, ck: (torch.tensor([0] * 150 + [5, 3] + [9] * 150, dtype=torch.int32),
                     torch.tensor([0] * 151 + [4] * 150 + [8], dtype=torch.int32)), "cu_seqlens_q must be non-decreasing"),
    (lambda cq, ck: (torch.tensor([0] * 151 + [4] * 150 + [9], dtype=torch.int32),
                     torch.tensor([0] * 151 + [4] * 150 + [7], dtype=torch.int32)), r"cu_seqlens_k\[-1\] must equal"),
])
def test_varlen_bad_input_names_the_argument(bad, match):
    q, k, v = torch.randn(9, 2, 16), torch.randn(8, 2, 16), torch.randn(8, 2, 16)
    cq, ck = torch.tensor([0, 3, 5, 9], dtype=torch.int32), torch.tensor([0, 2, 4, 8], dtype=torch.int32)
    with pytest.raises((TypeError, ValueError), match=match):
        steelattn.flash_attention_varlen(q, k, v, *bad(cq, ck))


def test_varlen_bad_layout():
    cq = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="q must be"):
        steelattn.flash_attention_varlen(torch.randn(2, 2, 2, 4, 8), torch.randn(4, 2, 8), torch.randn(4, 2, 8),
                                         cq, cq)


def _seed_of(generator_seed):
    """The (seed, offset) a call draws from torch.Generator().manual_seed(generator_seed)."""
    d = torch.randint(0, 2**62, (2,), generator=torch.Generator().manual_seed(generator_seed), dtype=torch.int64)
    return int(d[0]), int(d[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [{"causal": True}, {"window_size": (9, 3), "softcap": 20.0}], ids=["causal", "window"])
def test_varlen_dropout_matches_reference_with_packed_mask(device, rng, dtype, kw):
    """Dropout draws in the packed [1, H, total_q, total_k] grid: the kernel applies exactly
    that grid's pieces, forward and backward (float32 on CUDA takes the torch path, which
    draws the same pieces)."""
    p, H, Hkv, D = 0.3, 4, 2, 32
    lq = random_lengths(rng, 4) + [0, 1]
    lk = random_lengths(rng, 4) + [2, 1]
    q = randn(sum(lq), H, D, dtype=dtype, device=device, generator=rng).requires_grad_()
    k = randn(sum(lk), Hkv, D, dtype=dtype, device=device, generator=rng).requires_grad_()
    v = randn(sum(lk), Hkv, D, dtype=dtype, device=device, generator=rng).requires_grad_()
    cq, ck = cu_of(lq, device), cu_of(lk, device)
    out, lse = steelattn.flash_attention_varlen(q, k, v, cq, ck, dropout_p=p, return_lse=True,
                                                generator=torch.Generator().manual_seed(77), **kw)
    keep = steelattn.dropout_keep_mask(1, H, sum(lq), sum(lk), p, *_seed_of(77))
    wl, wr = kw.get("window_size", (-1, 0 if kw.get("causal") else -1))
    rq, rk, rv = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference(rq, rk, rv, lq, lk, softcap=kw.get("softcap", 0.0), wl=wl, wr=wr, keep=keep,
                             dropout_p=p)
    assert_close(out.detach(), ref.detach(), dtype)
    assert_lse_close(lse.detach(), ref_lse.detach(), dtype)  # the pre-dropout normaliser
    dout = randn(*out.shape, dtype=dtype, device=device, generator=rng)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (rq, rk, rv), dout.cpu().double())
    for what, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(a, b, dtype, what=what, tol=3 * TOL[dtype])


def test_varlen_dropout_sequences_draw_apart(device, rng):
    """Two copies of one sequence in a batch get different keep-masks (keyed by packed
    position), and the torch path draws the same ones as the kernels."""
    n, H, D = 24, 2, 16
    q1, k1, v1 = (randn(n, H, D, dtype=torch.float32, device=device, generator=rng) for _ in range(3))
    q, k, v = (torch.cat([t, t]) for t in (q1, k1, v1))
    cu = cu_of([n, n], device)
    out = steelattn.flash_attention_varlen(q, k, v, cu, cu, dropout_p=0.5, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(out[:n], out[n:])
    ref = steelattn.flash_attention_varlen(q, k, v, cu, cu, dropout_p=0.5, generator=torch.Generator().manual_seed(3),
                                           backend="torch")
    assert_close(out, ref.double(), torch.float32)


def test_varlen_torch_path_matches(rng):
    """backend='torch' (one sequence at a time, the path fp32 CUDA calls take) gives what
    the kernels give, gradients included."""
    lq, lk = [4, 0, 33, 1], [9, 2, 20, 0]
    q = randn(sum(lq), 4, 32, dtype=torch.float32, device="cpu", generator=rng).requires_grad_()
    k = randn(sum(lk), 2, 32, dtype=torch.float32, device="cpu", generator=rng).requires_grad_()
    v = randn(sum(lk), 2, 32, dtype=torch.float32, device="cpu", generator=rng).requires_grad_()
    cq, ck = cu_of(lq, "cpu"), cu_of(lk, "cpu")
    outs = [steelattn.flash_attention_varlen(q, k, v, cq, ck, causal=True, return_lse=True, backend=b)
            for b in ("auto", "torch")]
    assert_close(outs[1][0], outs[0][0].detach().double(), torch.float32)
    assert_lse_close(outs[1][1].detach(), outs[0][1].detach().double(), torch.float32)
    ga = torch.autograd.grad(outs[0][0].sum(), (q, k, v))
    gb = torch.autograd.grad(outs[1][0].sum(), (q, k, v))
    for a, b in zip(ga, gb):
        assert_close(b, a.double(), torch.float32, what="grad", tol=3e-5)


def test_varlen_opcheck_and_compile():
    """The registered op carries cu_seqlens (opcheck), and a varlen call traces under
    torch.compile(fullgraph=True) with its gradients."""
    g = torch.Generator().manual_seed(0)
    lq = [3, 0, 11, 5]
    cu = cu_of(lq, "cpu")
    q, k, v = (torch.randn(sum(lq), 4, 16, generator=g, requires_grad=True) for _ in range(3))
    pack = lambda t: t.permute(1, 0, 2).unsqueeze(0)  # noqa: E731
    args = (pack(q), pack(k), pack(v), None, None, None, 0.25, 0.0, 0, -1, 0, 0.0, None, False, cu, cu)
    torch.library.opcheck(torch.ops.steelattn.attention_fwd.default, args)

    def f(q, k, v):
        return steelattn.flash_attention_varlen(q, k, v, cu, cu, causal=True)
    ref = f(q, k, v)
    ref_g = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        out = torch.compile(f, fullgraph=True, backend=backend)(q, k, v)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, ref_g):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_token_major_output_gradient_is_a_view(rng):
    """A token-major call's out (and lse) reach the kernel's outputs through views whose
    gradients are views too: no select in between, whose gradient would be a zero-filled
    copy of the whole output (0.13 ms of a 1 ms step on the H200 bench)."""
    lens = [5, 0, 9]
    q, k, v = (randn(14, 4, 32, dtype=torch.float32, device="cpu", generator=rng).requires_grad_() for _ in range(3))
    cu = cu_of(lens, "cpu")
    out, lse = steelattn.flash_attention_varlen(q, k, v, cu, cu, causal=True, return_lse=True)
    for t in (out, lse):
        names, fn = [], t.grad_fn
        while fn is not None and not fn.next_functions == ():
            names.append(type(fn).__name__)
            nxt = [f for f, _ in fn.next_functions if f is not None and "AccumulateGrad" not in type(f).__name__]
            fn = nxt[0] if len(nxt) == 1 else None
        assert names and not any("Select" in n for n in names), names
