// The core's backward entry point on CPU: analytic gradients against central
// finite differences of the forward, in float64 (the portable float64 kernel).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "test_util.h"

using namespace steelattn;
using namespace steelattn::testing;

namespace {

TensorRef ref(double* data, int ndim, std::vector<int64_t> shape) {
  TensorRef t;
  t.data = data;
  t.dtype = DType::f64;
  t.ndim = ndim;
  int64_t stride = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    t.shape[i] = shape[size_t(i)];
    t.stride[i] = stride;
    stride *= shape[size_t(i)];
  }
  return t;
}

struct Problem {
  int64_t B = 1, H = 4, Hkv = 2, N = 7, S = 9, D = 5, Dv = 3;
  std::vector<double> q, k, v, dout;
  AttentionParams base;

  Problem() {
    auto fill = [](size_t n, uint32_t seed) {
      const auto f = random_vec(n, seed);
      return std::vector<double>(f.begin(), f.end());
    };
    q = fill(size_t(B * H * N * D), 1);
    k = fill(size_t(B * Hkv * S * D), 2);
    v = fill(size_t(B * Hkv * S * Dv), 3);
    dout = fill(size_t(B * H * N * Dv), 4);
    base.scale = 0.4;
    base.softcap = 2.0;
    base.diag_offset = S - N;
    base.window_left = 4;
    base.window_right = 0;
  }

  // loss = sum(dout * out) for the current q, k, v; also fills out and lse.
  double loss(std::vector<double>* out, std::vector<double>* lse) {
    AttentionParams p = base;
    out->assign(size_t(B * H * N * Dv), 0.0);
    lse->assign(size_t(B * H * N), 0.0);
    p.q = ref(q.data(), 4, {B, H, N, D});
    p.k = ref(k.data(), 4, {B, Hkv, S, D});
    p.v = ref(v.data(), 4, {B, Hkv, S, Dv});
    p.out = ref(out->data(), 4, {B, H, N, Dv});
    p.lse = ref(lse->data(), 3, {B, H, N});
    EXPECT_TRUE(attention_forward(p).ok());
    double l = 0;
    for (size_t e = 0; e < out->size(); ++e) l += (*out)[e] * dout[e];
    return l;
  }
};

}  // namespace

TEST(CpuBackward, MatchesFiniteDifferencesInFloat64) {
  Problem pr;
  std::vector<double> out, lse;
  pr.loss(&out, &lse);
  std::vector<double> dq(pr.q.size()), dk(pr.k.size()), dv(pr.v.size());
  AttentionParams p = pr.base;
  p.q = ref(pr.q.data(), 4, {pr.B, pr.H, pr.N, pr.D});
  p.k = ref(pr.k.data(), 4, {pr.B, pr.Hkv, pr.S, pr.D});
  p.v = ref(pr.v.data(), 4, {pr.B, pr.Hkv, pr.S, pr.Dv});
  p.out = ref(out.data(), 4, {pr.B, pr.H, pr.N, pr.Dv});
  p.lse = ref(lse.data(), 3, {pr.B, pr.H, pr.N});
  p.dout = ref(pr.dout.data(), 4, {pr.B, pr.H, pr.N, pr.Dv});
  p.dq = ref(dq.data(), 4, {pr.B, pr.H, pr.N, pr.D});
  p.dk = ref(dk.data(), 4, {pr.B, pr.Hkv, pr.S, pr.D});
  p.dv = ref(dv.data(), 4, {pr.B, pr.Hkv, pr.S, pr.Dv});
  ForwardPath path;
  ASSERT_TRUE(attention_backward(p, nullptr, &path).ok());
  EXPECT_EQ(path, ForwardPath::cpu_scalar);

  const double h = 1e-6;
  std::vector<double> o2, l2;
  const struct { std::vector<double>* x; std::vector<double>* g; const char* name; } inputs[] = {
      {&pr.q, &dq, "q"}, {&pr.k, &dk, "k"}, {&pr.v, &dv, "v"}};
  for (const auto& in : inputs)
    for (size_t e = 0; e < in.x->size(); ++e) {
      const double x0 = (*in.x)[e];
      (*in.x)[e] = x0 + h;
      const double up = pr.loss(&o2, &l2);
      (*in.x)[e] = x0 - h;
      const double down = pr.loss(&o2, &l2);
      (*in.x)[e] = x0;
      EXPECT_NEAR((*in.g)[e], (up - down) / (2 * h), 1e-6) << in.name << "[" << e << "]";
    }
}

TEST(CpuBackward, RejectsMissingLse) {
  Problem pr;
  std::vector<double> out(size_t(pr.B * pr.H * pr.N * pr.Dv)), dq(pr.q.size()), dk(pr.k.size()),
      dv(pr.v.size());
  AttentionParams p = pr.base;
  p.q = ref(pr.q.data(), 4, {pr.B, pr.H, pr.N, pr.D});
  p.k = ref(pr.k.data(), 4, {pr.B, pr.Hkv, pr.S, pr.D});
  p.v = ref(pr.v.data(), 4, {pr.B, pr.Hkv, pr.S, pr.Dv});
  p.out = ref(out.data(), 4, {pr.B, pr.H, pr.N, pr.Dv});
  p.dout = ref(pr.dout.data(), 4, {pr.B, pr.H, pr.N, pr.Dv});
  p.dq = ref(dq.data(), 4, {pr.B, pr.H, pr.N, pr.D});
  p.dk = ref(dk.data(), 4, {pr.B, pr.Hkv, pr.S, pr.D});
  p.dv = ref(dv.data(), 4, {pr.B, pr.Hkv, pr.S, pr.Dv});
  const Status st = attention_backward(p);
  EXPECT_EQ(st.code, StatusCode::invalid_argument);
  EXPECT_NE(st.message.find("lse"), std::string::npos);
}

// choose_backward_path + run_backward give attention_backward's gradients (bit for bit);
// the CPU backward needs no workspace.
TEST(CpuBackward, ChooseThenRunMatchesAttentionBackward) {
  Problem pr;
  std::vector<double> out, lse;
  pr.loss(&out, &lse);
  std::vector<double> g1(pr.q.size() + pr.k.size() + pr.v.size(), -1.0), g2 = g1;
  auto params = [&](std::vector<double>& g) {
    AttentionParams p = pr.base;
    p.q = ref(pr.q.data(), 4, {pr.B, pr.H, pr.N, pr.D});
    p.k = ref(pr.k.data(), 4, {pr.B, pr.Hkv, pr.S, pr.D});
    p.v = ref(pr.v.data(), 4, {pr.B, pr.Hkv, pr.S, pr.Dv});
    p.out = ref(out.data(), 4, {pr.B, pr.H, pr.N, pr.Dv});
    p.lse = ref(lse.data(), 3, {pr.B, pr.H, pr.N});
    p.dout = ref(pr.dout.data(), 4, {pr.B, pr.H, pr.N, pr.Dv});
    p.dq = ref(g.data(), 4, {pr.B, pr.H, pr.N, pr.D});
    p.dk = ref(g.data() + pr.q.size(), 4, {pr.B, pr.Hkv, pr.S, pr.D});
    p.dv = ref(g.data() + pr.q.size() + pr.k.size(), 4, {pr.B, pr.Hkv, pr.S, pr.Dv});
    return p;
  };
  AttentionParams a = params(g1), b = params(g2);
  ASSERT_TRUE(attention_backward(a).ok());
  ASSERT_TRUE(validate_backward(b).ok());
  const PathChoice c = choose_backward_path(b);
  EXPECT_EQ(c.path, ForwardPath::cpu_scalar);
  EXPECT_TRUE(c.demoted.empty());
  EXPECT_EQ(backward_workspace_bytes(b, c.path), 0u);
  ASSERT_TRUE(run_backward(b, c.path).ok());
  for (size_t e = 0; e < g1.size(); ++e) ASSERT_EQ(g1[e], g2[e]) << "element " << e;
}
