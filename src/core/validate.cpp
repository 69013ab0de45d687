// Argument checks for a forward call. Every message names the argument and
// what was expected, and nothing is written before the checks pass.
#include <cmath>
#include <string>

#include "core/tensor_checks.h"
#include "steelattn/steelattn.h"

namespace steelattn {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::f64: return "float64";
    case DType::boolean: return "bool";
    case DType::i32: return "int32";
    case DType::i64: return "int64";
    case DType::u8: return "uint8";
  }
  return "unknown";
}

int dtype_size(DType t) {
  switch (t) {
    case DType::f32: case DType::i32: return 4;
    case DType::f16: case DType::bf16: return 2;
    case DType::f64: case DType::i64: return 8;
    case DType::boolean: case DType::u8: return 1;
  }
  return 0;
}

namespace {

constexpr int64_t kMaxHeadDim = 512;

// fp32 side tensors (lse, bias, weights, slopes); float64 calls may use float64 ones.
bool is_side_float(DType t, DType q) { return t == DType::f32 || (q == DType::f64 && t == DType::f64); }


// A [d0, d1, d2, d3] tensor whose dims may broadcast (stride 0) over `want`.
Status check_broadcast4(const TensorRef& t, const char* name, const int64_t want[4]) {
  if (t.ndim != 4) return Status::Invalid(std::string(name) + ": expected 4 dims after broadcasting, got " + shape_str(t));
  for (int i = 0; i < 4; ++i)
    if (t.shape[i] != want[i])
      return Status::Invalid(std::string(name) + ": shape " + shape_str(t) + " does not match [B, H, N, S]");
  return Status::Ok();
}

// cu_seqlens_q / cu_seqlens_k of a varlen call (steelattn.h). Host-side tensors are read
// (starts at 0, non-decreasing, ends at the total); device ones are not, which would
// need a synchronisation: the kernels clamp what they read instead.
Status check_cu_seqlens(const TensorRef& cu, const char* name, const TensorRef& q, int64_t total) {
  if (!cu.present()) return Status::Invalid(std::string(name) + ": missing (varlen needs both cu_seqlens_q and cu_seqlens_k)");
  if (cu.dtype != DType::i32) return Status::Invalid(std::string(name) + ": must be int32, got " + dtype_name(cu.dtype));
  if (cu.ndim != 1 || cu.shape[0] < 1)
    return Status::Invalid(std::string(name) + ": must be 1-d [num_seqs + 1], got " + shape_str(cu));
  Status st = check_same_device(cu, q, name);
  if (!st.ok()) return st;
  if (cu.device == Device::cpu) {
    const int32_t* c = static_cast<const int32_t*>(cu.data);
    if (c[0] != 0) return Status::Invalid(std::string(name) + ": must start at 0");
    for (int64_t i = 1; i < cu.shape[0]; ++i)
      if (c[i * cu.stride[0]] < c[(i - 1) * cu.stride[0]])
        return Status::Invalid(std::string(name) + ": must be non-decreasing (entry " + std::to_string(i) + ")");
    if (c[(cu.shape[0] - 1) * cu.stride[0]] != total)
      return Status::Invalid(std::string(name) + ": last entry must equal the total number of tokens (" +
                             std::to_string(total) + ")");
  }
  return Status::Ok();
}

Status validate_varlen(AttentionParams& p) {
  if (p.B != 1) return Status::Invalid("q: a varlen call takes packed [1, H, total, D] views");
  Status st = check_cu_seqlens(p.cu_seqlens_q, "cu_seqlens_q", p.q, p.N);
  if (st.ok()) st = check_cu_seqlens(p.cu_seqlens_k, "cu_seqlens_k", p.q, p.S);
  if (!st.ok()) return st;
  if (p.cu_seqlens_k.shape[0] != p.cu_seqlens_q.shape[0])
    return Status::Invalid("cu_seqlens_k: must have as many entries as cu_seqlens_q (" +
                           std::to_string(p.cu_seqlens_q.shape[0]) + ")");
  p.num_seqs = p.cu_seqlens_q.shape[0] - 1;
  if (p.bias.present() || p.bool_mask.present() || p.attn_weights.present())
    return Status::Invalid("cu_seqlens_q: varlen calls take no bias, bool_mask or attn_weights");
  return Status::Ok();
}

// block_table / kv_batch_idx (steelattn.h): their shapes, and S from the pages.
Status validate_indirect_kv(AttentionParams& p) {
  if (!p.seqlens_k.present()) return Status::Invalid("block_table, kv_batch_idx: need seqlens_k (the used lengths)");
  Status st = check_cache_index(p.block_table, p.kv_batch_idx, p.B, p.q, "q");
  if (!st.ok()) return st;
  if (p.v.shape[0] != p.k.shape[0])
    return Status::Invalid("v: " + shape_str(p.v) + " must have k's " + std::to_string(p.k.shape[0]) +
                           (p.block_table.present() ? " pages" : " cache entries"));
  if (p.block_table.present()) p.S = p.block_table.shape[1] * p.k.shape[2];  // pages [num_pages, Hkv, page_size, D]
  return Status::Ok();
}

}  // namespace

Status validate_forward(AttentionParams& p) {
  const struct { TensorRef* t; const char* name; } io[] = {{&p.q, "q"}, {&p.k, "k"}, {&p.v, "v"}, {&p.out, "out"}};
  for (const auto& x : io) {
    if (!x.t->present()) return Status::Invalid(std::string(x.name) + ": missing");
    if (x.t->ndim != 4)
      return Status::Invalid(std::string(x.name) + ": expected 4 dims [B, H, N, D], got " + shape_str(*x.t));
    if (!is_attention_dtype(x.t->dtype))
      return Status::Invalid(std::string(x.name) + ": dtype " + dtype_name(x.t->dtype) +
                             " is not supported (float32, float16, bfloat16, float64)");
    if (x.t->dtype != p.q.dtype)
      return Status::Invalid(std::string(x.name) + ": dtype " + dtype_name(x.t->dtype) + " differs from q's " +
                             dtype_name(p.q.dtype));
    if (x.t->stride[3] != 1 && x.t->shape[3] > 1)
      return Status::Invalid(std::string(x.name) + ": the last dim must be contiguous (stride 1), got stride " +
                             std::to_string(x.t->stride[3]));
    Status st = check_same_device(*x.t, p.q, x.name);
    if (!st.ok()) return st;
  }
  p.B = p.q.shape[0];
  p.H = p.q.shape[1];
  p.N = p.q.shape[2];
  p.D = p.q.shape[3];
  p.Hkv = p.k.shape[1];
  p.S = p.k.shape[2];
  p.Dv = p.v.shape[3];
  p.num_seqs = 0;
  if (p.indirect_kv()) {
    Status st = validate_indirect_kv(p);
    if (!st.ok()) return st;
  } else if (p.k.shape[0] != p.B || p.v.shape[0] != p.B) {
    return Status::Invalid("k, v: batch size must equal q's (" + std::to_string(p.B) + ")");
  }
  if (p.k.shape[3] != p.D)
    return Status::Invalid("k: head dim " + std::to_string(p.k.shape[3]) + " differs from q's " + std::to_string(p.D));
  if (p.v.shape[1] != p.Hkv || p.v.shape[2] != p.k.shape[2])
    return Status::Invalid("v: shape " + shape_str(p.v) + " must be [B, Hkv, S, Dv] with k's Hkv and S");
  if (p.Hkv < 1 || p.H % p.Hkv != 0)
    return Status::Invalid("k: number of heads " + std::to_string(p.Hkv) + " must divide q's " + std::to_string(p.H));
  if (p.D < 1 || p.D > kMaxHeadDim)
    return Status::Invalid("q: head dim " + std::to_string(p.D) + " out of range [1, 512]");
  if (p.Dv < 1 || p.Dv > kMaxHeadDim)
    return Status::Invalid("v: head dim " + std::to_string(p.Dv) + " out of range [1, 512]");
  if (p.out.shape[0] != p.B || p.out.shape[1] != p.H || p.out.shape[2] != p.N || p.out.shape[3] != p.Dv)
    return Status::Invalid("out: shape " + shape_str(p.out) + " must be [B, H, N, Dv]");
  if (!std::isfinite(p.scale)) return Status::Invalid("scale: must be finite");
  if (!(p.softcap >= 0.0) || !std::isfinite(p.softcap)) return Status::Invalid("softcap: must be finite and >= 0");
  if (!(p.dropout_p >= 0.0f && p.dropout_p < 1.0f)) return Status::Invalid("dropout_p: must be in [0, 1)");
  if (p.window_left < -1 || p.window_right < -1)
    return Status::Invalid("window_size: each side must be -1 (unbounded) or >= 0");
  if (p.num_splits < 0) return Status::Invalid("num_splits: must be >= 0 (0: chosen by the kernel)");

  if (p.lse.present()) {
    if (!is_side_float(p.lse.dtype, p.q.dtype) || p.lse.ndim != 3 || p.lse.shape[0] != p.B || p.lse.shape[1] != p.H ||
        p.lse.shape[2] != p.N)
      return Status::Invalid("lse: must be float32 [B, H, N]");
    Status st = check_same_device(p.lse, p.q, "lse");
    if (!st.ok()) return st;
  }
  const int64_t full[4] = {p.B, p.H, p.N, p.S};
  if (p.attn_weights.present()) {
    if (!is_side_float(p.attn_weights.dtype, p.q.dtype)) return Status::Invalid("attn_weights: must be float32");
    Status st = check_broadcast4(p.attn_weights, "attn_weights", full);
    if (st.ok()) st = check_same_device(p.attn_weights, p.q, "attn_weights");
    if (!st.ok()) return st;
  }
  if (p.bias.present()) {
    if (!is_side_float(p.bias.dtype, p.q.dtype)) return Status::Invalid("bias: must be float32 (cast it before the call)");
    Status st = check_broadcast4(p.bias, "bias", full);
    if (st.ok()) st = check_same_device(p.bias, p.q, "bias");
    if (!st.ok()) return st;
  }
  if (p.bool_mask.present()) {
    if (p.bool_mask.dtype != DType::boolean) return Status::Invalid("bool_mask: must be bool");
    Status st = check_broadcast4(p.bool_mask, "bool_mask", full);
    if (st.ok()) st = check_same_device(p.bool_mask, p.q, "bool_mask");
    if (!st.ok()) return st;
  }
  if (p.seqlens_k.present()) {
    const TensorRef& c = p.seqlens_k;
    if (c.dtype != DType::i32 || c.ndim != 1 || c.shape[0] != p.B)
      return Status::Invalid("seqlens_k: must be int32 [B], got " + std::string(dtype_name(c.dtype)) + " " +
                             shape_str(c));
    Status st = check_same_device(c, p.q, "seqlens_k");
    if (!st.ok()) return st;
    if (c.device == Device::cpu)
      for (int64_t b = 0; b < p.B; ++b) {
        const int32_t n = static_cast<const int32_t*>(c.data)[b * c.stride[0]];
        if (n < 0 || n > p.S)
          return Status::Invalid("seqlens_k: entry " + std::to_string(b) + " is " + std::to_string(n) +
                                 ", outside [0, " + std::to_string(p.S) + "] (the cache's capacity)");
      }
    if (p.cu_seqlens_q.present() || p.block_mask.present() || p.bias.present() || p.bool_mask.present() ||
        p.attn_weights.present())
      return Status::Invalid("seqlens_k: not combined with varlen, block_mask, bias, bool_mask or attn_weights");
  }
  if (p.block_mask.present()) {
    const TensorRef& m = p.block_mask;
    if (m.dtype != DType::boolean) return Status::Invalid("block_mask: must be bool");
    if (p.block_q < 16 || p.block_q % 16 != 0 || p.block_k < 16 || p.block_k % 16 != 0)
      return Status::Invalid("block_size: both sides must be positive multiples of 16, got (" +
                             std::to_string(p.block_q) + ", " + std::to_string(p.block_k) + ")");
    const int64_t want[4] = {p.B, p.H, (p.N + p.block_q - 1) / p.block_q, (p.S + p.block_k - 1) / p.block_k};
    if (m.ndim != 4) return Status::Invalid("block_mask: expected 4 dims [B, H, NQ, NK], got " + shape_str(m));
    for (int i = 0; i < 4; ++i)
      if (m.shape[i] != want[i])
        return Status::Invalid("block_mask: shape " + shape_str(m) + " must be [B, H, ceil(N / block_q), ceil(S / block_k)]");
    Status st = check_same_device(m, p.q, "block_mask");
    if (!st.ok()) return st;
    if (p.cu_seqlens_q.present() || p.attn_weights.present())
      return Status::Invalid("block_mask: not combined with varlen or attn_weights");
  }
  if (p.cu_seqlens_q.present() || p.cu_seqlens_k.present()) {
    Status st = validate_varlen(p);
    if (!st.ok()) return st;
  }
  if (p.alibi_slopes.present()) {
    const TensorRef& a = p.alibi_slopes;
    const int64_t batch = p.varlen() ? p.num_seqs : p.B;
    if (!is_side_float(a.dtype, p.q.dtype) || a.ndim != 2 || a.shape[0] != batch || a.shape[1] != p.H)
      return Status::Invalid(p.varlen() ? "alibi_slopes: must be float32 [H] or [num_seqs, H]"
                                        : "alibi_slopes: must be float32 [H] or [B, H]");
    Status st = check_same_device(a, p.q, "alibi_slopes");
    if (!st.ok()) return st;
  }
  return Status::Ok();
}

Status validate_backward(AttentionParams& p) {
  Status st = validate_forward(p);
  if (!st.ok()) return st;
  if (!p.lse.present()) return Status::Invalid("lse: the backward pass needs the forward's lse");
  const struct { TensorRef* t; const TensorRef* like; const char* name; } grads[] = {
      {&p.dout, &p.out, "dout"}, {&p.dq, &p.q, "dq"}, {&p.dk, &p.k, "dk"}, {&p.dv, &p.v, "dv"}};
  for (const auto& g : grads) {
    if (!g.t->present()) return Status::Invalid(std::string(g.name) + ": missing");
    if (g.t->ndim != 4 || g.t->dtype != g.like->dtype)
      return Status::Invalid(std::string(g.name) + ": must be 4-d with the dtype of its forward tensor");
    for (int i = 0; i < 4; ++i)
      if (g.t->shape[i] != g.like->shape[i])
        return Status::Invalid(std::string(g.name) + ": shape " + shape_str(*g.t) + " differs from " +
                               shape_str(*g.like));
    if (g.t->stride[3] != 1 && g.t->shape[3] > 1)
      return Status::Invalid(std::string(g.name) + ": the last dim must be contiguous (stride 1)");
    st = check_same_device(*g.t, p.q, g.name);
    if (!st.ok()) return st;
  }
  if (p.dlse.present()) {
    if (p.dlse.dtype != p.lse.dtype || p.dlse.ndim != 3 || p.dlse.shape[0] != p.B || p.dlse.shape[1] != p.H ||
        p.dlse.shape[2] != p.N)
      return Status::Invalid("dlse: must have lse's dtype and shape [B, H, N]");
    st = check_same_device(p.dlse, p.q, "dlse");
    if (!st.ok()) return st;
  }
  if (p.dbias.present()) {
    const int64_t full[4] = {p.B, p.H, p.N, p.S};
    if (!is_side_float(p.dbias.dtype, p.q.dtype)) return Status::Invalid("dbias: must be float32");
    st = check_broadcast4(p.dbias, "dbias", full);
    if (st.ok()) st = check_same_device(p.dbias, p.q, "dbias");
    if (!st.ok()) return st;
    for (int i = 0; i < 4; ++i)
      if (p.dbias.stride[i] == 0 && p.dbias.shape[i] > 1)
        return Status::Invalid("dbias: must not have zero strides (each element is written)");
  }
  return Status::Ok();
}

}  // namespace steelattn
