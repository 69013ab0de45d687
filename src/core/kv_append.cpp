// kv_append (steelattn.h): argument checks and the dispatch to the CPU or CUDA kernel.
// Every message names the argument; nothing is written before the checks pass.
#include <algorithm>
#include <string>

#include "core/backends.h"
#include "core/tensor_checks.h"

namespace steelattn {
namespace {

Status validate_kv_append(KVAppendParams& p) {
  const TensorRef &kn = p.k_new, &vn = p.v_new, &kc = p.k_cache, &vc = p.v_cache;
  const struct { const TensorRef* t; const char* name; } kv[] = {
      {&kn, "k_new"}, {&vn, "v_new"}, {&kc, "k_cache"}, {&vc, "v_cache"}};
  for (const auto& [t, name] : kv) {
    if (!t->present() || t->ndim != 4) return Status::Invalid(std::string(name) + ": expected a 4-d tensor");
    if (t->dtype != kn.dtype || !is_attention_dtype(t->dtype))
      return Status::Invalid(std::string(name) + ": must be float32, float16, bfloat16 or float64, as k_new");
    if (t->stride[3] != 1 && t->shape[3] > 1) return Status::Invalid(std::string(name) + ": the last dim must be contiguous");
    Status st = check_same_device(*t, kn, name, "k_new");
    if (!st.ok()) return st;
  }
  const int64_t B = kn.shape[0], Hkv = kn.shape[1], Nnew = kn.shape[2], D = kn.shape[3], Dv = vn.shape[3];
  if (vn.shape[0] != B || vn.shape[1] != Hkv || vn.shape[2] != Nnew)
    return Status::Invalid("v_new: shape " + shape_str(vn) + " must be [B, Hkv, Nnew, Dv] with k_new's B, Hkv, Nnew");
  if (kc.shape[1] != Hkv || vc.shape[1] != Hkv || kc.shape[3] != D || vc.shape[3] != Dv ||
      vc.shape[0] != kc.shape[0] || vc.shape[2] != kc.shape[2])
    return Status::Invalid("k_cache, v_cache: shapes " + shape_str(kc) + ", " + shape_str(vc) +
                           " must be [entries or pages, Hkv, rows, D / Dv] with k_new's Hkv, D and v_new's Dv");
  const TensorRef& lens = p.seqlens;
  if (!lens.present() || lens.dtype != DType::i32 || lens.ndim != 1 || lens.shape[0] != B)
    return Status::Invalid("seqlens: must be int32 [B] with B = " + std::to_string(B));
  Status st = check_same_device(lens, kn, "seqlens", "k_new");
  if (!st.ok()) return st;
  if (!(st = check_cache_index(p.block_table, p.kv_batch_idx, B, kn, "k_new")).ok()) return st;
  if (p.block_table.present() && p.block_table.stride[1] != 1 && p.block_table.shape[1] > 1)
    return Status::Invalid("block_table: rows must be contiguous");
  if (!p.block_table.present() && !p.kv_batch_idx.present() && kc.shape[0] != B) {
    return Status::Invalid("k_cache: " + std::to_string(kc.shape[0]) + " entries, k_new has B = " + std::to_string(B));
  }
  const bool rotary = p.rotary_cos.present() || p.rotary_sin.present();
  if (p.q.present() != p.q_out.present()) return Status::Invalid("q, q_out: give both or neither");
  if (p.q.present()) {
    if (!rotary) return Status::Invalid("q: rotated only with rotary tables");
    const TensorRef &q = p.q, &qo = p.q_out;
    if (q.ndim != 4 || q.shape[0] != B || q.shape[1] % Hkv != 0 || q.shape[3] != D || q.dtype != kn.dtype)
      return Status::Invalid("q: must be [B, H, Nq, D] with k_new's B, D and dtype, H a multiple of Hkv, got " +
                             shape_str(q));
    if (qo.ndim != 4 || qo.dtype != q.dtype)
      return Status::Invalid("q_out: must have q's shape and dtype");
    for (int i = 0; i < 4; ++i)
      if (qo.shape[i] != q.shape[i]) return Status::Invalid("q_out: must have q's shape " + shape_str(q));
    if ((q.stride[3] != 1 && q.shape[3] > 1) || (qo.stride[3] != 1 && qo.shape[3] > 1))
      return Status::Invalid("q, q_out: the last dim must be contiguous");
    if (!(st = check_same_device(q, kn, "q", "k_new")).ok() || !(st = check_same_device(qo, kn, "q_out", "k_new")).ok()) return st;
  }
  if (rotary) {
    const TensorRef &c = p.rotary_cos, &s = p.rotary_sin;
    if (!c.present() || !s.present() || c.ndim != 2 || s.ndim != 2 || c.shape[0] != s.shape[0] ||
        c.shape[1] != s.shape[1] || c.dtype != s.dtype || (c.dtype != DType::f32 && c.dtype != kn.dtype) ||
        (c.stride[1] != 1 && c.shape[1] > 1) || (s.stride[1] != 1 && s.shape[1] > 1))
      return Status::Invalid("rotary_cos, rotary_sin: must both be [max_position, rotary_dim / 2], float32 or k_new's "
                             "dtype, rows contiguous");
    if (!(st = check_same_device(c, kn, "rotary_cos", "k_new")).ok() || !(st = check_same_device(s, kn, "rotary_sin", "k_new")).ok()) return st;
    if (p.rotary_dim == 0) p.rotary_dim = 2 * c.shape[1];
    if (p.rotary_dim < 2 || p.rotary_dim % 2 || p.rotary_dim > D || p.rotary_dim > 2 * c.shape[1])
      return Status::Invalid("rotary_dim: must be even, in [2, D] and at most twice the tables' width, got " +
                             std::to_string(p.rotary_dim));
  }
  if (kn.device == Device::cpu) {  // host values: check what the CUDA kernel trusts the caller for
    const int64_t rows = p.block_table.present() ? p.block_table.shape[1] * kc.shape[2] : kc.shape[2];
    for (int64_t b = 0; b < B; ++b) {
      const int32_t n = static_cast<const int32_t*>(lens.data)[b * lens.stride[0]];
      if (n < 0 || n + Nnew > rows)
        return Status::Invalid("seqlens: entry " + std::to_string(b) + " is " + std::to_string(n) + ", and " +
                               std::to_string(Nnew) + " new rows must fit the cache's " + std::to_string(rows));
      if (p.kv_batch_idx.present()) {
        const int32_t slot = static_cast<const int32_t*>(p.kv_batch_idx.data)[b * p.kv_batch_idx.stride[0]];
        if (slot < 0 || slot >= kc.shape[0])
          return Status::Invalid("kv_batch_idx: entry " + std::to_string(b) + " is " + std::to_string(slot) +
                                 ", outside the cache's " + std::to_string(kc.shape[0]) + " slots");
      }
      if (p.block_table.present())
        for (int64_t j = n / kc.shape[2]; Nnew > 0 && j <= (n + Nnew - 1) / kc.shape[2]; ++j) {
          const int32_t page =
              static_cast<const int32_t*>(p.block_table.data)[b * p.block_table.stride[0] + j * p.block_table.stride[1]];
          if (page < 0 || page >= kc.shape[0])
            return Status::Invalid("block_table: entry (" + std::to_string(b) + ", " + std::to_string(j) + ") is " +
                                   std::to_string(page) + ", outside the pool's " + std::to_string(kc.shape[0]) +
                                   " pages");
        }
      const int64_t last = n + std::max<int64_t>(Nnew, p.q.present() ? p.q.shape[2] : 0);
      if (rotary && last > p.rotary_cos.shape[0])
        return Status::Invalid("rotary_cos: covers " + std::to_string(p.rotary_cos.shape[0]) +
                               " positions, entry " + std::to_string(b) + " needs " + std::to_string(last));
    }
  }
  return Status::Ok();
}

}  // namespace

Status kv_append(KVAppendParams& p, void* stream) {
  Status st = validate_kv_append(p);
  if (!st.ok()) return st;
  if (p.k_new.device == Device::cpu) return cpu_kv_append(p);
#if defined(STEELATTN_WITH_CUDA)
  return cuda_kv_append(p, stream);
#else
  (void)stream;
  return Status::NotImplemented("kv_append: this build has no CUDA kernels");
#endif
}

}  // namespace steelattn
