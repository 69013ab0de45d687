"""The common bf16/fp16 training shapes reach the Hopper kernels, forward and backward,
according to the dispatch stats (and their results match the float64 reference).

The native head dims of both Hopper kernels, and Dqk != Dv as DeepSeek-style prefill uses it.
"""
import pytest
import torch
from conftest import TOL, assert_close

import steelattn
from steelattn.reference import attention_reference

# (D, Dv): head dims both Hopper kernels serve.
HOPPER_HEAD_DIMS = [(64, 64), (96, 96), (128, 128), (192, 192), (256, 256), (192, 128)]

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.fixture(autouse=True)
def _hopper_only():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper kernels need compute capability 9.0")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,Dv", HOPPER_HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("H,Hkv", [(8, 8), (8, 2)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_common_shapes_run_on_hopper_forward_and_backward(dtype, D, Dv, causal, H, Hkv, deterministic):
    g = torch.Generator(device="cuda").manual_seed(D + H + Hkv + causal)
    B, N, S = 2, 300, 300
    q = torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(B, Hkv, S, Dv, device="cuda", dtype=dtype, generator=g).requires_grad_()
    dout = torch.randn(B, H, N, Dv, device="cuda", dtype=dtype, generator=g)

    steelattn.reset_dispatch_stats()
    out = steelattn.flash_attention(q, k, v, causal=causal, deterministic=deterministic)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    stats = steelattn.get_dispatch_stats()
    assert stats == {"forward": {"cuda_sm90": 1}, "backward": {"cuda_sm90": 1}, "demotions": {}}, stats

    r = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref, _, _ = attention_reference(*r, diag_offset=S - N, window_right=0 if causal else -1)
    ref_grads = torch.autograd.grad(ref, r, dout.cpu().double())
    assert_close(out.detach(), ref.detach(), dtype)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(a, b, dtype, what=name, tol=TOL[dtype])
