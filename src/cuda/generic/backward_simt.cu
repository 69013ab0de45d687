// Instantiations and launchers of the SIMT backward kernels ({fp32, fp16, bf16}
// x {kernel A, kernel B}) and of the D_i prep kernel.
#include "backward_launchers.h"
#include "backward_simt.cuh"

namespace steelattn::cuda_generic {

static_assert(bwd_simt_cfg::kTile == kBwdBlock && bwd_simt_cfg::kChunk == kBwdSimtChunk,
              "grid decomposition assumes 64-row tiles and 64-column chunks");

size_t bwd_simt_smem_bytes_for() { return bwd_simt_smem_bytes(); }

template <typename K>
static cudaError_t launch_one(K kernel, const BwdParams& p, size_t smem, int64_t ctas, cudaStream_t stream) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  kernel<<<dim3(unsigned(ctas)), dim3(bwd_simt_cfg::kThreads), smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
static cudaError_t launch_dtype(const BwdParams& p, cudaStream_t stream) {
  const size_t smem = bwd_simt_smem_bytes();
  const int64_t ctas_a = int64_t(p.num_k_tiles) * p.chunks_a * p.f.Hkv * p.f.B;
  const int64_t ctas_b = int64_t(p.num_q_tiles) * p.chunks_b * p.f.H * p.f.B;
  cudaError_t err = launch_one(bwd_dkdv_simt_kernel<T>, p, smem, ctas_a, stream);
  if (err != cudaSuccess) return err;
  return launch_one(bwd_dq_simt_kernel<T>, p, smem, ctas_b, stream);
}

cudaError_t launch_backward_simt(const BwdParams& p, DType dtype, cudaStream_t stream) {
  if (dtype == DType::f32) return launch_dtype<float>(p, stream);
  if (dtype == DType::f16) return launch_dtype<__half>(p, stream);
  if (dtype == DType::bf16) return launch_dtype<__nv_bfloat16>(p, stream);
  return cudaErrorInvalidValue;
}

template <typename T>
static cudaError_t launch_stash(const BwdParams& p, cudaStream_t stream) {
  const int64_t rows = int64_t(p.f.B) * p.f.H * p.f.N;
  const int64_t ctas = (rows + 7) / 8;
  bwd_delta_stash_kernel<T><<<dim3(unsigned(ctas)), dim3(256), 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_backward_delta_stash(const BwdParams& p, DType dtype, cudaStream_t stream) {
  if (dtype == DType::f32) return launch_stash<float>(p, stream);
  if (dtype == DType::f16) return launch_stash<__half>(p, stream);
  if (dtype == DType::bf16) return launch_stash<__nv_bfloat16>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace steelattn::cuda_generic
