// Walking one line of a block mask (a row of key blocks in the forward, a column of
// query blocks in the backward) for the next active entry. Only the producer thread
// walks; what it finds gates its next load, so the walk sits on the producer's
// critical path between two stage waits.
//
// A byte-by-byte walk is a chain of dependent loads: an L2 round trip (~0.3 us under
// load) per inactive entry. At the video mask's 9.5% density that is ~10 round trips per
// active block, longer than the consumers take to process one (1.66 us per 128 x 128
// block at D128); the sparse forward ran its active blocks at ~375 TFLOP/s against ~600
// dense (NOTES.md, sessions 7 and 8). A line whose entries are contiguous (stride 1, the
// usual row-major mask walked along its rows) is read 8 entries per load: the aligned
// 8-byte word around an entry, masked to the entries in range. The words lie inside the
// mask's allocation (CUDA allocations are at least 256-byte aligned and sized). Other
// strides keep one load per entry: the producer runs on 24 registers, and independent
// loads in flight cost registers (a batch of 4 doubled its spills; 8 made ptxas
// serialise a forward kernel's wgmmas). Entries: 0 inactive, nonzero active.
// Host-compilable too, for tests/cpp/test_mask_walk.cpp.
#pragma once

#include <cstdint>

#include "steelattn/detail/host_device.h"

namespace steelattn::sm90 {

namespace walk_detail {
template <class T>
STEELATTN_HD T load(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}
// The entry (byte index) of the highest / lowest nonzero byte of v != 0.
STEELATTN_HD int highest_byte(uint64_t v) {
#if defined(__CUDA_ARCH__)
  return (63 - __clzll(static_cast<long long>(v))) / 8;
#else
  return (63 - __builtin_clzll(v)) / 8;
#endif
}
STEELATTN_HD int lowest_byte(uint64_t v) {
#if defined(__CUDA_ARCH__)
  return (__ffsll(static_cast<long long>(v)) - 1) / 8;
#else
  return __builtin_ctzll(v) / 8;
#endif
}
}  // namespace walk_detail

// The highest c in [c_lo, c] with line[c * stride] != 0, or c_lo - 1 when none.
STEELATTN_HD int last_active_entry(const uint8_t* line, int64_t stride, int c, int c_lo) {
  if (stride != 1) {
    for (; c >= c_lo; --c)
      if (walk_detail::load(line + static_cast<int64_t>(c) * stride) != 0) return c;
    return c_lo - 1;
  }
  if (c < c_lo) return c_lo - 1;
  const uintptr_t at = reinterpret_cast<uintptr_t>(line + c);
  const uint64_t* word = reinterpret_cast<const uint64_t*>(at & ~uintptr_t{7});
  int base = c - static_cast<int>(at & 7);  // the entry in byte 0 of *word
  for (;; base -= 8, --word) {
    uint64_t v = walk_detail::load(word);
    const int top = c - base;  // bytes above entry c (first word only) and below c_lo are out
    if (top < 7) v &= (uint64_t{1} << (8 * top + 8)) - 1;
    if (c_lo > base) v &= ~uint64_t{0} << (8 * (c_lo - base));
    if (v != 0) return base + walk_detail::highest_byte(v);
    if (base <= c_lo) return c_lo - 1;
    c = base - 1;
  }
}

// The lowest c in [c, c_hi] with line[c * stride] != 0, or c_hi + 1 when none.
STEELATTN_HD int first_active_entry(const uint8_t* line, int64_t stride, int c, int c_hi) {
  if (stride != 1) {
    for (; c <= c_hi; ++c)
      if (walk_detail::load(line + static_cast<int64_t>(c) * stride) != 0) return c;
    return c_hi + 1;
  }
  if (c > c_hi) return c_hi + 1;
  const uintptr_t at = reinterpret_cast<uintptr_t>(line + c);
  const uint64_t* word = reinterpret_cast<const uint64_t*>(at & ~uintptr_t{7});
  int base = c - static_cast<int>(at & 7);
  for (;; base += 8, ++word) {
    uint64_t v = walk_detail::load(word);
    if (c > base) v &= ~uint64_t{0} << (8 * (c - base));  // entries below c (first word only)
    if (c_hi - base < 7) v &= (uint64_t{1} << (8 * (c_hi - base) + 8)) - 1;
    if (v != 0) return base + walk_detail::lowest_byte(v);
    if (base + 7 >= c_hi) return c_hi + 1;
    c = base + 8;
  }
}

}  // namespace steelattn::sm90
