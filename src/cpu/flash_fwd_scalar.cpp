// The CPU flash kernel compiled for scalar (flags set per file in CMakeLists.txt).
#include "cpu/flash_fwd_impl.h"
#include "cpu/flash_fwd.h"

namespace steelattn::cpu {

Status flash_forward_scalar(const AttentionParams& p) {
#if 1
  return flash_forward_impl<Scalar>(p);
#else
  (void)p;
  return Status::NotImplemented("cpu forward: this build has no scalar kernel");
#endif
}

}  // namespace steelattn::cpu
