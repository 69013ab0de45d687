// The CPU flash kernel compiled for avx512 (flags set per file in CMakeLists.txt).
#include "cpu/flash_fwd_impl.h"
#include "cpu/flash_fwd.h"

namespace steelattn::cpu {

Status flash_forward_avx512(const AttentionParams& p) {
#if defined(__AVX512F__)
  return flash_forward_impl<Avx512>(p);
#else
  (void)p;
  return Status::NotImplemented("cpu forward: this build has no avx512 kernel");
#endif
}

}  // namespace steelattn::cpu
