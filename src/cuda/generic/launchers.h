// Host-side launchers of the generic kernels (one per kernel family), used by
// generic_api.cu. Each picks the instantiation, raises the dynamic shared
// memory limit and launches one CTA per (q tile, Dv chunk, head, batch).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "kernel_params.h"
#include "steelattn/steelattn.h"

namespace steelattn::cuda_generic {

// Output columns per CTA of the tensor-core kernel; instantiated for 64, 128, 256.
size_t mma_smem_bytes_for(int D, int dv_tile);
cudaError_t launch_forward_mma(const KernelParams& p, DType dtype, int dv_tile,
                               cudaStream_t stream);

// SIMT kernel (fp32, and 16-bit inputs too large for the tensor-core tiles).
constexpr int kSimtDvTile = 128;
size_t simt_smem_bytes_for();
cudaError_t launch_forward_simt(const KernelParams& p, DType dtype, cudaStream_t stream);

// Query rows per CTA, shared by both families (the grid size depends on it).
constexpr int kBlockM = 64;

}  // namespace steelattn::cuda_generic
