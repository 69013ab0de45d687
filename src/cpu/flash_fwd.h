// Entry points of the CPU flash kernel, one per instruction set.
#pragma once

#include "steelattn/steelattn.h"

namespace steelattn::cpu {

Status flash_forward_avx512(const AttentionParams& p);
Status flash_forward_avx2(const AttentionParams& p);
Status flash_forward_scalar(const AttentionParams& p);

}  // namespace steelattn::cpu
