"""The benchmark CLI's varlen and sparse sections run on the CPU and produce rows in the
documented format (a crash there would waste a GPU run)."""
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
