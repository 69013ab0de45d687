// A varlen call as one dense problem per sequence (flash.h), so the CPU kernels run
// packed batches without a kernel of their own: each problem views its sequence's rows
// of the packed tensors, and the kernels schedule all of them as one pool of tasks.
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

std::vector<AttentionParams> split_sequences(const AttentionParams& p) {
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
