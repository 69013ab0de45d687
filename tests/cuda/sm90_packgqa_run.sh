#!/usr/bin/env bash
# One GPU run for PackGQA (sm90 forward): build + all CUDA tests (rule as shipped),
# the CUDA tests again with packing forced wherever eligible, the packed-vs-unpacked
# checks and timings, and the quick forward benchmark (flex anchor skipped: its
# per-cell torch.compile costs minutes of device time; cuDNN and FA2 anchors stay).
# Usage (repo root, on the GPU machine): bash tests/cuda/sm90_packgqa_run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
bash scripts/gpu-check build test 2>&1 | tee "$OUT/check.log" | grep -vE '^"|^\{|^\}'
grep -q "build rc=0" "$OUT/check.log" || exit 1
echo "=== pytest cuda, STEELATTN_SM90_PACK_GQA=1"
(cd tests/python && STEELATTN_SM90_PACK_GQA=1 timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider 2>&1) \
  > "$OUT/pytest-pack1.log"
grep -E "FAILED|passed|failed" "$OUT/pytest-pack1.log" | tail -12
echo "=== packgqa checks and timings"
timeout 150 python3 tests/cuda/sm90_packgqa_bench.py 2>&1 | tee "$OUT/packgqa.log"
echo "=== quick bench (no flex)"
timeout 150 python3 - <<'PY' 2>&1 | tee "$OUT/quick.log" | grep -E "TFLOP|failed"
import steelattn.bench as b
def no_flex(*a, **k):
    raise RuntimeError("skipped in this run")
b._flex_fns = no_flex
b.main(["--device", "cuda", "--quick"])
PY
