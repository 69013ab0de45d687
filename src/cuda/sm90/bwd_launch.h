// Declarations shared by the sm90 backward host code (bwd_launch.cu) and its
// instantiation files (bwd_inst_*.cu, one per (head dim, dtype)).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/sm90/bwd_params.h"

namespace steelattn::sm90 {

// Defined in bwd_kernel.h; instantiated for D in {64, 96, 128} x {__nv_bfloat16, __half} x
// Det (bwd_inst_hdim{D}_{dtype}{,_det}.cu).
template <int D, class Elem, bool Det>
cudaError_t launch_bwd_det(const BwdParams& p, bool band, bool softcap, dim3 grid, cudaStream_t stream);

// Defined in bwd_kernel.h; the block-sparse variants, instantiated for D in {64, 96, 128} x
// {__nv_bfloat16, __half} (bwd_sparse_inst_hdim{D}_{dtype}.cu).
template <int D, class Elem>
cudaError_t launch_bwd_sparse(const BwdParams& p, bool band, bool softcap, dim3 grid, cudaStream_t stream);

// Defined in bwd_kernel.h; the varlen variants, instantiated for D in {64, 96, 128} x
// {__nv_bfloat16, __half} (bwd_varlen_inst_hdim{D}_{dtype}.cu).
template <int D, class Elem>
cudaError_t launch_bwd_varlen(const BwdParams& p, bool band, bool softcap, dim3 grid, cudaStream_t stream);

// Defined in bwd_wide_kernel.h; instantiated for (KD, KDv) in {(192, 192), (256, 256),
// (192, 128)} x {__nv_bfloat16, __half} (bwd_wide_inst_*.cu).
template <int KD, int KDv, class Elem>
cudaError_t launch_bwd_wide(const BwdParams& p, dim3 grid, cudaStream_t stream);

template <int D, class Elem>
cudaError_t launch_bwd(const BwdParams& p, bool band, bool softcap, bool deterministic, dim3 grid,
                       cudaStream_t stream) {
  return deterministic ? launch_bwd_det<D, Elem, true>(p, band, softcap, grid, stream)
                       : launch_bwd_det<D, Elem, false>(p, band, softcap, grid, stream);
}

}  // namespace steelattn::sm90
