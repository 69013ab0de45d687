// Decode on the CPU: a forward call with fewer tasks than threads (one query token and a
// few KV heads give one task per (entry, KV head)) has each problem's keys split into
// chunks that run as separate problems in the same task pool, writing partial outputs
// (fp32; fp64 for fp64 calls) and their LSE, merged here by LSE.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/flash.h"
#include "cpu/score_tile.h"  // kBlockRows, load_elem, store_elem
#include "cpu/thread_pool.h"

namespace steelattn::cpu {
namespace {

constexpr int64_t kMinChunk = 512;  // keys per chunk: below this the merge outweighs the gain

int64_t tasks_of(const AttentionParams& p) {
  const int64_t rows = p.H / p.Hkv * p.N;  // packed rows per KV head, kBlockRows per task
  return p.B * p.Hkv * ((rows + kBlockRows - 1) / kBlockRows);
}

// Whether a problem's keys may be cut: nothing that indexes keys absolutely or per element.
bool splittable(const AttentionParams& p) {
  return p.dropout_p == 0.0f && !p.bias.present() && !p.bool_mask.present() && !p.attn_weights.present() &&
         !p.block_mask.present() && !p.varlen() && !p.seqlens_k.present() && p.B > 0 && p.N > 0;
}

}  // namespace

int key_splits(const std::vector<AttentionParams>& parts) {
  if (parts.empty()) return 1;
  int64_t tasks = 0, max_s = 0;
  for (const AttentionParams& p : parts) {
    if (!splittable(p)) return 1;
    tasks += tasks_of(p);
    max_s = std::max(max_s, p.S);
  }
  const int threads = parts[0].num_threads > 0 ? parts[0].num_threads : default_threads();
  if (tasks == 0 || tasks * 2 > threads) return 1;
  const int64_t want = (2 * threads + tasks - 1) / tasks;
  return int(std::clamp<int64_t>(std::min(want, max_s / kMinChunk), 1, 64));
}

Status forward_with_key_splits(const std::vector<AttentionParams>& parts, int splits,
                               Status (*entry)(const AttentionParams*, int64_t)) {
  struct Part {
    const AttentionParams* p;
    int64_t first, count;  // its chunks in `chunks`
    std::vector<char> out, lse;  // [count][B, H, N, Dv] and [count][B, H, N]
  };
  std::vector<Part> meta(parts.size());
  std::vector<AttentionParams> chunks;
  for (size_t i = 0; i < parts.size(); ++i) {
    const AttentionParams& p = parts[i];
    const DType side = p.q.dtype == DType::f64 ? DType::f64 : DType::f32;
    const int64_t esz = dtype_size(side), cells = p.B * p.H * p.N;
    const int64_t len = std::max<int64_t>(1, (p.S + splits - 1) / splits);
    Part& m = meta[i];
    m.p = &p;
    m.first = int64_t(chunks.size());
    m.count = (p.S + len - 1) / len;
    m.out.resize(size_t(m.count * cells * p.Dv * esz));
    m.lse.resize(size_t(m.count * cells * esz));
    for (int64_t c = 0; c < m.count; ++c) {
      const int64_t k0 = c * len, n = std::min(len, p.S - k0);
      AttentionParams s = p;
      for (TensorRef* t : {&s.k, &s.v}) {
        t->data = static_cast<char*>(t->data) + k0 * t->stride[2] * dtype_size(t->dtype);
        t->shape[2] = n;
      }
      s.S = n;
      s.diag_offset = p.diag_offset - k0;  // key j of the chunk is key k0 + j of the call
      TensorRef o;
      o.data = m.out.data() + c * cells * p.Dv * esz;
      o.dtype = side;
      o.ndim = 4;
      const int64_t oshape[4] = {p.B, p.H, p.N, p.Dv}, ostride[4] = {p.H * p.N * p.Dv, p.N * p.Dv, p.Dv, 1};
      TensorRef l;
      l.data = m.lse.data() + c * cells * esz;
      l.dtype = side;
      l.ndim = 3;
      const int64_t lshape[3] = {p.B, p.H, p.N}, lstride[3] = {p.H * p.N, p.N, 1};
      for (int d = 0; d < 4; ++d) o.shape[d] = oshape[d], o.stride[d] = ostride[d];
      for (int d = 0; d < 3; ++d) l.shape[d] = lshape[d], l.stride[d] = lstride[d];
      s.out = o;
      s.lse = l;
      chunks.push_back(s);
    }
  }
  Status st = entry(chunks.data(), int64_t(chunks.size()));
  if (!st.ok()) return st;

  // out = sum_c exp(lse_c - lse) out_c, lse = log sum_c exp(lse_c): rows no chunk saw stay 0 / -inf.
  for (const Part& m : meta) {
    const AttentionParams& p = *m.p;
    const DType side = p.q.dtype == DType::f64 ? DType::f64 : DType::f32;
    const int64_t cells = p.B * p.H * p.N;
    std::vector<double> w(size_t(m.count)), acc(size_t(p.Dv));
    for (int64_t b = 0; b < p.B; ++b)
      for (int64_t h = 0; h < p.H; ++h)
        for (int64_t i = 0; i < p.N; ++i) {
          const int64_t cell = (b * p.H + h) * p.N + i;
          double mx = -INFINITY;
          auto lse_of = [&](int64_t c) { return load_elem<double>(m.lse.data(), side, c * cells + cell); };
          for (int64_t c = 0; c < m.count; ++c) mx = std::max(mx, lse_of(c));
          const double mu = std::isinf(mx) ? 0.0 : mx;
          double sum = 0.0;
          for (int64_t c = 0; c < m.count; ++c) sum += (w[size_t(c)] = std::exp(lse_of(c) - mu));
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int64_t c = 0; c < m.count; ++c) {
            if (w[size_t(c)] == 0.0) continue;
            const int64_t base = (c * cells + cell) * p.Dv;
            for (int64_t e = 0; e < p.Dv; ++e)
              acc[size_t(e)] += w[size_t(c)] * load_elem<double>(m.out.data(), side, base + e);
          }
          const double inv = sum > 0.0 ? 1.0 / sum : 0.0;
          char* orow = static_cast<char*>(p.out.data) +
                       (b * p.out.stride[0] + h * p.out.stride[1] + i * p.out.stride[2]) * dtype_size(p.out.dtype);
          for (int64_t e = 0; e < p.Dv; ++e)
            store_elem<double>(orow, p.out.dtype, e * p.out.stride[3], acc[size_t(e)] * inv);
          if (p.lse.present())
            store_elem<double>(p.lse.data, p.lse.dtype, b * p.lse.stride[0] + h * p.lse.stride[1] + i * p.lse.stride[2],
                       sum > 0.0 ? mu + std::log(sum) : -INFINITY);
        }
  }
  return Status::Ok();
}

}  // namespace steelattn::cpu
