// Counter-based random numbers for dropout (Philox4x32-10, Salmon et al. 2011).
// The same function runs on the host and the device, so the CPU and CUDA
// backends draw the same keep-mask for the same (seed, offset).
#pragma once

#include <cstdint>

#include "steelattn/detail/host_device.h"

namespace steelattn::detail {

struct Philox4 {
  uint32_t v[4];
};

STEELATTN_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                    uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = uint64_t(kM0) * c0;
    const uint64_t p1 = uint64_t(kM1) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c0 = n0;
    c1 = uint32_t(p1);
    c2 = n2;
    c3 = uint32_t(p0);
    k0 += kW0;
    k1 += kW1;
  }
  return {{c0, c1, c2, c3}};
}

// Linear index of score (b, h, i, j) in a [B, H, N, S] grid; dropout draws are
// keyed by it, so they do not depend on tiling, GQA packing or thread count.
STEELATTN_HD uint64_t dropout_index(int64_t b, int64_t h, int64_t i, int64_t j, int64_t H, int64_t N,
                                    int64_t S) {
  return uint64_t(((b * H + h) * N + i) * S + j);
}

// dropout_index for score (b, h, i, j) of a call whose draws are keyed in a larger grid
// (AttentionParams::dropout_b0 ... dropout_S; a KernelParams carries the same fields).
template <class P>
STEELATTN_HD uint64_t dropout_index_in_frame(const P& p, int64_t b, int64_t h, int64_t i, int64_t j) {
  return dropout_index(b + p.dropout_b0, h, i + p.dropout_i0, j + p.dropout_j0, p.H,
                       p.dropout_N < 0 ? p.N : p.dropout_N, p.dropout_S < 0 ? p.S : p.dropout_S);
}

// Four consecutive indices share one Philox block: lane = idx % 4.
// Returns the 24-bit uniform draw scaled to [0, 2^24).
STEELATTN_HD uint32_t dropout_draw24(uint64_t idx, uint64_t seed, uint64_t offset) {
  const uint64_t ctr = idx >> 2;
  const Philox4 r = philox4x32_10(uint32_t(ctr), uint32_t(ctr >> 32), uint32_t(offset),
                                  uint32_t(offset >> 32), uint32_t(seed), uint32_t(seed >> 32));
  return r.v[idx & 3] >> 8;
}

// Keep threshold: an element is kept when its draw >= threshold.
STEELATTN_HD uint32_t dropout_threshold24(float p) {
  const double t = double(p) * 16777216.0;
  return t >= 16777216.0 ? 16777216u : uint32_t(t);
}

STEELATTN_HD bool dropout_keep(uint64_t idx, uint64_t seed, uint64_t offset, uint32_t threshold24) {
  return dropout_draw24(idx, seed, offset) >= threshold24;
}

}  // namespace steelattn::detail
