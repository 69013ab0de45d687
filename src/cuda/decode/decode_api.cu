// Entry points of the split-KV decode path (cuda_decode_*, declared in src/core/backends.h):
// which calls it serves, how many key splits, its workspace, the launches.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/backends.h"
#include "cuda/generic/host_params.h"
#include "decode_kernel.cuh"

namespace steelattn {
namespace {

using cuda_decode::DecodeParams;
using cuda_generic::cuda_status;
using cuda_generic::DeviceGuard;
using cuda_generic::rows_16b_aligned;
using cuda_generic::strides3;

// Query rows per KV head up to which a dense call is decode-shaped: one row group always;
// up to four (64 rows: 16 queries of a 4-head group) while the Hopper kernel, one CTA per
// (batch entry, KV head) here, would leave most SMs idle (B x Hkv <= SMs / 8). Measured at
// 16 queries, H32/8 D128, S32k (NOTES.md): the split decode kernel 120 / 209 / 403 / 801 us
// at B 1 / 2 / 4 / 8 against the Hopper kernel's 409 / 408 / 409 / 413.
// Calls with cache lengths (seqlens_k) are served at any size: no other CUDA kernel takes them.
constexpr int64_t kMaxDenseRows = 16;
constexpr int64_t kMaxDenseRowsFewHeads = 64;

int head_dim_pad(int64_t d) { return d <= 64 ? 64 : d <= 128 ? 128 : 256; }

// Tile shapes (keys per warp tile, stages) per padded head dim, from measurements
// (docs/benchmarks/NOTES.md, H200, H32/8 D128 bf16). At D = 128, 32-key warp tiles (one
// CTA of 4 warps per SM) read dense caches 2-13% faster than 16-key tiles (3 CTAs per SM)
// from batch 1 to 64 (B x KV heads up to 512 CTAs), and 6% slower at B128 S2k (1024
// CTAs). Paged pools take the same rule (a page of 16 splits a 32-key tile into two runs,
// each copied like a dense run: decode_kernel.cuh). At B64 S4k and B32 S8k 16 x 3 measured
// 2% faster than the rule's 32 x 2 (NOTES.md session 10; one run, not adopted).
// STEELATTN_DECODE_TILE=32x2|32x3|16x2|16x3 forces one (measurements).
struct TileShape {
  int keys, stages;
};

using cuda_device::device_info;

int64_t row_groups(const AttentionParams& p) {
  return (p.H / p.Hkv * p.N + cuda_decode::kRows - 1) / cuda_decode::kRows;
}

TileShape tile_shape(const AttentionParams& p) {
  const int dpad = head_dim_pad(std::max(p.D, p.Dv));
  if (dpad == 64) return {32, 2};
  if (dpad == 256) return {16, 2};
  static const TileShape forced = [] {
    const char* env = std::getenv("STEELATTN_DECODE_TILE");
    const std::string e = env ? env : "";
    if (e == "32x2") return TileShape{32, 2};
    if (e == "32x3") return TileShape{32, 3};
    if (e == "16x3") return TileShape{16, 3};
    if (e == "16x2") return TileShape{16, 2};
    return TileShape{0, 0};
  }();
  if (forced.keys) return forced;
  const cuda_device::DeviceInfo dev = device_info(p.q.device_id);
  const bool wide_fits = size_t(dev.smem_optin) >= cuda_decode::smem_bytes(128, 32, 2);
  if (wide_fits && p.B * p.Hkv * row_groups(p) <= 4 * int64_t(std::max(1, dev.sms)))
    return {32, 2};
  return {16, 2};
}

int ctas_per_sm(int dpad, TileShape t) {
  return cuda_decode::ctas_per_sm(cuda_decode::smem_bytes(dpad, t.keys, t.stages));
}

// Key splits: as many as fill one wave of resident CTAs (every CTA then has the same work
// and they finish together), each split keeping every warp busy for a few tiles; the
// capacity S stands in for the lengths, which live on the device. A caller's num_splits wins.
int num_splits(const AttentionParams& p) {
  if (p.num_splits > 0) return std::min(p.num_splits, cuda_decode::kMaxSplits);
  const int dpad = head_dim_pad(std::max(p.D, p.Dv));
  const TileShape t = tile_shape(p);
  const int64_t ctas = p.B * p.Hkv * row_groups(p);
  const int64_t min_keys_per_split = int64_t(t.keys) * cuda_decode::kWarps * 4;
  const int64_t by_length = std::max<int64_t>(1, p.S / min_keys_per_split);
  const int64_t wave = int64_t(ctas_per_sm(dpad, t)) * std::max(1, device_info(p.q.device_id).sms);
  const int64_t want = std::max<int64_t>(1, wave / ctas);
  return int(std::clamp<int64_t>(std::min(want, by_length), 1, cuda_decode::kMaxSplits));
}

// Both kernels go out with programmatic dependent launch on sm_90+ (each starts while the
// kernel before it drains and waits on the device for its results; decode_kernel.cuh), so
// the combine kernel does not pay a launch gap after the split kernel, nor the split kernel
// after the append before it. STEELATTN_DECODE_PDL=0 turns it off (for measurements).
bool use_pdl(int device) {
  static const bool env_on = [] {
    const char* e = std::getenv("STEELATTN_DECODE_PDL");
    return !(e && std::string(e) == "0");
  }();
  return env_on && device_info(device).major >= 9;
}

template <typename Kernel>
cudaError_t launch_kernel(Kernel* fn, int64_t grid, int threads, size_t smem, cudaStream_t stream, bool pdl,
                          const DecodeParams& k) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(unsigned(grid));
  cfg.blockDim = dim3(unsigned(threads));
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, fn, k);
}

template <typename T, int kDPad, int kKeys, int kStages, bool kPaged>
Status launch_variant(const DecodeParams& k, cudaStream_t stream, int device) {
  using C = cuda_decode::Cfg<kDPad, kKeys, kStages>;
  static bool attr_set[64] = {};  // cudaFuncSetAttribute once per device
  auto* fn = cuda_decode::decode_split_kernel<T, kDPad, kKeys, kStages, kPaged>;
  if (device >= 0 && device < 64 && !attr_set[device]) {
    const cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, int(C::kSmemBytes));
    if (err != cudaSuccess) return cuda_status("decode: cudaFuncSetAttribute", err);
    attr_set[device] = true;
  }
  const bool pdl = use_pdl(device);
  const int64_t grid = int64_t(k.B) * k.Hkv * k.num_splits * k.row_groups;
  cudaError_t err = launch_kernel(fn, grid, cuda_decode::kThreads, C::kSmemBytes, stream, pdl, k);
  if (err != cudaSuccess) return cuda_status("decode split kernel launch", err);
  if (k.num_splits > 1) {
    const int64_t cells = int64_t(k.B) * k.H * k.N;
    err = launch_kernel(cuda_decode::decode_combine_kernel<T>, cells, cuda_decode::kCombineThreads, 0, stream, pdl, k);
    if (err != cudaSuccess) return cuda_status("decode combine kernel launch", err);
  }
  return Status::Ok();
}

template <typename T, int kDPad, int kKeys, int kStages>
Status launch(const DecodeParams& k, cudaStream_t stream, int device) {
  return k.block_table ? launch_variant<T, kDPad, kKeys, kStages, true>(k, stream, device)
                       : launch_variant<T, kDPad, kKeys, kStages, false>(k, stream, device);
}

template <typename T>
Status launch_dtype(const DecodeParams& k, int dpad, TileShape t, cudaStream_t stream, int device) {
  if (dpad == 64) return launch<T, 64, 32, 2>(k, stream, device);
  if (dpad == 256) return launch<T, 256, 16, 2>(k, stream, device);
  if (t.keys == 32 && t.stages == 3) return launch<T, 128, 32, 3>(k, stream, device);
  if (t.keys == 32) return launch<T, 128, 32, 2>(k, stream, device);
  if (t.stages == 3) return launch<T, 128, 16, 3>(k, stream, device);
  return launch<T, 128, 16, 2>(k, stream, device);
}

}  // namespace

bool cuda_decode_supports(const AttentionParams& p, std::string* why_not) {
  auto no = [&](std::string m) {
    if (why_not) *why_not = "cuda_decode: " + std::move(m);
    return false;
  };
  if (p.q.device != Device::cuda) return no("tensors are not on a CUDA device");
  if (p.q.dtype != DType::f16 && p.q.dtype != DType::bf16) return no("dtype must be bf16 or fp16");
  const int64_t rows = p.H / std::max<int64_t>(p.Hkv, 1) * p.N;
  if (!p.seqlens_k.present() && rows > kMaxDenseRows) {
    const bool few_heads = p.B * p.Hkv * 8 <= std::max(1, device_info(p.q.device_id).sms);
    if (rows > kMaxDenseRowsFewHeads || !few_heads)
      return no(std::to_string(rows) + " query rows per KV head (decode-shaped calls have at most " +
                std::to_string(kMaxDenseRows) + ", or " + std::to_string(kMaxDenseRowsFewHeads) +
                " when batch x KV heads <= SMs / 8)");
  }
  if (p.varlen() || p.block_mask.present() || p.bias.present() || p.attn_weights.present() || p.dropout_p > 0.0f)
    return no("no varlen, block_mask, bias, attention weights or dropout");
  if (p.D > 256 || p.Dv > 256 || p.D % 8 || p.Dv % 8) return no("head dims must be multiples of 8, at most 256");
  if (p.block_table.present() && p.block_table.stride[1] != 1 && p.block_table.shape[1] > 1)
    return no("block_table rows must be contiguous");
  if (p.B > INT32_MAX || p.H > INT32_MAX || p.N > INT32_MAX || p.S > INT32_MAX)
    return no("B, H, N and S must each fit in int32");
  for (const TensorRef* t : {&p.q, &p.k, &p.v}) {  // cp.async moves 16-byte row chunks
    int64_t stride[3];
    strides3(*t, stride);
    if ((t->stride[3] != 1 && t->shape[3] > 1) || !rows_16b_aligned(*t, stride))
      return no("q, k and v need a contiguous last dim and 16-byte aligned rows");
  }
  const cuda_device::DeviceInfo dev = device_info(p.q.device_id);
  if (dev.major < 8) return no("needs compute capability 8.0 or newer");
  const int dpad = head_dim_pad(std::max(p.D, p.Dv));
  const TileShape t = tile_shape(p);
  const size_t need = cuda_decode::smem_bytes(dpad, t.keys, t.stages);
  if (size_t(dev.smem_optin) < need)  // e.g. about 99 KB on sm_86 / sm_89, where D = 256 does not fit
    return no("needs " + std::to_string(need) + " bytes of shared memory per block at this head dim, the device has " +
              std::to_string(dev.smem_optin));
  return true;
}

size_t cuda_decode_workspace_bytes(const AttentionParams& p) {
  const int splits = num_splits(p);
  if (splits == 1) return 0;
  const size_t cells = size_t(splits) * p.B * p.H * p.N;
  return cells * (size_t(p.Dv) + 1) * sizeof(float) + 16;
}

Status cuda_decode_forward(const AttentionParams& p, void* workspace, void* stream) {
  std::string why;
  if (!cuda_decode_supports(p, &why)) return Status::NotImplemented(why);
  if (p.B == 0 || p.H == 0 || p.N == 0 || p.Dv == 0) return Status::Ok();
  DeviceGuard guard(p.q.device_id);

  DecodeParams k{};
  k.q = p.q.data;
  k.k = p.k.data;
  k.v = p.v.data;
  k.out = p.out.data;
  k.lse = p.lse.present() ? static_cast<float*>(p.lse.data) : nullptr;
  strides3(p.q, k.q_stride);
  strides3(p.k, k.k_stride);
  strides3(p.v, k.v_stride);
  strides3(p.out, k.out_stride);
  if (p.lse.present()) {
    int64_t tmp[4];
    cuda_generic::broadcast_strides(p.lse, 3, tmp);
    for (int d = 0; d < 3; ++d) k.lse_stride[d] = tmp[d];
  }
  k.seqlens_k = p.seqlens_k.present() ? static_cast<const int32_t*>(p.seqlens_k.data) : nullptr;
  if (p.block_table.present()) {  // k, v: pools viewed [num_pages, Hkv, page_size, D]
    k.block_table = static_cast<const int32_t*>(p.block_table.data);
    k.bt_stride = p.block_table.stride[0];
    k.page_size = int32_t(p.k.shape[2]);
    k.page_shift = -1;
    for (int s = 0; s < 31; ++s)
      if (int64_t(1) << s == p.k.shape[2]) k.page_shift = s;
  }
  k.kv_batch_idx = p.kv_batch_idx.present() ? static_cast<const int32_t*>(p.kv_batch_idx.data) : nullptr;
  k.B = int32_t(p.B), k.H = int32_t(p.H), k.Hkv = int32_t(p.Hkv), k.group = int32_t(p.H / p.Hkv);
  k.N = int32_t(p.N), k.S = int32_t(p.S), k.D = int32_t(p.D), k.Dv = int32_t(p.Dv);
  k.rows = k.group * k.N;
  k.row_groups = int32_t(row_groups(p));
  k.num_splits = num_splits(p);
  k.scale = float(p.scale);
  k.softcap = float(p.softcap);
  if (p.alibi_slopes.present()) {
    k.alibi = static_cast<const float*>(p.alibi_slopes.data);
    int64_t tmp[4];
    cuda_generic::broadcast_strides(p.alibi_slopes, 2, tmp);
    k.alibi_stride[0] = tmp[0], k.alibi_stride[1] = tmp[1];
  }
  if (p.bool_mask.present()) {
    k.mask = static_cast<const uint8_t*>(p.bool_mask.data);
    cuda_generic::broadcast_strides(p.bool_mask, 4, k.mask_stride);
  }
  k.diag_offset = p.diag_offset;
  k.ragged = p.seqlens_k.present();
  k.window_left = p.window_left;
  k.window_right = p.window_right;
  if (k.num_splits > 1) {
    const size_t need = cuda_decode_workspace_bytes(p);
    const TensorRef& w = p.workspace;
    const int64_t have = w.present() ? w.shape[0] * dtype_size(w.dtype) : 0;
    if (!w.present() || have < int64_t(need))
      return Status::Invalid("workspace: the decode kernel needs " + std::to_string(need) + " bytes");
    const uintptr_t base = (reinterpret_cast<uintptr_t>(w.data) + 15) & ~uintptr_t(15);
    k.part_out = reinterpret_cast<float*>(base);
    k.part_lse = k.part_out + size_t(k.num_splits) * p.B * p.H * p.N * p.Dv;
  }
  const int dpad = head_dim_pad(std::max(p.D, p.Dv));
  const auto cu_stream = static_cast<cudaStream_t>(stream);
  const TileShape t = tile_shape(p);
  if (p.q.dtype == DType::bf16) return launch_dtype<__nv_bfloat16>(k, dpad, t, cu_stream, p.q.device_id);
  return launch_dtype<__half>(k, dpad, t, cu_stream, p.q.device_id);
}

}  // namespace steelattn
