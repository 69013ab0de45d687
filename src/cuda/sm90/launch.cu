// Host side of the sm90 forward kernel: what it supports, TMA descriptor
// construction, derived counts, and the dispatch to an instantiation.
#include <cuda.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>

#include "core/backends.h"
#include "cuda/sm90/host_tma.h"
#include "cuda/sm90/launch.h"
#include "cuda/sm90/params.h"

namespace steelattn {
namespace {

using sm90::FwdParams;
using sm90::DeviceInfo;
using sm90::device_info;
using sm90::encode_map;
using sm90::tma_compatible;

constexpr int64_t kMaxSeq = int64_t{1} << 28;  // keeps the int32 band arithmetic (params.h) exact

// K/V bytes per causal scheduling group (scheduler.h): H100 has 50 MB of L2,
// shared with the Q and O streams. Overridable for A/B test builds.
#ifndef STEELATTN_SM90_L2_GROUP_MB
#define STEELATTN_SM90_L2_GROUP_MB 32
#endif  // keeps the int32 band arithmetic (params.h) exact

// GQA-packed Q map (params.h): rank 5 over (d, seq, head-in-group, kv head,
// batch) of the same [batch, head, seq, d] view, head = kv_head * group + g,
// box (64, rows, group, 1, 1): the box lands in smem g-major, kBlockM rows of
// 128 B, exactly the layout of an unpacked Q tile.
bool encode_q_packed(CUtensorMap* map, const TensorRef& t, int group, int rows, std::string* why) {
  const int64_t hkv = t.shape[1] / group;
  cuuint64_t dims[5] = {static_cast<cuuint64_t>(t.shape[3]), static_cast<cuuint64_t>(t.shape[2]),
                        static_cast<cuuint64_t>(group), static_cast<cuuint64_t>(hkv),
                        static_cast<cuuint64_t>(t.shape[0])};
  // A size-1 dim's stride is never used; give it an encodable one.
  const int64_t unused = ((t.shape[3] * 2 + 15) / 16) * 16;
  const int64_t head = t.stride[1] * 2;  // group >= 2, so H >= 2 and tma_compatible checked it
  cuuint64_t strides[4] = {static_cast<cuuint64_t>(t.shape[2] == 1 ? unused : t.stride[2] * 2),
                           static_cast<cuuint64_t>(head),
                           static_cast<cuuint64_t>(hkv == 1 ? unused : head * group),
                           static_cast<cuuint64_t>(t.shape[0] == 1 ? unused : t.stride[0] * 2)};
  const cuuint32_t box[5] = {64, static_cast<cuuint32_t>(rows), static_cast<cuuint32_t>(group), 1, 1};
  return sm90::encode_tiled(map, t, 5, dims, strides, box, "packed q", why);
}

// GQA packing rule. Packing puts the G query heads of one KV head into one
// tile (kBlockM / G queries x G heads), so a K/V block is loaded once per
// group instead of once per query head. It only changes how full the tiles
// are: the padding efficiency (useful rows / computed rows) is
//   unpacked N / (ceil(N / 128) * 128),  packed N / (ceil(N / (128/G)) * 128/G),
// so it matters when N is small (decode: N = 1 fills 1 row of 128 unpacked,
// G of 128 packed). FA3's rule (heuristics.h): pack when the unpacked
// efficiency is below 0.9x the packed one. For prefill-sized N both are ~1 and
// the K/V block loads per group are the same count either way; measured in
// NOTES-sm90.md (v6: PackGQA). STEELATTN_SM90_PACK_GQA=0 never packs, =1 packs
// whenever eligible (A/B and test runs; read per call, a getenv is ~0.1 us).
bool pack_gqa(int64_t N, int64_t group) {
  if (group < 2 || sm90::kBlockM % group != 0) return false;
  if (const int forced = sm90::env_switch("STEELATTN_SM90_PACK_GQA"); forced >= 0) return forced == 1;
  const int64_t m = sm90::kBlockM, rows = m / group;
  const double eff_unpacked = static_cast<double>(N) / (((N + m - 1) / m) * m);
  const double eff_packed = static_cast<double>(N) / (((N + rows - 1) / rows) * rows);
  return eff_unpacked < 0.9 * eff_packed;
}

// The compiled head dim a call runs on: the smallest of 64/128/192/256 that holds
// both D and Dv. A narrower one runs zero-padded: TMA fills the columns past it
// with zeros (they add nothing to q.k and give zero O columns, which the epilogue
// does not store). Dv != D (e.g. 192/128, DeepSeek-style prefill) pads V this way.
int kernel_dim(int64_t d, int64_t dv) {
  const int64_t m = std::max(d, dv);
  return m <= 64 ? 64 : m <= 128 ? 128 : m <= 192 ? 192 : 256;
}

int block_n_for(int kd) {
  switch (kd) {
    case 64: return sm90::TileConfig<64>::kBlockN;
    case 128: return sm90::TileConfig<128>::kBlockN;
    case 192: return sm90::TileConfig<192>::kBlockN;
    default: return sm90::TileConfig<256>::kBlockN;
  }
}

}  // namespace

bool cuda_sm90_supports(const AttentionParams& p, std::string* why_not) {
  const auto fail = [&](const std::string& m) {
    if (why_not) *why_not = "sm90: " + m;
    return false;
  };
  if (p.q.device != Device::cuda) return fail("tensors are not on a CUDA device");
  const DeviceInfo dev = device_info(p.q.device_id);
  if (dev.major != 9 || dev.minor != 0) return fail("needs a compute capability 9.0 device (H100/H200)");
  if (p.q.dtype != DType::bf16 && p.q.dtype != DType::f16) return fail("dtype must be bf16 or fp16");
  if (p.varlen() && p.block_mask.present()) return fail("varlen with a block mask: not on the Hopper kernels");
  if (p.varlen() && p.num_seqs >= (int64_t{1} << 24)) return fail("varlen: at most 2^24 sequences");
  // Block masks at any block size (multiples of 16, validated before): sizes that are not
  // whole tiles run on a per-tile state the launcher derives (block_mask.h).
  if (p.seqlens_k.present()) return fail("seqlens_k (KV-cache lengths): not on the CUDA kernels yet");
  if (p.k.dtype != p.q.dtype || p.v.dtype != p.q.dtype || p.out.dtype != p.q.dtype)
    return fail("q, k, v and out must share one dtype");
  for (const int64_t d : {p.D, p.Dv})
    if (d < 64 || d > 256 || d % 8 != 0) return fail("head dims must be multiples of 8 in [64, 256]");
  if (p.bias.present()) return fail("additive bias not supported");
  if (p.bool_mask.present()) return fail("boolean mask not supported");
  if (p.dropout_p > 0.f) return fail("dropout not supported");
  if (p.attn_weights.present()) return fail("attn_weights output not supported");
  if (p.lse.present() && p.lse.dtype != DType::f32) return fail("lse must be fp32");
  if (p.alibi_slopes.present() && p.alibi_slopes.dtype != DType::f32) return fail("alibi slopes must be fp32");
  if (!(p.scale > 0.f) || !std::isfinite(p.scale)) return fail("needs a finite scale > 0");
  if (!(p.softcap >= 0.f) || !std::isfinite(p.softcap)) return fail("softcap must be finite and >= 0");
  if (p.N < 1 || p.S < 1 || p.N >= kMaxSeq || p.S >= kMaxSeq) return fail("N and S must be in [1, 2^28)");
  if (p.diag_offset <= -kMaxSeq || p.diag_offset >= kMaxSeq) return fail("|diag_offset| must be < 2^28");
  if (p.H % p.Hkv != 0) return fail("H must be a multiple of Hkv");
  const int64_t tiles = p.B * p.H * (p.varlen() ? p.N / sm90::kBlockM + p.num_seqs : (p.N + sm90::kBlockM - 1) / sm90::kBlockM);
  if (tiles >= (int64_t{1} << 31) || p.B >= (1 << 16) || p.H >= (1 << 16)) return fail("too many tiles");
  std::string why;
  if (!tma_compatible(p.q, "q", &why) || !tma_compatible(p.k, "k", &why) || !tma_compatible(p.v, "v", &why) ||
      !tma_compatible(p.out, "out", &why))
    return fail(why);
  return true;
}

size_t cuda_sm90_forward_workspace_bytes(const AttentionParams& p) {
  return sm90::block_mask_tile_bytes(p, sm90::kBlockM, block_n_for(kernel_dim(p.D, p.Dv)));
}

Status cuda_sm90_forward(const AttentionParams& p, void* workspace, void* stream) {
  std::string why;
  if (!cuda_sm90_supports(p, &why)) return Status::NotImplemented(why);

  const cuda_device::DeviceGuard device(p.q.device_id);  // before the tensor maps are encoded
  FwdParams k{};
  const int kd = kernel_dim(p.D, p.Dv);
  const int block_n = block_n_for(kd);
  const int64_t group = p.H / p.Hkv;
  // The packed map's kv-head stride is group x the head stride (TMA: < 2^40 B).
  // Block masks are per query head: their tiles are never GQA-packed.
  const bool pack = !p.block_mask.present() && !p.varlen() && pack_gqa(p.N, group) &&
                    p.q.stride[1] * 2 * group < (int64_t{1} << 40);
  const bool q_ok = pack ? encode_q_packed(&k.tma_q, p.q, static_cast<int>(group),
                                           sm90::kBlockM / static_cast<int>(group), &why)
                         : encode_map(&k.tma_q, p.q, sm90::kBlockM, &why);
  if (!q_ok || !encode_map(&k.tma_k, p.k, block_n, &why) || !encode_map(&k.tma_v, p.v, block_n, &why))
    return Status::Error("sm90: " + why);

  k.out = p.out.data;
  k.o_stride_b = p.out.stride[0];
  k.o_stride_h = p.out.stride[1];
  k.o_stride_n = p.out.stride[2];
  k.lse = p.lse.present() ? static_cast<float*>(p.lse.data) : nullptr;
  k.lse_stride_b = p.lse.stride[0];
  k.lse_stride_h = p.lse.stride[1];
  k.lse_stride_n = p.lse.stride[2];
  k.alibi = p.alibi_slopes.present() ? static_cast<const float*>(p.alibi_slopes.data) : nullptr;
  k.alibi_stride_b = p.alibi_slopes.shape[0] == 1 ? 0 : p.alibi_slopes.stride[0];
  k.alibi_stride_h = p.alibi_slopes.stride[1];
  if (Status st = sm90::block_mask_view(p, sm90::kBlockM, block_n, workspace, static_cast<cudaStream_t>(stream), &k.bm);
      !st.ok())
    return st;

  if (p.varlen()) {  // params.h: B = 1, N and S are the packed totals
    k.cu_q = static_cast<const int32_t*>(p.cu_seqlens_q.data);
    k.cu_k = static_cast<const int32_t*>(p.cu_seqlens_k.data);
    k.num_seqs = static_cast<int>(p.num_seqs);
  }
  k.B = static_cast<int>(p.B);
  k.H = static_cast<int>(p.H);
  k.N = static_cast<int>(p.N);
  k.S = static_cast<int>(p.S);
  k.group = static_cast<int>(p.H / p.Hkv);
  k.d_store = static_cast<int>(p.Dv);

  constexpr float kLog2e = 1.4426950408889634f;
  const bool softcap = p.softcap > 0.f;
  k.scale = p.scale;
  k.softcap = p.softcap;
  k.softcap_inv = softcap ? p.scale / p.softcap : 0.f;
  // Softcap and ALiBi produce true scores; the plain path folds scale into the exponent.
  k.log2_factor = (softcap || k.alibi) ? kLog2e : p.scale * kLog2e;

  const auto clamp_window = [](int64_t w) {
    return static_cast<int>(w < 0 ? sm90::kUnbounded : std::min<int64_t>(w, sm90::kUnbounded));
  };
  k.diag_offset = static_cast<int>(p.diag_offset);
  k.window_left = clamp_window(p.window_left);
  k.window_right = clamp_window(p.window_right);
  const bool band = p.window_left >= 0 || p.window_right >= 0;

  // O staged in smem and stored by TMA: dense, unpacked tiles (varlen rows past a sequence
  // belong to the next one), in the kernels that have a buffer for it (params.h stages_o:
  // the Q buffer with two Q stages, D128; their own at D64). STEELATTN_SM90_O_TMA=0 selects
  // the register stores, the reference the tests compare against (a query tile's fixed
  // cost 16.9 -> 11.0 ns at D128, NOTES.md session 6; 10.8 -> 8.6 ns at D64, session 7).
  const bool staged = kd == 64 ? sm90::stages_o<64>(band) : kd == 128 ? sm90::stages_o<128>(band)
                                : kd == 192 ? sm90::stages_o<192>(band) : sm90::stages_o<256>(band);
  k.o_tma = staged && sm90::env_switch("STEELATTN_SM90_O_TMA") != 0 && !pack && !p.varlen() &&
            encode_map(&k.tma_o, p.out, 64, nullptr);
  // Causal-like (right side bounded): later query blocks see more keys.
  k.heavy_first = band && p.window_right >= 0 && !p.varlen();  // (varlen tiles are virtual blocks)

  // Tiles: (b, query head, 128 queries), or packed (b, kv head, 128/G queries).
  const int64_t tile_heads = pack ? p.Hkv : p.H;
  const int64_t tile_rows = pack ? sm90::kBlockM / group : sm90::kBlockM;
  k.tile_heads = static_cast<int>(tile_heads);
  k.pack_rows = pack ? static_cast<int>(tile_rows) : 0;
  k.pack_shift = 0;
  while (pack && (1 << k.pack_shift) < k.pack_rows) ++k.pack_shift;

  // L2 grouping for the causal order. Heads of one GQA group share K/V
  // (unpacked: K/V bytes per query head; packed: per KV head).
  const int64_t kv_bytes_per_head =
      std::max<int64_t>(1, 2 * p.S * p.D * 2 / (pack ? 1 : std::max<int64_t>(1, group)));
  k.group_heads = static_cast<int>(
      std::clamp<int64_t>((int64_t{STEELATTN_SM90_L2_GROUP_MB} << 20) / kv_bytes_per_head, 1, p.B * tile_heads));
  static std::atomic<uint32_t> launches{0};
  k.sched_slot = static_cast<int>(launches.fetch_add(1, std::memory_order_relaxed) % sm90::kSchedSlots);
  // Varlen: virtual query blocks (varlen.h), an upper bound known without the lengths.
  k.num_m_blocks = p.varlen() ? static_cast<int>(p.N / sm90::kBlockM + p.num_seqs)
                              : static_cast<int>((p.N + tile_rows - 1) / tile_rows);
  k.num_tiles = static_cast<int>(p.B * tile_heads * k.num_m_blocks);
  const int grid = std::min(k.num_tiles, device_info(p.q.device_id).sms);

  const sm90::LaunchVariant variant{band, softcap, pack, p.block_mask.present(), p.varlen()};
  const auto s = static_cast<cudaStream_t>(stream);
  cudaError_t err = cudaErrorInvalidValue;
  const bool bf16 = p.q.dtype == DType::bf16;
  switch (kd) {
    case 64:
      err = bf16 ? sm90::launch_fwd<64, __nv_bfloat16>(k, variant, grid, s)
                 : sm90::launch_fwd<64, __half>(k, variant, grid, s);
      break;
    case 128:
      err = bf16 ? sm90::launch_fwd<128, __nv_bfloat16>(k, variant, grid, s)
                 : sm90::launch_fwd<128, __half>(k, variant, grid, s);
      break;
    case 192:
      err = bf16 ? sm90::launch_fwd<192, __nv_bfloat16>(k, variant, grid, s)
                 : sm90::launch_fwd<192, __half>(k, variant, grid, s);
      break;
    case 256:
      err = bf16 ? sm90::launch_fwd<256, __nv_bfloat16>(k, variant, grid, s)
                 : sm90::launch_fwd<256, __half>(k, variant, grid, s);
      break;
  }
  if (err != cudaSuccess) return Status::Error(std::string("sm90: launch failed: ") + cudaGetErrorString(err));
  return Status::Ok();
}

}  // namespace steelattn
