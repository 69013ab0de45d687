// Helpers for the C++ tests: tensors owned by std::vector, a float64 reference.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "steelattn/steelattn.h"

namespace steelattn::testing {

inline TensorRef ref4(float* data, int64_t a, int64_t b, int64_t c, int64_t d) {
  TensorRef t;
  t.data = data;
  t.dtype = DType::f32;
  t.ndim = 4;
  const int64_t shape[4] = {a, b, c, d};
  const int64_t stride[4] = {b * c * d, c * d, d, 1};
  for (int i = 0; i < 4; ++i) {
    t.shape[i] = shape[i];
    t.stride[i] = stride[i];
  }
  return t;
}

inline std::vector<float> random_vec(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist;
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

// Contiguous float32 [B,H,N,D] x [B,Hkv,S,D] x [B,Hkv,S,Dv] -> [B,H,N,Dv], band mask.
inline std::vector<double> reference(const std::vector<float>& q, const std::vector<float>& k,
                                     const std::vector<float>& v, int64_t B, int64_t H, int64_t Hkv, int64_t N,
                                     int64_t S, int64_t D, int64_t Dv, double scale, int64_t off, int64_t wl,
                                     int64_t wr) {
  std::vector<double> out(size_t(B * H * N * Dv), 0.0);
  std::vector<double> s(static_cast<size_t>(S));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / (H / Hkv);
      for (int64_t i = 0; i < N; ++i) {
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < S; ++j) {
          const bool vis = (wl < 0 || j >= i + off - wl) && (wr < 0 || j <= i + off + wr);
          double acc = 0;
          for (int64_t d = 0; d < D; ++d)
            acc += double(q[size_t(((b * H + h) * N + i) * D + d)]) * k[size_t(((b * Hkv + hk) * S + j) * D + d)];
          s[size_t(j)] = vis ? acc * scale : -std::numeric_limits<double>::infinity();
          mx = std::max(mx, s[size_t(j)]);
        }
        if (std::isinf(mx)) continue;
        double sum = 0;
        for (int64_t j = 0; j < S; ++j) sum += (s[size_t(j)] = std::exp(s[size_t(j)] - mx));
        for (int64_t j = 0; j < S; ++j)
          for (int64_t d = 0; d < Dv; ++d)
            out[size_t(((b * H + h) * N + i) * Dv + d)] +=
                s[size_t(j)] / sum * v[size_t(((b * Hkv + hk) * S + j) * Dv + d)];
      }
    }
  return out;
}

}  // namespace steelattn::testing
