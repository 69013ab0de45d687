// The band mask's key range for a block of query rows, in AttentionParams' terms (query i
// sees keys i + diag_offset - window_left .. i + diag_offset + window_right, -1 meaning
// unbounded), for host code that reasons about it: the CPU kernels and the CUDA launchers.
#pragma once

#include <algorithm>
#include <cstdint>

#include "steelattn/steelattn.h"

namespace steelattn {
namespace {  // internal linkage: the CPU kernels compile their headers once per ISA

// Keys [lo, hi) (of S) that rows [i_lo, i_hi] may see (lo >= hi when none).
inline void band_range(const AttentionParams& p, int64_t i_lo, int64_t i_hi, int64_t S, int64_t* lo,
                       int64_t* hi) {
  *lo = p.window_left < 0 ? 0 : std::max<int64_t>(0, i_lo + p.diag_offset - p.window_left);
  *hi = p.window_right < 0 ? S : std::min<int64_t>(S, i_hi + p.diag_offset + p.window_right + 1);
}

}  // namespace
}  // namespace steelattn
