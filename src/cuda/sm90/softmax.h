// Online softmax over the two query rows a thread owns in an m64 fragment.
// Row max needs two quad shuffles (the 4 lanes sharing a row); the row sum
// stays a per-thread partial until finalize, which reduces it once.
#pragma once

#include <cmath>

#include "cuda/sm90/ptx.h"

namespace steelattn::sm90 {

template <int NS>  // NS = kBlockN / 2 scores per thread
struct OnlineSoftmax {
  float row_max[2];  // running max of x (softmax operand units), -inf = nothing seen
  float row_sum[2];  // this thread's partial sum of p, in the scale of row_max
  float c;           // log2 factor (score_mod.h)

  __device__ explicit OnlineSoftmax(float log2_factor) : c(log2_factor) { reset(); }

  __device__ void reset() {
    row_max[0] = row_max[1] = -INFINITY;
    row_sum[0] = row_sum[1] = 0.f;
  }

  // Turns scores into probabilities in place; returns in corr[r] the factor
  // that rescales everything accumulated so far for row r.
  // M = NS, or a prefix of the fragment (the first M/4 column groups of 8, as
  // in a narrower m64nN accumulator: the layout is the same).
  template <int M>
  __device__ __forceinline__ void step(float (&s)[M], float (&corr)[2]) {
    float mx[2] = {row_max[0], row_max[1]};
#pragma unroll
    for (int e = 0; e < M; ++e) mx[(e >> 1) & 1] = fmaxf(mx[(e >> 1) & 1], s[e]);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    }
    float neg_max_scaled[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      // A row with nothing visible yet keeps max -inf: use 0 so exp2(-inf - 0) = 0, never NaN.
      neg_max_scaled[r] = mx[r] == -INFINITY ? 0.f : -mx[r] * c;
      corr[r] = row_max[r] == -INFINITY ? 0.f : ex2_approx((row_max[r] - mx[r]) * c);
      row_max[r] = mx[r];
      row_sum[r] *= corr[r];
    }
#pragma unroll
    for (int e = 0; e < M; ++e) {
      const int r = (e >> 1) & 1;
      s[e] = ex2_approx(fmaf(s[e], c, neg_max_scaled[r]));
      row_sum[r] += s[e];
    }
  }

  // Reduces the row sums across the quad. inv[r] multiplies O (0 for an empty
  // row, so O = 0); lse[r] is the natural-log sum-exp (-inf for an empty row).
  __device__ __forceinline__ void finalize(float (&inv)[2], float (&lse)[2]) {
    constexpr float kLn2 = 0.69314718055994531f;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = row_sum[r];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const bool empty = !(sum > 0.f);
      inv[r] = empty ? 0.f : 1.f / sum;
      lse[r] = empty ? -INFINITY : (row_max[r] * c + __log2f(sum)) * kLn2;
    }
  }
};

}  // namespace steelattn::sm90
