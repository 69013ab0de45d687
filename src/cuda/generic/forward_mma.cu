// Instantiations and launcher of the tensor-core kernel: {fp16, bf16} x
// Dv tile {64, 128, 256} x {dense, varlen} = 12 kernels. The head dim D is a runtime value (Q and K
// tiles are sized from it), so it costs no instantiations.
#include "forward_mma.cuh"
#include "launchers.h"

namespace steelattn::cuda_generic {

static_assert(mma_cfg::kBlockM == kBlockM, "grid decomposition assumes one q tile height");

size_t mma_smem_bytes_for(int D, int dv_tile) { return mma_smem_bytes(D, dv_tile); }

template <typename T, int kDvTile>
static cudaError_t launch(const KernelParams& p, cudaStream_t stream) {
  const size_t smem = mma_smem_bytes(p.D, kDvTile);
  auto kernel = p.cu_q != nullptr ? forward_mma_kernel<T, kDvTile, true> : forward_mma_kernel<T, kDvTile, false>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  const int64_t ctas = int64_t(p.num_q_tiles) * p.num_dv_chunks * p.H * p.B;
  kernel<<<dim3(unsigned(ctas)), dim3(mma_cfg::kThreads), smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
static cudaError_t launch_dtype(const KernelParams& p, int dv_tile, cudaStream_t stream) {
  switch (dv_tile) {
    case 64: return launch<T, 64>(p, stream);
    case 128: return launch<T, 128>(p, stream);
    case 256: return launch<T, 256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_forward_mma(const KernelParams& p, DType dtype, int dv_tile,
                               cudaStream_t stream) {
  if (dtype == DType::f16) return launch_dtype<__half>(p, dv_tile, stream);
  if (dtype == DType::bf16) return launch_dtype<__nv_bfloat16>(p, dv_tile, stream);
  return cudaErrorInvalidValue;
}

}  // namespace steelattn::cuda_generic
