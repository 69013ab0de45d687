"""Introspection: device info, supported configs and dispatch counters tell the truth."""
import torch

import steelattn


def test_is_available_and_device_info():
    assert steelattn.is_available()
    info = steelattn.get_device_info()
    assert info["cpu"]["isa"] in ("avx512", "avx2", "scalar")
    assert info["extension"] is True


def test_supported_configs_cpu_features_are_real():
    cfg = steelattn.get_supported_configs("cpu")
    f = cfg["features"]
    for key in ("float32", "float16", "bfloat16", "causal", "sliding_window", "gqa", "softcap", "alibi",
                "attn_bias", "bool_mask", "dropout", "return_lse", "return_attn_weights", "dv_ne_d", "n_ne_s",
                "non_contiguous", "head_dim_1_to_512"):
        assert f[key] is True, key
    assert f["backward"] is True
    for key in ("varlen", "paged_kv", "block_sparse"):
        assert f[key] is False, key
    assert all(p.startswith("cpu_") for p in cfg["paths"].values())


def test_supported_configs_all_devices():
    cfg = steelattn.get_supported_configs()
    assert set(("cpu", "cuda", "features", "best_device")) <= set(cfg)
    if not torch.cuda.is_available():
        assert cfg["cuda"]["available"] is False and cfg["best_device"] == "cpu"


def test_dispatch_stats_count_paths_and_fallbacks():
    steelattn.reset_dispatch_stats()
    q = torch.randn(1, 2, 16, 32)
    steelattn.flash_attention(q, q, q)
    steelattn.flash_attention(q, q, q, backend="torch")
    qg = q.clone().requires_grad_()
    steelattn.flash_attention(qg, q, q, return_attn_weights=True)  # weights are forward-only: torch, counted
    steelattn.flash_attention(qg, q, q)  # gradients: our kernels (custom op with autograd)
    stats = steelattn.get_dispatch_stats()
    isa = steelattn.get_device_info()["cpu"]["isa"]
    assert stats[f"cpu_{isa}"] == 2
    assert stats["torch"] == 2
    assert sum(stats["fallback_reasons"].values()) == 2
    steelattn.reset_dispatch_stats()
    assert steelattn.get_dispatch_stats() == {"fallback_reasons": {}}


def test_steel_backend_refuses_what_it_cannot_do():
    import pytest

    q = torch.randn(1, 2, 16, 32, requires_grad=True)
    with pytest.raises(NotImplementedError, match="forward-only"):
        steelattn.flash_attention(q, q, q, return_attn_weights=True, backend="steel")


def test_torch_fallback_is_differentiable_and_correct():
    q = torch.randn(1, 2, 16, 32, requires_grad=True)
    out = steelattn.flash_attention(q, q, q, causal=True, softcap=5.0)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with torch.no_grad():
        ref = steelattn.flash_attention(q, q, q, causal=True, softcap=5.0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_cpu_isa_paths_agree(monkeypatch):
    """Each compiled instruction-set path gives the same answer (run in a subprocess each)."""
    import subprocess
    import sys

    code = ("import torch, steelattn; g = torch.Generator().manual_seed(0); "
            "q = torch.randn(2, 4, 77, 40, generator=g); k = torch.randn(2, 2, 99, 40, generator=g); "
            "o = steelattn.flash_attention(q, k, k, causal=True, softcap=3.0); "
            "print(steelattn.get_device_info()['cpu']['isa']); torch.save(o, sys.argv[1])")
    outs = {}
    import os
    import tempfile
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
    """bf16 Q.K^T (and dO.V^T) through vdpbf16ps where the CPU has it gives the fp32 path's numbers."""
    import os
    import subprocess
    import sys
    import tempfile

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
