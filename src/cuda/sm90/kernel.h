// Kernel shell: barrier setup, warpgroup roles, register reallocation, and
// the host-side launch of one instantiation. Included only by the
// instantiation files (inst_*.cu), so each compiles its own kernels.
#pragma once

#include <cuda_runtime.h>

#include "cuda/sm90/common.h"
#include "cuda/sm90/smem_attr.h"
#include "cuda/sm90/launch.h"
#include "cuda/sm90/mainloop.h"

namespace steelattn::sm90 {

template <int D, class Elem, bool Band, bool Softcap, bool Pack, bool Sparse, bool Varlen>
__global__ void __launch_bounds__(kThreads, 1) fwd_kernel(const __grid_constant__ FwdParams p) {
  // Other architectures (a multi-arch build) get a body that fails loudly;
  // cuda_sm90_supports() never selects them.
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();
#elif defined(__CUDA_ARCH__)
  using ML = Mainloop<D, Elem, typename ElemTag<Elem>::type, Band, Softcap, Pack, Sparse, Varlen>;
  extern __shared__ uint8_t smem_raw[];
  // The swizzle needs 1024-byte aligned tiles; the launch asks for 1 KB slack.
  auto& sm = *reinterpret_cast<typename ML::Storage*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) &
                                                       ~static_cast<uintptr_t>(1023));
  if (threadIdx.x == 0) ML::init_barriers(sm);
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {
    // Producer: one thread issues every TMA load; the rest of the warpgroup
    // only gives its registers away.
    setmaxnreg_dec<kProducerRegs>();
    if (threadIdx.x == 0) ML::produce(p, sm);
  } else {
    setmaxnreg_inc<kConsumerRegs>();
    ML::consume(p, sm, warpgroup - 1);
  }
#endif
}

template <int D, class Elem, bool Band, bool Softcap, bool Pack, bool Sparse = false, bool Varlen = false>
cudaError_t launch_variant(const FwdParams& p, int grid, cudaStream_t stream) {
  constexpr auto kernel = fwd_kernel<D, Elem, Band, Softcap, Pack, Sparse, Varlen>;
  constexpr int smem = static_cast<int>(sizeof(SharedStorage<D, Elem>)) + 1024;
  cudaError_t err = raise_smem_limit<kernel>(smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// Band x softcap for one (Pack, Sparse, Varlen) family.
template <int D, class Elem, bool Pack, bool Sparse, bool Varlen>
cudaError_t launch_family(const FwdParams& p, const LaunchVariant& v, int grid, cudaStream_t stream) {
  if (v.band)
    return v.softcap ? launch_variant<D, Elem, true, true, Pack, Sparse, Varlen>(p, grid, stream)
                     : launch_variant<D, Elem, true, false, Pack, Sparse, Varlen>(p, grid, stream);
  return v.softcap ? launch_variant<D, Elem, false, true, Pack, Sparse, Varlen>(p, grid, stream)
                   : launch_variant<D, Elem, false, false, Pack, Sparse, Varlen>(p, grid, stream);
}

// The runtime switches that change the inner loop (band, softcap, GQA
// packing, block-sparse, varlen) become template arguments here (16 kernels per
// head dim and dtype: 8 dense, 4 block-sparse, 4 varlen); everything else stays a runtime
// field of FwdParams.
template <int D, class Elem>
cudaError_t launch_fwd(const FwdParams& p, const LaunchVariant& v, int grid, cudaStream_t stream) {
  // Packed tiles are never block-sparse or varlen (launch.cu).
  if (v.pack) return launch_family<D, Elem, /*Pack=*/true, false, false>(p, v, grid, stream);
  if (v.varlen) return launch_family<D, Elem, false, false, /*Varlen=*/true>(p, v, grid, stream);
  if (v.sparse) return launch_family<D, Elem, false, /*Sparse=*/true, false>(p, v, grid, stream);
  return launch_family<D, Elem, false, false, false>(p, v, grid, stream);
}

}  // namespace steelattn::sm90
