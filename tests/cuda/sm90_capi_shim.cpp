// Test-only C ABI over the sm90 backend, loaded by tests/cuda/sm90_check.py
// through ctypes. It fills an AttentionParams from raw pointers, shapes and
// strides (what torch tensors give) and calls the backend directly, so the
// kernel can be checked and timed before the core library and bindings exist.
// Built with plain nvcc/g++ (no libtorch), so it uses exactly the flags CMake will.
#include <cstdint>
#include <cstring>
#include <string>

#include "core/backends.h"

using namespace steelattn;

namespace {

thread_local std::string g_error;

TensorRef make_ref(void* data, int dtype, int device_id, int ndim, const int64_t* shape, const int64_t* stride) {
  TensorRef t;
  t.data = data;
  t.dtype = static_cast<DType>(dtype);
  t.device = Device::cuda;
  t.device_id = device_id;
  t.ndim = ndim;
  for (int i = 0; i < ndim; ++i) {
    t.shape[i] = shape[i];
    t.stride[i] = stride[i];
  }
  return t;
}

}  // namespace

extern "C" {

const char* sm90_last_error() { return g_error.c_str(); }

// shapes/strides: q, k, v, out as [4] each (elements); lse [3]; alibi [2].
// dtype codes follow steelattn::DType. Returns 0 ok, 1 unsupported, 2 error.
int sm90_forward(int dtype, int device_id, void* q, const int64_t* q_shape, const int64_t* q_stride, void* k,
                 const int64_t* k_shape, const int64_t* k_stride, void* v, const int64_t* v_shape,
                 const int64_t* v_stride, void* out, const int64_t* o_shape, const int64_t* o_stride, void* lse,
                 const int64_t* lse_shape, const int64_t* lse_stride, void* alibi, const int64_t* alibi_shape,
                 const int64_t* alibi_stride, float scale, float softcap, int64_t diag_offset, int64_t window_left,
                 int64_t window_right, int check_only, void* stream) {
  AttentionParams p;
  p.q = make_ref(q, dtype, device_id, 4, q_shape, q_stride);
  p.k = make_ref(k, dtype, device_id, 4, k_shape, k_stride);
  p.v = make_ref(v, dtype, device_id, 4, v_shape, v_stride);
  p.out = make_ref(out, dtype, device_id, 4, o_shape, o_stride);
  if (lse) p.lse = make_ref(lse, static_cast<int>(DType::f32), device_id, 3, lse_shape, lse_stride);
  if (alibi) p.alibi_slopes = make_ref(alibi, static_cast<int>(DType::f32), device_id, 2, alibi_shape, alibi_stride);
  p.scale = scale;
  p.softcap = softcap;
  p.diag_offset = diag_offset;
  p.window_left = window_left;
  p.window_right = window_right;
  p.B = q_shape[0];
  p.H = q_shape[1];
  p.N = q_shape[2];
  p.D = q_shape[3];
  p.Hkv = k_shape[1];
  p.S = k_shape[2];
  p.Dv = v_shape[3];
  std::string why;
  if (!cuda_sm90_supports(p, &why)) {
    g_error = why;
    return 1;
  }
  if (check_only) return 0;
  const Status st = cuda_sm90_forward(p, nullptr, stream);
  if (!st.ok()) {
    g_error = st.message;
    return 2;
  }
  return 0;
}

}  // extern "C"
