// Internal interface between the dispatcher (src/core) and the kernels.
// Each backend reports whether it can serve a validated call and runs it.
#pragma once

#include <string>

#include "steelattn/steelattn.h"

namespace steelattn {

// CPU flash kernel (src/cpu). Serves every validated CPU call.
enum class CpuIsa { avx512, avx2, scalar };
CpuIsa detect_cpu_isa();
Status cpu_forward(const AttentionParams& p, CpuIsa isa);
Status cpu_backward(const AttentionParams& p, CpuIsa isa);
// kv_append (steelattn.h) on a validated call: the CPU loop (src/cpu/kv_append.cpp).
Status cpu_kv_append(const KVAppendParams& p);

// CUDA kernels (src/cuda), compiled only when nvcc is found
// (STEELATTN_WITH_CUDA). Both take a validated call and a cudaStream_t.
#if defined(STEELATTN_WITH_CUDA)
// Hopper wgmma + TMA kernel: true when it serves this call on this device.
bool cuda_sm90_supports(const AttentionParams& p, std::string* why_not);
// Needs cuda_sm90_forward_workspace_bytes(p) bytes of device scratch (nonzero only for block
// masks whose block sizes are not whole kernel tiles).
size_t cuda_sm90_forward_workspace_bytes(const AttentionParams& p);
Status cuda_sm90_forward(const AttentionParams& p, void* workspace, void* stream);
// Generic mma.sync kernel (sm_80+): true when it serves this call on this device.
bool cuda_generic_supports(const AttentionParams& p, std::string* why_not);
Status cuda_generic_forward(const AttentionParams& p, void* stream);
// Split-KV decode kernel (sm_80+): few query rows per KV head against a long cache, and
// every call with KV-cache lengths (seqlens_k). Splits over keys need a workspace.
bool cuda_decode_supports(const AttentionParams& p, std::string* why_not);
size_t cuda_decode_workspace_bytes(const AttentionParams& p);
Status cuda_decode_forward(const AttentionParams& p, void* workspace, void* stream);
// Hopper backward kernel (src/cuda/sm90/bwd_*): needs a workspace; not deterministic
// (dQ is accumulated with bulk reduce-adds in arrival order).
bool cuda_sm90_backward_supports(const AttentionParams& p, std::string* why_not);
size_t cuda_sm90_backward_workspace_bytes(const AttentionParams& p);
Status cuda_sm90_backward(const AttentionParams& p, void* workspace, void* stream);
// Generic backward kernel (sm_80+), deterministic: dq, dk, dv (and dbias) of a validated call.
bool cuda_generic_backward_supports(const AttentionParams& p, std::string* why_not);
Status cuda_generic_backward(const AttentionParams& p, void* stream);
// kv_append on a validated call: one launch (src/cuda/kvcache/kv_append.cu).
Status cuda_kv_append(const KVAppendParams& p, void* stream);
#endif

}  // namespace steelattn
