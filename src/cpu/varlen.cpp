// A varlen call as one dense problem per sequence, and a call with per-entry key lengths
// (a KV cache) as one per batch entry (flash.h), so the CPU kernels run ragged batches
// without a kernel of their own: each problem views its part of the tensors, and the
// kernels schedule all of them as one pool of tasks.
#include <cstdint>
#include <vector>

#include "cpu/flash.h"

namespace steelattn::cpu {
namespace {

// Rows [start, start + n) of dim 2 of a packed [1, H, total, ...] tensor (absent stays absent).
void narrow_rows(TensorRef& t, int64_t start, int64_t n) {
  if (!t.present()) return;
  t.data = static_cast<char*>(t.data) + start * t.stride[2] * dtype_size(t.dtype);
  t.shape[2] = n;
}

int64_t entry(const TensorRef& cu, int64_t i) { return static_cast<const int32_t*>(cu.data)[i * cu.stride[0]]; }

}  // namespace

// Batch entry b of a call with per-entry key lengths (seqlens_k): a view of entry b with S
// its length and its own bottom-right diagonal.
std::vector<AttentionParams> split_cache_entries(const AttentionParams& p) {
  std::vector<AttentionParams> out;
  out.reserve(size_t(p.B));
  for (int64_t b = 0; b < p.B; ++b) {
    AttentionParams s = p;
    s.seqlens_k = TensorRef{};
    s.B = 1;
    s.S = static_cast<const int32_t*>(p.seqlens_k.data)[b * p.seqlens_k.stride[0]];
    s.diag_offset = p.diag_offset + s.S - s.N;
    s.dropout_b0 = p.dropout_b0 + b;  // draws keyed in the call's [B, H, N, S] grid
    s.dropout_N = p.dropout_N < 0 ? p.N : p.dropout_N;
    s.dropout_S = p.dropout_S < 0 ? p.S : p.dropout_S;
    for (TensorRef* t : {&s.q, &s.k, &s.v, &s.out, &s.lse, &s.dout, &s.dq, &s.dk, &s.dv, &s.dlse, &s.alibi_slopes}) {
      if (!t->present()) continue;
      t->data = static_cast<char*>(t->data) + b * t->stride[0] * dtype_size(t->dtype);
      t->shape[0] = 1;
    }
    for (TensorRef* t : {&s.k, &s.v, &s.dk, &s.dv})
      if (t->present()) t->shape[2] = s.S;
    out.push_back(s);
  }
  return out;
}

std::vector<AttentionParams> split_sequences(const AttentionParams& p) {
  if (p.seqlens_k.present()) return split_cache_entries(p);
  std::vector<AttentionParams> out;
  out.reserve(size_t(p.num_seqs));
  for (int64_t b = 0; b < p.num_seqs; ++b) {
    const int64_t q0 = entry(p.cu_seqlens_q, b), k0 = entry(p.cu_seqlens_k, b);
    AttentionParams s = p;
    s.cu_seqlens_q = TensorRef{};
    s.cu_seqlens_k = TensorRef{};
    s.num_seqs = 0;
    s.N = entry(p.cu_seqlens_q, b + 1) - q0;
    s.S = entry(p.cu_seqlens_k, b + 1) - k0;
    s.diag_offset = p.diag_offset + s.S - s.N;  // bottom-right within the sequence
    s.dropout_i0 = p.dropout_i0 + q0;  // draws keyed in the packed [1, H, total_q, total_k] grid
    s.dropout_j0 = p.dropout_j0 + k0;
    s.dropout_N = p.dropout_N < 0 ? p.N : p.dropout_N;
    s.dropout_S = p.dropout_S < 0 ? p.S : p.dropout_S;
    for (TensorRef* t : {&s.q, &s.out, &s.lse, &s.dout, &s.dq, &s.dlse}) narrow_rows(*t, q0, s.N);
    for (TensorRef* t : {&s.k, &s.v, &s.dk, &s.dv}) narrow_rows(*t, k0, s.S);
    if (s.alibi_slopes.present()) {
      TensorRef& a = s.alibi_slopes;
      a.data = static_cast<char*>(a.data) + b * a.stride[0] * dtype_size(a.dtype);
      a.shape[0] = 1;
    }
    out.push_back(s);
  }
  return out;
}

}  // namespace steelattn::cpu
