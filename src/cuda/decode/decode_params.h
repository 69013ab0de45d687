// Kernel-side parameters of the split-KV decode kernel (decode_kernel.cuh).
//
// Decode is a few query rows against a long KV cache, so the work is split over the keys:
// grid = (batch entry, KV head, key split, row group). A row group is 16 query rows of one
// KV head: row r is query head hk * group + r / N at query position r % N, so the query
// heads that share a KV head read each K/V byte once. Strides are in elements.
#pragma once

#include <cstdint>

namespace steelattn::cuda_decode {

struct DecodeParams {
  const void* q;        // [B, H, N, D]
  const void* k;        // [Bc, Hkv, S, D]  (paged: pool pages [num_pages, Hkv, page_size, D])
  const void* v;        // [Bc, Hkv, S, Dv]
  void* out;            // [B, H, N, Dv], q's dtype
  float* lse;           // [B, H, N], may be null
  int64_t q_stride[3];  // b, h, n
  int64_t k_stride[3];  // b (paged: page), hkv, s (paged: slot in page)
  int64_t v_stride[3];
  int64_t out_stride[3];
  int64_t lse_stride[3];

  // Keys used per entry (null: all S) and the cache entry of each batch entry (null: b).
  const int32_t* seqlens_k;
  const int32_t* kv_batch_idx;
  // Paged caches: block_table[b * bt_stride + j / page_size] holds key j's page (null: dense);
  // k_stride / v_stride are then (page, hkv, slot) strides.
  const int32_t* block_table;
  int64_t bt_stride;
  int32_t page_size;

  int32_t B, H, Hkv, group, N, S, D, Dv;
  int32_t rows;        // group * N query rows per KV head
  int32_t row_groups;  // ceil(rows / 16)
  int32_t num_splits;  // key splits per (b, hkv); 1 writes out directly

  float scale;
  float softcap;       // <= 0: off
  const float* alibi;  // [B, H] slopes (stride 0 over B for per-head), null: off
  int64_t alibi_stride[2];
  const uint8_t* mask;  // bool keep-mask [B, H, N, S] (broadcast strides), null: off
  int64_t mask_stride[4];
  // Query i of entry b sits at key i + L_b - N + diag_offset (L_b its used keys when
  // seqlens_k is given, else 0 - N + S is folded into diag_offset by the caller).
  int64_t diag_offset;
  bool ragged;  // diag_offset is relative to L_b - N (seqlens_k given)
  int64_t window_left, window_right;  // < 0: unbounded

  // num_splits > 1: per split, normalised partial outputs and their LSE, fp32,
  // [num_splits, B, H, N, Dv] and [num_splits, B, H, N], contiguous.
  float* part_out;
  float* part_lse;

  // Paged caches: log2(page_size) when it is a power of two, else -1 (page lookups shift
  // instead of dividing; read under STEELATTN_DECODE_PAGED_OFFSETS).
  int32_t page_shift;
};

}  // namespace steelattn::cuda_decode
