// Block masks for the Hopper kernels (block_mask.h): the view of a mask whose blocks are
// whole kernel tiles, and for other block sizes the per-tile state (inactive / all active /
// partly active) that the kernels walk instead, computed on the device by one small kernel
// per call (no host sync: the mask stays where it is).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "cuda/sm90/block_mask.h"
#include "cuda/sm90/host_tma.h"

namespace steelattn::sm90 {
namespace {

// This thread's element of a contiguous [B, H, X, Z] array of `total` elements (one thread
// each): its index, and (b, h, x, z); -1 for a thread past the end.
__device__ __forceinline__ int64_t thread_element(int64_t total, int H, int X, int Z, int64_t& b, int& h, int& x,
                                                  int& z) {
  int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return -1;
  const int64_t element = idx;
  z = int(idx % Z);
  idx /= Z;
  x = int(idx % X);
  idx /= X;
  h = int(idx % H);
  b = idx / H;
  return element;
}

struct TileStateArgs {
  const uint8_t* mask;  // the caller's [B, H, nq, nk] block mask
  int64_t sb, sh, sq, sk;
  int bq, bk, N, S, tile_m, tile_n;
  int Hm, MT, NT;  // tile-state map [Bm, Hm, MT, NT], contiguous
  int64_t total;
  uint8_t* out;
};

// One thread per tile: the mask blocks its rows x columns overlap (inside N x S).
__global__ void tile_state_kernel(const TileStateArgs a) {
  int64_t b;
  int h, mt, nt;
  const int64_t idx = thread_element(a.total, a.Hm, a.MT, a.NT, b, h, mt, nt);
  if (idx < 0) return;
  const int q_last = min(a.N, (mt + 1) * a.tile_m) - 1, k_last = min(a.S, (nt + 1) * a.tile_n) - 1;
  const uint8_t* base = a.mask + b * a.sb + h * a.sh;
  bool any = false, all = true;
  for (int r = mt * a.tile_m / a.bq; r <= q_last / a.bq; ++r)
    for (int c = nt * a.tile_n / a.bk; c <= k_last / a.bk; ++c) {
      const bool on = base[r * a.sq + c * a.sk] != 0;
      any |= on;
      all &= on;
    }
  a.out[idx] = any ? (all ? 1 : kTilePartial) : 0;
}

bool whole_tiles(const AttentionParams& p, int tile_m, int tile_n) {
  return p.block_q % tile_m == 0 && p.block_k % tile_n == 0;
}

// The mask's own batch / head extents (1 where it is broadcast).
int64_t mask_batches(const TensorRef& m) { return m.shape[0] == 1 || m.stride[0] == 0 ? 1 : m.shape[0]; }
int64_t mask_heads(const TensorRef& m) { return m.shape[1] == 1 || m.stride[1] == 0 ? 1 : m.shape[1]; }

int64_t tiles_of(int64_t n, int tile) { return (n + tile - 1) / tile; }

// The view's mask as [Bm, Hm, rows, cols]: the caller's mask blocks, or the tile states.
void view_extents(const AttentionParams& p, int tile_m, int tile_n, int64_t& rows, int64_t& cols) {
  const bool whole = whole_tiles(p, tile_m, tile_n);
  rows = whole ? p.block_mask.shape[2] : tiles_of(p.N, tile_m);
  cols = whole ? p.block_mask.shape[3] : tiles_of(p.S, tile_n);
}

struct ColumnsArgs {
  const uint8_t* mask;
  int64_t sb, sh, sq, sk;
  int Hm, rows, cols;
  int64_t total;
  uint8_t* out;  // [Bm, Hm, cols, rows], contiguous
};

// One thread per output byte (reads strided, writes coalesced).
__global__ void mask_columns_kernel(const ColumnsArgs a) {
  int64_t b;
  int h, c, r;
  const int64_t idx = thread_element(a.total, a.Hm, a.cols, a.rows, b, h, c, r);
  if (idx < 0) return;
  a.out[idx] = a.mask[b * a.sb + h * a.sh + r * a.sq + c * a.sk];
}

// One thread per output byte (a.total of them).
template <class Args>
Status launch_per_byte(void (*kernel)(Args), const Args& a, cudaStream_t stream, const char* what) {
  constexpr int kThreads = 256;
  kernel<<<static_cast<unsigned>((a.total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(a);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? Status::Ok() : Status::Error(std::string("sm90: ") + what + ": " + cudaGetErrorString(err));
}

}  // namespace

size_t block_mask_columns_bytes(const AttentionParams& p, int tile_m, int tile_n) {
  if (!p.block_mask.present()) return 0;
  int64_t rows, cols;
  view_extents(p, tile_m, tile_n, rows, cols);
  const int64_t cells = mask_batches(p.block_mask) * mask_heads(p.block_mask) * rows * cols;
  return static_cast<size_t>((cells + 15) / 16 * 16);
}

Status block_mask_columns(const AttentionParams& p, int tile_m, int tile_n, void* scratch, cudaStream_t stream,
                          BlockMaskView* view) {
  BlockMaskView& v = *view;
  if (v.mask == nullptr) return Status::Ok();
  if (scratch == nullptr) return Status::Invalid("sm90: the block mask's column copy needs a workspace");
  int64_t rows, cols;
  view_extents(p, tile_m, tile_n, rows, cols);
  const int64_t Bm = mask_batches(p.block_mask), Hm = mask_heads(p.block_mask);
  ColumnsArgs a{};
  a.mask = v.mask;
  a.sb = v.sb, a.sh = v.sh, a.sq = v.sq, a.sk = v.sk;
  a.Hm = static_cast<int>(Hm), a.rows = static_cast<int>(rows), a.cols = static_cast<int>(cols);
  a.total = Bm * Hm * rows * cols;
  a.out = static_cast<uint8_t*>(scratch);
  if (Status st = launch_per_byte(mask_columns_kernel, a, stream, "block-mask columns"); !st.ok()) return st;
  // Same entries, rows and columns swapped in memory: sq = 1 makes a column contiguous.
  v.mask = a.out;
  v.sb = Bm == 1 ? 0 : Hm * cols * rows;
  v.sh = Hm == 1 ? 0 : cols * rows;
  v.sq = 1;
  v.sk = rows;
  return Status::Ok();
}

size_t block_mask_tile_bytes(const AttentionParams& p, int tile_m, int tile_n) {
  if (!p.block_mask.present() || whole_tiles(p, tile_m, tile_n)) return 0;
  const int64_t cells = mask_batches(p.block_mask) * mask_heads(p.block_mask) * tiles_of(p.N, tile_m) *
                        tiles_of(p.S, tile_n);
  return static_cast<size_t>((cells + 15) / 16 * 16);
}

Status block_mask_view(const AttentionParams& p, int tile_m, int tile_n, void* scratch, cudaStream_t stream,
                       BlockMaskView* view) {
  BlockMaskView& v = *view;
  v = BlockMaskView{};
  if (!p.block_mask.present()) return Status::Ok();
  const TensorRef& m = p.block_mask;
  const int64_t sb = mask_batches(m) == 1 ? 0 : m.stride[0], sh = mask_heads(m) == 1 ? 0 : m.stride[1];
  if (whole_tiles(p, tile_m, tile_n)) {
    v.mask = static_cast<const uint8_t*>(m.data);
    v.sb = sb, v.sh = sh, v.sq = m.stride[2], v.sk = m.stride[3];
    v.q_tiles = static_cast<int>(p.block_q / tile_m);
    v.k_tiles = static_cast<int>(p.block_k / tile_n);
    return Status::Ok();
  }
  if (scratch == nullptr) return Status::Invalid("sm90: the block mask's tile state needs a workspace");
  const int64_t Bm = mask_batches(m), Hm = mask_heads(m), MT = tiles_of(p.N, tile_m), NT = tiles_of(p.S, tile_n);
  TileStateArgs a{};
  a.mask = static_cast<const uint8_t*>(m.data);
  a.sb = sb, a.sh = sh, a.sq = m.stride[2], a.sk = m.stride[3];
  a.bq = static_cast<int>(p.block_q), a.bk = static_cast<int>(p.block_k);
  a.N = static_cast<int>(p.N), a.S = static_cast<int>(p.S), a.tile_m = tile_m, a.tile_n = tile_n;
  a.Hm = static_cast<int>(Hm), a.MT = static_cast<int>(MT), a.NT = static_cast<int>(NT);
  a.total = Bm * Hm * MT * NT;
  a.out = static_cast<uint8_t*>(scratch);
  if (Status st = launch_per_byte(tile_state_kernel, a, stream, "block-mask tile state"); !st.ok()) return st;

  v.mask = a.out;
  v.sb = Bm == 1 ? 0 : Hm * MT * NT, v.sh = Hm == 1 ? 0 : MT * NT, v.sq = NT, v.sk = 1;
  v.q_tiles = v.k_tiles = 1;
  v.elem = a.mask;
  v.esb = sb, v.esh = sh, v.esq = m.stride[2], v.esk = m.stride[3];
  v.bq = a.bq, v.bk = a.bk;
  v.nq = static_cast<int>(m.shape[2]), v.nk = static_cast<int>(m.shape[3]);
  return Status::Ok();
}

}  // namespace steelattn::sm90
