// Host side of the sm90 backward: what it supports, which kernel serves a head
// dim, the workspace layout, the preprocess kernel (lse2 = lse*log2e, dsum =
// rowsum(dO*O) - dlse), the main kernel launch (bwd_kernel.h for head dims up to
// 128, bwd_wide_kernel.h for 192 and 256) and the postprocess kernel (dq = scale *
// dq_acc in the output dtype and strides).
#include <cuda.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>

#include "cuda/sm90/bwd_api.h"
#include "cuda/sm90/bwd_common.h"  // pack2, unpack2
#include "cuda/sm90/bwd_launch.h"
#include "cuda/sm90/host_tma.h"
#include "cuda/sm90/params.h"  // kUnbounded
#include "cuda/sm90/varlen.h"  // virtual_block_seq

namespace steelattn {
namespace {

using sm90::BwdParams;

constexpr int64_t kMaxSeq = int64_t{1} << 28;
constexpr int64_t kRowPad = 128;  // workspace rows per (b, h) are padded to a multiple of every BM

bool bwd_is_sm90(int dev) {
  const sm90::DeviceInfo d = sm90::device_info(dev);
  return d.major == 9 && d.minor == 0;
}

int64_t row_pad(int64_t n) { return (n + kRowPad - 1) / kRowPad * kRowPad; }

// Calls the 80-row step can serve (sm90::kBwdRows80M): dense D128 (D and Dv in (96, 128]),
// not causal, no window, no softcap, not deterministic.
bool rows80_eligible(const AttentionParams& p) {
  const int64_t d = std::max(p.D, p.Dv);
  return d > 96 && d <= 128 && !p.varlen() && !p.block_mask.present() && !p.deterministic && p.softcap == 0.0 &&
         p.window_left < 0 && p.window_right < 0;
}

// Whether this call runs on 80-row steps: eligible, unless STEELATTN_SM90_BWD_ROWS80=0 (the
// 64-row step, for measurements; read per call, so tests flip it). H200, main kernel, two
// rounds: D128 N16k full 10065 -> 9613 us, N4k 2674 -> 2640, N1k 724 -> 725 (NOTES-sm90-bwd.md,
// session 11).
bool use_rows80(const AttentionParams& p) {
  return rows80_eligible(p) && sm90::env_switch("STEELATTN_SM90_BWD_ROWS80") != 0;
}

// Workspace rows per (b, h): the padded rows, or for varlen the virtual query rows
// (bwd_params.h: sequence i from (cu_q[i] / 128 + i) * 128). Calls the 80-row step can
// serve pad to a multiple of 640 (80 and 128: the preprocess works in 128-row blocks)
// whichever step runs, so the size never depends on the environment.
int64_t ws_rows(const AttentionParams& p) {
  if (p.varlen()) return (p.N / kRowPad + p.num_seqs) * kRowPad;
  if (rows80_eligible(p)) return (p.N + 639) / 640 * 640;
  return row_pad(p.N);
}

// ---- preprocess / postprocess kernels ---------------------------------------
struct PrePostParams {
  const void* out;
  int64_t o_sb, o_sh, o_sn;
  const void* dout;
  int64_t do_sb, do_sh, do_sn;
  const float* lse;
  int64_t l_sb, l_sh, l_sn;
  const float* dlse;
  int64_t dl_sb, dl_sh, dl_sn;
  float* lse2;
  float* dsum;
  float* dq_acc;  // zeroed by the preprocess, read by the postprocess
  int* dq_sem;    // the deterministic kernels' dQ counters, zeroed by the preprocess, or null
  void* dq;
  int64_t dq_sb, dq_sh, dq_sn;
  int B, H, N, D, Dv, n_pad, BM;
  int KD;  // the kernel's head dim: columns of a dq_acc row
  const int32_t* cu_q;  // varlen: workspace rows are virtual query rows (ws_rows), else null
  int num_seqs;
  float scale;
  // Varlen (STEELATTN_SM90_VARLEN_ROW_TABLE=0 turns it off): per virtual query block of
  // 128 rows, (tensor row - workspace row, end of its sequence's workspace rows), written
  // by the preprocess, so the post kernel maps a row with one load instead of a binary
  // search over cu_q (~7 dependent loads before each thread's workspace read); the
  // preprocess then also leaves all-padding 64-row groups of the dQ accumulator
  // unzeroed. Else null.
  int2* row_table;
  // Varlen (STEELATTN_SM90_VARLEN_KEY_TABLE=1, prepared): the main kernel's per virtual key
  // block entry (sm90::BwdKeyBlock), written by the preprocess so a CTA of the main kernel
  // reads its sequence with one load instead of a binary search over cu_k before its first
  // copy. Else null.
  sm90::BwdKeyBlock* key_table;
  const int32_t* cu_k;
  int n_key_blocks;
};

// Varlen: virtual query block v's entry of PrePostParams::row_table, (q0 - start, start + n)
// for its sequence (q0 its first packed row, n its queries, start its first workspace row).
__device__ __forceinline__ int2 virtual_block_rows(const PrePostParams& p, int v) {
  const int seq = sm90::virtual_block_seq(p.cu_q, p.num_seqs, v, 128);
  const int q0 = p.cu_q[seq], start = (q0 / 128 + seq) * 128;
  return make_int2(q0 - start, start + p.cu_q[seq + 1] - q0);
}

// The 128-row workspace block holding row wi of a head, as (offset, end): its rows w < end
// are tensor rows w + offset (packed rows for varlen), the others padding (past N, or past
// their sequence's queries).
__device__ __forceinline__ int2 workspace_block_rows(const PrePostParams& p, int wi) {
  if (p.cu_q == nullptr) return make_int2(0, p.N);
  return p.row_table != nullptr ? p.row_table[wi / 128] : virtual_block_rows(p, wi / 128);
}

// T threads per workspace row (b, h, i < n_pad), 8 elements (16 bytes) of O and dO
// each (T x 8 >= Dv: one pass): lse2, dsum, and the row's share of the zeroed dQ
// accumulator (the memset this replaces was a separate pass over the same bytes). One
// warp per row left most lanes idle at D64 (158 us against ~1 ms for the main kernel at
// N = 1k). R rows per thread group, 256 / T rows apart, all loads before any math
// (R = 4: a CTA's R x 256 / T rows lie in one 128-row block, so a varlen call pays the
// binary search over cu_q once per R rows, and a thread has R x 32 bytes of O / dO in
// flight; against R = 1 the varlen bench step went 0.683 -> 0.665 ms, dense cells unchanged,
// NOTES-sm90-bwd.md session 11).
template <class Elem, int T, int R>
__global__ void __launch_bounds__(256) bwd_pre_kernel(const PrePostParams p) {
  constexpr int kRowsPerPass = 256 / T;
  static_assert(128 % (kRowsPerPass * R) == 0, "a CTA's rows lie in one 128-row block");
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerPass * R + threadIdx.x / T;
  const int sub = threadIdx.x % T;
  // The grid covers the rows exactly (n_pad is a multiple of 128, kRowsPerPass x R divides
  // it), so every lane reaches the shuffles below.
  const int64_t bh = row0 / p.n_pad;
  const int b = static_cast<int>(bh / p.H), h = static_cast<int>(bh % p.H);
  const int wi0 = static_cast<int>(row0 - bh * p.n_pad);
  // Tensor rows: workspace row w < r.y is tensor row w + r.x. Varlen: mapped from cu_q, not
  // through the row table being written below (other blocks' entries may not be there yet).
  int2 r = make_int2(0, p.N);
  if (p.cu_q != nullptr) r = virtual_block_rows(p, wi0 / 128);
  if (p.key_table != nullptr) {  // a grid-stride loop: the grid may have fewer threads than key blocks
    for (int v = blockIdx.x * blockDim.x + threadIdx.x; v < p.n_key_blocks; v += gridDim.x * blockDim.x)
      p.key_table[v] = sm90::find_key_block(p.cu_q, p.cu_k, p.num_seqs, v);
  }
  float lse[R], dlse[R];
  uint4 o[R], g[R];
#pragma unroll
  for (int k = 0; k < R; ++k) {
    const int64_t row = row0 + k * kRowsPerPass;
    const int wi = wi0 + k * kRowsPerPass;
    if (p.dq_sem != nullptr && wi % p.BM == 0 && sub < 2)  // the query block's two counters, by its first row
      p.dq_sem[(bh * (p.n_pad / p.BM) + wi / p.BM) * 2 + sub] = 0;
    if (p.row_table != nullptr && bh == 0 && wi % 128 == 0 && sub == 0)  // heads share it: head 0 writes
      p.row_table[wi / 128] = r;
    const int ti = wi < r.y ? wi + r.x : -1;  // the tensor row (-1: padding)
    // With the row table (varlen) the accumulator of a 64-row group that is all padding is
    // not zeroed: the main kernel adds exact zeros there (lse2 = +inf, dsum = 0) and
    // nothing reads it back. Whole groups only: a group's 64 x KD floats are one region in
    // the kernel's interleaved order (bwd_dq_block_offset), so the share zeroed by row
    // `row` holds pieces of the group's other rows. A sequence's real rows are a prefix of
    // its last block: the group is padding when its first row is.
    if ((wi & ~63) < r.y || p.row_table == nullptr) {
      float4* zero = reinterpret_cast<float4*>(p.dq_acc + row * p.KD);
      for (int c = sub; c < p.KD / 4; c += T) zero[c] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    // lse and dlse first, then 16-byte loads of O and dO (out and dout passed the TMA
    // stride checks: 16-byte aligned rows).
    lse[k] = -INFINITY, dlse[k] = 0.f;
    o[k] = g[k] = make_uint4(0, 0, 0, 0);
    if (ti >= 0) {
      if (sub == 0) {
        lse[k] = p.lse[b * p.l_sb + h * p.l_sh + ti * p.l_sn];
        if (p.dlse) dlse[k] = p.dlse[b * p.dl_sb + h * p.dl_sh + ti * p.dl_sn];
      }
      if (8 * sub < p.Dv) {  // Dv is a multiple of 8, at most 8 x T
        o[k] = *reinterpret_cast<const uint4*>(static_cast<const Elem*>(p.out) + b * p.o_sb + h * p.o_sh +
                                               ti * p.o_sn + 8 * sub);
        g[k] = *reinterpret_cast<const uint4*>(static_cast<const Elem*>(p.dout) + b * p.do_sb + h * p.do_sh +
                                               ti * p.do_sn + 8 * sub);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < R; ++k) {
    float acc = 0.f;  // zeros for padding rows and columns past Dv
    const uint32_t* o2 = reinterpret_cast<const uint32_t*>(&o[k]);
    const uint32_t* g2 = reinterpret_cast<const uint32_t*>(&g[k]);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 a = sm90::unpack2<Elem>(o2[e]), d = sm90::unpack2<Elem>(g2[e]);
      acc = fmaf(a.x, d.x, fmaf(a.y, d.y, acc));
    }
#pragma unroll
    for (int m = T / 2; m > 0; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
    if (sub == 0) {
      const int64_t row = row0 + k * kRowsPerPass;
      const bool real = wi0 + k * kRowsPerPass < r.y;
      // A row that saw no key (lse = -inf) has P = 0: +inf makes exp2(x - lse2) = 0.
      p.lse2[row] = !real || lse[k] == -INFINITY ? INFINITY : lse[k] * 1.4426950408889634f;
      p.dsum[row] = real ? acc - dlse[k] : 0.f;
    }
  }
}

// dq[b, h, i, d] = scale * dq_acc, one CTA per 64-row half of a query block. The CTA
// reads the half's groups in the workspace's order (bwd_dq_block_offset: a float4 holds
// rows r and r + 8, columns c and c + 1; a warp load is 512 contiguous bytes, all of a
// thread's loads out before any use), converts them into a row-major tile in shared
// memory, and writes each row as 16-byte pieces, so a warp store covers whole 128-byte
// lines. Storing the 4-byte pairs straight from the groups (the kernel before this one)
// split every warp store into ~5 L2 requests of one half-written sector each: ncu at
// B16 H16 N1k D128, 5.0M write requests for 67 MB, DRAM at 43% of peak, 90.7 us.
// Padding rows (past N, or past a sequence in its last virtual block: ~30% of the rows
// of the H200 varlen bench) are neither read nor written.
constexpr int kPostMaxHalfCols = 128;  // D 256 at 64-row steps: 64 x 128 floats a half
constexpr int kPostThreads = 256;

// The convert kernels' last pass: `live` rows of a row-major tile (row stride ld) holding dq
// columns [d0, d0 + cols) of head bh, written from tensor row `first` on as 16-byte pieces
// (a warp store covers whole 128-byte lines); zero-padded columns (>= D) are skipped.
template <class Elem>
__device__ __forceinline__ void store_dq_tile(const PrePostParams& p, int64_t bh, const Elem* tile, int ld, int live,
                                              int cols, int d0, int64_t first) {
  const int b = static_cast<int>(bh / p.H), h = static_cast<int>(bh % p.H);
  Elem* dq = static_cast<Elem*>(p.dq) + b * p.dq_sb + h * p.dq_sh;
  const int chunks = cols / 8;  // D is a multiple of 8
  for (int c = threadIdx.x; c < live * chunks; c += kPostThreads) {
    const int row = c / chunks, d = d0 + (c - row * chunks) * 8;
    if (d >= p.D) continue;
    *reinterpret_cast<uint4*>(dq + (first + row) * p.dq_sn + d) = *reinterpret_cast<const uint4*>(tile + row * ld + d - d0);
  }
}

template <class Elem>
__global__ void __launch_bounds__(kPostThreads) bwd_post_kernel(const PrePostParams p) {
  constexpr int kMaxGroups = 16 * kPostMaxHalfCols / kPostThreads;  // per thread
  __shared__ alignas(16) Elem tile[64 * (kPostMaxHalfCols + 8)];  // +16 bytes a row: no bank conflicts
  const int half_cols = p.BM == 128 ? p.KD : p.KD / 2;
  const int ld = half_cols + 8;
  const int groups_per_half = 16 * half_cols;  // 64 rows x half_cols floats / 4
  const int64_t half = blockIdx.x;              // ((bh * m_blocks + mb) * 2 + wg)
  const int wg = static_cast<int>(half & 1);
  const int m_blocks = p.n_pad / p.BM;
  const int64_t bh = (half >> 1) / m_blocks;
  const int mb = static_cast<int>((half >> 1) - bh * m_blocks);
  const int w0 = mb * p.BM + (p.BM == 128 ? wg * 64 : 0);  // the half's first workspace row
  const int d0 = p.BM == 128 ? 0 : wg * half_cols;          // and first column
  // The half's 64 rows lie in one 128-row block (one sequence): rows [0, live) are tensor rows.
  const int2 r = workspace_block_rows(p, w0);
  const int live = min(64, max(0, r.y - w0));
  if (live == 0 || d0 >= p.D) return;  // CTA-uniform

  const float4* src = reinterpret_cast<const float4*>(p.dq_acc) + half * groups_per_half;
  float4 v[kMaxGroups];
#pragma unroll
  for (int j = 0; j < kMaxGroups; ++j) {
    const int u = j * kPostThreads + static_cast<int>(threadIdx.x);
    int row, col;
    sm90::bwd_dq_group_coords(u, row, col);
    if (u < groups_per_half && row < live) v[j] = src[u];
  }
#pragma unroll
  for (int j = 0; j < kMaxGroups; ++j) {
    const int u = j * kPostThreads + static_cast<int>(threadIdx.x);
    int row, col;
    sm90::bwd_dq_group_coords(u, row, col);
    if (u < groups_per_half && row < live) {
      *reinterpret_cast<uint32_t*>(tile + row * ld + col) = sm90::pack2<Elem>(v[j].x * p.scale, v[j].y * p.scale);
      if (row + 8 < live)
        *reinterpret_cast<uint32_t*>(tile + (row + 8) * ld + col) =
            sm90::pack2<Elem>(v[j].z * p.scale, v[j].w * p.scale);
    }
  }
  __syncthreads();
  store_dq_tile(p, bh, tile, ld, live, half_cols, d0, static_cast<int64_t>(w0) + r.x);
}

// The 80-row step's dQ accumulator (bwd_kernel.h, Rows80): per query block of 80 rows, two
// blocks of dQ^T (64 of D x 80 queries each, in the wgmma accumulator's order: a float4
// holds (d, q), (d, q + 1), (d + 8, q), (d + 8, q + 1)). One CTA per query block reads both
// (each warp load 512 contiguous bytes), transposes them into a row-major [80][D] tile in
// shared memory and writes 16-byte row pieces (store_dq_tile). Dense calls only.
template <class Elem>
__global__ void __launch_bounds__(kPostThreads) bwd_post_rows80_kernel(const PrePostParams p) {
  constexpr int BM = sm90::kBwdRows80M, KD = 128, ld = KD + 8;
  constexpr int kGroups = 2 * 64 * BM / 4;  // float4 groups of the query block
  __shared__ alignas(16) Elem tile[BM * ld];
  const int m_blocks = p.n_pad / BM;
  const int64_t bh = blockIdx.x / m_blocks;
  const int w0 = static_cast<int>(blockIdx.x - bh * m_blocks) * BM;
  const int live = min(BM, p.N - w0);
  if (live <= 0) return;  // CTA-uniform
  const float4* src = reinterpret_cast<const float4*>(p.dq_acc) + static_cast<int64_t>(blockIdx.x) * kGroups;
  float4 v[kGroups / kPostThreads];
#pragma unroll
  for (int j = 0; j < kGroups / kPostThreads; ++j) v[j] = src[j * kPostThreads + threadIdx.x];
#pragma unroll
  for (int j = 0; j < kGroups / kPostThreads; ++j) {
    const int u = j * kPostThreads + static_cast<int>(threadIdx.x);
    const int wg = u / (kGroups / 2);
    int d, q;
    sm90::bwd_dq_group_coords(u % (kGroups / 2), d, q);  // (row, col) of dQ^T
    d += wg * 64;
    // pack2 rounds as the other kernels do; each half goes to its own (query, d)
    const uint32_t a = sm90::pack2<Elem>(v[j].x * p.scale, v[j].y * p.scale);
    const uint32_t c = sm90::pack2<Elem>(v[j].z * p.scale, v[j].w * p.scale);
    uint16_t* t = reinterpret_cast<uint16_t*>(tile + q * ld + d);
    t[0] = static_cast<uint16_t>(a), t[ld] = static_cast<uint16_t>(a >> 16);
    t[8] = static_cast<uint16_t>(c), t[ld + 8] = static_cast<uint16_t>(c >> 16);
  }
  __syncthreads();
  store_dq_tile(p, bh, tile, ld, live, KD, 0, w0);
}

// The kernel a (D, Dv) pair runs on: the narrow kernel at 64, 96 or 128, the wide
// one at (192, 192), (256, 256) or (192, 128) (DeepSeek-style prefill). A head dim
// between those runs zero-padded on the next wider one, as the forward does: TMA
// reads zeros past the tensor's columns, which add nothing to any product, and the
// stores stop at the real width.
struct BwdKernelDims {
  int kd, kdv;
  bool wide;
  int block_m;   // query rows per step (the dQ workspace's block rows)
  int box_cols;  // TMA box width = the kernel's column block (64, 32 or 16: 128B, 64B, 32B swizzle)
};

BwdKernelDims bwd_kernel_dims(int64_t D, int64_t Dv) {
  const int64_t d = std::max(D, Dv);
  if (d <= 64) return {64, 64, false, sm90::BwdTile<64>::kBlockM, 64};
  if (d <= 96) return {96, 96, false, sm90::BwdTile<96>::kBlockM, 16};
  if (d <= 128) return {128, 128, false, sm90::BwdTile<128>::kBlockM, 64};
  if (d <= 192)
    return Dv <= 128 ? BwdKernelDims{192, 128, true, 64, sm90::BwdWideTile<192, 128>::CB}
                     : BwdKernelDims{192, 192, true, 64, sm90::BwdWideTile<192, 192>::CB};
  return {256, 256, true, 64, sm90::BwdWideTile<256, 256>::CB};
}

}  // namespace

bool cuda_sm90_backward_supports(const AttentionParams& p, std::string* why_not) {
  const auto fail = [&](const std::string& m) {
    if (why_not) *why_not = "sm90 backward: " + m;
    return false;
  };
  if (p.q.device != Device::cuda) return fail("tensors are not on a CUDA device");
  if (!bwd_is_sm90(p.q.device_id)) return fail("needs a compute capability 9.0 device (H100/H200)");
  if (p.q.dtype != DType::bf16 && p.q.dtype != DType::f16) return fail("dtype must be bf16 or fp16");
  if (p.varlen()) {
    if (bwd_kernel_dims(p.D, p.Dv).wide) return fail("varlen: head dims above 128 are not on the Hopper backward yet");
    if (p.deterministic) return fail("varlen: the Hopper varlen backward is not deterministic");
    if (p.block_mask.present()) return fail("varlen with a block mask: not on the Hopper backward");
    if (p.num_seqs >= (int64_t{1} << 24)) return fail("varlen: at most 2^24 sequences");
  }
  if (p.block_mask.present()) {
    // The narrow kernel's Sparse variants, not deterministic. Block sizes that are not whole
    // steps run on a per-step state the launcher derives (block_mask.h).
    const BwdKernelDims kd = bwd_kernel_dims(p.D, p.Dv);
    if (kd.wide) return fail("block_mask: head dims above 128 are not on the block-sparse backward yet");
    if (p.deterministic) return fail("block_mask: the block-sparse backward is not deterministic");
  }
  if (p.seqlens_k.present()) return fail("seqlens_k (KV-cache lengths): not on the CUDA kernels yet");
  for (const TensorRef* t : {&p.k, &p.v, &p.out, &p.dout, &p.dq, &p.dk, &p.dv})
    if (t->dtype != p.q.dtype) return fail("q, k, v, out, dout, dq, dk, dv must share one dtype");
  if (!p.dout.present() || !p.dq.present() || !p.dk.present() || !p.dv.present())
    return fail("needs dout, dq, dk and dv");
  for (const int64_t d : {p.D, p.Dv})
    if (d < 64 || d > 256 || d % 8 != 0) return fail("head dims must be multiples of 8 in [64, 256]");
  if (p.bias.present()) return fail("additive bias not supported");
  if (p.bool_mask.present()) return fail("boolean mask not supported");
  if (p.dropout_p > 0.f) return fail("dropout not supported");
  if (p.dbias.present()) return fail("dbias not supported");
  if (p.attn_weights.present()) return fail("attn_weights output not supported");
  if (!p.lse.present() || p.lse.dtype != DType::f32) return fail("needs the forward's lse in fp32");
  if (p.dlse.present() && p.dlse.dtype != DType::f32) return fail("dlse must be fp32");
  if (p.alibi_slopes.present() && p.alibi_slopes.dtype != DType::f32) return fail("alibi slopes must be fp32");
  if (!(p.scale > 0.0) || !std::isfinite(p.scale)) return fail("needs a finite scale > 0");
  if (!(p.softcap >= 0.0) || !std::isfinite(p.softcap)) return fail("softcap must be finite and >= 0");
  if (p.N < 1 || p.S < 1 || p.N >= kMaxSeq || p.S >= kMaxSeq) return fail("N and S must be in [1, 2^28)");
  if (p.diag_offset <= -kMaxSeq || p.diag_offset >= kMaxSeq) return fail("|diag_offset| must be < 2^28");
  if (p.H % p.Hkv != 0) return fail("H must be a multiple of Hkv");
  if (p.B >= 65536 || p.Hkv >= 65536 || p.H >= 65536) return fail("B and H must be < 65536");
  if ((p.S + 63) / 64 * p.Hkv * p.B >= (int64_t{1} << 31)) return fail("ceil(S / 64) * Hkv * B must be < 2^31");
  if (ws_rows(p) / 32 * p.H * p.B >= (int64_t{1} << 31))  // the dQ post kernel's grid: a CTA per 64 x KD/2
    return fail("ceil(N / 128) * 4 * H * B must be < 2^31");
  std::string why;
  if (!sm90::tma_compatible(p.q, "q", &why) || !sm90::tma_compatible(p.k, "k", &why) ||
      !sm90::tma_compatible(p.v, "v", &why) || !sm90::tma_compatible(p.dout, "dout", &why) ||
      !sm90::tma_compatible(p.out, "out", &why) || !sm90::tma_compatible(p.dq, "dq", &why) ||
      !sm90::tma_compatible(p.dk, "dk", &why) || !sm90::tma_compatible(p.dv, "dv", &why))
    return fail(why);
  return true;
}

namespace {
// Deterministic mode's counters: one per dQ workspace half (2 per query block).
int64_t dq_sem_count(const AttentionParams& p) {
  return p.B * p.H * (ws_rows(p) / bwd_kernel_dims(p.D, p.Dv).block_m) * 2;
}

template <class Elem>
cudaError_t launch_pre(const PrePostParams& pp, int64_t rows, cudaStream_t s) {
  constexpr int R = 4;  // rows per thread group (bwd_pre_kernel)
  // Threads per row: Dv/8 up to 16, a warp beyond (a power of two for the shuffles).
  const int t = pp.Dv <= 64 ? 8 : pp.Dv <= 128 ? 16 : 32;
  const unsigned blocks = static_cast<unsigned>(rows / (256 / t * R));  // rows: a multiple of 128
  if (t == 8)
    bwd_pre_kernel<Elem, 8, R><<<blocks, 256, 0, s>>>(pp);
  else if (t == 16)
    bwd_pre_kernel<Elem, 16, R><<<blocks, 256, 0, s>>>(pp);
  else
    bwd_pre_kernel<Elem, 32, R><<<blocks, 256, 0, s>>>(pp);
  return cudaGetLastError();
}

template <class Elem>
cudaError_t launch_main(const BwdParams& k, const BwdKernelDims& kd, bool band, bool softcap, bool det,
                        cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>(int64_t{k.n_blocks} * k.Hkv * k.B));  // bwd_tile maps it
  if (k.cu_q != nullptr) {  // narrow head dims only (cuda_sm90_backward_supports)
    if (kd.kd == 64) return sm90::launch_bwd_varlen<64, Elem>(k, band, softcap, grid, s);
    if (kd.kd == 96) return sm90::launch_bwd_varlen<96, Elem>(k, band, softcap, grid, s);
    return sm90::launch_bwd_varlen<128, Elem>(k, band, softcap, grid, s);
  }
  if (k.bm.mask != nullptr) {  // narrow head dims only (cuda_sm90_backward_supports)
    if (kd.kd == 64) return sm90::launch_bwd_sparse<64, Elem>(k, band, softcap, grid, s);
    if (kd.kd == 96) return sm90::launch_bwd_sparse<96, Elem>(k, band, softcap, grid, s);
    return sm90::launch_bwd_sparse<128, Elem>(k, band, softcap, grid, s);
  }
  if (kd.kd == 64) return sm90::launch_bwd<64, Elem>(k, band, softcap, det, grid, s);
  if (kd.kd == 96) return sm90::launch_bwd<96, Elem>(k, band, softcap, det, grid, s);
  if (kd.kd == 128) return sm90::launch_bwd<128, Elem>(k, band, softcap, det, grid, s);
  if (kd.kd == 256) return sm90::launch_bwd_wide<256, 256, Elem>(k, grid, s);
  if (kd.kdv == 128) return sm90::launch_bwd_wide<192, 128, Elem>(k, grid, s);
  return sm90::launch_bwd_wide<192, 192, Elem>(k, grid, s);
}
}  // namespace

// (batch, KV head) pairs per launch-order group (sm90::bwd_tile): about one wave of CTAs
// per group. Causal calls then end each group, and the grid, on short key blocks; a
// long sequence (as many key blocks as SMs) keeps one head per group, whose Q/dO and dQ
// accumulator stay in L2 while all its key blocks run (groups of 4 heads lost 8% at
// D128 N16k full). Measured on the H200, NOTES-sm90-bwd.md session 4.
// STEELATTN_BWD_GROUP overrides it (for measurements).
static int bwd_bh_group(const AttentionParams& p, int n_blocks) {
  const int64_t bh = p.Hkv * p.B;
  if (const char* e = std::getenv("STEELATTN_BWD_GROUP")) {
    const int64_t g = std::atoll(e);
    if (g > 0) return static_cast<int>(std::min(g, bh));
  }
  const int64_t sms = std::max(1, sm90::device_info(p.q.device_id).sms);
  return static_cast<int>(std::clamp<int64_t>(sms / std::max(1, n_blocks), 1, bh));
}

// Varlen: the post kernel's row table (PrePostParams::row_table), one int2 per virtual query block.
static int64_t row_table_count(const AttentionParams& p) { return p.varlen() ? ws_rows(p) / kRowPad : 0; }
// Varlen: the main kernel's key-block table (PrePostParams::key_table), one entry per CTA.
static int64_t key_table_count(const AttentionParams& p) {
  return p.varlen() ? p.S / sm90::kBwdBlockN + p.num_seqs : 0;
}

// Workspace: lse2 [rows] | dsum [rows] | dQ accumulator [rows * KD] | dQ counters [dq_sem_count]
// | (8-byte aligned) varlen row table [row_table_count]
// | (16-byte aligned) varlen key-block table [key_table_count] (sized whether or not
//   STEELATTN_SM90_VARLEN_KEY_TABLE turns it on)
// | (16-byte aligned) a block mask's per-step state, when its block sizes are not whole steps
// | (16-byte aligned) the block mask's column copy (block_mask_columns; sized whether or not
//   STEELATTN_SM90_BWD_MASK_COLUMNS=0 turns it off, so the size never depends on the environment).
static size_t bwd_row_table_offset(const AttentionParams& p) {
  const int64_t rows = p.B * p.H * ws_rows(p);
  const size_t bytes = static_cast<size_t>(rows) * static_cast<size_t>(2 + bwd_kernel_dims(p.D, p.Dv).kd) *
                           sizeof(float) +
                       static_cast<size_t>(dq_sem_count(p)) * sizeof(int);
  return (bytes + 7) / 8 * 8;
}
static size_t bwd_key_table_offset(const AttentionParams& p) {
  const size_t bytes = bwd_row_table_offset(p) + static_cast<size_t>(row_table_count(p)) * sizeof(int2);
  return (bytes + 15) / 16 * 16;
}
static size_t bwd_block_mask_offset(const AttentionParams& p) {
  return bwd_key_table_offset(p) + static_cast<size_t>(key_table_count(p)) * sizeof(sm90::BwdKeyBlock);
}

static size_t bwd_mask_columns_offset(const AttentionParams& p) {
  const BwdKernelDims kd = bwd_kernel_dims(p.D, p.Dv);
  return bwd_block_mask_offset(p) + sm90::block_mask_tile_bytes(p, kd.block_m, kd.wide ? 64 : sm90::kBwdBlockN);
}

size_t cuda_sm90_backward_workspace_bytes(const AttentionParams& p) {
  const BwdKernelDims kd = bwd_kernel_dims(p.D, p.Dv);
  return bwd_mask_columns_offset(p) + sm90::block_mask_columns_bytes(p, kd.block_m, kd.wide ? 64 : sm90::kBwdBlockN);
}

Status cuda_sm90_backward(const AttentionParams& p, void* workspace, void* stream) {
  std::string why;
  if (!cuda_sm90_backward_supports(p, &why)) return Status::NotImplemented(why);
  if (workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % 16 != 0)
    return Status::Invalid("sm90 backward: workspace must be a 16-byte aligned device buffer");
  const cuda_device::DeviceGuard device(p.q.device_id);  // before the tensor maps are encoded
  const BwdKernelDims kd = bwd_kernel_dims(p.D, p.Dv);
  const bool rows80 = use_rows80(p);
  const int BM = rows80 ? sm90::kBwdRows80M : kd.block_m;
  const int BN = kd.wide ? 64 : sm90::kBwdBlockN;
  const int box_cols = kd.box_cols;
  const int64_t n_pad = ws_rows(p);
  const int64_t rows = p.B * p.H * n_pad;
  float* lse2 = static_cast<float*>(workspace);
  float* dsum = lse2 + rows;
  float* dq_acc = dsum + rows;
  int* dq_sem = reinterpret_cast<int*>(dq_acc + rows * kd.kd);

  BwdParams k{};
  if (!sm90::encode_map(&k.tma_q, p.q, BM, &why, box_cols) || !sm90::encode_map(&k.tma_do, p.dout, BM, &why, box_cols) ||
      !sm90::encode_map(&k.tma_k, p.k, BN, &why, box_cols) || !sm90::encode_map(&k.tma_v, p.v, BN, &why, box_cols))
    return Status::Error("sm90 backward: " + why);
  k.lse2 = lse2;
  k.dsum = dsum;
  k.dq_acc = dq_acc;
  k.dq_sem = dq_sem;
  k.dk = p.dk.data;
  k.dk_sb = p.dk.stride[0];
  k.dk_sh = p.dk.stride[1];
  k.dk_sn = p.dk.stride[2];
  k.dv = p.dv.data;
  k.dv_sb = p.dv.stride[0];
  k.dv_sh = p.dv.stride[1];
  k.dv_sn = p.dv.stride[2];
  // dK / dV out by bulk copies of staged rows (dk and dv passed tma_compatible in
  // cuda_sm90_backward_supports, so their rows are 16-byte aligned), or from registers:
  // STEELATTN_SM90_DKV_BULK=0, which the tests use to compare the two (narrow and wide
  // kernels alike).
  k.dkv_bulk = sm90::env_switch("STEELATTN_SM90_DKV_BULK") != 0;
  k.alibi = p.alibi_slopes.present() ? static_cast<const float*>(p.alibi_slopes.data) : nullptr;
  k.alibi_sb = p.alibi_slopes.shape[0] == 1 ? 0 : p.alibi_slopes.stride[0];
  k.alibi_sh = p.alibi_slopes.stride[1];
  // (block_mask_view writes there only when the block sizes are not whole steps)
  uint8_t* bm_scratch = static_cast<uint8_t*>(workspace) + bwd_block_mask_offset(p);
  if (Status st = sm90::block_mask_view(p, BM, BN, bm_scratch, static_cast<cudaStream_t>(stream), &k.bm); !st.ok())
    return st;
  // Block-sparse: the mask with rows and columns swapped, so the producer's walk down a key
  // block's column of query blocks reads 8 entries per load (host_tma.h). That walk's first
  // leg, from the key block's first query block to its first active one, runs before the CTA
  // loads anything. H200: forward+backward 3% to 14% faster (docs/benchmarks/NOTES.md,
  // session 9); STEELATTN_SM90_BWD_MASK_COLUMNS=0 turns it off.
  if (k.bm.mask != nullptr && k.bm.sq != 1 && sm90::env_switch("STEELATTN_SM90_BWD_MASK_COLUMNS") != 0) {
    uint8_t* columns = static_cast<uint8_t*>(workspace) + bwd_mask_columns_offset(p);
    if (Status st = sm90::block_mask_columns(p, BM, BN, columns, static_cast<cudaStream_t>(stream), &k.bm); !st.ok())
      return st;
  }
  k.B = static_cast<int>(p.B);
  k.H = static_cast<int>(p.H);
  k.Hkv = static_cast<int>(p.Hkv);
  k.N = static_cast<int>(p.N);
  k.S = static_cast<int>(p.S);
  k.group = static_cast<int>(p.H / p.Hkv);
  k.n_pad = static_cast<int>(n_pad);
  k.d_store_k = static_cast<int>(p.D);
  k.d_store_v = static_cast<int>(p.Dv);
  k.deterministic = p.deterministic;
  // Varlen: virtual key blocks (bwd_params.h), a bound the host knows without the lengths.
  k.n_blocks = static_cast<int>(p.varlen() ? p.S / BN + p.num_seqs : (p.S + BN - 1) / BN);
  if (p.varlen()) {
    k.cu_q = static_cast<const int32_t*>(p.cu_seqlens_q.data);
    k.cu_k = static_cast<const int32_t*>(p.cu_seqlens_k.data);
    k.num_seqs = static_cast<int>(p.num_seqs);
  }
  k.bh_group = bwd_bh_group(p, k.n_blocks);
  k.rows80 = rows80;
  constexpr double kLog2e = 1.4426950408889634;
  const bool softcap = p.softcap > 0.0;
  k.softcap_on = softcap;
  k.scale = static_cast<float>(p.scale);
  k.scale_log2 = static_cast<float>(p.scale * kLog2e);
  k.softcap = static_cast<float>(p.softcap);
  k.cap_arg = softcap ? static_cast<float>(p.scale / p.softcap) : 0.f;
  const auto clamp_window = [](int64_t w) {
    return static_cast<int>(w < 0 ? sm90::kUnbounded : std::min<int64_t>(w, sm90::kUnbounded));
  };
  k.diag_offset = static_cast<int>(p.diag_offset);
  k.window_left = clamp_window(p.window_left);
  k.window_right = clamp_window(p.window_right);
  const bool band = p.window_left >= 0 || p.window_right >= 0;

  PrePostParams pp{};
  pp.out = p.out.data;
  pp.o_sb = p.out.stride[0];
  pp.o_sh = p.out.stride[1];
  pp.o_sn = p.out.stride[2];
  pp.dout = p.dout.data;
  pp.do_sb = p.dout.stride[0];
  pp.do_sh = p.dout.stride[1];
  pp.do_sn = p.dout.stride[2];
  pp.lse = static_cast<const float*>(p.lse.data);
  pp.l_sb = p.lse.stride[0];
  pp.l_sh = p.lse.stride[1];
  pp.l_sn = p.lse.stride[2];
  pp.dlse = p.dlse.present() ? static_cast<const float*>(p.dlse.data) : nullptr;
  pp.dl_sb = p.dlse.stride[0];
  pp.dl_sh = p.dlse.stride[1];
  pp.dl_sn = p.dlse.stride[2];
  pp.lse2 = lse2;
  pp.dsum = dsum;
  pp.dq_acc = dq_acc;
  pp.dq_sem = p.deterministic ? dq_sem : nullptr;
  pp.dq = p.dq.data;
  pp.dq_sb = p.dq.stride[0];
  pp.dq_sh = p.dq.stride[1];
  pp.dq_sn = p.dq.stride[2];
  pp.B = k.B;
  pp.H = k.H;
  pp.N = k.N;
  pp.D = static_cast<int>(p.D);
  pp.Dv = static_cast<int>(p.Dv);
  pp.n_pad = k.n_pad;
  pp.cu_q = k.cu_q;
  pp.num_seqs = k.num_seqs;
  pp.row_table = p.varlen() && sm90::env_switch("STEELATTN_SM90_VARLEN_ROW_TABLE") != 0
                     ? reinterpret_cast<int2*>(static_cast<uint8_t*>(workspace) + bwd_row_table_offset(p))
                     : nullptr;
  if (p.varlen() && sm90::env_switch("STEELATTN_SM90_VARLEN_KEY_TABLE") == 1) {
    pp.key_table = reinterpret_cast<sm90::BwdKeyBlock*>(static_cast<uint8_t*>(workspace) + bwd_key_table_offset(p));
    pp.cu_k = k.cu_k;
    pp.n_key_blocks = k.n_blocks;
    k.key_table = pp.key_table;
  }
  pp.BM = BM;
  pp.KD = kd.kd;
  pp.scale = k.scale;

  const auto s = static_cast<cudaStream_t>(stream);
  const bool bf16 = p.q.dtype == DType::bf16;
  // The dQ accumulator starts at zero, and so do the deterministic kernels' counters
  // (the preprocess writes the zeros: one launch fewer than a memset).
  cudaError_t err = bf16 ? launch_pre<__nv_bfloat16>(pp, rows, s) : launch_pre<__half>(pp, rows, s);
  if (err == cudaSuccess)
    err = bf16 ? launch_main<__nv_bfloat16>(k, kd, band, softcap, p.deterministic, s)
               : launch_main<__half>(k, kd, band, softcap, p.deterministic, s);
  if (err == cudaSuccess && rows80) {
    const unsigned post_blocks = static_cast<unsigned>(rows / sm90::kBwdRows80M);  // a CTA per query block
    if (bf16)
      bwd_post_rows80_kernel<__nv_bfloat16><<<post_blocks, kPostThreads, 0, s>>>(pp);
    else
      bwd_post_rows80_kernel<__half><<<post_blocks, kPostThreads, 0, s>>>(pp);
    err = cudaGetLastError();
  } else if (err == cudaSuccess) {
    const int64_t halves = rows / 64 * (BM == 128 ? 1 : 2);  // the whole workspace, a CTA per half
    const unsigned post_blocks = static_cast<unsigned>(halves);
    if (bf16)
      bwd_post_kernel<__nv_bfloat16><<<post_blocks, kPostThreads, 0, s>>>(pp);
    else
      bwd_post_kernel<__half><<<post_blocks, kPostThreads, 0, s>>>(pp);
    err = cudaGetLastError();
  }
  if (err != cudaSuccess)
    return Status::Error(std::string("sm90 backward: launch failed: ") + cudaGetErrorString(err));
  return Status::Ok();
}

}  // namespace steelattn
