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

inline Status check_same_device(const TensorRef& t, const TensorRef& ref, const char* name, const char* ref_name = "q") {
  if (t.device != ref.device || t.device_id != ref.device_id)
    return Status::Invalid(std::string(name) + ": must be on the same device as " + ref_name);
  return Status::Ok();
}

// How a batch reaches its cache rows (AttentionParams, KVAppendParams): through a block
// table (int32 [B, max_pages]) or a cache slot per entry (kv_batch_idx, int32 [B]), at
// most one of them, on ref's device.
inline Status check_cache_index(const TensorRef& block_table, const TensorRef& kv_batch_idx, int64_t B,
                                const TensorRef& ref, const char* ref_name) {
  if (block_table.present() && kv_batch_idx.present())
    return Status::Invalid("block_table, kv_batch_idx: give one of them (a paged batch maps through its block table)");
  if (!block_table.present() && !kv_batch_idx.present()) return Status::Ok();
  const TensorRef& t = block_table.present() ? block_table : kv_batch_idx;
  const char* name = block_table.present() ? "block_table" : "kv_batch_idx";
  const int want_dims = block_table.present() ? 2 : 1;
  if (t.dtype != DType::i32 || t.ndim != want_dims || t.shape[0] != B)
    return Status::Invalid(std::string(name) + ": must be int32 " + (want_dims == 2 ? "[B, max_pages]" : "[B]") +
                           " with B = " + std::to_string(B) + ", got " + dtype_name(t.dtype) + " " + shape_str(t));
  return check_same_device(t, ref, name, ref_name);
}

}  // namespace steelattn
