// The decode kernel's K/V tile layout (src/cuda/decode/kv_swizzle.h), on the host: the
// whole-tile copies and the ldmatrix reads must address the element the layout puts each
// (row, chunk) at, a global 128-byte line must land in one aligned 128-byte block of shared
// memory (the reason for the layout), and an ldmatrix phase's 8 rows must hit 8 distinct
// bank groups. A mismatch would only show on the GPU as wrong decode results.
#include <gtest/gtest.h>

#include <cstdint>
#include <set>

#include "cuda/decode/kv_swizzle.h"

namespace {

using steelattn::cuda_decode::KvSwizzle;

template <int kDPad>
void check_copies(int keys) {
  using S = KvSwizzle<kDPad>;
  std::set<uint32_t> written;
  for (int it = 0; it < keys / S::kRowsPerStep; ++it) {
    std::set<uint32_t> blocks;  // 128-byte blocks one warp copy writes, per global line
    for (int lane = 0; lane < 32; ++lane) {
      const int row = lane / S::kChunks + it * S::kRowsPerStep, chunk = lane % S::kChunks;
      const uint32_t off = S::copy_step(S::copy_lane(lane), it);
      ASSERT_EQ(off, uint32_t(S::offset(row, chunk)) * 2) << "D " << kDPad << " lane " << lane << " step " << it;
      EXPECT_TRUE(written.insert(off).second) << "two copies write one slot";
      // the 8 chunks of one global line (row, chunks 8g..8g+7) share one aligned block
      const uint32_t line_block = (row * S::kRowBytes + (chunk & ~7) * 16) / 128;
      EXPECT_EQ(off / 128, line_block) << "D " << kDPad << " row " << row << " chunk " << chunk;
    }
  }
  EXPECT_EQ(written.size(), size_t(keys) * S::kChunks);
}

// ldmatrix.x4: lanes 8i..8i+7 give the row addresses of matrix i; each 8-lane phase must
// read 8 distinct 16-byte bank groups (offset mod 128).
void expect_conflict_free(const uint32_t (&addr)[32], const char* what) {
  for (int m = 0; m < 4; ++m) {
    std::set<uint32_t> groups;
    for (int l = 8 * m; l < 8 * m + 8; ++l) groups.insert(addr[l] % 128 / 16);
    EXPECT_EQ(groups.size(), 8u) << what << " matrix " << m;
  }
}

template <int kDPad>
void check_reads(int keys, uint32_t base) {
  using S = KvSwizzle<kDPad>;
  for (int kk = 0; kk < kDPad / 16; ++kk) {  // K for S = Q K^T: k-steps over D, n-pairs over keys
    for (int np = 0; np < keys / 16; ++np) {
      uint32_t addr[32];
      for (int lane = 0; lane < 32; ++lane) {
        const int row = (lane & 7) + (lane >> 4) * 8 + np * 16, chunk = ((lane >> 3) & 1) + 2 * kk;
        addr[lane] = S::k_read(base + S::k_lane(lane), S::xor_bits(lane), kk, np);
        ASSERT_EQ(addr[lane], base + uint32_t(S::offset(row, chunk)) * 2) << "K D " << kDPad << " lane " << lane;
      }
      expect_conflict_free(addr, "K");
    }
  }
  for (int kk = 0; kk < keys / 16; ++kk) {  // V for O += P V: k-steps over keys, n-pairs over D
    for (int np = 0; np < kDPad / 16; ++np) {
      uint32_t addr[32];
      for (int lane = 0; lane < 32; ++lane) {
        const int row = (lane & 7) + ((lane >> 3) & 1) * 8 + kk * 16, chunk = (lane >> 4) + 2 * np;
        addr[lane] = S::v_read(base + S::v_lane(lane), S::xor_bits(lane), kk, np);
        ASSERT_EQ(addr[lane], base + uint32_t(S::offset(row, chunk)) * 2) << "V D " << kDPad << " lane " << lane;
      }
      expect_conflict_free(addr, "V");
    }
  }
}

TEST(KvSwizzle, CopiesWriteTheLayout) {
  for (int keys : {16, 32}) {
    check_copies<64>(keys);
    check_copies<128>(keys);
    check_copies<256>(keys);
  }
}

TEST(KvSwizzle, ReadsFindTheLayoutWithoutBankConflicts) {
  // tile bases as the kernel has them: 128-byte aligned shared addresses
  for (uint32_t base : {0u, 4352u, 4352u + 65536u, 8448u + 128u * 37u}) {
    for (int keys : {16, 32}) {
      check_reads<64>(keys, base);
      check_reads<128>(keys, base);
      check_reads<256>(keys, base);
    }
  }
}

}  // namespace
