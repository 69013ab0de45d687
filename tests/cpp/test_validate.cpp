// Validation errors name the argument and leave outputs untouched.
#include <gtest/gtest.h>

#include "test_util.h"

using namespace steelattn;
using namespace steelattn::testing;

namespace {

struct Fixture {
  std::vector<float> q = random_vec(2 * 4 * 8 * 16, 1), k = random_vec(2 * 2 * 8 * 16, 2),
                     v = random_vec(2 * 2 * 8 * 16, 3), out = std::vector<float>(2 * 4 * 8 * 16, 5.0f);
  AttentionParams p;
  Fixture() {
    p.q = ref4(q.data(), 2, 4, 8, 16);
    p.k = ref4(k.data(), 2, 2, 8, 16);
    p.v = ref4(v.data(), 2, 2, 8, 16);
    p.out = ref4(out.data(), 2, 4, 8, 16);
  }
  void expect_invalid(const std::string& fragment) {
    Status st = attention_forward(p);
    EXPECT_EQ(st.code, StatusCode::invalid_argument);
    EXPECT_NE(st.message.find(fragment), std::string::npos) << st.message;
    for (float x : out) ASSERT_EQ(x, 5.0f);
  }
};

}  // namespace

TEST(Validate, Accepts) {
  Fixture f;
  EXPECT_TRUE(validate_forward(f.p).ok());
  EXPECT_EQ(f.p.H / f.p.Hkv, 2);
}
TEST(Validate, Rank) {
  Fixture f;
  f.p.q.ndim = 3;
  f.expect_invalid("q: expected 4 dims");
}
TEST(Validate, Dtype) {
  Fixture f;
  f.p.k.dtype = DType::f16;
  f.expect_invalid("k: dtype float16 differs");
}
TEST(Validate, GqaRatio) {
  Fixture f;
  f.p.k.shape[1] = 3;
  f.p.v.shape[1] = 3;
  f.expect_invalid("must divide");
}
TEST(Validate, HeadDim) {
  Fixture f;
  f.p.q.shape[3] = f.p.k.shape[3] = 600;
  f.expect_invalid("q: head dim 600");
}
TEST(Validate, LastDimStride) {
  Fixture f;
  f.p.v.stride[3] = 2;
  f.expect_invalid("v: the last dim must be contiguous");
}
TEST(Validate, Window) {
  Fixture f;
  f.p.window_left = -3;
  f.expect_invalid("window_size");
}
TEST(Validate, Dropout) {
  Fixture f;
  f.p.dropout_p = 1.0f;
  f.expect_invalid("dropout_p");
}
TEST(Validate, BiasShape) {
  Fixture f;
  std::vector<float> bias(8 * 9);
  f.p.bias = ref4(bias.data(), 1, 1, 8, 9);
  f.expect_invalid("bias: shape");
}
TEST(Validate, Device) {
  Fixture f;
  f.p.k.device = Device::cuda;
  f.expect_invalid("k: must be on the same device");
}
