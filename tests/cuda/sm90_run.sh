#!/usr/bin/env bash
# One GPU-machine run of the sm90 kernel: build (plus A/B variants), check
# against float64, benchmark against cuDNN / FA2 in the same process,
# compute-sanitizer on small shapes. Logs go to $OUT (or ./sm90-out).
# Usage: tests/cuda/sm90_run.sh [VARIANT=EXTRA_FLAGS ...]
#   e.g. tests/cuda/sm90_run.sh nopp=-DSTEELATTN_SM90_FORCE_PINGPONG=0
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-sm90-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
build=/tmp/sm90-build
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv,noheader | tee "$out/gpu.txt"

bash tests/cuda/sm90_build.sh "$build/main" 16 2>&1 | tee "$out/build.log" || exit 3
cp "$build/main/resource-usage.txt" "$out/"
lib=$build/main/libsteelattn_sm90_test.so

# The variants build (in parallel, on the CPU) while the main library is checked on the GPU.
alts=()
names=()
pids=()
for spec in "$@"; do
  name=${spec%%=*}
  EXTRA_FLAGS="${spec#*=}" bash tests/cuda/sm90_build.sh "$build/$name" 8 > "$out/build-$name.log" 2>&1 &
  pids+=($!)
  names+=("$name")
  alts+=(--alt "$name=$build/$name/libsteelattn_sm90_test.so")
done

timeout 200 python3 tests/cuda/sm90_check.py --lib "$lib" --check 2>&1 | tee "$out/check.log"
rc=${PIPESTATUS[0]}
[ $rc -eq 124 ] && { echo "check timed out (hang?)"; exit 4; }
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { cat "$out/build-${names[$i]}.log"; exit 3; }
  cp "$build/${names[$i]}/resource-usage.txt" "$out/resource-usage-${names[$i]}.txt"
  # Every variant is checked too (a variant may become the default).
  timeout 120 python3 tests/cuda/sm90_check.py --lib "$build/${names[$i]}/libsteelattn_sm90_test.so" --check \
    > "$out/check-${names[$i]}.log" 2>&1
  echo "variant ${names[$i]}: check rc=$? $(grep '^checks:' "$out/check-${names[$i]}.log")"
done
timeout 300 python3 tests/cuda/sm90_check.py --lib "$lib" --bench --reps "${BENCH_REPS:-1}" --json "$out/bench.json" \
  "${alts[@]}" 2>&1 | tee "$out/bench.log"
timeout 100 compute-sanitizer --tool memcheck python3 tests/cuda/sm90_check.py --lib "$lib" --sanitize \
  > "$out/sanitize.log" 2>&1
echo "sanitizer rc=$? $(grep 'ERROR SUMMARY' "$out/sanitize.log")"
grep -c "^ok" "$out/check.log" | sed 's/^/checks ok: /'
exit $rc
