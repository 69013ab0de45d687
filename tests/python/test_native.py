"""The eager calls' torch-facing layer in C++ (steelattn._torch_native): built and loaded
under the torch it was built against, and the same function as the Python paths it
replaces (same kernels, so the same bits): the inference forward, and the training call's
autograd node with gradients for q, k, v and bias, through lse, with varlen, block masks
and KV-cache lengths; counted; switched off by STEELATTN_NATIVE=0."""
import os
import subprocess
import sys

import pytest
import torch

import steelattn
from steelattn import _autograd, _kernel, _native
from steelattn._extra import Extra

from conftest import DEVICES


def test_native_node_is_loaded():
    """Every build with torch >= 2.5 at build time has it (CMakeLists.txt), and this
    process runs the torch it was built against."""
    if os.environ.get("STEELATTN_NATIVE") == "0":
        pytest.skip("switched off")
    assert _native.native is not None, _native.why_not
    assert steelattn.get_device_info()["autograd_node"] == "c++"


def _call(apply, q, k, v, bias, sc, extra, alibi=None, bool_mask=None, use_lse=True):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    out, lse = apply(*leaves, alibi, b, bool_mask, sc, extra)
    g = torch.Generator(device=q.device).manual_seed(5)
    loss = (out * torch.randn(out.shape, generator=g, device=q.device, dtype=out.dtype)).sum()
    if use_lse:
        loss = loss + (lse * torch.randn(lse.shape, generator=g, device=q.device, dtype=lse.dtype)).sum()
    if use_lse == "only":
        loss = lse.sum()
    wrt = leaves + ([b] if b is not None else [])
    return [out, lse] + list(torch.autograd.grad(loss, wrt))


CASES = {  # name -> (B, H, Hkv, N, S, D, kwargs)
    "causal": (2, 4, 4, 37, 37, 32, {}),
    "gqa window softcap alibi": (2, 4, 2, 50, 70, 40, {"wl": 20, "softcap": 15.0, "alibi": True}),
    "bias with grad": (1, 2, 2, 19, 23, 16, {"bias": True}),
    "bool mask, only lse used": (2, 2, 1, 30, 41, 24, {"bool_mask": True, "use_lse": "only"}),
    "dropout": (1, 3, 3, 33, 33, 16, {"dropout": 0.2}),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_native_matches_python_function(device, dtype, name):
    if _native.native is None:
        pytest.skip(_native.why_not)
    B, H, Hkv, N, S, D, kw = CASES[name]
    if kw.get("dropout") and device == "cuda" and dtype == torch.float64:
        pytest.skip("no float64 CUDA kernel")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, n, D, generator=g, dtype=dtype).to(device) for h, n in ((H, N), (Hkv, S), (Hkv, S)))
    side = torch.float64 if dtype == torch.float64 else torch.float32
    bias = torch.randn(B, H, N, S, generator=g, dtype=side).to(device) if kw.get("bias") else None
    mask = (torch.rand(B, H, N, S, generator=g) > 0.3).to(device) if kw.get("bool_mask") else None
    alibi = torch.rand(B, H, generator=g, dtype=side).to(device) if kw.get("alibi") else None
    sc = _kernel.scalars(D ** -0.5, kw.get("softcap", 0.0), S - N, kw.get("wl", -1), 0, kw.get("dropout", 0.0),
                         1234, 77, False)
    try:
        ref = _call(_autograd.python_apply, q, k, v, bias, sc, None, alibi, mask, kw.get("use_lse", True))
    except NotImplementedError as e:  # no kernel for this combination on this device: both refuse
        with pytest.raises(NotImplementedError):
            _call(_autograd.apply, q, k, v, bias, sc, None, alibi, mask, kw.get("use_lse", True))
        pytest.skip(str(e)[:100])
    steelattn.reset_dispatch_stats()
    ours = _call(_autograd.apply, q, k, v, bias, sc, None, alibi, mask, kw.get("use_lse", True))
    stats = steelattn.get_dispatch_stats()
    assert sum(stats["forward"].values()) == 1 and sum(stats["backward"].values()) == 1, stats
    assert "torch" not in stats["backward"], stats
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_native_varlen_block_mask_and_cache_lengths():
    """The extras travel through the C++ node: varlen lengths, a block mask, and KV-cache
    lengths (keys past a length get zero gradient)."""
    if _native.native is None:
        pytest.skip(_native.why_not)
    g = torch.Generator().manual_seed(1)
    sc = _kernel.scalars(0.2, 0.0, 0, -1, 0, 0.0, 0, 0, False)
    lens = [5, 0, 17, 9]
    cu = torch.tensor([0, 5, 5, 22, 31], dtype=torch.int32)
    q, k, v = (torch.randn(1, 2, 31, 16, generator=g) for _ in range(3))
    cases = [(q, k, v, Extra(cu_seqlens_q=cu, cu_seqlens_k=cu)),
             (torch.randn(2, 2, 40, 16, generator=g), torch.randn(2, 2, 48, 16, generator=g),
              torch.randn(2, 2, 48, 16, generator=g),
              Extra(block_mask=torch.rand(2, 2, 3, 3, generator=g) > 0.4, block_q=16, block_k=16)),
             (torch.randn(2, 2, 3, 16, generator=g), torch.randn(2, 2, 30, 16, generator=g),
              torch.randn(2, 2, 30, 16, generator=g), Extra(seqlens_k=torch.tensor([12, 30], dtype=torch.int32)))]
    assert sum(lens) == 31
    for q, k, v, extra in cases:
        ref = _call(_autograd.python_apply, q, k, v, None, sc, extra)
        ours = _call(_autograd.apply, q, k, v, None, sc, extra)
        for a, b in zip(ours, ref):
            assert torch.equal(a, b)
        if extra.seqlens_k is not None:
            assert torch.all(ours[3][0, :, 12:] == 0) and torch.all(ours[4][0, :, 12:] == 0)


def test_native_double_backward_raises():
    if _native.native is None:
        pytest.skip(_native.why_not)
    q = torch.randn(1, 2, 9, 16, dtype=torch.float64, requires_grad=True)
    out = steelattn.flash_attention(q, q.detach(), q.detach(), causal=True)
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)  # the first derivative works
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gq.sum().backward()


def test_switched_off_uses_the_python_paths():
    code = ("import torch, steelattn; from steelattn import _native\n"
            "assert _native.native is None, 'loaded'\n"
            "assert 'STEELATTN_NATIVE=0' in steelattn.get_device_info()['autograd_node']\n"
            "q = torch.randn(1, 2, 9, 16, dtype=torch.float64, requires_grad=True)\n"
            "steelattn.flash_attention(q, q, q, causal=True).sum().backward()\n"
            "steelattn.flash_attention(q.detach(), q.detach(), q.detach())\n"
            "s = steelattn.get_dispatch_stats(); assert sum(s['forward'].values()) == 2 and s['backward'], s\n")
    env = dict(os.environ, STEELATTN_NATIVE="0")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("want_lse", [False, True])
def test_native_inference_forward_matches_ext(monkeypatch, device, want_lse):
    """The inference forward allocated in C++ gives what _ext's call gives: out, lse, the
    token-major out of a varlen call, zeros and -inf for an empty problem; counted once."""
    if _native.native is None:
        pytest.skip(_native.why_not)
    g = torch.Generator().manual_seed(2)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    sc = _kernel.scalars(0.3, 5.0, 3, 10, 0, 0.0, 0, 0, False)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=device)
    tok = [torch.randn(20, 4, 64, generator=g, dtype=dt).to(device) for _ in range(3)]
    cases = [((torch.randn(2, 4, 17, 64, generator=g, dtype=dt).to(device),
               torch.randn(2, 2, 20, 64, generator=g, dtype=dt).to(device),
               torch.randn(2, 2, 20, 64, generator=g, dtype=dt).to(device)), None),
             (tuple(t.permute(1, 0, 2).unsqueeze(0) for t in tok), Extra(cu_seqlens_q=cu, cu_seqlens_k=cu)),
             ((torch.randn(1, 2, 5, 64, dtype=dt).to(device), torch.randn(1, 2, 0, 64, dtype=dt).to(device),
               torch.randn(1, 2, 0, 64, dtype=dt).to(device)), None)]
    for (q, k, v), extra in cases:
        steelattn.reset_dispatch_stats()
        ours = _kernel.run_forward(q, k, v, None, None, None, sc, _kernel.RUN, want_lse, extra=extra)
        assert sum(steelattn.get_dispatch_stats()["forward"].values()) == 1
        with monkeypatch.context() as m:
            m.setattr(_native, "native", None)
            ref = _kernel.run_forward(q, k, v, None, None, None, sc, _kernel.RUN, want_lse, extra=extra)
        assert ours[2] is None and (ours[1] is None) == (not want_lse)
        assert ours[0].stride() == ref[0].stride() and torch.equal(ours[0], ref[0])
        if want_lse:
            assert torch.equal(ours[1], ref[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", ["flash_attention", "sdpa"])
def test_fast_path_matches_full_path(monkeypatch, device, entry):
    """The common call (scale / causal only) goes straight to the C++ layer; the full Python
    path gives the same bits, forward and gradients, and both count one forward (and one
    backward). Calls the fast path cannot take as given still get the full path's errors."""
    from steelattn import api
    if _native.native is None:
        pytest.skip(_native.why_not)
    g = torch.Generator().manual_seed(4)
    dt = torch.bfloat16 if device == "cuda" else torch.float64
    q = torch.randn(2, 4, 19, 64, generator=g, dtype=dt).to(device)
    k, v = (torch.randn(2, 2 if entry == "flash_attention" else 4, 23, 64, generator=g, dtype=dt).to(device)
            for _ in range(2))

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        steelattn.reset_dispatch_stats()
        if entry == "flash_attention":
            out, lse = steelattn.flash_attention(*leaves, causal=True, scale=0.3, return_lse=True)
            loss = out.sum() + lse.sum()
        else:
            out = steelattn.scaled_dot_product_attention(*leaves, is_causal=True)
            loss = out.square().sum()
        grads = torch.autograd.grad(loss, leaves)
        stats = steelattn.get_dispatch_stats()
        assert sum(stats["forward"].values()) == 1 and sum(stats["backward"].values()) == 1, stats
        with torch.no_grad():
            fwd = steelattn.flash_attention(q, k, v) if entry == "flash_attention" else \
                steelattn.scaled_dot_product_attention(q, k, v)
        return [out, *grads, fwd]

    fast = run()
    monkeypatch.setattr(api, "_NATIVE", None)
    full = run()
    for a, b in zip(fast, full):
        assert torch.equal(a, b)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="flash_attention: k heads|multiple of k heads"):
        steelattn.flash_attention(q, k[:, :1].expand(2, 3, 23, 64), v[:, :1].expand(2, 3, 23, 64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_native_kv_append_matches_ext(monkeypatch, device, paged):
    """The KV-cache step's append and RoPE through the C++ layer writes what _ext's call
    writes (caches and the rotated q), and refuses bad input the same way."""
    if _native.native is None:
        pytest.skip(_native.why_not)
    g = torch.Generator().manual_seed(6)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    B, H, Hkv, D, Nnew = 2, 4, 2, 64, 3
    k_new, v_new = (torch.randn(B, Hkv, Nnew, D, generator=g, dtype=dt).to(device) for _ in range(2))
    q = torch.randn(B, H, Nnew, D, generator=g, dtype=dt).to(device)
    ang = torch.rand(64, D // 2, generator=g)
    cos, sin = ang.cos().to(device), ang.sin().to(device)
    lens = torch.tensor([4, 28], dtype=torch.int32, device=device)
    if paged:
        table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32, device=device)
        cache = [torch.randn(4, Hkv, 16, D, generator=g, dtype=dt).to(device) for _ in range(2)]  # [pages, Hkv, page, D]
    else:
        table = None
        cache = [torch.randn(B, Hkv, 40, D, generator=g, dtype=dt).to(device) for _ in range(2)]
    results = []
    for use_native in (True, False):
        kc, vc = (c.clone() for c in cache)
        q_out = torch.empty_like(q)
        with monkeypatch.context() as m:
            if not use_native:
                m.setattr(_native, "native", None)
            _kernel.kv_append(k_new, v_new, kc, vc, lens, table, None, q, q_out, cos, sin, D, True, True)
            with pytest.raises(ValueError, match="seqlens"):
                _kernel.kv_append(k_new, v_new, kc, vc, lens.long(), table, None, q, q_out, cos, sin, D, True, True)
        results.append((kc, vc, q_out))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert not torch.equal(results[0][0], cache[0])  # something was written


def test_native_calls_from_several_threads():
    """Forward and backward from four Python threads at once (the C++ layer releases the
    GIL, so the core runs concurrently): every thread gets the single-threaded result, and
    the backward counts add up."""
    import threading
    if _native.native is None:
        pytest.skip(_native.why_not)
    g = torch.Generator().manual_seed(8)
    inputs = [[torch.randn(1, 2, 40, 32, generator=g, dtype=torch.float64) for _ in range(3)] for _ in range(4)]

    def grads(q, k, v):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = steelattn.flash_attention(*leaves, causal=True)
        return [out.detach()] + list(torch.autograd.grad(out.square().sum(), leaves))

    want = [grads(*x) for x in inputs]
    steelattn.reset_dispatch_stats()
    got, errors = [None] * 4, []

    def worker(i):
        try:
            for _ in range(10):
                got[i] = grads(*inputs[i])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for a, b in zip(got, want):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    stats = steelattn.get_dispatch_stats()
    assert sum(stats["forward"].values()) == 40 and sum(stats["backward"].values()) == 40, stats


def test_native_training_call_on_an_empty_problem():
    """No keys (or no queries): the C++ node returns zeros and lse = -inf without running a
    kernel, and its gradients are zeros (what the Python Function gives)."""
    if _native.native is None:
        pytest.skip(_native.why_not)
    for nq, nk in ((5, 0), (0, 7)):
        ins = [torch.randn(1, 2, n, 16, dtype=torch.float64, requires_grad=True) for n in (nq, nk, nk)]
        out, lse = steelattn.flash_attention(*ins, causal=True, return_lse=True)
        assert out.shape == (1, 2, nq, 16) and torch.all(out == 0) and torch.all(lse == -float("inf"))
        grads = torch.autograd.grad(out.sum(), ins)
        assert all(g.shape == t.shape and torch.all(g == 0) for g, t in zip(grads, ins))
