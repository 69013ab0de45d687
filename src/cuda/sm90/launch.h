// Declarations shared by the host launcher (launch.cu) and the instantiation
// files (inst_*.cu). launch_fwd<D, Elem> is defined in kernel.h and
// explicitly instantiated once per (head dim, dtype) in its own file, so the
// kernels compile in parallel and launch.cu stays light.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/sm90/params.h"

namespace steelattn::sm90 {

struct LaunchVariant {
  bool band;     // any window side bounded (causal, sliding window)
  bool softcap;  // softcap > 0
  bool pack;     // GQA packing (params.h: pack_rows)
  bool sparse;   // block-sparse (params.h: block_mask); never with pack
  bool varlen;   // packed sequences (params.h: cu_q); never with pack or sparse
};

// Instantiated for D in {64, 128, 256} x {__nv_bfloat16, __half} (inst_*.cu).
template <int D, class Elem>
cudaError_t launch_fwd(const FwdParams& p, const LaunchVariant& v, int grid, cudaStream_t stream);


}  // namespace steelattn::sm90
