// The core's forward entry point on CPU, against a float64 reference.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "test_util.h"

using namespace steelattn;
using namespace steelattn::testing;

class CpuForward : public ::testing::TestWithParam<std::tuple<int, int, int, int, int, bool>> {};

TEST_P(CpuForward, MatchesFloat64Reference) {
  const auto [N, S, D, Dv, G, causal] = GetParam();
  const int64_t B = 2, Hkv = 2, H = Hkv * G;
  auto q = random_vec(size_t(B * H * N * D), 1), k = random_vec(size_t(B * Hkv * S * D), 2),
       v = random_vec(size_t(B * Hkv * S * Dv), 3);
  std::vector<float> out(size_t(B * H * N * Dv), std::numeric_limits<float>::quiet_NaN());
  AttentionParams p;
  p.q = ref4(q.data(), B, H, N, D);
  p.k = ref4(k.data(), B, Hkv, S, D);
  p.v = ref4(v.data(), B, Hkv, S, Dv);
  p.out = ref4(out.data(), B, H, N, Dv);
  p.scale = float(1.0 / std::sqrt(double(D)));
  p.diag_offset = S - N;
  p.window_right = causal ? 0 : -1;
  ForwardPath path;
  ASSERT_TRUE(attention_forward(p, nullptr, &path).ok());
  EXPECT_NE(path, ForwardPath::none);
  const auto ref = reference(q, k, v, B, H, Hkv, N, S, D, Dv, p.scale, S - N, -1, causal ? 0 : -1);
  double num = 0, den = 0;
  for (size_t e = 0; e < out.size(); ++e) {
    ASSERT_TRUE(std::isfinite(out[e])) << "element " << e << " not written";
    num += (out[e] - ref[e]) * (out[e] - ref[e]);
    den += ref[e] * ref[e];
  }
  EXPECT_LT(std::sqrt(num / den), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(OddShapes, CpuForward,
                         ::testing::Values(std::make_tuple(1, 1, 64, 64, 1, false), std::make_tuple(7, 17, 32, 48, 2, true),
                                           std::make_tuple(65, 130, 80, 80, 4, true),
                                           std::make_tuple(200, 33, 13, 5, 1, false),
                                           std::make_tuple(129, 257, 128, 128, 8, true)));

TEST(CpuForward, FullyMaskedRowsGiveZerosAndNegInfLse) {
  const int64_t N = 6, S = 2, D = 8;
  auto q = random_vec(N * D, 4), k = random_vec(S * D, 5), v = random_vec(S * D, 6);
  std::vector<float> out(N * D, 1.0f), lse(N, 0.0f);
  AttentionParams p;
  p.q = ref4(q.data(), 1, 1, N, D);
  p.k = ref4(k.data(), 1, 1, S, D);
  p.v = ref4(v.data(), 1, 1, S, D);
  p.out = ref4(out.data(), 1, 1, N, D);
  p.lse = ref4(lse.data(), 1, 1, N, 1);
  p.lse.ndim = 3;
  p.lse.stride[0] = N;
  p.lse.stride[1] = N;
  p.lse.stride[2] = 1;
  p.diag_offset = S - N;  // bottom-right: the first 4 queries see nothing
  p.window_right = 0;
  ASSERT_TRUE(attention_forward(p).ok());
  for (int i = 0; i < 4; ++i) {
    EXPECT_TRUE(std::isinf(lse[i]) && lse[i] < 0);
    for (int d = 0; d < D; ++d) EXPECT_EQ(out[i * D + d], 0.0f);
  }
  for (int i = 4; i < N; ++i) EXPECT_TRUE(std::isfinite(lse[i]));
}

TEST(Dropout, KeepMaskIsDeterministicAndHasTheRightRate) {
  std::vector<uint8_t> a(4 * 64 * 64), b(a.size());
  ASSERT_TRUE(dropout_keep_mask(a.data(), 1, 4, 64, 64, 0.3f, 11, 3).ok());
  ASSERT_TRUE(dropout_keep_mask(b.data(), 1, 4, 64, 64, 0.3f, 11, 3).ok());
  EXPECT_EQ(a, b);
  double kept = 0;
  for (auto x : a) kept += x;
  EXPECT_NEAR(kept / double(a.size()), 0.7, 0.02);
}

// choose_forward_path + run_forward (select once, run) give attention_forward's path and result.
TEST(CpuForward, ChooseThenRunMatchesAttentionForward) {
  const int64_t B = 1, H = 4, Hkv = 2, N = 33, S = 45, D = 24;
  auto q = random_vec(size_t(B * H * N * D), 7), k = random_vec(size_t(B * Hkv * S * D), 8),
       v = random_vec(size_t(B * Hkv * S * D), 9);
  std::vector<float> a(size_t(B * H * N * D), std::numeric_limits<float>::quiet_NaN()), b = a;
  AttentionParams p;
  p.q = ref4(q.data(), B, H, N, D);
  p.k = ref4(k.data(), B, Hkv, S, D);
  p.v = ref4(v.data(), B, Hkv, S, D);
  p.out = ref4(a.data(), B, H, N, D);
  p.scale = 0.2;
  p.window_right = 0;
  ForwardPath taken;
  ASSERT_TRUE(attention_forward(p, nullptr, &taken).ok());

  AttentionParams p2 = p;
  p2.out = ref4(b.data(), B, H, N, D);
  ASSERT_TRUE(validate_forward(p2).ok());
  const PathChoice c = choose_forward_path(p2);
  EXPECT_EQ(c.path, taken);
  EXPECT_EQ(c.path, select_forward_path(p2));
  EXPECT_TRUE(c.why_not.empty());
  EXPECT_TRUE(c.demoted.empty());  // the CPU kernel is the only CPU path: nothing demoted
  ASSERT_TRUE(run_forward(p2, c.path).ok());
  for (size_t e = 0; e < a.size(); ++e) ASSERT_EQ(a[e], b[e]) << "element " << e;
}

// A CUDA call on a build or machine without CUDA kernels gets `none` and the reason.
TEST(Dispatch, NoKernelSaysWhy) {
  std::vector<float> x(16);
  AttentionParams p;
  p.q = p.k = p.v = p.out = ref4(x.data(), 1, 1, 4, 4);
  for (TensorRef* t : {&p.q, &p.k, &p.v, &p.out}) t->device = Device::cuda;
  ASSERT_TRUE(validate_forward(p).ok());
  if (cuda_compiled()) GTEST_SKIP() << "the CUDA kernels' own checks decide here";
  const PathChoice c = choose_forward_path(p);
  EXPECT_EQ(c.path, ForwardPath::none);
  EXPECT_NE(c.why_not.find("no CUDA kernels"), std::string::npos) << c.why_not;
  EXPECT_EQ(choose_backward_path(p).path, ForwardPath::none);
  EXPECT_EQ(attention_forward(p).code, StatusCode::not_implemented);
}
