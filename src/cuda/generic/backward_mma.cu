// Instantiations and launcher of the tensor-core backward kernels:
// {fp16, bf16} x {kernel A, kernel B} x column chunk {64, 128} x {dense, varlen} = 16 kernels.
// D and Dv are runtime values (tiles are sized from them).
#include "backward_launchers.h"
#include "backward_mma.cuh"

namespace steelattn::cuda_generic {

static_assert(bwd_mma_cfg::kBlockM == kBwdBlock && bwd_mma_cfg::kBlockN == kBwdBlock,
              "grid decomposition assumes 64-row tiles");

size_t bwd_mma_smem_bytes_for(int D, int Dv, int stages) { return bwd_mma_smem_bytes(D, Dv, stages); }

template <typename K>
static cudaError_t launch_one(K kernel, const BwdParams& p, size_t smem, int64_t ctas, cudaStream_t stream) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  kernel<<<dim3(unsigned(ctas)), dim3(bwd_mma_cfg::kThreads), smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, bool kVarlen>
static cudaError_t launch_dtype(const BwdParams& p, int kc_a, int kc_b, cudaStream_t stream) {
  const size_t smem = bwd_mma_smem_bytes(p.f.D, p.f.Dv, p.two_stage ? 2 : 1);
  const int64_t ctas_a = int64_t(p.num_k_tiles) * p.chunks_a * p.f.Hkv * p.f.B;
  const int64_t ctas_b = int64_t(p.num_q_tiles) * p.chunks_b * p.f.H * p.f.B;
  cudaError_t err = kc_a == 64 ? launch_one(bwd_dkdv_mma_kernel<T, 64, kVarlen>, p, smem, ctas_a, stream)
                               : launch_one(bwd_dkdv_mma_kernel<T, 128, kVarlen>, p, smem, ctas_a, stream);
  if (err != cudaSuccess) return err;
  return kc_b == 64 ? launch_one(bwd_dq_mma_kernel<T, 64, kVarlen>, p, smem, ctas_b, stream)
                    : launch_one(bwd_dq_mma_kernel<T, 128, kVarlen>, p, smem, ctas_b, stream);
}

template <typename T>
static cudaError_t launch_dtype(const BwdParams& p, int kc_a, int kc_b, cudaStream_t stream) {
  return p.f.cu_q != nullptr ? launch_dtype<T, true>(p, kc_a, kc_b, stream)
                             : launch_dtype<T, false>(p, kc_a, kc_b, stream);
}

cudaError_t launch_backward_mma(const BwdParams& p, DType dtype, int kc_a, int kc_b, cudaStream_t stream) {
  if ((kc_a != 64 && kc_a != 128) || (kc_b != 64 && kc_b != 128)) return cudaErrorInvalidValue;
  if (dtype == DType::f16) return launch_dtype<__half>(p, kc_a, kc_b, stream);
  if (dtype == DType::bf16) return launch_dtype<__nv_bfloat16>(p, kc_a, kc_b, stream);
  return cudaErrorInvalidValue;
}

}  // namespace steelattn::cuda_generic
