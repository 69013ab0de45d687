// The CPU flash kernels compiled for avx512 (flags set per file in CMakeLists.txt).
#include "cpu/flash.h"
#include "cpu/flash_bwd_impl.h"
#include "cpu/flash_fwd_impl.h"

namespace steelattn::cpu {

#if defined(__AVX512F__)
Status flash_forward_avx512(const AttentionParams* ps, int64_t n) { return flash_forward_impl<Avx512>(ps, n); }
Status flash_backward_avx512(const AttentionParams* ps, int64_t n) { return flash_backward_impl<Avx512>(ps, n); }
#else
Status flash_forward_avx512(const AttentionParams*, int64_t) {
  return Status::NotImplemented("cpu forward: this build has no avx512 kernel");
}
Status flash_backward_avx512(const AttentionParams*, int64_t) {
  return Status::NotImplemented("cpu backward: this build has no avx512 kernel");
}
#endif

}  // namespace steelattn::cpu
