// Entry points of the generic CUDA backward path (sm_80 and newer):
// cuda_generic_backward_supports / cuda_generic_backward, declared in
// src/core/backends.h and called by attention_backward for CUDA tensors.
//
// Host side only: translate the validated AttentionParams into BwdParams, pick
// the kernel family (tensor cores for fp16/bf16 with D, Dv <= 256 when the
// tiles fit shared memory; SIMT fp32 FMA otherwise, fp32 always), launch the
// D_i prep kernel, kernel A (dK, dV) and kernel B (dQ, dbias) on the caller's
// stream, and report CUDA errors. Nothing is allocated (see backward_mma.cuh
// for the workspace-free design); results are deterministic.
// Debug knob (shared with the forward): STEELATTN_GENERIC_FORCE_SIMT=1 routes
// fp16/bf16 to the SIMT kernels too.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "backward_launchers.h"
#include "host_params.h"
#include "core/backends.h"
#include "steelattn/detail/philox.h"

namespace steelattn {
namespace {

using cuda_generic::BwdParams;
using cuda_generic::KernelParams;
using cuda_generic::DeviceGuard;
using cuda_generic::cuda_status;
using cuda_generic::make_kernel_params;
using cuda_generic::rows_16b_aligned;
using cuda_generic::strides3;
using cuda_generic::broadcast_strides;

constexpr int kMaxHeadDim = 512;
constexpr int kMmaMaxHeadDim = 256;

BwdParams make_bwd_params(const AttentionParams& p) {
  BwdParams bp{};
  bp.f = make_kernel_params(p);  // the forward's view of q, k, v, out, lse, modifiers and dropout
  bp.f.attn = nullptr;

  bp.dout = p.dout.data;
  strides3(p.dout, bp.dout_stride);
  bp.dout_vec = rows_16b_aligned(p.dout, bp.dout_stride);
  bp.dq = p.dq.data;
  strides3(p.dq, bp.dq_stride);
  bp.dk = p.dk.data;
  strides3(p.dk, bp.dk_stride);
  bp.dv = p.dv.data;
  strides3(p.dv, bp.dv_stride);
  bp.dbias = static_cast<float*>(p.dbias.data);
  if (bp.dbias) broadcast_strides(p.dbias, 4, bp.dbias_stride);
  bp.dlse = static_cast<const float*>(p.dlse.data);
  if (bp.dlse) broadcast_strides(p.dlse, 3, bp.dlse_stride);

  const int64_t blk = cuda_generic::kBwdBlock;
  bp.num_k_tiles = int32_t(cuda_generic::tile_count(p, p.S, blk));
  bp.num_q_tiles = int32_t(cuda_generic::tile_count(p, p.N, blk));
  // 16-bit dq rows of one element cannot hold the fp32 stash: kernel A computes D_i itself.
  bp.delta_inline = p.q.dtype != DType::f32 && p.D < 2;
  return bp;
}


int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

bool cuda_generic_backward_supports(const AttentionParams& p, std::string* why_not) {
  auto no = [&](std::string m) {
    if (why_not) *why_not = std::move(m);
    return false;
  };
  if (p.q.device != Device::cuda) return no("cuda_generic backward: tensors are not on a CUDA device");
  if (p.q.dtype != DType::f32 && p.q.dtype != DType::f16 && p.q.dtype != DType::bf16)
    return no(std::string("cuda_generic backward: dtype ") + dtype_name(p.q.dtype) +
              " (supported: float32, float16, bfloat16)");
  if (p.D > kMaxHeadDim || p.Dv > kMaxHeadDim)
    return no("cuda_generic backward: head dim D=" + std::to_string(p.D) + ", Dv=" + std::to_string(p.Dv) +
              " (at most 512)");
  if (p.N > INT32_MAX || p.S > INT32_MAX || p.B > INT32_MAX || p.H > INT32_MAX)
    return no("cuda_generic backward: B, H, N and S must each fit in int32");
  if (p.block_mask.present()) return no("cuda_generic backward: block_mask: no CUDA backward takes block masks yet");
  if (p.seqlens_k.present())
    return no("cuda_generic backward: seqlens_k (KV-cache lengths) is not on the CUDA kernels yet");
  if (p.varlen() && (p.q.dtype == DType::f32 || p.D > kMmaMaxHeadDim || p.Dv > kMmaMaxHeadDim))
    return no("cuda_generic backward: varlen runs on the tensor-core kernels only (fp16/bf16, head dims <= 256)");
  if ((p.lse.present() && p.lse.dtype != DType::f32) || (p.dlse.present() && p.dlse.dtype != DType::f32) ||
      (p.dbias.present() && p.dbias.dtype != DType::f32) || (p.bias.present() && p.bias.dtype != DType::f32) ||
      (p.alibi_slopes.present() && p.alibi_slopes.dtype != DType::f32))
    return no("cuda_generic backward: lse, dlse, bias, dbias and alibi_slopes must be float32");
  int major = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, p.q.device_id);
  if (err != cudaSuccess)
    return no(std::string("cuda_generic backward: cannot query device ") + std::to_string(p.q.device_id) + ": " +
              cudaGetErrorString(err));
  if (major < 8)
    return no("cuda_generic backward: device " + std::to_string(p.q.device_id) + " has compute capability " +
              std::to_string(major) + ".x (needs 8.0 or newer)");
  return true;
}

Status cuda_generic_backward(const AttentionParams& p, void* stream) {
  std::string why;
  if (!cuda_generic_backward_supports(p, &why)) return Status::NotImplemented(why);
  if (p.B == 0 || p.H == 0 || p.N == 0 || p.S == 0) return Status::Ok();  // the caller zero-fills
  DeviceGuard guard(p.q.device_id);
  const auto cu_stream = static_cast<cudaStream_t>(stream);

  BwdParams bp = make_bwd_params(p);
  int smem_optin = 0;
  cudaError_t err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, p.q.device_id);
  if (err != cudaSuccess) return cuda_status("cudaDeviceGetAttribute", err);

  const char* force_env = std::getenv("STEELATTN_GENERIC_FORCE_SIMT");
  const bool force_simt = force_env != nullptr && force_env[0] == '1';
  const int D = int(p.D), Dv = int(p.Dv), Dmax = D > Dv ? D : Dv;
  bool mma = p.q.dtype != DType::f32 && !force_simt && Dmax <= kMmaMaxHeadDim &&
             cuda_generic::bwd_mma_smem_bytes_for(D, Dv, 1) <= size_t(smem_optin);
  if (p.varlen() && !mma)  // forced SIMT or too little shared memory: the SIMT kernels take no varlen
    return Status::NotImplemented("steelattn cuda_generic backward: varlen needs the tensor-core kernels");
  int kc_a = 0, kc_b = 0;
  if (mma) {
    bp.two_stage = cuda_generic::bwd_mma_smem_bytes_for(D, Dv, 2) <= size_t(smem_optin);
    kc_a = Dmax <= 64 ? 64 : 128;
    kc_b = D <= 64 ? 64 : 128;
  } else {
    if (cuda_generic::bwd_simt_smem_bytes_for() > size_t(smem_optin))
      return Status::Error("steelattn cuda_generic backward: device shared memory too small");
    kc_a = kc_b = cuda_generic::kBwdSimtChunk;
  }
  bp.chunks_a = int32_t(ceil_div(Dmax, kc_a));
  bp.chunks_b = int32_t(ceil_div(D, kc_b));
  const int64_t ctas_a = int64_t(bp.num_k_tiles) * bp.chunks_a * p.Hkv * p.B;
  const int64_t ctas_b = int64_t(bp.num_q_tiles) * bp.chunks_b * p.H * p.B;
  if (ctas_a > INT32_MAX || ctas_b > INT32_MAX || (p.B * p.H * p.N + 7) / 8 > INT32_MAX)
    return Status::Error("steelattn cuda_generic backward: grid too large");

  // Stream order does the synchronisation: prep (stash D_i in dq) -> kernel A
  // (reads the stash; dK, dV) -> kernel B (overwrites dq with dQ; dbias).
  if (!bp.delta_inline) {
    err = cuda_generic::launch_backward_delta_stash(bp, p.q.dtype, cu_stream);
    if (err != cudaSuccess) return cuda_status("prep kernel launch", err);
  }
  err = mma ? cuda_generic::launch_backward_mma(bp, p.q.dtype, kc_a, kc_b, cu_stream)
            : cuda_generic::launch_backward_simt(bp, p.q.dtype, cu_stream);
  if (err != cudaSuccess) return cuda_status("kernel launch", err);
  return Status::Ok();
}

}  // namespace steelattn
