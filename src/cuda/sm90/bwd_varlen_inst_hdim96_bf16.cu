// One (head dim, dtype) instantiation of the varlen sm90 backward kernel: its four
// <Band, Softcap> variants. One per file so they compile in parallel.
#include "cuda/sm90/bwd_kernel.h"
#include "cuda/sm90/bwd_launch.h"

namespace steelattn::sm90 {
template cudaError_t launch_bwd_varlen<96, __nv_bfloat16>(const BwdParams&, bool, bool, dim3, cudaStream_t);
}  // namespace steelattn::sm90
