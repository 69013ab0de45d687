// The one place that decides which kernel serves a forward or backward call. The
// Python dispatcher, get_supported_configs() and the dispatch counters all ask here.
#include <cstring>

#include "core/backends.h"
#include "steelattn/detail/philox.h"

namespace steelattn {

const char* path_name(ForwardPath p) {
  switch (p) {
    case ForwardPath::none: return "none";
    case ForwardPath::cpu_avx512: return "cpu_avx512";
    case ForwardPath::cpu_avx2: return "cpu_avx2";
    case ForwardPath::cpu_scalar: return "cpu_scalar";
    case ForwardPath::cuda_sm90: return "cuda_sm90";
    case ForwardPath::cuda_generic: return "cuda_generic";
    case ForwardPath::cuda_decode: return "cuda_decode";
  }
  return "unknown";
}

bool cuda_compiled() {
#if defined(STEELATTN_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

namespace {

ForwardPath cpu_path(const AttentionParams& p) {
  if (p.q.dtype == DType::f64) return ForwardPath::cpu_scalar;  // float64 runs the portable kernel
  switch (detect_cpu_isa()) {
    case CpuIsa::avx512: return ForwardPath::cpu_avx512;
    case CpuIsa::avx2: return ForwardPath::cpu_avx2;
    default: return ForwardPath::cpu_scalar;
  }
}

#if !defined(STEELATTN_WITH_CUDA)
const char* kNoCuda = "this build of steelattn has no CUDA kernels (nvcc was not found at build time)";
#endif

using Supports = bool (*)(const AttentionParams&, std::string*);

// Hopper first; the generic kernel takes what it refuses, and the refusal is kept
// (`demoted`) so that the caller can report it instead of losing it.
PathChoice choose_cuda_path(const AttentionParams& p, Supports sm90, Supports generic) {
  PathChoice c;
#if defined(STEELATTN_WITH_CUDA)
  std::string sm90_why, generic_why;
  if (sm90(p, &sm90_why)) {
    c.path = ForwardPath::cuda_sm90;
  } else if (generic(p, &generic_why)) {
    c.path = ForwardPath::cuda_generic;
    c.demoted = std::string("cuda_sm90 -> cuda_generic: ") + sm90_why;
  } else {
    c.why_not = sm90_why + "; " + generic_why;
  }
#else
  (void)p, (void)sm90, (void)generic;
  c.why_not = kNoCuda;
#endif
  return c;
}

#if defined(STEELATTN_WITH_CUDA)
constexpr Supports kSm90Forward = &cuda_sm90_supports, kGenericForward = &cuda_generic_supports;
// deterministic=True is served by both: the Hopper kernel then reduces dQ in key-block order.
constexpr Supports kSm90Backward = &cuda_sm90_backward_supports, kGenericBackward = &cuda_generic_backward_supports;
#else
constexpr Supports kSm90Forward = nullptr, kGenericForward = nullptr, kSm90Backward = nullptr,
                   kGenericBackward = nullptr;
#endif

}  // namespace

PathChoice choose_forward_path(const AttentionParams& p) {
  if (p.q.device == Device::cpu) {
    PathChoice c;
    if (p.indirect_kv())
      c.why_not = "block_table / kv_batch_idx: the CPU kernels take dense caches (flash_attention_kvcache gathers)";
    else
      c.path = cpu_path(p);
    return c;
  }
#if defined(STEELATTN_WITH_CUDA)
  // Decode-shaped calls (and KV-cache lengths) go to the split-KV kernel first.
  std::string decode_why;
  if (cuda_decode_supports(p, &decode_why)) {
    PathChoice c;
    c.path = ForwardPath::cuda_decode;
    return c;
  }
  PathChoice c = choose_cuda_path(p, kSm90Forward, kGenericForward);
  if (c.path == ForwardPath::none) c.why_not = decode_why + "; " + c.why_not;
  return c;
#else
  return choose_cuda_path(p, kSm90Forward, kGenericForward);
#endif
}

PathChoice choose_backward_path(const AttentionParams& p) {
  if (p.q.device == Device::cpu) return choose_forward_path(p);
  if (p.indirect_kv()) {
    PathChoice c;
    c.why_not = "block_table / kv_batch_idx: no backward kernel reads paged or slot-mapped caches";
    return c;
  }
  return choose_cuda_path(p, kSm90Backward, kGenericBackward);
}

ForwardPath select_forward_path(const AttentionParams& p, std::string* why_not) {
  PathChoice c = choose_forward_path(p);
  if (why_not) *why_not = std::move(c.why_not);
  return c.path;
}

ForwardPath select_backward_path(const AttentionParams& p, std::string* why_not) {
  PathChoice c = choose_backward_path(p);
  if (why_not) *why_not = std::move(c.why_not);
  return c.path;
}

Status run_forward(const AttentionParams& p, ForwardPath path, void* stream) {
  // Empty problems have nothing to compute; outputs of size zero need no write.
  if (p.B == 0 || p.H == 0 || p.N == 0) return Status::Ok();
  switch (path) {
    case ForwardPath::cpu_avx512: return cpu_forward(p, CpuIsa::avx512);
    case ForwardPath::cpu_avx2: return cpu_forward(p, CpuIsa::avx2);
    case ForwardPath::cpu_scalar: return cpu_forward(p, CpuIsa::scalar);
#if defined(STEELATTN_WITH_CUDA)
    case ForwardPath::cuda_sm90: return cuda_sm90_forward(p, p.workspace.data, stream);
    case ForwardPath::cuda_generic: return cuda_generic_forward(p, stream);
    case ForwardPath::cuda_decode: return cuda_decode_forward(p, p.workspace.data, stream);
#endif
    default: (void)stream; return Status::NotImplemented("no steelattn kernel serves this call");
  }
}

Status attention_forward(AttentionParams& p, void* stream, ForwardPath* taken) {
  Status st = validate_forward(p);
  if (!st.ok()) return st;
  const PathChoice c = choose_forward_path(p);
  if (taken) *taken = c.path;
  if (c.path == ForwardPath::none) return Status::NotImplemented("no steelattn kernel serves this call: " + c.why_not);
  return run_forward(p, c.path, stream);
}

size_t forward_workspace_bytes(const AttentionParams& p, ForwardPath path) {
#if defined(STEELATTN_WITH_CUDA)
  if (path == ForwardPath::cuda_decode) return cuda_decode_workspace_bytes(p);
  if (path == ForwardPath::cuda_sm90) return cuda_sm90_forward_workspace_bytes(p);
#endif
  (void)p, (void)path;
  return 0;
}

size_t backward_workspace_bytes(const AttentionParams& p, ForwardPath path) {
#if defined(STEELATTN_WITH_CUDA)
  if (path == ForwardPath::cuda_sm90) return cuda_sm90_backward_workspace_bytes(p);
#endif
  (void)p, (void)path;
  return 0;
}

size_t backward_workspace_bytes(const AttentionParams& p) {
  return backward_workspace_bytes(p, select_backward_path(p));
}

Status run_backward(const AttentionParams& p, ForwardPath path, void* stream) {
  if (p.B == 0 || p.H == 0 || p.N == 0 || p.S == 0) return Status::Ok();  // the caller zero-fills
  switch (path) {
    case ForwardPath::cpu_avx512: return cpu_backward(p, CpuIsa::avx512);
    case ForwardPath::cpu_avx2: return cpu_backward(p, CpuIsa::avx2);
    case ForwardPath::cpu_scalar: return cpu_backward(p, CpuIsa::scalar);
#if defined(STEELATTN_WITH_CUDA)
    case ForwardPath::cuda_sm90: {
      const size_t need = cuda_sm90_backward_workspace_bytes(p);
      const TensorRef& w = p.workspace;
      const int64_t have = w.present() ? w.shape[0] * dtype_size(w.dtype) : 0;  // a 1-d byte buffer
      if (need > 0 && (!w.present() || have < int64_t(need) || w.device != Device::cuda))
        return Status::Invalid("workspace: the Hopper backward needs " + std::to_string(need) +
                               " bytes on the tensors' device (backward_workspace_bytes)");
      return cuda_sm90_backward(p, w.data, stream);
    }
    case ForwardPath::cuda_generic: return cuda_generic_backward(p, stream);
#endif
    default: (void)stream; return Status::NotImplemented("no steelattn kernel computes this backward");
  }
}

Status attention_backward(AttentionParams& p, void* stream, ForwardPath* taken) {
  Status st = validate_backward(p);
  if (!st.ok()) return st;
  const PathChoice c = choose_backward_path(p);
  if (taken) *taken = c.path;
  if (c.path == ForwardPath::none)
    return Status::NotImplemented("no steelattn kernel computes this backward: " + c.why_not);
  return run_backward(p, c.path, stream);
}

Status dropout_keep_mask(uint8_t* out, int64_t B, int64_t H, int64_t N, int64_t S, float p, uint64_t seed,
                         uint64_t offset, int64_t i0, int64_t j0, int64_t N_total, int64_t S_total) {
  if (!(p >= 0.0f && p < 1.0f)) return Status::Invalid("dropout_p: must be in [0, 1)");
  if (N_total < 0) N_total = N;
  if (S_total < 0) S_total = S;
  if (i0 < 0 || j0 < 0 || i0 + N > N_total || j0 + S > S_total)
    return Status::Invalid("dropout_keep_mask: the frame must hold rows i0 .. i0 + N and columns j0 .. j0 + S");
  const uint32_t thr = detail::dropout_threshold24(p);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < N; ++i) {
        const uint64_t row = detail::dropout_index(b, h, i0 + i, j0, H, N_total, S_total);
        uint8_t* o = out + ((b * H + h) * N + i) * S;
        for (int64_t j = 0; j < S; ++j) o[j] = detail::dropout_keep(row + uint64_t(j), seed, offset, thr) ? 1 : 0;
      }
  return Status::Ok();
}

}  // namespace steelattn
