// Device-side pieces the sm90 forward (mainloop.h, kernel.h) and backward
// (bwd_kernel.h) kernels share: the sm_90a build guard, the element type ->
// wgmma tag map, and the position in an mbarrier stage ring.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/sm90/wgmma_ops.h"  // Bf16, F16

// wgmma and setmaxnreg exist only in the arch-specific sm_90a target; a
// plain sm_90 build would compile an empty kernel.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "src/cuda/sm90 must be compiled for sm_90a: -gencode=arch=compute_90a,code=sm_90a (CMake: 90a)"
#endif

namespace steelattn::sm90 {

template <class Elem>
struct ElemTag;
template <>
struct ElemTag<__nv_bfloat16> {
  using type = Bf16;
};
template <>
struct ElemTag<__half> {
  using type = F16;
};

// Position in a stage ring; consumers wait on full[index] with `phase`, the
// producer on empty[index] with `phase ^ 1` (a fresh barrier counts as having
// completed the phase before phase 0).
template <int Stages>
struct PipeState {
  int index = 0;
  uint32_t phase = 0;
  __device__ void advance() {
    if (++index == Stages) {
      index = 0;
      phase ^= 1;
    }
  }
};

}  // namespace steelattn::sm90
