// The core's attention calls as a table of plain C functions, exported by steelattn._ext
// in a capsule (`_ext.core_api`) and used by steelattn._torch_native, the optional
// module that holds the autograd node in C++ (src/python/torch_native.cpp).
//
// Why a table: the core (with its CUDA kernels, device caches and tensor-map caches) lives
// once in the process, in _ext; the autograd module is built against one torch version's
// C++ API and must not carry a second copy. Only C layouts cross the boundary
// (AttentionParams and TensorRef are plain structs; strings are returned as pointers to
// thread-local storage owned by _ext, valid until the calling thread's next call), so the
// two modules may be built with different C++ standard-library ABIs.
#pragma once

#include <cstddef>
#include <cstdint>

#include "steelattn/steelattn.h"

extern "C" {

// Allocates `bytes` of device scratch for the call, keeps it alive until the call returns,
// and describes it in *out. Returns false (with a message for the caller) on failure.
typedef bool (*steelattn_alloc_fn)(void* ctx, size_t bytes, steelattn::TensorRef* out);

// What one call did. status is a steelattn::StatusCode; message says why when it is not ok.
// path / note: the forward's (or backward's) path and why a faster kernel refused (or, for
// path "none", why no kernel serves the call); bpath / bnote: the backward predicted at
// forward time (mode 1 and 2).
struct steelattn_call_result {
  int32_t status;
  const char* message;
  const char* path;
  const char* note;
  const char* bpath;
  const char* bnote;
};

enum { STEELATTN_CORE_API_VERSION = 2 };

// A forward's mode: run; run for training (the backward must have a kernel too, or nothing
// runs); select only (_kernel.RUN / TRAIN / SELECT).
enum steelattn_forward_mode { STEELATTN_RUN = 0, STEELATTN_TRAIN = 1, STEELATTN_SELECT = 2 };

struct steelattn_core_api {
  uint32_t version;       // STEELATTN_CORE_API_VERSION
  uint32_t params_bytes;  // sizeof(steelattn::AttentionParams) on the exporting side
  // validate, select (mode 0 run, 1 run for training: the backward must have a kernel too,
  // 2 select only), allocate scratch through `alloc`, run on `stream` (cudaStream_t or null).
  // Nothing is written when the call is refused.
  void (*forward)(steelattn::AttentionParams* p, int mode, void* stream, steelattn_alloc_fn alloc, void* alloc_ctx,
                  steelattn_call_result* r);
  // validate the gradients, select, allocate scratch, run.
  void (*backward)(steelattn::AttentionParams* p, void* stream, steelattn_alloc_fn alloc, void* alloc_ctx,
                   steelattn_call_result* r);
  // steelattn::kv_append (validated first, nothing written on error); only status / message.
  void (*kv_append)(steelattn::KVAppendParams* p, void* stream, steelattn_call_result* r);
};

}  // extern "C"
