"""flash_attention_sparse against the float64 reference with the block mask expanded to a
token mask: block sizes that do not match the kernels' tiles, per-head and per-batch
masks, causal / window / softcap / GQA inside active blocks, rows with no active block,
forward, lse and gradients; inactive key blocks are never read (NaN there changes
nothing); FlexAttention BlockMask input; the mask builders' output; bad input."""
import math

import pytest
import torch
from conftest import TOL, assert_close, assert_lse_close, randn

import steelattn
from steelattn.reference import attention_reference
from steelattn.sparse import token_mask


def reference(q, k, v, keep, **kw):
    r = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    out, lse, _ = attention_reference(*r, bool_mask=keep.cpu(), **kw)
    return r, out, lse


CASES = [  # (name, B, H, Hkv, N, S, D, block_size, mask dims, kwargs)
    ("2d 16x16", 2, 4, 4, 77, 77, 64, (16, 16), 2, {}),
    ("per-head 32x48 causal gqa", 2, 6, 2, 150, 170, 32, (32, 48), 3, {"causal": True}),
    ("per-batch 128 window softcap", 2, 4, 1, 300, 260, 64, (128, 128), 4, {"window_size": (90, 20), "softcap": 15.0}),
    ("64x16 causal", 1, 2, 2, 200, 200, 80, (64, 16), 4, {"causal": True}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,B,H,Hkv,N,S,D,bs,dims,kw", CASES, ids=[c[0] for c in CASES])
def test_sparse_matches_token_mask_reference(device, rng, dtype, name, B, H, Hkv, N, S, D, bs, dims, kw):
    nq, nk = math.ceil(N / bs[0]), math.ceil(S / bs[1])
    shape = {2: (nq, nk), 3: (H, nq, nk), 4: (B, H, nq, nk)}[dims]
    blocks = torch.rand(shape, generator=rng) < 0.45
    blocks.view(-1, nq, nk)[:, 1, :] = False  # query block 1 sees nothing: zeros, lse = -inf
    blocks = blocks.to(device)
    q = randn(B, H, N, D, dtype=dtype, device=device, generator=rng).requires_grad_()
    k = randn(B, Hkv, S, D, dtype=dtype, device=device, generator=rng).requires_grad_()
    v = randn(B, Hkv, S, D, dtype=dtype, device=device, generator=rng).requires_grad_()
    out, lse = steelattn.flash_attention_sparse(q, k, v, blocks, block_size=bs, return_lse=True, **kw)

    keep = token_mask(blocks.reshape((1,) * (4 - dims) + shape), bs[0], bs[1], N, S).expand(B, H, N, S)
    wl, wr = kw.get("window_size", (-1, -1))
    if kw.get("causal"):
        wr = 0
    r, ref, ref_lse = reference(q, k, v, keep, diag_offset=S - N, window_left=wl, window_right=wr,
                                softcap=kw.get("softcap", 0.0))
    assert_close(out.detach(), ref.detach(), dtype)
    assert_lse_close(lse, ref_lse.detach(), dtype)
    assert torch.all(out[:, :, bs[0]:2 * bs[0]].detach() == 0) and torch.all(lse[:, :, bs[0]:2 * bs[0]] == -math.inf)
    dout = randn(*out.shape, dtype=dtype, device=device, generator=rng)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, r, dout.cpu().double())
    for what, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(a, b, dtype, what=what, tol=3 * TOL[dtype])
    stats = steelattn.get_dispatch_stats()
    if device == "cpu":
        assert "torch" not in stats["forward"] and not stats["demotions"], stats
    elif kw.get("dropout_p") or "alibi_slopes" in kw:  # the torch path, counted
        assert stats["forward"] == {"torch": 1}, stats
        assert any("block_mask" in r for r in stats["demotions"]), stats
    elif _on_hopper_sparse(dtype, D, bs):
        assert stats["forward"] == {"cuda_sm90": 1} and stats["backward"] == {"cuda_sm90": 1}, stats
        assert not stats["demotions"], stats
    else:  # off the Hopper kernels' tiles: dense steelattn calls with a token mask, noted
        assert "torch" not in stats["forward"] and set(stats["forward"]) <= {"cuda_generic"}, stats
        assert any("block-sparse on CUDA -> dense kernel" in r for r in stats["demotions"]), stats


def _on_hopper_sparse(dtype, D, bs, Dv=None):
    """Whether a CUDA block-sparse training call runs on the Hopper kernels: an H100/H200,
    fp16/bf16, head dims in [64, 128], any block size (src/cuda/sm90/launch.cu, bwd_launch.cu;
    sizes that are not whole tiles through the per-tile state of block_mask_tiles.cu)."""
    return (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and
            dtype in (torch.float16, torch.bfloat16) and 64 <= min(D, Dv or D) and max(D, Dv or D) <= 128)


def test_inactive_blocks_are_never_read(rng):
    """NaN in K/V rows whose key blocks are inactive for every query block does not reach
    the output or the gradients: those tiles are skipped, not masked after loading."""
    B, H, N, S, D = 1, 2, 256, 512, 64
    blocks = torch.ones(2, 4, dtype=torch.bool)
    blocks[:, 2] = False  # keys 256..383
    q = randn(B, H, N, D, dtype=torch.float32, device="cpu", generator=rng).requires_grad_()
    k = randn(B, H, S, D, dtype=torch.float32, device="cpu", generator=rng)
    v = randn(B, H, S, D, dtype=torch.float32, device="cpu", generator=rng)
    k[:, :, 256:384] = float("nan")
    v[:, :, 256:384] = float("nan")
    k.requires_grad_(), v.requires_grad_()
    out = steelattn.flash_attention_sparse(q, k, v, blocks, block_size=128)
    assert torch.isfinite(out).all()
    keep = token_mask(blocks, 128, 128, N, S)
    kk, vv = (torch.where(keep.any(0)[None, None, :, None], t.detach(), torch.zeros(())) for t in (k, v))
    ref = attention_reference(q.detach().double(), kk.double(), vv.double(), bool_mask=keep, diag_offset=S - N)[0]
    assert_close(out.detach(), ref, torch.float32)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert torch.isfinite(dq).all()
    assert torch.all(dk[:, :, 256:384] == 0) and torch.all(dv[:, :, 256:384] == 0)


def test_mask_builder_output(device, rng):
    N, D, bs = 333, 64, 64
    q, k, v = (randn(1, 2, N, D, dtype=torch.float32, device=device, generator=rng) for _ in range(3))
    blocks = steelattn.make_sliding_window_mask(N, window_size=100, block_size=bs, causal=True, device=device)
    out = steelattn.flash_attention_sparse(q, k, v, blocks, block_size=bs, causal=True, window_size=(100, 0))
    ref = steelattn.flash_attention(q.double(), k.double(), v.double(), causal=True, window_size=(100, 0))
    assert_close(out, ref, torch.float32)  # the blocks cover the window: the dense answer


def test_flex_block_mask(rng):
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    N, D = 300, 64
    q, k, v = (randn(2, 2, N, D, dtype=torch.float32, device="cpu", generator=rng) for _ in range(3))
    doc = torch.arange(N) // 70  # documents of 70 tokens: partial blocks where documents change

    def mask_mod(b, h, qi, ki):
        return (qi >= ki) & (doc[qi] == doc[ki])
    bm = fa.create_block_mask(mask_mod, None, None, N, N, device="cpu", BLOCK_SIZE=128)
    out = steelattn.flash_attention_sparse(q, k, v, bm)
    keep = (torch.arange(N)[:, None] >= torch.arange(N)[None]) & (doc[:, None] == doc[None])
    ref = attention_reference(q.double(), k.double(), v.double(), bool_mask=keep)[0]
    assert_close(out, ref, torch.float32)


FLEX_BANDS = [  # (name, mask_mod builder(N), band the conversion should find or None)
    ("causal", lambda N: lambda b, h, qi, ki: qi >= ki, (-1, 0)),
    ("window 100", lambda N: lambda b, h, qi, ki: (qi >= ki) & (qi - ki <= 100), (100, 0)),
    ("documents of 64, causal", lambda N: lambda b, h, qi, ki: (qi >= ki) & (qi // 64 == ki // 64), (-1, 0)),
    ("documents of 48", lambda N: lambda b, h, qi, ki: qi // 48 == ki // 48, (-1, -1)),
    ("documents of 70, causal", lambda N: lambda b, h, qi, ki: (qi >= ki) & (qi // 70 == ki // 70), None),
    # S = N + 100: causal at the bottom-right diagonal (steelattn's) fits; top-left does not
    ("bottom-right causal, S > N", lambda N: lambda b, h, qi, ki: ki <= qi + 100, (-1, 0)),
    ("top-left causal, S > N", lambda N: lambda b, h, qi, ki: ki <= qi, None),
]


@pytest.mark.parametrize("name,mod,band", FLEX_BANDS, ids=[c[0] for c in FLEX_BANDS])
def test_flex_block_mask_as_cells_and_band(rng, name, mod, band):
    """A BlockMask whose mask_mod is 16 x 16 cells cut by a band (causal, a causal window,
    16-aligned documents) becomes a 16 x 16 block mask plus that band, with no token mask
    (what the Hopper kernels take); others keep the token mask. Both match the reference."""
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    from steelattn.sparse import _from_flex
    N, D = 300, 32
    S = N + 100 if "S > N" in name else N
    mask_mod = mod(N)
    bm = fa.create_block_mask(mask_mod, None, None, N, S, device="cpu", BLOCK_SIZE=128)
    blocks, bs, token, found = _from_flex(bm, 2, 2, N, S, "cpu")
    assert found == band and (token is None) == (band is not None)
    from steelattn.sparse import _from_flex_cached  # the conversion runs once per BlockMask and shape
    assert _from_flex_cached(bm, 2, 2, N, S, "cpu") is _from_flex_cached(bm, 2, 2, N, S, "cpu")
    if band is not None:
        assert bs == (16, 16) and blocks.shape[-2:] == (-(-N // 16), -(-S // 16))
    q, k, v = (randn(2, 2, n, D, dtype=torch.float32, device="cpu", generator=rng).requires_grad_()
               for n in (N, S, S))
    out = steelattn.flash_attention_sparse(q, k, v, bm)
    i, j = torch.arange(N).view(-1, 1), torch.arange(S).view(1, -1)
    keep = mask_mod(None, None, i, j)
    r, ref, _ = reference(q, k, v, keep.expand(2, 2, N, S))
    assert_close(out.detach(), ref.detach(), torch.float32)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    g_ref = torch.autograd.grad(ref.sum(), r)
    for a, b in zip(g, g_ref):
        assert_close(a, b, torch.float32, what="grad", tol=3 * TOL[torch.float32])


def test_sparse_bad_input():
    q = k = v = torch.randn(1, 2, 100, 32)
    with pytest.raises(ValueError, match="block_size"):
        steelattn.flash_attention_sparse(q, k, v, torch.ones(5, 5, dtype=torch.bool), block_size=24)
    with pytest.raises(ValueError, match=r"block_mask must be \[NQ, NK\]"):
        steelattn.flash_attention_sparse(q, k, v, torch.ones(3, 3, dtype=torch.bool), block_size=16)
    with pytest.raises(TypeError, match="block_mask must be bool"):
        steelattn.flash_attention_sparse(q, k, v, torch.ones(7, 7), block_size=16)
    with pytest.raises(ValueError, match="leading dims"):
        steelattn.flash_attention_sparse(q, k, v, torch.ones(3, 7, 7, dtype=torch.bool), block_size=16)


def test_torch_path_matches(rng):
    """backend='torch' (the path CUDA calls take until the CUDA kernels take block masks)
    gives what the kernels give, gradients included."""
    q, k, v = (randn(2, 4, 90, 32, dtype=torch.float32, device="cpu", generator=rng).requires_grad_() for _ in range(3))
    blocks = torch.rand(4, 6, 6, generator=rng) < 0.6
    outs = [steelattn.flash_attention_sparse(q, k, v, blocks, block_size=16, causal=True, backend=b)
            for b in ("auto", "torch")]
    assert_close(outs[1], outs[0].detach().double(), torch.float32)
    ga = torch.autograd.grad(outs[0].sum(), (q, k, v))
    gb = torch.autograd.grad(outs[1].sum(), (q, k, v))
    for a, b in zip(ga, gb):
        assert_close(b, a.double(), torch.float32, what="grad", tol=3e-5)


def test_sparse_opcheck_and_compile():
    """The registered op carries the block mask (opcheck), and a block-sparse call traces
    under torch.compile(fullgraph=True) with its gradients."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 70, 16, generator=g, requires_grad=True) for _ in range(3))
    blocks = torch.rand(2, 5, 5, generator=g) < 0.6
    bm = blocks.unsqueeze(0)
    args = (q, k, v, None, None, None, 0.25, 0.0, 0, -1, 0, 0.0, None, False, None, None, bm, 16, 16)
    torch.library.opcheck(torch.ops.steelattn.attention_fwd.default, args)

    def f(q, k, v):
        return steelattn.flash_attention_sparse(q, k, v, blocks, block_size=16, causal=True)
    ref = f(q, k, v)
    ref_g = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_block_mask_selection_while_tracing():
    """Under torch.compile the kernels' selection for a block-sparse call runs once while
    tracing (api._block_mask_refusal, on shapes, strides and dtypes): no graph break, and a
    reason string where no kernel takes the call (a CUDA description on a machine or build
    without the Hopper kernels)."""
    from steelattn import api
    from steelattn._extra import Extra
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 70, 16, generator=g) for _ in range(3))
    ex = Extra(block_mask=(torch.rand(1, 2, 5, 5, generator=g) < 0.6), block_q=16, block_k=16)
    args = (None, ex, 0.25, 0.0, 0, -1, 0, 0.0, False, True)
    assert api._block_mask_refusal(q, k, v, *args) is None  # the CPU kernels take it, gradients too

    def f(q, k, v):
        return q * (2.0 if api._block_mask_refusal(q, k, v, *args) is None else 3.0)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v), 2 * q)
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)):
        from steelattn._tensor import fake
        cuda = [fake(tuple(t.shape), torch.bfloat16, "cuda") for t in (q, k, v)]
        out, lse = fake((1, 2, 70, 16), torch.bfloat16, "cuda"), fake((1, 2, 70), torch.float32, "cuda")
        bm = fake((1, 2, 5, 5), torch.bool, "cuda")
        path, note, _, _ = api._select(*cuda, out, lse, None, (0.25, 0.0, 0, -1, 0, 0.0, 0, 0, False),
                                       tuple(ex._replace(block_mask=bm)))
        assert path == "none" and note


@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"window_size": (40, 10), "softcap": 10.0}])
def test_dense_chunks_equal_the_sparse_call(rng, lead, kw):
    """The CUDA stand-in (dense calls with a token mask over query chunks) gives the block-sparse
    result, chunk boundaries included (a tiny mask budget forces many chunks); checked on the
    CPU kernels against the CPU block-sparse kernel and the reference, with gradients."""
    from steelattn.sparse import dense_chunks
    B, H, Hkv, N, S, D, bq, bk = 2, 3, 1, 100, 130, 32, 32, 16
    q, k, v = (randn(B, h, n, D, dtype=torch.float64, device="cpu", generator=rng).requires_grad_()
               for h, n in ((H, N), (Hkv, S), (Hkv, S)))
    nq, nk = -(-N // bq), -(-S // bk)
    mask = torch.rand(*lead, nq, nk, generator=rng) > 0.4
    ref = steelattn.flash_attention_sparse(q, k, v, mask, block_size=(bq, bk), **kw)
    wl, wr = kw.get("window_size", (-1, 0 if kw.get("causal") else -1))
    mask4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    out, lse = dense_chunks(q, k, v, mask4, bq, bk, None, 1 / D ** 0.5, kw.get("softcap", 0.0), wl, wr, False,
                            max_mask_bytes=7 * S * 6)  # 7 rows per chunk at most
    assert torch.allclose(out, ref, atol=1e-10)
    g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    g = torch.autograd.grad(out.sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-9)


HOPPER_CASES = [  # (name, B, H, Hkv, N, S, D, Dv, block_size, mask dims, kwargs)
    ("2d 128 d64", 2, 4, 4, 300, 333, 64, 64, (128, 128), 2, {}),
    ("per-head 256x128 causal gqa d128", 1, 6, 2, 700, 650, 128, 128, (256, 128), 3, {"causal": True}),
    ("per-batch 128x256 window softcap alibi", 2, 4, 1, 520, 900, 128, 128, (128, 256), 4,
     {"window_size": (300, 40), "softcap": 20.0, "alibi": True}),
    ("dv 96 full", 1, 2, 2, 129, 1000, 64, 96, (128, 128), 2, {}),
    # Block sizes that are not whole tiles: partly active tiles test the mask per 16 x 16 cell.
    ("off-tile 2d 64 d64", 2, 4, 4, 300, 400, 64, 64, (64, 64), 2, {}),
    ("off-tile per-head 48x80 causal gqa d128", 1, 6, 2, 700, 650, 128, 128, (48, 80), 3, {"causal": True}),
    ("off-tile per-batch 16x32 window softcap alibi d96", 2, 4, 1, 260, 400, 96, 96, (16, 32), 4,
     {"window_size": (150, 30), "softcap": 20.0, "alibi": True}),
    ("off-tile 192x144 d128 full", 1, 3, 3, 500, 1000, 128, 128, (192, 144), 3, {}),
]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,B,H,Hkv,N,S,D,Dv,bs,dims,kw", HOPPER_CASES, ids=[c[0] for c in HOPPER_CASES])
def test_hopper_sparse(rng, grad, dtype, name, B, H, Hkv, N, S, D, Dv, bs, dims, kw):
    """Calls whose block sizes are multiples of the Hopper kernels' tiles run there, forward
    and backward, skipping inactive blocks: NaN in K/V rows that no active block covers
    changes nothing (and their dK, dV are zero); rows with no active block give zeros and
    lse = -inf."""
    check_hopper_sparse(rng, grad, dtype, B, H, Hkv, N, S, D, Dv, bs, dims, kw)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name,B,H,Hkv,N,S,D,Dv,bs,dims,kw", HOPPER_CASES, ids=[c[0] for c in HOPPER_CASES])
def test_hopper_sparse_backward_on_mask_rows(rng, name, B, H, Hkv, N, S, D, Dv, bs, dims, kw, monkeypatch):
    """The backward walking the caller's mask itself, down its columns a byte at a time
    (STEELATTN_SM90_BWD_MASK_COLUMNS=0; the default walks a transposed copy): the same checks
    as test_hopper_sparse, whole-tile and off-tile masks, broadcast and per-head and per-batch."""
    monkeypatch.setenv("STEELATTN_SM90_BWD_MASK_COLUMNS", "0")
    check_hopper_sparse(rng, True, torch.bfloat16, B, H, Hkv, N, S, D, Dv, bs, dims, kw)


def check_hopper_sparse(rng, grad, dtype, B, H, Hkv, N, S, D, Dv, bs, dims, kw, tile_n=128):
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper forward needs compute capability 9.0")
    kw = dict(kw)
    nq, nk = math.ceil(N / bs[0]), math.ceil(S / bs[1])
    shape = {2: (nq, nk), 3: (H, nq, nk), 4: (B, H, nq, nk)}[dims]
    blocks = torch.rand(shape, generator=rng) < 0.5
    blocks.view(-1, nq, nk)[:, 1, :] = False  # query block 1 sees nothing
    blocks.view(-1, nq, nk)[..., -1] = False  # the last key block is never read: NaN there
    # Keys of the last block from the first key-tile boundary on (tile_n: the kernels' key
    # tiles at this head dim): a tile there holds only inactive blocks, so it is never loaded.
    # (Keys of inactive blocks in partly active tiles are loaded and masked: finite here.)
    nan0 = ((nk - 1) * bs[1] + tile_n - 1) // tile_n * tile_n
    assert nan0 < S, "the case must leave a never-loaded key tile"
    q = randn(B, H, N, D, dtype=dtype, device="cuda", generator=rng)
    k = randn(B, Hkv, S, D, dtype=dtype, device="cuda", generator=rng)
    v = randn(B, Hkv, S, Dv, dtype=dtype, device="cuda", generator=rng)
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, :, nan0:] = float("nan")
    v_nan[:, :, nan0:] = float("nan")
    alibi = torch.rand(B, H, generator=rng).cuda() if kw.pop("alibi", False) else None
    for t in (q, k_nan, v_nan):
        t.requires_grad_(grad)
    steelattn.reset_dispatch_stats()
    out, lse = steelattn.flash_attention_sparse(q, k_nan, v_nan, blocks.cuda(), block_size=bs, return_lse=True,
                                                alibi_slopes=alibi, **kw)
    if grad:
        dout = randn(*out.shape, dtype=dtype, device="cuda", generator=rng)
        grads = torch.autograd.grad(out, (q, k_nan, v_nan), dout)
    stats = steelattn.get_dispatch_stats()
    assert stats["forward"] == {"cuda_sm90": 1} and not stats["demotions"], stats
    assert stats["backward"] == ({"cuda_sm90": 1} if grad else {}), stats

    keep = token_mask(blocks.reshape((1,) * (4 - dims) + shape), bs[0], bs[1], N, S).expand(B, H, N, S)
    wl, wr = kw.get("window_size", (-1, -1))
    if kw.get("causal"):
        wr = 0
    _, ref, ref_lse = reference(q, k, v, keep, diag_offset=S - N, window_left=wl, window_right=wr,
                                softcap=kw.get("softcap", 0.0), alibi_slopes=None if alibi is None else alibi.cpu())
    assert_close(out.cpu(), ref.detach(), dtype)
    assert_lse_close(lse, ref_lse.detach(), dtype)
    assert torch.all(out[:, :, bs[0]:2 * bs[0]] == 0) and torch.all(lse[:, :, bs[0]:2 * bs[0]] == -math.inf)
    if grad:
        r, ref, _ = reference(q, k, v, keep, diag_offset=S - N, window_left=wl, window_right=wr,
                              softcap=kw.get("softcap", 0.0), alibi_slopes=None if alibi is None else alibi.cpu())
        ref_grads = torch.autograd.grad(ref, r, dout.cpu().double())
        for what, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
            assert_close(a.cpu(), b, dtype, what=what, tol=3 * TOL[dtype])
        for t in grads[1:]:
            assert torch.all(t[:, :, (nk - 1) * bs[1]:] == 0)
    return stats


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_sparse_off_tile_sizes_skip_inactive_tiles(rng):
    """Block sizes that are not whole tiles: a 128-key tile whose 64-key blocks are all
    inactive is never loaded (NaN there changes nothing), forward and backward; the call is
    neither demoted nor noted."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper kernels need compute capability 9.0")
    q, k, v = (randn(1, 2, 512, 64, dtype=torch.bfloat16, device="cuda", generator=rng) for _ in range(3))
    blocks = torch.ones(8, 8, dtype=torch.bool)
    blocks[:, 2:4] = False  # keys 128..255: one whole key tile
    blocks[1, 5] = False    # a partly active tile
    blocks = blocks.cuda()
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, :, 128:256] = float("nan")
    v_nan[:, :, 128:256] = float("nan")
    for t in (q, k_nan, v_nan):
        t.requires_grad_()
    steelattn.reset_dispatch_stats()
    out = steelattn.flash_attention_sparse(q, k_nan, v_nan, blocks, block_size=64)
    dq, dk, dv = torch.autograd.grad(out, (q, k_nan, v_nan), torch.ones_like(out))
    stats = steelattn.get_dispatch_stats()
    assert stats["forward"] == {"cuda_sm90": 1} and stats["backward"] == {"cuda_sm90": 1}, stats
    assert not stats["demotions"], stats
    ref = steelattn.flash_attention_sparse(q.detach().cpu().float(), k.cpu().float(), v.cpu().float(), blocks.cpu(),
                                           block_size=64)
    assert_close(out.detach().cpu(), ref.double(), torch.bfloat16)
    assert torch.isfinite(dq).all() and torch.all(dk[:, :, 128:256] == 0) and torch.all(dv[:, :, 128:256] == 0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("bs", [(128, 128), (64, 48)])
def test_hopper_sparse_under_compile(rng, bs):
    """torch.compile(fullgraph=True) of a block-sparse training call runs the Hopper kernels
    (the selection made while tracing), forward and backward, with the eager result."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper kernels need compute capability 9.0")
    q, k, v = (randn(2, 4, 300, 64, dtype=torch.bfloat16, device="cuda", generator=rng).requires_grad_()
               for _ in range(3))
    blocks = (torch.rand(4, -(-300 // bs[0]), -(-300 // bs[1]), generator=rng) < 0.6).cuda()

    def f(q, k, v):
        return steelattn.flash_attention_sparse(q, k, v, blocks, block_size=bs, causal=True)
    ref = f(q, k, v)
    ref_g = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    compiled(q, k, v)  # compile
    steelattn.reset_dispatch_stats()
    out = compiled(q, k, v)
    g = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    stats = steelattn.get_dispatch_stats()
    assert stats["forward"] == {"cuda_sm90": 1} and stats["backward"] == {"cuda_sm90": 1}, stats
    assert_close(out.float(), ref.double(), torch.bfloat16)
    for a, b in zip(g, ref_g):
        assert_close(a.float(), b.double(), torch.bfloat16, what="grad", tol=3 * TOL[torch.bfloat16])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_hopper_flex_causal_block_mask(rng):
    """A FlexAttention BlockMask with a causal mask_mod (partial diagonal blocks) runs on the
    Hopper kernels as 16 x 16 cells and the causal band, forward and backward."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper kernels need compute capability 9.0")
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    N = 500
    bm = fa.create_block_mask(lambda b, h, qi, ki: (qi >= ki) & (qi - ki <= 200), None, None, N, N, device="cuda")
    q, k, v = (randn(2, 4, N, 128, dtype=torch.bfloat16, device="cuda", generator=rng).requires_grad_()
               for _ in range(3))
    steelattn.reset_dispatch_stats()
    out = steelattn.flash_attention_sparse(q, k, v, bm)
    g = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    stats = steelattn.get_dispatch_stats()
    assert stats["forward"] == {"cuda_sm90": 1} and stats["backward"] == {"cuda_sm90": 1}, stats
    assert not stats["demotions"], stats
    ref = steelattn.flash_attention(q, k, v, causal=True, window_size=(200, 0))
    ref_g = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
    assert_close(out.float(), ref.double(), torch.bfloat16)
    for a, b in zip(g, ref_g):
        assert_close(a.float(), b.double(), torch.bfloat16, what="grad", tol=3 * TOL[torch.bfloat16])


WIDE_CASES = [  # (name, D, Dv, block_size, kwargs): key tiles of 112 (D192) and 80 (D256)
    ("d192 causal", 192, 192, (128, 560), {"causal": True}),
    ("d256 window softcap", 256, 256, (256, 560), {"window_size": (700, 30), "softcap": 15.0}),
    ("d192 dv128", 192, 128, (128, 560), {}),
    ("d256 off-tile 64x96 causal", 256, 256, (64, 96), {"causal": True}),
    ("d192 off-tile 32x160", 192, 192, (32, 160), {}),
]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,D,Dv,bs,kw", WIDE_CASES, ids=[c[0] for c in WIDE_CASES])
def test_hopper_sparse_wide_forward(rng, dtype, name, D, Dv, bs, kw):
    """Block masks at head dims above 128 on the Hopper forward (key tiles of 112 and 80),
    checked as test_hopper_sparse checks the narrow ones (training calls at these head dims
    run as dense calls with a token mask: no Hopper backward takes block masks there)."""
    check_hopper_sparse(rng, False, dtype, 2, 4, 2, 600, 1900, D, Dv, bs, 3, kw, tile_n=112 if D == 192 else 80)
