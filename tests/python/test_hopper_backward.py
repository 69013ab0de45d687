"""The Hopper (sm90) kernels for every head dim they take: forward and backward of
D 64..256 (native 64/128/192/256, others zero-padded onto the next) and Dv != D,
with the score modifiers and masks, against the float64 reference, and a check that
each call really ran on the Hopper path. Skips without a compute capability 9.0 GPU."""
import pytest
import torch
from conftest import assert_close, assert_lse_close

import steelattn
from steelattn.reference import attention_reference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
    reason="needs an sm90 GPU (H100/H200)")]

DTYPES = [torch.bfloat16, torch.float16]
# (D, Dv): native tiles, zero-padded ones, and Dv != D (192/128: DeepSeek-style prefill).
HEAD_DIMS = [(64, 64), (80, 80), (96, 96), (128, 128), (160, 160), (192, 192), (224, 224), (256, 256),
             (192, 128), (128, 96), (256, 128)]


def _paths(stats, direction):
    """The kernel paths a direction ("forward"/"backward") of the counted calls took."""
    return {k for k, v in stats.get(direction, {}).items() if v}


def run_case(D, Dv, dtype, *, B=1, H=4, Hkv=2, N=150, S=190, causal=False, window=None, softcap=0.0, alibi=False,
             use_lse=False, layout="bhnd", deterministic=False, seed=0):
    """Forward + backward on CUDA against the float64 reference; returns (out, grads)."""
    g = torch.Generator().manual_seed(seed)

    def make(h, n, d):
        x = torch.randn(B, h, n, d, generator=g)
        if layout == "bnhd":  # [B, N, H, D] storage viewed as [B, H, N, D]
            return x.transpose(1, 2).contiguous().to("cuda", dtype).transpose(1, 2)
        return x.to("cuda", dtype)

    q, k, v = make(H, N, D), make(Hkv, S, D), make(Hkv, S, Dv)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    slopes = steelattn.alibi_slopes(H).cuda() if alibi else None
    steelattn.reset_dispatch_stats()
    out, lse = steelattn.flash_attention(q, k, v, causal=causal, window_size=window, softcap=softcap,
                                         alibi_slopes=slopes, return_lse=True, backend="steel",
                                         deterministic=deterministic)
    dout = torch.randn(out.shape, generator=g).to("cuda", dtype)
    dlse = torch.randn(lse.shape, generator=g).cuda() if use_lse else None
    torch.autograd.backward([out, lse] if use_lse else [out], [dout, dlse] if use_lse else [dout])
    stats = steelattn.get_dispatch_stats()
    # decode-shaped calls (at most 16 query rows per KV head, or 64 when batch x KV heads is
    # at most an eighth of the SMs) take the split-KV forward
    rows, sms = H // Hkv * N, torch.cuda.get_device_properties(0).multi_processor_count
    decode = rows <= 16 or (rows <= 64 and B * Hkv * 8 <= sms)
    assert _paths(stats, "forward") == ({"cuda_decode"} if decode else {"cuda_sm90"}), stats
    assert _paths(stats, "backward") == {"cuda_sm90"}, stats

    wl, wr = window if window is not None else (-1, -1)
    if causal:
        wr = 0
    r = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    ro, rlse, _ = attention_reference(*r, softcap=softcap, alibi_slopes=None if slopes is None else slopes.cpu(),
                                      diag_offset=S - N, window_left=wl, window_right=wr)
    assert_close(out, ro, dtype, what="out")
    assert_lse_close(lse, rlse, dtype)
    outs, grads = [ro], [dout.cpu().double()]
    if use_lse:
        fin = torch.isfinite(rlse)
        outs.append(rlse[fin])
        grads.append(dlse.cpu().double()[fin])
    torch.autograd.backward(outs, grads)
    for name, ours, ref in (("dq", q.grad, r[0].grad), ("dk", k.grad, r[1].grad), ("dv", v.grad, r[2].grad)):
        assert ours.shape == ref.shape and ours.dtype == dtype, name
        assert_close(ours, ref, dtype, what=name)
    return out, (q.grad, k.grad, v.grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D,Dv", HEAD_DIMS)
@pytest.mark.parametrize("mask", ["full", "causal"])
def test_head_dims(D, Dv, dtype, mask):
    run_case(D, Dv, dtype, causal=mask == "causal")


@pytest.mark.parametrize("D,Dv", [(96, 96), (192, 192), (256, 256), (192, 128)])
@pytest.mark.parametrize("case", ["window", "window_right", "softcap_alibi", "gqa8", "mqa", "lse", "bnhd",
                                  "no_visible_key", "ragged"])
def test_features(D, Dv, case):
    kw = {}
    if case == "window":
        kw = dict(window=(40, 0))
    elif case == "window_right":
        kw = dict(window=(70, 30), N=200, S=170)
    elif case == "softcap_alibi":
        kw = dict(causal=True, softcap=30.0, alibi=True)
    elif case == "gqa8":
        kw = dict(H=8, Hkv=1, causal=True)
    elif case == "mqa":
        kw = dict(H=3, Hkv=1)
    elif case == "lse":
        kw = dict(causal=True, use_lse=True)
    elif case == "bnhd":
        kw = dict(layout="bnhd", causal=True, B=2)
    elif case == "no_visible_key":  # bottom-right causal with N > S: the first rows see nothing
        kw = dict(causal=True, N=300, S=77)
    elif case == "ragged":
        kw = dict(N=1, S=1) if D != 256 else dict(N=17, S=1000, causal=True)
    run_case(D, Dv, torch.bfloat16, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D,Dv", [(128, 128), (112, 112), (128, 96), (104, 128)])
@pytest.mark.parametrize("case", ["default", "blocks", "gqa_alibi", "lse", "bnhd", "batch", "one_query"])
def test_rows80(D, Dv, dtype, case, monkeypatch):
    """The 80-row step (the default for dense D128 calls without causal, window,
    softcap or determinism): query blocks of 80 ragged at N, several of them, GQA, ALiBi, dlse,
    [B, N, H, D] storage, batches, one query row."""
    monkeypatch.setenv("STEELATTN_SM90_BWD_ROWS80", "1")
    kw = {"blocks": dict(N=700, S=333), "gqa_alibi": dict(H=8, Hkv=2, N=243, alibi=True),
          "lse": dict(use_lse=True, N=161), "bnhd": dict(layout="bnhd", B=2, N=90), "batch": dict(B=3, N=81, S=500),
          "one_query": dict(N=1, S=300, H=16, Hkv=1)}.get(case, {})
    run_case(D, Dv, dtype, **kw)


def test_rows80_ran(monkeypatch):
    """The switch reaches the kernel: the 80-row step takes dS from the packed 16-bit P (the
    64-row one from fp32 P), so its gradients differ in their last bits."""
    grads = {}
    for on in ("0", "1"):
        monkeypatch.setenv("STEELATTN_SM90_BWD_ROWS80", on)
        grads[on] = run_case(128, 128, torch.bfloat16, N=400, S=400, seed=3)[1]
    assert not torch.equal(grads["0"][0], grads["1"][0])


@pytest.mark.parametrize("D,Dv", [(64, 64), (128, 128), (256, 256), (192, 128)])
@pytest.mark.parametrize("case", ["causal", "lse", "deterministic"])
def test_preprocess_rows(D, Dv, case):
    """The preprocess (four rows per thread group): padded rows (N = 150 of 256), dlse, and the
    deterministic kernels' counters it zeroes."""
    run_case(D, Dv, torch.bfloat16, B=2, causal=True, use_lse=case == "lse", deterministic=case == "deterministic")


@pytest.mark.parametrize("D,Dv", [(64, 64), (128, 128), (96, 96), (192, 192), (256, 256), (192, 128)])
@pytest.mark.parametrize("causal", [False, True])
def test_deterministic_bit_identical(D, Dv, causal):
    """deterministic=True: the gradients of three runs are bit-identical (and right)."""
    grads = [run_case(D, Dv, torch.bfloat16, H=6, Hkv=2, N=330, S=400, causal=causal, deterministic=True, seed=5)[1]
             for _ in range(3)]
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("D,Dv", [(64, 64), (96, 96), (128, 128), (128, 96), (192, 192), (256, 256), (192, 128)])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_dkv_store_paths_agree(D, Dv, layout, monkeypatch):
    """The backward kernels store dK / dV by bulk copies of rows staged in shared memory, or
    from registers (STEELATTN_SM90_DKV_BULK=0, the reference path): both right, and the same
    bits. Ragged key tail, GQA, causal."""
    grads = []
    for bulk in ("1", "0"):
        monkeypatch.setenv("STEELATTN_SM90_DKV_BULK", bulk)
        grads.append(run_case(D, Dv, torch.bfloat16, B=2, H=4, Hkv=2, N=150, S=333, causal=True, layout=layout,
                              seed=7)[1])
    for a, b in zip(grads[0][1:], grads[1][1:]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("D", [64, 96, 128])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("softcap", [0.0, 15.0])
def test_forward_o_store_paths_agree(D, layout, causal, softcap, monkeypatch):
    """The forward's O staged in smem and stored by TMA (the default: at D128 through the
    tile's Q buffer, at D64 through a buffer of its own; the D64 band kernels keep the
    register stores) against the register stores
    (STEELATTN_SM90_O_TMA=0): both right (run_case checks out, lse and the gradients
    against the float64 reference) and the same bits. Ragged last query tile; D 96 runs
    zero-padded on the 128 kernel (the map clips the padding columns)."""
    outs = []
    for o_tma in ("1", "0"):
        monkeypatch.setenv("STEELATTN_SM90_O_TMA", o_tma)
        outs.append(run_case(D, D, torch.bfloat16, B=2, H=4, Hkv=4, N=333, S=290, causal=causal, layout=layout,
                             softcap=softcap, seed=3)[0])
    assert torch.equal(outs[0], outs[1])


def test_longer_sequences_wide():
    """Several key blocks and query blocks per CTA, GQA and a window, at D 256."""
    run_case(256, 256, torch.bfloat16, B=2, H=4, Hkv=2, N=700, S=900, window=(300, 10))


def test_first_backward_of_a_process():
    """The Hopper backward as the first CUDA work on autograd's backward thread (a fresh
    process): that thread has no current context until something makes one, and the tensor
    maps are encoded before any launch (this failed with CUDA_ERROR_INVALID_CONTEXT)."""
    import subprocess
    import sys
    code = (
        "import torch, steelattn\n"
        "q, k, v = (torch.randn(1, 2, 256, 128, device='cuda', dtype=torch.bfloat16, requires_grad=True)"
        " for _ in range(3))\n"
        "steelattn.flash_attention(q, k, v).sum().backward()\n"
        "torch.cuda.synchronize()\n"
        "s = steelattn.get_dispatch_stats()\n"
        "assert s['backward'] == {'cuda_sm90': 1}, s\n"
        "assert all(torch.isfinite(t.grad).all() for t in (q, k, v))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
