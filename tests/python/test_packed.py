"""Packed QKV / KV inputs reach the kernels as views (no copy) and give what the unpacked
call gives, forward and gradients, in every layout, on CPU and CUDA."""
import itertools

import pytest
import torch
from conftest import TOL, assert_close, randn

import steelattn


def unpacked(q, k, v, **kw):
    """The reference: flash_attention on contiguous [B, H, N, D] copies (float64)."""
    return steelattn.flash_attention(*(t.double().contiguous() for t in (q, k, v)), **kw)


def check(out, ref_fn, inputs, dtype, rng):
    """out (a packed call) against ref_fn(inputs in float64), forward and gradients."""
    r = [t.detach().double().requires_grad_() for t in inputs]
    ref = ref_fn(*r)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert_close(out.detach(), ref.detach(), dtype)
    g = randn(*out.shape, dtype=dtype, device=out.device, generator=rng)
    a = torch.autograd.grad(out, inputs, g)
    b = torch.autograd.grad(ref, r, g.double())
    for x, y in zip(a, b):
        assert_close(x, y, dtype, what="grad", tol=3 * TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_packed_layouts(device, rng, dtype):
    B, N, H, D = 2, 37, 4, 64
    qkv = randn(B, N, 3, H, D, dtype=dtype, device=device, generator=rng).requires_grad_()
    out = steelattn.flash_attention_qkv_packed(qkv, causal=True)
    check(out, lambda x: unpacked(*(x[:, :, i].transpose(1, 2) for i in range(3)), causal=True).transpose(1, 2),
          [qkv], dtype, rng)
    hf = randn(B, H, N, 3, D, dtype=dtype, device=device, generator=rng).requires_grad_()
    out = steelattn.flash_attention_qkv_packed(hf, layout="bhn3d", softcap=10.0)
    check(out, lambda x: unpacked(*(x[:, :, :, i] for i in range(3)), softcap=10.0), [hf], dtype, rng)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_packed_flat_gqa(device, rng, dtype):
    B, N, H, Hkv, D = 2, 29, 8, 2, 32
    flat = randn(B, N, (H + 2 * Hkv) * D, dtype=dtype, device=device, generator=rng).requires_grad_()
    out = steelattn.flash_attention_qkv_packed(flat, num_heads=H, num_kv_heads=Hkv, causal=True)
    assert out.shape == (B, N, H * D)

    def ref(x):
        q = x[..., :H * D].unflatten(-1, (H, D)).transpose(1, 2)
        k = x[..., H * D:(H + Hkv) * D].unflatten(-1, (Hkv, D)).transpose(1, 2)
        v = x[..., (H + Hkv) * D:].unflatten(-1, (Hkv, D)).transpose(1, 2)
        return unpacked(q, k, v, causal=True).transpose(1, 2).flatten(2)
    check(out, ref, [flat], dtype, rng)


def test_kv_packed_layouts(device, rng):
    dtype = torch.float32
    B, N, S, H, Hkv, D = 2, 21, 45, 6, 3, 32
    q = randn(B, N, H, D, dtype=dtype, device=device, generator=rng).requires_grad_()
    kv = randn(B, S, 2, Hkv, D, dtype=dtype, device=device, generator=rng).requires_grad_()
    out = steelattn.flash_attention_kv_packed(q, kv, causal=True)
    check(out, lambda a, b: unpacked(a.transpose(1, 2), b[:, :, 0].transpose(1, 2), b[:, :, 1].transpose(1, 2),
                                     causal=True).transpose(1, 2), [q, kv], dtype, rng)
    qh = randn(B, H, N, D, dtype=dtype, device=device, generator=rng).requires_grad_()
    kvh = randn(B, Hkv, S, 2, D, dtype=dtype, device=device, generator=rng).requires_grad_()
    out = steelattn.flash_attention_kv_packed(qh, kvh)
    check(out, lambda a, b: unpacked(a, b[..., 0, :], b[..., 1, :]), [qh, kvh], dtype, rng)
    qf = randn(B, N, H * D, dtype=dtype, device=device, generator=rng).requires_grad_()
    kvf = randn(B, S, 2 * Hkv * D, dtype=dtype, device=device, generator=rng).requires_grad_()
    out = steelattn.flash_attention_kv_packed(qf, kvf, num_kv_heads=Hkv)
    check(out, lambda a, b: unpacked(a.unflatten(-1, (H, D)).transpose(1, 2),
                                     b[..., :Hkv * D].unflatten(-1, (Hkv, D)).transpose(1, 2),
                                     b[..., Hkv * D:].unflatten(-1, (Hkv, D)).transpose(1, 2)).transpose(1, 2).flatten(2),
          [qf, kvf], dtype, rng)


def test_varlen_packed(device, rng):
    dtype = torch.float32
    lengths, H, Hkv, D = [5, 0, 17, 1], 4, 2, 32
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=device)
    T = sum(lengths)
    qkv = randn(T, 3, H, D, dtype=dtype, device=device, generator=rng).requires_grad_()
    out = steelattn.flash_attention_varlen_qkv_packed(qkv, cu, causal=True)
    check(out, lambda x: steelattn.flash_attention_varlen(x[:, 0].contiguous(), x[:, 1].contiguous(),
                                                          x[:, 2].contiguous(), cu, cu, causal=True), [qkv], dtype, rng)
    flat = randn(T, (H + 2 * Hkv) * D, dtype=dtype, device=device, generator=rng).requires_grad_()
    out = steelattn.flash_attention_varlen_qkv_packed(flat, cu, num_heads=H, num_kv_heads=Hkv)
    assert out.shape == (T, H * D)
    q = randn(T, H, D, dtype=dtype, device=device, generator=rng).requires_grad_()
    kv = randn(T, 2, Hkv, D, dtype=dtype, device=device, generator=rng).requires_grad_()
    out = steelattn.flash_attention_varlen_kv_packed(q, kv, cu, cu, causal=True)
    check(out, lambda a, b: steelattn.flash_attention_varlen(a, b[:, 0].contiguous(), b[:, 1].contiguous(), cu, cu,
                                                             causal=True), [q, kv], dtype, rng)


def test_packed_inputs_are_not_copied(monkeypatch):
    """The kernels receive views of the packed storage."""
    from steelattn import _kernel, _native
    seen = []
    # where the tensors leave Python: the C++ layer when it is loaded, else _kernel
    owner, name = (_native.native, "forward") if _native.native is not None else (_kernel, "run_forward")
    real = getattr(owner, name)

    def spy(q, k, v, *a, **kw):
        seen.append((q.untyped_storage().data_ptr(), k.untyped_storage().data_ptr(), v.untyped_storage().data_ptr()))
        return real(q, k, v, *a, **kw)
    monkeypatch.setattr(owner, name, spy)
    qkv = torch.randn(2, 16, 3, 2, 32)
    steelattn.flash_attention_qkv_packed(qkv)
    assert seen and all(p == qkv.untyped_storage().data_ptr() for p in seen[0])


def test_packed_bad_input():
    with pytest.raises(ValueError, match="num_heads"):
        steelattn.flash_attention_qkv_packed(torch.randn(2, 8, 96))
    with pytest.raises(ValueError, match="qkv must be"):
        steelattn.flash_attention_qkv_packed(torch.randn(2, 8, 4, 4, 4, 4))
    with pytest.raises(ValueError, match="layout"):
        steelattn.flash_attention_qkv_packed(torch.randn(2, 8, 3, 2, 16), layout="nope")
    with pytest.raises(ValueError, match="not a multiple"):
        steelattn.flash_attention_qkv_packed(torch.randn(2, 8, 101), num_heads=2, num_kv_heads=1)


def _node_names(t):
    """Every autograd node type reachable from t."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("form", ["bn3hd", "bhn3d", "flat", "kv", "varlen", "varlen flat"])
def test_packed_gradient_is_assembled_once(form):
    """The packed gradient is one stack / cat of the pieces' gradients, never a zero-filled
    packed-size tensor per piece (what indexing's backward builds), and it is correct."""
    g = torch.Generator().manual_seed(3)
    cu = torch.tensor([0, 7, 16], dtype=torch.int32)
    x = {"bn3hd": torch.randn(2, 16, 3, 2, 8, generator=g), "bhn3d": torch.randn(2, 2, 16, 3, 8, generator=g),
         "flat": torch.randn(2, 16, 48, generator=g), "kv": torch.randn(2, 16, 2, 2, 8, generator=g),
         "varlen": torch.randn(16, 3, 2, 8, generator=g), "varlen flat": torch.randn(16, 48, generator=g)}[form]
    x = x.double().requires_grad_()
    q = torch.randn(2, 16, 2, 8, generator=g, dtype=torch.float64)
    run = {"bn3hd": lambda t: steelattn.flash_attention_qkv_packed(t, causal=True),
           "bhn3d": lambda t: steelattn.flash_attention_qkv_packed(t, causal=True),
           "flat": lambda t: steelattn.flash_attention_qkv_packed(t, num_heads=2, causal=True),
           "kv": lambda t: steelattn.flash_attention_kv_packed(q, t, causal=True),
           "varlen": lambda t: steelattn.flash_attention_varlen_qkv_packed(t, cu, causal=True),
           "varlen flat": lambda t: steelattn.flash_attention_varlen_qkv_packed(t, cu, num_heads=2, causal=True)}[form]
    out = run(x)
    names = _node_names(out)
    assert not any(n.startswith(("SelectBackward", "SliceBackward")) for n in names), names
    assert torch.autograd.gradcheck(run, (x,), eps=1e-6, atol=1e-5, fast_mode=True)
