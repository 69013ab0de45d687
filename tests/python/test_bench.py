"""The benchmark CLI's varlen, sparse and host sections run on the CPU and produce rows in
the documented format (a crash there would waste a GPU run)."""
import steelattn.bench as bench


def test_varlen_and_sparse_rows(tmp_path):
    res = bench.run("cpu", quick=True, ops=["varlen", "sparse"], log=lambda *a: None,
                    json_path=str(tmp_path / "b.json"), md_path=str(tmp_path / "b.md"))
    ops = {r["op"] for r in res["rows"]}
    assert ops == {"varlen_fwd", "varlen_fwd_bwd", "sparse_fwd", "sparse_fwd_bwd"}, ops
    for r in res["rows"]:
        assert r["ms"] > 0 and r["tflops"] > 0 and r["case"], r
        if r["impl"] == "steelattn":
            assert "torch" not in r["path"].get("forward", {}), r
    assert "## sparse_fwd" in (tmp_path / "b.md").read_text()


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
