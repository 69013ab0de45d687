// One (head dim, dtype) instantiation of the sm90 forward kernel: its four
// <Band, Softcap> variants. Kept one per file so they compile in parallel.
#include "cuda/sm90/kernel.h"

namespace steelattn::sm90 {
template cudaError_t launch_fwd<192, __nv_bfloat16>(const FwdParams&, const LaunchVariant&, int, cudaStream_t);
}  // namespace steelattn::sm90
