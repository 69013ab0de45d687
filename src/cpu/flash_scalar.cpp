// The portable CPU flash kernels, and the float64 ones (any CPU).
#include "cpu/flash.h"
#include "cpu/flash_bwd_impl.h"
#include "cpu/flash_fwd_impl.h"

namespace steelattn::cpu {

Status flash_forward_scalar(const AttentionParams* ps, int64_t n) { return flash_forward_impl<Scalar>(ps, n); }
Status flash_backward_scalar(const AttentionParams* ps, int64_t n) { return flash_backward_impl<Scalar>(ps, n); }
Status flash_forward_f64(const AttentionParams* ps, int64_t n) { return flash_forward_impl<Scalar64>(ps, n); }
Status flash_backward_f64(const AttentionParams* ps, int64_t n) { return flash_backward_impl<Scalar64>(ps, n); }

}  // namespace steelattn::cpu
