"""Bad input raises ValueError/TypeError naming the argument, before anything runs."""
import pytest
import torch

import steelattn

FA = steelattn.flash_attention
SDPA = steelattn.scaled_dot_product_attention


def qkv(device, B=1, H=4, Hkv=4, N=8, S=8, D=16, Dv=16, dtype=torch.float32):
    return (torch.randn(B, H, N, D, device=device, dtype=dtype), torch.randn(B, Hkv, S, D, device=device, dtype=dtype),
            torch.randn(B, Hkv, S, Dv, device=device, dtype=dtype))


@pytest.mark.parametrize("case,exc,match", [
    ("rank", ValueError, "q must have 4 dims"),
    ("dtype_int", TypeError, "q has dtype torch.int32"),
    ("dtype_mismatch", TypeError, "k has dtype"),
    ("gqa_ratio", ValueError, "multiple of k heads"),
    ("head_dim_zero", ValueError, "head dim 0"),
    ("head_dim_big", ValueError, "head dim 513"),
    ("dv_big", ValueError, "head dim 600 of v"),
    ("d_mismatch", ValueError, "k head dim"),
    ("s_mismatch", ValueError, "v shape"),
    ("batch_mismatch", ValueError, "batch sizes differ"),
    ("last_dim_stride", ValueError, "contiguous in its last dim"),
    ("window_bad", ValueError, "window_size left"),
    ("window_shape", ValueError, "window_size must be a"),
    ("dropout", ValueError, "dropout_p"),
    ("softcap", ValueError, "softcap"),
    ("scale", ValueError, "scale must be finite"),
    ("bias_shape", ValueError, "attn_bias of shape"),
    ("bias_dtype", TypeError, "attn_bias must be a float or bool"),
    ("alibi_shape", ValueError, "alibi_slopes must have shape"),
    ("backend", ValueError, "backend must be one of"),
    ("not_tensor", TypeError, "q must be a torch.Tensor"),
])
def test_flash_attention_errors(device, case, exc, match):
    q, k, v = qkv(device)
    kw = {}
    if case == "rank":
        q = q[0]
    elif case == "dtype_int":
        q = q.to(torch.int32)
    elif case == "dtype_mismatch":
        k = k.half()
    elif case == "gqa_ratio":
        k, v = qkv(device, Hkv=3)[1:]
    elif case == "head_dim_zero":
        q, k, v = qkv(device, D=0)
    elif case == "head_dim_big":
        q, k, v = qkv(device, D=513)
    elif case == "dv_big":
        q, k, v = qkv(device, Dv=600)
    elif case == "d_mismatch":
        k = torch.randn(1, 4, 8, 32, device=device)
    elif case == "s_mismatch":
        v = torch.randn(1, 4, 9, 16, device=device)
    elif case == "batch_mismatch":
        k, v = qkv(device, B=2)[1:]
    elif case == "last_dim_stride":
        q = torch.randn(1, 4, 8, 32, device=device)[..., ::2]
    elif case == "window_bad":
        kw["window_size"] = (-2, 0)
    elif case == "window_shape":
        kw["window_size"] = 5
    elif case == "dropout":
        kw["dropout_p"] = 1.0
    elif case == "softcap":
        kw["softcap"] = -1.0
    elif case == "scale":
        kw["scale"] = float("nan")
    elif case == "bias_shape":
        kw["attn_bias"] = torch.randn(3, 8, 8, device=device)
    elif case == "bias_dtype":
        kw["attn_bias"] = torch.ones(8, 8, dtype=torch.int32, device=device)
    elif case == "alibi_shape":
        kw["alibi_slopes"] = torch.ones(3, device=device)
    elif case == "backend":
        kw["backend"] = "nope"
    elif case == "not_tensor":
        q = [[1.0]]
    with pytest.raises(exc, match=match):
        FA(q, k, v, **kw)


def test_device_mismatch():
    q, k, v = qkv("cpu")
    other = "cuda" if torch.cuda.is_available() else "meta"
    with pytest.raises(ValueError, match="k is on"):
        FA(q, k.to(other), v)
    with pytest.raises(ValueError, match="attn_bias is on"):
        FA(q, k, v, attn_bias=torch.zeros(8, 8, device=other))
    with pytest.raises(ValueError, match="alibi_slopes is on"):
        FA(q, k, v, alibi_slopes=torch.ones(4, device=other))


def test_sdpa_errors(device):
    q, k, v = qkv(device)
    with pytest.raises(ValueError, match="attn_mask must be None when is_causal"):
        SDPA(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.bool, device=device), is_causal=True)
    with pytest.raises(ValueError, match="at least 3 dims"):
        SDPA(q[0, 0], k[0, 0], v[0, 0])
    with pytest.raises(ValueError, match="same number of dims"):
        SDPA(q, k[0], v[0])
    with pytest.raises(ValueError, match="attn_mask of shape"):
        SDPA(q, k, v, attn_mask=torch.ones(3, 8, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match="attn_mask must be bool or float"):
        SDPA(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.int64, device=device))


def _core_forward(q, out, lse=None, bias=None):
    from steelattn import _kernel

    sc = _kernel.scalars(1.0, 0.0, 0, -1, -1, 0.0, 0, 0, False)
    return _kernel.forward(q, q, q, out, lse, None, bias, None, None, sc, _kernel.RUN)


def test_core_rejects_bad_params_directly():
    """The C++ core validates too (the safety net under the Python checks)."""
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="out: shape"):
        _core_forward(q, torch.randn(1, 2, 4, 9))
    with pytest.raises(ValueError, match="lse: must be float32"):
        _core_forward(q, torch.randn(1, 2, 4, 8), lse=torch.empty(1, 2, 5))
    with pytest.raises(TypeError, match="bias: expected a torch.Tensor"):
        _core_forward(q, torch.randn(1, 2, 4, 8), bias=[1.0])
    with pytest.raises(TypeError, match="lse: unsupported dtype torch.complex64"):
        _core_forward(q, torch.randn(1, 2, 4, 8), lse=torch.empty(1, 2, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="q: unsupported device"):
        _core_forward(q.to("meta"), torch.randn(1, 2, 4, 8))


def test_outputs_untouched_on_error():
    """A failed core call writes nothing: a pre-filled output keeps its values."""
    q = torch.randn(1, 2, 4, 8)
    out = torch.full((1, 2, 4, 8), 7.0)
    with pytest.raises(ValueError):
        _core_forward(q, out, bias=torch.randn(1, 2, 4, 3))
    assert (out == 7.0).all()


def _ext_forward(q, k, v, **extra):
    """One extension call (mode RUN) with the given trailing tensors."""
    from steelattn import _ext, _kernel
    out = torch.empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3], dtype=q.dtype, device=q.device)
    sc = _kernel.scalars(0.1, 0.0, 0, -1, 0, 0.0, 0, 0, False)
    return _ext.forward(q, k, v, out, None, None, None, None, None, sc, 1, 0, _kernel.RUN, None, **extra)


def test_paged_and_slot_arguments_are_validated(device):
    """block_table / kv_batch_idx in the core: bad shapes and dtypes name the argument; the
    CPU kernels refuse them (flash_attention_kvcache gathers there) with a reason."""
    dt = torch.bfloat16
    q = torch.randn(2, 4, 1, 64, dtype=dt, device=device)
    pool = torch.randn(10, 2, 16, 64, dtype=dt, device=device)  # [num_pages, Hkv, page, D] view
    lens = torch.tensor([5, 20], dtype=torch.int32, device=device)
    table = torch.zeros(2, 3, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="need seqlens_k"):
        _ext_forward(q, pool, pool, block_table=table)
    with pytest.raises(ValueError, match="give one of them"):
        _ext_forward(q, pool, pool, seqlens_k=lens, block_table=table,
                     kv_batch_idx=torch.zeros(2, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="block_table: must be int32"):
        _ext_forward(q, pool, pool, seqlens_k=lens, block_table=table.long())
    with pytest.raises(ValueError, match="kv_batch_idx: must be int32"):
        _ext_forward(q, pool, pool, seqlens_k=lens, kv_batch_idx=torch.zeros(3, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="seqlens_k"):  # 49 > capacity 3 pages x 16
        _ext_forward(q.cpu(), pool.cpu(), pool.cpu(), seqlens_k=torch.tensor([5, 49], dtype=torch.int32),
                     block_table=table.cpu())
    if device == "cpu":
        with pytest.raises(NotImplementedError, match="CPU kernels take dense caches"):
            _ext_forward(q, pool, pool, seqlens_k=lens, block_table=table)
