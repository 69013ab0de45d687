// Entry points of the CPU flash kernels, one pair per instruction set, plus the
// float64 pair (portable code; used for float64 inputs on any CPU). Each runs a list
// of validated problems (a dense call is one; a varlen call one per sequence,
// split_sequences) as one pool of tasks.
#pragma once

#include <cstdint>
#include <vector>

#include "steelattn/steelattn.h"

namespace steelattn::cpu {

Status flash_forward_avx512(const AttentionParams* problems, int64_t count);
Status flash_forward_avx512bf16(const AttentionParams* problems, int64_t count);  // bf16 inputs with even D only
Status flash_forward_avx2(const AttentionParams* problems, int64_t count);
Status flash_forward_scalar(const AttentionParams* problems, int64_t count);
Status flash_forward_f64(const AttentionParams* problems, int64_t count);
Status flash_backward_avx512(const AttentionParams* problems, int64_t count);
Status flash_backward_avx512bf16(const AttentionParams* problems, int64_t count);  // bf16 inputs with even D only
Status flash_backward_avx2(const AttentionParams* problems, int64_t count);
Status flash_backward_scalar(const AttentionParams* problems, int64_t count);
Status flash_backward_f64(const AttentionParams* problems, int64_t count);

// A varlen call as one dense problem per sequence: views of the packed tensors at the
// sequence's offsets, B = 1, N and S its lengths, diag_offset its bottom-right
// alignment plus the call's, ALiBi slopes of its row (steelattn.h, cu_seqlens_q); a call
// with seqlens_k as one problem per batch entry (S its length).
std::vector<AttentionParams> split_sequences(const AttentionParams& p);

// Decode with few tasks for the threads (split_keys.cpp): how many chunks to cut each
// problem's keys into (1: do not), and the forward over the chunks with the LSE merge.
int key_splits(const std::vector<AttentionParams>& parts);
Status forward_with_key_splits(const std::vector<AttentionParams>& parts, int splits,
                               Status (*entry)(const AttentionParams*, int64_t));

}  // namespace steelattn::cpu
