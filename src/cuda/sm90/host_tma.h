// Host helpers shared by the sm90 forward and backward launchers: the driver's
// tensor-map encoder (reached through the runtime, so no -lcuda), cached device
// properties, the TMA stride rules, and the rank-4 map over a [B, H, seq, D] view.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda/device.h"
#include "cuda/sm90/block_mask.h"
#include "steelattn/steelattn.h"

namespace steelattn::sm90 {

// The driver's tensor-map encoder, fetched through the runtime so the library
// needs no -lcuda.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &q) !=
            cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      ptr = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

// The call's block mask for a kernel whose tiles are tile_m queries x tile_n keys
// (block_mask.h); mask = null without one. Block sizes that are not whole tiles need
// block_mask_tile_bytes(...) bytes of device scratch for the per-tile state, which a small
// kernel on `stream` fills (block_mask_tiles.cu).
size_t block_mask_tile_bytes(const AttentionParams& p, int tile_m, int tile_n);
Status block_mask_view(const AttentionParams& p, int tile_m, int tile_n, void* scratch, cudaStream_t stream,
                       BlockMaskView* view);
// The backward walks a key block's column of the mask (stride: a row) one entry per load;
// this copies the view's mask into block_mask_columns_bytes(...) bytes of scratch with rows
// and columns swapped and points the view there (sq = 1), so the walk reads 8 entries per
// load (mask_walk.h). One small kernel on `stream`.
size_t block_mask_columns_bytes(const AttentionParams& p, int tile_m, int tile_n);
Status block_mask_columns(const AttentionParams& p, int tile_m, int tile_n, void* scratch, cudaStream_t stream,
                          BlockMaskView* view);

// Device facts (cached per device) for the launchers.
using cuda_device::DeviceInfo;
using cuda_device::device_info;
using cuda_device::env_switch;

// TMA reads rows through a descriptor: base 16-byte aligned, every stride a
// nonzero multiple of 16 bytes (a broadcast, stride-0 dim cannot be encoded).
inline bool tma_compatible(const TensorRef& t, const char* name, std::string* why) {
  const auto fail = [&](const std::string& m) {
    if (why) *why = std::string(name) + ": " + m;
    return false;
  };
  if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0) return fail("data pointer not 16-byte aligned (TMA)");
  if (t.stride[3] != 1) return fail("last dim not contiguous");
  for (int d = 0; d < 3; ++d) {
    if (t.shape[d] == 1) continue;  // the stride of a size-1 dim is never used
    if (t.stride[d] <= 0) return fail("zero or negative stride in dim " + std::to_string(d) + " (TMA)");
    if ((t.stride[d] * 2) % 16 != 0)
      return fail("stride of dim " + std::to_string(d) + " not a multiple of 16 bytes (TMA)");
    if (t.stride[d] * 2 >= (int64_t{1} << 40)) return fail("stride too large for TMA");
  }
  return true;
}

// Encodes a bf16/fp16 tensor map of `rank` dims (dims / byte strides of dims 1.. /
// box innermost first) with the kernels' common options: L2 promotion 128B,
// out-of-range elements read as zeros, and a swizzle as wide as the box's inner
// extent (128 B = 64 elements, 64 B = 32, 32 B = 16). `what` names the map in errors.
inline bool encode_tiled(CUtensorMap* map, const TensorRef& t, int rank, const cuuint64_t* dims,
                         const cuuint64_t* strides, const cuuint32_t* box, const char* what, std::string* why) {
  const auto encode = tensor_map_encoder();
  if (!encode) {
    if (why) *why = "cuTensorMapEncodeTiled unavailable (driver too old)";
    return false;
  }
  const CUtensorMapDataType dt =
      t.dtype == DType::bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const cuuint32_t elem_strides[5] = {1, 1, 1, 1, 1};  // rank <= 5
  const CUtensorMapSwizzle swizzle = box[0] == 64   ? CU_TENSOR_MAP_SWIZZLE_128B
                                     : box[0] == 32 ? CU_TENSOR_MAP_SWIZZLE_64B
                                                    : CU_TENSOR_MAP_SWIZZLE_32B;
  const CUresult r = encode(map, dt, rank, t.data, dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    if (why)
      *why = std::string("cuTensorMapEncodeTiled (") + what + ") failed (" + std::to_string(static_cast<int>(r)) + ")";
    return false;
  }
  return true;
}

// Rank-4 map over (d, seq, head, batch) of a [batch, head, seq, d] view, box
// (box_cols, box_rows): box_cols 64, 32 or 16 (128B, 64B or 32B swizzle). Columns
// past the tensor's d read as zeros: that is how a narrower head dim runs on a
// wider kernel.
inline bool encode_map(CUtensorMap* map, const TensorRef& t, int box_rows, std::string* why, int box_cols = 64) {
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(t.shape[3]), static_cast<cuuint64_t>(t.shape[2]),
                              static_cast<cuuint64_t>(t.shape[1]), static_cast<cuuint64_t>(t.shape[0])};
  // Byte strides of dims 1..3 (seq, head, batch). A size-1 dim gets the
  // packed stride, which is always encodable.
  cuuint64_t strides[3];
  int64_t packed = t.shape[3] * 2;
  for (int i = 0; i < 3; ++i) {
    const int d = 2 - i;  // seq, head, batch
    const int64_t s = t.shape[d] == 1 ? ((packed + 15) / 16) * 16 : t.stride[d] * 2;
    strides[i] = static_cast<cuuint64_t>(s);
    packed = s * t.shape[d];
  }
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(box_rows), 1, 1};
  return encode_tiled(map, t, 4, dims, strides, box, "rank 4", why);
}

}  // namespace steelattn::sm90
