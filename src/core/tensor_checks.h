// Small helpers the argument checks share (validate.cpp, kv_append.cpp).
#pragma once

#include <string>

#include "steelattn/steelattn.h"

namespace steelattn {

// "[2, 3]": a tensor's shape for messages.
inline std::string shape_str(const TensorRef& t) {
  std::string s = "[";
  for (int i = 0; i < t.ndim; ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
  return s + "]";
}

inline bool is_attention_dtype(DType t) {
  return t == DType::f32 || t == DType::f16 || t == DType::bf16 || t == DType::f64;
}

}  // namespace steelattn
