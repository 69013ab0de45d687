// A small persistent thread pool for the CPU kernels. Tasks are handed out
// through an atomic counter, so uneven tasks (causal rows) balance themselves.
// Plain function pointers keep the ISA-specific translation units free of
// shared template instantiations (see cpu/README in flash_fwd_impl.h).
#pragma once

#include <cstddef>
#include <cstdint>

namespace steelattn::cpu {

using TaskFn = void (*)(void* ctx, int64_t task, int thread);

// Runs fn(ctx, t, thread) for t in [0, n) on up to `threads` threads (the
// caller is one of them). Returns when every task has finished.
void parallel_for(int64_t n, int threads, TaskFn fn, void* ctx);

// Number of threads a call with num_threads <= 0 uses.
int default_threads();

// Per-thread scratch of at least `floats` floats, 64-byte aligned, reused
// across calls (grows, never shrinks). `thread` is the index parallel_for passed.
float* thread_scratch(int thread, size_t floats);

}  // namespace steelattn::cpu
