// One instantiation of the sm90 wide-head-dim backward kernel (KD = 192, KDv = 192, bf16).
// One per file so they compile in parallel.
#include "cuda/sm90/bwd_launch.h"
#include "cuda/sm90/bwd_wide_kernel.h"

namespace steelattn::sm90 {
template cudaError_t launch_bwd_wide<192, 192, __nv_bfloat16>(const BwdParams&, dim3, cudaStream_t);
}  // namespace steelattn::sm90
