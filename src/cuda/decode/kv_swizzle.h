// The decode kernel's K/V tiles in shared memory (decode_kernel.cuh): rows of kDPad
// elements, unpadded, each row's 16-byte chunks XOR-permuted inside their 128-byte group by
// the row's low three bits. Why not padded rows: a row padded by 16 bytes starts off its
// global sectors' alignment, and cp.async then splits a 128-byte line into more, partly
// overlapping L2 requests (ncu at B8 S32k: 50.3M L2 sectors read for 33.6M of K/V, L2 92%
// busy; swizzled: 33.6M, DRAM 84% -> 91.5%). Here a global line lands in one aligned
// 128-byte block of shared memory, and the 8 rows an ldmatrix reads at one chunk hit 8
// distinct bank groups.
//
// Byte offsets from a tile's start (128-byte aligned), as the kernel's copies and ldmatrix
// reads compute them: the swizzle is an XOR on bits 4-6. Host-compilable, so
// tests/cpp/test_kv_swizzle.cpp can check that copies and reads agree with offset().
#pragma once

#include <cstdint>

#include "steelattn/detail/host_device.h"

namespace steelattn::cuda_decode {

template <int kDPad>
struct KvSwizzle {
  static constexpr uint32_t kRowBytes = kDPad * 2;
  static constexpr int kChunks = kDPad / 8;             // 16-byte chunks per row
  static constexpr int kRowsPerStep = 32 / kChunks;     // rows one warp copy covers
  static_assert(kRowBytes % 128 == 0, "rows start 128-byte aligned");

  // Elements from the tile's start to (row, chunk).
  static STEELATTN_HD int offset(int row, int chunk) { return row * kDPad + ((chunk ^ (row & 7)) << 3); }

  // A whole-tile copy: lane l moves chunk l % kChunks of rows l / kChunks + kRowsPerStep * it.
  // Row r0 + it * kRowsPerStep has low bits r0 | (it * kRowsPerStep & 7) (r0 < kRowsPerStep,
  // a power of two), so a step's slot is the lane's row-r0 slot XOR-ed with a constant.
  static STEELATTN_HD uint32_t copy_lane(int lane) {
    const int r0 = lane / kChunks, c = lane % kChunks;
    return r0 * kRowBytes + ((c ^ r0) << 4);
  }
  static STEELATTN_HD uint32_t copy_step(uint32_t lane_slot, int it) {
    return (lane_slot ^ (uint32_t(it * kRowsPerStep & 7) << 4)) + it * kRowsPerStep * kRowBytes;
  }

  // ldmatrix.x4 of K for S = Q K^T: lane l addresses row (l & 7) + (l >> 4) * 8 (+ 16 per
  // n-pair) at chunk (l >> 3) & 1 (+ 2 per k-step); every such row's low bits are l & 7.
  static STEELATTN_HD uint32_t xor_bits(int lane) { return uint32_t(lane & 7) << 4; }
  static STEELATTN_HD uint32_t k_lane(int lane) {
    return ((lane & 7) + (lane >> 4) * 8) * kRowBytes + ((lane >> 3) & 1) * 16;
  }
  static STEELATTN_HD uint32_t k_read(uint32_t k_lane_bytes, uint32_t xor_b, int kk, int np) {
    return ((k_lane_bytes + kk * 32) ^ xor_b) + np * 16 * kRowBytes;
  }
  // ldmatrix.x4.trans of V for O += P V: lane l addresses row (l & 7) + ((l >> 3) & 1) * 8
  // (+ 16 per k-step) at chunk l >> 4 (+ 2 per n-pair).
  static STEELATTN_HD uint32_t v_lane(int lane) {
    return ((lane & 7) + ((lane >> 3) & 1) * 8) * kRowBytes + (lane >> 4) * 16;
  }
  static STEELATTN_HD uint32_t v_read(uint32_t v_lane_bytes, uint32_t xor_b, int kk, int np) {
    return ((v_lane_bytes + np * 32) ^ xor_b) + kk * 16 * kRowBytes;
  }
};

}  // namespace steelattn::cuda_decode
