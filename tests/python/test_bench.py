"""The benchmark CLI's varlen, sparse and host sections run on the CPU and produce rows in
the documented format (a crash there would waste a GPU run)."""
import steelattn.bench as bench


def test_varlen_and_sparse_rows(tmp_path):
    res = bench.run("cpu", quick=True, ops=["varlen", "sparse"], log=lambda *a: None,
                    json_path=str(tmp_path / "b.json"), md_path=str(tmp_path / "b.md"))
    # issue 9's row format: op, case, pass, N, ms, tflops, active
    cells = {(r["op"], r["case"], r["pass"], r["N"]) for r in res["rows"]}
    for pas in ("fwd", "fwd_bwd"):
        assert any(c[0] == "varlen" and c[1].startswith("random") and c[2] == pas for c in cells), cells
        for case in ("video3d", "video3d-64"):
            assert any(c[:3] == ("sparse", case, pas) for c in cells), cells
        assert {c[3] for c in cells if c[:3] == ("sparse", "window512", pas)} == {1024, 2048}, cells
    for r in res["rows"]:
        assert r["ms"] > 0 and r["tflops"] > 0 and 0 < r["active"] <= 1, r
        if r["impl"] == "steelattn":
            assert "torch" not in r["path"].get("forward", {}), r
    md = (tmp_path / "b.md").read_text()
    assert "## sparse_fwd_bwd" in md and "## varlen_fwd" in md and "window512" in md, md


def test_host_rows(tmp_path):
    """--op host on the CPU: every case for steelattn and torch's CPU SDPA, decode_step
    included, with the shape each case times."""
    from steelattn import bench
    rows = bench.bench_host("cpu", quick=True, log=lambda *a: None)
    cases = {(r["impl"], r["case"]) for r in rows}
    for case in bench.HOST_CASES:
        assert ("steelattn", case) in cases and ("torch-cpu", case) in cases, cases
    step = next(r for r in rows if r["impl"] == "steelattn" and r["case"] == "decode_step")
    assert step["N"] == 1 and step["S"] == bench.HOST_DECODE["L"] + 1 and step["us"] > 0
    assert "cpu_" in str(step["path"]), step


def test_decode_rows_and_layer_step_on_cpu():
    """bench_cuda_decode's cells, paged rows and steps run end to end on tiny CPU cells in
    the documented format, and the 32-layer step's two variants compute the same
    attention (the torch one: indexed append + masked SDPA over the static cache)."""
    import torch

    once = lambda fn: (fn(), 1.0)[1]  # noqa: E731  (no timing: a smoke run)
    rows = bench.bench_cuda_decode(device="cpu", timer=once, cells=((2, 128),), cells16=((1, 64),),
                                   log=lambda *a: None)
    impls = {(r["impl"], r["page_size"], r["N"]) for r in rows}
    for page in bench.DECODE_PAGES:
        assert ("steelattn-paged", page, 1) in impls, impls
    assert {("steelattn", None, 1), ("steelattn", None, 16), ("steelattn-step", None, 1)} <= impls, impls
    assert all(r["op"] == "decode" and r["gbps"] > 0 for r in rows)
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, S, D = 2, 4, 2, 40, 16
    q = torch.randn(B, H, 1, D, generator=g)
    kn, vn = torch.randn(B, Hkv, 1, D, generator=g), torch.randn(B, Hkv, 1, D, generator=g)
    caches = [(torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)) for _ in range(2)]
    lens = torch.tensor([5, 30], dtype=torch.int32)
    outs = [bench._layers_step_impl(q, [(k.clone(), v.clone()) for k, v in caches], kn, vn, lens, t)()
            for t in (False, True)]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
