// steelattn public C++ API.
//
// The core knows no framework: tensors arrive as TensorRef (pointer, dtype,
// device, shape, strides), all outputs and workspaces are allocated by the
// caller, and every entry point returns a Status instead of throwing.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace steelattn {

enum class DType : int32_t { f32 = 0, f16 = 1, bf16 = 2, f64 = 3, boolean = 4, i32 = 5, i64 = 6, u8 = 7 };
enum class Device : int32_t { cpu = 1, cuda = 2 };

const char* dtype_name(DType t);
int dtype_size(DType t);

// A strided view of caller-owned memory. Strides are in elements. Up to 4 dims;
// unused trailing dims have shape 1. A null `data` means "absent" for optional
// tensors.
struct TensorRef {
  void* data = nullptr;
  DType dtype = DType::f32;
  Device device = Device::cpu;
  int32_t device_id = 0;
  int32_t ndim = 0;
  int64_t shape[4] = {1, 1, 1, 1};
  int64_t stride[4] = {0, 0, 0, 0};

  bool present() const { return data != nullptr; }
};

// Everything one attention call needs. Every feature is a field, so new kernels
// slot in without changing signatures. Fields a kernel does not understand must
// be at their defaults for that kernel to be selected (see select_forward_path).
struct AttentionParams {
  // Inputs. q: [B, H, N, D], k: [B, Hkv, S, D], v: [B, Hkv, S, Dv]; H % Hkv == 0.
  TensorRef q, k, v;
  // Outputs. out: [B, H, N, Dv] (dtype of q). lse: [B, H, N] fp32, optional.
  TensorRef out, lse;
  // Optional [B, H, N, S] fp32 softmax probabilities (before dropout).
  TensorRef attn_weights;

  // Scores: s = scale * q.k; softcap; ALiBi; bias; mask.
  double scale = 1.0;
  double softcap = 0.0;  // > 0 enables s = softcap * tanh(s / softcap)
  // ALiBi slopes, fp32, shape [B, H] (stride 0 over B for per-head slopes).
  TensorRef alibi_slopes;
  // Additive bias, fp32, broadcast to [B, H, N, S] through zero strides.
  TensorRef bias;
  // Boolean keep-mask (true = attend), 1 byte per element, broadcast to
  // [B, H, N, S] through zero strides.
  TensorRef bool_mask;

  // Band mask. Query i is aligned with key i + diag_offset; it sees keys j with
  // i + diag_offset - window_left <= j <= i + diag_offset + window_right.
  // -1 means unbounded on that side. Causal is window_right = 0;
  // flash_attention uses diag_offset = S - N (bottom-right), torch's SDPA 0.
  int64_t diag_offset = 0;
  int64_t window_left = -1;
  int64_t window_right = -1;

  // Dropout on the probabilities: keep with probability 1 - p, scale by 1/(1-p).
  // The keep decision is a Philox draw keyed by (seed, offset, b, h, i, j).
  float dropout_p = 0.0f;
  uint64_t dropout_seed = 0;
  uint64_t dropout_offset = 0;
  // The grid the draws are keyed in: score (b, h, i, j) of this call is element
  // (b + dropout_b0, h, i + dropout_i0, j + dropout_j0) of a [*, H, dropout_N, dropout_S]
  // grid (dropout_N / dropout_S < 0: N / S). Callers leave the defaults; a varlen call's
  // sequences are pieces of its packed [1, H, total_q, total_k] grid this way, so no two
  // sequences draw the same numbers.
  int64_t dropout_b0 = 0, dropout_i0 = 0, dropout_j0 = 0;
  int64_t dropout_N = -1, dropout_S = -1;

  // Backward only (attention_backward). dout [B, H, N, Dv] is the gradient of
  // out; q, k, v, out and lse are the forward's (lse required). dq, dk, dv have
  // the shapes and dtypes of q, k, v. dbias (optional, [B, H, N, S] float, no
  // zero strides) receives the gradient of the score, i.e. of an additive bias;
  // elements of tiles outside the band are not written (pass zeros).
  TensorRef dout, dq, dk, dv, dbias;
  // Optional gradient of lse ([B, H, N], lse's dtype), for losses that use it.
  TensorRef dlse;
  // Scratch on the tensors' device, any contents: the backward needs
  // backward_workspace_bytes(p) bytes, the forward forward_workspace_bytes(p, path)
  // (the decode kernel's per-split partial results); may be absent when that is 0.
  TensorRef workspace;
  // Backward: bit-identical gradients run to run (selects a kernel without
  // order-dependent floating-point accumulation).
  bool deterministic = false;

  // CPU only: worker threads (<= 0 means hardware concurrency).
  int32_t num_threads = 0;

  // Variable-length batch. When cu_seqlens_q is given (with cu_seqlens_k), q, out and
  // dq are packed views [1, H, total_q, D], k, v, dk, dv [1, Hkv, total_k, D], lse and
  // dlse [1, H, total_q]; sequence b owns query rows cu_seqlens_q[b] ..
  // cu_seqlens_q[b + 1] - 1 and keys cu_seqlens_k[b] .. cu_seqlens_k[b + 1] - 1
  // (int32 [num_seqs + 1], non-decreasing from 0, on the tensors' device). Every
  // position (band, ALiBi distance) is relative to the sequence, and diag_offset is
  // added to the sequence's own bottom-right alignment S_b - N_b. alibi_slopes is
  // [num_seqs, H]. Not combined with bias, bool_mask, attn_weights or dropout.
  TensorRef cu_seqlens_q, cu_seqlens_k;

  // Keys used per batch entry (a KV cache): int32 [B] on the tensors' device. k and v are
  // [B, Hkv, S, D] with S the capacity; batch entry b attends to keys 0 .. seqlens_k[b] - 1
  // only, with its diagonal at its own length: diag_offset is added to seqlens_k[b] - N.
  // Not combined with varlen, block masks, bias, bool_mask or attn_weights.
  TensorRef seqlens_k;
  // With seqlens_k, two ways to find an entry's keys (CUDA decode kernel only; the CPU
  // kernels take dense caches). block_table (int32 [B, max_pages]): k and v are page pools
  // viewed [num_pages, Hkv, page_size, D], key j of entry b lives in page
  // block_table[b, j / page_size] at slot j % page_size, and S = max_pages * page_size.
  // kv_batch_idx (int32 [B]): k and v are [Bc, Hkv, S, D] caches and entry b reads
  // cache kv_batch_idx[b]. The indices are not checked on the device.
  TensorRef block_table, kv_batch_idx;
  // With seqlens_k: key splits per (batch entry, KV head) for the CUDA split-KV decode
  // kernel (clamped to its 128); 0 lets it choose from the shape. Results do not depend on
  // it beyond fp32 rounding of the merge. The CPU kernels split by threads.
  int32_t num_splits = 0;

  // Block-sparse mask: bool [B, H, NQ, NK] (broadcast through zero strides), NQ =
  // ceil(N / block_q), NK = ceil(S / block_k). Key j is hidden from query i when block
  // (i / block_q, j / block_k) is inactive; the band, causal and every other rule still
  // apply inside active blocks. Kernels skip tiles whose blocks are all inactive. Block
  // sizes are positive multiples of 16. Not combined with varlen or attn_weights.
  TensorRef block_mask;
  int64_t block_q = 0, block_k = 0;

  // Dimensions, derived by validate_forward() from the tensors (varlen: B = 1, N and S
  // the totals, num_seqs the number of sequences; dense: num_seqs = 0).
  int64_t B = 0, H = 0, Hkv = 0, N = 0, S = 0, D = 0, Dv = 0;
  int64_t num_seqs = 0;
  bool varlen() const { return cu_seqlens_q.present(); }
  // Whether the call splits into one dense problem per sequence or batch entry.
  bool ragged() const { return cu_seqlens_q.present() || seqlens_k.present(); }
  // Whether k and v are read through block_table or kv_batch_idx rather than by batch index.
  bool indirect_kv() const { return block_table.present() || kv_batch_idx.present(); }
};

enum class StatusCode : int32_t { ok = 0, invalid_argument = 1, not_implemented = 2, runtime_error = 3 };

struct Status {
  StatusCode code = StatusCode::ok;
  std::string message;
  bool ok() const { return code == StatusCode::ok; }
  static Status Ok() { return {}; }
  static Status Invalid(std::string m) { return {StatusCode::invalid_argument, std::move(m)}; }
  static Status NotImplemented(std::string m) { return {StatusCode::not_implemented, std::move(m)}; }
  static Status Error(std::string m) { return {StatusCode::runtime_error, std::move(m)}; }
};

// The kernel paths a forward or backward call can take. One function picks the path; the
// dispatcher, the feature report and the dispatch counters all use it.
enum class ForwardPath : int32_t {
  none = 0,          // no steelattn kernel serves this call
  cpu_avx512 = 1,    // CPU flash kernel, AVX-512 instantiation
  cpu_avx2 = 2,      // CPU flash kernel, AVX2 + FMA instantiation
  cpu_scalar = 3,    // CPU flash kernel, portable instantiation
  cuda_sm90 = 4,     // Hopper wgmma + TMA kernel
  cuda_generic = 5,  // mma.sync kernel, sm_80 and newer
  cuda_decode = 6,   // split-KV decode kernel (mma.sync), sm_80 and newer
};
const char* path_name(ForwardPath p);

// Checks shapes, dtypes, devices and strides, fills the derived dimensions.
// The message names the offending argument.
Status validate_forward(AttentionParams& p);

// The path a (validated) call would take, with the reason when it is `none`.
ForwardPath select_forward_path(const AttentionParams& p, std::string* why_not = nullptr);

// Validates, selects and runs. `stream` is a cudaStream_t for CUDA tensors.
Status attention_forward(AttentionParams& p, void* stream = nullptr, ForwardPath* taken = nullptr);

// A selection with the reasons behind it, for callers that report what ran and why.
struct PathChoice {
  ForwardPath path = ForwardPath::none;
  std::string why_not;  // path == none: why no kernel serves the call
  // A preferred kernel refused the call and a slower one took it: "cuda_sm90 -> cuda_generic: <why>".
  std::string demoted;
};
// The forward / backward path of a validated call (select_*_path, with the demotion reason).
PathChoice choose_forward_path(const AttentionParams& p);
PathChoice choose_backward_path(const AttentionParams& p);
// Run a validated call on the path choose_*_path returned for these params (no second
// selection). run_forward / run_backward need `workspace` as forward_workspace_bytes /
// backward_workspace_bytes(p, path) say.
Status run_forward(const AttentionParams& p, ForwardPath path, void* stream = nullptr);
Status run_backward(const AttentionParams& p, ForwardPath path, void* stream = nullptr);

// Bytes of `workspace` a forward on `path` needs (0 for most paths).
size_t forward_workspace_bytes(const AttentionParams& p, ForwardPath path);

// Backward: checks the gradient tensors on top of validate_forward.
Status validate_backward(AttentionParams& p);
// The kernel that computes the gradients of a (validated) call, or `none`.
ForwardPath select_backward_path(const AttentionParams& p, std::string* why_not = nullptr);
// Bytes of `workspace` the kernel selected for this backward needs (0 for most paths).
size_t backward_workspace_bytes(const AttentionParams& p);
// The same for a path already chosen (choose_backward_path).
size_t backward_workspace_bytes(const AttentionParams& p, ForwardPath path);
// dq, dk, dv (and dbias) from dout, recomputing P from lse.
Status attention_backward(AttentionParams& p, void* stream = nullptr, ForwardPath* taken = nullptr);

// The dropout keep-mask the kernels use, materialised as bytes [B, H, N, S]
// (for tests and for users who need to reproduce a training step). With a frame
// (AttentionParams::dropout_i0 ...): rows i0 .. i0 + N and columns j0 .. j0 + S of a
// [B, H, N_total, S_total] grid, e.g. one sequence of a varlen call.
Status dropout_keep_mask(uint8_t* out, int64_t B, int64_t H, int64_t N, int64_t S, float p,
                         uint64_t seed, uint64_t offset, int64_t i0 = 0, int64_t j0 = 0,
                         int64_t N_total = -1, int64_t S_total = -1);

// A KV-cache step's preparation, one launch on CUDA: k_new / v_new [B, Hkv, Nnew, D / Dv]
// written into the cache at rows seqlens[b] .. seqlens[b] + Nnew - 1 (int32 [B], read on
// the device), and with rotary tables the rotation (RoPE) of k_new at those positions and
// of q [B, H, Nq, D] into q_out at seqlens[b] + i (q_causal) or seqlens[b] (all of a row's
// queries at one position). Caches as in AttentionParams: dense [Bc, Hkv, Smax, D], one
// slot per entry through kv_batch_idx, or page pools viewed [num_pages, Hkv, page_size, D]
// through block_table. Rotation: the first rotary_dim features, pairs (2i, 2i + 1) when
// interleaved (GPT-J) else (i, i + rotary_dim / 2) (GPT-NeoX), angles cos/sin
// [max_position, rotary_dim / 2] (float32 or the tensors' dtype), computed in fp32 (fp64 for
// fp64 tensors).
// Lengths past the capacity, or positions past the tables, are the caller's to prevent
// (flash_attention_kvcache checks them on the host when the lengths are host values).
struct KVAppendParams {
  TensorRef k_new, v_new, k_cache, v_cache, seqlens, block_table, kv_batch_idx;
  TensorRef q, q_out;                 // optional (both or neither): q rotated into q_out
  TensorRef rotary_cos, rotary_sin;   // optional: no rotation
  int64_t rotary_dim = 0;             // 0: 2 * the tables' width
  bool interleaved = true;
  bool q_causal = true;
  int num_threads = 0;                // CPU: 0 = all
};
Status kv_append(KVAppendParams& p, void* stream = nullptr);

// The CPU instruction set the CPU backend dispatches to at run time.
const char* cpu_isa();

bool cuda_compiled();

}  // namespace steelattn
