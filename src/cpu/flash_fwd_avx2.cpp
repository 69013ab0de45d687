// The CPU flash kernel compiled for avx2 (flags set per file in CMakeLists.txt).
#include "cpu/flash_fwd_impl.h"
#include "cpu/flash_fwd.h"

namespace steelattn::cpu {

Status flash_forward_avx2(const AttentionParams& p) {
#if defined(__AVX2__)
  return flash_forward_impl<Avx2>(p);
#else
  (void)p;
  return Status::NotImplemented("cpu forward: this build has no avx2 kernel");
#endif
}

}  // namespace steelattn::cpu
