// Host-side launchers of the generic backward kernels, used by backward_api.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "backward_params.h"
#include "steelattn/steelattn.h"

namespace steelattn::cuda_generic {

// Tensor-core kernels (fp16/bf16). Shared memory of a call with `stages` (1 or 2)
// buffers for the streamed tiles; kc_a / kc_b (64 or 128) are the accumulator
// column chunks of kernel A (dK, dV) and kernel B (dQ).
size_t bwd_mma_smem_bytes_for(int D, int Dv, int stages);
cudaError_t launch_backward_mma(const BwdParams& p, DType dtype, int kc_a, int kc_b,
                                cudaStream_t stream);

// SIMT kernels (fp32, and 16-bit calls the tensor-core kernels cannot take).
constexpr int kBwdSimtChunk = 64;
size_t bwd_simt_smem_bytes_for();
cudaError_t launch_backward_simt(const BwdParams& p, DType dtype, cudaStream_t stream);

// Prep kernel: D_i = rowsum(dO * O) - dlse stashed in dq (skipped when p.delta_inline).
cudaError_t launch_backward_delta_stash(const BwdParams& p, DType dtype, cudaStream_t stream);

// Rows / keys per tile of both families (grid sizes depend on it).
constexpr int kBwdBlock = 64;

}  // namespace steelattn::cuda_generic
