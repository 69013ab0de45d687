// kv_append on the CPU (steelattn.h): k_new / v_new into the cache rows at seqlens[b], k_new
// and q turned by the rotary tables on the way. One task per (batch entry, head) of k/v and
// of q, on the thread pool.
#include "core/backends.h"
#include "cpu/score_tile.h"  // load_elem / store_elem (internal linkage)
#include "cpu/thread_pool.h"

namespace steelattn {
namespace {

using cpu::load_elem;
using cpu::store_elem;

// One row of D features from `src` (element offset s) to `dst` (offset d), the first rd
// turned by angle table row `pos` (rd = 0: copied).
template <class T>
void rotate_row(const KVAppendParams& p, const TensorRef& src, int64_t s, const TensorRef& dst, int64_t d, int64_t D,
                int64_t rd, int64_t pos) {
  const int64_t half = rd / 2;
  const TensorRef &ct = p.rotary_cos, &st = p.rotary_sin;
  for (int64_t j = 0; j < half; ++j) {
    const int64_t a = p.interleaved ? 2 * j : j, b = p.interleaved ? 2 * j + 1 : j + half;
    const T x1 = load_elem<T>(src.data, src.dtype, s + a), x2 = load_elem<T>(src.data, src.dtype, s + b);
    // the table's value in its dtype, widened (as torch's .to(float32) does)
    const T cj = T(load_elem<float>(ct.data, ct.dtype, pos * ct.stride[0] + j));
    const T sj = T(load_elem<float>(st.data, st.dtype, pos * st.stride[0] + j));
    store_elem<T>(dst.data, dst.dtype, d + a, x1 * cj - x2 * sj);
    store_elem<T>(dst.data, dst.dtype, d + b, x1 * sj + x2 * cj);
  }
  for (int64_t j = rd; j < D; ++j) store_elem<T>(dst.data, dst.dtype, d + j, load_elem<T>(src.data, src.dtype, s + j));
}

int32_t read_i32(const TensorRef& t, int64_t i, int64_t j = 0) {
  return static_cast<const int32_t*>(t.data)[i * t.stride[0] + (t.ndim > 1 ? j * t.stride[1] : 0)];
}

template <class T>
void run(const KVAppendParams& p, int64_t task) {
  const TensorRef &kn = p.k_new, &kc = p.k_cache;
  const int64_t B = kn.shape[0], Hkv = kn.shape[1], Nnew = kn.shape[2], D = kn.shape[3];
  const int64_t rd = p.rotary_cos.present() ? p.rotary_dim : 0;
  if (task < B * Hkv) {  // k / v rows of entry b, KV head h
    const int64_t b = task / Hkv, h = task % Hkv, len = read_i32(p.seqlens, b);
    const int64_t page_rows = kc.shape[2];
    for (int64_t n = 0; n < Nnew; ++n) {
      const int64_t pos = len + n;
      int64_t entry, row;
      if (p.block_table.present()) {
        entry = read_i32(p.block_table, b, pos / page_rows), row = pos % page_rows;
      } else {
        entry = p.kv_batch_idx.present() ? read_i32(p.kv_batch_idx, b) : b, row = pos;
      }
      const TensorRef &vn = p.v_new, &vc = p.v_cache;
      rotate_row<T>(p, kn, b * kn.stride[0] + h * kn.stride[1] + n * kn.stride[2], kc,
                    entry * kc.stride[0] + h * kc.stride[1] + row * kc.stride[2], D, rd, pos);
      rotate_row<T>(p, vn, b * vn.stride[0] + h * vn.stride[1] + n * vn.stride[2], vc,
                    entry * vc.stride[0] + h * vc.stride[1] + row * vc.stride[2], vn.shape[3], 0, 0);
    }
    return;
  }
  const TensorRef &q = p.q, &qo = p.q_out;  // q rows of entry b, query head h
  const int64_t t = task - B * Hkv, H = q.shape[1], b = t / H, h = t % H, len = read_i32(p.seqlens, b);
  for (int64_t i = 0; i < q.shape[2]; ++i)
    rotate_row<T>(p, q, b * q.stride[0] + h * q.stride[1] + i * q.stride[2], qo,
                  b * qo.stride[0] + h * qo.stride[1] + i * qo.stride[2], D, rd, len + (p.q_causal ? i : 0));
}

struct Ctx {
  const KVAppendParams* p;
};

template <class T>
void task_fn(void* ctx, int64_t task, int) {
  run<T>(*static_cast<Ctx*>(ctx)->p, task);
}

}  // namespace

Status cpu_kv_append(const KVAppendParams& p) {
  const int64_t tasks = p.k_new.shape[0] * p.k_new.shape[1] + (p.q.present() ? p.q.shape[0] * p.q.shape[1] : 0);
  Ctx ctx{&p};
  const int threads = p.num_threads > 0 ? p.num_threads : cpu::default_threads();
  // float math (double for float64), as the torch reference (kvcache.apply_rotary)
  cpu::parallel_for(tasks, threads, p.k_new.dtype == DType::f64 ? task_fn<double> : task_fn<float>, &ctx);
  return Status::Ok();
}

}  // namespace steelattn
