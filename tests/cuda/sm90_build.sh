#!/usr/bin/env bash
# Builds the sm90 forward kernel plus the test C ABI shim into one shared
# library for tests/cuda/sm90_check.py, with the flags CMake uses.
# Usage: [EXTRA_FLAGS=-D...] tests/cuda/sm90_build.sh BUILD_DIR [JOBS]
# EXTRA_FLAGS builds an A/B variant (e.g. -DSTEELATTN_SM90_FORCE_PINGPONG=0).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-build-sm90}
jobs=${2:-4}
mkdir -p "$out"
rm -f "$out"/*.o "$out"/*.o.log
flags=(-std=c++17 -O3 -Iinclude -Isrc -DSTEELATTN_WITH_CUDA -Xcompiler -fPIC ${EXTRA_FLAGS:-})
arch=(-gencode=arch=compute_90a,code=sm_90a)
srcs=(src/cuda/sm90/launch.cu src/cuda/sm90/inst_*.cu tests/cuda/sm90_capi_shim.cpp)
printf '%s\n' "${srcs[@]}" | xargs -P "$jobs" -I{} sh -c \
  'f={}; o='"$out"'/$(basename $f).o; nvcc '"${flags[*]} ${arch[*]}"' --resource-usage -c $f -o $o > $o.log 2>&1 || { cat $o.log; exit 255; }'
nvcc -shared "${arch[@]}" -o "$out/libsteelattn_sm90_test.so" "$out"/*.o
# Resource report: registers, spills, and ptxas warnings (C7517 = injected wgmma waits) and
# performance notes (C7511 = wgmma serialised for lack of registers; printed as "info").
cat "$out"/*.log | grep -E "Function properties|spill|Used|warning|Performance Loss" > "$out/resource-usage.txt" || true
if grep -qE "warning|Performance Loss" "$out/resource-usage.txt"; then grep -E "warning|Performance Loss" "$out/resource-usage.txt"; fi
echo "built $out/libsteelattn_sm90_test.so"
