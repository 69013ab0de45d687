"""Gradients dQ, dK, dV (and d bias) against float64 reference gradients and torch's
SDPA gradients; gradcheck; torch.library opcheck; torch.compile(fullgraph=True)."""
import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, assert_close, randn

import steelattn
from steelattn.reference import attention_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _skip_without_backward_kernel(request):
    """Gradient tests run on every device whose steelattn backward kernel exists
    (get_supported_configs says which); elsewhere they skip with the reason."""
    device = request.getfixturevalue("device") if "device" in request.fixturenames else "cpu"
    if device == "cuda" and not steelattn.get_supported_configs("cuda")["features"]["backward"]:
        pytest.skip("no steelattn CUDA backward kernel yet (issue 4): calls needing gradients use torch there")


def grads_vs_reference(q, k, v, *, causal=False, window=None, softcap=0.0, alibi=None, bias=None, dropout_p=0.0,
                       seed=0, use_lse=False):
    """Runs flash_attention forward + backward and the float64 reference, compares every gradient."""
    dtype = q.dtype
    N, S = q.size(2), k.size(2)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    bias_leaf = None
    if bias is not None and bias.is_floating_point():
        bias_leaf = bias.detach().requires_grad_()
    g = torch.Generator().manual_seed(seed)
    res = steelattn.flash_attention(q, k, v, causal=causal, window_size=window, softcap=softcap, alibi_slopes=alibi,
                                    attn_bias=bias_leaf if bias_leaf is not None else bias, dropout_p=dropout_p,
                                    return_lse=True, backend="steel", generator=g)
    out, lse = res
    gen = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    dlse = torch.randn(lse.shape, generator=gen).to(lse.device) if use_lse else None
    torch.autograd.backward([out, lse] if use_lse else [out], [dout, dlse] if use_lse else [dout])

    keep = None
    if dropout_p > 0:
        d = torch.randint(0, 2**62, (2,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64)
        keep = steelattn.dropout_keep_mask(q.size(0), q.size(1), N, S, dropout_p, int(d[0]), int(d[1]))
    wl, wr = window if window is not None else (-1, -1)
    if causal:
        wr = 0
    r = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    rb = bias_leaf.detach().cpu().double().requires_grad_() if bias_leaf is not None else None
    ro, rlse, _ = attention_reference(
        *r, softcap=softcap, alibi_slopes=None if alibi is None else alibi.cpu(),
        bias=rb, bool_mask=bias.cpu() if bias is not None and bias.dtype == torch.bool else None,
        diag_offset=S - N, window_left=wl, window_right=wr, dropout_keep=keep, dropout_p=dropout_p)
    outs, grads = [ro], [dout.cpu().double()]
    if use_lse:
        fin = torch.isfinite(rlse)
        outs.append(rlse[fin])
        grads.append(dlse.cpu().double()[fin])
    torch.autograd.backward(outs, grads)
    for name, ours, ref in (("dq", q.grad, r[0].grad), ("dk", k.grad, r[1].grad), ("dv", v.grad, r[2].grad)):
        assert ours.shape == ref.shape and ours.dtype == dtype and ours.device == q.device, name
        assert_close(ours, ref, dtype, what=name)
    if rb is not None:
        assert bias_leaf.grad.shape == bias_leaf.shape
        assert_close(bias_leaf.grad, rb.grad, dtype, what="dbias")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,S", [(1, 1), (7, 7), (17, 65), (65, 17), (130, 200)])
@pytest.mark.parametrize("causal", [False, True])
def test_shapes(device, dtype, N, S, causal, rng):
    q = randn(2, 2, N, 64, dtype=dtype, device=device, generator=rng)
    k = randn(2, 2, S, 64, dtype=dtype, device=device, generator=rng)
    v = randn(2, 2, S, 64, dtype=dtype, device=device, generator=rng)
    grads_vs_reference(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D,Dv", [(1, 1), (32, 32), (80, 48), (128, 128), (160, 96), (256, 256)])
def test_head_dims(device, dtype, D, Dv, rng):
    q = randn(1, 2, 70, D, dtype=dtype, device=device, generator=rng)
    k = randn(1, 1, 90, D, dtype=dtype, device=device, generator=rng)
    v = randn(1, 1, 90, Dv, dtype=dtype, device=device, generator=rng)
    grads_vs_reference(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G", [2, 4, 16])
def test_gqa_sums_over_group(device, dtype, G, rng):
    q = randn(1, 2 * G, 50, 64, dtype=dtype, device=device, generator=rng)
    k = randn(1, 2, 70, 64, dtype=dtype, device=device, generator=rng)
    v = randn(1, 2, 70, 64, dtype=dtype, device=device, generator=rng)
    grads_vs_reference(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [(16, 0), (30, 8), (-1, 3)])
def test_window(device, dtype, window, rng):
    q = randn(1, 2, 150, 64, dtype=dtype, device=device, generator=rng)
    k = randn(1, 2, 170, 64, dtype=dtype, device=device, generator=rng)
    v = randn(1, 2, 170, 64, dtype=dtype, device=device, generator=rng)
    grads_vs_reference(q, k, v, window=window)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap_alibi(device, dtype, rng):
    q = randn(2, 4, 60, 64, dtype=dtype, device=device, generator=rng)
    k = randn(2, 2, 80, 64, dtype=dtype, device=device, generator=rng)
    v = randn(2, 2, 80, 64, dtype=dtype, device=device, generator=rng)
    grads_vs_reference(q, k, v, causal=True, softcap=5.0, alibi=steelattn.alibi_slopes(4).to(device))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ["full", "N_S", "1_H_1_S"])
def test_bias_gradient(device, dtype, shape, rng):
    B, H, N, S = 2, 4, 33, 47
    q = randn(B, H, N, 32, dtype=dtype, device=device, generator=rng)
    k = randn(B, 2, S, 32, dtype=dtype, device=device, generator=rng)
    v = randn(B, 2, S, 32, dtype=dtype, device=device, generator=rng)
    bshape = {"full": (B, H, N, S), "N_S": (N, S), "1_H_1_S": (1, H, 1, S)}[shape]
    bias = randn(*bshape, dtype=torch.float32, device=device, generator=rng)
    grads_vs_reference(q, k, v, causal=True, bias=bias)


def test_bool_mask_with_masked_rows(device, rng):
    q = randn(1, 2, 30, 32, dtype=torch.float32, device=device, generator=rng)
    k = randn(1, 2, 40, 32, dtype=torch.float32, device=device, generator=rng)
    mask = torch.rand(1, 1, 30, 40, generator=rng) > 0.5
    mask[..., 3, :] = False
    grads_vs_reference(q, k, k.clone(), bias=mask.to(device))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_same_mask_as_forward(device, dtype, rng):
    q = randn(1, 4, 40, 32, dtype=dtype, device=device, generator=rng)
    k = randn(1, 2, 60, 32, dtype=dtype, device=device, generator=rng)
    v = randn(1, 2, 60, 32, dtype=dtype, device=device, generator=rng)
    grads_vs_reference(q, k, v, causal=True, dropout_p=0.3, seed=11)


def test_lse_gradient(device, rng):
    q = randn(1, 2, 40, 32, dtype=torch.float32, device=device, generator=rng)
    k = randn(1, 2, 30, 32, dtype=torch.float32, device=device, generator=rng)
    grads_vs_reference(q, k, k.clone(), causal=True, use_lse=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous(device, dtype, rng):
    x = randn(2, 50, 3, 4, 64, dtype=dtype, device=device, generator=rng)  # fused qkv [B, N, 3, H, D]
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    grads_vs_reference(q, k, v, causal=True)


@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_gradients_match_torch(device, is_causal, rng):
    q, k, v = (randn(2, 4, 45, 64, dtype=torch.float32, device=device, generator=rng).requires_grad_()
               for _ in range(3))
    dout = randn(2, 4, 45, 64, dtype=torch.float32, device=device, generator=rng)
    ours = torch.autograd.grad(steelattn.scaled_dot_product_attention(q, k, v, is_causal=is_causal), (q, k, v), dout)
    ref = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=is_causal), (q, k, v), dout)
    for a, b in zip(ours, ref):
        assert_close(a, b.double(), torch.float32, tol=2 * TOL[torch.float32])


@pytest.mark.parametrize("causal,softcap,window", [(False, 0.0, None), (True, 2.0, None), (False, 0.0, (3, 2))])
def test_gradcheck_float64(causal, softcap, window):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 1, 7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(1, 1, 7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(6, 7, dtype=torch.float64, generator=g, requires_grad=True)
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64)

    def f(q, k, v, bias):
        return steelattn.flash_attention(q, k, v, causal=causal, softcap=softcap, window_size=window, attn_bias=bias,
                                         alibi_slopes=slopes, return_lse=True, backend="steel")

    assert torch.autograd.gradcheck(f, (q, k, v, bias))
    stats = steelattn.get_dispatch_stats()
    assert set(stats["forward"]) == set(stats["backward"]) == {"cpu_scalar"}, stats  # float64: the portable kernel


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 9, 16, generator=g, requires_grad=True)
    k = torch.randn(1, 2, 11, 16, generator=g, requires_grad=True)
    v = torch.randn(1, 2, 11, 8, generator=g, requires_grad=True)
    args = (q, k, v, None, None, None, 0.25, 0.0, 2, -1, 0, 0.0, None)
    torch.library.opcheck(torch.ops.steelattn.attention_fwd.default, args)


class Block(torch.nn.Module):
    """A small pre-norm transformer block using steelattn for attention."""

    def __init__(self, dim=64, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.hd)
        self.proj = torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x):
        B, N, _ = x.shape
        qkv = self.qkv(self.norm1(x)).view(B, N, self.heads + 2 * self.kv_heads, self.hd)
        q = qkv[:, :, : self.heads].transpose(1, 2)
        k = qkv[:, :, self.heads: self.heads + self.kv_heads].transpose(1, 2)
        v = qkv[:, :, self.heads + self.kv_heads:].transpose(1, 2)
        a = steelattn.flash_attention(q, k, v, causal=True, softcap=30.0)
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, -1))
        return x + self.mlp(self.norm2(x))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_transformer_block(backend):
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(2, 37, 64)
    ref_out = block(x)
    ref_grads = torch.autograd.grad(ref_out.square().sum(), list(block.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), list(block.parameters()))
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graph_capture():
    q, k, v = (torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = steelattn.flash_attention(q, k, v, causal=True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = steelattn.flash_attention(q, k, v, causal=True)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, steelattn.flash_attention(q, k, v, causal=True), rtol=0, atol=0)
    assert not torch.equal(captured, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_gradients_are_bit_identical(device, dtype, rng):
    q, k, v = (randn(2, 4, 300, 64, dtype=dtype, device=device, generator=rng).requires_grad_() for _ in range(3))
    dout = randn(2, 4, 300, 64, dtype=dtype, device=device, generator=rng)

    def grads():
        out = steelattn.flash_attention(q, k, v, causal=True, deterministic=True, backend="steel")
        return torch.autograd.grad(out, (q, k, v), dout)

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("causal", [False, True])
def test_deterministic_hopper_backward(causal):
    """On an H100 deterministic=True stays on the Hopper kernel (dQ reduced in key-block
    order): bit-identical run to run, and equal to the default path up to rounding."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper backward needs compute capability 9.0")
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(2, 8, 1000, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k, v = (torch.randn(2, 2, 1100, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
            for _ in range(2))
    dout = torch.randn(2, 8, 1000, 128, device="cuda", dtype=torch.bfloat16, generator=g)

    def grads(det):
        out = steelattn.flash_attention(q, k, v, causal=causal, deterministic=det)
        return torch.autograd.grad(out, (q, k, v), dout)

    steelattn.reset_dispatch_stats()
    runs = [grads(True) for _ in range(3)]
    stats = steelattn.get_dispatch_stats()
    assert stats["forward"] == stats["backward"] == {"cuda_sm90": 3}, stats
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert torch.equal(a, b)
    for a, b in zip(runs[0], grads(False)):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_graph_capture_forward_and_backward(deterministic):
    """A whole training step of the op (forward + backward) replays from a CUDA graph."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    dout = torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16, generator=g)

    def step():
        out = steelattn.flash_attention(q, k, v, causal=True, deterministic=deterministic)
        return torch.autograd.grad(out, (q, k, v), dout)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the graph, as torch's docs ask
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, device="cuda", dtype=t.dtype, generator=g))
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, step()):
        tol = 0 if deterministic else 2e-2  # the Hopper kernel adds dQ in arrival order
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("D,Dv,G", [(64, 64, 1), (80, 48, 3), (128, 128, 4)])
def test_one_visible_key_gives_exactly_zero_score_gradient(D, Dv, G):
    """fp32 on the CPU: with one key, P = 1 and dS = P * (dP - rowsum(dO * O)) is zero in exact
    arithmetic; the kernel sums rowsum(dO * O) as it sums dP, so dq and dk come out exactly 0
    rather than as rounding residue."""
    g = torch.Generator().manual_seed(D + Dv + G)
    q = torch.randn(2, 2 * G, 37, D, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 1, D, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 1, Dv, generator=g, requires_grad=True)
    out = steelattn.flash_attention(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn(out.shape, generator=g))
    assert torch.count_nonzero(dq) == 0 and torch.count_nonzero(dk) == 0
    assert torch.count_nonzero(dv) > 0


def test_double_backward_raises():
    """The backward is not differentiable: asking for a second derivative raises instead of
    silently returning a wrong one."""
    q = torch.randn(1, 2, 9, 16, dtype=torch.float64, requires_grad=True)
    out = steelattn.flash_attention(q, q.detach(), q.detach(), causal=True)
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gq.sum().backward()


def test_torch_func_grad_runs_on_torch_counted():
    """torch.func transforms get the differentiable torch path (the kernels read plain
    tensors), counted as a demotion, with the same gradients as the kernels give."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 9, 16, dtype=torch.float64, generator=g) for _ in range(3))
    ours = torch.func.grad(lambda q: steelattn.flash_attention(q, k, v, causal=True).square().sum())(q)
    stats = steelattn.get_dispatch_stats()
    assert stats["forward"] == {"torch": 1} and list(stats["demotions"]) == [
        "steelattn -> torch: torch.func transforms (the kernels read plain tensors)"], stats
    qq = q.clone().requires_grad_()
    steelattn.flash_attention(qq, k, v, causal=True).square().sum().backward()
    torch.testing.assert_close(ours, qq.grad, rtol=1e-10, atol=1e-12)
