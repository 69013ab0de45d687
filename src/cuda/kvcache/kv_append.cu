// kv_append on CUDA (steelattn.h): one launch writes k_new / v_new into the cache rows at
// seqlens[b] (read on the device, so a captured graph replays with new lengths), turning
// k_new and q by the rotary tables on the way. One warp per row of D features.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/backends.h"
#include "cuda/generic/host_params.h"

namespace steelattn {
namespace {

struct AppendArgs {
  const void *k_new, *v_new, *q;
  void *k_cache, *v_cache, *q_out;
  const int32_t *lens, *block_table, *kv_batch_idx;
  const void *cos, *sin;  // float32, or the tensors' dtype (T)
  bool table_f32;
  int64_t kn_s[3], vn_s[3], kc_s[3], vc_s[3], q_s[3], qo_s[3];  // strides of dims 0..2, in elements
  int64_t lens_s, bt_s, idx_s, cos_s, sin_s;
  int B, Hkv, Nnew, D, Dv, H, Nq, page_rows, rd;
  int64_t capacity, table_rows, num_entries;  // rows per entry, angle-table rows, cache entries or pages
  bool interleaved, q_causal;
};

// Element <-> math type (float; double for double tensors, as the torch reference).
template <class C, class T> __device__ __forceinline__ C load_c(T x) { return static_cast<C>(x); }
template <> __device__ __forceinline__ float load_c<float, __nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float load_c<float, __half>(__half x) { return __half2float(x); }
template <class T, class C> __device__ __forceinline__ T store_c(C x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __nv_bfloat16 store_c<__nv_bfloat16, float>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half store_c<__half, float>(float x) { return __float2half_rn(x); }

// C: the math type (float, double for double tensors), as the torch reference.
template <class T, class C>
__device__ void rotate_row(const T* src, T* dst, int D, int rd, const AppendArgs& a, int64_t pos, int lane) {
  const int half = rd / 2;
  for (int j = lane; j < half; j += 32) {
    const int i1 = a.interleaved ? 2 * j : j, i2 = a.interleaved ? 2 * j + 1 : j + half;
    // Positions past the tables (device lengths the host could not check) read the last row
    // instead of memory past the table.
    const int64_t row = pos < a.table_rows ? pos : a.table_rows - 1;
    const int64_t ci = row * a.cos_s + j, si = row * a.sin_s + j;
    const C c = a.table_f32 ? C(static_cast<const float*>(a.cos)[ci]) : load_c<C>(static_cast<const T*>(a.cos)[ci]);
    const C s = a.table_f32 ? C(static_cast<const float*>(a.sin)[si]) : load_c<C>(static_cast<const T*>(a.sin)[si]);
    const C x1 = load_c<C>(src[i1]), x2 = load_c<C>(src[i2]);
    dst[i1] = store_c<T>(x1 * c - x2 * s);
    dst[i2] = store_c<T>(x1 * s + x2 * c);
  }
  for (int j = rd + lane; j < D; j += 32) dst[j] = src[j];
}

template <class T, class C>
__global__ void kv_append_kernel(const AppendArgs a) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int64_t kv_rows = int64_t(a.B) * a.Hkv * a.Nnew;
  if (row < kv_rows) {  // (b, h, n) of k_new / v_new
    const int n = int(row % a.Nnew), h = int(row / a.Nnew % a.Hkv), b = int(row / a.Nnew / a.Hkv);
    const int64_t pos = int64_t(a.lens[b * a.lens_s]) + n;
    if (pos < 0 || pos >= a.capacity) return;  // past the cache (unchecked device lengths): no write
    int64_t entry, r;
    if (a.block_table) {
      entry = a.block_table[b * a.bt_s + pos / a.page_rows], r = pos % a.page_rows;
    } else {
      entry = a.kv_batch_idx ? a.kv_batch_idx[b * a.idx_s] : b, r = pos;
    }
    if (entry < 0 || entry >= a.num_entries) return;  // an unused page (-1) or a bad slot: no write
    const T* kn = static_cast<const T*>(a.k_new) + b * a.kn_s[0] + h * a.kn_s[1] + n * a.kn_s[2];
    const T* vn = static_cast<const T*>(a.v_new) + b * a.vn_s[0] + h * a.vn_s[1] + n * a.vn_s[2];
    T* kc = static_cast<T*>(a.k_cache) + entry * a.kc_s[0] + h * a.kc_s[1] + r * a.kc_s[2];
    T* vc = static_cast<T*>(a.v_cache) + entry * a.vc_s[0] + h * a.vc_s[1] + r * a.vc_s[2];
    rotate_row<T, C>(kn, kc, a.D, a.rd, a, pos, lane);
    for (int j = lane; j < a.Dv; j += 32) vc[j] = vn[j];
    return;
  }
  const int64_t qr = row - kv_rows;  // (b, h, i) of q
  if (a.q == nullptr || qr >= int64_t(a.B) * a.H * a.Nq) return;
  const int i = int(qr % a.Nq), h = int(qr / a.Nq % a.H), b = int(qr / a.Nq / a.H);
  const int64_t pos = int64_t(a.lens[b * a.lens_s]) + (a.q_causal ? i : 0);
  const T* q = static_cast<const T*>(a.q) + b * a.q_s[0] + h * a.q_s[1] + i * a.q_s[2];
  T* qo = static_cast<T*>(a.q_out) + b * a.qo_s[0] + h * a.qo_s[1] + i * a.qo_s[2];
  rotate_row<T, C>(q, qo, a.D, a.rd, a, pos, lane);
}

void strides3(const TensorRef& t, int64_t (&s)[3]) {
  for (int i = 0; i < 3; ++i) s[i] = t.stride[i];
}

}  // namespace

Status cuda_kv_append(const KVAppendParams& p, void* stream) {
  AppendArgs a{};
  a.k_new = p.k_new.data, a.v_new = p.v_new.data, a.k_cache = p.k_cache.data, a.v_cache = p.v_cache.data;
  strides3(p.k_new, a.kn_s), strides3(p.v_new, a.vn_s), strides3(p.k_cache, a.kc_s), strides3(p.v_cache, a.vc_s);
  a.lens = static_cast<const int32_t*>(p.seqlens.data), a.lens_s = p.seqlens.stride[0];
  if (p.block_table.present()) a.block_table = static_cast<const int32_t*>(p.block_table.data), a.bt_s = p.block_table.stride[0];
  if (p.kv_batch_idx.present())
    a.kv_batch_idx = static_cast<const int32_t*>(p.kv_batch_idx.data), a.idx_s = p.kv_batch_idx.stride[0];
  const bool rotary = p.rotary_cos.present();
  if (rotary) {
    a.cos = p.rotary_cos.data, a.cos_s = p.rotary_cos.stride[0];
    a.sin = p.rotary_sin.data, a.sin_s = p.rotary_sin.stride[0];
    a.table_f32 = p.rotary_cos.dtype == DType::f32;
    a.rd = int(p.rotary_dim);
  }
  if (p.q.present()) {
    a.q = p.q.data, a.q_out = p.q_out.data, a.H = int(p.q.shape[1]), a.Nq = int(p.q.shape[2]);
    strides3(p.q, a.q_s), strides3(p.q_out, a.qo_s);
  }
  a.B = int(p.k_new.shape[0]), a.Hkv = int(p.k_new.shape[1]), a.Nnew = int(p.k_new.shape[2]);
  a.D = int(p.k_new.shape[3]), a.Dv = int(p.v_new.shape[3]), a.page_rows = int(p.k_cache.shape[2]);
  a.interleaved = p.interleaved, a.q_causal = p.q_causal;
  a.capacity = p.block_table.present() ? p.block_table.shape[1] * p.k_cache.shape[2] : p.k_cache.shape[2];
  a.num_entries = p.k_cache.shape[0];
  a.table_rows = rotary ? p.rotary_cos.shape[0] : 1;
  const int64_t rows = int64_t(a.B) * a.Hkv * a.Nnew + (a.q ? int64_t(a.B) * a.H * a.Nq : 0);
  if (rows == 0) return Status::Ok();
  constexpr int kRowsPerBlock = 8;  // 256 threads
  const dim3 grid(unsigned((rows + kRowsPerBlock - 1) / kRowsPerBlock));
  cuda_device::DeviceGuard guard(p.k_new.device_id);
  const auto s = static_cast<cudaStream_t>(stream);
  switch (p.k_new.dtype) {
    case DType::bf16: kv_append_kernel<__nv_bfloat16, float><<<grid, 32 * kRowsPerBlock, 0, s>>>(a); break;
    case DType::f16: kv_append_kernel<__half, float><<<grid, 32 * kRowsPerBlock, 0, s>>>(a); break;
    case DType::f32: kv_append_kernel<float, float><<<grid, 32 * kRowsPerBlock, 0, s>>>(a); break;
    default: kv_append_kernel<double, double><<<grid, 32 * kRowsPerBlock, 0, s>>>(a); break;
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? Status::Ok() : cuda_generic::cuda_status("kv_append launch", err);
}

}  // namespace steelattn
