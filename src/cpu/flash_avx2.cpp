// The CPU flash kernels compiled for avx2 (flags set per file in CMakeLists.txt).
#include "cpu/flash.h"
#include "cpu/flash_bwd_impl.h"
#include "cpu/flash_fwd_impl.h"

namespace steelattn::cpu {

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
Status flash_forward_avx2(const AttentionParams* ps, int64_t n) { return flash_forward_impl<Avx2>(ps, n); }
Status flash_backward_avx2(const AttentionParams* ps, int64_t n) { return flash_backward_impl<Avx2>(ps, n); }
#else
Status flash_forward_avx2(const AttentionParams*, int64_t) {
  return Status::NotImplemented("cpu forward: this build has no avx2 kernel");
}
Status flash_backward_avx2(const AttentionParams*, int64_t) {
  return Status::NotImplemented("cpu backward: this build has no avx2 kernel");
}
#endif

}  // namespace steelattn::cpu
