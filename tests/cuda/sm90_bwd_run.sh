#!/usr/bin/env bash
# One GPU-machine run of the sm90 backward: build, SASS census, check against
# float64 autograd, benchmark against cuDNN / FA2 backward in the same process,
# compute-sanitizer on small shapes. Logs go to $OUT (or ./sm90-bwd-out).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-sm90-bwd-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
build=/tmp/sm90-bwd-build
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv,noheader | tee "$out/gpu.txt"
bash tests/cuda/sm90_bwd_build.sh "$build" 16 > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 3; }
cp "$build/resource-usage.txt" "$out/"
for o in "$build"/bwd_inst_*.o; do
  echo "== $(basename $o)"; cuobjdump -sass "$o" | grep -oE "HGMMA\.[0-9x]+\.[A-Z0-9.]+|WARPGROUP\.[A-Z]+|LDL|STL" | sort | uniq -c
done > "$out/sass.txt" 2>&1
lib=$build/libsteelattn_sm90_bwd_test.so
# Optional A/B variants: ALT="name=-DFLAG=... [-DFLAG2=...];name2=..." builds one more
# library per variant, each benchmarked in its own process.
IFS=';' read -ra alts <<< "${ALT:-}"
for spec in "${alts[@]}"; do
  EXTRA_FLAGS="${spec#*=}" bash tests/cuda/sm90_bwd_build.sh "$build-${spec%%=*}" 16 >> "$out/build.log" 2>&1 || exit 3
done
timeout ${CHECK_TIMEOUT:-200} python3 tests/cuda/sm90_bwd_check.py --lib "$lib" --check > "$out/check.log" 2>&1
rc=$?
tail -30 "$out/check.log"
[ $rc -eq 124 ] && { echo "check timed out (hang?)"; exit 4; }
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout ${BENCH_TIMEOUT:-200} python3 tests/cuda/sm90_bwd_check.py --lib "$lib" --bench --json "$out/bench.json" > "$out/bench.log" 2>&1
  tail -16 "$out/bench.log"
  for spec in "${alts[@]}"; do
    name=${spec%%=*}
    echo "== alt $name"
    timeout ${BENCH_TIMEOUT:-200} python3 tests/cuda/sm90_bwd_check.py --lib "$build-$name/libsteelattn_sm90_bwd_test.so" \
      --bench --json "$out/bench-$name.json" > "$out/bench-$name.log" 2>&1
    tail -14 "$out/bench-$name.log"
  done
fi
if [ "${SKIP_SAN:-0}" != 1 ]; then
  timeout 90 compute-sanitizer --tool memcheck python3 tests/cuda/sm90_bwd_check.py --lib "$lib" --sanitize \
    > "$out/sanitize.log" 2>&1
  echo "sanitizer rc=$? $(grep 'ERROR SUMMARY' "$out/sanitize.log")"
fi
exit $rc
