// The Hopper kernels' block-mask walk (src/cuda/sm90/mask_walk.h) against a plain
// byte-by-byte walk, on the host: random masks and densities, every start alignment of
// a line inside its buffer, stride 1 (the word path) and other strides, random ranges.
// The buffer around each line is filled with nonzero bytes, so a word read that let an
// entry outside [lo, hi] through would find a wrong "active" entry.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "cuda/sm90/mask_walk.h"

namespace {

using steelattn::sm90::first_active_entry;
using steelattn::sm90::last_active_entry;

int naive_last(const uint8_t* line, int64_t stride, int c, int c_lo) {
  for (; c >= c_lo; --c)
    if (line[c * stride] != 0) return c;
  return c_lo - 1;
}

int naive_first(const uint8_t* line, int64_t stride, int c, int c_hi) {
  for (; c <= c_hi; ++c)
    if (line[c * stride] != 0) return c;
  return c_hi + 1;
}

TEST(MaskWalk, MatchesTheByteWalk) {
  std::mt19937 rng(20261201);
  for (int trial = 0; trial < 20000; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 300);             // entries in the line
    const int64_t stride = rng() % 3 == 0 ? 1 + rng() % 5 : 1;   // mostly the word path
    const double density = std::uniform_real_distribution<double>(0.0, 0.3)(rng);
    const int offset = static_cast<int>(rng() % 8);              // the line's start in its word
    // 8-byte aligned buffer, the line inside it, filler bytes nonzero around and between
    std::vector<uint64_t> words((offset + n * stride + 16) / 8 + 2);
    uint8_t* buf = reinterpret_cast<uint8_t*>(words.data());
    for (size_t i = 0; i < words.size() * 8; ++i) buf[i] = 0xA5;
    uint8_t* line = buf + 8 + offset;
    for (int c = 0; c < n; ++c)
      line[c * stride] = std::bernoulli_distribution(density)(rng) ? static_cast<uint8_t>(1 + rng() % 255) : 0;
    const int a = static_cast<int>(rng() % n), b = static_cast<int>(rng() % n);
    const int lo = a < b ? a : b, hi = a < b ? b : a;
    ASSERT_EQ(last_active_entry(line, stride, hi, lo), naive_last(line, stride, hi, lo))
        << "trial " << trial << " n " << n << " stride " << stride << " range [" << lo << ", " << hi << "]";
    ASSERT_EQ(first_active_entry(line, stride, lo, hi), naive_first(line, stride, lo, hi))
        << "trial " << trial << " n " << n << " stride " << stride << " range [" << lo << ", " << hi << "]";
    // empty ranges
    ASSERT_EQ(last_active_entry(line, stride, lo - 1, lo), lo - 1);
    ASSERT_EQ(first_active_entry(line, stride, hi + 1, hi), hi + 1);
  }
}

TEST(MaskWalk, AllActiveAndNoneActive) {
  alignas(8) uint8_t buf[80];
  for (int offset = 0; offset < 8; ++offset) {
    uint8_t* line = buf + 8 + offset;
    for (int v : {0, 1}) {
      for (auto& x : buf) x = 0xFF;
      for (int c = 0; c < 48; ++c) line[c] = static_cast<uint8_t>(v);
      for (int lo = 0; lo < 48; lo += 5)
        for (int hi = lo; hi < 48; hi += 3) {
          EXPECT_EQ(last_active_entry(line, 1, hi, lo), v ? hi : lo - 1);
          EXPECT_EQ(first_active_entry(line, 1, lo, hi), v ? lo : hi + 1);
        }
    }
  }
}

}  // namespace
