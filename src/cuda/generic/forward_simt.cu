// Instantiations and launcher of the SIMT kernel: fp32, fp16, bf16 = 3 kernels.
#include "forward_simt.cuh"
#include "launchers.h"

namespace steelattn::cuda_generic {

static_assert(simt_cfg::kBlockM == kBlockM, "grid decomposition assumes one q tile height");
static_assert(simt_cfg::kDvTile == kSimtDvTile, "launcher and kernel disagree on the Dv tile");

size_t simt_smem_bytes_for() { return simt_smem_bytes(); }

template <typename T>
static cudaError_t launch(const KernelParams& p, cudaStream_t stream) {
  const size_t smem = simt_smem_bytes();
  auto kernel = forward_simt_kernel<T>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  const int64_t ctas = int64_t(p.num_q_tiles) * p.num_dv_chunks * p.H * p.B;
  kernel<<<dim3(unsigned(ctas)), dim3(simt_cfg::kThreads), smem, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_forward_simt(const KernelParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::f32: return launch<float>(p, stream);
    case DType::f16: return launch<__half>(p, stream);
    case DType::bf16: return launch<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace steelattn::cuda_generic
