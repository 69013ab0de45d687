"""Introspection tells the truth: every feature get_supported_configs() reports is run and
its dispatch path checked; dispatch stats count forward and backward paths and demotions."""
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from conftest import TOL, assert_close, randn

import steelattn
from steelattn.reference import attention_reference

STEEL_PATHS = {"cpu_avx512", "cpu_avx2", "cpu_scalar", "cuda_sm90", "cuda_generic", "cuda_decode"}


def test_is_available_and_device_info():
    assert steelattn.is_available()
    info = steelattn.get_device_info()
    assert info["cpu"]["isa"] in ("avx512", "avx2", "scalar")
    assert info["extension"] is True


def _seed_draw(seed):
    d = torch.randint(0, 2**62, (2,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64)
    return int(d[0]), int(d[1])


# feature -> call description: dtype, shape (B, H, Hkv, N, S, D, Dv) and flash_attention keywords.
# "grad" runs the backward too; "nonc" views [B, N, H, D] storage as [B, H, N, D]; "varlen"
# packs the B sequences token-major and calls flash_attention_varlen.
_BASE = dict(dtype=torch.float32, shape=(2, 4, 4, 40, 40, 64, 64), kw={}, grad=False, nonc=False, varlen=False,
             sparse=False, kvcache=False, packed=False, sinks=False, rope=False, prefix=False, spec=False,
             splitfuse=False, append=False)
FEATURE_CALLS = {
    "float32": {},
    "float16": dict(dtype=torch.float16),
    "bfloat16": dict(dtype=torch.bfloat16),
    "float64": dict(dtype=torch.float64),
    "causal": dict(kw=dict(causal=True)),
    "sliding_window": dict(kw=dict(window_size=(8, 0))),
    "gqa": dict(shape=(2, 8, 2, 40, 40, 64, 64)),
    "softcap": dict(kw=dict(softcap=5.0)),
    "alibi": dict(kw=dict(alibi_slopes="alibi")),
    "attn_bias": dict(kw=dict(attn_bias="float")),
    "bool_mask": dict(kw=dict(attn_bias="bool")),
    "dropout": dict(kw=dict(dropout_p=0.2)),
    "return_lse": dict(kw=dict(return_lse=True)),
    "return_attn_weights": dict(kw=dict(return_attn_weights=True)),
    "dv_ne_d": dict(shape=(2, 4, 4, 40, 40, 128, 64)),
    "n_ne_s": dict(shape=(2, 4, 4, 30, 90, 64, 64), kw=dict(causal=True)),
    "non_contiguous": dict(nonc=True),
    "head_dim_1_to_512": [dict(shape=(1, 2, 2, 20, 20, d, d)) for d in (1, 7, 80, 512)],
    "backward": dict(dtype=torch.bfloat16, kw=dict(causal=True), grad=True),
    "block_sparse": dict(kw=dict(causal=True), grad=True, sparse=True),
    "kv_cache": dict(dtype=torch.bfloat16, shape=(2, 4, 2, 3, 40, 64, 64), kw=dict(causal=True), kvcache=True),
    # The last 3 keys appended (identity rotation) into a cache whose rows there are garbage.
    "fused_rope_append": dict(dtype=torch.bfloat16, shape=(2, 4, 2, 3, 40, 64, 64), kw=dict(causal=True),
                              append=True),
    "varlen_dropout": dict(dtype=torch.bfloat16, shape=(2, 4, 2, 30, 50, 64, 64), kw=dict(causal=True, dropout_p=0.1),
                           grad=True, varlen=True),
    "packed_inputs": dict(kw=dict(causal=True), grad=True, packed=True),
    # Identity sinks (-inf) and identity rotations: the dense answer, through the composed path.
    "sinks": dict(kw=dict(causal=True), grad=True, sinks=True),
    "rope": dict(kw=dict(causal=True), grad=True, rope=True),
    "varlen": dict(dtype=torch.bfloat16, shape=(2, 4, 2, 30, 50, 64, 64), kw=dict(causal=True), grad=True,
                   varlen=True),
    # One prefix shared by the batch, each entry's suffix in a cache: the dense answer.
    "shared_prefix": dict(dtype=torch.bfloat16, shape=(2, 4, 2, 3, 40, 64, 64), kw=dict(causal=True), prefix=True),
    # The seed's draft-verification helper: its attention part is the causal dense answer.
    "speculative_verify": dict(dtype=torch.bfloat16, shape=(2, 4, 2, 3, 40, 64, 64), kw=dict(causal=True), spec=True),
    # The same call as prefill and as decode against a full cache: the dense answer twice.
    "splitfuse": dict(dtype=torch.bfloat16, shape=(2, 4, 2, 3, 40, 64, 64), kw=dict(causal=True), splitfuse=True),
}


def _run_feature_call(device, call, rng):
    """Runs one call on `device` with backend='auto' and checks it against the float64
    reference; returns the dispatch stats of the call."""
    c = {**_BASE, **call}
    dtype, (B, H, Hkv, N, S, D, Dv), kw = c["dtype"], c["shape"], dict(c["kw"])
    if c["nonc"]:
        q = randn(B, N, H, D, dtype=dtype, device=device, generator=rng).transpose(1, 2)
        assert not q.is_contiguous()
    else:
        q = randn(B, H, N, D, dtype=dtype, device=device, generator=rng)
    k = randn(B, Hkv, S, D, dtype=dtype, device=device, generator=rng)
    v = randn(B, Hkv, S, Dv, dtype=dtype, device=device, generator=rng)
    ref_kw = dict(diag_offset=S - N, window_left=-1, window_right=0 if kw.get("causal") else -1)
    if "window_size" in kw:
        ref_kw["window_left"], ref_kw["window_right"] = kw["window_size"]
    ref_kw["softcap"] = kw.get("softcap", 0.0)
    if kw.get("alibi_slopes") == "alibi":
        kw["alibi_slopes"] = ref_kw["alibi_slopes"] = steelattn.alibi_slopes(H).to(device)
    if kw.get("attn_bias") == "float":
        kw["attn_bias"] = randn(N, S, dtype=torch.float32, device=device, generator=rng)
        ref_kw["bias"] = kw["attn_bias"]
    elif kw.get("attn_bias") == "bool":
        kw["attn_bias"] = (torch.rand(N, S, generator=rng) > 0.3).to(device)
        ref_kw["bool_mask"] = kw["attn_bias"]
    if kw.get("dropout_p"):
        kw["generator"] = torch.Generator().manual_seed(5)
        ref_kw["dropout_keep"] = steelattn.dropout_keep_mask(B, H, N, S, kw["dropout_p"], *_seed_draw(5))
        if c["varlen"]:  # varlen draws in the packed [1, H, B*N, B*S] grid: sequence b's piece of it
            packed = steelattn.dropout_keep_mask(1, H, B * N, B * S, kw["dropout_p"], *_seed_draw(5))[0]
            ref_kw["dropout_keep"] = torch.stack([packed[:, b * N:(b + 1) * N, b * S:(b + 1) * S] for b in range(B)])
        ref_kw["dropout_p"] = kw["dropout_p"]
    ref_kw = {n: t.cpu() if isinstance(t, torch.Tensor) else t for n, t in ref_kw.items()}
    tol = TOL.get(dtype, 1e-10)

    if c["prefix"]:  # the first P keys the same for every entry
        P = S // 2
        k[1:, :, :P], v[1:, :, :P] = k[:1, :, :P], v[:1, :, :P]

    steelattn.reset_dispatch_stats()
    inputs = [t.detach().requires_grad_() for t in (q, k, v)] if c["grad"] else [q, k, v]
    second = None  # a second output that must equal the reference too
    if c["varlen"]:  # the B sequences packed token-major: [B*N, H, D]
        pack = lambda t: t.permute(0, 2, 1, 3).reshape(-1, t.size(1), t.size(3))  # noqa: E731
        cu = lambda n: torch.arange(0, (B + 1) * n, n, dtype=torch.int32, device=device)  # noqa: E731
        res = steelattn.flash_attention_varlen(*(pack(t) for t in inputs), cu(N), cu(S), **kw)
        res = res.reshape(B, N, H, Dv).transpose(1, 2)
    elif c["packed"]:  # q, k, v stacked as [B, N, 3, H, D] and read back as views
        qkv = torch.stack([t.transpose(1, 2) for t in inputs], dim=2)
        res = steelattn.flash_attention_qkv_packed(qkv, **kw).transpose(1, 2)
    elif c["sinks"]:
        res = steelattn.flash_attention(*inputs, sinks=torch.full((H,), float("-inf"), device=device), **kw)
    elif c["rope"]:
        ones, zeros = torch.ones(S, D // 2, device=device), torch.zeros(S, D // 2, device=device)
        res = steelattn.flash_attention_rope(*inputs, ones, zeros, **kw)
    elif c["append"]:
        cache_k, cache_v = (t.clone() for t in inputs[1:])
        cache_k[:, :, -3:], cache_v[:, :, -3:] = float("nan"), float("nan")
        ones, zeros = torch.ones(S, D // 2, device=device), torch.zeros(S, D // 2, device=device)
        res = steelattn.flash_attention_kvcache(inputs[0], cache_k, cache_v, k_new=inputs[1][:, :, -3:],
                                                v_new=inputs[2][:, :, -3:], cache_seqlens=S - 3, rotary_cos=ones,
                                                rotary_sin=zeros, **kw)
    elif c["kvcache"]:  # a full cache: the dense answer (bottom-right causal)
        res = steelattn.flash_attention_kvcache(*inputs, cache_seqlens=S, **kw)
    elif c["prefix"]:
        res = steelattn.flash_attention_shared_prefix(q, k[:1, :, :P], v[:1, :, :P], k[:, :, P:], v[:, :, P:],
                                                      cache_seqlens=S - P, **kw)
    elif c["spec"]:
        res = steelattn.flash_attention_speculative_verify(*inputs, torch.zeros(B, N, dtype=torch.int64,
                                                                                 device=device), **kw)
    elif c["splitfuse"]:
        res, second = steelattn.flash_attention_splitfuse(q, k, v, q, k, v, cache_seqlens=S, **kw)
    elif c["sparse"]:  # every block active (blocks of 16): the dense answer
        blocks = torch.ones(-(-N // 16), -(-S // 16), dtype=torch.bool, device=device)
        res = steelattn.flash_attention_sparse(*inputs, blocks, block_size=16, **kw)
    else:
        res = steelattn.flash_attention(*inputs, **kw)
    out = res[0] if isinstance(res, tuple) else res
    r = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse, ref_p = attention_reference(*r, **ref_kw)
    assert_close(out.detach(), ref_out.detach(), dtype, tol=tol)
    if second is not None:
        assert_close(second, ref_out.detach(), dtype, what="second output", tol=tol)
    if kw.get("return_lse"):
        assert_close(res[1], ref_lse.detach(), dtype, what="lse", tol=tol)
    if kw.get("return_attn_weights"):
        assert_close(res[1], ref_p.detach(), dtype, what="weights", tol=tol)
    if c["grad"]:
        dout = randn(*out.shape, dtype=dtype, device=device, generator=rng)
        grads = torch.autograd.grad(out, inputs, dout)
        ref_grads = torch.autograd.grad(ref_out, r, dout.cpu().double())
        for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
            assert_close(a, b, dtype, what=name, tol=tol)
    return steelattn.get_dispatch_stats()


def test_every_feature_reported_is_exercised():
    """The feature table and the exercising calls cover the same keys: a new feature
    needs a call here before get_supported_configs() may report it."""
    assert set(steelattn.get_supported_configs("cpu")["features"]) == set(FEATURE_CALLS)


@pytest.mark.parametrize("feature", sorted(FEATURE_CALLS))
def test_feature_report_matches_what_runs(device, feature, rng):
    """A feature reported True runs on a steelattn kernel (forward, and for `backward` the
    gradients) and matches the float64 reference; one reported False goes to torch,
    counted with its reason."""
    cfg = steelattn.get_supported_configs(device)
    if not cfg["available"]:
        pytest.skip(cfg["reason"])
    claimed = cfg["features"][feature]
    calls = FEATURE_CALLS[feature]
    for call in calls if isinstance(calls, list) else [calls]:
        stats = _run_feature_call(device, call, rng)
        if claimed:  # the compositions make two kernel calls (prefix + suffix, prefill + decode)
            calls_made = 2 if feature in ("shared_prefix", "splitfuse") else 1
            assert set(stats["forward"]) <= STEEL_PATHS and sum(stats["forward"].values()) == calls_made, stats
            if feature == "backward":
                assert set(stats["backward"]) <= STEEL_PATHS and sum(stats["backward"].values()) == 1, stats
        elif feature == "block_sparse" and device == "cuda":  # no block-sparse kernel: dense calls, noted
            assert "torch" not in stats["forward"] and set(stats["forward"]) <= STEEL_PATHS, stats
            assert any("block-sparse on CUDA -> dense kernel" in r for r in stats["demotions"]), stats
        else:
            assert stats["forward"] == {"torch": 1}, stats
            assert any(r.startswith("steelattn -> torch: ") for r in stats["demotions"]), stats


def test_supported_configs_cpu_paths():
    cfg = steelattn.get_supported_configs("cpu")
    isa = steelattn.get_device_info()["cpu"]["isa"]
    assert set(cfg["paths"].values()) == {f"cpu_{isa}"}
    assert set(cfg["backward_paths"].values()) == {f"cpu_{isa}"}
    missing = {f for f, on in cfg["features"].items() if not on}
    assert not missing, cfg["features"]


def test_supported_configs_all_devices():
    cfg = steelattn.get_supported_configs()
    assert set(("cpu", "cuda", "features", "best_device")) <= set(cfg)
    if not torch.cuda.is_available():
        assert cfg["cuda"]["available"] is False and cfg["best_device"] == "cpu"


def test_dispatch_stats_count_forward_backward_and_demotions():
    isa = "cpu_" + steelattn.get_device_info()["cpu"]["isa"]
    q = torch.randn(1, 2, 16, 32)
    qg = q.clone().requires_grad_()
    steelattn.reset_dispatch_stats()
    steelattn.flash_attention(q, q, q)  # inference
    steelattn.flash_attention(q, q, q, backend="torch")  # asked for: not a demotion
    steelattn.flash_attention(qg, q, q, return_attn_weights=True)  # weights are forward-only: torch, demoted
    out = steelattn.flash_attention(qg, q, q)  # training: forward now, backward when it runs
    assert steelattn.get_dispatch_stats() == {
        "forward": {isa: 2, "torch": 2},
        "backward": {"torch": 1},
        "demotions": {"steelattn -> torch: return_attn_weights with gradients (the weights are a forward-only "
                      "output)": 1}}
    out.sum().backward()
    assert steelattn.get_dispatch_stats()["backward"] == {"torch": 1, isa: 1}
    steelattn.reset_dispatch_stats()
    assert steelattn.get_dispatch_stats() == {"forward": {}, "backward": {}, "demotions": {}}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_hopper_demotion_is_counted_with_its_reason():
    """A call the Hopper kernel refuses (a float bias) runs on the generic kernel, and the
    stats say so for the forward and the backward, with the Hopper kernel's reason."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper kernels need compute capability 9.0")
    q, k, v = (torch.randn(1, 4, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    bias = torch.randn(128, 128, device="cuda")
    steelattn.flash_attention(q, k, v, attn_bias=bias).sum().backward()
    stats = steelattn.get_dispatch_stats()
    assert stats["forward"] == {"cuda_generic": 1} and stats["backward"] == {"cuda_generic": 1}, stats
    demoted = sorted(stats["demotions"])
    assert len(demoted) == 2, stats
    assert demoted[0].startswith("backward cuda_sm90 -> cuda_generic: ") and "bias" in demoted[0], stats
    assert demoted[1].startswith("forward cuda_sm90 -> cuda_generic: ") and "bias" in demoted[1], stats


def test_steel_backend_refuses_what_it_cannot_do():
    q = torch.randn(1, 2, 16, 32, requires_grad=True)
    with pytest.raises(NotImplementedError, match="forward-only"):
        steelattn.flash_attention(q, q, q, return_attn_weights=True, backend="steel")


def test_torch_fallback_is_differentiable_and_correct():
    q = torch.randn(1, 2, 16, 32, requires_grad=True)
    out = steelattn.flash_attention(q, q, q, causal=True, softcap=5.0, backend="torch")
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with torch.no_grad():
        ref = steelattn.flash_attention(q, q, q, causal=True, softcap=5.0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_cpu_isa_paths_agree():
    """Each compiled instruction-set path gives the same answer (run in a subprocess each)."""
    code = ("import torch, steelattn; g = torch.Generator().manual_seed(0); "
            "q = torch.randn(2, 4, 77, 40, generator=g); k = torch.randn(2, 2, 99, 40, generator=g); "
            "o = steelattn.flash_attention(q, k, k, causal=True, softcap=3.0); "
            "print(steelattn.get_device_info()['cpu']['isa']); torch.save(o, sys.argv[1])")
    outs = {}
    for isa in ("scalar", "avx2", "avx512"):
        path = os.path.join(tempfile.mkdtemp(), "o.pt")
        env = dict(os.environ, STEELATTN_CPU_ISA=isa)
        r = subprocess.run([sys.executable, "-c", "import sys; " + code, path], env=env, capture_output=True,
                           text=True, check=True)
        outs[r.stdout.strip()] = torch.load(path)
    assert "scalar" in outs
    base = outs["scalar"]
    for isa, o in outs.items():
        torch.testing.assert_close(o, base, rtol=1e-5, atol=1e-6, msg=isa)


def test_cpu_bf16_dot_path_agrees_with_fp32_path():
    """bf16 products through vdpbf16ps where the CPU has it (Q.K^T and dO.V^T exact; P.V, dV, dK,
    dQ with P and dS rounded to bf16) agree with the fp32 path to bf16 rounding; the LSE to fp32's."""
    code = ("import sys, torch, steelattn; g = torch.Generator().manual_seed(1); "
            "q = torch.randn(2, 8, 77, 64, generator=g).bfloat16().requires_grad_(); "
            "k = torch.randn(2, 2, 130, 64, generator=g).bfloat16().requires_grad_(); "
            "o, l = steelattn.flash_attention(q, k, k, causal=True, softcap=20.0, return_lse=True); "
            "dq, dk = torch.autograd.grad(o.float().square().sum(), (q, k)); "
            "torch.save((o.detach(), l.detach(), dq, dk), sys.argv[1])")
    outs = []
    for flag in ("0", "1"):
        path = os.path.join(tempfile.mkdtemp(), "o.pt")
        env = dict(os.environ, STEELATTN_CPU_BF16_DOT=flag)
        subprocess.run([sys.executable, "-c", code, path], env=env, check=True)
        outs.append(torch.load(path))
    (o0, l0, dq0, dk0), (o1, l1, dq1, dk1) = outs
    torch.testing.assert_close(o1.float(), o0.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    for a, b in ((dq1, dq0), (dk1, dk0)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
