// Test-only C ABI over the sm90 backward, loaded by tests/cuda/sm90_bwd_check.py
// through ctypes (no libtorch linkage; built with the project's nvcc flags by
// tests/cuda/sm90_bwd_build.sh).
#include <cstdint>
#include <string>

#include "cuda/sm90/bwd_api.h"

using namespace steelattn;

namespace {
thread_local std::string g_error;

// Tensor order of the arrays below.
enum { Q, K, V, OUT, DOUT, DQ, DK, DV, LSE, DLSE, ALIBI, NT };
}  // namespace

extern "C" {

const char* sm90_bwd_last_error() { return g_error.c_str(); }

// ptrs[NT] (null = absent), ndims[NT], shapes[NT*4], strides[NT*4] (elements).
// dtype codes follow steelattn::DType (lse, dlse, alibi are always fp32).
// mode 0: run; 1: supports() only; 2: write the workspace size to *ws_bytes.
// deterministic: dQ reduced in key-block order (bit-identical run to run).
// Returns 0 ok, 1 unsupported, 2 error.
int sm90_bwd(int dtype, int device_id, void* const* ptrs, const int* ndims, const int64_t* shapes,
             const int64_t* strides, double scale, double softcap, int64_t diag_offset, int64_t window_left,
             int64_t window_right, void* workspace, int mode, uint64_t* ws_bytes, void* stream,
             int deterministic) {
  AttentionParams p;
  TensorRef* refs[NT] = {&p.q, &p.k, &p.v, &p.out, &p.dout, &p.dq, &p.dk, &p.dv, &p.lse, &p.dlse, &p.alibi_slopes};
  for (int t = 0; t < NT; ++t) {
    if (!ptrs[t]) continue;
    TensorRef& r = *refs[t];
    r.data = ptrs[t];
    r.dtype = t >= LSE ? DType::f32 : static_cast<DType>(dtype);
    r.device = Device::cuda;
    r.device_id = device_id;
    r.ndim = ndims[t];
    for (int i = 0; i < ndims[t]; ++i) {
      r.shape[i] = shapes[4 * t + i];
      r.stride[i] = strides[4 * t + i];
    }
  }
  p.scale = scale;
  p.softcap = softcap;
  p.diag_offset = diag_offset;
  p.window_left = window_left;
  p.window_right = window_right;
  p.deterministic = deterministic != 0;
  p.B = p.q.shape[0];
  p.H = p.q.shape[1];
  p.N = p.q.shape[2];
  p.D = p.q.shape[3];
  p.Hkv = p.k.shape[1];
  p.S = p.k.shape[2];
  p.Dv = p.v.shape[3];
  std::string why;
  if (!cuda_sm90_backward_supports(p, &why)) {
    g_error = why;
    return 1;
  }
  if (mode == 1) return 0;
  if (mode == 2) {
    *ws_bytes = cuda_sm90_backward_workspace_bytes(p);
    return 0;
  }
  const Status st = cuda_sm90_backward(p, workspace, stream);
  if (!st.ok()) {
    g_error = st.message;
    return 2;
  }
  return 0;
}

}  // extern "C"
