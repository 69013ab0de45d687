// Entry points of the CPU flash kernels, one pair per instruction set, plus the
// float64 pair (portable code; used for float64 inputs on any CPU).
#pragma once

#include "steelattn/steelattn.h"

namespace steelattn::cpu {

Status flash_forward_avx512(const AttentionParams& p);
Status flash_forward_avx512bf16(const AttentionParams& p);  // bf16 inputs with even D only
Status flash_forward_avx2(const AttentionParams& p);
Status flash_forward_scalar(const AttentionParams& p);
Status flash_forward_f64(const AttentionParams& p);
Status flash_backward_avx512(const AttentionParams& p);
Status flash_backward_avx512bf16(const AttentionParams& p);  // bf16 inputs with even D only
Status flash_backward_avx2(const AttentionParams& p);
Status flash_backward_scalar(const AttentionParams& p);
Status flash_backward_f64(const AttentionParams& p);

}  // namespace steelattn::cpu
