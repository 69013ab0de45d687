// The CPU kernels compiled for AVX-512 with AVX512-BF16: bf16 inputs compute Q.K^T (and,
// in the backward, dO.V^T) with vdpbf16ps (exact bf16 products, fp32 sums: the same numbers
// as the fp32 path at twice the rate), and P.V, the backward's dV, dK, dQ with P and dS
// rounded to bf16 as GPU kernels do (docs/DECISIONS.md). Flags are set per file in CMakeLists.txt.
#include "cpu/flash.h"
#include "cpu/flash_bwd_impl.h"
#include "cpu/flash_fwd_impl.h"

namespace steelattn::cpu {

#if defined(__AVX512BF16__)
Status flash_forward_avx512bf16(const AttentionParams* ps, int64_t n) { return flash_forward_impl<Avx512Bf16>(ps, n); }
Status flash_backward_avx512bf16(const AttentionParams* ps, int64_t n) { return flash_backward_impl<Avx512Bf16>(ps, n); }
#else
Status flash_forward_avx512bf16(const AttentionParams*, int64_t) {
  return Status::NotImplemented("cpu forward: this build has no AVX512-BF16 kernel");
}
Status flash_backward_avx512bf16(const AttentionParams*, int64_t) {
  return Status::NotImplemented("cpu backward: this build has no AVX512-BF16 kernel");
}
#endif

}  // namespace steelattn::cpu
