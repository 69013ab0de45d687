// Entry points of the generic CUDA forward path (sm_80 and newer):
// cuda_generic_supports / cuda_generic_forward, declared in src/core/backends.h.
//
// Host side only: translate the validated AttentionParams into KernelParams
// (strides, broadcast strides, derived counts), pick the kernel family and Dv
// tile for the device's shared memory, launch, and report CUDA errors.
// Depends only on the headers (no symbol from src/core/*.cpp), so the kernels
// and tests/cuda/generic_harness.cu link without the core library.
// Debug knob: STEELATTN_GENERIC_FORCE_SIMT=1 routes fp16/bf16 to the SIMT kernel.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/backends.h"
#include "host_params.h"
#include "launchers.h"
#include "steelattn/detail/philox.h"

namespace steelattn {
namespace {

using cuda_generic::KernelParams;
using cuda_generic::DeviceGuard;
using cuda_generic::cuda_status;
using cuda_generic::make_kernel_params;

constexpr int kMaxHeadDim = 512;

}  // namespace

bool cuda_generic_supports(const AttentionParams& p, std::string* why_not) {
  auto no = [&](std::string m) {
    if (why_not) *why_not = std::move(m);
    return false;
  };
  if (p.q.device != Device::cuda) return no("cuda_generic: tensors are not on a CUDA device");
  if (p.q.dtype != DType::f32 && p.q.dtype != DType::f16 && p.q.dtype != DType::bf16)
    return no("cuda_generic: dtype code " + std::to_string(int(p.q.dtype)) +
              " (supported: float32, float16, bfloat16)");
  if (p.D > kMaxHeadDim || p.Dv > kMaxHeadDim)
    return no("cuda_generic: head dim D=" + std::to_string(p.D) + ", Dv=" +
              std::to_string(p.Dv) + " (at most 512)");
  if (p.N > INT32_MAX || p.S > INT32_MAX || p.B > INT32_MAX || p.H > INT32_MAX)
    return no("cuda_generic: B, H, N and S must each fit in int32");
  if (p.block_mask.present()) return no("cuda_generic: block_mask: only the Hopper forward takes block masks");
  if (p.seqlens_k.present()) return no("cuda_generic: seqlens_k (KV-cache lengths) is not on the CUDA kernels yet");
  if (p.varlen() && p.attn_weights.present()) return no("cuda_generic: varlen calls take no attention weights");
  if (p.varlen() && (p.q.dtype == DType::f32 || p.D > 256 || p.Dv > 256))
    return no("cuda_generic: varlen runs on the tensor-core kernels only (fp16/bf16, head dims <= 256)");
  int major = 0;
  const cudaError_t err =
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, p.q.device_id);
  if (err != cudaSuccess)
    return no(std::string("cuda_generic: cannot query device ") + std::to_string(p.q.device_id) +
              ": " + cudaGetErrorString(err));
  if (major < 8)
    return no("cuda_generic: device " + std::to_string(p.q.device_id) +
              " has compute capability " + std::to_string(major) + ".x (needs 8.0 or newer)");
  return true;
}

Status cuda_generic_forward(const AttentionParams& p, void* stream) {
  std::string why;
  if (!cuda_generic_supports(p, &why)) return Status::NotImplemented(why);
  if (p.B == 0 || p.H == 0 || p.N == 0 || p.Dv == 0) return Status::Ok();  // nothing to write
  DeviceGuard guard(p.q.device_id);
  const auto cu_stream = static_cast<cudaStream_t>(stream);

  KernelParams k = make_kernel_params(p);
  k.num_q_tiles = int32_t(cuda_generic::tile_count(p, p.N, cuda_generic::kBlockM));
  k.num_dv_chunks = 1;
  int smem_optin = 0;
  cudaError_t err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                           p.q.device_id);
  if (err != cudaSuccess) return cuda_status("cudaDeviceGetAttribute", err);

  // Tensor cores for 16-bit inputs: the widest Dv tile that covers Dv in as
  // few chunks as possible and fits shared memory (D = 512 with a 256 tile needs
  // 163 KiB: A100 and H100 yes, sm_86/89 no, which then use narrower tiles).
  // STEELATTN_GENERIC_FORCE_SIMT=1 sends 16-bit inputs to the SIMT kernel too,
  // so tests can cover the route that small-shared-memory devices take.
  const char* force_env = std::getenv("STEELATTN_GENERIC_FORCE_SIMT");
  const bool force_simt = force_env != nullptr && force_env[0] == '1';
  int dv_tile = 0;
  if (p.q.dtype != DType::f32 && !force_simt) {
    const int want = p.Dv <= 64 ? 64 : p.Dv <= 128 ? 128 : 256;
    for (int t = want; t >= 64; t /= 2) {
      if (cuda_generic::mma_smem_bytes_for(int(p.D), t) <= size_t(smem_optin)) {
        dv_tile = t;
        break;
      }
    }
  }
  if (p.varlen() && dv_tile == 0)  // a device whose shared memory takes no tensor-core tile
    return Status::NotImplemented("steelattn cuda_generic: varlen needs the tensor-core kernel's shared memory");
  const int chunk = dv_tile > 0 ? dv_tile : cuda_generic::kSimtDvTile;
  if (dv_tile == 0 && cuda_generic::simt_smem_bytes_for() > size_t(smem_optin))
    return Status::Error("steelattn cuda_generic: device shared memory too small");
  k.num_dv_chunks = int32_t((p.Dv + chunk - 1) / chunk);
  const int64_t ctas = int64_t(k.num_q_tiles) * k.num_dv_chunks * p.H * p.B;
  if (ctas > INT32_MAX) return Status::Error("steelattn cuda_generic: grid too large");

  err = dv_tile > 0 ? cuda_generic::launch_forward_mma(k, p.q.dtype, dv_tile, cu_stream)
                    : cuda_generic::launch_forward_simt(k, p.q.dtype, cu_stream);
  if (err != cudaSuccess) return cuda_status("kernel launch", err);
  return Status::Ok();
}

}  // namespace steelattn
